// A probe port that answers from the first instant. kubelet turns every failed probe into an
// `Unhealthy` Warning event, and a port that opens only after the start work (the webhook's
// certificate bootstrap, the proxy's cache scan) refuses the first probes. So the port listens
// before that work, and GET /startupz holds its request until the component is up (at most
// HOLD_MS, under the probe's timeoutSeconds), then answers from its readiness: on a normal start,
// the startup probe's first try succeeds. Everything else waits for the real handler.

import type { IncomingMessage, RequestListener, ServerResponse } from 'node:http';
import { listen, type ListenOptions, type RunningServer } from './serve.js';

/** How long /startupz holds a request; the chart's startup probes time out after 60 s. */
export const STARTUP_HOLD_MS = 50_000;

/** Requests /startupz holds at once: kubelet sends one at a time; more (pipelined, many sockets) are
 * answered 503 at once and their connection closed, so that held requests cannot pile up in memory. */
export const STARTUP_MAX_HELD = 16;

export class StartupGate {
  private handler: RequestListener | undefined;
  private ready: () => boolean = () => false;
  private readonly waiting = new Set<() => void>();

  constructor(private readonly holdMs = STARTUP_HOLD_MS) {}

  /** From now on requests go to `handler`, and /startupz answers from `ready`. */
  open(handler: RequestListener, ready: () => boolean): void {
    this.handler = handler;
    this.ready = ready;
    for (const wake of this.waiting) wake();
    this.waiting.clear();
  }

  readonly listener: RequestListener = (req: IncomingMessage, res: ServerResponse) => {
    const startup = req.method === 'GET' && new URL(req.url ?? '/', 'http://probe').pathname === '/startupz';
    if (!startup) {
      if (this.handler) this.handler(req, res);
      else res.writeHead(503, { 'content-type': 'text/plain', 'retry-after': '1' }).end('starting\n');
      return;
    }
    const answer = () => {
      const up = this.handler !== undefined && this.ready();
      res.writeHead(up ? 200 : 503, { 'content-type': 'text/plain' }).end(up ? 'ok\n' : 'starting\n');
    };
    if (this.handler) return answer();
    if (this.waiting.size >= STARTUP_MAX_HELD) {
      res.writeHead(503, { 'content-type': 'text/plain', 'retry-after': '1', connection: 'close' }).end('starting\n');
      return;
    }
    const timer = setTimeout(() => {
      this.waiting.delete(wake);
      answer();
    }, this.holdMs);
    const wake = () => {
      clearTimeout(timer);
      answer();
    };
    this.waiting.add(wake);
    res.once('close', () => {
      clearTimeout(timer);
      this.waiting.delete(wake);
    });
  };
}

/** Connections a probe and metrics port takes (kubelet, a scraper, an operator). */
export const PROBE_PORT_MAX_CONNECTIONS = 64;
/** Of which one source (kubelet's probes, a scraper, port-forward) may hold this many: one peer
 * holding idle connections does not lock the others out. */
export const PROBE_PORT_MAX_CONNECTIONS_PER_SOURCE = 8;

/** A gate listening on a port: the caller opens it once its component is up. */
export interface GatedListener {
  readonly gate: StartupGate;
  readonly server: RunningServer;
}

/**
 * Listens at once, before the component's modules are even loaded (they take a second on a busy
 * node). The server does not keep the process alive until `serve` opens it: a failed start exits.
 */
export async function listenGated(options: ListenOptions): Promise<GatedListener> {
  const gate = new StartupGate();
  const server = await listen(gate.listener, options);
  server.server.unref();
  return { gate, server };
}

/** Opens a gated listener to its real handler. */
export function serveGated(gated: GatedListener, handler: RequestListener, ready: () => boolean): void {
  gated.gate.open(handler, ready);
  gated.server.server.ref();
}
