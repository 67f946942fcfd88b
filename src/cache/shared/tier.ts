// The shared tier as the node cache uses it: blobs by digest, links per (rule, repository) and tag
// records, laid out as the node store is, in one bucket, container or directory shared by every
// node; and claims, which make one node the filler of a blob the others then read from here.
//
// The tier failing never fails a pull: every call answers "absent" (and writes are dropped) while
// the store is down, and calls are not even tried for RETRY_MS after a failure, so that a store that
// is down or slow costs one timeout per RETRY_MS, not one per request. A change of state is logged
// once and shown by /status and pullbridge_cache_shared_up.
//
// Every node writes the store, so what it holds is input, not knowledge: blobs and manifests are
// checked against their digests by the caller; records (tags, links, claims) are read up to
// RECORD_MAX_BYTES, parsed strictly, authenticated with the record key when one is configured
// (./records.ts), and a refused one counts as absent. What a record may then decide is bounded by
// policy.ts (bridgingTag, mayWaitForFill). docs/security.md ("Threat model") says what remains.

import { Counter, Gauge, type Registry } from 'prom-client';
import { pipeline, Readable, Transform } from 'node:stream';
import type { Logger } from '../../log.js';
import type { SharedConfig } from '../../rules/config.js';
import { CacheKeyError, claimIsFresh, claimRefused, claimStreams, digestKey, mayWaitForFill, parseClaim, parseLink, parseTagRecord, repositoryKey, shouldShareTag, tagKey, type SharedClaim, type TagRecord } from '../policy.js';
import { filesIdentity, readRecordKey, sharedBackend, sharedCredentialFiles } from './open.js';
import { openRecord, sealRecord } from './records.js';
import { ANNOUNCE_LOOK_MS, parseSegmentOffset, SEGMENT_MAX_BYTES, segmentKeyOffset, STREAM_STALL_MS } from '../streamplan.js';
import { LocalFileError, RECORD_MAX_BYTES, RefusedObject, SharedStoreError, type ByteSpan, type FileRange, type SharedFailure, type SharedListing, type SharedStore } from './store.js';

/** After a failure, calls are skipped (answered "absent") this long before the store is tried again. */
const RETRY_MS = 5_000;
/** How often the credential files are looked at for a rotation, and how long a store replaced by a
 * reconnection stays open for the calls still using it (an upload of a large blob). */
const CREDENTIALS_CHECK_MS = 10_000;
const RETIRED_STORE_CLOSE_MS = 30 * 60_000;
/** How many rounds of create, read and takeover a claim is tried while it changes under this node. */
const CLAIM_ATTEMPTS = 3;
/** How long a node that found a claim gone between its create and its read waits before creating again. */
const CLAIM_RECHECK_MS = 100;
/** How often a node waiting for another's fill looks for the blob. */
const WAIT_POLL_MS = 500;
/** A tag this node confirmed upstream is written again at most this often when its digest is unchanged. */
const TAG_SHARE_REFRESH_SECONDS = 300;
/** Tags whose last shared write this node remembers. */
const TAG_WRITES_MAX = 10_000;
/** Segment uploads at once on this node, all fills together: each holds its segment (up to 8 MiB)
 * in memory while it goes out (common.ts readRange), outside the proxy's buffer budget, and fills
 * per node are not capped. A publisher waits its turn (its next cut is still at most 8 MiB). */
export const SEGMENT_UPLOADS_MAX = 4;
/** How long the buffers of segment uploads are kept after the last one (for the next segment of a
 * fill in progress), before they are let go. */
const SEGMENT_BUFFERS_KEEP_MS = 10_000;
/**
 * A download from the store fails when, over timeoutSeconds of its reader waiting for it (nothing
 * buffered), it brought fewer bytes than this. The socket's idle timeout alone does not end a
 * download that drips (a byte a second is never idle), and a fill whose bytes come from the store
 * would hold its clients as long as the store keeps dripping; failed, the fill goes on from the
 * upstream (a follower) or fails and avoids the tier (a shared blob). A reader that does not read
 * (its clients are slow) is not the store's slowness and is not counted.
 */
export const STORE_READ_MIN_BYTES = 64 * 1024;
const STORE_READ_TICK_MS = 1_000;
/**
 * The most objects one listing is read for (a hundred S3 pages): more segments than a blob's fill
 * makes (8 MiB or 2 s each: 800 GB, or 55 hours of one fill), more links and tag records than a
 * repository has. A store's listing is paged by tokens the store hands out; one that hands out new
 * ones without end (and objects with them) would otherwise be listed for ever, and a removal of
 * segments, which collects the keys before it removes them, would grow without bound. The call's
 * deadline does not end it: the listing goes on after the deadline answered the caller.
 */
export const LIST_OBJECTS_MAX = 100_000;

/** A listing that fails past LIST_OBJECTS_MAX objects (the store failing: the tier is down for a while). */
async function* listed(store: SharedStore, prefix: string): AsyncIterable<SharedListing> {
  let count = 0;
  for await (const object of store.list(prefix)) {
    if (++count > LIST_OBJECTS_MAX) throw new SharedStoreError('error', `list ${prefix}: more than ${LIST_OBJECTS_MAX} objects`);
    yield object;
  }
}
/** Refused objects this node remembers having logged (each is logged once). */
const REFUSED_LOGGED_MAX = 1_000;

