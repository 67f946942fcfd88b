import assert from 'node:assert/strict';
import { createHash, createPublicKey, generateKeyPairSync, sign as signWithNode, type KeyObject } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { unloadableFiles } from '../src/shell/configfile.js';
import {
  MAX_SIGNATURE_LAYERS,
  matchSignature,
  parsePublicKey,
  parseSignatureManifest,
  SIGNATURE_ANNOTATION,
  SIMPLE_SIGNING_MEDIA_TYPE,
  signatureReferrers,
  signatureTag,
} from '../src/signature/cosign.js';
import { ed25519phVerify } from '../src/signature/ed25519ph.js';
import { cosignSignatureCheck, readCosignKeys, verifyCosignSignature, type SignatureVerdict } from '../src/webhook/signatures.js';
import { configFrom } from './support/config.js';
import { runCli } from './support/cli.js';
import { cosignVerifies, generateKeyPair, importKeyPair, removeCosignFiles, sign, type CosignKeyPair } from './support/cosign.js';
import { directRegistryView } from './support/directview.js';
import { buildImage, type TestImage } from './support/oci.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const sha256 = (data: Buffer): string => `sha256:${createHash('sha256').update(data).digest('hex')}`;
const IMAGE_DIGEST = `sha256:${'a'.repeat(64)}`;
const OTHER_DIGEST = `sha256:${'b'.repeat(64)}`;

/** A simple-signing payload as cosign writes it (SIGNATURE_SPEC.md), for the pure checks below. */
function payloadFor(digest: string, type = 'cosign container image signature'): Buffer {
  return Buffer.from(JSON.stringify({ critical: { identity: { 'docker-reference': '127.0.0.1:5000/team/app' }, image: { 'docker-manifest-digest': digest }, type }, optional: null }));
}

function signatureManifest(layers: ReadonlyArray<{ payload: Buffer; signature: Buffer }>): Buffer {
  return Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', size: 2, digest: sha256(Buffer.from('{}')) },
      layers: layers.map(({ payload, signature }) => ({ mediaType: SIMPLE_SIGNING_MEDIA_TYPE, size: payload.length, digest: sha256(payload), annotations: { [SIGNATURE_ANNOTATION]: signature.toString('base64') } })),
    }),
  );
}

