// Upstream authentication: Basic, and the Bearer token flow (challenge → token endpoint → retry),
// with tokens cached per realm/service/scope/credential until shortly before they expire.
// Credentials are only ever sent to the registry's own origin or a realm the rule lists.
//
// Repository names, and so token scopes, are chosen by clients: a token is cached only once the
// upstream honoured it (a 2xx or 3xx), and the cache is an LRU bounded by entries and bytes.

import { createHash } from 'node:crypto';
import type { Dispatcher } from 'undici';
import { dispatchRequest } from './body.js';
import type { Challenge } from './challenge.js';

/** What the upstream is asked with: the rule's own credentials, or a client's in passthrough mode. */
export interface UpstreamCredentials {
  readonly username: string;
  readonly password: string;
}

const basicAuthorization = (c: UpstreamCredentials): string => `Basic ${Buffer.from(`${c.username}:${c.password}`).toString('base64')}`;

export class UpstreamAuthError extends Error {
  constructor(
    message: string,
    /** 'rejected': the credentials were refused; 'refused': the token endpoint answered no otherwise
     * (another 4xx: a scope it will not grant, a repository it does not know); 'unavailable': the
     * token endpoint could not be used (unreachable, 5xx, 429, a malformed answer). */
    readonly kind: 'rejected' | 'refused' | 'unavailable',
  ) {
    super(message);
  }
}

interface CachedToken {
  readonly token: string;
  readonly expiresAt: number;
}

/** Tokens without expires_in live 60 s (the distribution default); refresh 10% or 5 s early. */
const DEFAULT_TOKEN_SECONDS = 60;
const TOKEN_BODY_LIMIT = 1024 * 1024;
/** Bounds of the token cache, and of tokens fetched but not yet honoured by the upstream. */
export const TOKEN_CACHE_ENTRIES = 1000;
export const TOKEN_CACHE_BYTES = 4 * 1024 * 1024;
const PENDING_TOKENS = 64;

/**
 * Whether a token realm may receive the credentials meant for the registry at `upstream`: only the
 * upstream's exact origin (scheme, host and port) or an origin the rule lists in
 * `auth.tokenRealms`. Never guessed from domain names: the last two labels of `corp.azurecr.io`
 * or `registry.corp.co.uk` name a shared suffix, not an owner.
 */
export function realmTrusted(upstream: URL, realm: URL, tokenRealms: readonly string[] = []): boolean {
  return realm.origin === upstream.origin || tokenRealms.some((trusted) => new URL(trusted).origin === realm.origin);
}

export interface AuthorizerOptions {
  readonly upstream: URL;
  readonly dispatcher: Dispatcher;
  /**
   * For realms the rule does not trust (another origin, not listed): an upstream must not be able
   * to make the proxy ask the node, the metadata endpoint or the private network for a "token".
   * `refuseHost` checks literal addresses; `untrusted` checks the address connected.
   */
  readonly untrusted?: { readonly dispatcher: Dispatcher; refuseHost(hostname: string): string | null };
  /** Origins besides the upstream's own that may receive credentials as token realms. */
  readonly tokenRealms?: readonly string[];
  readonly now?: () => number;
}

interface TokenEntry extends CachedToken {
  readonly key: string;
}

/** A Map kept in use order, bounded by entries and by the bytes of keys and tokens. */
class TokenCache {
  private readonly entries = new Map<string, CachedToken>();
  private bytes = 0;

  get size(): number {
    return this.entries.size;
  }

  get(key: string): CachedToken | undefined {
    const entry = this.entries.get(key);
    if (entry) {
      this.entries.delete(key);
      this.entries.set(key, entry);
    }
    return entry;
  }

