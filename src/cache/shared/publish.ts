// The filler's half of a streaming fill (docs/design/streaming-rollout.md): while its fill grows,
// the bytes are published as segment objects of the shared store, in order, each uploaded straight
// from the fill file (an open descriptor: the file may be renamed into the node store meanwhile),
// so that the nodes that lost the claim stream them into their own fills.

import type { Logger } from '../../log.js';
import type { BlobFlight } from '../flight.js';
import { CLAIM_LOOK_MS, SEGMENT_MAX_BYTES, SEGMENT_MAX_MS, segmentCut } from '../streamplan.js';
import type { SharedTier } from './tier.js';

/** How many times in a row a segment key may answer 'exists' to the create and then show no
 * segment (a directory, a FIFO, a link planted there; or one removed meanwhile) before the
 * publisher stops: it never loops without progress. */
const UNREADABLE_SEGMENT_MAX = 2;
/** Segment uploads one publisher has started and not seen answered: the next segments go up while
 * one is still on its way (bounded node-wide by the tier's upload slots). */
const PUBLISH_AHEAD = 3;
/** The pause before a segment key that showed no segment is created again. */
const UNREADABLE_SEGMENT_PAUSE_MS = 100;

/** Why a publisher stopped before the end of the blob. */
export type PublishStop = 'relay' | 'failed' | 'store' | 'lost-claim';

export class SegmentPublisher {
  /** Settles when the publisher stopped: the whole blob published, or why it gave up. */
  readonly done: Promise<PublishStop | 'complete'>;
  private stopped = false;
  private wake: (() => void) | undefined;

  constructor(
    /** The fill being published: what the publisher reads of it (a BlobFlight). */
    private readonly flight: Pick<BlobFlight, 'follow' | 'relaying'>,
    private readonly tier: SharedTier,
    private readonly digest: string,
    /** The upstream the fill's bytes come from (upstreamOrigin): its chain is published. */
    private readonly origin: string,
    /** Where the chain continues (0, or a takeover's offset). */
    from: number,
    /** The announced size. */
    private readonly size: number,
    private readonly now: () => number,
    private readonly logger: Logger,
    /** The fill's file, taken (flight.follow()) by the caller before it announced the fill, so
     * that the fill counted this reader from then on; taken here when not given. */
    private readonly reading?: ReturnType<BlobFlight['follow']>,
  ) {
    this.done = this.run(from).catch((error: unknown) => {
      this.logger.warn({ digest, err: error }, 'shared cache tier: publishing a fill\'s segments failed; the other nodes fetch it otherwise');
      return 'failed' as const;
    });
  }

  /** Stops publishing (at close, or when the caller gives the fill up). */
  stop(): void {
    this.stopped = true;
    this.wake?.();
  }

  private async run(from: number): Promise<PublishStop | 'complete'> {
    const { handle, extent, release } = await (this.reading ?? this.flight.follow());
    const unwatch = extent.watch(() => this.wake?.());
    // Uploads started and not yet answered, oldest first: up to PUBLISH_AHEAD at a time, because one
    // segment's upload (a PUT, a synced file) takes longer than the tunnel takes to bring it on a
    // loaded node, and a publisher that does one at a time falls behind the fill it publishes.
    const inFlight: Array<{ readonly start: number; readonly end: number; readonly outcome: Promise<'created' | 'exists' | undefined> }> = [];
    const drain = async () => {
      while (inFlight.length > 0) await inFlight.shift()?.outcome;
    };
    try {
      /** Where the published chain is known to reach. */
      let start = from;
      /** Where the next upload starts (start, plus what is in flight). */
      let next = from;
      let segmentSince: number | undefined;
      let claimLookedAt = this.now();
      let unreadable = 0;
      while (start < this.size) {
        if (this.stopped) return 'failed';
        const outcome = extent.outcome();
        if (this.flight.relaying) return 'relay';
        if (outcome && 'error' in outcome) return 'failed';
        if (outcome && outcome.size !== this.size) return 'failed';
        const readable = extent.readable();
        // The 2 s cut counts from the segment's first readable byte, not from when the last was cut.
        if (segmentSince === undefined && readable > next) segmentSince = this.now();
        const elapsed = segmentSince === undefined ? 0 : this.now() - segmentSince;
        const end = next < this.size && inFlight.length < PUBLISH_AHEAD ? segmentCut({ start: next, readable, verified: outcome !== undefined, size: this.size, msSinceStart: elapsed }) : undefined;
        if (end !== undefined) {
          inFlight.push({ start: next, end, outcome: this.tier.publishSegment(this.digest, this.origin, { handle, start: next, end }) });
          next = end;
          segmentSince = undefined;
          continue;
        }
        const oldest = inFlight[0];
        if (oldest === undefined) {
          // Nothing to upload yet: woken by the fill growing, or when the segment is due by time.
          await this.sleep(segmentSince === undefined ? SEGMENT_MAX_MS : Math.max(10, SEGMENT_MAX_MS - elapsed));
          continue;
        }
        const published = await oldest.outcome;
        inFlight.shift();
        if (published === undefined) return 'store';
        if (published === 'created') start = oldest.end;
        else {
          // Another writer's segment is there (a takeover race, a zombie filler): the chain goes on
          // from its end, one line; an object that cannot be a segment here is replaced. What this
          // publisher sent past it may not line up with that chain: finished first, then redone
          // from the chain's end (objects off the chain are removed with the rest at the end).
          await drain();
          next = start;
          const there = await this.tier.segmentSize(this.digest, this.origin, start);
          if (there === undefined) {
            // Removed meanwhile (created again, once), or not a segment the store can read (a
            // directory or a FIFO at the key): the chain cannot go on past it from here.
            if (++unreadable >= UNREADABLE_SEGMENT_MAX) {
              this.logger.warn({ digest: this.digest, offset: start }, 'shared cache tier: a segment key holds an object that is not a segment; this fill stops publishing (the other nodes fetch it otherwise)');
              return 'store';
            }
            await this.sleep(UNREADABLE_SEGMENT_PAUSE_MS);
            continue;
          }
          if (there === 0 || there > SEGMENT_MAX_BYTES || start + there > this.size) {
            await this.tier.removeSegment(this.digest, this.origin, start);
            // Bounded as above: an object that stays (its removal refused) stops the publisher.
            if (++unreadable >= UNREADABLE_SEGMENT_MAX) return 'store';
            continue;
          }
          start += there;
          next = start;
        }
        unreadable = 0;
        if (this.now() - claimLookedAt >= CLAIM_LOOK_MS && start < this.size) {
          claimLookedAt = this.now();
          // A follower took the fill over (this one stalled): its chain, not this one's.
          const state = await this.tier.claimState(this.digest);
          if (state?.claim && state.claim.node !== this.tier.nodeName) return 'lost-claim';
        }
      }
      return 'complete';
    } finally {
      // The file is released only once no upload reads it.
      await drain().catch(() => undefined);
      unwatch();
      release();
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done(): void {
        clearTimeout(timer);
        resolve();
      }
      this.wake = () => {
        this.wake = undefined;
        done();
      };
    });
  }
}
