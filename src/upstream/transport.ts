// How a rule's requests reach its upstream: directly, through an HTTP CONNECT proxy, or through a
// forwarding (connectivity) proxy that takes plain HTTP and routes on the Host header. One undici
// dispatcher per rule, pooling keep-alive connections per origin. Every request on it goes through
// dispatchRequest (body.ts), which is what lets its sockets reuse their read buffers.

import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { rootCertificates } from 'node:tls';
import { Agent, buildConnector, ProxyAgent, type Dispatcher } from 'undici';
import type { Rule } from '../rules/config.js';
import { SecretFile } from '../shell/secretfiles.js';
import { parseCidrs, redirectAddressRefusal } from './addresses.js';
import { socketReadOptions } from './readbuffers.js';

export interface TransportTimeouts {
  readonly connectMs: number;
  readonly headersMs: number;
  /** Longest pause between two body chunks before the upstream is given up. */
  readonly bodyIdleMs: number;
}

export const DEFAULT_TIMEOUTS: TransportTimeouts = { connectMs: 10_000, headersMs: 30_000, bodyIdleMs: 60_000 };
/** Blob streams may be long (slow clients hold them): they get their own pool... */
export const DEFAULT_BLOB_CONNECTIONS = 64;
/** ...and manifests, tag lists, tokens and probes another, so that they never queue behind blobs. */
const METADATA_CONNECTIONS = 16;

export interface TransportOptions {
  readonly timeouts?: TransportTimeouts;
  /** Upstream connections per origin for blob streams (DEFAULT_BLOB_CONNECTIONS). */
  readonly blobConnections?: number;
  /** Name resolution, injectable so that tests can simulate failures without a DNS server. */
  /** The clock secret files are re-read by (every 10 s: a rotated Secret is taken up); tests move it. */
  readonly now?: () => number;
  readonly lookup?: (hostname: string, options: object, callback: (err: NodeJS.ErrnoException | null, address: string | Array<{ address: string; family: number }>, family?: number) => void) => void;
}

/** A redirect target the rule's address policy refuses (see addresses.ts). */
export class RedirectRefused extends Error {}

/** The forwarding proxy, not the registry, refused: its 407, or its answer to CONNECT. Named so that
 * nobody goes looking at the registry's credentials. */
export class ForwardProxyRefused extends Error {
  constructor(
    readonly proxyUrl: string,
    readonly status: number,
  ) {
    super(`the forwarding proxy ${proxyUrl} refused the request: ${status}${status === 407 || status === 401 ? ' Proxy Authentication Required (check forwardProxy.credentials)' : ''}`);
  }
}

/** undici's errors for a CONNECT the proxy answered with something other than 200, and for a 407
 * answer in forward mode. */
const TUNNEL_REFUSED = /Proxy (?:response|Authentication Required) \((\d{3})\)/;

/** Passes a handler's calls on, turning the forwarding proxy's refusals into ForwardProxyRefused. */
function namingRefusals(handler: Dispatcher.DispatchHandler, proxyUrl: string): Dispatcher.DispatchHandler {
  let refused = false;
  return {
    onRequestStart: (controller, context) => handler.onRequestStart?.(controller, context),
    onResponseStart(controller, statusCode, headers, statusMessage) {
      // Only a proxy answers 407 (RFC 9110 15.5.8): through mode forward, it comes as a response.
      if (statusCode === 407) {
        refused = true;
        handler.onResponseError?.(controller, new ForwardProxyRefused(proxyUrl, statusCode));
        controller.abort(new ForwardProxyRefused(proxyUrl, statusCode));
        return;
      }
      handler.onResponseStart?.(controller, statusCode, headers, statusMessage);
    },
    onResponseData: (controller, chunk) => (refused ? undefined : handler.onResponseData?.(controller, chunk)),
    onResponseEnd: (controller, trailers) => (refused ? undefined : handler.onResponseEnd?.(controller, trailers)),
    onResponseError(controller, error) {
      if (refused) return;
      const tunnel = TUNNEL_REFUSED.exec(error.message);
      handler.onResponseError?.(controller, tunnel ? new ForwardProxyRefused(proxyUrl, Number(tunnel[1])) : error);
    },
  };
}

/** A rule's ways out: to its upstream, and to the storage its blob reads may be redirected to. */
export interface RuleTransport {
  /** Blob streams to the upstream. */
  readonly blobs: Dispatcher;
  /** Everything short to the upstream and its token realm: manifests, tag lists, tokens, probes. */
  readonly metadata: Dispatcher;
  /** For redirect hops to another origin. Direct: every connection's peer address is checked
   * against the rule's redirect policy once connected (so a name that resolves to a forbidden
   * address is caught, whatever DNS said before). Through a forwarding proxy the proxy connects,
   * so only literal addresses in the URL can be checked, by `refuseStorageHost`. */
  readonly storage: Dispatcher;
  refuseStorageHost(hostname: string, fix?: 'redirects.allow' | 'auth.tokenRealms'): string | null;
  close(): Promise<void>;
}

