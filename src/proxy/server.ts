// The registry proxy's HTTP shell: route, authenticate the client, fetch from the rule's upstream,
// stream back. Node's http server directly: every byte path here is hot.

import { createHash } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import type { Dispatcher } from 'undici';
import type { Logger } from '../log.js';
import type { Config, Rule } from '../rules/config.js';
import { BrokerKeys, SecretFile, type SkippedBrokerKey } from '../shell/secretfiles.js';
import { UpstreamAuthError } from './authorizer.js';
import { Budget, type BudgetLimit, type Reservation } from './budget.js';
import { parseBasicAuthorization, verifyNamespaceToken, type BasicCredentials } from './credentials.js';
import { registryError, registryErrorBody, type RegistryError } from './errors.js';
import type { Prober } from './probe.js';
import { parseRoute, type Route } from './route.js';
import { DEFAULT_MINIMUM_RATE, streamBody, type MinimumRate } from './stream.js';
import { createTransport, type RuleTransport, type TransportOptions } from './transport.js';
import { UpstreamClient, headerValue, type UpstreamResponse } from './upstream.js';

/** containerd refuses manifests over 4 MiB; nothing larger is a manifest. */
export const MANIFEST_LIMIT_BYTES = 4 * 1024 * 1024;
const ERROR_BODY_LIMIT = 64 * 1024;
const DEFAULT_MANIFEST_ACCEPT = [
  'application/vnd.oci.image.index.v1+json',
  'application/vnd.docker.distribution.manifest.list.v2+json',
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.docker.distribution.manifest.v2+json',
].join(', ');
const BLOB_HEADERS = ['content-type', 'content-length', 'content-range', 'accept-ranges', 'content-encoding', 'docker-content-digest', 'etag', 'last-modified'];
const CHALLENGE = 'Basic realm="pullbridge"';
/** Memory for buffered bodies (manifests, tag lists) until their clients have read them. */
export const BUFFERED_BODY_BYTES = { total: 64 * 1024 * 1024, perClient: 16 * 1024 * 1024 };
/**
 * Blob streams one client address may hold at once: below the rule's upstream pool (64), so that
 * one Pod reading slowly cannot take every upstream connection of the rule on its node.
 */
export const BLOB_STREAMS_PER_CLIENT = 32;
/** Reserved for a buffered body whose length the upstream did not announce, adjusted once read. */
const UNKNOWN_LENGTH_RESERVE = 256 * 1024;

/** The per-rule state that lives as long as a config: transport, auth, credentials. */
export class RuleRuntime {
  readonly client: UpstreamClient;
  private readonly username: SecretFile | undefined;
  private readonly password: SecretFile | undefined;

  constructor(
    readonly rule: Rule,
    readonly transport: RuleTransport,
  ) {
    this.client = new UpstreamClient(new URL(rule.upstream), transport, rule.auth.tokenRealms);
    this.username = rule.credentials?.usernameFile ? new SecretFile(rule.credentials.usernameFile) : undefined;
    this.password = rule.credentials?.passwordFile ? new SecretFile(rule.credentials.passwordFile) : undefined;
  }

  /** The rule's own upstream credentials (broker and anonymous modes), if configured. */
  upstreamCredentials(): BasicCredentials | undefined {
    if (!this.rule.credentials || !this.password) return undefined;
    return { username: this.rule.credentials.username ?? this.username?.read() ?? '', password: this.password.read() };
  }
}

export interface ProxyRuntime {
  readonly config: Config;
  readonly rules: ReadonlyMap<string, RuleRuntime>;
  readonly brokerKeys: BrokerKeys | undefined;
  close(): Promise<void>;
}

/** `onVerifyKeys`: which verify-only broker key files were skipped, at each use (see BrokerKeys). */
export function createProxyRuntime(config: Config, transport: TransportOptions = {}, onVerifyKeys?: (skipped: readonly SkippedBrokerKey[]) => void): ProxyRuntime {
  const rules = new Map(config.registries.map((rule) => [rule.name, new RuleRuntime(rule, createTransport(rule, transport))]));
  return {
    config,
    rules,
    brokerKeys: config.broker ? new BrokerKeys(config.broker.keyFiles, onVerifyKeys) : undefined,
    async close() {
      await Promise.all([...rules.values()].map((r) => r.transport.close()));
    },
  };
}

