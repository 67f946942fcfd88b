// Content straight from each rule's upstream, nothing kept: manifests checked against their digest,
// blobs streamed (and verified as they pass), tag lists read and parsed. Every failure becomes a
// ContentError.

import { createHash } from 'node:crypto';
import { UpstreamAuthError } from '../upstream/authorizer.js';
import { digestError } from '../reference/reference.js';
import { headerValue, type UpstreamRequest, type UpstreamResponse } from '../upstream/client.js';
import type { RuleUpstream } from '../upstream/rule.js';
import { ForwardProxyRefused } from '../upstream/transport.js';
import { ContentError, type BlobRequest, type BlobResult, type BufferAllowance, type ContentFailure, type ContentRequest, type ContentSource, type ManifestRequest, type ManifestResult, type TagsRequest, type TagsResult } from './source.js';
import { appliedArtifactType, FILTERS_APPLIED_HEADER, filterReferrers } from './referrers.js';
import { isSignedSchema1, schema1Payload } from './schema1.js';
import { verifiedBody } from './verify.js';

/** containerd refuses manifests over 4 MiB; nothing larger is a manifest. */
export const MANIFEST_LIMIT_BYTES = 4 * 1024 * 1024;
const ERROR_BODY_LIMIT = 64 * 1024;
/** Reserved for a buffered body whose length the upstream did not announce, adjusted once read. */
const UNKNOWN_LENGTH_RESERVE = 256 * 1024;
/** Every manifest type a container runtime pulls: a client's own Accept when it sends none, and
 * what the node cache resolves a tag with (so that what it records is what a runtime would get). */
export const MANIFEST_ACCEPT = [
  'application/vnd.oci.image.index.v1+json',
  'application/vnd.docker.distribution.manifest.list.v2+json',
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.docker.distribution.manifest.v2+json',
].join(', ');
const BLOB_HEADERS = ['content-type', 'content-length', 'content-range', 'accept-ranges', 'content-encoding', 'docker-content-digest', 'etag', 'last-modified'];

type ContentKind = 'manifest' | 'blob' | 'tags' | 'referrers';

/** An OCI 1.1 referrers request, straight to the rule's upstream (never cached: see docs/proxy.md). */
export interface ReferrersRequest extends ContentRequest {
  readonly digest: string;
  readonly artifactType: string | undefined;
  /** The client's query (artifactType, and whatever the upstream's next-page link carried), passed on re-encoded. */
  readonly query: string;
  readonly buffers: BufferAllowance;
  /** The largest index read whole. */
  readonly limit: number;
}

export interface ReferrersResult {
  /** The index, filtered by artifactType when asked for (by the upstream, or else by the proxy). */
  readonly body: Buffer;
  /** The OCI-Filters-Applied to answer with: the upstream's, or `artifactType` when the proxy filtered. */
  readonly filtersApplied: string | undefined;
  /** The next page, when the upstream links one on the same path (as TagsResult.nextPage). */
  readonly nextPage: TagsResult['nextPage'];
}

/**
 * The upstream's referrers of a digest. An upstream without the API answers 404: a ContentError
 * 'not-found' (with the upstream's registry error document, when it sent one) — the caller says what
 * that means to its client.
 */
export async function upstreamReferrers(upstream: RuleUpstream, request: ReferrersRequest): Promise<ReferrersResult> {
  const path = `/v2/${request.repository}/referrers/${request.digest}`;
  const forwarded = new URLSearchParams(request.query);
  if (request.artifactType !== undefined) forwarded.set('artifactType', request.artifactType);
  const query = forwarded.size > 0 ? `?${forwarded.toString()}` : '';
  try {
    const up = await upstream.client.fetch({ ...upstreamRequest(request), method: 'GET', path: `${path}${query}`, headers: { accept: 'application/vnd.oci.image.index.v1+json' }, lane: 'metadata' });
    await refuseFailure(up, 'referrers');
    const read = await readWithin(up, request.buffers, request.limit);
    if (read === null) throw new ContentError('invalid', `the referrers index is larger than ${request.limit} bytes`, { status: 502, note: 'referrers index too large' });
    const upstreamFilters = headerValue(up.headers[FILTERS_APPLIED_HEADER]);
    let body = read;
    let filtersApplied = upstreamFilters;
    if (request.artifactType !== undefined && !appliedArtifactType(upstreamFilters)) {
      // The spec lets a registry ignore the filter; the client asked for it, so the proxy applies it.
      const filtered = filterReferrers(read, request.artifactType);
      if (filtered === null) throw new ContentError('invalid', 'the upstream answered a referrers document that is not an image index', { status: 502, note: 'referrers answer is not an index' });
      body = filtered;
      filtersApplied = 'artifactType';
    }
    return { body, filtersApplied, nextPage: nextPage(headerValue(up.headers.link), upstream.rule.upstream, path) };
  } catch (error) {
    if (error instanceof ContentError || request.signal.aborted) throw error;
    throw failureOf(error as Error);
  }
}