type SharedOperation = 'stat' | 'read' | 'upload' | 'segment' | 'record-read' | 'record-write' | 'claim' | 'remove';
/** Calls that write: a store refusing them (a read-only credential) leaves reads in use. */
const WRITES: ReadonlySet<SharedOperation> = new Set(['upload', 'segment', 'record-write', 'claim', 'remove']);

const digestPath = (digest: string) => {
  const { algorithm, hex } = digestKey(digest);
  return `${algorithm}/${hex}`;
};
const repositoryPath = (rule: string, repository: string) => `repositories/${repositoryKey(rule, repository).join('/')}`;
/** An upstream's identity (upstreamOrigin): a sha256 in hex, nothing that could leave its directory. */
const originKey = (origin: string) => {
  if (!/^[0-9a-f]{64}$/.test(origin)) throw new CacheKeyError(`not an upstream identity: ${JSON.stringify(origin.slice(0, 80))}`);
  return origin;
};
/** Keys as the node store lays out its directories (store.ts), so that a filesystem tier reads alike;
 * checked as the node store checks its paths (a CacheKeyError for a digest, rule, repository or tag
 * that is not one by the grammar), so that no key leaves the tier's prefix. */
export const sharedKeys = {
  blob: (digest: string) => `blobs/${digestPath(digest)}`,
  link: (rule: string, repository: string, digest: string) => `${repositoryPath(rule, repository)}/_links/${digestPath(digest)}`,
  tag: (rule: string, repository: string, tag: string) => `${repositoryPath(rule, repository)}/_tags/${tagKey(tag)}`,
  claim: (digest: string) => `claims/${digestPath(digest)}`,
  /** An empty record: the blob's bytes came from this upstream (upstreamOrigin, a sha256 in hex). */
  origin: (digest: string, origin: string) => `origins/${digestPath(digest)}/${originKey(origin)}`,
  /** Bytes [offset, offset + its size) of a blob being filled (streamplan.ts) from one upstream
   * (upstreamOrigin): published while the filler fetches it, read by the nodes that follow its fill,
   * removed once the blob is shared. A chain is one upstream's: a node reads and continues only its
   * own rule's upstream's chain, so that bytes another upstream sent never reach a rule whose
   * upstream merely claims the digest (a HEAD answers 200 for anything). */
  segment: (digest: string, origin: string, offset: number) => `segments/${digestPath(digest)}/${originKey(origin)}/${segmentKeyOffset(offset)}`,
  /** Every segment of a blob, of every upstream: the prefix. */
  segments: (digest: string) => `segments/${digestPath(digest)}/`,
};

/** What a filler announces in its claim once the upstream answered (claim record v2). */
export interface ClaimAnnouncement {
  readonly size: number;
  readonly origin: string;
}

/** A blob's claim as read, with the store's version of it (for a write conditional on it). */
export interface ClaimState {
  /** null when unreadable, not authentic, or empty (taken over as a stale one is). */
  readonly claim: SharedClaim | null;
  readonly version: string;
}

export interface SharedStatus {
  readonly kind: SharedStore['kind'];
  /** null until the store could be opened. */
  readonly location: string | null;
  readonly up: boolean;
  /** false while the store refuses this node's writes (reads may still work). */
  readonly writable: boolean;
  /** Why it is down, and since when (ISO time). */
  readonly failure?: SharedFailure;
  readonly since: string;
  readonly blobsRead: number;
  readonly blobsWritten: number;
  /** Segment objects this node published (as a filler) and read (as a follower). */
  readonly segmentsWritten: number;
  readonly segmentsRead: number;
  /** Fills this node took over from a stalled or dead filler. */
  readonly takeovers: number;
}

export class SharedTier {
  private failure: SharedFailure | undefined;
  private since: number;
  private retryAt = 0;
  /** Writes refused ('denied') while reads work, and when to try writing again. */
  private writesRefused = false;
  private writeRetryAt = 0;
  private readonly tally = { blobsRead: 0, blobsWritten: 0, segmentsWritten: 0, segmentsRead: 0, takeovers: 0 };
  /** What this node announced in its claims, by digest: kept when keepClaim renews them. */
  private readonly announced = new Map<string, ClaimAnnouncement>();
  /** What this node last wrote for a tag, so that it does not write on every confirmation. */
  private readonly tagWrites = new Map<string, TagRecord>();
  /** Objects this node refused and said so (once each). */
  private readonly refusedLogged = new Set<string>();
  /** Segment uploads running (at most SEGMENT_UPLOADS_MAX), and the publishers waiting for one. */
  private segmentUploads = 0;
  private readonly segmentWaiting: (() => void)[] = [];
  /** Segment buffers (SEGMENT_MAX_BYTES each) not in use, reused by the next uploads: with a fresh
   * 8 MiB buffer per segment, each outlived the young generation's collections and the filler ran
   * ~100 full collections per GiB. At most SEGMENT_UPLOADS_MAX are here or in running uploads; one
   * whose upload timed out stays with the store's client until its socket ends (as any body would). */
  private readonly segmentBuffers: Buffer[] = [];
  private segmentBuffersTimer: NodeJS.Timeout | undefined;
  /** The record key (cache.shared.recordKeyFile), read with the credentials; undefined without one. */
  private recordKey: Uint8Array | undefined;
  private readonly requests: Counter<'operation' | 'result'>;
  private readonly bytes: Counter<'direction'>;
  private readonly segments: Counter<'direction'>;
  private readonly takeoverCount: Counter;

