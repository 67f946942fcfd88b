// Manifests through the node cache (distribution's proxyManifestStore and proxyTagService). By
// digest: from the store when this (rule, repository) may read it, else fetched once however many
// clients ask at the same time, and stored. By tag: the upstream is asked at most once per
// tagTTLSeconds, with the complete Accept list whatever the client sent (the record is every
// client's; a client that does not accept what it names is answered as the upstream answers it);
// when it cannot answer (down, timing out, 5xx, 429) the last digest it gave is served for up to
// staleIfErrorSeconds, with a Warning; when it answers no (any other 4xx), so does the proxy.
// A rule's `revalidate` says how it is asked: get (the default) re-checks a tag, and a manifest
// served by digest on the same schedule, with a GET conditional on the digest held, so that a
// policy the registry enforces on GETs only (Harbor's) is honoured; head asks a tag with a HEAD.
// With a shared tier, a manifest missing here is read from there (when this (rule, repository) has
// a link there), one fetched upstream is shared, and so is a tag the upstream confirmed: a node that
// never saw a tag can serve it while the upstream is down.

import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { ContentError, type ContentSource, type ManifestRequest, type ManifestResult } from '../content/source.js';
import { MANIFEST_ACCEPT, MANIFEST_LIMIT_BYTES } from '../content/passthrough.js';
import type { RuleUpstream } from '../upstream/rule.js';
import { credentialHash, type NodeCache } from './nodecache.js';
import { bridgingTag, staleEligible, tagFallback, tagIsFresh, upstreamFailureOf, type TagRecord } from './policy.js';
import type { LinkState } from './store.js';

/** A tag as one ask of the upstream resolved it, for every client that shared the ask. */
interface ResolvedTag {
  /** What the upstream answered (with a body when it was a GET). */
  readonly head: ManifestResult;
  readonly record: TagRecord;
  /** Whether the body it brought was stored here. */
  readonly stored: boolean;
  /** Whether this client's request made the ask (the others shared it). */
  readonly first: boolean;
}

export class CachedManifests {
  constructor(
    private readonly cache: NodeCache,
    private readonly upstream: ContentSource,
    private readonly rules: ReadonlyMap<string, RuleUpstream>,
  ) {}

  manifest(request: ManifestRequest): Promise<ManifestResult> {
    return request.byDigest ? this.byDigest(request) : this.byTag(request);
  }

  private passthrough(request: ManifestRequest): boolean {
    return this.rules.get(request.rule)?.rule.auth.mode === 'passthrough';
  }

  /** Whether the request's credential needs no upstream check (not passthrough, or accepted recently). */
  private credentialFresh(request: ManifestRequest): boolean {
    return !this.passthrough(request) || this.cache.credentialConfirmed(request.rule, request.repository, request.credentials);
  }

  private confirmed(request: ManifestRequest): void {
    if (this.passthrough(request)) this.cache.confirmCredential(request.rule, request.repository, request.credentials);
  }

  /** Whether the rule re-checks what the cache holds with GETs (revalidate: get). */
  private revalidatesWithGet(request: ManifestRequest): boolean {
    return this.rules.get(request.rule)?.rule.revalidate !== 'head';
  }

  /** Whether a manifest may be served by digest without asking the upstream about it first. */
  private digestFresh(request: ManifestRequest, digest: string): boolean {
    return !this.revalidatesWithGet(request) || this.cache.digestConfirmed(request.rule, request.repository, digest);
  }

  /** The upstream a rule's content comes from (RuleUpstream.origin): a link counts only for content from there. */
  private origin(request: ManifestRequest): string {
    return this.rules.get(request.rule)?.origin ?? '';
  }

  /** What is shared or backfilled for the request's (rule, repository). */
  private sharedLink(request: ManifestRequest, mediaType: string | undefined): { rule: string; repository: string; origin: string; mediaType: string } {
    return { rule: request.rule, repository: request.repository, origin: this.origin(request), mediaType: mediaType ?? '' };
  }

