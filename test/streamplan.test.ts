// The streaming fill's pure rules (src/cache/streamplan.ts): segment keys, cuts, a follower's next
// step and the check of a resumed upstream answer.

import assert from 'node:assert/strict';
import { checkResumeRange, CLAIM_LOOK_MS, followStep, parseSegmentOffset, pollDelay, POLL_MAX_MS, POLL_MIN_MS, SEGMENT_MAX_BYTES, SEGMENT_MAX_MS, segmentCut, segmentKeyOffset, STREAM_STALL_MS, type FollowObservation } from '../src/cache/streamplan.js';

describe('streamplan', () => {
  it('names segments by their offset in 16 lower-case hex digits, and reads only such names back', () => {
    assert.equal(segmentKeyOffset(0), '0000000000000000');
    assert.equal(segmentKeyOffset(SEGMENT_MAX_BYTES), '0000000000800000');
    assert.equal(segmentKeyOffset(Number.MAX_SAFE_INTEGER), '001fffffffffffff');
    for (const offset of [0, 1, 255, SEGMENT_MAX_BYTES * 3 + 7, Number.MAX_SAFE_INTEGER]) assert.equal(parseSegmentOffset(segmentKeyOffset(offset)), offset);
    for (const name of ['', '0', '000000000000000G', '00000000000000000', '000000000000000A', 'ffffffffffffffff', '../0000000000000']) assert.equal(parseSegmentOffset(name), undefined, name);
    assert.throws(() => segmentKeyOffset(-1), RangeError);
    assert.throws(() => segmentKeyOffset(1.5), RangeError);
  });

  it('cuts at 8 MiB, after 2 s with a byte, and at the verified end only', () => {
    const size = 20 * 1024 * 1024;
    const cut = (start: number, readable: number, msSinceStart: number, verified = false) => segmentCut({ start, readable, verified, size, msSinceStart });
    assert.equal(cut(0, 0, 5_000), undefined, 'nothing readable');
    assert.equal(cut(0, 1_000, 10), undefined, 'too little, too soon');
    assert.equal(cut(0, 1_000, SEGMENT_MAX_MS), 1_000, '2 s passed');
    assert.equal(cut(0, SEGMENT_MAX_BYTES, 10), SEGMENT_MAX_BYTES, '8 MiB readable');
    assert.equal(cut(0, 3 * SEGMENT_MAX_BYTES, 10), SEGMENT_MAX_BYTES, 'a publisher behind cuts no more than 8 MiB');
    assert.equal(cut(SEGMENT_MAX_BYTES, size - 1, 10), 2 * SEGMENT_MAX_BYTES, 'full segments while the end is held back');
    assert.equal(cut(2 * SEGMENT_MAX_BYTES, size - 1, 10), undefined, 'the last byte waits for verification');
    assert.equal(cut(2 * SEGMENT_MAX_BYTES, size, 10, true), size, 'the verified end is cut at once');
    assert.equal(cut(size, size, 10_000, true), undefined, 'nothing after the end');
    assert.equal(segmentCut({ start: 0, readable: 50, verified: true, size: 40, msSinceStart: 10 }), 40, 'never past the announced size');
  });

  const base: FollowObservation = { now: 100_000, lastGrowthAt: 100_000, lookedAt: undefined, claim: undefined, blobPresent: false, intervalMs: 400 };

  it('follower: waits while the chain grows, looks at the claim after 2 s still, takes over after 10 s', () => {
    assert.deepEqual(followStep(base), { step: 'wait', ms: 100 });
    assert.deepEqual(followStep({ ...base, now: base.now + CLAIM_LOOK_MS - 1 }), { step: 'wait', ms: 100 });
    assert.deepEqual(followStep({ ...base, now: base.now + CLAIM_LOOK_MS }), { step: 'look-claim' });
    // Looked, the claim streams: wait, and look again CLAIM_LOOK_MS later.
    const looked = { ...base, now: base.now + CLAIM_LOOK_MS + 10, lookedAt: base.now + CLAIM_LOOK_MS, claim: 'streaming' as const };
    assert.equal(followStep(looked).step, 'wait');
    assert.deepEqual(followStep({ ...looked, now: looked.lookedAt + CLAIM_LOOK_MS }), { step: 'look-claim' });
    assert.deepEqual(followStep({ ...looked, now: base.lastGrowthAt + STREAM_STALL_MS }), { step: 'take-over' });
  });

  it('follower: the blob present wins; a claim gone without it is taken over; one that stopped streaming sends it upstream', () => {
    assert.deepEqual(followStep({ ...base, blobPresent: true, now: base.now + STREAM_STALL_MS }), { step: 'read-blob' });
    const looked = { ...base, now: base.now + CLAIM_LOOK_MS, lookedAt: base.now + CLAIM_LOOK_MS };
    assert.deepEqual(followStep({ ...looked, claim: 'gone' }), { step: 'take-over' });
    assert.deepEqual(followStep({ ...looked, claim: 'not-streaming' }), { step: 'upstream' });
  });

  it('polls at a quarter of the segment interval, within 100 ms and 1 s', () => {
    assert.equal(pollDelay(400), 100);
    assert.equal(pollDelay(134), POLL_MIN_MS);
    assert.equal(pollDelay(2_000), 500);
    assert.equal(pollDelay(60_000), POLL_MAX_MS);
    assert.equal(pollDelay(undefined), 250);
    assert.equal(pollDelay(Number.NaN), 250);
  });

  it('accepts a resumed answer only when it continues the blob from the offset', () => {
    assert.deepEqual(checkResumeRange(206, 'bytes 100-999/1000', 100, 1000), { skip: 0 });
    assert.deepEqual(checkResumeRange(200, undefined, 100, 1000), { skip: 100 }, 'Range ignored: the first bytes are dropped');
    assert.ok('error' in checkResumeRange(206, 'bytes 0-999/1000', 100, 1000), 'wrong start');
    assert.ok('error' in checkResumeRange(206, 'bytes 100-998/1000', 100, 1000), 'short end');
    assert.ok('error' in checkResumeRange(206, 'bytes 100-1999/2000', 100, 1000), 'wrong total');
    assert.ok('error' in checkResumeRange(206, 'bytes 100-999/*', 100, 1000), 'unknown total');
    assert.ok('error' in checkResumeRange(206, undefined, 100, 1000), 'no Content-Range');
    assert.ok('error' in checkResumeRange(416, 'bytes */1000', 100, 1000), 'refused');
  });
});
