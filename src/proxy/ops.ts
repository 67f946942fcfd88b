// The operations endpoints: health, readiness, Prometheus metrics and the upstream status document.

import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Registry } from 'prom-client';
import type { Prober } from '../upstream/probe.js';
import type { ProxyRuntime } from './runtime.js';

export interface OpsHandlerOptions {
  readonly runtime: () => ProxyRuntime | undefined;
  readonly metrics: Registry;
  readonly prober?: Prober;
  readonly ready?: () => boolean;
}

const OPS_PATHS = new Set(['/healthz', '/readyz', '/metrics', '/status']);
/** Health answers nothing about the configuration: always served, so probes work on either port. */
const HEALTH_PATHS = new Set(['/healthz', '/readyz']);

/** Whether the registry port answers `url` as an operations endpoint. */
export function isOpsRequest(method: string | undefined, url: string, opsOnRegistryPort: boolean): boolean {
  return method === 'GET' && (HEALTH_PATHS.has(url) || (opsOnRegistryPort && OPS_PATHS.has(url)));
}

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
    const body = JSON.stringify({ configLoaded: runtime !== undefined, rules: runtime?.config.registries.map((r) => r.name) ?? [], upstreams: options.prober?.statuses() ?? [], cache: runtime?.cache?.status() ?? null }, null, 2);
    res.writeHead(200, { 'content-type': 'application/json; charset=utf-8' }).end(body);
  }
}
