// The node cache's pure rules: sizes, tag freshness and stale fallback, eviction.

import assert from 'node:assert/strict';
import fc from 'fast-check';
import { bridgingTag, byteRange, claimRefused, claimStreams, EMPTY_BLOB_DIGEST, parseClaim, evictionPlan, FILL_WAIT_ROUNDS, grownReservation, inodeFloor, inodesLeft, linkIsFresh, mayWaitForFill, parseLink, roomFor, SHARED_CLOCK_SKEW_MS, staleEligible, tagFallback, tagIsFresh, upstreamFailureOf, type StoredBlob, type TagRecord } from '../src/cache/policy.js';
import { openRecord, sealRecord } from '../src/cache/shared/records.js';
import type { ContentFailure } from '../src/content/source.js';
import { parseByteQuantity, parseInodeFloor } from '../src/rules/quantity.js';

const RUNS = Number(process.env.PROPERTY_RUNS ?? 300);

describe('cache policy', () => {
  it('reads sizes as integers or Kubernetes quantities, and refuses anything else', () => {
    assert.equal(parseByteQuantity(1024), 1024);
    assert.equal(parseByteQuantity('20Gi'), 20 * 2 ** 30);
    assert.equal(parseByteQuantity('500M'), 500_000_000);
    assert.equal(parseByteQuantity('1.5Gi'), 1.5 * 2 ** 30);
    assert.equal(parseByteQuantity('4096'), 4096);
    for (const bad of ['', 'Gi', '-1Gi', '10GB', '1e3', '20 Gi x', '99999Ei']) assert.equal(parseByteQuantity(bad), null, bad);
    assert.equal(parseByteQuantity(-1), null);
    assert.equal(parseByteQuantity(1.5), null);
  });

  const record: TagRecord = { digest: 'sha256:' + 'a'.repeat(64), mediaType: 'application/vnd.oci.image.index.v1+json', size: 123, confirmedAt: 1_000_000 };
  const times = { tagTTLSeconds: 30, staleIfErrorSeconds: 3600 };

  it('answers a tag from the record within its TTL, and asks upstream after', () => {
    assert.equal(tagIsFresh(record, record.confirmedAt + 29_999, times), true);
    assert.equal(tagIsFresh(record, record.confirmedAt + 30_000, times), false);
    assert.equal(tagIsFresh(undefined, 0, times), false);
  });

  it('serves the last known digest when the upstream cannot answer, within staleIfErrorSeconds', () => {
    for (const failure of ['unreachable', 'timeout', 'server-error', 'throttled'] as const) {
      assert.deepEqual(tagFallback(record, failure, record.confirmedAt + 120_500, times), { serve: 'stale', record, ageSeconds: 120 });
      assert.deepEqual(tagFallback(record, failure, record.confirmedAt + 3_600_001, times), { serve: 'error' });
    }
    assert.deepEqual(tagFallback(undefined, 'unreachable', 0, times), { serve: 'error' });
  });

  it('never masks the upstream saying no (401, 403, 404, and any other 4xx but 429)', () => {
    for (const failure of ['unauthorized', 'denied', 'not-found', 'refused'] as const) {
      assert.equal(staleEligible(failure), false);
      assert.deepEqual(tagFallback(record, failure, record.confirmedAt + 1, times), { serve: 'error' });
    }
  });

  it('bridges an outage with the node\'s own record while it may serve; the shared one only without it, and never one dated ahead beyond clock skew', () => {
    const now = record.confirmedAt + 10_000;
    const shared: TagRecord = { ...record, digest: 'sha256:' + 'b'.repeat(64), confirmedAt: now - 1_000 };
    // Newer, but the node's own record stands.
    assert.equal(bridgingTag(record, shared, now, times), record);
    assert.equal(bridgingTag(undefined, shared, now, times), shared);
    // Own too old to serve: the shared one, as for a node without one.
    assert.equal(bridgingTag(record, shared, record.confirmedAt + 3_600_001, times)?.digest, shared.digest);
    const ahead = { ...shared, confirmedAt: now + SHARED_CLOCK_SKEW_MS + 1 };
    assert.equal(bridgingTag(undefined, ahead, now, times), undefined);
    assert.equal(bridgingTag(record, ahead, now, times), record);
    // Within the skew: served, as confirmed now (never a negative age).
    const skewed = { ...shared, confirmedAt: now + 5_000 };
    assert.deepEqual(tagFallback(bridgingTag(undefined, skewed, now, times), 'unreachable', now, times), { serve: 'stale', record: skewed, ageSeconds: 0 });
  });

  it('waits for another node\'s fill a bounded time from when the wait began, whatever its claim says', () => {
    assert.equal(mayWaitForFill(0, 2_000 * FILL_WAIT_ROUNDS - 1, 2), true);
    assert.equal(mayWaitForFill(0, 2_000 * FILL_WAIT_ROUNDS, 2), false);
  });

  it('takes a link\'s content as a media type only when it can be a header value', () => {
    assert.equal(parseLink(''), '');
    assert.equal(parseLink('application/vnd.oci.image.manifest.v1+json'), 'application/vnd.oci.image.manifest.v1+json');
    for (const bad of ['text/plain\r\nx-injected: 1', 'a'.repeat(256), 'caf\u00e9', '\u0000']) assert.equal(parseLink(bad), null, JSON.stringify(bad));
  });

  it('opens a sealed record only with its key and at its key; without a key, takes a seal off unchecked', () => {
    const key = Buffer.alloc(32, 7);
    const payload = Buffer.from('{"node":"n","at":1}');
    const sealed = sealRecord(key, 'claims/sha256/x', payload);
    assert.deepEqual(openRecord(key, 'claims/sha256/x', sealed), payload);
    assert.equal(openRecord(key, 'claims/sha256/y', sealed), undefined);
    assert.equal(openRecord(Buffer.alloc(32, 8), 'claims/sha256/x', sealed), undefined);
    assert.equal(openRecord(key, 'claims/sha256/x', payload), undefined);
    const changed = Buffer.from(sealed);
    changed.writeUInt8((changed.at(-2) ?? 0) ^ 1, changed.length - 2);
    assert.equal(openRecord(key, 'claims/sha256/x', changed), undefined);
    assert.deepEqual(openRecord(undefined, 'claims/sha256/x', sealed), payload);
    assert.deepEqual(openRecord(undefined, 'claims/sha256/x', payload), payload);
    assert.deepEqual(sealRecord(undefined, 'claims/sha256/x', payload), payload);
  });

  it('serves a link without asking upstream only within reconfirmSeconds of its confirmation (never one from the future; 0: always ask)', () => {
    assert.equal(linkIsFresh(1_000, 1_000 + 59_999, 60), true);
    assert.equal(linkIsFresh(1_000, 1_000 + 60_000, 60), false);
    assert.equal(linkIsFresh(5_000, 1_000, 60), false, 'confirmed after now: a clock set back');
    assert.equal(linkIsFresh(1_000, 1_000, 0), false);
  });

  it('keeps cached content servable only when the upstream could not answer (5xx, 429, the proxy\'s 502/504); any other answer is a no', () => {
    const eligible = (failure: ContentFailure, status: number) => staleEligible(upstreamFailureOf(failure, { status }));
    for (const [failure, status] of [['too-many-requests', 429], ['unavailable', 500], ['unavailable', 502], ['unavailable', 503], ['unavailable', 504], ['invalid', 502]] as const) assert.equal(eligible(failure, status), true, String(status));
    for (const [failure, status] of [['refused', 400], ['unauthorized', 401], ['denied', 403], ['not-found', 404], ['refused', 410], ['refused', 412], ['refused', 451]] as const) assert.equal(eligible(failure, status), false, String(status));
    // The proxy's own budget refusing (429 to one client, 503 for all) is not the upstream failing.
    for (const [failure, status] of [['too-many-requests', 429], ['unavailable', 503]] as const) assert.equal(staleEligible(upstreamFailureOf(failure, { status, local: true })), false, `local ${status}`);
  });

  it('evicts least recently used blobs until the store fits and the disk keeps its floor, never one being read', () => {
    const blobs: StoredBlob[] = [
      { digest: 'sha256:old', size: 100, lastUsed: 1, readers: 0 },
      { digest: 'sha256:read', size: 100, lastUsed: 2, readers: 1 },
      { digest: 'sha256:mid', size: 100, lastUsed: 3, readers: 0 },
      { digest: 'sha256:new', size: 100, lastUsed: 4, readers: 0 },
    ];
    assert.deepEqual(evictionPlan(blobs, { maxBytes: 250, minFreeBytes: 0, freeBytes: 1e9 }), ['sha256:old', 'sha256:mid']);
    assert.deepEqual(evictionPlan(blobs, { maxBytes: 1000, minFreeBytes: 500, freeBytes: 350 }), ['sha256:old', 'sha256:mid']);
    assert.deepEqual(evictionPlan(blobs, { maxBytes: 1000, minFreeBytes: 0, freeBytes: 0 }), []);
  });

  it('reserves room for a fill only within maxBytes with what is stored and reserved, and above minFreeBytes once every reservation is written', () => {
    const room = { storedBytes: 10, reservedBytes: 45, unwrittenBytes: 40, freeBytes: 200, maxBytes: 100, minFreeBytes: 100 };
    assert.deepEqual(roomFor(room, 45), { size: true, disk: true });
    assert.deepEqual(roomFor(room, 46), { size: false, disk: true }, 'stored + reserved + 46 > maxBytes');
    assert.deepEqual(roomFor({ ...room, freeBytes: 180 }, 45), { size: true, disk: false }, '180 free - 40 still to be written - 45 < minFreeBytes');
    assert.deepEqual(roomFor({ ...room, freeBytes: undefined }, 45), { size: true, disk: true }, 'free space unknown: maxBytes only');
    // A chunked fill grows in steps, up to maxBytes, and no further.
    assert.equal(grownReservation(0, 1, 8, 50), 8);
    assert.equal(grownReservation(8, 20, 8, 50), 20);
    assert.equal(grownReservation(48, 49, 8, 50), 50);
    assert.equal(grownReservation(50, 51, 8, 50), undefined);
  });

  it('keeps a floor of free inodes: a number or a percentage of the filesystem, and evicts at least one blob per inode short', () => {
    assert.deepEqual(parseInodeFloor('10%'), { percent: 10 });
    assert.deepEqual(parseInodeFloor(5000), { inodes: 5000 });
    for (const bad of [-1, 1.5, '101%', 'ten', '10']) assert.equal(parseInodeFloor(bad), null, String(bad));
    assert.equal(inodeFloor('10%', 102_400), 10_240);
    assert.equal(inodeFloor(500, 102_400), 500);
    assert.equal(inodesLeft({ freeInodes: 101, minFreeInodes: 100 }), true);
    assert.equal(inodesLeft({ freeInodes: 100, minFreeInodes: 100 }), false, 'one more file would take it under');
    assert.equal(inodesLeft({}), true, 'a filesystem that does not count inodes');
    assert.deepEqual(roomFor({ storedBytes: 0, reservedBytes: 0, unwrittenBytes: 0, freeBytes: 1e9, maxBytes: 1e9, minFreeBytes: 0, freeInodes: 10, minFreeInodes: 10 }, 1), { size: true, disk: false });
    const blobs: StoredBlob[] = [
      { digest: 'sha256:a', size: 1, lastUsed: 1, readers: 0 },
      { digest: 'sha256:b', size: 1, lastUsed: 2, readers: 1 },
      { digest: 'sha256:c', size: 1, lastUsed: 3, readers: 0 },
    ];
    assert.deepEqual(evictionPlan(blobs, { maxBytes: 1e9, minFreeBytes: 0, freeBytes: 1e9, minFreeBlobs: 2 }), ['sha256:a', 'sha256:c']);
  });

  it('eviction: never a blob being read; afterwards the store fits unless only read blobs are left', () => {
    const blob = fc.record({ size: fc.integer({ min: 0, max: 1000 }), lastUsed: fc.integer({ min: 0, max: 100 }), readers: fc.integer({ min: 0, max: 2 }) });
    fc.assert(
      fc.property(fc.array(blob, { maxLength: 30 }), fc.integer({ min: 0, max: 20_000 }), (entries, maxBytes) => {
        const blobs = entries.map((e, i) => ({ ...e, digest: `sha256:${i}` }));
        const plan = new Set(evictionPlan(blobs, { maxBytes, minFreeBytes: 0, freeBytes: Number.MAX_SAFE_INTEGER }));
        const kept = blobs.filter((b) => !plan.has(b.digest));
        assert.ok(blobs.every((b) => !plan.has(b.digest) || b.readers === 0));
        const keptBytes = kept.reduce((s, b) => s + b.size, 0);
        // Over the limit only when nothing evictable is left.
        assert.ok(keptBytes <= maxBytes || kept.every((b) => b.readers > 0 || b.size === 0), `${keptBytes} > ${maxBytes}`);
        // Least recently used first: nothing evicted was used after something evictable that was kept.
        const newestEvicted = Math.max(-1, ...blobs.filter((b) => plan.has(b.digest)).map((b) => b.lastUsed));
        assert.ok(kept.every((b) => b.readers > 0 || b.lastUsed >= newestEvicted));
      }),
      { numRuns: RUNS },
    );
  });
});