  /** The open store; undefined until it opened (it is opened on first use, and again when the
   * credential files change or after it could not be opened). */
  private store: SharedStore | undefined;
  private opening: Promise<SharedStore> | undefined;
  /** The credential files' identity (inode, size, mtime) when last looked at, and when that was. */
  private credentials: string | undefined;
  private credentialsCheckedAt = -Infinity;

  constructor(
    /** Opens the configured store (reads the credential files). */
    private readonly open: () => Promise<SharedStore>,
    private readonly settings: SharedConfig,
    /** This node, as its claims name it. */
    readonly nodeName: string,
    registry: Registry,
    private readonly logger: Logger,
    private readonly now: () => number,
  ) {
    this.since = now();
    const tier = this;
    this.requests = new Counter({ name: 'pullbridge_cache_shared_requests_total', help: 'Calls to the shared cache tier by operation and result (ok, absent, failed, skipped while it is down, refused: an object not read as what it should be, or a record not authentic)', labelNames: ['operation', 'result'], registers: [registry] });
    this.bytes = new Counter({ name: 'pullbridge_cache_shared_bytes_total', help: 'Blob bytes read from (read) and written to (written) the shared cache tier, segments included', labelNames: ['direction'], registers: [registry] });
    this.segments = new Counter({ name: 'pullbridge_cache_shared_segments_total', help: 'Segment objects of fills in progress this node wrote (as the filler) and read (following another node\'s fill)', labelNames: ['direction'], registers: [registry] });
    this.takeoverCount = new Counter({ name: 'pullbridge_cache_shared_takeovers_total', help: 'Fills this node took over from another node whose fill stalled or died', registers: [registry] });
    new Gauge({ name: 'pullbridge_cache_shared_writable', help: '0 while the shared cache tier refuses this node\'s writes (it still reads what others shared)', registers: [registry], collect() { this.set(tier.writesRefused ? 0 : 1); } });
    new Gauge({ name: 'pullbridge_cache_shared_up', help: '1 while the shared cache tier answers; 0 while it fails (pulls go to the upstream)', registers: [registry], collect() { this.set(tier.failure ? 0 : 1); } });
  }

  status(): SharedStatus {
    return {
      kind: sharedBackend(this.settings),
      location: this.store?.location ?? null,
      up: this.failure === undefined,
      writable: !this.writesRefused,
      ...(this.failure ? { failure: this.failure } : {}),
      since: new Date(this.since).toISOString(),
      ...this.tally,
    };
  }

  /** Whether the tier answers (not failing, nor skipped after a failure). */
  get up(): boolean {
    return this.failure === undefined;
  }

  /** A blob's size in the tier; undefined when it is not there (or the tier is down). */
  async blobSize(digest: string): Promise<number | undefined> {
    return this.call('stat', undefined, async (store) => (await store.stat(sharedKeys.blob(digest)))?.size);
  }

  /** A blob's bytes (or a span); undefined when it is not there (or the tier is down). The caller
   * checks the digest: what comes from the tier is trusted no more than the upstream. */
  async readBlob(digest: string, span?: ByteSpan, signal?: AbortSignal): Promise<Readable | undefined> {
    const stream = await this.call('read', undefined, (store) => store.read(sharedKeys.blob(digest), span, signal));
    if (!stream) return undefined;
    this.tally.blobsRead++;
    return this.countedRead(stream);
  }

  /** A download counted as it passes, without a 'data' listener (which would start the stream
   * flowing before its reader attaches, and lose what it read meanwhile). */
  private countedRead(stream: Readable): Readable {
    const bytes = this.bytes;
    let received = 0;
    const counting = new Transform({
      transform(chunk: Buffer, _encoding, done) {
        bytes.inc({ direction: 'read' }, chunk.length);
        received += chunk.length;
        done(null, chunk);
      },
    });
    const piped = pipeline(stream, counting, () => undefined);
    const windowTicks = Math.ceil((this.settings.timeoutSeconds * 1000) / STORE_READ_TICK_MS);
    if (windowTicks <= 0) return piped; // timeoutSeconds 0: no deadline
    // Ticks at which the reader had taken everything and waited, and the bytes that came meanwhile.
    let waitedTicks = 0;
    let waitedBytes = 0;
    let seen = 0;
    const tick = setInterval(() => {
      const came = received - seen;
      seen = received;
      if (counting.readableLength > 0) return;
      waitedTicks++;
      waitedBytes += came;
      if (waitedTicks < windowTicks) return;
      if (waitedBytes < STORE_READ_MIN_BYTES) counting.destroy(new Error(`the shared store sent ${waitedBytes} bytes in ${this.settings.timeoutSeconds} s of a download, fewer than ${STORE_READ_MIN_BYTES}`));
      waitedTicks = 0;
      waitedBytes = 0;
    }, STORE_READ_TICK_MS);
    tick.unref();
    counting.once('close', () => clearInterval(tick));
    return piped;
  }