export function createTransport(rule: Rule, options: TransportOptions = {}): RuleTransport {
  const timeouts = options.timeouts ?? DEFAULT_TIMEOUTS;
  const ca = rule.tls?.caFile ? readFileSync(rule.tls.caFile, 'utf8') : undefined;
  const tls = {
    ...(ca ? { ca } : {}),
    rejectUnauthorized: !(rule.tls?.insecureSkipVerify ?? false),
    timeout: timeouts.connectMs,
    ...(options.lookup ? { lookup: options.lookup } : {}),
  };
  const common = {
    headersTimeout: timeouts.headersMs,
    bodyTimeout: timeouts.bodyIdleMs,
    keepAliveTimeout: 30_000,
  };
  const blobPool = { ...common, connections: options.blobConnections ?? DEFAULT_BLOB_CONNECTIONS };
  const metadataPool = { ...common, connections: METADATA_CONNECTIONS };
  const allowed = parseCidrs(rule.redirects.allow);
  const refuseStorageHost = (hostname: string, fix: 'redirects.allow' | 'auth.tokenRealms' = 'redirects.allow'): string | null => {
    const bare = hostname.replace(/^\[|\]$/g, '').replace(/\.$/, '').toLowerCase();
    if (bare === 'localhost' || bare.endsWith('.localhost')) return `${bare} is the node itself${fix === 'auth.tokenRealms' ? ' (not listed in auth.tokenRealms)' : ''}`;
    return isIP(bare) ? redirectAddressRefusal(bare, allowed, fix) : null;
  };
  // Storage and foreign token realms are other parties than the upstream: the public trust store
  // (plus the rule's CA), and always verified, whatever the rule allows its own upstream.
  const storageTls = { ...tls, ca: ca ? [...rootCertificates, ca] : [...rootCertificates], rejectUnauthorized: true };
  const forward = rule.forwardProxy;
  if (!forward) {
    // Large reads into reused buffers for direct upstreams; through a forwarding proxy, Node's default.
    const blobs = new Agent({ ...blobPool, connect: { ...tls, onread: socketReadOptions() } });
    const metadata = new Agent({ ...metadataPool, connect: tls });
    const connect = buildConnector({ ...storageTls, onread: socketReadOptions() });
    const storage = new Agent({
      ...blobPool,
      connect: (opts, callback) =>
        connect(opts, (...result) => {
          const [error, socket] = result;
          if (error) return callback(error, null);
          const refusal = redirectAddressRefusal(socket.remoteAddress ?? '', allowed);
          if (refusal === null) return callback(null, socket);
          socket.destroy();
          callback(new RedirectRefused(`connection to ${opts.hostname} refused: ${refusal}`), null);
        }),
    });
    return { blobs, metadata, storage, refuseStorageHost, close: async () => void (await Promise.all([blobs.close(), metadata.close(), storage.close()])) };
  }

  // The forwarding proxy's credentials are re-read like the registry's (SecretFile): a rotated
  // password builds new agents for new requests; the old ones finish what they carry, then close.
  const username = forward.credentials?.usernameFile !== undefined ? new SecretFile(forward.credentials.usernameFile, options.now) : undefined;
  const password = forward.credentials?.passwordFile !== undefined ? new SecretFile(forward.credentials.passwordFile, options.now) : undefined;
  const proxyAuthorization = (): string | undefined => {
    if (!forward.credentials || !password) return undefined;
    const user = forward.credentials.username ?? username?.read() ?? '';
    return `Basic ${Buffer.from(`${user}:${password.read()}`).toString('base64')}`;
  };
  const throughProxy = (authorization: string | undefined, pool: typeof blobPool, requestTls: typeof tls | typeof storageTls) =>
    new ProxyAgent({
      ...pool,
      uri: forward.url,
      headers: { ...forward.headers, ...(authorization ? { 'proxy-authorization': authorization } : {}) },
      // connect: CONNECT tunnel (TLS to the upstream inside it); forward: absolute-form plain HTTP.
      proxyTunnel: forward.mode === 'connect',
      requestTls,
      proxyTls: { timeout: timeouts.connectMs, ...(options.lookup ? { lookup: options.lookup } : {}) },
    });
  const agentsFor = (authorization: string | undefined) => ({
    authorization,
    blobs: throughProxy(authorization, blobPool, tls),
    metadata: throughProxy(authorization, metadataPool, tls),
    storage: throughProxy(authorization, blobPool, storageTls),
  });
  type Agents = ReturnType<typeof agentsFor>;
  const closeAgents = (agents: Agents) => Promise.all([agents.blobs.close(), agents.metadata.close(), agents.storage.close()]);
  let agents = agentsFor(proxyAuthorization());
  const current = (): Agents => {
    let authorization: string | undefined;
    try {
      authorization = proxyAuthorization();
    } catch {
      return agents; // unreadable mid-rotation: keep the credentials that were last read
    }
    if (authorization !== agents.authorization) {
      const retired = agents;
      agents = agentsFor(authorization);
      void closeAgents(retired).catch(() => undefined);
    }
    return agents;
  };
  // Stable dispatchers for the client and the authorizer, each dispatching on the current agents.
  // (compose() gives a Dispatcher whose own agent is never used; it only delegates.)
  const lane = (pick: (a: Agents) => Dispatcher): { dispatcher: Dispatcher; shell: Agent } => {
    const shell = new Agent();
    return { shell, dispatcher: shell.compose(() => (opts, handler) => pick(current()).dispatch(opts, namingRefusals(handler, forward.url))) };
  };
  const [blobs, metadata, storage] = [lane((a) => a.blobs), lane((a) => a.metadata), lane((a) => a.storage)];
  return {
    blobs: blobs.dispatcher,
    metadata: metadata.dispatcher,
    storage: storage.dispatcher,
    refuseStorageHost,
    close: async () => void (await Promise.all([closeAgents(agents), blobs.shell.close(), metadata.shell.close(), storage.shell.close()])),
  };
}
