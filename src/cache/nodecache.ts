// The node cache as one object for the proxy process: its store, the settings of the config in
// force, what it counts, eviction and the free-disk floor. It outlives config changes (each new
// runtime's CachedContent uses the same one), so fills in flight and counters carry over.

import { createHash } from 'node:crypto';
import { hostname } from 'node:os';
import { Counter, Gauge, type Registry } from 'prom-client';
import type { Logger } from '../log.js';
import type { CacheConfig } from '../rules/config.js';
import { ContentError, type CacheOutcome } from '../content/source.js';
import type { UpstreamCredentials } from '../upstream/authorizer.js';
import type { BlobFlight } from './flight.js';
import { evictionPlan, grownReservation, inodeFloor, inodesLeft, linkIsFresh, METADATA_ENTRY_BYTES, roomFor, staleEligible, upstreamFailureOf, type DiskRoom } from './policy.js';
import { openSharedStore } from './shared/open.js';
import { SharedTier } from './shared/tier.js';
import { NodeStore, type DiskReservation, type LinkState, type PurgeOutcome } from './store.js';

export type CacheKind = 'manifest' | 'blob';

/** A (rule, repository) content is shared for, the upstream it came from (upstreamOrigin), and a manifest's media type. */
type SharedLink = { readonly rule: string; readonly repository: string; readonly origin: string; readonly mediaType?: string };

const sharedKnownKey = (digest: string, link: SharedLink) => `${link.rule}\0${link.repository}\0${digest}`;

export interface NodeCacheOptions {
  /** false for a second process on a running proxy's store (warm): see NodeStore.open. */
  readonly removePartialFills?: boolean;
  /** This node, as its shared-tier fill claims name it (default: the host name; the chart sets the Node's). */
  readonly nodeName?: string;
}

/** A read of stored content for a (rule, repository), to be allowed (NodeCache.confirmAccess). */
export interface AccessCheck {
  readonly rule: string;
  readonly repository: string;
  readonly digest: string;
  readonly credentials: UpstreamCredentials | undefined;
  readonly signal: AbortSignal;
  /** passthrough: the credential is the client's own, which the upstream must have accepted recently. */
  readonly passthrough: boolean;
  /** What the client asked for it as: a refusal removes the link only when asked as what the link
   * records (a manifest's link holds its media type, a blob's is empty), so that asking for a layer's
   * digest as a manifest (404) does not take the layer's link away. */
  readonly kind: 'manifest' | 'blob';
  /** Its link, when it has one (NodeStore.readLinkState); one just read from the shared tier, or a
   * fill of this (rule, repository) in flight, counts as confirmed now. */
  readonly link: LinkState | null;
}

interface CacheMetrics {
  readonly requests: Counter<'kind' | 'result'>;
  readonly savedBytes: Counter;
  readonly evictions: Counter;
  readonly evictedBytes: Counter;
  readonly fillFailures: Counter;
}

type DiskFree = Awaited<ReturnType<NodeStore['free']>>;

/** A fill that outgrows its reservation asks for at least this much more at once. */
const RESERVATION_STEP_BYTES = 8 * 2 ** 20;

/** Credentials remembered as accepted upstream (passthrough), and manifests as confirmed by a GET, at most this many each. */
const CONFIRMATIONS_MAX = 10_000;
/** How long a blob whose shared fill failed is fetched from the upstream instead, and how many are kept. */
const SHARED_AVOID_MS = 10 * 60_000;
const SHARED_AVOIDED_MAX = 10_000;
/** How many (rule, repository, digest) known to be in the shared tier are remembered (backfill). */
const SHARED_KNOWN_MAX = 50_000;