  /**
   * Publishes bytes [range.start, range.end) of this node's fill file as the blob's segment at
   * range.start (one request, create-if-absent): 'created', 'exists' (another writer's segment is
   * there: nothing written), or undefined when the tier failed or refused (the publisher stops).
   */
  async publishSegment(digest: string, origin: string, range: FileRange, signal?: AbortSignal): Promise<'created' | 'exists' | undefined> {
    const key = sharedKeys.segment(digest, origin, range.start);
    // Waited for outside call(): the store's deadline is for the upload, not for this node's queue.
    await this.segmentSlot();
    const scratch = this.segmentBuffers.pop() ?? Buffer.allocUnsafeSlow(SEGMENT_MAX_BYTES);
    let outcome: 'created' | 'exists' | undefined;
    try {
      outcome = await this.call('segment', undefined, (store) => store.createFromRange(key, { ...range, scratch }, signal));
    } finally {
      // Reused only after an upload that created its object, so the store read the whole body: one
      // that failed (a deadline) may still be reading it in the store's client, and an 'exists' may
      // be answered before the body was sent.
      if (outcome === 'created') this.segmentBuffers.push(scratch);
      this.segmentSlotDone();
    }
    if (outcome === 'created') {
      this.tally.segmentsWritten++;
      this.segments.inc({ direction: 'written' });
      this.bytes.inc({ direction: 'written' }, range.end - range.start);
    }
    return outcome;
  }

  /** One of the node's SEGMENT_UPLOADS_MAX upload slots, once free (in the order asked for). */
  private async segmentSlot(): Promise<void> {
    clearTimeout(this.segmentBuffersTimer);
    if (this.segmentUploads < SEGMENT_UPLOADS_MAX) {
      this.segmentUploads++;
      return;
    }
    // The slot is handed over by segmentSlotDone (the count stays).
    await new Promise<void>((resolve) => this.segmentWaiting.push(resolve));
  }

  private segmentSlotDone(): void {
    const next = this.segmentWaiting.shift();
    if (next) next();
    else if (--this.segmentUploads === 0) {
      this.segmentBuffersTimer = setTimeout(() => (this.segmentBuffers.length = 0), SEGMENT_BUFFERS_KEEP_MS).unref();
    }
  }

  /** The size of the blob's segment at `offset` in `origin`'s chain; undefined when there is none (or the tier is down). */
  async segmentSize(digest: string, origin: string, offset: number): Promise<number | undefined> {
    return this.call('stat', undefined, async (store) => (await store.stat(sharedKeys.segment(digest, origin, offset)))?.size);
  }

  /**
   * The blob's segment at `offset`, read up to one byte past SEGMENT_MAX_BYTES (so that the reader
   * can refuse a larger object without reading it all); undefined when it is not there (or the
   * tier is down). The caller checks its length against SEGMENT_MAX_BYTES and the blob's size;
   * the bytes are checked with the whole blob's digest.
   */
  async readSegment(digest: string, origin: string, offset: number, signal?: AbortSignal): Promise<Readable | undefined> {
    const stream = await this.call('read', undefined, (store) => store.read(sharedKeys.segment(digest, origin, offset), { start: 0, end: SEGMENT_MAX_BYTES }, signal));
    if (!stream) return undefined;
    this.tally.segmentsRead++;
    this.segments.inc({ direction: 'read' });
    return this.countedRead(stream);
  }

  /** Removes every segment of the blob, of every upstream's chain (its fill is shared whole, or its
   * bytes hashed wrong). */
  async removeSegments(digest: string): Promise<void> {
    await this.call('remove', undefined, async (store) => {
      const keys: string[] = [];
      const prefix = sharedKeys.segments(digest);
      for await (const object of listed(store, prefix)) {
        // Only what is a segment by name (<origin>/<offset>): nothing else is removed under the prefix.
        const [origin, offset, ...rest] = object.key.slice(prefix.length).split('/');
        if (rest.length === 0 && origin !== undefined && /^[0-9a-f]{64}$/.test(origin) && offset !== undefined && parseSegmentOffset(offset) !== undefined) keys.push(object.key);
      }
      for (const key of keys) await store.remove(key);
      return true;
    });
  }

  /** Removes one segment (one that cannot be part of the chain: larger than a segment, or past the end). */
  async removeSegment(digest: string, origin: string, offset: number): Promise<void> {
    await this.call('remove', undefined, (store) => store.remove(sharedKeys.segment(digest, origin, offset)));
  }

  /** A small blob (a manifest) whole, up to `maxBytes`; undefined when it is not there, larger, or
   * the tier is down. The caller checks its digest. */
  async readSmallBlob(digest: string, maxBytes: number): Promise<Buffer | undefined> {
    const body = await this.call('record-read', undefined, (store) => store.readRecord(sharedKeys.blob(digest), maxBytes));
    if (body) this.bytes.inc({ direction: 'read' }, body.length);
    return body;
  }

  /** Uploads a stored, digest-verified node file as the blob (unless it is there already). */
  async uploadBlob(digest: string, file: string, size: number): Promise<void> {
    const outcome = await this.call('upload', undefined, (store) => store.createFromFile(sharedKeys.blob(digest), file, size));
    if (outcome === 'created') {
      this.tally.blobsWritten++;
      this.bytes.inc({ direction: 'written' }, size);
    }
  }

  /** A small blob (a manifest) whole, unless it is there already. */
  async writeSmallBlob(digest: string, body: Buffer): Promise<void> {
    // Content, not a record: its digest authenticates it, so it carries no seal.
    const created = await this.call('record-write', false, (store) => store.writeRecord(sharedKeys.blob(digest), body, { ifAbsent: true }));
    if (created) {
      this.tally.blobsWritten++;
      this.bytes.inc({ direction: 'written' }, body.length);
    }
  }