  private async byDigest(request: ManifestRequest): Promise<ManifestResult> {
    const link = await this.cache.store.readLinkState(request.rule, request.repository, request.reference, this.origin(request));
    // A blob's link (no media type) is no manifest's: a manifest request for a layer's digest is asked upstream.
    if (link !== null && link.mediaType !== '' && acceptable(request.accept, link.mediaType)) {
      // In passthrough mode with a credential not accepted recently, and once the link is older than
      // reconfirmSeconds, the upstream is asked (HEAD) first.
      const check = { rule: request.rule, repository: request.repository, digest: request.reference, credentials: request.credentials, signal: request.signal, passthrough: this.passthrough(request), kind: 'manifest' as const, link: link satisfies LinkState };
      await this.cache.confirmAccess(check, () => this.upstream.manifest({ ...request, method: 'HEAD' }));
      const stored = await this.fromStore(request, request.reference, link.mediaType);
      if (stored) {
        await this.revalidate(request, stored);
        this.cache.count('manifest', 'hit', stored.size);
        this.cache.backfill(stored.digest, this.sharedLink(request, stored.mediaType));
        return stored;
      }
    }
    if (request.method === 'HEAD') {
      this.cache.count('manifest', 'bypass');
      const answer = await this.upstream.manifest(request);
      this.confirmed(request);
      return { ...answer, cache: 'bypass' };
    }
    return this.fetchAndStore(request, request.reference);
  }

  /**
   * Asks the upstream about a stored manifest before serving it by digest, when that is due: a
   * passthrough credential not accepted within credentialTTLSeconds, or (revalidate: get) a digest
   * not confirmed by a GET within tagTTLSeconds, asked with a GET conditional on it (HEAD otherwise).
   * Throws when the upstream answers no. When it cannot answer and the credential needed no check,
   * the stored copy is served, as it always was: a digest names content that cannot change.
   */
  private async revalidate(request: ManifestRequest, stored: ManifestResult): Promise<void> {
    const credentialFresh = this.credentialFresh(request);
    if (credentialFresh && this.digestFresh(request, stored.digest)) return;
    const get = this.revalidatesWithGet(request);
    try {
      await this.upstream.manifest(get ? { ...request, method: 'GET', ifNoneMatch: stored } : { ...request, method: 'HEAD' });
    } catch (error) {
      if (!credentialFresh || !(error instanceof ContentError) || request.signal.aborted || !staleEligible(upstreamFailureOf(error.failure, error.details))) throw error;
      return;
    }
    this.confirmed(request);
    if (get) this.cache.confirmDigest(request.rule, request.repository, stored.digest);
  }

  private async byTag(request: ManifestRequest): Promise<ManifestResult> {
    const { store, settings, now } = this.cache;
    const record = await store.readTag(request.rule, request.repository, request.reference);
    if (tagIsFresh(record, now(), settings) && this.credentialFresh(request)) {
      if (!acceptable(request.accept, record.mediaType)) return this.unrecorded(request);
      const stored = await this.storedFor(request, record.digest);
      if (stored) {
        this.cache.count('manifest', 'hit', stored.size);
        // What this node knows of the tag, for nodes that will not reach the upstream (backfill).
        void this.cache.shared?.shareTag(request.rule, request.repository, request.reference, record);
        this.cache.backfill(stored.digest, this.sharedLink(request, stored.mediaType));
        return stored;
      }
    }
    let resolved: ResolvedTag;
    try {
      resolved = await this.resolveOnce(request, record);
    } catch (error) {
      if (!(error instanceof ContentError) || request.signal.aborted) throw error;
      const known = bridgingTag(record, await this.cache.shared?.readTag(request.rule, request.repository, request.reference), now(), settings);
      const fallback = tagFallback(known, upstreamFailureOf(error.failure, error.details), now(), settings);
      const servable = fallback.serve === 'stale' && acceptable(request.accept, fallback.record.mediaType) && this.credentialFresh(request);
      const stale = servable ? ((await this.storedFor(request, fallback.record.digest)) ?? (await this.fromShared(request, fallback.record.digest))) : null;
      if (fallback.serve !== 'stale' || !stale) throw error;
      this.cache.count('manifest', 'stale', stale.size);
      const warning = `110 pullbridge "Response is Stale: the upstream failed (${error.message}); ${request.reference} last confirmed ${fallback.ageSeconds} s ago"`;
      return { ...stale, cache: 'stale', warning };
    }
    const { head, first } = resolved;
    const { mediaType } = resolved.record;
    if (head.body) {
      // The upstream answered with a GET's body (revalidate: get, or a HEAD without a digest), kept
      // by the ask; the clients that shared it were answered by it.
      if (!acceptable(request.accept, mediaType)) return this.unrecorded(request);
      const outcome = first ? (resolved.stored ? 'miss' : 'bypass') : 'hit';
      this.cache.count('manifest', outcome, first ? 0 : head.size);
      return { ...head, body: request.method === 'HEAD' ? undefined : head.body, cache: outcome };
    }
    if (!acceptable(request.accept, mediaType)) return this.unrecorded(request);
    // The upstream just named this digest for the repository: a stored copy may be served for it, if
    // it came from this upstream (another's is fetched by digest through this rule, and verified).
    let linkedType = await store.readLink(request.rule, request.repository, head.digest, this.origin(request));
    if (linkedType !== null) await store.confirmLink(request.rule, request.repository, head.digest);
    else if (await store.storedFrom(head.digest, this.origin(request))) {
      await store.link(request.rule, request.repository, head.digest, mediaType);
      linkedType = mediaType;
    }
    if (linkedType !== null) {
      const stored = await this.fromStore(request, head.digest, linkedType);
      if (stored) {
        this.cache.count('manifest', 'hit', stored.size);
        this.cache.backfill(stored.digest, this.sharedLink(request, stored.mediaType));
        return stored;
      }
    }
    if (request.method === 'HEAD') {
      this.cache.count('manifest', 'bypass');
      return { ...head, cache: 'bypass' };
    }
    return this.fetchAndStore({ ...request, reference: head.digest, byDigest: true }, head.digest);
  }

