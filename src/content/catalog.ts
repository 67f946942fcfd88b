// One page of a rule's upstream catalog (`GET /v2/_catalog?n=&last=`), read within the proxy's
// memory budget. Many registries have no catalog for a client like the proxy (Docker Hub, cloud
// registries, Harbor for non-admins: 404, 401 or 403 for the `registry:catalog:*` scope, or
// UNSUPPORTED): those answer `none`, which the catalog walk skips. Failures (unreachable, 5xx,
// 429, an answer that is not a catalog) are ContentErrors: a mirroring tool must not take a
// missing rule for deleted repositories.

import { UpstreamAuthError, type UpstreamCredentials } from '../upstream/authorizer.js';
import { headerValue, type UpstreamResponse } from '../upstream/client.js';
import type { RuleUpstream } from '../upstream/rule.js';
import { failureOf, readWithin, upstreamError } from './passthrough.js';
import { ContentError, type BufferAllowance } from './source.js';

/** The most one upstream catalog page may take (an upstream that ignores `n` answers every name:
 * about 16 000 names of the longest kind, far more of usual ones). */
export const CATALOG_PAGE_LIMIT_BYTES = 4 * 1024 * 1024;
/** The token scope of the catalog (distribution's). */
export const CATALOG_SCOPE = 'registry:catalog:*';

export type CatalogPage =
  /** The upstream's names as it sent them (the caller sorts and filters); `hasNext`: it linked a next page. */
  | { readonly kind: 'page'; readonly names: readonly unknown[]; readonly hasNext: boolean }
  /** The upstream has no catalog for these credentials: `reason` for the access log. */
  | { readonly kind: 'none'; readonly reason: string };

export interface CatalogPageRequest {
  readonly n: number | undefined;
  readonly last: string | undefined;
  readonly credentials: UpstreamCredentials | undefined;
  readonly signal: AbortSignal;
  /** The page is accounted here while it is read and parsed, and given back after. */
  readonly buffers: BufferAllowance;
}

export async function readCatalogPage(upstream: RuleUpstream, request: CatalogPageRequest): Promise<CatalogPage> {
  try {
    let up = await ask(upstream, request, request.n);
    if (up.statusCode === 400 && request.n !== undefined) {
      // An upstream whose catalog.maxentries is below the n asked refuses it (PAGINATION_NUMBER_INVALID):
      // ask for its default page size instead, and follow its Link.
      const error = await upstreamError(up);
      if (!hasErrorCode(error.details.registryBody, 'PAGINATION_NUMBER_INVALID')) return refusal(error, up.statusCode);
      up = await ask(upstream, request, undefined);
    }
    if (up.unauthorized) {
      void up.body.dump();
      return { kind: 'none', reason: `the upstream refused the catalog scope (${up.statusCode})` };
    }
    if (up.statusCode !== 200) {
      if (up.statusCode >= 300 && up.statusCode < 400) {
        void up.body.dump();
        throw new ContentError('unavailable', `upstream answered the catalog with a redirect (${up.statusCode})`, { status: 502 });
      }
      return refusal(await upstreamError(up), up.statusCode);
    }
    const allowance = request.buffers.detached();
    try {
      const body = await readWithin(up, allowance, CATALOG_PAGE_LIMIT_BYTES);
      if (body === null) throw new ContentError('invalid', `the upstream catalog page of rule "${upstream.rule.name}" is larger than ${CATALOG_PAGE_LIMIT_BYTES} bytes`, { status: 502 });
      let parsed: unknown;
      try {
        parsed = JSON.parse(body.toString('utf8'));
      } catch {
        parsed = undefined;
      }
      const names = parsed !== null && typeof parsed === 'object' ? (parsed as { repositories?: unknown }).repositories : undefined;
      if (!Array.isArray(names)) throw new ContentError('invalid', `the upstream catalog of rule "${upstream.rule.name}" is not a catalog document`, { status: 502 });
      return { kind: 'page', names, hasNext: linksNext(headerValue(up.headers.link)) };
    } finally {
      allowance.release();
    }
  } catch (error) {
    if (error instanceof ContentError || request.signal.aborted) throw error;
    // The token endpoint refusing these credentials or this scope: no catalog for them.
    if (error instanceof UpstreamAuthError && error.kind !== 'unavailable') return { kind: 'none', reason: `the upstream's token endpoint refused the catalog scope: ${error.message}` };
    throw failureOf(error as Error);
  }
}

function ask(upstream: RuleUpstream, request: CatalogPageRequest, n: number | undefined): Promise<UpstreamResponse> {
  const query = new URLSearchParams();
  if (n !== undefined) query.set('n', String(n));
  if (request.last !== undefined) query.set('last', request.last);
  const search = query.size > 0 ? `?${query.toString()}` : '';
  return upstream.client.fetch({ method: 'GET', path: `/v2/_catalog${search}`, headers: { accept: 'application/json' }, scope: CATALOG_SCOPE, credentials: request.credentials, signal: request.signal, lane: 'metadata' });
}

/** No catalog here (401, 403, 404, 405, or UNSUPPORTED whatever the status), or a failure to pass on. */
function refusal(error: ContentError, status: number): CatalogPage {
  if ([401, 403, 404, 405].includes(status) || hasErrorCode(error.details.registryBody, 'UNSUPPORTED')) return { kind: 'none', reason: `the upstream answered the catalog with ${status}` };
  if (status === 429) throw error;
  throw new ContentError(error.failure === 'refused' ? 'refused' : 'unavailable', `the upstream answered the catalog with ${status}`, { status: 502, ...(error.details.retryAfter ? { retryAfter: error.details.retryAfter } : {}) });
}

function hasErrorCode(registryBody: string | undefined, code: string): boolean {
  if (registryBody === undefined) return false;
  try {
    const errors = (JSON.parse(registryBody) as { errors?: unknown }).errors;
    return Array.isArray(errors) && errors.some((e) => e !== null && typeof e === 'object' && (e as { code?: unknown }).code === code);
  } catch {
    return false;
  }
}

/** Whether a Link header has a `rel="next"` target (RFC 5988; distribution writes exactly one).
 * Split on commas first: no pattern here may backtrack over a long header from the upstream. */
function linksNext(link: string | undefined): boolean {
  return link !== undefined && link.split(',').some((part) => /^\s*<[^>]*>/.test(part) && /;\s*rel="?next"?\s*(?:;|$)/i.test(part));
}
