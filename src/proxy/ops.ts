// The operations endpoints: health, readiness, Prometheus metrics and the upstream status document;
// on the operations port only, `POST /warm` (cache warm-up) and `POST /purge` (forget what a
// repository may read from the cache).
//
// Who may read what: /healthz and /readyz answer anyone (kubelet probes). /metrics answers anyone on
// the operations port (Prometheus). /status answers a loopback peer (the node itself, `kubectl
// port-forward`) and otherwise only the webhook's status collector, which presents a bearer token
// derived from the broker key (collectorToken). /warm and /purge change the cache: loopback peers
// only, whatever token is presented (the collector reads, it never needs to change anything). The
// collector listener (the Pod IP, where the hostNetwork exposure has no other operations address)
// serves GET /status (with the token), /healthz and /readyz, and the admission endpoints.
//
// `/admission/…` (both listeners, never the registry port): the webhook's questions about upstreams
// (src/proxy/server.ts serves them). Always the resolver's bearer token (opsToken 'resolver'), from
// loopback too: they read upstream content with the rule's credentials.

import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Registry } from 'prom-client';
import { warmImages } from '../cache/warm.js';
import { parseWarmRequest, WARM_BODY_LIMIT_BYTES } from '../cache/warmplan.js';
import type { Logger } from '../log.js';
import { digestError, isValidRepositoryPath } from '../reference/reference.js';
import { isLoopbackAddress } from '../upstream/addresses.js';
import type { Prober } from '../upstream/probe.js';
import { verifyOpsToken } from '../rules/credentials.js';
import type { ListenerStatus } from './listener.js';
import { ADMISSION_PREFIX } from './route.js';
import type { ProxyRuntime } from './runtime.js';

export interface OpsHandlerOptions {
  readonly runtime: () => ProxyRuntime | undefined;
  readonly metrics: Registry;
  readonly prober?: Prober;
  readonly ready?: () => boolean;
  readonly logger?: Logger;
  /** The registry listener's claim on its loopback address, when checked (src/proxy/listener.ts). */
  readonly listener?: () => ListenerStatus | undefined;
  /** This handler serves the collector listener: GET /status (with the collector token) and health only. */
  readonly collectorListener?: boolean;
  /** Serves the admission endpoints once the resolver token was checked (createProxyHandlers().admission). */
  readonly admission?: (req: IncomingMessage, res: ServerResponse) => void;
}

const OPS_PATHS = new Set(['/healthz', '/readyz', '/metrics', '/status']);
/** Health answers nothing about the configuration: always served, so probes work on either port. */
const HEALTH_PATHS = new Set(['/healthz', '/readyz']);
/** What the collector listener serves: health, and /status for the collector. */
const COLLECTOR_PATHS = new Set(['/healthz', '/readyz', '/status']);
/** Endpoints that change the cache: loopback peers only. */
const LOOPBACK_ONLY_PATHS = new Set(['/warm', '/purge']);

export interface OpsRequestFacts {
  readonly method: string;
  /** The URL path, without the query. */
  readonly path: string;
  /** The peer's address. */
  readonly peer: string;
  readonly authorization: string | undefined;
  /** Served on the collector listener (see OpsHandlerOptions.collectorListener). */
  readonly collectorListener: boolean;
  /** The broker keys the collector token may be derived from; read only when a token is needed. */
  readonly keys: () => readonly Uint8Array[];
}

/** Why an operations request may not be served (status and message), or null when it may. Pure. */
export function opsRefusal(facts: OpsRequestFacts): { status: 401 | 403 | 404; message: string } | null {
  if (facts.path.startsWith(ADMISSION_PREFIX)) {
    if (facts.authorization === undefined) return { status: 401, message: "the admission endpoints need the admission resolver's bearer token (the webhook's)" };
    return verifyOpsToken(facts.keys(), 'resolver', facts.authorization) ? null : { status: 403, message: "the bearer token is not the admission resolver's for this proxy's broker keys" };
  }
  if (facts.collectorListener && (facts.method !== 'GET' || !COLLECTOR_PATHS.has(facts.path))) return { status: 404, message: 'not found: this address serves GET /status (status collector), /admission/… (admission resolver), /healthz and /readyz' };
  if (HEALTH_PATHS.has(facts.path)) return null;
  const loopback = isLoopbackAddress(facts.peer);
  if (LOOPBACK_ONLY_PATHS.has(facts.path)) return loopback && !facts.collectorListener ? null : { status: 403, message: `${facts.path} answers loopback peers only (on the node, or kubectl port-forward)` };
  const guarded = facts.collectorListener || (facts.path === '/status' && !loopback);
  if (!guarded) return null;
  if (facts.authorization === undefined) return { status: 401, message: 'this endpoint needs the status collector\'s bearer token from a non-loopback address (or use kubectl port-forward)' };
  return verifyOpsToken(facts.keys(), 'collector', facts.authorization) ? null : { status: 403, message: 'the bearer token is not the status collector\'s for this proxy\'s broker keys' };
}

