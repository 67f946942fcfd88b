// Upstream authentication: Basic, and the Bearer token flow (challenge → token endpoint → retry),
// with tokens cached per realm/service/scope/credential until shortly before they expire.
// Credentials are only ever sent to the registry's own host or a realm on its trust boundary.

import { createHash } from 'node:crypto';
import { isIP } from 'node:net';
import type { Dispatcher } from 'undici';
import { dispatchRequest } from './body.js';
import { basicAuthorization, type BasicCredentials } from './credentials.js';
import type { Challenge } from './challenge.js';

export class UpstreamAuthError extends Error {
  constructor(
    message: string,
    /** 'rejected': the credentials were refused; 'unavailable': the token endpoint could not be used. */
    readonly kind: 'rejected' | 'unavailable',
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
const TOKEN_CACHE_LIMIT = 10_000;
const TOKEN_BODY_LIMIT = 1024 * 1024;

/** Whether a token realm may receive the credentials meant for the registry at `upstream`. */
export function realmTrusted(upstream: URL, realm: URL): boolean {
  if (upstream.protocol === 'https:' && realm.protocol !== 'https:') return false;
  const a = upstream.hostname.toLowerCase();
  const b = realm.hostname.toLowerCase();
  if (a === b) return true;
  if (isIP(a.replace(/^\[|\]$/g, '')) || isIP(b.replace(/^\[|\]$/g, ''))) return false;
  // Same registrable domain, approximated by the last two labels (auth.docker.io ~ registry-1.docker.io).
  const parent = (h: string) => h.split('.').slice(-2).join('.');
  return a.includes('.') && b.includes('.') && parent(a) === parent(b);
}

export interface AuthorizerOptions {
  readonly upstream: URL;
  readonly dispatcher: Dispatcher;
  readonly now?: () => number;
}

export class Authorizer {
  /** What the upstream asked for last time; lets later requests authenticate up front. */
  private scheme: 'unknown' | 'none' | 'basic' | 'bearer' = 'unknown';
  private bearer: { realm: string; service: string | undefined } | undefined;
  private readonly tokens = new Map<string, CachedToken>();
  private readonly now: () => number;

  constructor(private readonly options: AuthorizerOptions) {
    this.now = options.now ?? Date.now;
  }

  /** The Authorization header to send up front for this scope, if the scheme is known. */
  async headerFor(scope: string, credentials: BasicCredentials | undefined): Promise<string | undefined> {
    if (this.scheme === 'basic' && credentials) return basicAuthorization(credentials);
    if (this.scheme === 'bearer' && this.bearer) {
      const cached = this.tokens.get(this.cacheKey(this.bearer.realm, this.bearer.service, scope, credentials));
      if (cached && cached.expiresAt > this.now()) return `Bearer ${cached.token}`;
      return `Bearer ${await this.fetchToken(this.bearer.realm, this.bearer.service, scope, credentials)}`;
    }
    return undefined;
  }

  /**
   * After a 401: the header to retry with, or null when there is nothing better to try.
   * `sent` is what the failed request carried, so a cached token that stopped working is dropped.
   */
  async afterChallenge(challenges: readonly Challenge[], scope: string, credentials: BasicCredentials | undefined, sent: string | undefined): Promise<string | null> {
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

  private cacheKey(realm: string, service: string | undefined, scope: string, credentials: BasicCredentials | undefined): string {
    // Tokens obtained with one client's credentials (passthrough) must never serve another client.
    const who = credentials ? createHash('sha256').update(`${credentials.username}\u0000${credentials.password}`).digest('base64url') : '-';
    return `${realm}\u0000${service ?? ''}\u0000${scope}\u0000${who}`;
  }

  private async fetchToken(realm: string, service: string | undefined, scope: string, credentials: BasicCredentials | undefined): Promise<string> {
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
    if (credentials && realmTrusted(this.options.upstream, url)) headers.authorization = basicAuthorization(credentials);
    let statusCode: number;
    let text: string;
    try {
      const res = await dispatchRequest(this.options.dispatcher, { origin: url.origin, path: `${url.pathname}${url.search}`, method: 'GET', headers });
      statusCode = res.statusCode;
      const body = await res.body.readAll(TOKEN_BODY_LIMIT);
      if (body === null) throw new UpstreamAuthError('token response too large', 'unavailable');
      text = body.toString('utf8');
    } catch (error) {
      if (error instanceof UpstreamAuthError) throw error;
      throw new UpstreamAuthError(`token endpoint ${url.origin} unreachable: ${(error as Error).message}`, 'unavailable');
    }
    if (statusCode === 401 || statusCode === 403) throw new UpstreamAuthError(`token endpoint refused the credentials (${statusCode})`, 'rejected');
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
    if (this.tokens.size >= TOKEN_CACHE_LIMIT) this.tokens.clear();
    this.tokens.set(this.cacheKey(realm, service, scope, credentials), { token, expiresAt: this.now() + seconds * 1000 - margin });
    return token;
  }
}