describe('byteRange', () => {
  it('reads one range as [start, end), open-ended and suffix ranges included, clipped to the blob', () => {
    assert.deepEqual(byteRange('bytes=0-99', 1000), { start: 0, end: 100 });
    assert.deepEqual(byteRange('bytes=900-', 1000), { start: 900, end: 1000 });
    assert.deepEqual(byteRange('bytes=-100', 1000), { start: 900, end: 1000 });
    assert.deepEqual(byteRange('bytes=-5000', 1000), { start: 0, end: 1000 });
    assert.deepEqual(byteRange('bytes=990-5000', 1000), { start: 990, end: 1000 });
  });

  it('gives nothing (the whole blob is served) for what is not one satisfiable range', () => {
    for (const header of ['bytes=1000-', 'bytes=5-1', 'bytes=-0', 'bytes=-', 'bytes=0-1,5-6', 'items=0-1', 'bytes=a-b', '']) {
      assert.equal(byteRange(header, 1000), undefined, header);
    }
  });
});

describe('claim record v2 (parseClaim)', () => {
  const origin = 'a'.repeat(64);

  it('reads an old claim (node, at) and a v2 one with its announcement', () => {
    assert.deepEqual(parseClaim('{"node":"n1","at":5}'), { node: 'n1', at: 5 });
    assert.deepEqual(parseClaim(JSON.stringify({ node: 'n1', at: 5, size: 1234, origin, stream: 1 })), { node: 'n1', at: 5, size: 1234, origin, stream: 1 });
    // Unknown fields (a later version's) are not carried over.
    assert.deepEqual(parseClaim('{"node":"n1","at":5,"later":true}'), { node: 'n1', at: 5 });
  });

  it('refuses a claim whose fields do not parse, whole', () => {
    for (const text of [
      '{"node":"n1"}',
      '{"at":5}',
      '{"node":"n1","at":5,"size":-1}',
      '{"node":"n1","at":5,"size":1.5}',
      '{"node":"n1","at":5,"size":"12"}',
      `{"node":"n1","at":5,"size":${2 ** 53}}`,
      '{"node":"n1","at":5,"origin":"abc"}',
      `{"node":"n1","at":5,"origin":"${'A'.repeat(64)}"}`,
      '{"node":"n1","at":5,"stream":true}',
      '{"node":"n1","at":5,"stream":2}',
      '[1]',
      'null',
      'not json',
    ]) {
      assert.equal(parseClaim(text), undefined, text);
    }
  });

  it('streams only a claim announced with stream, size and origin', () => {
    const digest = 'sha256:' + 'b'.repeat(64);
    assert.equal(claimStreams({ node: 'n', at: 1 }, digest), false);
    assert.equal(claimStreams({ node: 'n', at: 1, size: 5, origin }, digest), false);
    assert.equal(claimStreams({ node: 'n', at: 1, stream: 1, origin }, digest), false);
    assert.equal(claimStreams({ node: 'n', at: 1, size: 5, origin, stream: 1 }, digest), true);
  });

  it('refuses a claim announcing size 0 unless its digest is the empty blob\'s', () => {
    const announced = { node: 'n', at: 1, size: 0, origin, stream: 1 as const };
    assert.equal(claimStreams(announced, 'sha256:' + 'b'.repeat(64)), false);
    assert.equal(claimRefused(announced, 'sha256:' + 'b'.repeat(64)), true);
    assert.equal(claimStreams(announced, EMPTY_BLOB_DIGEST), true);
    assert.equal(claimRefused(announced, EMPTY_BLOB_DIGEST), false);
    assert.equal(claimRefused({ node: 'n', at: 1 }, 'sha256:' + 'b'.repeat(64)), false, 'a bare claim is waited for');
  });

  it('a v2 claim sealed with the record key opens only under that key and name', () => {
    const key = Buffer.alloc(32, 7);
    const name = 'claims/sha256/' + 'b'.repeat(64);
    const payload = Buffer.from(JSON.stringify({ node: 'n1', at: 5, size: 10, origin, stream: 1 }));
    const sealed = sealRecord(key, name, payload);
    assert.deepEqual(parseClaim(openRecord(key, name, sealed)?.toString('utf8') ?? ''), { node: 'n1', at: 5, size: 10, origin, stream: 1 });
    assert.equal(openRecord(Buffer.alloc(32, 8), name, sealed), undefined);
    assert.equal(openRecord(key, name, payload), undefined);
  });
});