function refusal(options: OpsHandlerOptions, req: IncomingMessage, path: string): { status: number; message: string } | null {
  return opsRefusal({
    method: req.method ?? '',
    path,
    peer: req.socket.remoteAddress ?? '',
    authorization: req.headers.authorization,
    collectorListener: options.collectorListener === true,
    keys: () => {
      try {
        return options.runtime()?.brokerKeys?.keys() ?? [];
      } catch {
        return []; // no usable signing key: no token can be right
      }
    },
  });
}

/** Whether the registry port answers `url` as an operations endpoint. */
export function isOpsRequest(method: string | undefined, url: string, opsOnRegistryPort: boolean): boolean {
  return method === 'GET' && (HEALTH_PATHS.has(url) || (opsOnRegistryPort && OPS_PATHS.has(url)));
}

/** The operations port's handler: the GET endpoints, and `POST /warm` and `POST /purge`, which only
 * this port serves (the registry port is reachable by every Pod on the node). */
export function createOpsHandler(options: OpsHandlerOptions): (req: IncomingMessage, res: ServerResponse) => void {
  const warm = { running: false };
  return (req, res) => {
    const url = req.url ?? '';
    const refused = refusal(options, req, url.split('?')[0] ?? '');
    if (refused) {
      req.resume();
      res.writeHead(refused.status, { 'content-type': 'text/plain', ...(refused.status === 401 ? { 'www-authenticate': 'Bearer realm="pullbridge-ops"' } : {}) }).end(`${refused.message}\n`);
      return;
    }
    if (url.startsWith(ADMISSION_PREFIX)) {
      if (options.admission) options.admission(req, res);
      else res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: this proxy does not answer admission questions here\n');
      return;
    }
    if (url === '/warm') {
      if (req.method !== 'POST') {
        res.writeHead(405, { 'content-type': 'text/plain', allow: 'POST' }).end('POST /warm with {"images": [...], "platforms": [...]}');
        return;
      }
      serveWarm(options, warm, req, res).catch((error: unknown) => {
        options.logger?.error({ err: error }, 'cache warm-up failed');
        if (!res.headersSent) answerJson(res, 500, { error: 'internal error' });
        else res.destroy();
      });
      return;
    }
    if (url === '/purge' || url.startsWith('/purge?')) {
      if (req.method !== 'POST') {
        res.writeHead(405, { 'content-type': 'text/plain', allow: 'POST' }).end('POST /purge?rule=R&repository=X[&digest=D]');
        return;
      }
      req.resume();
      servePurge(options, url).then(
        ({ status, body }) => answerJson(res, status, body),
        (error: unknown) => {
          options.logger?.error({ err: error }, 'cache purge failed');
          answerJson(res, 500, { error: 'internal error' });
        },
      );
      return;
    }
    if (req.method !== 'GET' || !OPS_PATHS.has(url)) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: GET /healthz, /readyz, /metrics or /status, POST /warm, POST /purge');
      return;
    }
    void serveOps(options, url, res);
  };
}

function answerJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', ...headers }).end(`${JSON.stringify(body, null, 2)}\n`);
}

/** The request body; null when it is larger than `limit` (the rest is not read), undefined when
 * the client went away before sending it all. */
function readBody(req: IncomingMessage, limit: number): Promise<Buffer | null | undefined> {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers['content-length']);
    if (Number.isFinite(declared) && declared > limit) {
      resolve(null);
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        req.pause();
        resolve(null);
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks, size)));
    req.on('close', () => resolve(req.complete ? Buffer.concat(chunks, size) : undefined));
    req.on('error', reject);
  });
}

/**
 * `POST /warm`: fills the node cache with the images of a JSON body, one warm-up at a time, and
 * answers the report when done. The client going away stops it.
 */
