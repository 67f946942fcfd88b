// Listening sockets for the servers: HTTP or HTTPS, and a graceful close that drains requests.

import http from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';

export interface TlsFiles {
  readonly cert: string | Buffer;
  readonly key: string | Buffer;
}

export interface ListenOptions {
  readonly host: string;
  readonly port: number;
  readonly tls?: TlsFiles;
  /** Time idle keep-alive sockets stay open; longer than typical client pools avoids races. */
  readonly keepAliveTimeoutMs?: number;
  /** Bytes a response may buffer before write() asks the producer to wait. */
  readonly highWaterMark?: number;
}

export interface RunningServer {
  readonly server: http.Server;
  readonly port: number;
  readonly url: string;
  /** Stops accepting, lets in-flight requests finish (up to graceMs), then closes the rest. */
  close(graceMs?: number): Promise<void>;
}

export async function listen(handler: http.RequestListener, options: ListenOptions): Promise<RunningServer> {
  const common = options.highWaterMark ? { highWaterMark: options.highWaterMark } : {};
  const server: http.Server = options.tls
    ? https.createServer({ ...common, cert: options.tls.cert, key: options.tls.key, minVersion: 'TLSv1.2' }, handler)
    : http.createServer(common, handler);
  server.keepAliveTimeout = options.keepAliveTimeoutMs ?? 65_000;
  server.headersTimeout = 30_000;
  server.requestTimeout = 0;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port, options.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  const host = options.host.includes(':') ? `[${options.host}]` : options.host;
  return {
    server,
    port,
    url: `${options.tls ? 'https' : 'http'}://${host}:${port}`,
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