export class NodeCache {
  settings: CacheConfig;
  /** Blobs being filled, by digest: every client that wants one reads the same fill. */
  readonly flights = new Map<string, BlobFlight>();
  /** Manifests being fetched, by rule, repository, digest (and passthrough credential). */
  readonly manifestFlights = new Map<string, Promise<unknown>>();
  /** Tags being asked upstream, by rule, repository, tag (and passthrough credential). */
  readonly tagFlights = new Map<string, Promise<unknown>>();
  private readonly metrics: CacheMetrics;
  private readonly tally = { hit: 0, miss: 0, shared: 0, stale: 0, bypass: 0, savedBytes: 0, evictions: 0, evictedBytes: 0, fillFailures: 0 };
  private fillsInFlight = 0;
  /** Links and tag records hold half of maxBytes: none is written (logged once per change). */
  private metadataCapped = false;
  /** Room held by fills in flight (reserve): bytes reserved, and how many of them are written. */
  private readonly reservations = new Set<{ bytes: number; written: number }>();
  /** Bytes fills wrote since the process started (as reservations were told). */
  private writtenByFills = 0;
  private fillsEnabled = true;
  /** Whether links and tag records are written (cache.minFreeInodes), and the free inodes last seen. */
  private metadataWritable = true;
  private lastFreeInodes: number | undefined;
  private evicting: Promise<void> = Promise.resolve();
  /** `rule\0repository\0credential hash` → when the upstream last accepted that credential there. */
  private readonly confirmations = new Map<string, number>();
  /** `rule\0repository\0digest` → when the upstream last answered a GET for that manifest (revalidate: get). */
  private readonly digestConfirmations = new Map<string, number>();
  /** Uploads to the shared tier in progress, waited for (bounded) at close. */
  private readonly uploads = new Set<Promise<void>>();
  /** Digest → until when its fills skip the shared tier (its shared copy failed them). */
  private readonly sharedAvoided = new Map<string, number>();
  /** Segment publishers of fills in flight (shared/publish.ts), by digest: share() waits for one
   * before it removes the segments, sharing() and close() wait for them all. */
  private readonly publishers = new Map<string, Promise<void>>();
  /** `rule\0repository\0digest` this process shared or found shared: not looked at again. */
  private readonly sharedKnown = new Set<string>();

  private constructor(
    readonly store: NodeStore,
    settings: CacheConfig,
    registry: Registry,
    readonly logger: Logger,
    readonly now: () => number,
    /** The second tier shared by every node (cache.shared), when configured. */
    readonly shared: SharedTier | undefined,
  ) {
    this.settings = settings;
    store.metadataGate = () => this.mayWriteMetadata();
    const cache = this;
    this.metrics = {
      requests: new Counter({ name: 'pullbridge_cache_requests_total', help: 'Manifest and blob requests by how the node cache answered: hit, miss (filled from upstream), shared (filled from the shared tier), stale (last known tag while the upstream failed), bypass (not cached)', labelNames: ['kind', 'result'], registers: [registry] }),
      savedBytes: new Counter({ name: 'pullbridge_cache_upstream_bytes_saved_total', help: 'Bytes served from the node cache instead of the upstream', registers: [registry] }),
      evictions: new Counter({ name: 'pullbridge_cache_evictions_total', help: 'Blobs evicted from the node cache', registers: [registry] }),
      evictedBytes: new Counter({ name: 'pullbridge_cache_evicted_bytes_total', help: 'Bytes evicted from the node cache', registers: [registry] }),
      fillFailures: new Counter({ name: 'pullbridge_cache_fill_failures_total', help: 'Fills that stored nothing (upstream cut, digest mismatch, disk error)', registers: [registry] }),
    };
    new Gauge({ name: 'pullbridge_cache_bytes', help: 'Bytes in the node cache', registers: [registry], collect() { this.set(cache.store.usage().bytes); } });
    new Gauge({ name: 'pullbridge_cache_entries', help: 'Blobs (layers, configs, manifests) in the node cache', registers: [registry], collect() { this.set(cache.store.usage().blobs); } });
    new Gauge({ name: 'pullbridge_cache_metadata_entries', help: 'Links and tag records in the node cache (each counted as 4 KiB against cache.maxBytes)', registers: [registry], collect() { this.set(cache.store.metadataEntries()); } });
    new Gauge({ name: 'pullbridge_cache_max_bytes', help: 'cache.maxBytes', registers: [registry], collect() { this.set(cache.settings.maxBytes); } });
    new Gauge({ name: 'pullbridge_cache_fills_in_flight', help: 'Blobs being filled from upstream now', registers: [registry], collect() { this.set(cache.fillsInFlight); } });
    new Gauge({ name: 'pullbridge_cache_fills_enabled', help: '1 while the cache takes new content; 0 when its disk is below cache.minFreeBytes or cache.minFreeInodes (pulls are relayed)', registers: [registry], collect() { this.set(cache.fillsEnabled ? 1 : 0); } });
  }

