// How a fill streams through the shared tier (docs/design/streaming-rollout.md), as data in and
// data out (no clock, no I/O): where the filler cuts the next segment object, what a follower does
// when the next segment is not there yet, how long it waits before looking again, and whether an
// upstream's answer to a resumed request (Range: bytes=<offset>-) continues the blob.

/** The most bytes in one segment object: at a 500 Mbit/s tunnel one lands every 134 ms, and a
 * follower at the head mostly finds the next on its first GET; a store upload of it is one request. */
export const SEGMENT_MAX_BYTES = 8 * 1024 * 1024;
/** A segment is cut after this long with at least one byte: over a slow tunnel a follower's longest
 * gap stays near this (plus an upload and a poll), far under containerd's progress timeout. */
export const SEGMENT_MAX_MS = 2_000;
/** No growth of the chain for this long, by the follower's own clock: its filler is dead or stalled,
 * and a follower takes the fill over at the chain's end. */
export const STREAM_STALL_MS = 10_000;
/** A follower that saw no growth for this long reads the claim (and looks for the final blob); a
 * filler that publishes reads its claim at most this often (a taker would have rewritten it). */
export const CLAIM_LOOK_MS = 2_000;
/** How often a follower looks again for an announcement not written yet. */
export const ANNOUNCE_LOOK_MS = 250;
/** Bounds of the wait between two looks at the head of the chain. */
export const POLL_MIN_MS = 100;
export const POLL_MAX_MS = 1_000;
/** The wait before the first interval between segments is known. */
const POLL_FIRST_MS = 250;

/** A segment's offset as the last part of its key: 16 lower-case hex digits (sorted as numbers). */
export function segmentKeyOffset(offset: number): string {
  if (!Number.isSafeInteger(offset) || offset < 0) throw new RangeError(`not a segment offset: ${offset}`);
  return offset.toString(16).padStart(16, '0');
}

/** The offset a segment key's last part names, or undefined when it is not one (a listing of the
 * store holds what any writer left). */
export function parseSegmentOffset(name: string): number | undefined {
  if (!/^[0-9a-f]{16}$/.test(name)) return undefined;
  const offset = Number.parseInt(name, 16);
  return Number.isSafeInteger(offset) ? offset : undefined;
}

export interface CutInput {
  /** Where the segment being made starts. */
  readonly start: number;
  /** Bytes of the fill readers may have (the last is held back until the blob verified). */
  readonly readable: number;
  /** The whole blob verified (readable is then its size). */
  readonly verified: boolean;
  /** The announced size. */
  readonly size: number;
  /** Since the segment started (its first byte was readable, or the previous one was published). */
  readonly msSinceStart: number;
}

/**
 * The end (exclusive) of the next segment to publish from `start`, or undefined to wait for more:
 * SEGMENT_MAX_BYTES readable, or SEGMENT_MAX_MS passed with at least one byte, or the verified end
 * of the blob. Never past `size`, never more than SEGMENT_MAX_BYTES (a publisher that fell behind
 * cuts again from where it is).
 */
export function segmentCut(input: CutInput): number | undefined {
  const end = Math.min(input.readable, input.size);
  const available = end - input.start;
  if (available <= 0) return undefined;
  if (available >= SEGMENT_MAX_BYTES) return input.start + SEGMENT_MAX_BYTES;
  if (input.verified && end === input.size) return end;
  if (input.msSinceStart >= SEGMENT_MAX_MS) return end;
  return undefined;
}

/** What a follower last learnt of the claim (or `undefined`: not looked at since the chain grew). */
export type ClaimSeen =
  /** Another node's announced streaming fill, of this follower's upstream. */
  | 'streaming'
  /** A claim that does not stream (an old node's, or not announced yet) or of another upstream. */
  | 'not-streaming'
  /** No claim: released (the blob should be there) or gone with its filler. */
  | 'gone';

export interface FollowObservation {
  /** This node's clock (ms). */
  readonly now: number;
  /** When the chain last grew for this follower (or when it began following). */
  readonly lastGrowthAt: number;
  /** When it last read the claim and looked for the blob; undefined: not since the chain grew. */
  readonly lookedAt: number | undefined;
  /** What that look found. */
  readonly claim: ClaimSeen | undefined;
  readonly blobPresent: boolean;
  /** The interval between the last segments seen (ms), for the poll's pace. */
  readonly intervalMs: number | undefined;
}

export type FollowStep =
  | { readonly step: 'read-segment' }
  | { readonly step: 'read-blob' }
  | { readonly step: 'wait'; readonly ms: number }
  | { readonly step: 'look-claim' }
  | { readonly step: 'take-over' }
  | { readonly step: 'upstream' };

/**
 * What a follower does once the next segment was not there: read the final blob once it exists;
 * take the fill over when the claim is gone without the blob, or the chain did not grow for
 * STREAM_STALL_MS (its own clock: no clock agreement between nodes); go to the upstream when the
 * claim no longer streams this upstream's bytes; look at the claim after CLAIM_LOOK_MS without
 * growth (and every CLAIM_LOOK_MS after); else wait and try the segment again.
 */
export function followStep(seen: FollowObservation): FollowStep {
  if (seen.blobPresent) return { step: 'read-blob' };
  if (seen.lookedAt !== undefined && seen.claim === 'gone') return { step: 'take-over' };
  if (seen.lookedAt !== undefined && seen.claim === 'not-streaming') return { step: 'upstream' };
  const still = seen.now - seen.lastGrowthAt;
  if (still >= STREAM_STALL_MS) return { step: 'take-over' };
  if (still >= CLAIM_LOOK_MS && (seen.lookedAt === undefined || seen.now - seen.lookedAt >= CLAIM_LOOK_MS)) return { step: 'look-claim' };
  return { step: 'wait', ms: pollDelay(seen.intervalMs) };
}

/** The wait before the next look at the head of the chain: a quarter of the interval between
 * segments seen, within POLL_MIN_MS and POLL_MAX_MS. */
export function pollDelay(observedIntervalMs: number | undefined): number {
  if (observedIntervalMs === undefined || !Number.isFinite(observedIntervalMs) || observedIntervalMs < 0) return POLL_FIRST_MS;
  return Math.min(POLL_MAX_MS, Math.max(POLL_MIN_MS, Math.round(observedIntervalMs / 4)));
}

/**
 * Whether the upstream's answer to `Range: bytes=<offset>-` continues a blob of `size` bytes from
 * `offset`: a 206 must say `bytes <offset>-<size-1>/<size>` (skip nothing); a 200 (the upstream
 * ignored Range) is the whole blob, whose first `offset` bytes are skipped; anything else is refused.
 */
export function checkResumeRange(status: number, contentRange: string | undefined, offset: number, size: number): { readonly skip: number } | { readonly error: string } {
  if (status === 200) return { skip: offset };
  if (status !== 206) return { error: `the upstream answered ${status} to a range request` };
  const match = /^bytes (\d+)-(\d+)\/(\d+)$/.exec((contentRange ?? '').trim());
  if (!match) return { error: `the upstream's Content-Range ${JSON.stringify(contentRange ?? '')} is not one range of a known length` };
  const [first, last, total] = [Number(match[1]), Number(match[2]), Number(match[3])];
  if (total !== size) return { error: `the upstream's Content-Range says ${total} bytes, the blob has ${size}` };
  if (first !== offset || last !== size - 1) return { error: `the upstream sent bytes ${first}-${last}, not ${offset}-${size - 1}` };
  return { skip: 0 };
}
