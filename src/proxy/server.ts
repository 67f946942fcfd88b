// The registry proxy's HTTP shell: route, authenticate and authorize the client, ask the content
// source, answer; per-client limits, the access log and metrics. It never reaches the upstream
// itself. Node's http server directly: every byte path here is hot.

import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from '../log.js';
import { ContentError, type ContentRequest, type ContentSource } from '../content/source.js';
import type { UpstreamCredentials } from '../upstream/authorizer.js';
import type { RuleUpstream } from '../upstream/rule.js';
import { answerBase, authenticate, repositoryRefusal } from './access.js';
import { answerContentError, answerManifest, answerTags, CHALLENGE, sendError, type ContentKind } from './answer.js';
import type { Budget } from './budget.js';
import { registryError } from './errors.js';
import { recordExchange, registerMetrics, type Exchange, type ProxyMetrics } from './exchange.js';
import { ClientLimits, registerLimitMetrics } from './limits.js';
import { INSTANCE_HEADER, LISTENER_CHECK_HEADER } from './listener.js';
import { isOpsRequest, serveOps, type OpsHandlerOptions } from './ops.js';
import { parseRoute, type Route } from './route.js';
import type { ProxyRuntime } from './runtime.js';
import { DEFAULT_MINIMUM_RATE, streamBody, type MinimumRate } from './stream.js';

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
  /** This process's random id, sent on every answer so that the listener check knows its own
   * (src/proxy/listener.ts); nothing else about the process. */
  readonly instanceId?: string;
}

type ContentRoute = Extract<Route, { kind: ContentKind }>;

export function createProxyHandler(options: ProxyHandlerOptions): (req: IncomingMessage, res: ServerResponse) => void {
  const shell = new RegistryShell(options);
  const opsOnRegistryPort = options.opsOnRegistryPort ?? true;
  return (req, res) => {
    const url = req.url ?? '';
    res.setHeader('docker-distribution-api-version', 'registry/2.0');
    if (options.instanceId !== undefined) res.setHeader(INSTANCE_HEADER, options.instanceId);
    if (isOpsRequest(req.method, url, opsOnRegistryPort)) {
      void serveOps(options, url, res);
      return;
    }
    const exchange = recordExchange(req, res, shell.metrics, options.logger);
    exchange.selfCheck = options.instanceId !== undefined && req.headers[LISTENER_CHECK_HEADER] === options.instanceId;
    shell.serve(req, res, exchange).catch((error: unknown) => {
      options.logger.error({ err: error }, 'proxy request failed');
      sendError(res, registryError(500, 'UNAVAILABLE', 'internal error'));
    });
  };
}

class RegistryShell {
  readonly metrics: ProxyMetrics;
  private readonly limits: ClientLimits;
  private readonly minimumRate: MinimumRate;

  constructor(private readonly options: ProxyHandlerOptions) {
    this.metrics = registerMetrics(options.metrics);
    this.limits = new ClientLimits(options.bufferBudget, options.blobStreamsPerClient);
    registerLimitMetrics(options.metrics, this.limits);
    this.minimumRate = options.minimumClientRate ?? DEFAULT_MINIMUM_RATE;
  }

  /** Route, then who may pull what: everything decided before any content is looked up. */
  async serve(req: IncomingMessage, res: ServerResponse, exchange: Exchange): Promise<void> {
    const runtime = this.options.runtime();
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
      exchange.namespace = answerBase(runtime, req, res);
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
    const credentials = this.authorize(runtime, rr, route, req, res, exchange);
    if (credentials === null) return;
    await this.serveContent(runtime.content, rr, route, credentials, req, res, exchange);
  }

  /** The credentials to ask the upstream with, or null when the client was refused (and answered). */
  private authorize(runtime: ProxyRuntime, rr: RuleUpstream, route: ContentRoute, req: IncomingMessage, res: ServerResponse, exchange: Exchange): UpstreamCredentials | undefined | null {
    const auth = authenticate(runtime, rr, req.headers.authorization, this.options.logger);
    if (!auth.ok) {
      exchange.namespace = auth.namespace ?? null;
      exchange.error = auth.error.message;
      sendError(res, auth.error, auth.challenge ? { 'www-authenticate': CHALLENGE } : {});
      return null;
    }
    exchange.namespace = auth.namespace;
    const refusal = repositoryRefusal(rr, route.name);
    if (refusal !== null) {
      exchange.error = refusal.message;
      sendError(res, refusal);
      return null;
    }
    return auth.credentials;
  }