  set(key: string, token: CachedToken): void {
    this.delete(key);
    const cost = key.length + token.token.length;
    if (cost > TOKEN_CACHE_BYTES) return;
    this.entries.set(key, token);
    this.bytes += cost;
    for (const [oldest, entry] of this.entries) {
      if (this.entries.size <= TOKEN_CACHE_ENTRIES && this.bytes <= TOKEN_CACHE_BYTES) break;
      this.entries.delete(oldest);
      this.bytes -= oldest.length + entry.token.length;
    }
  }

  delete(key: string): void {
    const entry = this.entries.get(key);
    if (!entry) return;
    this.entries.delete(key);
    this.bytes -= key.length + entry.token.length;
  }
}

export class Authorizer {
  /** What the upstream asked for last time; lets later requests authenticate up front. */
  private scheme: 'unknown' | 'none' | 'basic' | 'bearer' = 'unknown';
  private bearer: { realm: string; service: string | undefined } | undefined;
  private readonly tokens = new TokenCache();
  /** Fetched tokens by the header that carries them, until the upstream honours one (confirm). */
  private readonly pending = new Map<string, TokenEntry>();
  private readonly now: () => number;

  constructor(private readonly options: AuthorizerOptions) {
    this.now = options.now ?? Date.now;
  }

  /** Tokens kept for reuse (for /status and tests). */
  get cachedTokens(): number {
    return this.tokens.size;
  }

  /** The Authorization header to send up front for this scope, if the scheme is known. */
  async headerFor(scope: string, credentials: UpstreamCredentials | undefined): Promise<string | undefined> {
    if (this.scheme === 'basic' && credentials) return basicAuthorization(credentials);
    if (this.scheme === 'bearer' && this.bearer) {
      const cached = this.tokens.get(this.cacheKey(this.bearer.realm, this.bearer.service, scope, credentials));
      if (cached && cached.expiresAt > this.now()) return `Bearer ${cached.token}`;
      try {
        return `Bearer ${await this.fetchToken(this.bearer.realm, this.bearer.service, scope, credentials)}`;
      } catch (error) {
        if (!(error instanceof UpstreamAuthError) || error.kind !== 'unavailable') throw error;
        // The remembered realm is dead (moved, or the registry stopped using tokens): forget it
        // and ask without credentials, so the upstream's next challenge says what it wants now.
        this.scheme = 'unknown';
        this.bearer = undefined;
        return undefined;
      }
    }
    return undefined;
  }

  /** The upstream honoured the request that carried `header`: keep its token for reuse. */
  confirm(header: string | undefined): void {
    if (!header) return;
    const entry = this.pending.get(header);
    if (!entry) return;
    this.pending.delete(header);
    this.tokens.set(entry.key, entry);
  }

  /**
   * After a 401: the header to retry with, or null when there is nothing better to try.
   * `sent` is what the failed request carried, so a cached token that stopped working is dropped.
   */
  async afterChallenge(challenges: readonly Challenge[], scope: string, credentials: UpstreamCredentials | undefined, sent: string | undefined): Promise<string | null> {
    const bearer = challenges.find((c) => c.scheme === 'bearer');
    if (bearer?.params.realm) {
      const service = bearer.params.service;
      // The scope of the request we make; a challenge's own scope is trusted only for this repository.
      const wanted = bearer.params.scope && (scope === '' || bearer.params.scope.startsWith(scope.replace(/:pull$/, ':'))) ? bearer.params.scope : scope;
      this.scheme = 'bearer';
      this.bearer = { realm: bearer.params.realm, service };
      const key = this.cacheKey(bearer.params.realm, service, wanted, credentials);
      const cached = this.tokens.get(key);
      if (cached && sent === `Bearer ${cached.token}`) this.tokens.delete(key);
      if (sent) this.pending.delete(sent);
      const token = await this.fetchToken(bearer.params.realm, service, wanted, credentials);
      const header = `Bearer ${token}`;
      return header === sent ? null : header;
    }
    if (challenges.some((c) => c.scheme === 'basic')) {
      this.scheme = 'basic';
      if (!credentials) return null;
      const header = basicAuthorization(credentials);
      return header === sent ? null : header;
    }
    return null;
  }