export class UpstreamContent implements ContentSource {
  constructor(private readonly upstreams: ReadonlyMap<string, RuleUpstream>) {}

  manifest(request: ManifestRequest): Promise<ManifestResult> {
    return this.withUpstream(request, async (upstream) => {
      const ask = timed(upstream, request, {
        path: `/v2/${request.repository}/manifests/${request.reference}`,
        headers: { accept: request.accept ?? MANIFEST_ACCEPT, ...(request.ifNoneMatch && request.method === 'GET' ? { 'if-none-match': `"${request.ifNoneMatch.digest}"` } : {}) },
        lane: 'metadata',
      });
      if (request.method === 'HEAD') {
        const answered = await headManifest(await ask('HEAD'), request);
        if (answered) return answered;
        // Without a digest and a length from upstream, GET and compute them: clients trust both.
      }
      const up = await ask('GET');
      if (up.statusCode === 304 && request.ifNoneMatch) {
        // Not modified: the tag (or digest) still names the manifest the caller holds.
        await up.body.dump();
        const { digest, size, mediaType } = request.ifNoneMatch;
        return { digest, size, mediaType, body: undefined };
      }
      await refuseFailure(up, 'manifest');
      const body = await readWithin(up, request.buffers, MANIFEST_LIMIT_BYTES);
      if (body === null) throw new ContentError('invalid', `upstream manifest is larger than ${MANIFEST_LIMIT_BYTES} bytes`, { status: 502 });
      const algorithm = request.byDigest ? request.reference.slice(0, request.reference.indexOf(':')) : 'sha256';
      const mediaType = headerValue(up.headers['content-type']);
      // A signed schema1 manifest is named by its payload's digest (the bytes vary with each signing).
      const named = isSignedSchema1(mediaType) ? schema1Payload(body) : body;
      if (named === null) throw new ContentError('invalid', 'upstream answered a signed schema1 manifest whose signed payload cannot be read', { status: 502, note: 'schema1 manifest without a readable signed payload' });
      const digest = `${algorithm}:${createHash(algorithm).update(named).digest('hex')}`;
      if (request.byDigest && digest !== request.reference) {
        throw new ContentError('invalid', `upstream manifest does not match ${request.reference}`, { status: 502, note: `manifest digest mismatch: got ${digest}` });
      }
      // A digest header must be a digest, and (in the algorithm the bytes were hashed with) theirs.
      const header = headerValue(up.headers['docker-content-digest']) ?? '';
      namedDigest(up, 'manifest', request.byDigest || header.startsWith(`${algorithm}:`) ? digest : undefined);
      return { digest, size: body.length, mediaType, body };
    });
  }

  blob(request: BlobRequest): Promise<BlobResult> {
    return this.withUpstream(request, async (upstream) => {
      // identity: the bytes must hash to the digest; never let a hop compress or decompress them.
      const headers: Record<string, string> = { 'accept-encoding': 'identity' };
      if (request.range) headers.range = request.range;
      const ask = timed(upstream, request, { path: `/v2/${request.repository}/blobs/${request.digest}`, headers, lane: 'blob' });
      const up = await ask(request.method);
      await refuseFailure(up, 'blob', [200, 206]);
      try {
        namedDigest(up, 'blob', request.digest);
      } catch (error) {
        up.body.destroy();
        throw error;
      }
      if (up.statusCode === 206 && !request.range) {
        // A part passed on as the whole blob would skip the digest check (it only covers a 200).
        up.body.destroy();
        throw new ContentError('invalid', `upstream answered a partial body (206) for ${request.digest} without a Range request`, { status: 502, note: 'upstream answered 206 to a request without Range' });
      }
      const out: Record<string, string> = {};
      for (const name of BLOB_HEADERS) {
        const value = headerValue(up.headers[name]);
        if (value !== undefined) out[name] = value;
      }
      out['docker-content-digest'] = request.digest;
      if (request.method === 'HEAD') {
        // A HEAD the storage answered only as a GET (see UpstreamClient): keep the headers, drop the body.
        up.body.destroy();
        return { status: 200, digest: request.digest, headers: out, body: undefined };
      }
      const length = Number(out['content-length']);
      const verify = up.statusCode === 200 && upstream.rule.verifyBlobDigests && request.unverified !== true;
      const body = verify ? verifiedBody(up.body, request.digest, Number.isSafeInteger(length) && length >= 0 ? length : undefined) : up.body;
      return { status: up.statusCode, digest: request.digest, headers: out, body };
    });
  }