  /**
   * A link's content (a manifest's media type, '' for a blob) for a rule whose upstream is `origin`;
   * null without one, or when the tier does not record that the blob came from that upstream (a link
   * written for another upstream's content never unlocks it).
   */
  async readLink(rule: string, repository: string, digest: string, origin: string): Promise<string | null> {
    const key = sharedKeys.link(rule, repository, digest);
    const body = await this.readRecord(key);
    const mediaType = body === undefined ? null : (this.parsed(key, parseLink(body.toString('latin1')) ?? undefined) ?? null);
    if (mediaType === null || !(await this.storedFrom(digest, origin))) return null;
    return mediaType;
  }

  async writeLink(rule: string, repository: string, digest: string, mediaType = ''): Promise<void> {
    await this.writeRecord(sharedKeys.link(rule, repository, digest), Buffer.from(mediaType));
  }

  async removeLink(rule: string, repository: string, digest: string): Promise<void> {
    await this.call('remove', undefined, (store) => store.remove(sharedKeys.link(rule, repository, digest)));
  }

  /**
   * Forgets what `(rule, repository)` may read in the tier, as NodeStore.purge does on a node: its
   * link to `digest` and the tag records naming it, or all its links and tag records. False when the
   * tier could not be purged (down, refusing writes, failing on the way): the caller says so.
   */
  async purge(rule: string, repository: string, digest?: string): Promise<boolean> {
    return this.call('remove', false, async (store) => {
      const base = repositoryPath(rule, repository);
      if (digest !== undefined) await store.remove(sharedKeys.link(rule, repository, digest));
      else for await (const link of listed(store, `${base}/_links/`)) await store.remove(link.key);
      for await (const tag of listed(store, `${base}/_tags/`)) {
        if (digest !== undefined) {
          // A record this node refuses to read (too large, not a file) names no digest it believes: left.
          const body = await store.readRecord(tag.key, RECORD_MAX_BYTES).catch((error: unknown) => {
            if (error instanceof RefusedObject) return undefined;
            throw error;
          });
          if (parseTagRecord(openRecord(this.recordKey, tag.key, body ?? Buffer.alloc(0))?.toString('utf8') ?? '')?.digest !== digest) continue;
        }
        this.tagWrites.delete(tag.key);
        await store.remove(tag.key);
      }
      return true;
    });
  }

  /** Whether the tier records that the blob's bytes came from the upstream `origin`. */
  async storedFrom(digest: string, origin: string): Promise<boolean> {
    return (await this.readRecord(sharedKeys.origin(digest, origin))) !== undefined;
  }

  /** Records that the blob's bytes came, verified, from the upstream `origin`. */
  async writeOrigin(digest: string, origin: string): Promise<void> {
    await this.writeRecord(sharedKeys.origin(digest, origin), Buffer.alloc(0));
  }

  async readTag(rule: string, repository: string, tag: string): Promise<TagRecord | undefined> {
    const key = sharedKeys.tag(rule, repository, tag);
    const body = await this.readRecord(key);
    return body === undefined ? undefined : this.parsed(key, parseTagRecord(body.toString('utf8')));
  }

  /** Shares a tag the upstream just confirmed, when the tier's copy would otherwise be missing,
   * name another digest or grow old (shouldShareTag). */
  async shareTag(rule: string, repository: string, tag: string, record: TagRecord): Promise<void> {
    const key = sharedKeys.tag(rule, repository, tag);
    if (!shouldShareTag(this.tagWrites.get(key), record, TAG_SHARE_REFRESH_SECONDS)) return;
    const written = await this.writeRecord(key, Buffer.from(JSON.stringify(record)));
    if (!written) return;
    this.tagWrites.delete(key);
    this.tagWrites.set(key, record);
    if (this.tagWrites.size > TAG_WRITES_MAX) {
      const oldest = this.tagWrites.keys().next().value;
      if (oldest !== undefined) this.tagWrites.delete(oldest);
    }
  }

  /**
   * Claims the filling of a blob for this node with the store's own conditional create: 'ours' when
   * this node should fetch it from the upstream (and upload it), 'theirs' when another node's fresh
   * claim stands (wait for the blob: waitForBlob), 'ours' also when the tier is down (nothing to
   * wait for). A claim older than fillWaitSeconds is a filler that died: it is taken over with a
   * write conditional on the version of it that was read, so that of several nodes finding it stale
   * exactly one takes it; the others then find that one's fresh claim. 'theirs' too when the claim
   * kept changing under this node for CLAIM_ATTEMPTS rounds (waitForBlob then decides).
   */
  async claim(digest: string): Promise<'ours' | 'theirs'> {
    const key = sharedKeys.claim(digest);
    for (let attempt = 0; attempt < CLAIM_ATTEMPTS; attempt++) {
      const created = await this.call('claim', undefined, (store) => store.writeRecord(key, this.claimRecord(key, digest), { ifAbsent: true }));
      if (created !== false) return 'ours';
      const found = await this.readClaim(digest);
      // Released since (or the tier failed: the next create is skipped and answers 'ours'); or away
      // from its key for a moment while its filler rewrites it (a filesystem store's compare-and-
      // rename, as the fill's announcement does): created again only after a short look away, so
      // that a claim being rewritten is not taken in that moment.
      if (found === undefined) {
        await new Promise((resolve) => setTimeout(resolve, CLAIM_RECHECK_MS));
        continue;
      }
      const { claim, version } = found;
      if (claim && claimIsFresh(claim, this.now(), this.settings.fillWaitSeconds)) return claim.node === this.nodeName ? 'ours' : 'theirs';
      // Stale (its filler died), or unreadable: taken over if it is still the claim read.
      if (await this.call('claim', false, (store) => store.writeRecord(key, this.claimRecord(key, digest), { ifMatch: version }))) return 'ours';
    }
    return 'theirs';
  }

