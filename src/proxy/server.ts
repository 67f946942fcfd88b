// The registry proxy's HTTP shell: route, authenticate and authorize the client, ask the content
// source, answer; per-client limits, the access log and metrics. Node's http server directly: every
// byte path here is hot.
//
// The same shell answers the webhook's admission questions on the operations port (ops.ts checks the
// resolver token first): manifests and blobs with the namespace's credential (its own header, as
// Authorization carries the token) through the same authenticate → authorize → content path as a
// pull; the anonymous probe and the referrers API straight through the rule's upstream client.

import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from '../log.js';
import { ContentError, type ContentRequest, type ContentSource } from '../content/source.js';
import { UpstreamAuthError, type UpstreamCredentials } from '../upstream/authorizer.js';
import { MANIFEST_ACCEPT, upstreamReferrers } from '../content/passthrough.js';
import { FILTERS_APPLIED_HEADER } from '../content/referrers.js';
import type { RuleUpstream } from '../upstream/rule.js';
import { answerBase, authenticate, repositoryRefusal } from './access.js';
import { answerCatalog, answerContentError, answerManifest, answerTags, CHALLENGE, sendError, type ContentKind } from './answer.js';
import { catalogAccess, listCatalog } from './catalog.js';
import { pageTags, parsePageQuery, tagsLink } from './listing.js';
import type { Budget } from './budget.js';
import { registryError } from './errors.js';
import { recordExchange, registerMetrics, type Exchange, type ProxyMetrics } from './exchange.js';
import { ClientLimits, registerLimitMetrics } from './limits.js';
import { INSTANCE_HEADER, LISTENER_CHECK_HEADER } from './listener.js';
import { isOpsRequest, serveOps, type OpsHandlerOptions } from './ops.js';
import { parseAdmissionRoute, parseRoute, type AdmissionRoute, type Route } from './route.js';
import type { ProxyRuntime } from './runtime.js';
import { answerToken, challenges, isTokenRequest } from './token.js';
import { DEFAULT_MINIMUM_RATE, streamBody, type MinimumRate } from './stream.js';
import type { VerifyGate } from './verifygate.js';

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

type ContentRoute = Extract<Route, { kind: Exclude<ContentKind, 'referrers'> }>;

/** The header carrying the namespace's registry credential (`Basic …`) on admission requests. */
export const NAMESPACE_AUTHORIZATION_HEADER = 'x-pullbridge-namespace-authorization';
/** The largest blob an admission request reads, as the client asks (`x-pullbridge-max-bytes`). */
export const MAX_BYTES_HEADER = 'x-pullbridge-max-bytes';
/** Admission reads small blobs only (signature payloads, configs): the cap whatever the client asks. */
export const ADMISSION_BLOB_LIMIT_BYTES = 4 * 1024 * 1024;
/** A referrers index read whole (never cached: each request asks the upstream). */
export const REFERRERS_LIMIT_BYTES = 1024 * 1024;
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';

type RequestHandler = (req: IncomingMessage, res: ServerResponse) => void;

export function createProxyHandler(options: ProxyHandlerOptions): RequestHandler {
  return createProxyHandlers(options).registry;
}

/** The registry port's handler, and the admission handler for the operations port: one shell, so
 * both share limits, metrics and the access log. */