  tags(request: TagsRequest): Promise<TagsResult> {
    return this.withUpstream(request, async (upstream) => {
      const forwarded = new URLSearchParams();
      if (request.n !== null) forwarded.set('n', request.n);
      if (request.last !== null) forwarded.set('last', request.last);
      const search = forwarded.size > 0 ? `?${forwarded.toString()}` : '';
      const path = `/v2/${request.repository}/tags/list`;
      const up = await upstream.client.fetch({ ...upstreamRequest(request), method: 'GET', path: `${path}${search}`, headers: { accept: 'application/json' }, lane: 'metadata' });
      await refuseFailure(up, 'tags');
      const body = await readWithin(up, request.buffers, MANIFEST_LIMIT_BYTES);
      let list: TagsResult['list'];
      try {
        list = JSON.parse(body === null ? '' : body.toString('utf8')) as TagsResult['list'];
      } catch {
        throw new ContentError('invalid', 'upstream tag list is not valid JSON', { status: 502 });
      }
      return { list, nextPage: nextPage(headerValue(up.headers.link), upstream.rule.upstream, path) };
    });
  }

  /** Runs `fetch` with the rule's upstream; anything thrown on the way becomes a ContentError,
   * except once the client has gone away (the shell says so itself). */
  private async withUpstream<T>(request: ContentRequest, fetch: (upstream: RuleUpstream) => Promise<T>): Promise<T> {
    const upstream = this.upstreams.get(request.rule);
    if (!upstream) throw new ContentError('not-found', `no registry rule "${request.rule}" on this proxy`, { status: 404 });
    try {
      return await fetch(upstream);
    } catch (error) {
      if (error instanceof ContentError || request.signal.aborted) throw error;
      throw failureOf(error as Error);
    }
  }
}

function upstreamRequest(request: ContentRequest): Pick<UpstreamRequest, 'scope' | 'credentials' | 'signal'> {
  return { scope: `repository:${request.repository}:pull`, credentials: request.credentials, signal: request.signal };
}

/** Asks the upstream, telling the request how long the answer took since the first ask. */
function timed(upstream: RuleUpstream, request: ContentRequest, fixed: Pick<UpstreamRequest, 'path' | 'headers' | 'lane'>): (method: 'GET' | 'HEAD') => Promise<UpstreamResponse> {
  const started = performance.now();
  return async (method) => {
    const up = await upstream.client.fetch({ ...upstreamRequest(request), ...fixed, method });
    request.onUpstreamAnswer?.((performance.now() - started) / 1000);
    return up;
  };
}

/** A manifest's HEAD answered from the upstream's headers, when they give a digest and a length. */
async function headManifest(head: UpstreamResponse, request: ManifestRequest): Promise<ManifestResult | undefined> {
  const length = headerValue(head.headers['content-length']);
  // 405: some registries refuse HEAD on manifests; fall through to a GET.
  await refuseFailure(head, 'manifest', [200, 405]);
  await head.body.dump();
  if (head.statusCode !== 200) return undefined;
  // The digest becomes a cache key and a tag record: a digest by the grammar, the one asked for.
  const digest = namedDigest(head, 'manifest', request.byDigest ? request.reference : undefined);
  if (!digest || !length || !(Number(length) > 0)) return undefined;
  return { digest, size: Number(length), mediaType: headerValue(head.headers['content-type']), body: undefined };
}

/**
 * The digest an upstream's Docker-Content-Digest names, undefined without one; a 502 when it is not
 * a digest by the grammar (known algorithm, exact hex length, lower case) or not `expected` (the
 * digest asked for, or the one the bytes hash to). Its value is quoted in the access log only.
 */
function namedDigest(up: UpstreamResponse, kind: ContentKind, expected: string | undefined): string | undefined {
  const digest = headerValue(up.headers['docker-content-digest']);
  if (digest === undefined || digest === '') return undefined;
  const reason = digestError(digest);
  if (reason === null && (expected === undefined || digest === expected)) return digest;
  const what = reason !== null ? 'a Docker-Content-Digest that is not a valid digest' : `a Docker-Content-Digest other than ${expected}`;
  const note = `upstream ${kind} Docker-Content-Digest refused: ${reason ?? `${JSON.stringify(digest)}, want ${expected}`}`;
  throw new ContentError('invalid', `upstream answered the ${kind} request with ${what}`, { status: 502, note: note.length > 300 ? `${note.slice(0, 300)}…` : note });
}

/**
 * Reads a body the proxy must hold whole within the memory the request is allowed: reserved before
 * (the announced length, or an estimate), adjusted once read. Null when it is larger than `limit`.
 */
