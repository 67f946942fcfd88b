// Request path → what is asked for. Pure. Repository names contain slashes, so the kind is found
// from the end: the last /manifests/, /blobs/ or /tags/list.

import { digestError, isValidRepositoryPath, isValidTag, NAME_TOTAL_LENGTH_MAX } from '../reference/reference.js';
import { registryError, type RegistryError } from './errors.js';

export type Route =
  | { readonly kind: 'base' }
  /** `/v2/_catalog`: every rule's repositories the client may list (`_` starts no rule name). */
  | { readonly kind: 'catalog'; readonly query: string }
  | { readonly kind: 'manifest'; readonly rule: string; readonly name: string; readonly reference: string; readonly byDigest: boolean }
  | { readonly kind: 'blob'; readonly rule: string; readonly name: string; readonly digest: string }
  | { readonly kind: 'tags'; readonly rule: string; readonly name: string; readonly query: string }
  /** The OCI 1.1 referrers of a digest, `…/referrers/<digest>[?artifactType=T]` (GET only); `query` as the client sent it. */
  | { readonly kind: 'referrers'; readonly rule: string; readonly name: string; readonly digest: string; readonly artifactType: string | undefined; readonly query: string };

export type RouteResult = { readonly ok: true; readonly route: Route } | { readonly ok: false; readonly error: RegistryError };

const bad = (status: number, code: Parameters<typeof registryError>[1], message: string): { readonly ok: false; readonly error: RegistryError } => ({ ok: false, error: registryError(status, code, message) });

/**
 * Splits `rule/name…` into the rule (first segment) and the upstream repository name, if valid:
 * the grammar's, and at most 255 characters as clients write it (`rule/name`), as distribution
 * limits names. (Names reach token scopes and logs; unbounded ones are a memory lever.)
 */
export function splitRuleName(full: string): { rule: string; name: string } | null {
  const slash = full.indexOf('/');
  if (slash <= 0 || slash === full.length - 1 || full.length > NAME_TOTAL_LENGTH_MAX) return null;
  const name = full.slice(slash + 1);
  return isValidRepositoryPath(name) ? { rule: full.slice(0, slash), name } : null;
}

/**
 * Parses a request target (`/v2/...` with optional query). Anything that is not a plain, valid
 * distribution path is refused: absolute-form targets, percent-encoding (no valid name, tag or
 * digest needs it; it is how traversal and encoded slashes are smuggled), dot segments.
 */
export function parseRoute(method: string, target: string): RouteResult {
  if (method !== 'GET' && method !== 'HEAD') return bad(405, 'UNSUPPORTED', `method ${method} is not supported: this is a pull-only proxy`);
  const referrers = referrersRoute(method, target);
  if (referrers !== null) return referrers;
  if (!target.startsWith('/')) return bad(400, 'NAME_INVALID', 'request target must be a path (this is not a forward proxy)');
  const q = target.indexOf('?');
  const path = q === -1 ? target : target.slice(0, q);
  const query = q === -1 ? '' : target.slice(q + 1);
  if (path.includes('%')) return bad(400, 'NAME_INVALID', 'percent-encoded characters are not allowed in registry paths');
  if (path.includes('\\') || /\/\.\.?(\/|$)/.test(path) || path.includes('//')) return bad(400, 'NAME_INVALID', 'path contains empty or dot segments');
  if (path === '/v2/' || path === '/v2') return { ok: true, route: { kind: 'base' } };
  if (!path.startsWith('/v2/')) return bad(404, 'UNSUPPORTED', 'not a registry API path');
  if (path === '/v2/_catalog') return { ok: true, route: { kind: 'catalog', query } };
  const rest = path.slice('/v2/'.length);

  if (rest.endsWith('/tags/list')) {
    const parts = splitRuleName(rest.slice(0, -'/tags/list'.length));
    if (!parts) return bad(400, 'NAME_INVALID', `invalid repository name (the grammar's, at most ${NAME_TOTAL_LENGTH_MAX} characters)`);
    return { ok: true, route: { kind: 'tags', ...parts, query } };
  }
  const manifests = rest.lastIndexOf('/manifests/');
  const blobs = rest.lastIndexOf('/blobs/');
  if (manifests === -1 && blobs === -1) return bad(404, 'UNSUPPORTED', 'unsupported registry endpoint');
  const isManifest = manifests > blobs;
  const cut = isManifest ? manifests : blobs;
  const parts = splitRuleName(rest.slice(0, cut));
  if (!parts) return bad(400, 'NAME_INVALID', `invalid repository name (the grammar's, at most ${NAME_TOTAL_LENGTH_MAX} characters)`);
  const tail = rest.slice(cut + (isManifest ? '/manifests/' : '/blobs/').length);
  if (isManifest) {
    const byDigest = tail.includes(':');
    if (byDigest) {
      const reason = digestError(tail);
      if (reason) return bad(400, 'DIGEST_INVALID', reason);
    } else if (!isValidTag(tail)) {
      return bad(400, 'TAG_INVALID', 'invalid tag');
    }
    return { ok: true, route: { kind: 'manifest', ...parts, reference: tail, byDigest } };
  }
  const reason = digestError(tail);
  if (reason) return bad(400, 'DIGEST_INVALID', reason);
  return { ok: true, route: { kind: 'blob', ...parts, digest: tail } };
}