  /**
   * What a tag names upstream (resolve), asked once for every client asking at the same time (a
   * rollout's first pulls of a tag on a node: one upstream request, not one per Pod), and recorded:
   * a body it brought is stored and shared, then the tag's record written, before the ask ends, so
   * that a client coming after it finds both. The ask is every asking client's: it holds memory of
   * its own and is not ended by the first client leaving (timeouts bound it); each client then
   * reserves its copy of a body it brought.
   */
  private async resolveOnce(request: ManifestRequest, record: TagRecord | undefined): Promise<ResolvedTag> {
    const { store, settings, now } = this.cache;
    const who = this.passthrough(request) ? credentialHash(request.credentials) : '';
    const key = `${request.rule}\0${request.repository}\0${request.reference}\0${who}`;
    const flights = this.cache.tagFlights;
    let flight = flights.get(key) as Promise<Omit<ResolvedTag, 'first'>> | undefined;
    const first = !flight;
    if (!flight) {
      const buffers = request.buffers.detached();
      const asked = (async (): Promise<Omit<ResolvedTag, 'first'>> => {
        try {
          // An ask that ended since this client read the record wrote it first: no second ask.
          const current = await store.readTag(request.rule, request.repository, request.reference);
          if (tagIsFresh(current, now(), settings) && current.confirmedAt !== record?.confirmedAt && this.credentialFresh(request)) {
            return { head: { digest: current.digest, size: current.size, mediaType: current.mediaType || undefined, body: undefined }, record: current, stored: false };
          }
          const head = await this.resolve({ ...request, buffers, signal: new AbortController().signal }, record);
          this.confirmed(request);
          if (this.revalidatesWithGet(request)) this.cache.confirmDigest(request.rule, request.repository, head.digest);
          const confirmed: TagRecord = { digest: head.digest, mediaType: head.mediaType ?? record?.mediaType ?? '', size: head.size, confirmedAt: now() };
          void this.cache.shared?.shareTag(request.rule, request.repository, request.reference, confirmed);
          const stored = head.body ? await this.keepFetched(request, head) : false;
          await store.writeTag(request.rule, request.repository, request.reference, confirmed);
          return { head, record: confirmed, stored };
        } finally {
          buffers.release();
          flights.delete(key);
        }
      })();
      flight = asked;
      flights.set(key, asked);
    }
    const resolved = await flight;
    if (resolved.head.body && request.method === 'GET') request.buffers.reserve(resolved.head.body.length);
    return { ...resolved, first };
  }

