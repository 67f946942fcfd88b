// Manifests through the node cache (distribution's proxyManifestStore and proxyTagService). By
// digest: from the store when this (rule, repository) may read it, else fetched once however many
// clients ask at the same time, and stored. By tag: the upstream is asked (HEAD) at most once per
// tagTTLSeconds; when it cannot answer (down, timing out, 5xx) the last digest it gave is served
// for up to staleIfErrorSeconds, with a Warning; when it answers no (401/403/404), so does the proxy.
// With a shared tier, a manifest missing here is read from there (when this (rule, repository) has
// a link there), one fetched upstream is shared, and so is a tag the upstream confirmed: a node that
// never saw a tag can serve it while the upstream is down.

import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { ContentError, type ContentSource, type ManifestRequest, type ManifestResult } from '../content/source.js';
import { MANIFEST_LIMIT_BYTES } from '../content/passthrough.js';
import type { RuleUpstream } from '../upstream/rule.js';
import { credentialHash, type NodeCache } from './nodecache.js';
import { newerTag, tagFallback, tagIsFresh, type TagFailure, type TagRecord } from './policy.js';

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

  private async byDigest(request: ManifestRequest): Promise<ManifestResult> {
    const mediaType = await this.cache.store.readLink(request.rule, request.repository, request.reference);
    if (mediaType !== null && acceptable(request.accept, mediaType)) {
      if (!this.credentialFresh(request)) {
        await this.upstream.manifest({ ...request, method: 'HEAD' });
        this.confirmed(request);
      }
      const stored = await this.fromStore(request, request.reference, mediaType);
      if (stored) {
        this.cache.count('manifest', 'hit', stored.size);
        this.cache.backfill(stored.digest, { rule: request.rule, repository: request.repository, mediaType: stored.mediaType });
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

  private async byTag(request: ManifestRequest): Promise<ManifestResult> {
    const { store, settings, now } = this.cache;
    const record = await store.readTag(request.rule, request.repository, request.reference);
    const usable = record !== undefined && acceptable(request.accept, record.mediaType) ? record : undefined;
    if (usable && tagIsFresh(usable, now(), settings) && this.credentialFresh(request)) {
      const stored = await this.storedFor(request, usable.digest);
      if (stored) {
        this.cache.count('manifest', 'hit', stored.size);
        // What this node knows of the tag, for nodes that will not reach the upstream (backfill).
        void this.cache.shared?.shareTag(request.rule, request.repository, request.reference, usable);
        this.cache.backfill(stored.digest, { rule: request.rule, repository: request.repository, mediaType: stored.mediaType });
        return stored;
      }
    }
    let head: ManifestResult;
    try {
      head = await this.upstream.manifest({ ...request, method: 'HEAD' });
    } catch (error) {
      if (!(error instanceof ContentError) || request.signal.aborted) throw error;
      const known = newerTag(usable, await this.sharedTag(request));
      const fallback = tagFallback(known, tagFailureOf(error), now(), settings);
      const stale = fallback.serve === 'stale' && this.credentialFresh(request) ? ((await this.storedFor(request, fallback.record.digest)) ?? (await this.fromShared(request, fallback.record.digest))) : null;
      if (fallback.serve !== 'stale' || !stale) throw error;
      this.cache.count('manifest', 'stale', stale.size);
      const warning = `110 pullbridge "Response is Stale: the upstream failed (${error.message}); ${request.reference} last confirmed ${fallback.ageSeconds} s ago"`;
      return { ...stale, cache: 'stale', warning };
    }
    this.confirmed(request);
    const mediaType = head.mediaType ?? usable?.mediaType ?? '';
    const record_: TagRecord = { digest: head.digest, mediaType, size: head.size, confirmedAt: now() };
    void this.cache.shared?.shareTag(request.rule, request.repository, request.reference, record_);
    if (head.body) {
      // The upstream answered the HEAD with a GET's body (it gave no digest): keep it.
      const outcome = (await this.store(request, head)) ? 'miss' : 'bypass';
      await store.writeTag(request.rule, request.repository, request.reference, record_);
      this.cache.count('manifest', outcome);
      return { ...head, body: request.method === 'HEAD' ? undefined : head.body, cache: outcome };
    }
    await store.writeTag(request.rule, request.repository, request.reference, record_);
    // The upstream just named this digest for the repository: a stored copy may be served for it.
    if (await store.lookup(head.digest)) {
      const linkedType = await store.readLink(request.rule, request.repository, head.digest);
      if (linkedType === null) await store.link(request.rule, request.repository, head.digest, mediaType);
      const stored = await this.fromStore(request, head.digest, linkedType ?? mediaType);
      if (stored) {
        this.cache.count('manifest', 'hit', stored.size);
        this.cache.backfill(stored.digest, { rule: request.rule, repository: request.repository, mediaType: stored.mediaType });
        return stored;
      }
    }
    if (request.method === 'HEAD') {
      this.cache.count('manifest', 'bypass');
      return { ...head, cache: 'bypass' };
    }
    return this.fetchAndStore({ ...request, reference: head.digest, byDigest: true }, head.digest);
  }

  /** The stored manifest `digest` if this (rule, repository) has a link to it. */
  private async storedFor(request: ManifestRequest, digest: string): Promise<ManifestResult | null> {
    const mediaType = await this.cache.store.readLink(request.rule, request.repository, digest);
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
      flight = (async () => {
        try {
          const shared = await this.fromShared(request, digest);
          if (shared) return { answer: shared, stored: true };
          // Not the first client's signal: its leaving must not fail the others (timeouts bound it).
          const answer = await this.upstream.manifest({ ...request, method: 'GET', reference: digest, byDigest: true, signal: new AbortController().signal });
          this.confirmed(request);
          const stored = await this.store(request, answer);
          if (answer.body) this.cache.shareManifest(answer.digest, answer.body, { rule: request.rule, repository: request.repository, mediaType: answer.mediaType ?? '' });
          return { answer, stored };
        } finally {
          flights.delete(key);
        }
      })();
      flights.set(key, flight);
    }
    const { answer, stored } = await flight;
    if (!first && answer.body) request.buffers.reserve(answer.body.length);
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
    const mediaType = await shared.readLink(request.rule, request.repository, digest);
    if (mediaType === null || !acceptable(request.accept, mediaType)) return null;
    // Sized first: a blob link names a layer too, and a manifest request for it must not read it.
    const size = await shared.blobSize(digest);
    if (size === undefined || size > MANIFEST_LIMIT_BYTES) return null;
    request.buffers.reserve(size);
    const body = await shared.readSmallBlob(digest);
    if (!body || body.length > MANIFEST_LIMIT_BYTES || digestOf(digest, body) !== digest) return null;
    const answer: ManifestResult = { digest, size: body.length, mediaType: mediaType || undefined, body, cache: 'shared' };
    await this.store(request, answer);
    return { ...answer, body: request.method === 'HEAD' ? undefined : body };
  }

  /** The shared tier's record of a tag, when it is one the request accepts. */
  private async sharedTag(request: ManifestRequest): Promise<TagRecord | undefined> {
    const record = await this.cache.shared?.readTag(request.rule, request.repository, request.reference);
    return record !== undefined && acceptable(request.accept, record.mediaType) ? record : undefined;
  }

  /** Writes a fetched manifest into the store and links it, when the cache takes content; whether it did. */
  private async store(request: ManifestRequest, answer: ManifestResult): Promise<boolean> {
    if (!answer.body) return false;
    // Counted with the fills in flight while it is written, as a blob's fill is.
    const reservation = await this.cache.reserve(answer.body.length);
    if (!reservation) return false;
    try {
      if (!(await this.cache.store.lookup(answer.digest))) {
        const fill = await this.cache.store.startFill(answer.digest);
        await fill.append(answer.body);
        reservation.wrote(fill.written);
        const outcome = await fill.finish();
        if (!outcome.stored) return false;
      }
      await this.cache.store.link(request.rule, request.repository, answer.digest, answer.mediaType ?? '');
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

/** How asking the upstream about a tag failed, for the stale-if-error rule. */
function tagFailureOf(error: ContentError): TagFailure {
  switch (error.failure) {
    case 'not-found':
      return 'not-found';
    case 'unauthorized':
      return 'unauthorized';
    case 'denied':
      return 'denied';
    case 'unavailable':
      return error.details.status === 504 ? 'timeout' : error.details.status >= 500 && error.details.registryBody !== undefined ? 'server-error' : 'unreachable';
    default:
      return 'server-error';
  }
}
