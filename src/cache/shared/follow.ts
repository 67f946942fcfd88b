// The follower's half of a streaming fill (docs/design/streaming-rollout.md): the body of a fill
// that another node is fetching, read from the segment objects it publishes, then (once it is
// shared) from the final blob, and from the upstream itself when the store fails, a segment cannot
// be one, or the filler stalled and this node took its fill over. Every source is opened at the
// offset reached, so no byte is read twice into the fill and none is lost; the fill hashes them all
// and holds the last back until the whole blob matched its digest.

import type { Readable } from 'node:stream';
import type { Logger } from '../../log.js';
import type { BlobResult, ContentBody } from '../../content/source.js';
import type { BodySink } from '../../upstream/body.js';
import { claimStreams } from '../policy.js';
import { ANNOUNCE_LOOK_MS, checkResumeRange, CLAIM_LOOK_MS, followStep, SEGMENT_MAX_BYTES, type ClaimSeen } from '../streamplan.js';
import type { SharedTier } from './tier.js';

/** Consecutive failed reads of the store (not 404s) before the rest comes from the upstream. */
const STORE_FAILURES_MAX = 3;

export interface FollowOptions {
  readonly tier: SharedTier;
  readonly digest: string;
  /** The size the filler announced: the fill's Content-Length. */
  readonly size: number;
  /** This rule's upstream (upstreamOrigin): a claim of another upstream is not followed, and only
   * this upstream's chain of segments is read. */
  readonly origin: string;
  readonly now: () => number;
  readonly logger: Logger;
  /** The blob from `offset` on through this node's own rule (Range: bytes=<offset>-, unverified). */
  readonly resume: (offset: number, signal: AbortSignal) => Promise<BlobResult>;
  /** This node won the claim at `offset` (it then announces and publishes from there). */
  readonly onTakeover: (offset: number) => void;
  /** The store failed a read of this fill (the fill then avoids the tier for this digest if it fails). */
  readonly onStoreFailure?: (error: Error) => void;
  /** This node holds the claim already (a chain a filler that died left): where the chain ends,
   * it goes on from the upstream at once (onTakeover, then the upstream), without waiting. */
  readonly ownClaim?: boolean;
}

/** Where the bytes come from now, for logs. */
export type FollowSource = 'segments' | 'blob' | 'upstream';

export class FollowBody implements ContentBody {
  private sink: BodySink | undefined;
  private offset = 0;
  private readonly controller = new AbortController();
  private destroyed = false;
  private paused = false;
  private resumed: (() => void) | undefined;
  /** The upstream's body while it is the source (its chunks may need holding). */
  private upstream: ContentBody | undefined;
  source: FollowSource = 'segments';

  constructor(private readonly options: FollowOptions) {}

  attach(sink: BodySink): void {
    if (this.sink) throw new Error('followed body consumed twice');
    this.sink = sink;
    void this.run().then(
      () => {
        if (!this.destroyed) sink.end();
      },
      (error: Error) => {
        if (!this.destroyed) sink.error(error);
        this.destroyed = true;
        this.controller.abort(error);
      },
    );
  }

  resume(): void {
    this.paused = false;
    this.upstream?.resume();
    const resumed = this.resumed;
    this.resumed = undefined;
    resumed?.();
  }