  /**
   * What a tag names upstream, asked with the complete Accept list, never the client's: the record
   * is every client's (one client accepting image manifests only would otherwise pin a multi-arch
   * tag to one platform for the node, every TTL, through outages and in the shared tier). A HEAD,
   * or (revalidate: get) a GET, conditional on the digest last recorded when it is stored here.
   */
  private resolve(request: ManifestRequest, record: TagRecord | undefined): Promise<ManifestResult> {
    const asked = { ...request, accept: MANIFEST_ACCEPT };
    if (!this.revalidatesWithGet(request)) return this.upstream.manifest({ ...asked, method: 'HEAD' });
    const held = record && this.cache.store.has(record.digest) ? { ifNoneMatch: record } : {};
    return this.upstream.manifest({ ...asked, method: 'GET', ...held });
  }

  /**
   * A tag for a client that does not accept what it names (an index, to a client asking for image
   * manifests only): asked upstream with the client's own Accept and answered as the registry
   * answers it (distribution converts a Docker manifest list to its linux/amd64 manifest, and
   * answers 404 for an OCI index); neither recorded as the tag nor stored.
   */
  private async unrecorded(request: ManifestRequest): Promise<ManifestResult> {
    this.cache.count('manifest', 'bypass');
    const answer = await this.upstream.manifest(request);
    this.confirmed(request);
    return { ...answer, cache: 'bypass' };
  }

  /** The stored manifest `digest` if this (rule, repository) has a link to it. */
  private async storedFor(request: ManifestRequest, digest: string): Promise<ManifestResult | null> {
    const mediaType = await this.cache.store.readLink(request.rule, request.repository, digest, this.origin(request));
    return mediaType === null ? null : this.fromStore(request, digest, mediaType);
  }

  /** Reads a stored manifest (checked against its digest: it is small) within the request's buffer allowance. */
  private async fromStore(request: ManifestRequest, digest: string, mediaType: string): Promise<ManifestResult | null> {
    const lease = this.cache.store.lease(digest);
    if (!lease) return null;
    try {
      if (lease.size > MANIFEST_LIMIT_BYTES) return null;
      if (request.method === 'HEAD') return { digest, size: lease.size, mediaType: mediaType || undefined, body: undefined, cache: 'hit' };
      request.buffers.reserve(lease.size);
      const body = await readFile(lease.path).catch(() => null);
      if (!body || digestOf(digest, body) !== digest) return null;
      return { digest, size: body.length, mediaType: mediaType || undefined, body, cache: 'hit' };
    } finally {
      lease.release();
    }
  }

  /** GET by digest, one upstream request for every client asking at once; stored when it fits. */
  private async fetchAndStore(request: ManifestRequest, digest: string): Promise<ManifestResult> {
    const who = this.passthrough(request) ? credentialHash(request.credentials) : '';
    const key = `${request.rule}\0${request.repository}\0${digest}\0${who}`;
    const flights = this.cache.manifestFlights;
    let flight = flights.get(key) as Promise<{ answer: ManifestResult; stored: boolean }> | undefined;
    const first = !flight;
    if (!flight) {
      // The fetch is every asking client's: it holds memory of its own (not the first client's, which
      // is given back when that client leaves) until it ends; then each client reserves its copy.
      const buffers = request.buffers.detached();
      flight = (async () => {
        try {
          // revalidate: get: the upstream's word first (it may refuse a GET), the tier if it cannot answer.
          const confirmed = this.digestFresh(request, digest);
          const shared = confirmed ? await this.fromShared({ ...request, buffers }, digest) : null;
          if (shared) return { answer: shared, stored: true };
          let answer: ManifestResult;
          try {
            // Not the first client's signal: its leaving must not fail the others (timeouts bound it).
            answer = await this.upstream.manifest({ ...request, method: 'GET', reference: digest, byDigest: true, signal: new AbortController().signal, buffers });
          } catch (error) {
            const shared = !confirmed && error instanceof ContentError && staleEligible(upstreamFailureOf(error.failure, error.details)) ? await this.fromShared({ ...request, buffers }, digest) : null;
            if (!shared) throw error;
            return { answer: shared, stored: true };
          }
          this.confirmed(request);
          if (this.revalidatesWithGet(request)) this.cache.confirmDigest(request.rule, request.repository, digest);
          const stored = await this.keepFetched(request, answer);
          return { answer, stored };
        } finally {
          buffers.release();
          flights.delete(key);
        }
      })();
      flights.set(key, flight);
    }
    const { answer, stored } = await flight;
    if (answer.body && request.method === 'GET') request.buffers.reserve(answer.body.length);
    // The first client's fetch is a miss only if it filled the cache; else it was relayed (bypass),
    // as a blob is. The others were answered by that one fetch.
    const outcome = answer.cache === 'shared' ? 'shared' : first ? (stored ? 'miss' : 'bypass') : 'hit';
    this.cache.count('manifest', outcome, first ? 0 : answer.size);
    return { ...answer, body: request.method === 'HEAD' ? undefined : answer.body, cache: outcome };
  }

