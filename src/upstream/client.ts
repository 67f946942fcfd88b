// The upstream fetcher: one request to a rule's registry with auth retry, following storage
// redirects itself through the same transport.

import type { Dispatcher } from 'undici';
import { Authorizer, type UpstreamCredentials } from './authorizer.js';
import { dispatchRequest, type UpstreamReply } from './body.js';
import { parseChallenges } from './challenge.js';
import { RedirectRefused, type RuleTransport } from './transport.js';

export type UpstreamResponse = UpstreamReply & {
  /** The URL that finally answered (after redirects). */
  readonly url: string;
  /** Set when the upstream still wants credentials after everything was tried. */
  readonly unauthorized: boolean;
};

export interface UpstreamRequest {
  readonly method: 'GET' | 'HEAD';
  /** Path and query on the upstream, e.g. `/v2/team/app/manifests/1.2`. */
  readonly path: string;
  readonly headers: Readonly<Record<string, string>>;
  /** `repository:<name>:pull`, the token scope. */
  readonly scope: string;
  readonly credentials: UpstreamCredentials | undefined;
  readonly signal: AbortSignal;
  /**
   * Which connection pool: blob streams, or everything short (never queued behind blobs). Only
   * blob reads follow 3xx to storage; on the metadata lane redirects are returned as they are.
   */
  readonly lane: 'blob' | 'metadata';
}

const REDIRECTS = new Set([301, 302, 303, 307, 308]);
const MAX_REDIRECTS = 5;

export class UpstreamClient {
  readonly authorizer: Authorizer;

  constructor(
    readonly upstream: URL,
    readonly transport: RuleTransport,
    /** Token realms trusted with the rule's credentials besides the upstream's own origin. */
    tokenRealms: readonly string[] = [],
  ) {
    this.authorizer = new Authorizer({ upstream, dispatcher: transport.metadata, tokenRealms, untrusted: { dispatcher: transport.storage, refuseHost: (host) => transport.refuseStorageHost(host, 'auth.tokenRealms') } });
  }

  async fetch(request: UpstreamRequest): Promise<UpstreamResponse> {
    const dispatcher = request.lane === 'blob' ? this.transport.blobs : this.transport.metadata;
    let authorization = await this.authorizer.headerFor(request.scope, request.credentials);
    let res = await this.send(dispatcher, this.upstream.origin, request.path, request.method, request.headers, authorization, request.signal);
    if (res.statusCode === 401) {
      const challenges = parseChallenges(headerValue(res.headers['www-authenticate']));
      await res.body.dump();
      const retry = await this.authorizer.afterChallenge(challenges, request.scope, request.credentials, authorization);
      if (retry === null) return { ...res, url: this.upstream.href, unauthorized: true };
      authorization = retry;
      res = await this.send(dispatcher, this.upstream.origin, request.path, request.method, request.headers, retry, request.signal);
      if (res.statusCode === 401) return { ...res, url: this.upstream.href, unauthorized: true };
    } else if (res.statusCode < 400) {
      this.authorizer.noteAnonymous();
    }
    // Only a token the upstream honoured is worth keeping (names are client-chosen; see authorizer.ts).
    if (res.statusCode < 400) this.authorizer.confirm(authorization);
    if (request.lane !== 'blob' || !REDIRECTS.has(res.statusCode)) return { ...res, url: new URL(request.path, this.upstream).href, unauthorized: false };
    return this.followRedirects(res, request);
  }

  /**
   * Storage redirects: resolve relative Location, drop Authorization when the host changes, keep
   * Range, and keep the method: a registry presigns the URL for the method it was asked
   * (distribution on S3 or GCS signs a HEAD's for HEAD, and a GET there is refused). A HEAD the
   * storage refuses (4xx) is asked once more as a GET, for URLs presigned for GET whatever the
   * method. Another origin is reached through the storage dispatcher, which refuses loopback,
   * link-local and private peers that the rule does not allow. Never cached.
   */
  private async followRedirects(first: UpstreamReply, request: UpstreamRequest): Promise<UpstreamResponse> {
    let res = first;
    let current = new URL(request.path, this.upstream);
    for (let hop = 0; hop < MAX_REDIRECTS && REDIRECTS.has(res.statusCode); hop++) {
      const location = headerValue(res.headers.location);
      await res.body.dump();
      if (!location) throw new Error(`upstream redirect ${res.statusCode} without Location`);
      const next = new URL(location, current);
      if (next.protocol !== 'https:' && next.protocol !== 'http:') throw new Error(`upstream redirected to unsupported scheme ${next.protocol}`);
      const headers = { ...request.headers };
      const sameOrigin = next.origin === this.upstream.origin;
      const refusal = sameOrigin ? null : this.transport.refuseStorageHost(next.hostname);
      if (refusal !== null) throw new RedirectRefused(`redirect to ${next.hostname} refused: ${refusal}`);
      const authorization = sameOrigin ? await this.authorizer.headerFor(request.scope, request.credentials) : undefined;
      const dispatcher = sameOrigin ? this.transport.blobs : this.transport.storage;
      res = await this.send(dispatcher, next.origin, `${next.pathname}${next.search}`, request.method, headers, authorization, request.signal);
      if (request.method === 'HEAD' && res.statusCode >= 400 && res.statusCode < 500) {
        await res.body.dump();
        res = await this.send(dispatcher, next.origin, `${next.pathname}${next.search}`, 'GET', headers, authorization, request.signal);
      }
      current = next;
    }
    if (REDIRECTS.has(res.statusCode)) {
      await res.body.dump();
      throw new Error(`upstream redirected more than ${MAX_REDIRECTS} times`);
    }
    return { ...res, url: current.href, unauthorized: false };
  }

  private send(dispatcher: Dispatcher, origin: string, path: string, method: 'GET' | 'HEAD', headers: Readonly<Record<string, string>>, authorization: string | undefined, signal: AbortSignal): Promise<UpstreamReply> {
    return dispatchRequest(dispatcher, { origin, path, method, headers: authorization ? { ...headers, authorization } : headers, signal });
  }
}

export function headerValue(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[0] : value;
}