  /**
   * Announces this node's fill in its claim (claim record v2: size, origin, stream), rewritten on
   * condition of the version read, so that a claim another node took meanwhile stays its own; the
   * announcement is kept by keepClaim's renewals. False when the claim is not (or no longer) this
   * node's, or the tier failed: then nobody follows this fill, and it is shared whole as before.
   */
  async announce(digest: string, fields: ClaimAnnouncement): Promise<boolean> {
    const key = sharedKeys.claim(digest);
    // Tried again while the claim stays this node's: its own renewal (keepClaim) may have rewritten
    // it between the read and the conditional write.
    for (let attempt = 0; attempt < CLAIM_ATTEMPTS && this.up; attempt++) {
      const found = await this.readClaim(digest);
      if (found?.claim?.node !== this.nodeName) break;
      this.announced.set(digest, fields);
      if (await this.call('claim', false, (store) => store.writeRecord(key, this.claimRecord(key, digest), { ifMatch: found.version }))) return true;
    }
    this.announced.delete(digest);
    return false;
  }

  /** The blob's claim as the store holds it now; undefined when there is none (or the tier is down). */
  claimState(digest: string): Promise<ClaimState | undefined> {
    return this.readClaim(digest);
  }

  /**
   * Takes over another node's fill whose chain stopped growing (or whose claim went away without the
   * blob): a claim for this node, written on condition that the claim is still `version` as read
   * (or, 'absent', that there is none), so that of every follower trying, exactly one wins. True
   * when this node now holds the claim (counted as a takeover); it then announces its own fill.
   */
  async takeOver(digest: string, version: string | 'absent'): Promise<boolean> {
    const key = sharedKeys.claim(digest);
    this.announced.delete(digest);
    const condition = version === 'absent' ? { ifAbsent: true } : { ifMatch: version };
    const won = await this.call('claim', false, (store) => store.writeRecord(key, this.claimRecord(key, digest), condition));
    if (won) {
      this.tally.takeovers++;
      this.takeoverCount.inc();
    }
    return won;
  }

  /** Removes a blob whose shared copy hashed wrong, so that the next upstream fill shares it again. */
  async removeBlob(digest: string): Promise<void> {
    await this.call('remove', undefined, (store) => store.remove(sharedKeys.blob(digest)));
  }

  /** Ends this node's claim (the blob is uploaded, or the fill failed): removed on condition that it
   * is still the claim read, so that a claim another node took over meanwhile (this one went stale)
   * is left to it, even when it is taken over between the read and the removal. */
  async release(digest: string): Promise<void> {
    this.announced.delete(digest);
    const found = await this.readClaim(digest);
    if (!found || (found.claim && found.claim.node !== this.nodeName)) return;
    await this.call('claim', undefined, (store) => store.remove(sharedKeys.claim(digest), { ifMatch: found.version }));
  }

  /**
   * Keeps this node's claim fresh while `progressed()` says its fill moves on (called every third of
   * fillWaitSeconds): a fetch that takes longer than fillWaitSeconds keeps the others waiting for it
   * rather than all fetching too, and one that stalls goes stale and is taken over. Only this node's
   * own claim is rewritten, on condition of the version read: one taken over meanwhile stays the
   * other node's. Returns the stop.
   */
  keepClaim(digest: string, progressed: () => boolean): () => void {
    const key = sharedKeys.claim(digest);
    const renew = async () => {
      const found = await this.readClaim(digest);
      if (found?.claim?.node !== this.nodeName) return;
      await this.call('claim', false, (store) => store.writeRecord(key, this.claimRecord(key, digest), { ifMatch: found.version }));
    };
    const timer = setInterval(() => {
      if (progressed()) void renew();
    }, (this.settings.fillWaitSeconds * 1000) / 3);
    timer.unref();
    return () => clearInterval(timer);
  }

  /**
   * Waits for another node's fill of the blob to land, as long as its claim stays fresh (its filler
   * makes progress: keepClaim), and no longer than mayWaitForFill allows from when this wait began
   * (a claim renewed forever holds no one): the blob's size once it is there; undefined when the
   * claim went stale or away without the blob (the fill stalled or failed), the wait is over, the
   * tier went down, or the client left.
   */
  async waitForBlob(digest: string, signal: AbortSignal): Promise<number | undefined> {
    const since = this.now();
    while (!signal.aborted && !this.failure) {
      if (!mayWaitForFill(since, this.now(), this.settings.fillWaitSeconds)) {
        this.logger.warn({ digest, waitedSeconds: Math.round((this.now() - since) / 1000) }, 'shared cache tier: another node\'s fill claim outlasted the wait for it; fetching from the upstream');
        return undefined;
      }
      const size = await this.blobSize(digest);
      if (size !== undefined) return size;
      const found = await this.readClaim(digest);
      if (found === undefined) return await this.blobSize(digest);
      const { claim } = found;
      if (claim === null || !claimIsFresh(claim, this.now(), this.settings.fillWaitSeconds)) return undefined;
      await new Promise((resolve) => setTimeout(resolve, WAIT_POLL_MS));
    }
    return undefined;
  }