  /**
   * A manifest from the shared tier, when this (rule, repository) has a link to it there and the
   * request's credential needs no upstream check; stored and linked here too. Null otherwise (or when
   * what the tier holds does not match its digest).
   */
  private async fromShared(request: ManifestRequest, digest: string): Promise<ManifestResult | null> {
    const { shared } = this.cache;
    if (!shared || !this.credentialFresh(request)) return null;
    const mediaType = await shared.readLink(request.rule, request.repository, digest, this.origin(request));
    // A blob's link (no media type) is no manifest's.
    if (mediaType === null || mediaType === '' || !acceptable(request.accept, mediaType)) return null;
    // Sized first, all the same: a manifest request must never read a layer.
    const size = await shared.blobSize(digest);
    if (size === undefined || size > MANIFEST_LIMIT_BYTES) return null;
    request.buffers.reserve(size);
    const body = await shared.readSmallBlob(digest, MANIFEST_LIMIT_BYTES);
    if (!body || body.length > MANIFEST_LIMIT_BYTES || digestOf(digest, body) !== digest) return null;
    const answer: ManifestResult = { digest, size: body.length, mediaType: mediaType || undefined, body, cache: 'shared' };
    // The tier's link is no confirmation by the upstream: the local link asks it at its next use.
    await this.store(request, answer, 'not yet');
    return { ...answer, body: request.method === 'HEAD' ? undefined : body };
  }

  /** A manifest fetched from the upstream: stored here (whether it was is returned) and shared with
   * the other nodes through the tier. */
  private async keepFetched(request: ManifestRequest, answer: ManifestResult): Promise<boolean> {
    const stored = await this.store(request, answer);
    if (answer.body) this.cache.shareManifest(answer.digest, answer.body, this.sharedLink(request, answer.mediaType));
    return stored;
  }

  /** Writes a fetched manifest into the store and links it, when the cache takes content; whether it did. */
  private async store(request: ManifestRequest, answer: ManifestResult, confirmed: 'now' | 'not yet' = 'now'): Promise<boolean> {
    if (!answer.body) return false;
    // Counted with the fills in flight while it is written, as a blob's fill is.
    const reservation = await this.cache.reserve(answer.body.length);
    if (!reservation) return false;
    try {
      if (!(await this.cache.store.lookup(answer.digest))) {
        const fill = await this.cache.store.startFill(answer.digest);
        try {
          await fill.append(answer.body);
        } catch (error) {
          // Nothing half-written stays behind (the file, its handle, its hash state).
          await fill.abort((error as Error).message);
          throw error;
        }
        reservation.wrote(fill.written);
        const outcome = await fill.finish();
        if (!outcome.stored) return false;
      }
      // Fetched through this rule and checked against its digest: its upstream vouches for it.
      await this.cache.store.addOrigin(answer.digest, this.origin(request));
      await this.cache.store.link(request.rule, request.repository, answer.digest, answer.mediaType ?? '', confirmed);
      return true;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOSPC') this.cache.diskFull();
      this.cache.fillFailed(answer.digest, (error as Error).message);
      return false;
    } finally {
      reservation.release();
    }
  }
}

/** Whether a client's Accept takes `mediaType` (no Accept, or a wildcard, takes anything). */
function acceptable(accept: string | undefined, mediaType: string): boolean {
  if (accept === undefined || mediaType === '') return true;
  const types = accept.split(',').map((part) => (part.split(';')[0] ?? '').trim().toLowerCase());
  return types.includes('*/*') || types.includes(mediaType.toLowerCase());
}

function digestOf(digest: string, body: Buffer): string {
  const algorithm = digest.slice(0, digest.indexOf(':'));
  return `${algorithm}:${createHash(algorithm).update(body).digest('hex')}`;
}

/** How asking the upstream failed, for the stale-if-error rule. */