export interface OpsHandlerOptions {
  readonly runtime: () => ProxyRuntime | undefined;
  readonly metrics: Registry;
  readonly prober?: Prober;
  readonly ready?: () => boolean;
}

export interface ProxyHandlerOptions extends OpsHandlerOptions {
  readonly logger: Logger;
  /**
   * Also answer /metrics and /status on the registry port (when the proxy has no operations port).
   * They name upstreams and forwarding proxies, and every Pod on the node can reach this port.
   */
  readonly opsOnRegistryPort?: boolean;
  /** Bounds the memory that buffered bodies hold, per client address and in total. */
  readonly bufferBudget?: Budget;
  /** Blob streams one client address may have open at once (BLOB_STREAMS_PER_CLIENT). */
  readonly blobStreamsPerClient?: number;
  /** A client that reads a blob slower than this, while the proxy waits for it, is cut. */
  readonly minimumClientRate?: MinimumRate;
}

const OPS_PATHS = new Set(['/healthz', '/readyz', '/metrics', '/status']);
/** Health answers nothing about the configuration: always served, so probes work on either port. */
const HEALTH_PATHS = new Set(['/healthz', '/readyz']);

/** The operations endpoints: health, readiness, Prometheus metrics and the upstream status document. */
export function createOpsHandler(options: OpsHandlerOptions): (req: IncomingMessage, res: ServerResponse) => void {
  return (req, res) => {
    const url = req.url ?? '';
    if (req.method !== 'GET' || !OPS_PATHS.has(url)) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: GET /healthz, /readyz, /metrics or /status');
      return;
    }
    void serveOps(options, url, res);
  };
}

async function serveOps(options: OpsHandlerOptions, url: string, res: ServerResponse): Promise<void> {
  if (url === '/healthz') {
    res.writeHead(200, { 'content-type': 'text/plain' }).end('ok');
  } else if (url === '/readyz') {
    const ready = (options.ready?.() ?? true) && options.runtime() !== undefined;
    res.writeHead(ready ? 200 : 503, { 'content-type': 'text/plain' }).end(ready ? 'ready' : 'not ready');
  } else if (url === '/metrics') {
    const text = await options.metrics.metrics();
    res.writeHead(200, { 'content-type': options.metrics.contentType }).end(text);
  } else {
    const runtime = options.runtime();
    const body = JSON.stringify({ configLoaded: runtime !== undefined, rules: runtime?.config.registries.map((r) => r.name) ?? [], upstreams: options.prober?.statuses() ?? [] }, null, 2);
    res.writeHead(200, { 'content-type': 'application/json; charset=utf-8' }).end(body);
  }
}

interface ProxyMetrics {
  requests: Counter<'rule' | 'kind' | 'status'>;
  bytes: Counter<'rule' | 'kind'>;
  upstreamSeconds: Histogram<'rule' | 'kind'>;
  inflight: Gauge;
}

function registerMetrics(registry: Registry): ProxyMetrics {
  return {
    requests: new Counter({ name: 'pullbridge_proxy_requests_total', help: 'Proxy requests by rule, kind and status', labelNames: ['rule', 'kind', 'status'], registers: [registry] }),
    bytes: new Counter({ name: 'pullbridge_proxy_response_bytes_total', help: 'Body bytes served, by rule and kind', labelNames: ['rule', 'kind'], registers: [registry] }),
    upstreamSeconds: new Histogram({
      name: 'pullbridge_upstream_response_seconds',
      help: 'Time until the upstream answered (headers), by rule and kind',
      labelNames: ['rule', 'kind'],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers: [registry],
    }),
    inflight: new Gauge({ name: 'pullbridge_proxy_inflight_streams', help: 'Responses being streamed now', registers: [registry] }),
  };
}

/** What one request did, for the access log and metrics. */
interface Exchange {
  rule: string | null;
  kind: string;
  repository: string | null;
  reference: string | null;
  namespace: string | null;
  error: string | null;
  bytes: number;
}

/** A refusal names the namespace when its credential was valid, so the access log says who was refused. */
type ClientAuth = { ok: true; namespace: string | null; credentials: BasicCredentials | undefined } | { ok: false; error: RegistryError; challenge: boolean; namespace?: string };