/** A media type as OCI writes artifactType (RFC 6838 names). */
const MEDIA_TYPE = /^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}\/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$/;

/** A referrers request (its path's last endpoint segment is /referrers/), parsed; null for any other path. */
function referrersRoute(method: string, target: string): RouteResult | null {
  const q = target.indexOf('?');
  const path = q === -1 ? target : target.slice(0, q);
  const at = path.lastIndexOf('/referrers/');
  if (!path.startsWith('/v2/') || at === -1 || at < path.lastIndexOf('/manifests/') || at < path.lastIndexOf('/blobs/') || path.endsWith('/tags/list')) return null;
  if (method !== 'GET') return bad(405, 'UNSUPPORTED', 'the referrers API answers GET');
  if (path.includes('%') || path.includes('\\') || /\/\.\.?(\/|$)/.test(path) || path.includes('//')) return bad(400, 'NAME_INVALID', 'path contains percent-encoding, empty or dot segments');
  const parts = splitRuleName(path.slice('/v2/'.length, at));
  if (!parts) return bad(400, 'NAME_INVALID', `invalid repository name (the grammar's, at most ${NAME_TOTAL_LENGTH_MAX} characters)`);
  const digest = path.slice(at + '/referrers/'.length);
  const reason = digestError(digest);
  if (reason) return bad(400, 'DIGEST_INVALID', reason);
  const query = q === -1 ? '' : target.slice(q + 1);
  const artifactType = new URLSearchParams(query).get('artifactType') ?? undefined;
  if (artifactType !== undefined && !MEDIA_TYPE.test(artifactType)) return bad(400, 'UNSUPPORTED', 'artifactType must be a media type');
  return { ok: true, route: { kind: 'referrers', ...parts, digest, artifactType, query } };
}

/** Where the admission resolver's questions live on the operations port (never the registry port). */
export const ADMISSION_PREFIX = '/admission/';

export type AdmissionRoute =
  /** An anonymous manifest HEAD through the rule's transport: `/admission/probe/v2/<rule>/<repo>/manifests/<ref>`. */
  | { readonly kind: 'probe'; readonly rule: string; readonly name: string; readonly reference: string }
  /** A manifest or a blob with the namespace's authorization: `/admission/v2/<registry path>`; and the
   * OCI referrers of a digest: `/admission/v2/<rule>/<repo>/referrers/<digest>[?artifactType=T]`. */
  | Extract<Route, { kind: 'manifest' | 'blob' | 'referrers' }>;

export type AdmissionRouteResult = { readonly ok: true; readonly route: AdmissionRoute } | { readonly ok: false; readonly error: RegistryError };

/**
 * Parses an admission resolver request target: the registry grammar of parseRoute under
 * ADMISSION_PREFIX, plus the probe.
 */
export function parseAdmissionRoute(method: string, target: string): AdmissionRouteResult {
  const probe = target.startsWith(`${ADMISSION_PREFIX}probe/v2/`);
  if (!probe && !target.startsWith(`${ADMISSION_PREFIX}v2/`)) return bad(404, 'UNSUPPORTED', `not an admission endpoint: ${ADMISSION_PREFIX}probe/v2/<rule>/<repository>/manifests/<reference>, or ${ADMISSION_PREFIX}v2/<rule>/<repository>/{manifests,blobs,referrers}/…`);
  const rest = target.slice(probe ? `${ADMISSION_PREFIX}probe`.length : ADMISSION_PREFIX.length - 1);
  const routed = parseRoute(method, rest);
  if (!routed.ok) return routed;
  const route = routed.route;
  if (probe) return route.kind === 'manifest' ? { ok: true, route: { kind: 'probe', rule: route.rule, name: route.name, reference: route.reference } } : bad(404, 'UNSUPPORTED', 'the probe asks for a manifest: …/manifests/<reference>');
  if (route.kind === 'manifest' || route.kind === 'blob' || route.kind === 'referrers') return { ok: true, route };
  return bad(404, 'UNSUPPORTED', 'admission asks for manifests, blobs and referrers only');
}
