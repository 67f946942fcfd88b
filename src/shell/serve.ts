// Listening sockets for the servers: HTTP or HTTPS, and a graceful close that drains requests.

import http from 'node:http';
import https from 'node:https';
import type { AddressInfo, Socket } from 'node:net';

export interface TlsFiles {
  readonly cert: string | Buffer;
  readonly key: string | Buffer;
  /**
   * CA (PEM) whose client certificates the server asks for and verifies. The handshake completes
   * without one (kubelet probes and Prometheus present none); routes decide from `socket.authorized`.
   */
  readonly clientCa?: string | Buffer;
}

export interface ListenOptions {
  readonly host: string;
  readonly port: number;
  readonly tls?: TlsFiles;
  /** Time idle keep-alive sockets stay open; longer than typical client pools avoids races. */
  readonly keepAliveTimeoutMs?: number;
  /** Bytes a response may buffer before write() asks the producer to wait. */
  readonly highWaterMark?: number;
  /**
   * A connection that has not sent a whole request head within this time is closed (slow or
   * half-open clients); also bounds a TLS handshake. Default 30 s.
   */
  readonly headersTimeoutMs?: number;
  /**
   * A connection with no traffic either way for this long is closed: clients that connect and say
   * nothing, peers that vanished (half-open), readers that stopped reading. Default 120 s, twice
   * nginx's send_timeout; a streaming response that makes progress never hits it.
   */
  readonly idleTimeoutMs?: number;
  /**
   * A connection whose first request (its whole head) has not arrived within this time is closed.
   * Node's headersTimeout never closes a connection that sent nothing at all; on a listener every Pod
   * can reach, such idle connections would otherwise hold the per-source and total limits for up to
   * idleTimeoutMs. Unset: only idleTimeoutMs applies. Plain HTTP only (a TLS listener's handshake is
   * bounded by headersTimeoutMs, and its requests come on another socket object).
   */
  readonly firstRequestTimeoutMs?: number;
  /** Connections beyond this are closed as they arrive, so a flood cannot exhaust descriptors. */
  readonly maxConnections?: number;
  /** Open connections one source address may hold; more are closed as they arrive, so that one
   * client (a Pod) cannot take the whole maxConnections from the others. */
  readonly maxConnectionsPerSource?: number;
}

export interface RunningServer {
  readonly server: http.Server;
  readonly port: number;
  readonly url: string;
  /** Whether a new connection from `source` would be closed on arrival (maxConnections or
   * maxConnectionsPerSource reached). */
  full(source: string): boolean;
  /** Stops accepting, lets in-flight requests finish (up to graceMs), then closes the rest. */
  close(graceMs?: number): Promise<void>;
}

/** `host:port`, an IPv6 address in brackets, as URLs and logs write it. */
export function hostPort(host: string, port: number): string {
  return `${host.includes(':') ? `[${host}]` : host}:${port}`;
}

export async function listen(requestHandler: http.RequestListener, options: ListenOptions): Promise<RunningServer> {
  const idleTimeout = options.idleTimeoutMs ?? 120_000;
  // Node arms server.timeout for a connection's first request only; re-arm it for every request
  // on a kept-alive connection too.
  const handler: http.RequestListener = (req, res) => {
    req.socket.setTimeout(idleTimeout);
    requestHandler(req, res);
  };
  const headersTimeout = options.headersTimeoutMs ?? 30_000;
  const common = {
    ...(options.highWaterMark ? { highWaterMark: options.highWaterMark } : {}),
    // How often Node sweeps for connections past headersTimeout: a fraction of it, so the
    // timeout holds to within a few percent.
    connectionsCheckingInterval: Math.max(100, Math.min(30_000, Math.floor(headersTimeout / 4))),
  };
  const server: http.Server = options.tls
    ? https.createServer(
        {
          ...common,
          cert: options.tls.cert,
          key: options.tls.key,
          minVersion: 'TLSv1.2',
          handshakeTimeout: headersTimeout,
          ...(options.tls.clientCa ? { ca: options.tls.clientCa, requestCert: true, rejectUnauthorized: false } : {}),
        },
        handler,
      )
    : http.createServer(common, handler);
  server.keepAliveTimeout = options.keepAliveTimeoutMs ?? 65_000;
  server.headersTimeout = headersTimeout;
  // No whole-request deadline: a blob response may stream for many minutes.
  server.requestTimeout = 0;
  server.timeout = idleTimeout;
  if (options.maxConnections !== undefined) server.maxConnections = options.maxConnections;
  const full = options.maxConnections !== undefined || options.maxConnectionsPerSource !== undefined ? countConnections(server, options.maxConnectionsPerSource) : () => false;
  if (options.firstRequestTimeoutMs !== undefined) {
    if (options.tls) throw new Error('firstRequestTimeoutMs is for plain HTTP listeners');
    closeSilentConnections(server, options.firstRequestTimeoutMs);
  }
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port, options.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  return {
    server,
    port,
    url: `${options.tls ? 'https' : 'http'}://${hostPort(options.host, port)}`,
    full,
    close(graceMs = 10_000) {
      return new Promise<void>((resolve) => {
        const timer = setTimeout(() => server.closeAllConnections(), graceMs);
        timer.unref();
        server.close(() => {
          clearTimeout(timer);
          resolve();
        });
        server.closeIdleConnections();
      });
    },
  };
}

/**
 * Counts open connections, in total (as server.maxConnections does) and per source, and closes a
 * source's connections beyond `perSource` on arrival; counts drop as connections close. Returns
 * whether a new connection from a source would be closed on arrival.
 */
function countConnections(server: http.Server, perSource: number | undefined): (source: string) => boolean {
  const open = new Map<string, number>();
  let total = 0;
  server.on('connection', (socket: Socket) => {
    total++;
    socket.once('close', () => total--);
    if (perSource === undefined) return;
    const source = socket.remoteAddress ?? '';
    const count = (open.get(source) ?? 0) + 1;
    if (count > perSource) {
      socket.destroy();
      return;
    }
    open.set(source, count);
    socket.once('close', () => {
      const left = (open.get(source) ?? 1) - 1;
      if (left > 0) open.set(source, left);
      else open.delete(source);
    });
  });
  return (source) => (Number.isFinite(server.maxConnections) && total >= server.maxConnections) || (perSource !== undefined && (open.get(source) ?? 0) >= perSource);
}

/** Closes each connection that has not delivered a first request within `ms` (see firstRequestTimeoutMs). */
function closeSilentConnections(server: http.Server, ms: number): void {
  const waiting = new WeakMap<Socket, NodeJS.Timeout>();
  server.on('connection', (socket: Socket) => {
    const timer = setTimeout(() => socket.destroy(), ms);
    timer.unref();
    waiting.set(socket, timer);
    socket.once('close', () => clearTimeout(timer));
  });
  server.on('request', (req: http.IncomingMessage) => clearTimeout(waiting.get(req.socket)));
}
