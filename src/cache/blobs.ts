// Blobs through the node cache (distribution's proxyBlobStore, with one upstream transfer per blob
// however many clients want it): from the store when this (rule, repository) may read it, else
// filled while every client streams from the growing file — from the shared tier when it has the
// blob (or another node is fetching it: one upstream transfer per cluster), else from upstream, and
// then shared. A Range on a blob not stored, a HEAD, and anything the cache cannot take (no room, a
// disk error) are relayed as before.

import { open } from 'node:fs/promises';
import { ContentError, type BlobRequest, type BlobResult, type ContentSource } from '../content/source.js';
import { verifiedBody } from '../content/verify.js';
import type { RuleUpstream } from '../upstream/rule.js';
import { completeExtent, fileBody } from './filebody.js';
import { bodyOfReadable } from './shared/bodies.js';
import { FollowBody } from './shared/follow.js';
import { SegmentPublisher } from './shared/publish.js';
import { EMPTY_BLOB_DIGEST, type SharedClaim } from './policy.js';
import { BlobFlight } from './flight.js';
import type { NodeCache } from './nodecache.js';
import { byteRange } from './policy.js';
import type { LinkState } from './store.js';

/** Where a fill reads from: the shared tier (and whether the store failed the download), and whether
 * this node holds the cluster's claim to fetch the blob from the upstream (and so uploads it after). */
interface SharedSource {
  shared: boolean;
  claimed: boolean;
  failed: boolean;
  /** This node publishes the fill's segments (it announced it): they are removed once it is shared. */
  streamed: boolean;
  /** A follower of another node's fill won its claim at `offset` (FollowBody): set by fill(). */
  tookOver?: (offset: number, size: number) => void;
}

export class CachedBlobs {
  constructor(
    private readonly cache: NodeCache,
    private readonly upstream: ContentSource,
    private readonly rules: ReadonlyMap<string, RuleUpstream>,
  ) {}

  async blob(request: BlobRequest): Promise<BlobResult> {
    const { cache } = this;
    // A blob still filling is read through its fill even once it is stored: the link that lets its
    // (rule, repository) read the stored blob is written just before the fill goes away.
    const filling = request.range === undefined && request.method === 'GET' ? cache.flights.get(request.digest) : undefined;
    if (filling?.joinable) return this.join(filling, request);
    if ((await cache.store.lookup(request.digest)) && (await this.authorizeStored(request))) {
      const stored = await this.fromStore(request);
      if (stored) return stored;
    }
    if (request.range !== undefined || request.method === 'HEAD') return this.relay(request);
    // A fill that turned into a relay is not joined (what it wrote is no longer all there to read).
    const flight = cache.flights.get(request.digest);
    return flight?.joinable ? this.join(flight, request) : this.fill(request);
  }

  /** The upstream a rule's content comes from (RuleUpstream.origin). */
  private origin(rule: string): string {
    return this.rules.get(rule)?.origin ?? '';
  }

  /**
   * Whether a stored blob is served for (rule, repository): with a link (in passthrough mode only to
   * a credential the upstream accepted there recently, and asked again once the link is older than
   * reconfirmSeconds), or when the upstream confirms it now (HEAD, with the request's credentials;
   * its refusal passed on) — but only the upstream the bytes came from. Another upstream's content
   * is not unlocked by this one's HEAD (false): it is fetched through this rule and verified.
   */
  private async authorizeStored(request: BlobRequest): Promise<boolean> {
    const { store } = this.cache;
    const origin = this.origin(request.rule);
    const link = await store.readLinkState(request.rule, request.repository, request.digest, origin);
    if (!link && !(await store.storedFrom(request.digest, origin))) return false;
    await this.confirmAccess(request, link);
    if (!link) await store.link(request.rule, request.repository, request.digest);
    return true;
  }