  destroy(reason?: Error): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.controller.abort(reason ?? new Error('followed body discarded'));
    this.upstream?.destroy(reason);
    this.resumed?.();
  }

  hold(chunk: Buffer): () => void {
    return this.upstream ? this.upstream.hold(chunk) : () => undefined;
  }

  private get signal(): AbortSignal {
    return this.controller.signal;
  }

  private async run(): Promise<void> {
    const { tier, digest, size, now } = this.options;
    let lastGrowthAt = now();
    let lastSegmentAt: number | undefined;
    let intervalMs: number | undefined;
    let lookedAt: number | undefined;
    let claimSeen: ClaimSeen | undefined;
    let claimNode: string | undefined;
    let blobPresent = false;
    /** When the blob was last looked for while the chain was overdue. */
    let blobLookedAt: number | undefined;
    let storeFailures = 0;
    /** The shared blob's size differs from the size followed (a forged claim, a truncated blob). */
    let blobMismatch = false;
    const blobThere = async (): Promise<boolean> => {
      const found = await tier.blobSize(digest);
      if (found !== undefined && found !== size) blobMismatch = true;
      return found !== undefined;
    };
    while (this.offset < size) {
      if (this.destroyed) return;
      if (!tier.up || storeFailures >= STORE_FAILURES_MAX) return this.fromUpstream('the shared store fails');
      if (blobMismatch) return this.fromUpstream('the shared blob is not of the size followed');
      if (blobPresent) {
        const stream = await tier.readBlob(digest, { start: this.offset, end: size - 1 }, this.signal);
        if (!stream) {
          blobPresent = false;
          storeFailures++;
          continue;
        }
        this.source = 'blob';
        const read = await this.pass(stream, size - this.offset);
        // A read that ended short of the span (the object is shorter than it said, or went away
        // meanwhile) counts as failing, so that the rest comes from the upstream, not another read.
        if (read.failed || read.bytes < read.wanted) storeFailures++;
        else storeFailures = 0;
        continue;
      }
      // Looked at before it is read: an object that cannot be the next segment (larger than one,
      // past the blob's end, empty) is refused before any of its bytes reach the fill, whose
      // clients would otherwise be cut by the digest check. One more request per segment: the
      // poll for the next one is this look, not a read.
      const there = await tier.segmentSize(digest, this.options.origin, this.offset);
      if (this.destroyed) return;
      if (there !== undefined && (there === 0 || there > SEGMENT_MAX_BYTES || this.offset + there > size)) {
        const at = this.offset;
        this.options.logger.warn({ digest, offset: at, bytes: there }, 'shared cache tier: refused a segment larger than a segment, past the blob\'s size or empty; fetching the rest from the upstream');
        await tier.removeSegment(digest, this.options.origin, at);
        if (this.options.ownClaim) this.options.onTakeover(at);
        return this.fromUpstream('a segment was refused');
      }
      const stream = there === undefined ? undefined : await tier.readSegment(digest, this.options.origin, this.offset, this.signal);
      if (this.destroyed) {
        stream?.destroy();
        return;
      }
      if (stream) {
        const at = this.offset;
        const read = await this.pass(stream, Math.min(SEGMENT_MAX_BYTES, size - at));
        if (read.bytes > 0) {
          const t = now();
          if (lastSegmentAt !== undefined) intervalMs = t - lastSegmentAt;
          lastSegmentAt = t;
          lastGrowthAt = t;
          lookedAt = undefined;
          claimSeen = undefined;
          storeFailures = 0;
        }
        if (read.oversize || (read.bytes === 0 && !read.failed)) {
          // Not a segment of this blob (larger than one, past the end, empty): refused; the rest
          // comes from the upstream, and the object goes (it would stop every follower).
          this.options.logger.warn({ digest, offset: at }, 'shared cache tier: refused a segment larger than a segment or past the blob\'s size; fetching the rest from the upstream');
          await tier.removeSegment(digest, this.options.origin, at);
          // A filler publishes again from where the refused segment was (its file has those bytes).
          if (this.options.ownClaim) this.options.onTakeover(at);
          return this.fromUpstream('a segment was refused');
        }
        if (read.failed) storeFailures++;
        continue;
      }
      if (this.options.ownClaim) {
        this.options.onTakeover(this.offset);
        return this.fromUpstream('the chain a previous filler left ends here');
      }
      // The next segment is overdue (the filler may be done, its segments going once the blob is
      // shared): the blob is looked for from then on, not only with the claim, but at most every
      // interval between segments (within ANNOUNCE_LOOK_MS..CLAIM_LOOK_MS), not at every poll.
      const blobLookMs = Math.min(CLAIM_LOOK_MS, Math.max(ANNOUNCE_LOOK_MS, intervalMs ?? CLAIM_LOOK_MS));
      if (!blobPresent && now() - lastGrowthAt >= (intervalMs ?? CLAIM_LOOK_MS) && (blobLookedAt === undefined || now() - blobLookedAt >= blobLookMs)) {
        blobLookedAt = now();
        blobPresent = await blobThere();
      }
      const step = followStep({ now: now(), lastGrowthAt, lookedAt, claim: claimSeen, blobPresent, intervalMs });
      switch (step.step) {
        case 'read-segment':
        case 'read-blob':
          continue;
        case 'wait':
          await this.sleep(step.ms);
          continue;
        case 'upstream':
          return this.fromUpstream('the claim no longer streams this upstream\'s bytes');
        case 'look-claim': {
          lookedAt = now();
          blobPresent = await blobThere();
          const state = await tier.claimState(digest);
          claimSeen = this.seen(state?.claim ?? undefined);
          const node = state?.claim?.node;
          if (node !== undefined && claimNode !== undefined && node !== claimNode) lastGrowthAt = now(); // taken over: it will grow again
          if (node !== undefined) claimNode = node;
          continue;
        }
        case 'take-over': {
          blobPresent = await blobThere();
          if (blobPresent) continue;
          const state = await tier.claimState(digest);
          if (state?.claim && claimNode !== undefined && state.claim.node !== claimNode) {
            // Another follower took it over since the last look: follow that one's chain.
            claimNode = state.claim.node;
            lastGrowthAt = now();
            lookedAt = undefined;
            claimSeen = undefined;
            continue;
          }
          if (!tier.up) continue;
          if (state === undefined) {
            // Gone, or away for a moment (a filesystem store's claim while it is rewritten): looked
            // at again before this node claims the fill for itself.
            await this.sleep(ANNOUNCE_LOOK_MS);
            if ((await blobThere()) || (await tier.claimState(digest)) !== undefined) {
              lookedAt = undefined;
              claimSeen = undefined;
              continue;
            }
          }
          if (await tier.takeOver(digest, state?.version ?? 'absent')) {
            this.options.logger.info({ digest, offset: this.offset, from: state?.claim?.node }, 'shared cache tier: the fill of another node stalled; this node takes it over from the chain\'s end');
            this.options.onTakeover(this.offset);
            return this.fromUpstream('taken over');
          }
          // Another follower won: its chain will grow.
          lastGrowthAt = now();
          lookedAt = undefined;
          claimSeen = undefined;
          continue;
        }
      }
    }
  }

  /** What a claim read says to this follower. A claim not announced (yet) counts as streaming: a
   * node that just took the fill over announces it a moment later, and one that never does is
   * taken over in its turn once the chain stalls. */
  private seen(claim: Parameters<typeof claimStreams>[0] | undefined): ClaimSeen {
    if (!claim) return 'gone';
    if (claim.stream === undefined && claim.origin === undefined && claim.size === undefined) return 'streaming';
    if (!claimStreams(claim, this.options.digest) || claim.origin !== this.options.origin || claim.size !== this.options.size) return 'not-streaming';
    return 'streaming';
  }

  /**
   * Passes a download's bytes on, at most `limit` of them: how many it passed, whether it had more
   * (`oversize`: refused from there), and whether it failed before its end.
   */
  private async pass(stream: Readable, limit: number): Promise<{ bytes: number; wanted: number; oversize: boolean; failed: boolean }> {
    const wanted = limit;
    let bytes = 0;
    try {
      for await (const data of stream) {
        const chunk = Buffer.isBuffer(data) ? data : Buffer.from(data as Uint8Array);
        if (this.destroyed) break;
        const room = limit - bytes;
        const part = chunk.length > room ? chunk.subarray(0, room) : chunk;
        if (part.length > 0) {
          bytes += part.length;
          await this.deliver(part);
        }
        if (chunk.length > room) {
          stream.destroy();
          return { bytes, wanted, oversize: true, failed: false };
        }
      }
      return { bytes, wanted, oversize: false, failed: false };
    } catch (error) {
      if (this.destroyed) return { bytes, wanted, oversize: false, failed: true };
      this.options.onStoreFailure?.(error as Error);
      return { bytes, wanted, oversize: false, failed: true };
    }
  }

  /** One chunk to the sink, waiting while it asks to pause. */
  private async deliver(chunk: Buffer): Promise<void> {
    if (this.destroyed || !this.sink) return;
    this.offset += chunk.length;
    if (!this.sink.data(chunk)) this.paused = true;
    while (this.paused && !this.destroyed) await new Promise<void>((resolve) => (this.resumed = resolve));
  }

  /** The rest of the blob from the upstream through this node's rule, from the offset reached. */
  private async fromUpstream(why: string): Promise<void> {
    if (this.destroyed) return;
    const { size, digest } = this.options;
    const offset = this.offset;
    this.source = 'upstream';
    this.options.logger.info({ digest, offset, size, why }, 'shared cache tier: following a fill from the upstream from where the chain ended');
    const answer = await this.options.resume(offset, this.signal);
    const body = answer.body;
    if (!body) throw new Error(`the upstream answered ${answer.status} without a body to a range request`);
    const check = checkResumeRange(answer.status, answer.headers['content-range'], offset, size);
    if ('error' in check) {
      body.destroy();
      throw new Error(check.error);
    }
    if (this.destroyed) {
      body.destroy();
      return;
    }
    let skip = check.skip;
    this.upstream = body;
    await new Promise<void>((resolve, reject) => {
      body.attach({
        data: (chunk) => {
          if (this.destroyed || !this.sink) return false;
          if (skip > 0) {
            const dropped = Math.min(skip, chunk.length);
            skip -= dropped;
            chunk = chunk.subarray(dropped);
            if (chunk.length === 0) return true;
          }
          if (this.offset + chunk.length > size) {
            reject(new Error(`the upstream sent more than the blob's ${size} bytes`));
            return false;
          }
          this.offset += chunk.length;
          return this.sink.data(chunk);
        },
        end: () => (this.offset === size ? resolve() : reject(new Error(`the upstream's answer ended at ${this.offset} of ${size} bytes`))),
        error: reject,
      });
    });
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const { signal } = this;
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal.addEventListener('abort', done, { once: true });
    });
  }
}
