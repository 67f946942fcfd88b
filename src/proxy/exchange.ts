// What one request did, for the access log and the proxy's metrics.

import type { IncomingMessage, ServerResponse } from 'node:http';
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import type { Logger } from '../log.js';

export interface Exchange {
  rule: string | null;
  kind: string;
  repository: string | null;
  reference: string | null;
  namespace: string | null;
  error: string | null;
  bytes: number;
  /** How the node cache answered (hit, miss, stale, bypass); null without a cache or before content. */
  cache: string | null;
  /** This proxy's own listener check: logged at debug level, not as an access. */
  selfCheck: boolean;
  /** 'token': the client authenticated with a registry token (src/proxy/token.ts), not its namespace credential. */
  credential?: 'token';
  /** What the upstream answered when the proxy's answer carries it in the body (the admission probe:
   * a 200 JSON answer saying the upstream refused with 401); null otherwise. */
  upstreamStatus: number | null;
}

export interface ProxyMetrics {
  requests: Counter<'rule' | 'kind' | 'status' | 'access'>;
  bytes: Counter<'rule' | 'kind'>;
  upstreamSeconds: Histogram<'rule' | 'kind'>;
  inflight: Gauge;
}

export function registerMetrics(registry: Registry): ProxyMetrics {
  return {
    requests: new Counter({ name: 'pullbridge_proxy_requests_total', help: 'Proxy requests by rule, kind, status and access (pull on the registry port, admission for the webhook\'s questions)', labelNames: ['rule', 'kind', 'status', 'access'], registers: [registry] }),
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

/** A new exchange, counted and logged once its response closes. */
/** `access`: a pull (the registry port) or an admission question of the webhook (the operations port). */
export function recordExchange(req: IncomingMessage, res: ServerResponse, metrics: ProxyMetrics, logger: Logger, access: 'pull' | 'admission' = 'pull'): Exchange {
  const started = performance.now();
  const exchange: Exchange = { rule: null, kind: 'unknown', repository: null, reference: null, namespace: null, error: null, bytes: 0, cache: null, selfCheck: false, upstreamStatus: null };
  res.on('close', () => {
    const status = res.writableFinished ? res.statusCode : 0; // 0: connection cut before the end
    metrics.requests.inc({ rule: exchange.rule ?? '', kind: exchange.kind, status: String(status), access });
    if (exchange.bytes > 0) metrics.bytes.inc({ rule: exchange.rule ?? '', kind: exchange.kind }, exchange.bytes);
    (exchange.selfCheck ? logger.debug.bind(logger) : logger.info.bind(logger))(
      {
        access,
        method: req.method,
        rule: exchange.rule,
        kind: exchange.kind,
        repository: exchange.repository,
        reference: exchange.reference,
        namespace: exchange.namespace,
        ...(exchange.credential ? { credential: exchange.credential } : {}),
        status,
        ...(exchange.upstreamStatus !== null ? { upstreamStatus: exchange.upstreamStatus } : {}),
        bytes: exchange.bytes,
        ...(exchange.cache ? { cache: exchange.cache } : {}),
        durationMs: Math.round((performance.now() - started) * 1000) / 1000,
        ...(exchange.error ? { error: exchange.error } : {}),
      },
      'request',
    );
  });
  return exchange;
}