  /** NodeCache.confirmAccess for a blob, with a HEAD through the request's rule: the length that
   * HEAD stated, when it was asked and stated one. */
  private async confirmAccess(request: BlobRequest, link: LinkState | null): Promise<number | undefined> {
    const passthrough = this.rules.get(request.rule)?.rule.auth.mode === 'passthrough';
    const check = { rule: request.rule, repository: request.repository, digest: request.digest, credentials: request.credentials, signal: request.signal, passthrough, kind: 'blob' as const, link };
    let stated: number | undefined;
    await this.cache.confirmAccess(check, async () => {
      const head = await this.upstream.blob({ ...request, method: 'HEAD', range: undefined });
      const length = Number(head.headers['content-length']);
      if (head.status === 200 && Number.isSafeInteger(length) && length >= 0) stated = length;
      return head;
    });
    return stated;
  }

  /** A link that counts as confirmed now (a shared one, or a fill of this (rule, repository)). */
  private confirmedNow(): LinkState {
    return { mediaType: '', confirmedAt: this.cache.now() };
  }

  /** The stored blob, whole or the range asked for; null when it went away meanwhile (evicted). */
  private async fromStore(request: BlobRequest): Promise<BlobResult | null> {
    const lease = this.cache.store.lease(request.digest);
    if (!lease) return null;
    const range = request.range !== undefined ? byteRange(request.range, lease.size) : undefined;
    const headers: Record<string, string> = {
      'content-type': 'application/octet-stream',
      'accept-ranges': 'bytes',
      'docker-content-digest': request.digest,
      etag: `"${request.digest}"`,
    };
    let start = 0;
    let end = lease.size;
    if (range && request.method === 'GET') {
      ({ start, end } = range);
      headers['content-range'] = `bytes ${start}-${end - 1}/${lease.size}`;
    }
    headers['content-length'] = String(end - start);
    this.cache.count('blob', 'hit', request.method === 'GET' ? end - start : 0);
    this.cache.backfill(request.digest, { rule: request.rule, repository: request.repository, origin: this.origin(request.rule) });
    if (request.method === 'HEAD') {
      lease.release();
      return { status: 200, digest: request.digest, headers, body: undefined, cache: 'hit' };
    }
    let file;
    try {
      file = await open(lease.path, 'r');
    } catch {
      lease.release();
      return null;
    }
    // A stored blob served again is usually in the page cache: read on the event loop while it is.
    const body = fileBody(file, completeExtent(lease.size), { start, end }, () => lease.release(), { syncReads: 'while-cached' });
    return { status: range ? 206 : 200, digest: request.digest, headers, body, cache: 'hit' };
  }