  /**
   * waitForBlob for a node that streams fills: also answers, as soon as the claim announces a
   * streaming fill (claim record v2), with that claim, to follow. The claim is looked at every
   * ANNOUNCE_LOOK_MS while its filler may still be waiting for the upstream's answer (a claim
   * without `stream` may be an old node's, which never announces), then every WAIT_POLL_MS.
   * `gone` when the claim went away without the blob (the caller may claim the fill itself).
   */
  async waitForFill(digest: string, signal: AbortSignal): Promise<{ readonly size: number } | { readonly claim: SharedClaim & { readonly size: number; readonly origin: string; readonly stream: 1 } } | { readonly gone: true } | undefined> {
    const since = this.now();
    /** A claim not found once: looked at again before it counts as gone (a filesystem store's claim
     * is away from its key for a moment while it is rewritten, as the announcement does). */
    let missedOnce = false;
    while (!signal.aborted && !this.failure) {
      if (!mayWaitForFill(since, this.now(), this.settings.fillWaitSeconds)) {
        this.logger.warn({ digest, waitedSeconds: Math.round((this.now() - since) / 1000) }, 'shared cache tier: another node\'s fill claim outlasted the wait for it; fetching from the upstream');
        return undefined;
      }
      const found = await this.readClaim(digest);
      if (found?.claim && found.claim.node !== this.nodeName && claimStreams(found.claim, digest) && claimIsFresh(found.claim, this.now(), this.settings.fillWaitSeconds)) return { claim: found.claim };
      const size = await this.blobSize(digest);
      if (size !== undefined) return { size };
      if (found?.claim && claimRefused(found.claim, digest)) {
        this.logger.warn({ digest, node: found.claim.node, size: found.claim.size }, 'shared cache tier: refused a fill claim announcing a size the blob cannot have; fetching from the upstream');
        return undefined;
      }
      if (found === undefined && missedOnce) {
        const landed = await this.blobSize(digest);
        return landed === undefined ? { gone: true } : { size: landed };
      }
      missedOnce = found === undefined;
      if (found && (found.claim === null || !claimIsFresh(found.claim, this.now(), this.settings.fillWaitSeconds))) return undefined;
      await new Promise((resolve) => setTimeout(resolve, this.now() - since < STREAM_STALL_MS ? ANNOUNCE_LOOK_MS : WAIT_POLL_MS));
    }
    return undefined;
  }

  /** This node's claim, made now, as written at `key`, with what it announced of its fill. */
  private claimRecord(key: string, digest: string): Buffer {
    const announced = this.announced.get(digest);
    const claim: SharedClaim = announced ? { node: this.nodeName, at: this.now(), size: announced.size, origin: announced.origin, stream: 1 } : { node: this.nodeName, at: this.now() };
    return sealRecord(this.recordKey, key, Buffer.from(JSON.stringify(claim)));
  }

  /** The blob's claim and the store's version of it: undefined when there is none (or the tier is
   * down), claim null when it is unreadable, not authentic, or empty (a GCS removal under way:
   * gcs.ts), all taken over as a stale one is. */
  private async readClaim(digest: string): Promise<ClaimState | undefined> {
    const key = sharedKeys.claim(digest);
    const found = await this.call('record-read', undefined, (store) => store.readVersioned(key));
    if (found === undefined) return undefined;
    const { body, version } = found;
    if (body.length === 0) return { claim: null, version };
    const opened = this.authentic(key, body);
    return { claim: opened === undefined ? null : (this.parsed(key, parseClaim(opened.toString('utf8'))) ?? null), version };
  }

  /** A record's payload: undefined when there is none, the tier is down, or it is refused (too large,
   * not a file, not authentic). */
  private async readRecord(key: string): Promise<Buffer | undefined> {
    const body = await this.call('record-read', undefined, (store) => store.readRecord(key, RECORD_MAX_BYTES));
    return body === undefined ? undefined : this.authentic(key, body);
  }

  /** Writes a record, sealed with the record key when there is one. */
  private async writeRecord(key: string, payload: Buffer): Promise<boolean> {
    return this.call('record-write', false, (store) => store.writeRecord(key, sealRecord(this.recordKey, key, payload)));
  }

  /** The payload of a record read at `key` if it is authentic (always, without a record key). */
  private authentic(key: string, body: Buffer): Buffer | undefined {
    const payload = openRecord(this.recordKey, key, body);
    if (payload === undefined) this.refused(new RefusedObject(`read ${key}: not sealed with the record key (cache.shared.recordKeyFile)`));
    return payload;
  }

  /** A parsed record, or undefined (counted and logged as refused) when it did not parse. */
  private parsed<T>(key: string, value: T | undefined): T | undefined {
    if (value === undefined) this.refused(new RefusedObject(`read ${key}: not a valid record`));
    return value;
  }