  /**
   * Opens the store (removing what a crash left half-written, unless `removePartialFills` is false:
   * see NodeStore.open) and evicts down to the limits.
   */
  static async open(settings: CacheConfig, registry: Registry, logger: Logger, now: () => number = Date.now, options: NodeCacheOptions = {}): Promise<NodeCache> {
    const store = await NodeStore.open(settings.path, now, options);
    let shared: SharedTier | undefined;
    if (settings.shared) {
      const config = settings.shared;
      // Opened on first use, so that a store or credential file not there yet never stops the proxy.
      shared = new SharedTier(() => openSharedStore(config), config, options.nodeName ?? hostname(), registry, logger, now);
    }
    const cache = new NodeCache(store, settings, registry, logger, now, shared);
    await cache.evict(0);
    const usage = store.usage();
    logger.info({ path: settings.path, bytes: usage.bytes, entries: usage.blobs, maxBytes: settings.maxBytes }, 'node cache opened');
    return cache;
  }

  /** Takes up a new config's settings; the store's path cannot change while the proxy runs. */
  configure(settings: CacheConfig): void {
    if (settings.path !== this.settings.path) this.logger.warn({ path: this.settings.path, configured: settings.path }, 'cache.path changed: the proxy keeps its store until it restarts');
    if (JSON.stringify(settings.shared) !== JSON.stringify(this.settings.shared)) this.logger.warn('cache.shared changed: the proxy keeps its shared tier until it restarts');
    this.settings = { ...settings, path: this.settings.path, shared: this.settings.shared };
  }

  /**
   * Puts a blob this node fetched from the upstream into the shared tier (from the stored file,
   * held against eviction meanwhile), with its link, then ends this node's claim if it `claimed` the
   * fill. In the background: the client has its bytes already.
   */
  share(digest: string, link: SharedLink, claimed: boolean, streamed = false): void {
    const { shared } = this;
    if (!shared) return;
    const publishing = this.publishers.get(digest);
    this.inBackground(digest, link, async () => {
      const lease = this.store.lease(digest);
      const stopKeeping = claimed ? shared.keepClaim(digest, () => true) : undefined;
      try {
        // Where the bytes came from, before they appear: a node waiting for this upload finds the blob
        // and may then confirm it with that upstream (a HEAD) before its link is written.
        await shared.writeOrigin(digest, link.origin);
        // Looked at first: another node's copy is not uploaded again (a multipart upload's condition
        // is checked only when it completes, after every byte went out).
        if (lease && (await shared.blobSize(digest)) === undefined) await shared.uploadBlob(digest, lease.path, lease.size);
        await this.linkShared(shared, digest, link);
        // The fill's segments go once the whole blob is there (a follower mid-chain reads it from
        // there on), after the last was published; then the claim.
        if (streamed) {
          await publishing;
          // A node that took this fill over (this one stalled) is still publishing its chain: left
          // to it, which removes it once it shared the blob (its followers read on meanwhile).
          const claim = (await shared.claimState(digest))?.claim;
          if (!claim || claim.node === shared.nodeName) await shared.removeSegments(digest);
        }
      } finally {
        stopKeeping?.();
        lease?.release();
        if (claimed) await shared.release(digest);
      }
    });
  }

  /** Puts a manifest fetched upstream (whole, in memory: it may not have been stored here) into the
   * shared tier, with its link; in the background, as share(). */
  shareManifest(digest: string, body: Buffer, link: SharedLink): void {
    const { shared } = this;
    if (!shared) return;
    this.inBackground(digest, link, async () => {
      await shared.writeOrigin(digest, link.origin);
      await shared.writeSmallBlob(digest, body);
      await this.linkShared(shared, digest, link);
    });
  }