async function serveWarm(options: OpsHandlerOptions, warm: { running: boolean }, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const runtime = options.runtime();
  if (!runtime?.cache) {
    answerJson(res, 409, { error: 'this proxy has no node cache (cache.path in the config; it takes effect when the proxy starts): there is nothing to warm' }, { connection: 'close' });
    return;
  }
  const type = (req.headers['content-type'] ?? '').split(';')[0]?.trim().toLowerCase();
  if (type !== 'application/json') {
    answerJson(res, 415, { error: 'Content-Type must be application/json' }, { connection: 'close' });
    return;
  }
  const body = await readBody(req, WARM_BODY_LIMIT_BYTES).catch(() => undefined);
  if (body === undefined) return;
  if (body === null) {
    answerJson(res, 413, { error: `the body is larger than the limit of ${WARM_BODY_LIMIT_BYTES} bytes` }, { connection: 'close' });
    return;
  }
  let document: unknown;
  try {
    document = JSON.parse(body.toString('utf8'));
  } catch (error) {
    answerJson(res, 400, { error: `the body is not valid JSON: ${(error as Error).message}` });
    return;
  }
  const parsed = parseWarmRequest(document);
  if (!parsed.ok) {
    answerJson(res, 400, { error: parsed.error });
    return;
  }
  if (warm.running) {
    answerJson(res, 429, { error: 'a warm-up is already running on this proxy; try again when it is done' }, { 'retry-after': '10' });
    return;
  }
  warm.running = true;
  const abort = new AbortController();
  const onClose = () => {
    if (!res.writableFinished) abort.abort();
  };
  res.on('close', onClose);
  // The answer comes when every image is done, which may take longer than the idle timeout.
  req.socket.setTimeout(0);
  const started = performance.now();
  try {
    const report = await warmImages({ content: runtime.content, rules: runtime.rules, config: runtime.config, images: parsed.request.images, platforms: parsed.request.platforms, signal: abort.signal });
    const counts = { warmed: 0, skipped: 0, failed: 0 };
    for (const image of report.images) counts[image.status]++;
    options.logger?.info({ ...counts, seconds: Number(((performance.now() - started) / 1000).toFixed(3)) }, 'cache warm-up done');
    if (!abort.signal.aborted) answerJson(res, 200, report);
  } finally {
    warm.running = false;
    res.off('close', onClose);
  }
}

/**
 * `POST /purge?rule=R&repository=X[&digest=D]`: the node cache forgets what (rule, repository) may
 * read — its link to D and the tag records naming D, or all its links and tag records — on this node
 * and in the shared tier (NodeCache.purge). Its next pull asks the upstream, as a first one does.
 */
async function servePurge(options: OpsHandlerOptions, url: string): Promise<{ status: number; body: unknown }> {
  const runtime = options.runtime();
  if (!runtime?.cache) return { status: 409, body: { error: 'this proxy has no node cache (cache.path in the config): there is nothing to purge' } };
  const query = new URL(url, 'http://ops').searchParams;
  const unknown = [...query.keys()].filter((key) => !['rule', 'repository', 'digest'].includes(key));
  if (unknown.length > 0) return { status: 400, body: { error: `unknown parameter ${unknown.join(', ')}: give rule, repository and optionally digest` } };
  const rule = query.get('rule');
  const repository = query.get('repository');
  const digest = query.get('digest') ?? undefined;
  if (!rule) return { status: 400, body: { error: 'rule is required (a registry rule name from the config)' } };
  if (!runtime.config.registries.some((r) => r.name === rule)) return { status: 404, body: { error: `rule "${rule}" is not in the config (rules: ${runtime.config.registries.map((r) => r.name).join(', ')})` } };
  if (!repository) return { status: 400, body: { error: 'repository is required (as on the upstream, without the rule: team/app)' } };
  if (!isValidRepositoryPath(repository)) return { status: 400, body: { error: `repository "${repository}" is not a repository path (lower-case components separated by "/")` } };
  const invalid = digest === undefined ? null : digestError(digest);
  if (invalid !== null) return { status: 400, body: { error: `digest: ${invalid}` } };
  const outcome = await runtime.cache.purge(rule, repository, digest);
  const body = { rule, repository, ...(digest !== undefined ? { digest } : {}), ...outcome };
  // Purged here but not in the tier: other nodes may still take it from there; the caller must know.
  if (outcome.shared === 'failed') return { status: 502, body: { ...body, error: 'purged on this node, but the shared tier could not be purged (it is down or refuses writes: see /status); run the purge again' } };
  return { status: 200, body };
}

export async function serveOps(options: OpsHandlerOptions, url: string, res: ServerResponse): Promise<void> {
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
    const body = JSON.stringify({ configLoaded: runtime !== undefined, rules: runtime?.config.registries.map((r) => r.name) ?? [], upstreams: options.prober?.statuses() ?? [], cache: runtime?.cache?.status() ?? null, listener: options.listener?.() ?? null }, null, 2);
    res.writeHead(200, { 'content-type': 'application/json; charset=utf-8' }).end(body);
  }
}