  /** The first client for a blob not stored: one transfer (shared tier or upstream) into the store, read as it lands. */
  private async fill(request: BlobRequest): Promise<BlobResult> {
    const { cache } = this;
    if (!(await cache.mayFill(0))) return this.relay(request);
    const already = cache.flights.get(request.digest); // another client started it meanwhile
    if (already?.joinable) return this.join(already, request);
    const ended = cache.fillStarted();
    const origin = { rule: request.rule, repository: request.repository, origin: this.origin(request.rule) };
    const source: SharedSource = { shared: false, claimed: false, failed: false, streamed: false };
    let stopKeepingClaim: () => void = () => undefined;
    const flight: BlobFlight = new BlobFlight(request.digest, origin, new AbortController(), cache.store, async (outcome) => {
      stopKeepingClaim();
      // Linked before the fill goes away, so that no client in between finds the blob stored but
      // unlinked for this (rule, repository) and asks the upstream again (or fails, if it is down).
      // The bytes came, verified, from this rule's upstream: recorded first, as a link counts only with it.
      if (outcome.stored) await cache.store.addOrigin(request.digest, origin.origin).then(() => cache.store.link(request.rule, request.repository, request.digest)).catch(() => undefined);
      if (cache.flights.get(request.digest) === flight) cache.flights.delete(request.digest);
      ended();
      // A fill this node took over from a stalled filler is shared by this node, as its own.
      if (outcome.stored && (!source.shared || source.claimed)) cache.share(request.digest, origin, source.claimed, source.streamed);
      else if (source.claimed) await cache.shared?.release(request.digest);
      if (!outcome.stored && outcome.corrupt && source.shared) await cache.removeCorruptShared(request.digest, outcome.reason);
      // What this node published of a fill that hashed wrong goes too (not resumed by the next claimant).
      else if (!outcome.stored && outcome.corrupt && source.streamed) cache.dropSegments(request.digest);
      if (outcome.stored) await cache.evict(0);
      else if (flight.relaying) cache.fillRelayed(request.digest);
      else cache.fillFailed(request.digest, outcome.reason);
    }, (failure) => {
      if (source.shared && (failure.corrupt || source.failed)) cache.avoidShared(request.digest);
    });
    cache.flights.set(request.digest, flight);
    const reading = flight.reader();
    reading.catch(() => undefined);
    let keepingClaim = false;
    const keepClaim = () => {
      if (!cache.shared || keepingClaim) return;
      keepingClaim = true;
      let last = -1;
      stopKeepingClaim = cache.shared.keepClaim(request.digest, () => {
        const readable = flight.readable();
        const moved = readable !== last;
        last = readable;
        return moved;
      });
    };
    source.tookOver = (offset, size) => {
      source.claimed = true;
      keepClaim();
      this.publish(flight, source, size, origin.origin, offset);
    };
    let answer: BlobResult;
    try {
      const shared = await this.fromShared(request, flight.controller.signal, source);
      if (source.claimed) keepClaim();
      answer = shared ?? (await this.upstream.blob({ ...request, signal: flight.controller.signal, unverified: true }));
    } catch (error) {
      flight.abandon(error as Error);
      throw error;
    }
    const length = Number(answer.headers['content-length']);
    const known = Number.isSafeInteger(length) && length >= 0;
    // From here on, should this client be relayed after all, its leaving stops the upstream transfer.
    const relayed = () => {
      if (request.signal.aborted) flight.controller.abort();
      else request.signal.addEventListener('abort', () => flight.controller.abort(), { once: true });
    };
    // Room for the announced length (or, chunked, room that grows as it comes): held until the fill ends.
    const reservation = answer.body && answer.status === 200 ? await cache.reserve(known ? length : 0) : undefined;
    if (!answer.body || answer.status !== 200 || !reservation) {
      // Too large for the cache, or its disk is full: this client is relayed, verified as before.
      flight.abandon(new Error('not cached: no room'));
      relayed();
      return this.relayInstead(request, answer, source, known ? length : undefined);
    }
    let fill;
    try {
      fill = await cache.store.startFill(request.digest);
    } catch (error) {
      reservation.release();
      if ((error as NodeJS.ErrnoException).code === 'ENOSPC') cache.diskFull();
      flight.abandon(error as Error);
      relayed();
      return this.relayInstead(request, answer, source, known ? length : undefined);
    }
    flight.start(fill, answer.body, answer.headers, reservation);
    // The cluster's filler, with a length to announce: the other nodes stream its fill as it lands
    // (a length of 0 only for the empty blob: followers refuse any other size-0 announcement).
    if (source.claimed && !source.shared && known && (length > 0 || request.digest === EMPTY_BLOB_DIGEST) && cache.settings.shared?.streamFills !== false) this.publish(flight, source, length, origin.origin, 0);
    const body = await reading;
    if (request.signal.aborted) {
      body.destroy();
      throw new ContentError('unavailable', 'client went away', { status: 499 });
    }
    const outcome = source.shared ? 'shared' : 'miss';
    cache.count('blob', outcome, source.shared && known ? length : 0);
    return { status: 200, digest: request.digest, headers: answer.headers, body, cache: outcome, stored: flight.stored };
  }