  /**
   * Content served from this node's own store, shared when the tier lacks it (cached before the tier
   * was configured, or while it was down), so that a new node finds it: once per (rule, repository,
   * digest) in a process's life.
   */
  backfill(digest: string, link: SharedLink): void {
    if (!this.shared || this.sharedKnown.has(sharedKnownKey(digest, link))) return;
    this.share(digest, link, false);
  }

  private async linkShared(shared: SharedTier, digest: string, link: SharedLink): Promise<void> {
    if ((await shared.readLink(link.rule, link.repository, digest, link.origin)) !== null) return;
    await shared.writeLink(link.rule, link.repository, digest, link.mediaType);
  }

  /** Runs a write to the shared tier in the background, waited for (bounded) at close; remembers
   * the content as shared for (rule, repository), so that backfill does not look again. */
  private inBackground(digest: string, link: SharedLink, write: () => Promise<void>): void {
    if (this.sharedKnown.size >= SHARED_KNOWN_MAX) this.sharedKnown.delete(this.sharedKnown.values().next().value ?? '');
    this.sharedKnown.add(sharedKnownKey(digest, link));
    const upload = write().catch((error: unknown) => this.logger.warn({ digest, err: error }, 'shared cache tier upload failed'));
    this.uploads.add(upload);
    void upload.finally(() => this.uploads.delete(upload));
  }

  /** Removes the segments a fill of this node published, once its publisher stopped: the fill ended
   * corrupt (its upstream sent wrong bytes), and the next claimant must not resume that chain. In
   * the background, waited for at close. */
  dropSegments(digest: string): void {
    const { shared } = this;
    if (!shared) return;
    const publishing = this.publishers.get(digest);
    const removal = (async () => {
      await publishing;
      await shared.removeSegments(digest);
    })().catch((error: unknown) => this.logger.warn({ digest, err: error }, 'shared cache tier: removing a corrupt fill\'s segments failed'));
    this.uploads.add(removal);
    void removal.finally(() => this.uploads.delete(removal));
  }

  /** A segment publisher of a fill in flight: waited for by share(), sharing() and close(). */
  publishing(digest: string, done: Promise<void>): void {
    const tracked = done.catch((error: unknown) => this.logger.warn({ digest, err: error }, 'shared cache tier: publishing segments failed'));
    this.publishers.set(digest, tracked);
    void tracked.finally(() => {
      if (this.publishers.get(digest) === tracked) this.publishers.delete(digest);
    });
  }

  /** A fill from the shared tier failed: this node fetches that blob from the upstream for a while,
   * so that a bad shared copy or a failing store cannot fail its pulls for good. */
  avoidShared(digest: string): void {
    if (this.sharedAvoided.size >= SHARED_AVOIDED_MAX) this.sharedAvoided.delete(this.sharedAvoided.keys().next().value ?? '');
    this.sharedAvoided.set(digest, this.now() + SHARED_AVOID_MS);
  }

  /** A shared copy that hashed wrong is removed, so that the next upstream fill shares the right bytes. */
  async removeCorruptShared(digest: string, reason: string): Promise<void> {
    this.logger.warn({ digest, reason }, 'the shared cache tier holds a corrupt copy: removed; pulls fetch it from the upstream');
    await this.shared?.removeBlob(digest);
    await this.shared?.removeSegments(digest);
  }

  /** Whether fills of this blob skip the shared tier (see sharedFillFailed). */
  avoidsShared(digest: string): boolean {
    const until = this.sharedAvoided.get(digest);
    if (until === undefined) return false;
    if (until > this.now()) return true;
    this.sharedAvoided.delete(digest);
    return false;
  }

  count(kind: CacheKind, result: CacheOutcome, savedBytes = 0): void {
    this.metrics.requests.inc({ kind, result });
    this.tally[result]++;
    if (savedBytes > 0) {
      this.metrics.savedBytes.inc(savedBytes);
      this.tally.savedBytes += savedBytes;
    }
  }