function sendError(res: ServerResponse, error: RegistryError, extraHeaders: Record<string, string> = {}): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body = registryErrorBody(error);
  res.writeHead(error.status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body), ...extraHeaders });
  res.end(res.req.method === 'HEAD' ? undefined : body);
}

export function createProxyHandler(options: ProxyHandlerOptions): (req: IncomingMessage, res: ServerResponse) => void {
  const { logger } = options;
  const metrics = registerMetrics(options.metrics);
  const opsOnRegistryPort = options.opsOnRegistryPort ?? true;
  const budget = options.bufferBudget ?? new Budget(BUFFERED_BODY_BYTES.total, BUFFERED_BODY_BYTES.perClient);
  const blobStreams = new Budget(Number.POSITIVE_INFINITY, options.blobStreamsPerClient ?? BLOB_STREAMS_PER_CLIENT);
  const minimumRate = options.minimumClientRate ?? DEFAULT_MINIMUM_RATE;

  function overBudget(res: ServerResponse, limit: BudgetLimit): void {
    const error =
      limit === 'client'
        ? registryError(429, 'TOOMANYREQUESTS', 'this client already holds too many buffered responses it has not read')
        : registryError(503, 'UNAVAILABLE', 'the proxy holds too many buffered responses; try again shortly');
    sendError(res, error, { 'retry-after': '1' });
  }

  /**
   * Reads a body the proxy must hold whole (to check or rewrite it) within the memory budget: the
   * bytes stay reserved until the response is closed, i.e. until the client has read them. Null
   * when the client was answered instead (over budget).
   */
  async function readBuffered(up: UpstreamResponse, req: IncomingMessage, res: ServerResponse, limit: number): Promise<{ body: Buffer } | { tooLarge: true } | null> {
    const declared = Number(headerValue(up.headers['content-length']));
    const estimate = Number.isSafeInteger(declared) && declared >= 0 && declared <= limit ? declared : UNKNOWN_LENGTH_RESERVE;
    const reserved = budget.reserve(req.socket.remoteAddress ?? '', estimate);
    if (!reserved.ok) {
      up.body.destroy();
      overBudget(res, reserved.limit);
      return null;
    }
    const reservation: Reservation = reserved.reservation;
    res.once('close', () => reservation.release());
    const body = await up.body.readAll(limit, estimate === declared ? declared : undefined);
    if (body === null) return { tooLarge: true };
    const refusal = reservation.resize(body.length);
    if (refusal) {
      overBudget(res, refusal);
      return null;
    }
    return { body };
  }

  /** Client authentication; the proxy's own secrets failing to load is a 503, not the client's fault. */
  function authenticate(runtime: ProxyRuntime, rr: RuleRuntime, header: string | undefined): ClientAuth {
    try {
      return checkClient(runtime, rr, header);
    } catch (error) {
      logger.error({ rule: rr.rule.name, error: (error as Error).message }, 'cannot load credentials');
      return { ok: false, error: registryError(503, 'UNAVAILABLE', `the proxy cannot load its credentials for rule "${rr.rule.name}"`), challenge: false };
    }
  }

  function checkClient(runtime: ProxyRuntime, rr: RuleRuntime, header: string | undefined): ClientAuth {
    const mode = rr.rule.auth.mode;
    if (mode === 'anonymous') return { ok: true, namespace: null, credentials: rr.upstreamCredentials() };
    const basic = parseBasicAuthorization(header);
    if (!basic) return { ok: false, error: registryError(401, 'UNAUTHORIZED', 'authentication required'), challenge: true };
    if (mode === 'passthrough') return { ok: true, namespace: null, credentials: basic };
    const keys = runtime.brokerKeys?.keys() ?? [];
    if (!verifyNamespaceToken(keys, basic.username, basic.password)) {
      return { ok: false, error: registryError(401, 'UNAUTHORIZED', 'invalid credentials: use the pull secret pullbridge provisions in your namespace'), challenge: true };
    }
    if (rr.rule.namespaceFilter.refuse(basic.username) !== null) {
      return { ok: false, error: registryError(403, 'DENIED', `namespace "${basic.username}" may not pull through rule "${rr.rule.name}"`), challenge: false, namespace: basic.username };
    }
    return { ok: true, namespace: basic.username, credentials: rr.upstreamCredentials() };
  }

  function baseRoute(runtime: ProxyRuntime, req: IncomingMessage, res: ServerResponse, exchange: Exchange): void {
    const rules = [...runtime.rules.values()];
    const needsAuth = rules.some((r) => r.rule.auth.mode !== 'anonymous');
    const basic = parseBasicAuthorization(req.headers.authorization);
    // containers/image pings /v2/ and uses only this challenge, so it must challenge here too.
    if (needsAuth && !basic) {
      sendError(res, registryError(401, 'UNAUTHORIZED', 'authentication required'), { 'www-authenticate': CHALLENGE });
      return;
    }
    if (basic) {
      const brokerOk = runtime.brokerKeys ? verifyNamespaceToken(runtime.brokerKeys.keys(), basic.username, basic.password) : false;
      if (brokerOk) exchange.namespace = basic.username;
      // Passthrough credentials can only be checked by their upstream, on a real request.
      else if (!rules.some((r) => r.rule.auth.mode === 'passthrough')) {
        sendError(res, registryError(401, 'UNAUTHORIZED', 'invalid credentials'), { 'www-authenticate': CHALLENGE });
        return;
      }
    }
    const body = '{}';
    res.writeHead(200, { 'content-type': 'application/json; charset=utf-8', 'content-length': body.length });
    res.end(req.method === 'HEAD' ? undefined : body);
  }

  /** Passes an upstream error on in registry format, keeping its status and Retry-After. */
  async function relayUpstreamError(up: UpstreamResponse, route: Route & { name: string }, res: ServerResponse): Promise<void> {
    const text = (await up.body.readAll(ERROR_BODY_LIMIT))?.toString('utf8') ?? '';
    const retryAfter = headerValue(up.headers['retry-after']);
    const extra: Record<string, string> = retryAfter ? { 'retry-after': retryAfter } : {};
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = undefined;
    }
    if (parsed && typeof parsed === 'object' && Array.isArray((parsed as { errors?: unknown }).errors)) {
      res.writeHead(up.statusCode, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), ...extra });
      res.end(res.req.method === 'HEAD' ? undefined : text);
      return;
    }
    const code = up.statusCode === 404 ? (route.kind === 'blob' ? 'BLOB_UNKNOWN' : route.kind === 'manifest' ? 'MANIFEST_UNKNOWN' : 'NAME_UNKNOWN') : up.statusCode === 429 ? 'TOOMANYREQUESTS' : up.statusCode === 403 ? 'DENIED' : 'UNAVAILABLE';
    sendError(res, registryError(up.statusCode, code, `upstream answered ${up.statusCode}`), extra);
  }

  /** Answers the client when the upstream refused or failed; true when it did. */
  async function upstreamFailed(up: UpstreamResponse, rr: RuleRuntime, route: Route & { name: string }, res: ServerResponse, ok: readonly number[] = [200]): Promise<boolean> {
    if (up.statusCode >= 300 && up.statusCode < 400 && !ok.includes(up.statusCode)) {
      // Only blob reads may be redirected (to storage, followed by the upstream client).
      void up.body.dump();
      sendError(res, registryError(502, 'UNAVAILABLE', `upstream answered a ${route.kind} request with a redirect (${up.statusCode}); only blob reads may be redirected`));
      return true;
    }
    if (up.unauthorized) {
      void up.body.dump();
      const u = unauthorizedUpstream(rr, route.name);
      sendError(res, u.error, u.headers);
      return true;
    }
    if (!ok.includes(up.statusCode)) {
      await relayUpstreamError(up, route, res);
      return true;
    }
    return false;
  }

  function unauthorizedUpstream(rr: RuleRuntime, name: string): { error: RegistryError; headers: Record<string, string> } {
    if (rr.rule.auth.mode === 'passthrough') {
      return { error: registryError(401, 'UNAUTHORIZED', `the upstream registry rejected your credentials for ${name}`), headers: { 'www-authenticate': CHALLENGE } };
    }
    return { error: registryError(403, 'DENIED', `the upstream registry denied access to ${name}`), headers: {} };
  }

  async function manifest(rr: RuleRuntime, route: Extract<Route, { kind: 'manifest' }>, credentials: BasicCredentials | undefined, req: IncomingMessage, res: ServerResponse, signal: AbortSignal, exchange: Exchange): Promise<void> {
    const path = `/v2/${route.name}/manifests/${route.reference}`;
    const headers = { accept: req.headers.accept ?? DEFAULT_MANIFEST_ACCEPT };
    const scope = `repository:${route.name}:pull`;
    const started = performance.now();
    if (req.method === 'HEAD') {
      const head = await rr.client.fetch({ method: 'HEAD', path, headers, scope, credentials, signal, followRedirects: false, lane: 'metadata' });
      metrics.upstreamSeconds.observe({ rule: rr.rule.name, kind: 'manifest' }, (performance.now() - started) / 1000);
      const digest = headerValue(head.headers['docker-content-digest']);
      const length = headerValue(head.headers['content-length']);
      // 405: some registries refuse HEAD on manifests; fall through to a GET.
      if (await upstreamFailed(head, rr, route, res, [200, 405])) return;
      await head.body.dump();
      if (head.statusCode === 200 && digest && length && Number(length) > 0 && (!route.byDigest || digest === route.reference)) {
        res.writeHead(200, { 'content-type': headerValue(head.headers['content-type']) ?? 'application/octet-stream', 'content-length': length, 'docker-content-digest': digest });
        res.end();
        return;
      }
      // Without a digest and a length from upstream, GET and compute them: clients trust both.
    }
    const up = await rr.client.fetch({ method: 'GET', path, headers, scope, credentials, signal, followRedirects: false, lane: 'metadata' });
    metrics.upstreamSeconds.observe({ rule: rr.rule.name, kind: 'manifest' }, (performance.now() - started) / 1000);
    if (await upstreamFailed(up, rr, route, res)) return;
    const read = await readBuffered(up, req, res, MANIFEST_LIMIT_BYTES);
    if (read === null) return;
    if ('tooLarge' in read) {
      sendError(res, registryError(502, 'MANIFEST_INVALID', `upstream manifest is larger than ${MANIFEST_LIMIT_BYTES} bytes`));
      return;
    }
    const body = read.body;
    const algorithm = route.byDigest ? route.reference.slice(0, route.reference.indexOf(':')) : 'sha256';
    const digest = `${algorithm}:${createHash(algorithm).update(body).digest('hex')}`;
    if (route.byDigest && digest !== route.reference) {
      exchange.error = `manifest digest mismatch: got ${digest}`;
      sendError(res, registryError(502, 'MANIFEST_INVALID', `upstream manifest does not match ${route.reference}`));
      return;
    }
    exchange.bytes = req.method === 'HEAD' ? 0 : body.length;
    res.writeHead(200, { 'content-type': headerValue(up.headers['content-type']) ?? 'application/octet-stream', 'content-length': body.length, 'docker-content-digest': digest });
    res.end(req.method === 'HEAD' ? undefined : body);
  }

  async function blob(rr: RuleRuntime, route: Extract<Route, { kind: 'blob' }>, credentials: BasicCredentials | undefined, req: IncomingMessage, res: ServerResponse, signal: AbortSignal, exchange: Exchange): Promise<void> {
    // identity: the bytes must hash to the digest; never let a hop compress or decompress them.
    const headers: Record<string, string> = { 'accept-encoding': 'identity' };
    if (req.headers.range) headers.range = req.headers.range;
    const method = req.method === 'HEAD' ? 'HEAD' : 'GET';
    if (method === 'GET') {
      const stream = blobStreams.reserve(req.socket.remoteAddress ?? '', 1);
      if (!stream.ok) {
        exchange.error = 'too many blob streams from this client';
        sendError(res, registryError(429, 'TOOMANYREQUESTS', `this client already has ${blobStreams.perClient} blob downloads in progress`), { 'retry-after': '1' });
        return;
      }
      res.once('close', () => stream.reservation.release());
    }
    const started = performance.now();
    const up = await rr.client.fetch({ method, path: `/v2/${route.name}/blobs/${route.digest}`, headers, scope: `repository:${route.name}:pull`, credentials, signal, followRedirects: true, lane: 'blob' });
    metrics.upstreamSeconds.observe({ rule: rr.rule.name, kind: 'blob' }, (performance.now() - started) / 1000);
    if (await upstreamFailed(up, rr, route, res, [200, 206])) return;
    if (up.statusCode === 206 && !req.headers.range) {
      // A part passed on as the whole blob would skip the digest check (it only covers a 200).
      up.body.destroy();
      exchange.error = 'upstream answered 206 to a request without Range';
      sendError(res, registryError(502, 'UNAVAILABLE', `upstream answered a partial body (206) for ${route.digest} without a Range request`));
      return;
    }
    const out: Record<string, string> = {};
    for (const name of BLOB_HEADERS) {
      const value = headerValue(up.headers[name]);
      if (value !== undefined) out[name] = value;
    }
    out['docker-content-digest'] = route.digest;
    if (req.method === 'HEAD') {
      // A HEAD turned into GET by a redirect: keep the headers, drop the body.
      up.body.destroy();
      res.writeHead(200, out);
      res.end();
      return;
    }
    res.writeHead(up.statusCode, out);
    metrics.inflight.inc();
    const verify = up.statusCode === 200 && rr.rule.verifyBlobDigests;
    const length = Number(out['content-length']);
    const error = await streamBody(up.body, res, {
      minimumRate,
      ...(verify ? { digest: route.digest } : {}),
      ...(Number.isSafeInteger(length) && length >= 0 ? { length } : {}),
      onBytes: (n) => {
        exchange.bytes += n;
      },
    });
    metrics.inflight.dec();
    if (error) {
      exchange.error = error.message;
      // Never let a short or corrupt body look complete: cut the connection.
      res.destroy();
    }
  }

  async function tags(rr: RuleRuntime, route: Extract<Route, { kind: 'tags' }>, credentials: BasicCredentials | undefined, req: IncomingMessage, res: ServerResponse, signal: AbortSignal): Promise<void> {
    const query = new URLSearchParams(route.query);
    const forwarded = new URLSearchParams();
    const n = query.get('n');
    if (n !== null) {
      if (!/^\d{1,6}$/.test(n)) {
        sendError(res, registryError(400, 'PAGINATION_NUMBER_INVALID', 'n must be a non-negative integer'));
        return;
      }
      forwarded.set('n', n);
    }
    const last = query.get('last');
    if (last !== null) forwarded.set('last', last);
    const search = forwarded.size > 0 ? `?${forwarded.toString()}` : '';
    const up = await rr.client.fetch({ method: 'GET', path: `/v2/${route.name}/tags/list${search}`, headers: { accept: 'application/json' }, scope: `repository:${route.name}:pull`, credentials, signal, followRedirects: false, lane: 'metadata' });
    if (await upstreamFailed(up, rr, route, res)) return;
    const read = await readBuffered(up, req, res, MANIFEST_LIMIT_BYTES);
    if (read === null) return;
    let parsed: { name?: unknown; tags?: unknown };
    try {
      parsed = JSON.parse('body' in read ? read.body.toString('utf8') : '') as typeof parsed;
    } catch {
      sendError(res, registryError(502, 'UNAVAILABLE', 'upstream tag list is not valid JSON'));
      return;
    }
    const body = JSON.stringify({ ...parsed, name: `${rr.rule.name}/${route.name}` });
    const headers: Record<string, string | number> = { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body) };
    const link = headerValue(up.headers.link);
    if (link) {
      // Point the next page at the proxy's path; the upstream's may be absolute.
      const m = /<([^>]*)>(.*)/.exec(link);
      if (m) {
        const next = new URL(m[1] ?? '', rr.rule.upstream);
        const prefix = `/v2/${route.name}/tags/list`;
        if (next.pathname === prefix) headers.link = `</v2/${rr.rule.name}/${route.name}/tags/list${next.search}>${m[2] ?? ''}`;
      }
    }
    res.writeHead(200, headers);
    res.end(req.method === 'HEAD' ? undefined : body);
  }

  async function serveRegistry(req: IncomingMessage, res: ServerResponse, exchange: Exchange): Promise<void> {
    const runtime = options.runtime();
    if (!runtime) {
      sendError(res, registryError(503, 'UNAVAILABLE', 'configuration not loaded'));
      return;
    }
    const routed = parseRoute(req.method ?? 'GET', req.url ?? '');
    if (!routed.ok) {
      exchange.error = routed.error.message;
      sendError(res, routed.error, routed.error.status === 405 ? { allow: 'GET, HEAD' } : {});
      return;
    }
    const route = routed.route;
    exchange.kind = route.kind;
    if (route.kind === 'base') {
      baseRoute(runtime, req, res, exchange);
      return;
    }
    exchange.repository = route.name;
    exchange.reference = route.kind === 'manifest' ? route.reference : route.kind === 'blob' ? route.digest : null;
    const rr = runtime.rules.get(route.rule);
    if (!rr) {
      sendError(res, registryError(404, 'NAME_UNKNOWN', `no registry rule "${route.rule}" on this proxy`));
      return;
    }
    exchange.rule = rr.rule.name;
    const auth = authenticate(runtime, rr, req.headers.authorization);
    if (!auth.ok) {
      exchange.namespace = auth.namespace ?? null;
      exchange.error = auth.error.message;
      sendError(res, auth.error, auth.challenge ? { 'www-authenticate': CHALLENGE } : {});
      return;
    }
    exchange.namespace = auth.namespace;
    // The rule's repository filter holds for every auth mode, here as in the webhook: a Pod can
    // write any repository after the rule's prefix itself.
    const repositoryRefusal = rr.rule.repositoryFilter.refuse(route.name);
    if (repositoryRefusal !== null) {
      const error = registryError(403, 'DENIED', `repository "${route.name}" is ${repositoryRefusal === 'excluded' ? 'excluded from' : 'not included in'} rule "${rr.rule.name}"`);
      exchange.error = error.message;
      sendError(res, error);
      return;
    }
    // The client going away aborts the upstream request and any stream in flight.
    const abort = new AbortController();
    const onClose = () => {
      if (!res.writableFinished) abort.abort();
    };
    res.on('close', onClose);
    try {
      if (route.kind === 'manifest') await manifest(rr, route, auth.credentials, req, res, abort.signal, exchange);
      else if (route.kind === 'blob') await blob(rr, route, auth.credentials, req, res, abort.signal, exchange);
      else await tags(rr, route, auth.credentials, req, res, abort.signal);
    } catch (error) {
      if (abort.signal.aborted) {
        exchange.error = 'client went away';
        return;
      }
      exchange.error = (error as Error).message;
      if (error instanceof UpstreamAuthError) {
        if (error.kind === 'rejected') {
          const u = unauthorizedUpstream(rr, route.name);
          sendError(res, u.error, u.headers);
        } else sendError(res, registryError(502, 'UNAVAILABLE', `upstream authentication failed: ${error.message}`));
        return;
      }
      const code = (error as { code?: string }).code ?? '';
      const timeout = code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'UND_ERR_HEADERS_TIMEOUT' || code === 'UND_ERR_BODY_TIMEOUT';
      sendError(res, registryError(timeout ? 504 : 502, 'UNAVAILABLE', `upstream ${timeout ? 'timed out' : 'unreachable'}: ${code || (error as Error).message}`));
    } finally {
      res.off('close', onClose);
    }
  }

  return (req, res) => {
    const started = performance.now();
    const url = req.url ?? '';
    res.setHeader('docker-distribution-api-version', 'registry/2.0');
    if (req.method === 'GET' && (HEALTH_PATHS.has(url) || (opsOnRegistryPort && OPS_PATHS.has(url)))) {
      void serveOps(options, url, res);
      return;
    }
    const exchange: Exchange = { rule: null, kind: 'unknown', repository: null, reference: null, namespace: null, error: null, bytes: 0 };
    res.on('close', () => {
      const status = res.writableFinished ? res.statusCode : 0; // 0: connection cut before the end
      metrics.requests.inc({ rule: exchange.rule ?? '', kind: exchange.kind, status: String(status) });
      if (exchange.bytes > 0) metrics.bytes.inc({ rule: exchange.rule ?? '', kind: exchange.kind }, exchange.bytes);
      logger.info(
        {
          access: 'pull',
          method: req.method,
          rule: exchange.rule,
          kind: exchange.kind,
          repository: exchange.repository,
          reference: exchange.reference,
          namespace: exchange.namespace,
          status,
          bytes: exchange.bytes,
          durationMs: Math.round((performance.now() - started) * 1000) / 1000,
          ...(exchange.error ? { error: exchange.error } : {}),
        },
        'request',
      );
    });
    serveRegistry(req, res, exchange).catch((error: unknown) => {
      logger.error({ err: error }, 'proxy request failed');
      sendError(res, registryError(500, 'UNAVAILABLE', 'internal error'));
    });
  };
}