  /** Counts a refused object and logs it once. */
  private refused(error: RefusedObject, operation: SharedOperation = 'record-read'): void {
    this.requests.inc({ operation, result: 'refused' });
    if (this.refusedLogged.has(error.message)) return;
    if (this.refusedLogged.size >= REFUSED_LOGGED_MAX) this.refusedLogged.clear();
    this.refusedLogged.add(error.message);
    this.logger.warn({ error: error.message }, 'shared cache tier: refused an object another writer of the store left; it counts as absent');
  }

  async close(): Promise<void> {
    clearTimeout(this.segmentBuffersTimer);
    this.segmentBuffers.length = 0;
    const store = this.store ?? (await this.opening?.catch(() => undefined));
    await store?.close();
  }

  /**
   * The store to call, opened when it is not (yet) and reopened when its credential files changed
   * since the last look (a rotated Secret: kubelet swaps the mounted files in place), so that new
   * credentials apply without a restart. The previous store is closed later: calls may still use it.
   */
  private async current(): Promise<SharedStore> {
    if (this.now() - this.credentialsCheckedAt >= CREDENTIALS_CHECK_MS) {
      this.credentialsCheckedAt = this.now();
      const seen = await filesIdentity(sharedCredentialFiles(this.settings));
      if (this.store && this.credentials !== undefined && seen !== this.credentials) {
        this.logger.info({ shared: this.store.location }, 'shared cache tier credential files changed: reconnecting with them');
        const previous = this.store;
        this.store = undefined;
        setTimeout(() => void previous.close().catch(() => undefined), RETIRED_STORE_CLOSE_MS).unref();
      }
      this.credentials = seen;
    }
    if (this.store) return this.store;
    this.opening ??= (async () => {
      // The record key is read with the credentials: without it (a Secret not mounted yet) the tier
      // stays down rather than believe records it cannot check.
      const key = await readRecordKey(this.settings);
      const opened = await this.open();
      this.recordKey = key;
      return opened;
    })().finally(() => (this.opening = undefined));
    const store = await this.opening;
    if (!this.store) {
      this.store = store;
      this.logger.info({ shared: store.location, kind: store.kind }, 'shared cache tier opened');
    }
    return this.store;
  }

  /**
   * Runs one call to the store: its answer, or `fallback` when it fails (or is skipped because the
   * store failed less than RETRY_MS ago). Counted, and state changes logged once.
   */
  private async call<T, F>(operation: SharedOperation, fallback: F, run: (store: SharedStore) => Promise<T>): Promise<T | F> {
    const write = WRITES.has(operation);
    if ((this.failure && this.now() < this.retryAt) || (write && this.writesRefused && this.now() < this.writeRetryAt)) {
      this.requests.inc({ operation, result: 'skipped' });
      return fallback;
    }
    const location = () => this.store?.location ?? sharedBackend(this.settings);
    try {
      // A read is bounded until its download opens (a hung NFS mount, a store that accepts and never
      // answers); an upload is bounded by the store adapter, by its progress.
      const bounded = operation !== 'upload' && this.settings.timeoutSeconds > 0; // 0: no deadline
      const value = await withTimeout(this.current().then(run), bounded ? this.settings.timeoutSeconds * 1000 : undefined);
      this.requests.inc({ operation, result: value === undefined ? 'absent' : 'ok' });
      if (this.failure) {
        this.logger.info({ shared: location(), downSeconds: Math.round((this.now() - this.since) / 1000) }, 'shared cache tier answers again');
        this.failure = undefined;
        this.since = this.now();
      }
      if (write && this.writesRefused) {
        this.logger.info({ shared: location() }, 'shared cache tier takes writes again');
        this.writesRefused = false;
      }
      return value;
    } catch (error) {
      // A refused key is the caller's fault, and a local file failing an upload is this node's, not
      // the store's: neither takes the tier down (the caller stops).
      if (error instanceof CacheKeyError || error instanceof LocalFileError) throw error;
      if (error instanceof RefusedObject) {
        // Not a failure of the store: the object is not one this node reads (the tier stays up).
        this.refused(error, operation);
        return fallback;
      }
      const failure = error instanceof SharedStoreError ? error.failure : 'error';
      this.requests.inc({ operation, result: 'failed' });
      if (write && failure === 'denied') {
        // Refused writes only: this node shares nothing new, and still reads what the others shared.
        this.writeRetryAt = this.now() + RETRY_MS;
        if (!this.writesRefused) this.logger.warn({ shared: location(), operation, error: (error as Error).message }, 'shared cache tier refuses writes: this node reads from it but shares nothing');
        this.writesRefused = true;
        return fallback;
      }
      this.retryAt = this.now() + RETRY_MS;
      if (this.failure !== failure) {
        this.logger.warn({ shared: location(), failure, operation, error: (error as Error).message }, 'shared cache tier failing: pulls go to the upstream');
        this.failure = failure;
        this.since = this.now();
      }
      return fallback;
    }
  }

}

/** `promise`, or a 'timeout' failure after `ms` (none when undefined: a transfer's length depends on its size). */
function withTimeout<T>(promise: Promise<T>, ms: number | undefined): Promise<T> {
  if (ms === undefined) return promise;
  let timer: NodeJS.Timeout | undefined;
  let late = false;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      late = true;
      reject(new SharedStoreError('timeout', `no answer within ${ms / 1000} s`));
    }, ms);
  });
  // A download that opens after its deadline is closed, not left holding a connection or a file.
  void promise.then((value) => {
    if (late && value instanceof Readable) value.destroy();
  }, () => undefined);
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