  fillStarted(): () => void {
    this.fillsInFlight++;
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      this.fillsInFlight--;
    };
  }

  fillFailed(digest: string, reason: string): void {
    this.metrics.fillFailures.inc();
    this.tally.fillFailures++;
    this.logger.warn({ digest, reason }, 'cache fill stored nothing');
  }

  /** A fill ran out of room and relayed the rest of its blob: its clients had it all, nothing was stored. */
  fillRelayed(digest: string): void {
    this.logger.info({ digest, maxBytes: this.settings.maxBytes, minFreeBytes: this.settings.minFreeBytes }, 'cache fill outgrew the room on the cache disk: relayed, not stored');
  }

  /**
   * Whether a new fill of `bytes` (0: unknown) may start: see reserve(), which takes the room too.
   * When the disk cannot, the cache is off for new fills (logged once per change, and a metric);
   * either way that pull is relayed.
   */
  mayFill(bytes: number): Promise<boolean> {
    return this.admit(bytes);
  }

  /**
   * Room on the store's disk for a fill of `bytes` (0: not announced; it grows as it writes), held
   * until released, or undefined when the limits refuse it: what is stored and what fills in flight
   * reserved must fit in maxBytes, and once every reservation is written the disk must keep
   * minFreeBytes free, after evicting what it can.
   */
  async reserve(bytes: number): Promise<DiskReservation | undefined> {
    const held = { bytes: 0, written: 0 };
    let released = false;
    const take = (granted: number) => {
      held.bytes = granted;
      this.reservations.add(held);
    };
    // The announced length is taken whole only where it fits without evicting anything: what an
    // upstream announces costs it nothing, so it may evict only as its bytes arrive (a step ahead of
    // them, as the fill grows), never the whole cache for a length it then does not send.
    const taken = (await this.admit(bytes, take, false)) || (await this.admit(Math.min(bytes, RESERVATION_STEP_BYTES), take));
    if (!taken) return undefined;
    return {
      get bytes() {
        return held.bytes;
      },
      wrote: (total) => {
        if (released || total <= held.written) return;
        this.writtenByFills += total - held.written;
        held.written = total;
        held.bytes = Math.max(held.bytes, total);
      },
      grow: async (needed) => {
        if (released) return false;
        if (needed <= held.bytes) return true;
        const target = grownReservation(held.bytes, needed, RESERVATION_STEP_BYTES, this.settings.maxBytes);
        if (target === undefined) return false;
        const take = (more: number) => {
          if (!released) held.bytes += more;
        };
        if (await this.admit(target - held.bytes, take)) return true;
        return needed < target && !released && (await this.admit(needed - held.bytes, take));
      },
      release: () => {
        if (released) return;
        released = true;
        this.reservations.delete(held);
      },
    };
  }

  /** What is stored (blobs and metadata) and reserved, and the free space measured while fills had
   * written `writtenSince` more bytes than were counted when it was measured (those count as not
   * yet on the disk). */
  private room(free: DiskFree | undefined, writtenSince: number): DiskRoom {
    let reservedBytes = 0;
    let unwrittenBytes = writtenSince;
    for (const r of this.reservations) {
      reservedBytes += r.bytes;
      unwrittenBytes += r.bytes - r.written;
    }
    const storedBytes = this.store.usage().bytes + this.store.metadataEntries() * METADATA_ENTRY_BYTES;
    const inodes = free?.inodes !== undefined && free.totalInodes !== undefined ? { freeInodes: free.inodes, minFreeInodes: inodeFloor(this.settings.minFreeInodes, free.totalInodes) } : {};
    return { storedBytes, reservedBytes, unwrittenBytes, freeBytes: free?.bytes, maxBytes: this.settings.maxBytes, minFreeBytes: this.settings.minFreeBytes, ...inodes };
  }

  /**
   * Whether `bytes` more fit (roomFor), evicting first when they do not; `take` runs when they do,
   * in the same turn as the decision (no other fill reserves in between).
   */
  private async admit(bytes: number, take?: (bytes: number) => void, evicting = true): Promise<boolean> {
    if (bytes > this.settings.maxBytes) return false;
    let mark = this.writtenByFills;
    let free = await this.free();
    let room = roomFor(this.room(free, this.writtenByFills - mark), bytes);
    if (!evicting && (!room.size || !room.disk)) return false;
    if (!room.size || !room.disk) {
      await this.evict(bytes);
      mark = this.writtenByFills;
      free = await this.free();
      room = roomFor(this.room(free, this.writtenByFills - mark), bytes);
    }
    // On and off (status, metric, a log line) with the disk itself, not with what fills in flight
    // reserved: a fill refused for those is relayed without turning the cache off.
    const enabled = roomFor({ ...this.room(free, 0), unwrittenBytes: 0 }, 0).disk;
    if (enabled !== this.fillsEnabled) {
      this.fillsEnabled = enabled;
      if (enabled) this.logger.info({ freeBytes: free?.bytes, freeInodes: free?.inodes }, 'cache disk has room again: filling resumed');
      else this.logger.warn({ freeBytes: free?.bytes, minFreeBytes: this.settings.minFreeBytes, freeInodes: free?.inodes, minFreeInodes: this.settings.minFreeInodes }, 'cache disk below cache.minFreeBytes or cache.minFreeInodes and nothing left to evict: not filling, pulls are relayed');
    }
    // Everything evictable is gone and what is left is being read or filled: relay this one rather
    // than grow past maxBytes.
    if (!room.size || !room.disk) return false;
    take?.(bytes);
    return true;
  }

  /**
   * Whether a link or tag record may be written: the disk keeps cache.minFreeInodes free after it
   * (evicting blobs, with their metadata, when it would not). Refused, the proxy works on without it
   * (a blob not linked is confirmed upstream; a tag not recorded is asked upstream).
   */
  private async mayWriteMetadata(): Promise<boolean> {
    // Tag records may name content never stored (a HEAD, a manifest that did not fit), which no
    // eviction takes away: links and records together may hold half of maxBytes, never evicting
    // blobs past that (a client asking for many tags would otherwise empty the cache).
    if ((this.store.metadataEntries() + 1) * METADATA_ENTRY_BYTES > this.settings.maxBytes / 2) {
      if (!this.metadataCapped) this.logger.warn({ entries: this.store.metadataEntries(), maxBytes: this.settings.maxBytes }, 'tag records and links hold half of cache.maxBytes: no more are written until eviction frees some (pulls are answered from the upstream)');
      this.metadataCapped = true;
      return false;
    }
    this.metadataCapped = false;
    let free = await this.free();
    if (!roomFor(this.room(free, 0), METADATA_ENTRY_BYTES).size) await this.evict(METADATA_ENTRY_BYTES);
    if (!inodesLeft(this.room(free, 0))) {
      await this.evict(0);
      free = await this.free();
    }
    const writable = inodesLeft(this.room(free, 0));
    if (writable !== this.metadataWritable) {
      this.metadataWritable = writable;
      if (writable) this.logger.info({ freeInodes: free?.inodes }, 'cache disk has inodes again: tag records and links are written');
      else this.logger.warn({ freeInodes: free?.inodes, minFreeInodes: this.settings.minFreeInodes }, 'cache disk below cache.minFreeInodes: no tag record, link or blob is written');
    }
    if (!writable) this.fillsEnabled = false;
    return writable;
  }

  /** A fill failed for lack of space: off until mayFill finds room. */
  diskFull(): void {
    if (!this.fillsEnabled) return;
    this.fillsEnabled = false;
    this.logger.warn({ path: this.settings.path }, 'cache disk full: not filling, pulls are relayed');
  }

  /** Evicts least recently used blobs not being read, to make room for `incoming` bytes. One pass at a time. */
  evict(incoming: number): Promise<void> {
    const pass = this.evicting.then(async () => {
      // Fills in flight keep their reservations: eviction makes room for them too.
      const mark = this.writtenByFills;
      const free = await this.free();
      const room = this.room(free, this.writtenByFills - mark);
      const metadataBytes = room.storedBytes - this.store.usage().bytes;
      // Short of inodes: each blob evicted frees at least its own.
      const inodesShort = room.freeInodes === undefined ? 0 : Math.max(0, (room.minFreeInodes ?? 0) + 1 - room.freeInodes);
      const plan = evictionPlan(this.store.blobs(), { maxBytes: Math.max(0, this.settings.maxBytes - metadataBytes - room.reservedBytes - incoming), minFreeBytes: this.settings.minFreeBytes, freeBytes: (free?.bytes ?? Number.MAX_SAFE_INTEGER) - room.unwrittenBytes - incoming, minFreeBlobs: inodesShort });
      for (const digest of plan) {
        const size = this.store.blobs().find((b) => b.digest === digest)?.size ?? 0;
        if (await this.store.remove(digest)) {
          this.metrics.evictions.inc();
          this.metrics.evictedBytes.inc(size);
          this.tally.evictions++;
          this.tally.evictedBytes += size;
        }
      }
      if (plan.length > 0) this.logger.info({ evicted: plan.length, bytes: this.store.usage().bytes }, 'cache evicted least recently used blobs');
    });
    this.evicting = pass.catch((error: unknown) => this.logger.error({ err: error }, 'cache eviction failed'));
    return this.evicting;
  }

  private async free(): Promise<DiskFree | undefined> {
    try {
      const free = await this.store.free();
      this.lastFreeInodes = free.inodes;
      return free;
    } catch {
      return undefined;
    }
  }

  /**
   * Lets a (rule, repository) read stored content, or throws the upstream's refusal. A link confirmed
   * within reconfirmSeconds (in passthrough mode, with a credential accepted within
   * credentialTTLSeconds) needs nothing; otherwise the upstream is asked (`head`, with the request's
   * credentials). A yes renews the link. A no (any answer but 5xx or 429) is passed on and, with the
   * rule's own credentials, removes the link here and in the shared tier: content deleted or revoked
   * upstream is not served from the cache after that. An upstream that cannot answer leaves a linked
   * digest servable, as a tag's last known digest is.
   */
  async confirmAccess(check: AccessCheck, head: () => Promise<unknown>): Promise<void> {
    const { link } = check;
    const credentialFresh = !check.passthrough || this.credentialConfirmed(check.rule, check.repository, check.credentials);
    if (link && credentialFresh && linkIsFresh(link.confirmedAt, this.now(), this.settings.reconfirmSeconds)) return;
    try {
      await head();
    } catch (error) {
      if (!(error instanceof ContentError) || check.signal.aborted) throw error;
      if (staleEligible(upstreamFailureOf(error.failure, error.details))) {
        if (link && credentialFresh) return;
        throw error;
      }
      if (link && !check.passthrough && (check.kind === 'manifest') === (link.mediaType !== '')) {
        this.logger.info({ rule: check.rule, repository: check.repository, digest: check.digest, status: error.details.status }, 'the upstream no longer confirms cached content: its link is removed');
        await this.store.unlink(check.rule, check.repository, check.digest);
        await this.shared?.removeLink(check.rule, check.repository, check.digest);
      }
      throw error;
    }
    if (check.passthrough) this.confirmCredential(check.rule, check.repository, check.credentials);
    if (link) await this.store.confirmLink(check.rule, check.repository, check.digest);
  }

  /**
   * Forgets what (rule, repository) may read, on this node and in the shared tier: its link to
   * `digest` (and the tag records naming it), or all its links and tag records. Its next pull asks
   * the upstream, as a first one does.
   */
  async purge(rule: string, repository: string, digest?: string): Promise<PurgeOutcome & { readonly shared: 'purged' | 'failed' | 'none' }> {
    const outcome = await this.store.purge(rule, repository, digest);
    const shared = this.shared ? ((await this.shared.purge(rule, repository, digest)) ? 'purged' : 'failed') : 'none';
    if (shared === 'failed') this.logger.warn({ rule, repository, digest, ...outcome }, 'cache purged on this node; the shared tier could not be purged (see its status): run the purge again');
    else this.logger.info({ rule, repository, digest, ...outcome, shared }, 'cache purged');
    return { ...outcome, shared };
  }

  /** passthrough: whether the upstream accepted these credentials for the repository within credentialTTLSeconds. */
  credentialConfirmed(rule: string, repository: string, credentials: UpstreamCredentials | undefined): boolean {
    const at = this.confirmations.get(confirmationKey(rule, repository, credentials));
    return at !== undefined && this.now() - at < this.settings.credentialTTLSeconds * 1000;
  }

  confirmCredential(rule: string, repository: string, credentials: UpstreamCredentials | undefined): void {
    remember(this.confirmations, confirmationKey(rule, repository, credentials), this.now());
  }

  /** revalidate: get: whether the upstream answered a GET for this manifest of the repository (by
   * digest, or by a tag naming it) within tagTTLSeconds. */
  digestConfirmed(rule: string, repository: string, digest: string): boolean {
    const at = this.digestConfirmations.get(`${rule}\0${repository}\0${digest}`);
    return at !== undefined && this.now() - at < this.settings.tagTTLSeconds * 1000;
  }

  confirmDigest(rule: string, repository: string, digest: string): void {
    remember(this.digestConfirmations, `${rule}\0${repository}\0${digest}`, this.now());
  }

  /** Settles when every upload to the shared tier started so far (or by a fill in flight) has ended. */
  async sharing(): Promise<void> {
    // Fills in flight first: each starts its upload when it is stored and linked.
    await Promise.all([...this.flights.values()].map((flight) => flight.stored));
    await Promise.all([...this.publishers.values()]);
    await Promise.all([...this.uploads]);
  }

  /**
   * Lets fills in flight be stored (a blob whose clients already have it is still being flushed
   * and renamed), waiting at most `waitMs`.
   */
  async close(waitMs = 0): Promise<void> {
    const deadline = Date.now() + waitMs;
    const waitFor = async (pending: ReadonlyArray<Promise<unknown>>) => {
      const left = deadline - Date.now();
      if (pending.length === 0 || left <= 0) return;
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([Promise.all(pending), new Promise((resolve) => (timer = setTimeout(resolve, left)))]);
      clearTimeout(timer);
    };
    // Fills first (each may start an upload when stored), then the uploads, in the same bound.
    await waitFor([...this.flights.values()].map((flight) => flight.stored));
    await waitFor([...this.publishers.values()]);
    await waitFor([...this.uploads]);
    await this.shared?.close();
  }

  /** For /status. */
  status(): Record<string, unknown> {
    const usage = this.store.usage();
    return {
      path: this.settings.path,
      bytes: usage.bytes,
      entries: usage.blobs,
      reservedBytes: this.room(undefined, 0).reservedBytes,
      metadataEntries: this.store.metadataEntries(),
      metadataWritable: this.metadataWritable,
      freeInodes: this.lastFreeInodes ?? null,
      minFreeInodes: this.settings.minFreeInodes,
      maxBytes: this.settings.maxBytes,
      minFreeBytes: this.settings.minFreeBytes,
      fillsEnabled: this.fillsEnabled,
      fillsInFlight: this.fillsInFlight,
      hits: this.tally.hit,
      misses: this.tally.miss,
      fromShared: this.tally.shared,
      staleServes: this.tally.stale,
      bypassed: this.tally.bypass,
      upstreamBytesSaved: this.tally.savedBytes,
      evictions: this.tally.evictions,
      evictedBytes: this.tally.evictedBytes,
      fillFailures: this.tally.fillFailures,
      shared: this.shared?.status() ?? null,
    };
  }
}

/** A credential as a hash, for keys kept in memory: they never hold a password. */
export function credentialHash(credentials: UpstreamCredentials | undefined): string {
  return credentials ? createHash('sha256').update(`${credentials.username}\0${credentials.password}`).digest('base64url') : '';
}

/** Sets `key` to `at` as the newest entry, dropping the oldest past CONFIRMATIONS_MAX. */
function remember(confirmations: Map<string, number>, key: string, at: number): void {
  confirmations.delete(key);
  confirmations.set(key, at);
  if (confirmations.size > CONFIRMATIONS_MAX) {
    const oldest = confirmations.keys().next().value;
    if (oldest !== undefined) confirmations.delete(oldest);
  }
}

function confirmationKey(rule: string, repository: string, credentials: UpstreamCredentials | undefined): string {
  return `${rule}\0${repository}\0${credentialHash(credentials)}`;
}