export function createProxyHandlers(options: ProxyHandlerOptions): { registry: RequestHandler; admission: RequestHandler } {
  const shell = new RegistryShell(options);
  const opsOnRegistryPort = options.opsOnRegistryPort ?? true;
  const admission: RequestHandler = (req, res) => {
    const exchange = recordExchange(req, res, shell.metrics, options.logger, 'admission');
    shell.serveAdmission(req, res, exchange).catch((error: unknown) => {
      options.logger.error({ err: error }, 'admission request failed');
      sendError(res, registryError(500, 'UNAVAILABLE', 'internal error'));
    });
  };
  const registry: RequestHandler = (req, res) => {
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
  return { registry, admission };
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
    if (isTokenRequest(req.url ?? '')) {
      answerToken(runtime, req, res, exchange, Math.floor(Date.now() / 1000));
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
    if (route.kind === 'catalog') {
      await this.catalog(runtime, route.query, req, res, exchange);
      return;
    }
    exchange.repository = route.name;
    exchange.reference = route.kind === 'manifest' ? route.reference : route.kind === 'blob' || route.kind === 'referrers' ? route.digest : null;
    const rr = runtime.rules.get(route.rule);
    if (!rr) {
      sendError(res, registryError(404, 'NAME_UNKNOWN', `no registry rule "${route.rule}" on this proxy`));
      return;
    }
    exchange.rule = rr.rule.name;
    if (rr.rule.rewrite === 'never') {
      // No image of a never rule is written onto the proxy: its Pods pull from the registry itself with
      // the rule's own pull secret. Its admission questions (pinDigest, verify) still come on the ops port.
      exchange.error = 'rewrite: never rule';
      sendError(res, registryError(404, 'NAME_UNKNOWN', `rule "${rr.rule.name}" has rewrite: never: its images are pulled from its registry directly, not through this proxy`));
      return;
    }
    const credentials = this.authorize(runtime, rr, route.name, req.headers.authorization, res, exchange);
    if (credentials === null) return;
    if (route.kind === 'referrers') await this.referrers(rr, route, credentials, res, exchange, 'registry');
    else await this.serveContent(runtime.content, rr, route, credentials, req, res, exchange, undefined, runtime.verifyGate);
  }

  /**
   * An admission question (the resolver token already checked): the probe, or a manifest, blob or
   * referrers read with the namespace credential of NAMESPACE_AUTHORIZATION_HEADER, authorized as a
   * pull with that credential is.
   */
  async serveAdmission(req: IncomingMessage, res: ServerResponse, exchange: Exchange): Promise<void> {
    const runtime = this.options.runtime();
    if (!runtime) {
      sendError(res, registryError(503, 'UNAVAILABLE', 'configuration not loaded'));
      return;
    }
    const routed = parseAdmissionRoute(req.method ?? 'GET', req.url ?? '');
    if (!routed.ok) {
      exchange.error = routed.error.message;
      sendError(res, routed.error);
      return;
    }
    const route = routed.route;
    exchange.kind = route.kind;
    exchange.repository = route.name;
    exchange.reference = route.kind === 'blob' || route.kind === 'referrers' ? route.digest : route.reference;
    const rr = runtime.rules.get(route.rule);
    if (!rr) {
      sendError(res, registryError(404, 'NAME_UNKNOWN', `no registry rule "${route.rule}" on this proxy`));
      return;
    }
    exchange.rule = rr.rule.name;
    if (route.kind === 'probe') {
      const refusal = repositoryRefusal(rr, route.name);
      if (refusal !== null) {
        exchange.error = refusal.message;
        sendError(res, refusal);
        return;
      }
      await this.probe(rr, route, res, exchange);
      return;
    }
    if (rr.rule.auth.mode === 'passthrough') {
      // A passthrough rule asks the upstream with the client's own credential, which the webhook never holds.
      exchange.error = 'passthrough rule';
      sendError(res, registryError(403, 'DENIED', `rule "${rr.rule.name}" passes the client's own credential upstream: admission has none to read with`));
      return;
    }
    const namespaceAuthorization = req.headers[NAMESPACE_AUTHORIZATION_HEADER];
    const credentials = this.authorize(runtime, rr, route.name, typeof namespaceAuthorization === 'string' ? namespaceAuthorization : undefined, res, exchange);
    if (credentials === null) return;
    if (route.kind === 'referrers') {
      await this.referrers(rr, route, credentials, res, exchange, 'admission');
      return;
    }
    let maxBytes: number | undefined;
    if (route.kind === 'blob') {
      const asked = Number(req.headers[MAX_BYTES_HEADER]);
      if (!Number.isSafeInteger(asked) || asked < 0) {
        sendError(res, registryError(400, 'UNSUPPORTED', `a blob read needs ${MAX_BYTES_HEADER}: the most bytes the caller takes (at most ${ADMISSION_BLOB_LIMIT_BYTES})`));
        return;
      }
      maxBytes = Math.min(asked, ADMISSION_BLOB_LIMIT_BYTES);
    }
    await this.serveContent(runtime.content, rr, route, credentials, req, res, exchange, maxBytes);
  }

  /** Runs `work` with a signal aborted when the client goes away. */
  private async whileConnected<T>(res: ServerResponse, work: (signal: AbortSignal) => Promise<T>): Promise<T> {
    const abort = new AbortController();
    const onClose = () => {
      if (!res.writableFinished) abort.abort();
    };
    res.on('close', onClose);
    try {
      return await work(abort.signal);
    } finally {
      res.off('close', onClose);
    }
  }

  /**
   * An anonymous manifest HEAD through the rule's transport, never the cache (the question is what
   * the upstream grants anyone). Answers the upstream's status as JSON; a token endpoint refusing
   * anonymous access is a refusal (401), a failure to reach it is not an answer (502).
   */
  private async probe(rr: RuleUpstream, route: Extract<AdmissionRoute, { kind: 'probe' }>, res: ServerResponse, exchange: Exchange): Promise<void> {
    const answer = await this.whileConnected(res, async (signal) => {
      try {
        const reply = await rr.client.fetch({ method: 'HEAD', path: `/v2/${route.name}/manifests/${route.reference}`, headers: { accept: MANIFEST_ACCEPT }, scope: `repository:${route.name}:pull`, credentials: undefined, signal, lane: 'metadata' });
        await reply.body.dump();
        exchange.upstreamStatus = reply.statusCode;
        return { status: 200, body: { status: reply.statusCode } };
      } catch (error) {
        if (error instanceof UpstreamAuthError && error.kind !== 'unavailable') {
          exchange.upstreamStatus = 401;
          return { status: 200, body: { status: 401, note: error.message } };
        }
        if (signal.aborted) return null;
        return { status: 502, body: { error: `the upstream did not answer: ${(error as Error).message}` } };
      }
    });
    if (answer === null) {
      exchange.error = 'client went away';
      return;
    }
    if (answer.status !== 200) exchange.error = (answer.body as { error: string }).error;
    answerJson(res, answer.status, answer.body);
  }

  /**
   * The upstream's referrers of a digest (OCI 1.1), with the credentials a pull of the repository
   * gets, read whole (REFERRERS_LIMIT_BYTES) and not cached (docs/proxy.md says why).
   *
   * On the registry port: the index as the upstream answered it (filtered by artifactType, by the
   * upstream or else here, and then marked OCI-Filters-Applied), its next page on the proxy's path;
   * an upstream without the API (404) answers 404, so clients fall back to the referrers tag scheme.
   * For admission: 200 `{"kind":"found","index":"<base64>"}`, or `{"kind":"unsupported"}` for the
   * upstream's 404; its other refusals as registry errors with its status; failures 502.
   */
  private async referrers(rr: RuleUpstream, route: Extract<Route, { kind: 'referrers' }>, credentials: UpstreamCredentials | undefined, res: ServerResponse, exchange: Exchange, port: 'registry' | 'admission'): Promise<void> {
    await this.whileConnected(res, async (signal) => {
      try {
        const started = performance.now();
        const found = await upstreamReferrers(rr, { rule: rr.rule.name, repository: route.name, method: 'GET', credentials, signal, digest: route.digest, artifactType: route.artifactType, query: route.query, buffers: this.limits.bufferAllowance(res), limit: REFERRERS_LIMIT_BYTES });
        this.metrics.upstreamSeconds.observe({ rule: rr.rule.name, kind: 'referrers' }, (performance.now() - started) / 1000);
        exchange.bytes = found.body.length;
        if (port === 'admission') {
          answerJson(res, 200, { kind: 'found', index: found.body.toString('base64') });
          return;
        }
        const headers: Record<string, string | number> = { 'content-type': OCI_INDEX, 'content-length': found.body.length };
        if (found.filtersApplied !== undefined) headers[FILTERS_APPLIED_HEADER] = found.filtersApplied;
        if (found.nextPage) headers.link = `</v2/${rr.rule.name}/${route.name}/referrers/${route.digest}${found.nextPage.query}>${found.nextPage.linkParameters}`;
        res.writeHead(200, headers).end(found.body);
      } catch (error) {
        if (!(error instanceof ContentError)) {
          if (signal.aborted) {
            exchange.error = 'client went away';
            return;
          }
          throw error;
        }
        if (error.details.note !== undefined) exchange.error = error.details.note;
        else exchange.error = error.message;
        const status = error.details.status;
        if (port === 'admission') {
          if (error.failure === 'not-found') answerJson(res, 200, { kind: 'unsupported' });
          else if (status >= 400 && status < 500 && status !== 429) sendError(res, registryError(status === 401 ? 403 : status, 'DENIED', `the upstream registry answered ${status} for the referrers of ${route.digest} in ${route.name}`));
          else sendError(res, registryError(502, 'UNAVAILABLE', error.details.note !== undefined ? error.message : `the upstream registry answered ${status}`));
        } else if (error.failure === 'not-found' && error.details.registryBody === undefined) {
          // No registry error document: a registry without the referrers API (distribution 2.8 answers a plain 404 page).
          sendError(res, registryError(404, 'UNSUPPORTED', `the upstream registry of rule "${rr.rule.name}" has no referrers API: use the referrers tag scheme`));
        } else answerContentError(res, error, 'referrers', route.name, rr.rule.auth.mode);
      }
    });
  }

  /** The credentials to ask the upstream with, or null when the client was refused (and answered). */
  private authorize(runtime: ProxyRuntime, rr: RuleUpstream, repository: string, authorization: string | undefined, res: ServerResponse, exchange: Exchange): UpstreamCredentials | undefined | null {
    const auth = authenticate(runtime, rr, repository, authorization, this.options.logger);
    if (!auth.ok) {
      exchange.namespace = auth.namespace ?? null;
      exchange.error = auth.error.message;
      sendError(res, auth.error, auth.challenge ? { 'www-authenticate': challenges(runtime, res.req, { rule: rr.rule, repository }, auth.tokenError) } : {});
      return null;
    }
    exchange.namespace = auth.namespace;
    if (auth.viaToken) exchange.credential = 'token';
    const refusal = repositoryRefusal(rr, repository);
    if (refusal !== null) {
      exchange.error = refusal.message;
      sendError(res, refusal);
      return null;
    }
    return auth.credentials;
  }

  /** Asks the content source and answers; the client going away aborts the request and any stream in flight. */
  /** `gate`: pulls only (the admission endpoints serve the webhook, which verifies on its own). */
  private async serveContent(content: ContentSource, rr: RuleUpstream, route: ContentRoute, credentials: UpstreamCredentials | undefined, req: IncomingMessage, res: ServerResponse, exchange: Exchange, maxBlobBytes?: number, gate?: VerifyGate): Promise<void> {
    const abort = new AbortController();
    const onClose = () => {
      if (!res.writableFinished) abort.abort();
    };
    res.on('close', onClose);
    const request: ContentRequest = { rule: rr.rule.name, repository: route.name, method: req.method === 'HEAD' ? 'HEAD' : 'GET', credentials, signal: abort.signal };
    try {
      if (route.kind === 'manifest') await this.manifest(content, route, request, req, res, exchange, gate?.active === true ? { gate, rr } : undefined);
      else if (route.kind === 'blob') await this.blob(content, route, request, req, res, exchange, maxBlobBytes);
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

  private async manifest(content: ContentSource, route: Extract<Route, { kind: 'manifest' }>, request: ContentRequest, req: IncomingMessage, res: ServerResponse, exchange: Exchange, signatures?: { gate: VerifyGate; rr: RuleUpstream }): Promise<void> {
    const buffers = this.limits.bufferAllowance(res);
    const manifest = await content.manifest({
      ...request,
      reference: route.reference,
      byDigest: route.byDigest,
      accept: req.headers.accept,
      buffers,
      onUpstreamAnswer: this.observeUpstream(request.rule, 'manifest'),
    });
    if (manifest.body && request.method === 'GET') exchange.bytes = manifest.body.length;
    exchange.cache = manifest.cache ?? null;
    if (manifest.warning) this.options.logger.warn({ rule: request.rule, repository: route.name, reference: route.reference, digest: manifest.digest }, manifest.warning);
    if (signatures !== undefined) {
      const verdict = await signatures.gate.check({ rr: signatures.rr, repository: route.name, manifest, credentials: request.credentials, buffers: () => buffers.detached() });
      if (!verdict.allowed) {
        exchange.bytes = 0;
        exchange.error = `signature not verified for ${manifest.digest}: ${verdict.reason}`;
        // A fetch failure may pass on a retry; unsigned and rejected stand until a signature is pushed.
        if (verdict.kind === 'unavailable') sendError(res, registryError(503, 'UNAVAILABLE', `signature of ${manifest.digest} could not be checked: ${verdict.reason}`), { 'retry-after': '5' });
        else sendError(res, registryError(403, 'DENIED', `signature not verified: ${verdict.reason} (${route.name}@${manifest.digest}; rule "${signatures.rr.rule.name}" serves only signed manifests)`));
        return;
      }
    }
    answerManifest(res, manifest);
  }

  /** `maxBytes` (admission reads): refused by its declared size, cut when more arrives. */
  private async blob(content: ContentSource, route: Extract<Route, { kind: 'blob' }>, request: ContentRequest, req: IncomingMessage, res: ServerResponse, exchange: Exchange, maxBytes?: number): Promise<void> {
    if (request.method === 'GET' && !this.limits.takeBlobStream(res)) {
      exchange.error = 'too many blob streams from this client';
      sendError(res, registryError(429, 'TOOMANYREQUESTS', `this client already has ${this.limits.blobStreams.perClient} blob downloads in progress`), { 'retry-after': '1' });
      return;
    }
    const blob = await content.blob({ ...request, digest: route.digest, range: maxBytes === undefined ? req.headers.range : undefined, onUpstreamAnswer: this.observeUpstream(request.rule, 'blob') });
    exchange.cache = blob.cache ?? null;
    const declared = Number(blob.headers['content-length']);
    if (maxBytes !== undefined && Number.isFinite(declared) && declared > maxBytes) {
      blob.body?.destroy(new Error('blob larger than the admission limit'));
      exchange.error = `blob of ${declared} bytes, larger than the ${maxBytes} asked for`;
      sendError(res, registryError(413, 'UNSUPPORTED', `the blob is ${declared} bytes, larger than the ${maxBytes} bytes asked for`));
      return;
    }
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
        if (maxBytes !== undefined && exchange.bytes > maxBytes) blob.body?.destroy(new Error(`more than the ${maxBytes} bytes asked for`));
      },
    });
    this.metrics.inflight.dec();
    if (error) {
      exchange.error = error.message;
      // Never let a short or corrupt body look complete: cut the connection.
      res.destroy();
    }
  }

  /** A tag list paged here whether or not the upstream pages it (distribution 2.8 answers every tag). */
  private async tags(content: ContentSource, route: Extract<Route, { kind: 'tags' }>, request: ContentRequest, res: ServerResponse): Promise<void> {
    const parsed = parsePageQuery(route.query, 'tags');
    if (!parsed.ok) {
      sendError(res, parsed.error);
      return;
    }
    const { n, last } = parsed.page;
    const tags = await content.tags({ ...request, n: n === undefined ? null : String(n), last: last ?? null, buffers: this.limits.bufferAllowance(res) });
    const page = pageTags(tags.list.tags, parsed.page, tags.nextPage !== undefined);
    answerTags(res, request.rule, route.name, page.tags, page.nextAfter === undefined ? undefined : tagsLink(request.rule, route.name, page.nextAfter, n));
  }

  /** `/v2/_catalog`: the rules this client may list, walked page by page (catalog.ts). */
  private async catalog(runtime: ProxyRuntime, query: string, req: IncomingMessage, res: ServerResponse, exchange: Exchange): Promise<void> {
    const access = catalogAccess(runtime, req, this.options.logger);
    exchange.namespace = access.namespace;
    if (!access.ok) {
      exchange.error = access.error.message;
      sendError(res, access.error, access.challenge ? { 'www-authenticate': CHALLENGE } : {});
      return;
    }
    const parsed = parsePageQuery(query, 'catalog');
    if (!parsed.ok) {
      exchange.error = parsed.error.message;
      sendError(res, parsed.error);
      return;
    }
    // Which page, for the access log (both values checked above: short, no control characters).
    exchange.reference = [parsed.page.n !== undefined ? `n=${parsed.page.n}` : '', parsed.page.last !== undefined ? `last=${parsed.page.last}` : ''].filter(Boolean).join('&') || null;
    await this.whileConnected(res, async (signal) => {
      try {
        const page = await listCatalog(access.rules, parsed.page, signal, this.limits.bufferAllowance(res));
        if (page.skipped.length > 0) this.options.logger.debug({ skipped: page.skipped }, 'catalog: rules without a catalog for this client');
        answerCatalog(res, page.repositories, page.link);
      } catch (error) {
        if (signal.aborted) exchange.error = 'client went away';
        else if (error instanceof ContentError) {
          exchange.error = error.details.note ?? error.message;
          const tooMany = error.failure === 'too-many-requests';
          sendError(res, registryError(tooMany ? 429 : error.details.status, tooMany ? 'TOOMANYREQUESTS' : 'UNAVAILABLE', error.message), error.details.retryAfter ? { 'retry-after': error.details.retryAfter } : {});
        } else throw error;
      }
    });
  }

  private observeUpstream(rule: string, kind: 'manifest' | 'blob'): (seconds: number) => void {
    return (seconds) => this.metrics.upstreamSeconds.observe({ rule, kind }, seconds);
  }
}

function answerJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text) }).end(res.req.method === 'HEAD' ? undefined : text);
}