  /** Marks that the upstream answered without a challenge, so no auth is needed. */
  noteAnonymous(): void {
    if (this.scheme === 'unknown') this.scheme = 'none';
  }

  private cacheKey(realm: string, service: string | undefined, scope: string, credentials: UpstreamCredentials | undefined): string {
    // Tokens obtained with one client's credentials (passthrough) must never serve another client.
    const who = credentials ? createHash('sha256').update(`${credentials.username}\u0000${credentials.password}`).digest('base64url') : '-';
    return `${realm}\u0000${service ?? ''}\u0000${scope}\u0000${who}`;
  }

  private async fetchToken(realm: string, service: string | undefined, scope: string, credentials: UpstreamCredentials | undefined): Promise<string> {
    let url: URL;
    try {
      url = new URL(realm);
    } catch {
      throw new UpstreamAuthError(`upstream announced an invalid token realm "${realm}"`, 'unavailable');
    }
    if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new UpstreamAuthError(`token realm must be http(s), got ${url.protocol}`, 'unavailable');
    if (service) url.searchParams.set('service', service);
    if (scope) url.searchParams.set('scope', scope);
    const headers: Record<string, string> = { accept: 'application/json' };
    const trusted = realmTrusted(this.options.upstream, url, this.options.tokenRealms);
    if (credentials && trusted) headers.authorization = basicAuthorization(credentials);
    const untrusted = trusted ? undefined : this.options.untrusted;
    const refusal = untrusted?.refuseHost(url.hostname);
    if (refusal) throw new UpstreamAuthError(`token realm ${url.origin} refused: ${refusal}`, 'unavailable');
    let statusCode: number;
    let text: string;
    try {
      const res = await dispatchRequest(untrusted?.dispatcher ?? this.options.dispatcher, { origin: url.origin, path: `${url.pathname}${url.search}`, method: 'GET', headers });
      statusCode = res.statusCode;
      const body = await res.body.readAll(TOKEN_BODY_LIMIT);
      if (body === null) throw new UpstreamAuthError('token response too large', 'unavailable');
      text = body.toString('utf8');
    } catch (error) {
      if (error instanceof UpstreamAuthError) throw error;
      throw new UpstreamAuthError(`token endpoint ${url.origin} unreachable: ${(error as Error).message}`, 'unavailable');
    }
    if (statusCode === 401 || statusCode === 403) throw new UpstreamAuthError(`token endpoint refused the credentials (${statusCode})`, 'rejected');
    if (statusCode >= 400 && statusCode < 500 && statusCode !== 429) throw new UpstreamAuthError(`token endpoint answered ${statusCode}`, 'refused');
    if (statusCode !== 200) throw new UpstreamAuthError(`token endpoint answered ${statusCode}`, 'unavailable');
    let body: { token?: unknown; access_token?: unknown; expires_in?: unknown };
    try {
      body = JSON.parse(text) as typeof body;
    } catch {
      throw new UpstreamAuthError('token endpoint answered with invalid JSON', 'unavailable');
    }
    const token = typeof body.token === 'string' && body.token ? body.token : typeof body.access_token === 'string' ? body.access_token : '';
    if (!token) throw new UpstreamAuthError('token endpoint answered without a token', 'unavailable');
    const seconds = typeof body.expires_in === 'number' && body.expires_in > 0 ? body.expires_in : DEFAULT_TOKEN_SECONDS;
    const margin = Math.max(5, seconds * 0.1) * 1000;
    const header = `Bearer ${token}`;
    this.pending.delete(header);
    this.pending.set(header, { key: this.cacheKey(realm, service, scope, credentials), token, expiresAt: this.now() + seconds * 1000 - margin });
    for (const oldest of this.pending.keys()) {
      if (this.pending.size <= PENDING_TOKENS) break;
      this.pending.delete(oldest);
    }
    return token;
  }
}