export async function readWithin(up: UpstreamResponse, buffers: BufferAllowance, limit: number): Promise<Buffer | null> {
  const declared = Number(headerValue(up.headers['content-length']));
  if (Number.isSafeInteger(declared) && declared > limit) {
    up.body.destroy();
    return null;
  }
  const estimate = Number.isSafeInteger(declared) && declared >= 0 && declared <= limit ? declared : UNKNOWN_LENGTH_RESERVE;
  try {
    buffers.reserve(estimate);
  } catch (error) {
    up.body.destroy();
    throw error;
  }
  // A body longer than announced (or of unknown length) is accounted as it grows, doubling.
  let reserved = estimate;
  const grow = (size: number) => {
    if (size <= reserved) return;
    reserved = Math.min(limit, Math.max(size, reserved * 2));
    buffers.resize(reserved);
  };
  const body = await up.body.readAll(limit, estimate === declared ? declared : undefined, grow);
  if (body !== null) buffers.resize(body.length);
  return body;
}

/** Throws when the upstream refused or failed (anything but the `ok` statuses). */
async function refuseFailure(up: UpstreamResponse, kind: ContentKind, ok: readonly number[] = [200]): Promise<void> {
  if (up.statusCode >= 300 && up.statusCode < 400 && !ok.includes(up.statusCode)) {
    // Only blob reads may be redirected (to storage, followed by the upstream client).
    void up.body.dump();
    throw new ContentError('unavailable', `upstream answered a ${kind} request with a redirect (${up.statusCode}); only blob reads may be redirected`, { status: 502 });
  }
  if (up.unauthorized) {
    void up.body.dump();
    throw new ContentError('unauthorized', 'the upstream registry refused the credentials', { status: 401 });
  }
  if (!ok.includes(up.statusCode)) throw await upstreamError(up);
}

/** An upstream error answer, its own registry error document kept to pass on, and its Retry-After. */
export async function upstreamError(up: UpstreamResponse): Promise<ContentError> {
  // The status is the answer; its body only explains it. An error body cut short (distribution 2.8
  // announces a 416's Content-Length as the blob's, then sends one line) is no reason to answer 502.
  const text = (await up.body.readAll(ERROR_BODY_LIMIT).catch(() => null))?.toString('utf8') ?? '';
  const retryAfter = headerValue(up.headers['retry-after']);
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  const registryBody = parsed && typeof parsed === 'object' && Array.isArray((parsed as { errors?: unknown }).errors) ? text : undefined;
  const status = up.statusCode;
  const failure: ContentFailure = status === 404 ? 'not-found' : status === 429 ? 'too-many-requests' : status === 403 ? 'denied' : status >= 400 && status < 500 ? 'refused' : 'unavailable';
  const contentRange = status === 416 ? headerValue(up.headers['content-range']) : undefined;
  const message = status === 416 ? 'upstream answered 416: the range asked for is not satisfiable' : `upstream answered ${status}`;
  return new ContentError(failure, message, { status, ...(retryAfter ? { retryAfter } : {}), ...(registryBody !== undefined ? { registryBody } : {}), ...(contentRange !== undefined ? { contentRange } : {}) });
}

/** What went wrong reaching the upstream: auth, a timeout, or no way there. */
export function failureOf(error: Error): ContentError {
  if (error instanceof UpstreamAuthError) {
    if (error.kind === 'rejected') return new ContentError('unauthorized', error.message, { status: 401, note: error.message });
    // An answer, not an outage: never bridged with what the cache holds.
    if (error.kind === 'refused') return new ContentError('refused', `upstream authentication failed: ${error.message}`, { status: 502, note: error.message });
    return new ContentError('unavailable', `upstream authentication failed: ${error.message}`, { status: 502, note: error.message });
  }
  // Who refused, said as it is: the forwarding proxy, not the registry.
  if (error instanceof ForwardProxyRefused) return new ContentError('unavailable', error.message, { status: 502, note: error.message });
  const code = (error as { code?: string }).code ?? '';
  const timeout = code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'UND_ERR_HEADERS_TIMEOUT' || code === 'UND_ERR_BODY_TIMEOUT';
  return new ContentError('unavailable', `upstream ${timeout ? 'timed out' : 'unreachable'}: ${code || error.message}`, { status: timeout ? 504 : 502, note: error.message });
}

/** The next page of a tag list, when the upstream's Link points at the same path (it may be absolute). */
function nextPage(link: string | undefined, upstream: string, path: string): TagsResult['nextPage'] {
  const m = link ? /<([^>]*)>(.*)/.exec(link) : null;
  if (!m) return undefined;
  const next = new URL(m[1] ?? '', upstream);
  return next.pathname === path ? { query: next.search, linkParameters: m[2] ?? '' } : undefined;
}