  /**
   * Announces this node's fill in its claim and publishes its segments from `from` on (the whole
   * fill, or a takeover's rest). A filler whose fill turned into a relay (no room on its disk)
   * gives its claim up at once, so that a follower takes the fill over without waiting for a stall.
   */
  private publish(flight: BlobFlight, source: SharedSource, size: number, origin: string, from: number): void {
    const { cache } = this;
    const { shared } = cache;
    if (!shared) return;
    source.streamed = true;
    // A reader of the fill from now, before the announcement's round trips: a filler client leaving
    // meanwhile must not abort a fill the followers are told to stream.
    const reading = flight.follow();
    reading.catch(() => undefined);
    cache.publishing(flight.digest, (async () => {
      let announced = false;
      try {
        announced = await shared.announce(flight.digest, { size, origin });
      } finally {
        // Not announced (refused, or the store failed): the reader taken for the publisher is given back.
        if (!announced) void reading.then((reader) => reader.release(), () => undefined);
      }
      if (!announced) return;
      const stop = await new SegmentPublisher(flight, shared, flight.digest, origin, from, size, cache.now, cache.logger, reading).done;
      if (stop === 'relay') await shared.release(flight.digest);
      // Its fill goes on from the upstream (a switch to the taker's chain is not made), and its
      // share() leaves the chain to the taker.
      else if (stop === 'lost-claim') cache.logger.info({ digest: flight.digest }, 'shared cache tier: another node took this node\'s fill over; it stops publishing, and the chain is that node\'s now');
    })());
  }

  /** A fill that cannot be stored: the upstream's answer relayed (verified); a shared download is
   * dropped for the upstream's, so that what a relayed client gets never depends on the tier. */
  private async relayInstead(request: BlobRequest, answer: BlobResult, source: SharedSource, length: number | undefined): Promise<BlobResult> {
    if (!source.shared) return this.verifiedRelay(request, answer, length);
    answer.body?.destroy(new Error('not cached: relayed from the upstream instead'));
    return this.relay(request);
  }

  /**
   * The blob from the shared tier, when it has it or another node's fill of it lands there within
   * the bounded wait, and this (rule, repository) may read it there (a shared link, or the upstream
   * confirming now); undefined to fetch it from the upstream, with `source.claimed` saying whether
   * this node holds the cluster's claim to (and so uploads it after).
   */
  private async fromShared(request: BlobRequest, signal: AbortSignal, source: SharedSource): Promise<BlobResult | undefined> {
    const { shared } = this.cache;
    if (!shared || this.cache.avoidsShared(request.digest)) return undefined;
    let size = await shared.blobSize(request.digest);
    // A second round when the claim went away without the blob (its filler gave the fill up: no
    // room on its disk, an upstream failure): claimed again, so that one node fetches it, not all.
    for (let round = 0; size === undefined && round < 2; round++) {
      if ((await shared.claim(request.digest)) === 'ours') {
        // Another node may have uploaded it and released its claim between the look and the claim.
        size = await shared.blobSize(request.digest);
        if (size === undefined) {
          source.claimed = true;
          // A filler of this rule's upstream that died may have left a chain of segments: followed
          // first, then the upstream from its end (one transfer of what is missing, not of the
          // whole blob). Another upstream's chain is not looked at (its bytes are not this rule's).
          if (this.cache.settings.shared?.streamFills !== false && (await shared.segmentSize(request.digest, this.origin(request.rule), 0)) !== undefined) return this.resumeChain(request, signal, source);
          return undefined;
        }
        await shared.release(request.digest);
      } else if (this.cache.settings.shared?.streamFills !== false) {
        // The fill's signal, not this client's: other clients may have joined the wait.
        const found = await shared.waitForFill(request.digest, signal);
        if (found === undefined) return undefined;
        if ('gone' in found) continue;
        // Another upstream's fill is not followed: this rule fetches from its own, now.
        if ('claim' in found) return found.claim.origin === this.origin(request.rule) ? this.follow(request, signal, source, found.claim) : undefined;
        size = found.size;
      } else {
        size = await shared.waitForBlob(request.digest, signal);
        if (size === undefined) return undefined;
      }
    }
    if (size === undefined) return undefined;
    // The object's size as the store states it is the fill's Content-Length: an empty one is not a
    // blob whose digest is not the empty blob's (a fill of 0 bytes would fail on its first byte,
    // before the client has an answer); it is fetched from the upstream.
    if (size === 0 && request.digest !== EMPTY_BLOB_DIGEST) return undefined;
    const origin = this.origin(request.rule);
    const linked = (await shared.readLink(request.rule, request.repository, request.digest, origin)) !== null;
    // Only the upstream the shared bytes came from may confirm them; else they are fetched through this rule.
    if (!linked && !(await shared.storedFrom(request.digest, origin))) return undefined;
    // A link in the tier says another node fetched it through this rule, not when the upstream last
    // confirmed it: the upstream is asked now (a refusal is passed on; an outage is bridged).
    // Under the fill's signal, not the first client's: its leaving must not fail the others.
    const stated = await this.confirmAccess({ ...request, signal }, linked ? { mediaType: '', confirmedAt: 0 } : null);
    // The tier's size is only the store's word; the upstream's, when it gave one, is the blob's: an
    // object of another size is not the blob (fetched from the upstream rather than cut at its end).
    if (stated !== undefined && stated !== size) {
      this.cache.logger.warn({ digest: request.digest, size, upstreamSize: stated }, 'shared cache tier: the shared blob is not of the size the upstream states; fetching from the upstream');
      return undefined;
    }
    if (!linked) await shared.writeLink(request.rule, request.repository, request.digest);
    // Only the size stated: a download longer than that (the object replaced meanwhile, a store
    // whose stat and read disagree) would fail the fill on its first chunk past it, as an error.
    const stream = await shared.readBlob(request.digest, size > 0 ? { start: 0, end: size - 1 } : undefined, signal);
    if (!stream) return undefined;
    source.shared = true;
    const headers = { 'content-type': 'application/octet-stream', 'content-length': String(size), 'docker-content-digest': request.digest, etag: `"${request.digest}"` };
    return { status: 200, digest: request.digest, headers, body: bodyOfReadable(stream, () => (source.failed = true)), cache: 'shared' };
  }

