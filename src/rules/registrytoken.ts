// The registry token flow's token (distribution's "Bearer realm=…/token"): what a client that only
// speaks that flow (distribution 2.8 as a pull-through cache) presents instead of its namespace
// credential. Pure: keys come in as bytes, time as seconds.
//
// A token is `pbt1.<payload>.<mac>`: base64url JSON claims (namespace, the `<rule>/<repo>` names it
// may pull, issued-at, expiry) and an HMAC-SHA256 over prefix and payload under a key DERIVED from
// the broker key with its own purpose string (as opsToken is), so that a token is never a namespace
// credential, never the broker key, and one leaked token opens a few repositories for minutes.

import { createHmac, timingSafeEqual } from 'node:crypto';

const TOKEN_PREFIX = 'pbt1.';
const KEY_PURPOSE = 'pullbridge registry token v1';
/** The `service` the proxy names in its challenge and expects at its token endpoint. */
export const REGISTRY_TOKEN_SERVICE = 'pullbridge';
/** How long a token is good for: a pull-through cache asks again when it runs out. */
export const REGISTRY_TOKEN_LIFETIME_SECONDS = 300;
/** Repositories one token may name (distribution asks one per request; this bounds the header). */
export const REGISTRY_TOKEN_MAX_REPOSITORIES = 32;
/** Payloads longer than this are refused before any JSON parsing. */
const PAYLOAD_MAX_CHARS = 16 * 1024;

export interface RegistryTokenClaims {
  /** The namespace whose credential was presented; null for an anonymous token. */
  readonly namespace: string | null;
  /** `<rule>/<repository>` names the token grants pull on. */
  readonly repositories: readonly string[];
  /** Unix seconds. */
  readonly issuedAt: number;
  readonly expiresAt: number;
}

/** The key tokens are signed with under one broker key. */
export function registryTokenKey(brokerKey: Uint8Array): Buffer {
  return createHmac('sha256', brokerKey).update(KEY_PURPOSE).digest();
}

function mac(brokerKey: Uint8Array, signed: string): Buffer {
  return createHmac('sha256', registryTokenKey(brokerKey)).update(signed).digest();
}

/** A token for `claims`, signed under the broker key (the first, signing, key of a set). */
export function signRegistryToken(brokerKey: Uint8Array, claims: RegistryTokenClaims): string {
  const payload = Buffer.from(JSON.stringify({ ns: claims.namespace, rep: claims.repositories, iat: claims.issuedAt, exp: claims.expiresAt })).toString('base64url');
  const signed = TOKEN_PREFIX + payload;
  return `${signed}.${mac(brokerKey, signed).toString('base64url')}`;
}

export type RegistryTokenCheck = { readonly ok: true; readonly claims: RegistryTokenClaims } | { readonly ok: false; readonly reason: string };

const TOKEN_FORMAT = /^pbt1\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{43})$/;

/**
 * Whether `token` was signed under any of the broker keys (each compared in constant time) and is
 * still valid at `nowSeconds`; the claims when so. The reason never repeats the token.
 */
export function verifyRegistryToken(keys: readonly Uint8Array[], token: string, nowSeconds: number): RegistryTokenCheck {
  const m = TOKEN_FORMAT.exec(token);
  if (!m || (m[1] ?? '').length > PAYLOAD_MAX_CHARS) return { ok: false, reason: 'not a pullbridge registry token' };
  const payload = m[1] ?? '';
  const given = Buffer.from(m[2] ?? '', 'base64url');
  let signed = false;
  for (const key of keys) {
    const expected = mac(key, TOKEN_PREFIX + payload);
    if (expected.length === given.length && timingSafeEqual(expected, given)) signed = true;
  }
  if (!signed) return { ok: false, reason: 'bad signature' };
  const claims = parseClaims(Buffer.from(payload, 'base64url').toString('utf8'));
  if (!claims) return { ok: false, reason: 'malformed claims' };
  if (claims.expiresAt <= nowSeconds) return { ok: false, reason: 'expired' };
  // The issuing proxy may be another node's: a minute of clock skew is tolerated, no more.
  if (claims.issuedAt > nowSeconds + 60) return { ok: false, reason: 'issued in the future' };
  return { ok: true, claims };
}

function parseClaims(text: string): RegistryTokenClaims | null {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    return null;
  }
  if (typeof raw !== 'object' || raw === null) return null;
  const { ns, rep, iat, exp } = raw as Record<string, unknown>;
  if (!(ns === null || typeof ns === 'string')) return null;
  if (!Array.isArray(rep) || rep.length > REGISTRY_TOKEN_MAX_REPOSITORIES || !rep.every((r): r is string => typeof r === 'string')) return null;
  if (typeof iat !== 'number' || typeof exp !== 'number' || !Number.isSafeInteger(iat) || !Number.isSafeInteger(exp)) return null;
  return { namespace: ns, repositories: rep, issuedAt: iat, expiresAt: exp };
}

/** Whether the token grants pull on `<rule>/<repository>`. */
export function tokenCovers(claims: RegistryTokenClaims, rule: string, repository: string): boolean {
  return claims.repositories.includes(`${rule}/${repository}`);
}

/** The token of `Authorization: Bearer …`; null when absent or not Bearer. */
export function parseBearerAuthorization(header: string | undefined): string | null {
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header ?? '');
  return m ? (m[1] ?? null) : null;
}

export interface ScopeRequest {
  /** The repository as the client names it (`<rule>/<repo>`), not yet validated. */
  readonly name: string;
  readonly actions: readonly string[];
}

/**
 * The repository scopes of a token request (`scope=repository:<name>:<actions>`, repeated, each
 * possibly space-separated). Other resource types (`registry:catalog:*`) are skipped: this proxy
 * grants pulls only. The name is what lies between the type and the last colon.
 */
export function parseScopes(values: readonly string[]): ScopeRequest[] {
  const scopes: ScopeRequest[] = [];
  for (const value of values) {
    for (const item of value.split(' ')) {
      if (!item.startsWith('repository:')) continue;
      const rest = item.slice('repository:'.length);
      const colon = rest.lastIndexOf(':');
      if (colon <= 0) continue;
      scopes.push({ name: rest.slice(0, colon), actions: rest.slice(colon + 1).split(',').filter(Boolean) });
    }
  }
  return scopes;
}

/** A host as a client may write it in `Host` (name or IP literal, optional port): the realm is built from it. */
const AUTHORITY = /^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(:[0-9]{1,5})?$/;

/**
 * The token endpoint's URL for a client that reached the proxy at `host` over `scheme`, or null
 * when the Host header is not a plain authority (then no Bearer challenge is offered at all).
 */
export function tokenRealm(scheme: 'http' | 'https', host: string | undefined): string | null {
  if (host === undefined || !AUTHORITY.test(host)) return null;
  return `${scheme}://${host}/token`;
}

/** Why a presented token was refused (RFC 6750's error codes). */
export type TokenErrorCode = 'invalid_token' | 'insufficient_scope';

/**
 * `Bearer realm=…,service=…[,scope=…][,error=…]`, as distribution's challenge reads it. The error
 * tells a client on the token flow to ask for a new token rather than retry with the one it has
 * (containerd does so from 1.6.25/1.7.8 on).
 */
export function bearerChallenge(realm: string, scope?: string, error?: TokenErrorCode): string {
  return `Bearer realm="${realm}",service="${REGISTRY_TOKEN_SERVICE}"${scope !== undefined ? `,scope="${scope}"` : ''}${error !== undefined ? `,error="${error}"` : ''}`;
}