  /** Asks the content source and answers; the client going away aborts the request and any stream in flight. */
  private async serveContent(content: ContentSource, rr: RuleUpstream, route: ContentRoute, credentials: UpstreamCredentials | undefined, req: IncomingMessage, res: ServerResponse, exchange: Exchange): Promise<void> {
    const abort = new AbortController();
    const onClose = () => {
      if (!res.writableFinished) abort.abort();
    };
    res.on('close', onClose);
    const request: ContentRequest = { rule: rr.rule.name, repository: route.name, method: req.method === 'HEAD' ? 'HEAD' : 'GET', credentials, signal: abort.signal };
    try {
      if (route.kind === 'manifest') await this.manifest(content, route, request, req, res, exchange);
      else if (route.kind === 'blob') await this.blob(content, route, request, req, res, exchange);
      else await this.tags(content, route, request, res);
    } catch (error) {
      if (error instanceof ContentError) {
        if (error.details.note !== undefined) exchange.error = error.details.note;
        answerContentError(res, error, route.kind, route.name, rr.rule.auth.mode);
      } else if (abort.signal.aborted) exchange.error = 'client went away';
      else throw error;
    } finally {
      res.off('close', onClose);
    }
  }

  private async manifest(content: ContentSource, route: Extract<Route, { kind: 'manifest' }>, request: ContentRequest, req: IncomingMessage, res: ServerResponse, exchange: Exchange): Promise<void> {
    const manifest = await content.manifest({
      ...request,
      reference: route.reference,
      byDigest: route.byDigest,
      accept: req.headers.accept,
      buffers: this.limits.bufferAllowance(res),
      onUpstreamAnswer: this.observeUpstream(request.rule, 'manifest'),
    });
    if (manifest.body && request.method === 'GET') exchange.bytes = manifest.body.length;
    exchange.cache = manifest.cache ?? null;
    if (manifest.warning) this.options.logger.warn({ rule: request.rule, repository: route.name, reference: route.reference, digest: manifest.digest }, manifest.warning);
    answerManifest(res, manifest);
  }

  private async blob(content: ContentSource, route: Extract<Route, { kind: 'blob' }>, request: ContentRequest, req: IncomingMessage, res: ServerResponse, exchange: Exchange): Promise<void> {
    if (request.method === 'GET' && !this.limits.takeBlobStream(res)) {
      exchange.error = 'too many blob streams from this client';
      sendError(res, registryError(429, 'TOOMANYREQUESTS', `this client already has ${this.limits.blobStreams.perClient} blob downloads in progress`), { 'retry-after': '1' });
      return;
    }
    const blob = await content.blob({ ...request, digest: route.digest, range: req.headers.range, onUpstreamAnswer: this.observeUpstream(request.rule, 'blob') });
    exchange.cache = blob.cache ?? null;
    res.writeHead(blob.status, blob.headers);
    if (!blob.body) {
      res.end();
      return;
    }
    this.metrics.inflight.inc();
    const error = await streamBody(blob.body, res, {
      minimumRate: this.minimumRate,
      onBytes: (n) => {
        exchange.bytes += n;
      },
    });
    this.metrics.inflight.dec();
    if (error) {
      exchange.error = error.message;
      // Never let a short or corrupt body look complete: cut the connection.
      res.destroy();
    }
  }

  private async tags(content: ContentSource, route: Extract<Route, { kind: 'tags' }>, request: ContentRequest, res: ServerResponse): Promise<void> {
    const query = new URLSearchParams(route.query);
    const n = query.get('n');
    if (n !== null && !/^\d{1,6}$/.test(n)) {
      sendError(res, registryError(400, 'PAGINATION_NUMBER_INVALID', 'n must be a non-negative integer'));
      return;
    }
    const tags = await content.tags({ ...request, n, last: query.get('last'), buffers: this.limits.bufferAllowance(res) });
    answerTags(res, request.rule, route.name, tags);
  }

  private observeUpstream(rule: string, kind: 'manifest' | 'blob'): (seconds: number) => void {
    return (seconds) => this.metrics.upstreamSeconds.observe({ rule, kind }, seconds);
  }
}
