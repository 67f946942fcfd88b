// Pure parts of reading upstream answers: the referrers filter and signed schema1 payloads.

import assert from 'node:assert/strict';
import { appliedArtifactType, filterReferrers } from '../src/content/referrers.js';
import { isSignedSchema1, schema1Payload } from '../src/content/schema1.js';

describe('referrers filter (pure)', () => {
  const index = { schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests: [{ digest: 'sha256:a', artifactType: 'x/sig' }, { digest: 'sha256:b', artifactType: 'x/sbom' }, { digest: 'sha256:c' }], annotations: { kept: 'yes' } };

  it('keeps the descriptors of the artifactType asked for, and the rest of the index', () => {
    const filtered = JSON.parse(filterReferrers(Buffer.from(JSON.stringify(index)), 'x/sig')!.toString()) as typeof index;
    assert.deepEqual(filtered.manifests, [{ digest: 'sha256:a', artifactType: 'x/sig' }]);
    assert.deepEqual(filtered.annotations, { kept: 'yes' });
  });

  it('refuses what is not an index', () => {
    assert.equal(filterReferrers(Buffer.from('not json'), 'x/sig'), null);
    assert.equal(filterReferrers(Buffer.from('{"manifests": {}}'), 'x/sig'), null);
    assert.equal(filterReferrers(Buffer.from('[]'), 'x/sig'), null);
  });

  it('reads OCI-Filters-Applied as a list', () => {
    assert.equal(appliedArtifactType('artifactType'), true);
    assert.equal(appliedArtifactType('other, artifactType'), true);
    assert.equal(appliedArtifactType('artifactTypes'), false);
    assert.equal(appliedArtifactType(undefined), false);
  });
});

describe('signed schema1 payload (pure)', () => {
  // libtrust's form: the payload's bytes up to its closing brace, then the signatures, the rest of the
  // payload (its tail) in the protected header.
  const payload = Buffer.from('{\n   "schemaVersion": 1,\n   "name": "team/app"\n}');
  const formatLength = payload.length - 2; // before "\n}"
  const signed = (tail: string, length = formatLength) => {
    const protectedHeader = Buffer.from(JSON.stringify({ formatLength: length, formatTail: Buffer.from(tail).toString('base64url'), time: '2026-01-01T00:00:00Z' })).toString('base64url');
    return Buffer.concat([payload.subarray(0, formatLength), Buffer.from(`,\n   "signatures": [{"header": {}, "signature": "x", "protected": "${protectedHeader}"}]\n}`)]);
  };

  it('recovers the payload the digest names', () => {
    assert.deepEqual(schema1Payload(signed('\n}')), payload);
  });

  it('refuses a manifest without signatures, or with a header that does not fit', () => {
    assert.equal(schema1Payload(payload), null);
    assert.equal(schema1Payload(signed('\n}', 10_000)), null);
    assert.equal(schema1Payload(Buffer.from('{"schemaVersion": 1, "signatures": [{"protected": "!!"}]}')), null);
  });

  it('knows the signed media type', () => {
    assert.equal(isSignedSchema1('application/vnd.docker.distribution.manifest.v1+prettyjws'), true);
    assert.equal(isSignedSchema1('application/vnd.docker.distribution.manifest.v1+json'), false);
    assert.equal(isSignedSchema1(undefined), false);
  });
});