describe('cosign signatures: the pure checks', () => {
  // Node-made signatures here, for what cosign never writes (malformed payloads, oversized
  // manifests); every format case cosign does write is tested below with cosign itself.
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const signed = (payload: Buffer) => ({ payload, signature: signWithNode('sha256', payload, privateKey) });

  it('verifies a payload for the digest signed by the key, and names the key by its index', () => {
    const { payload, signature } = signed(payloadFor(IMAGE_DIGEST));
    const parsed = parseSignatureManifest(signatureManifest([{ payload, signature }]));
    assert.ok(parsed.ok);
    const other = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey;
    assert.deepEqual(matchSignature(parsed.layers[0]!, payload, IMAGE_DIGEST, [other, publicKey]), { verified: true, keyIndex: 1 });
  });

  it('refuses a payload whose bytes are not its layer digest, a payload of another type, and a payload for another digest', () => {
    const { payload, signature } = signed(payloadFor(IMAGE_DIGEST));
    const parsed = parseSignatureManifest(signatureManifest([{ payload, signature }]));
    assert.ok(parsed.ok);
    const tampered = Buffer.from(payload.toString().replace('"optional":null', '"optional":{}'));
    assert.deepEqual(matchSignature(parsed.layers[0]!, tampered, IMAGE_DIGEST, [publicKey]), { verified: false, reason: `payload does not match its layer digest ${sha256(payload)}` });
    assert.deepEqual(matchSignature(parsed.layers[0]!, payload, OTHER_DIGEST, [publicKey]), { verified: false, reason: `signature for another digest (${IMAGE_DIGEST})` });

    const attestation = signed(payloadFor(IMAGE_DIGEST, 'cosign container image attestation'));
    const parsedAttestation = parseSignatureManifest(signatureManifest([attestation]));
    assert.ok(parsedAttestation.ok);
    assert.deepEqual(matchSignature(parsedAttestation.layers[0]!, attestation.payload, IMAGE_DIGEST, [publicKey]), {
      verified: false,
      reason: 'payload malformed (type "cosign container image attestation", want "cosign container image signature")',
    });
  });

  it('bounds what a manifest may hold and says which bound', () => {
    const layer = signed(payloadFor(IMAGE_DIGEST));
    const many = parseSignatureManifest(signatureManifest(Array.from({ length: MAX_SIGNATURE_LAYERS + 1 }, () => layer)));
    assert.deepEqual(many, { ok: false, reason: `signature manifest has ${MAX_SIGNATURE_LAYERS + 1} layers, more than ${MAX_SIGNATURE_LAYERS}` });
    assert.deepEqual(parseSignatureManifest(Buffer.alloc(300 * 1024, 0x20)), { ok: false, reason: 'signature manifest larger than 262144 bytes' });
    assert.deepEqual(parseSignatureManifest(Buffer.from('{"schemaVersion":2,"manifests":[]}')), { ok: false, reason: 'signature manifest malformed (not an image manifest)' });
    const unsigned = JSON.parse(signatureManifest([layer]).toString()) as { layers: Array<{ annotations: Record<string, string> }> };
    unsigned.layers[0]!.annotations = {};
    assert.deepEqual(parseSignatureManifest(Buffer.from(JSON.stringify(unsigned))), {
      ok: false,
      reason: `signature manifest malformed (layer ${sha256(layer.payload)} has no base64 ${SIGNATURE_ANNOTATION} annotation)`,
    });
  });

  it('lists only cosign signature referrers from a referrers index', () => {
    const index = {
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      manifests: [
        { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: OTHER_DIGEST, size: 10, artifactType: 'application/spdx+json' },
        { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: IMAGE_DIGEST, size: 10, artifactType: 'application/vnd.dev.cosign.artifact.sig.v1+json' },
      ],
    };
    assert.deepEqual(signatureReferrers(Buffer.from(JSON.stringify(index))), { ok: true, manifests: [{ digest: IMAGE_DIGEST, mediaType: 'application/vnd.oci.image.manifest.v1+json', size: 10 }], more: 0 });
  });

  it('verifies Ed25519ph (RFC 8032 §7.3, test "abc") and refuses another message', () => {
    const key = createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: Buffer.from('ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf', 'hex').toString('base64url') }, format: 'jwk' });
    const signature = Buffer.from('98a70222f0b8121aa9d30f813d683f809e462b469c7ff87639499bb94e6dae4131f85042463c2a355a2003d062adf5aaa10b8c61e636062aaad11c2a26083406', 'hex');
    assert.equal(ed25519phVerify(key, Buffer.from('abc'), signature), true);
    assert.equal(ed25519phVerify(key, Buffer.from('abd'), signature), false);
  });

  it('refuses a key type cosign does not sign with, at config load, naming the key', () => {
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-keys-'));
    try {
      const dsa = generateKeyPairSync('dsa', { modulusLength: 2048, divisorLength: 256 }).publicKey.export({ type: 'spki', format: 'pem' });
      writeFileSync(join(dir, 'dsa.pub'), dsa);
      writeFileSync(join(dir, 'text.pub'), 'not a key\n');
      const errors = unloadableFiles([
        { key: 'registries[0].verify.cosign.publicKeyFiles[0]', path: join(dir, 'dsa.pub'), holds: 'public-key' },
        { key: 'registries[0].verify.cosign.publicKeyFiles[1]', path: join(dir, 'text.pub'), holds: 'public-key' },
      ]);
      assert.deepEqual(
        errors.map((e) => e.key),
        ['registries[0].verify.cosign.publicKeyFiles[0]', 'registries[0].verify.cosign.publicKeyFiles[1]'],
      );
      assert.match(errors[0]!.message, /dsa\.pub holds no usable PEM public key: unsupported key type dsa/);
      assert.match(errors[1]!.message, /text\.pub holds no usable PEM public key/);
      assert.ok(errors.every((e) => !e.message.includes('\n')));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('cosign signatures made by cosign, on a real registry', function () {
  this.timeout(300_000);
  let registry: RegistryHandle;
  let signer: CosignKeyPair;
  let otherSigner: CosignKeyPair;
  const images = new Map<string, TestImage>();
  const repository = 'team/app';

  const view = () => directRegistryView({ upstream: registry.url });
  const byDigest = (tag: string) => `${registry.host}/${repository}@${images.get(tag)!.index.digest}`;
  const keysOf = (...pairs: CosignKeyPair[]): KeyObject[] => pairs.map((pair) => parsePublicKey(pair.publicKeyPem));
  const verify = (tag: string, keys: KeyObject[]): Promise<SignatureVerdict> =>
    verifyCosignSignature(view(), { rule: 'corp', repository }, images.get(tag)!.index.digest, 'default', keys, AbortSignal.timeout(30_000));

  before(async () => {
    registry = await startRegistry({ accessLog: true });
    for (const tag of ['signed', 'unsigned', 'other-digest', 'referrer', 'p384', 'rsa', 'ed25519']) {
      const image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [512] });
      images.set(tag, image);
      await registry.push(image, repository, tag);
    }
    [signer, otherSigner] = await Promise.all([generateKeyPair(), generateKeyPair()]);
    await Promise.all([sign(byDigest('signed'), signer), sign(byDigest('referrer'), signer, { referrers: true })]);
  });

  after(async () => {
    await registry?.stop();
    removeCosignFiles();
  });

  it('verifies an image cosign signed with the key, as cosign verify does', async () => {
    assert.equal(await cosignVerifies(byDigest('signed'), signer), true);
    const verdict = await verify('signed', keysOf(signer));
    assert.deepEqual(verdict, { verified: true, keyIndex: 0, source: signatureTag(images.get('signed')!.index.digest) });
    // With the keys of a rotation, the index names the key that verified.
    assert.deepEqual(await verify('signed', keysOf(otherSigner, signer)), { ...verdict, keyIndex: 1 });
    // The payload was fetched with the view's bounded blob read from the rule's repository.
    const requests = await registry.requests();
    assert.ok(requests.some((r) => r.method === 'GET' && r.path.startsWith(`/v2/${repository}/blobs/sha256:`) && r.status === 200));
  });

  it('the admission\'s check passes on which key verified and where the signature was (the audit\'s keyIndex and source; trial 22)', async () => {
    const config = configFrom(`broker: {keyFiles: [/nonexistent/broker.key]}\nregistries:\n  - {name: corp, match: [corp.example], upstream: "${registry.url}", verify: {cosign: {publicKeyFiles: [${otherSigner.publicKeyFile}, ${signer.publicKeyFile}]}}}\n`);
    const check = cosignSignatureCheck(view(), () => config);
    const digest = images.get('signed')!.index.digest;
    assert.deepEqual(await check({ rule: 'corp', repository }, digest, 'default', AbortSignal.timeout(30_000)), { verified: true, keyIndex: 1, source: signatureTag(digest) });
  });

  it('refuses an unsigned image', async () => {
    assert.equal(await cosignVerifies(byDigest('unsigned'), signer), false);
    const digest = images.get('unsigned')!.index.digest;
    assert.deepEqual(await verify('unsigned', keysOf(signer)), { verified: false, kind: 'unsigned', reason: `unsigned (no ${signatureTag(digest)} and no signature referrers)` });
  });

  it('refuses an image signed by another key', async () => {
    assert.equal(await cosignVerifies(byDigest('signed'), otherSigner), false);
    assert.deepEqual(await verify('signed', keysOf(otherSigner)), { verified: false, kind: 'rejected', reason: 'signed by another key' });
  });

  it('refuses a signature of another digest copied to the image\'s signature tag', async () => {
    // The registry API, as an attacker with push rights to the signature tags would: image A's
    // signature manifest put under image B's sha256-<hex>.sig tag (its blobs are in the repository).
    const signedDigest = images.get('signed')!.index.digest;
    const source = await fetch(`${registry.url}/v2/${repository}/manifests/${signatureTag(signedDigest)}`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } });
    assert.equal(source.status, 200);
    const manifest = Buffer.from(await source.arrayBuffer());
    const put = await fetch(`${registry.url}/v2/${repository}/manifests/${signatureTag(images.get('other-digest')!.index.digest)}`, {
      method: 'PUT',
      headers: { 'content-type': source.headers.get('content-type') ?? 'application/vnd.oci.image.manifest.v1+json' },
      body: manifest,
    });
    assert.equal(put.status, 201);

    assert.equal(await cosignVerifies(byDigest('other-digest'), signer), false);
    assert.deepEqual(await verify('other-digest', keysOf(signer)), { verified: false, kind: 'rejected', reason: `signature for another digest (${signedDigest})` });
  });

  it('verifies a signature cosign stored as an OCI 1.1 referrer, on a registry without the referrers API (the referrers tag)', async () => {
    assert.equal(await cosignVerifies(byDigest('referrer'), signer, { referrers: true }), true);
    const digest = images.get('referrer')!.index.digest;
    // Not under the .sig tag: found through the referrers path only.
    const sigTag = await fetch(`${registry.url}/v2/${repository}/manifests/${signatureTag(digest)}`, { method: 'HEAD', headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } });
    assert.equal(sigTag.status, 404);
    const directView = view();
    const verdict = await verifyCosignSignature(directView, { rule: 'corp', repository }, digest, 'default', keysOf(signer), AbortSignal.timeout(30_000));
    assert.equal(verdict.verified, true, JSON.stringify(verdict));
    assert.match(verdict.verified ? verdict.source : '', /^sha256:[a-f0-9]{64}$/);
    assert.ok(directView.requests.includes(`GET /v2/${repository}/referrers/${digest}?artifactType=${encodeURIComponent('application/vnd.dev.cosign.artifact.sig.v1+json')}`));
    assert.ok(directView.requests.includes(`GET /v2/${repository}/manifests/${digest.replace(':', '-')}`));
    assert.deepEqual(await verifyCosignSignature(view(), { rule: 'corp', repository }, digest, 'default', keysOf(otherSigner), AbortSignal.timeout(30_000)), {
      verified: false,
      kind: 'rejected',
      reason: 'signed by another key',
    });
  });

  it('verifies a signature listed by the referrers API, filtering what the index lists', async () => {
    // docker-registry has no referrers API; this view answers it with the index that cosign kept
    // under the referrers tag on the real registry, plus a referrer of another artifact type (as a
    // registry that ignores the artifactType filter lists it), so the API's branch runs on cosign's
    // own manifests. Everything else goes to the real registry.
    const digest = images.get('referrer')!.index.digest;
    const real = view();
    const referrersAsked: Array<string | undefined> = [];
    const withReferrersApi: typeof real = {
      ...real,
      async referrers(target, signal) {
        referrersAsked.push(target.artifactType);
        const kept = await real.manifest({ ...target, reference: digest.replace(':', '-'), method: 'GET' }, signal);
        assert.equal(kept.kind, 'found');
        const index = JSON.parse(kept.kind === 'found' ? kept.body!.toString() : '{}') as { manifests: object[] };
        index.manifests.unshift({ mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: OTHER_DIGEST, size: 100, artifactType: 'application/spdx+json' });
        return { kind: 'found', index: Buffer.from(JSON.stringify(index)) };
      },
    };
    const verdict = await verifyCosignSignature(withReferrersApi, { rule: 'corp', repository }, digest, 'default', keysOf(signer), AbortSignal.timeout(30_000));
    assert.equal(verdict.verified, true, JSON.stringify(verdict));
    assert.deepEqual(referrersAsked, ['application/vnd.dev.cosign.artifact.sig.v1+json']);
    // The SBOM referrer was never fetched; the referrers tag was read only by the view above.
    assert.ok(!real.requests.some((r) => r.includes(OTHER_DIGEST)));
  });

  for (const [tag, genpkey] of [
    ['p384', ['-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-384']],
    ['rsa', ['-algorithm', 'RSA', '-pkeyopt', 'rsa_keygen_bits:2048']],
    ['ed25519', ['-algorithm', 'ED25519']],
  ] as const) {
    it(`verifies what cosign signs with an imported ${tag} key (the hash or scheme cosign picks for it)`, async () => {
      const pair = await importKeyPair(genpkey);
      await sign(byDigest(tag), pair);
      assert.deepEqual(await verify(tag, keysOf(pair)), { verified: true, keyIndex: 0, source: signatureTag(images.get(tag)!.index.digest) });
      assert.deepEqual(await verify(tag, keysOf(signer)), { verified: false, kind: 'rejected', reason: 'signed by another key' });
    });
  }

  it('reads the keys of publicKeyFiles in order and names a file that holds none', () => {
    assert.equal(readCosignKeys([signer.publicKeyFile, otherSigner.publicKeyFile]).length, 2);
    // cosign.key where cosign.pub belongs: said plainly, not as OpenSSL's decoder error.
    assert.throws(() => readCosignKeys([signer.privateKeyFile]), (error: Error) => error.message === `${signer.privateKeyFile} holds a private key; give the public key (cosign.pub)`);
    assert.throws(() => readCosignKeys([`${signer.publicKeyFile}.missing`]), (error: Error) => error.message.startsWith(`${signer.publicKeyFile}.missing holds no usable public key:`) && !error.message.includes('\n'));
  });

  it('validate checks the cosign key files the webhook reads: cosign.key and a missing file are errors naming their keys', () => {
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-validate-keys-'));
    try {
      const brokerKey = join(dir, 'broker.key');
      writeFileSync(brokerKey, `${'ab'.repeat(32)}\n`);
      const configFile = join(dir, 'config.yaml');
      const missing = join(dir, 'nope.pub');
      const rule = (keys: string[]) => `broker: {keyFiles: [${brokerKey}]}\nregistries:\n  - {name: signed, match: [signed.example], upstream: "https://127.0.0.1:5000", verify: {cosign: {publicKeyFiles: [${keys.join(', ')}]}}}\n`;
      writeFileSync(configFile, rule([signer.privateKeyFile, missing]));
      const bad = runCli(['validate', '--config', configFile]);
      assert.equal(bad.status, 1, bad.stdout);
      assert.match(bad.stderr, new RegExp(`^registries\\[0\\]\\.verify\\.cosign\\.publicKeyFiles\\[0\\]: ${signer.privateKeyFile.replace(/[.]/g, '\\.')} holds a private key; give the public key \\(cosign\\.pub\\)$`, 'm'));
      assert.match(bad.stderr, /^registries\[0\]\.verify\.cosign\.publicKeyFiles\[1\]: .*nope\.pub/m);
      assert.doesNotMatch(bad.stderr, /DECODER|error:1E/);
      writeFileSync(configFile, rule([signer.publicKeyFile]));
      const good = runCli(['validate', '--config', configFile]);
      assert.equal(good.status, 0, good.stderr);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('says the fetch failed, not unsigned, when the registry does not answer', async () => {
    await registry.kill();
    try {
      const verdict = await verify('signed', keysOf(signer));
      assert.equal(verdict.verified, false);
      assert.equal(verdict.verified ? '' : verdict.kind, 'unavailable');
      assert.match(verdict.verified ? '' : verdict.reason, /^signature fetch failed: /);
    } finally {
      await registry.restart();
    }
  });
});