  /**
   * Another node's streaming fill, followed (shared/follow.ts): once this rule's upstream confirms
   * the request now (a HEAD with its credentials; a refusal is passed on, and nothing streams), a
   * body of the claim's size read from the filler's segments, then the shared blob, or the upstream
   * from where the chain ended (this rule, these credentials) should the store fail or the filler
   * stall. This node's fill hashes every byte, whatever its source.
   */
  private async follow(request: BlobRequest, signal: AbortSignal, source: SharedSource, claim: SharedClaim & { readonly size: number; readonly origin: string }): Promise<BlobResult | undefined> {
    const { cache } = this;
    const shared = cache.shared;
    if (!shared) throw new Error('no shared tier to follow');
    const stated = await this.confirmAccess({ ...request, signal }, null);
    // A claim's size is the Content-Length its followers answer with: one the upstream contradicts
    // (a forged or corrupt claim) is not followed, or every follower's client would be cut at its end.
    if (stated !== undefined && stated !== claim.size) {
      cache.logger.warn({ digest: request.digest, size: claim.size, upstreamSize: stated, node: claim.node }, 'shared cache tier: a fill claim announces a size the upstream does not state; fetching from the upstream');
      return undefined;
    }
    source.shared = true;
    const { size } = claim;
    const body = new FollowBody({
      tier: shared,
      digest: request.digest,
      size,
      origin: claim.origin,
      now: cache.now,
      logger: cache.logger,
      resume: (offset, stop) => this.upstream.blob({ ...request, method: 'GET', signal: AbortSignal.any([signal, stop]), range: `bytes=${offset}-`, unverified: true }),
      onTakeover: (offset) => source.tookOver?.(offset, size),
      onStoreFailure: () => (source.failed = true),
    });
    const headers = { 'content-type': 'application/octet-stream', 'content-length': String(size), 'docker-content-digest': request.digest, etag: `"${request.digest}"` };
    return { status: 200, digest: request.digest, headers, body, cache: 'shared' };
  }

  /**
   * The fill of a blob whose claim this node holds while a chain of segments is in the store (left
   * by a filler that died): the blob's size from the upstream (a HEAD, which also confirms the
   * request), then the chain, then the upstream from where the chain ends, where this node
   * announces its fill and publishes the rest. Undefined (a plain upstream fill) when the upstream
   * gives no length.
   */
  private async resumeChain(request: BlobRequest, signal: AbortSignal, source: SharedSource): Promise<BlobResult | undefined> {
    const { cache } = this;
    const shared = cache.shared;
    if (!shared) return undefined;
    const head = await this.upstream.blob({ ...request, method: 'HEAD', range: undefined, signal });
    const size = Number(head.headers['content-length']);
    if (!Number.isSafeInteger(size) || size < 0 || (size === 0 && request.digest !== EMPTY_BLOB_DIGEST)) return undefined;
    source.shared = true;
    // The chain goes once the blob is shared, whether or not this node adds to it.
    source.streamed = true;
    const origin = this.origin(request.rule);
    const body = new FollowBody({
      tier: shared,
      digest: request.digest,
      size,
      origin,
      now: cache.now,
      logger: cache.logger,
      resume: (offset, stop) => this.upstream.blob({ ...request, method: 'GET', signal: AbortSignal.any([signal, stop]), range: `bytes=${offset}-`, unverified: true }),
      onTakeover: (offset) => source.tookOver?.(offset, size),
      onStoreFailure: () => (source.failed = true),
      ownClaim: true,
    });
    const headers = { 'content-type': 'application/octet-stream', 'content-length': String(size), 'docker-content-digest': request.digest, etag: `"${request.digest}"` };
    return { status: 200, digest: request.digest, headers, body, cache: 'shared' };
  }

  /** Another client for a blob being filled: reads the same fill, once this (rule, repository) may. */
  private async join(flight: BlobFlight, request: BlobRequest): Promise<BlobResult> {
    const reading = flight.reader();
    reading.then((body) => body, () => undefined);
    const sameOrigin = flight.origin.rule === request.rule && flight.origin.repository === request.repository;
    if (!sameOrigin && this.origin(flight.origin.rule) !== this.origin(request.rule)) {
      // Another upstream's bytes: not for this rule unless it may read a stored copy; else its own
      // upstream's, verified.
      void reading.then((body) => body.destroy(), () => undefined);
      if ((await this.cache.store.lookup(request.digest)) && (await this.authorizeStored(request))) {
        const stored = await this.fromStore(request);
        if (stored) return stored;
      }
      return this.relay(request);
    }
    let stored = flight.stored;
    try {
      await this.confirmAccess(request, sameOrigin ? this.confirmedNow() : null);
      if (!sameOrigin) {
        stored = flight.stored.then(async (done) => {
          if (done) await this.cache.store.link(request.rule, request.repository, request.digest).catch(() => undefined);
          return done;
        });
      }
    } catch (error) {
      void reading.then((body) => body.destroy(), () => undefined);
      throw error;
    }
    let body;
    try {
      body = await reading;
    } catch {
      // The fill failed before this client read anything: relay on its own.
      return this.relay(request);
    }
    if (request.signal.aborted) {
      body.destroy();
      throw new ContentError('unavailable', 'client went away', { status: 499 });
    }
    const length = Number(flight.headers['content-length']);
    this.cache.count('blob', 'hit', Number.isSafeInteger(length) ? length : 0);
    return { status: 200, digest: request.digest, headers: flight.headers, body, cache: 'hit', stored };
  }

  private async relay(request: BlobRequest): Promise<BlobResult> {
    this.cache.count('blob', 'bypass');
    return { ...(await this.upstream.blob(request)), cache: 'bypass' };
  }

  /** An answer asked for unverified (to fill), passed on with the digest check the rule asks for. */
  private verifiedRelay(request: BlobRequest, answer: BlobResult, length: number | undefined): BlobResult {
    this.cache.count('blob', 'bypass');
    const verify = answer.body && answer.status === 200 && this.rules.get(request.rule)?.rule.verifyBlobDigests !== false;
    return { ...answer, body: verify && answer.body ? verifiedBody(answer.body, request.digest, length) : answer.body, cache: 'bypass' };
  }
}
