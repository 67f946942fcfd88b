import type { Writable } from 'node:stream';
import http from 'node:http';
import { listen, type RunningServer } from '../../src/shell/serve.js';

export interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

/** A request with the path exactly as given (fetch would normalise `..` away). */
export function rawRequest(url: string, path: string, options: { method?: string; headers?: Record<string, string>; localAddress?: string } = {}): Promise<RawResponse> {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const source = options.localAddress ? { localAddress: options.localAddress, agent: false as const } : {};
    const req = http.request({ host: u.hostname, port: u.port, path, method: options.method ?? 'GET', headers: options.headers ?? {}, ...source }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

/** A GET its client will leave before the answer: `sent` once the whole request is written, `leave()`
 * closes the connection (the answer, if any, is never read). */
export function leavingRequest(url: string, path: string, options: { headers?: Record<string, string>; localAddress?: string } = {}): { sent: Promise<void>; leave(): void } {
  const u = new URL(url);
  const source = options.localAddress ? { localAddress: options.localAddress } : {};
  const req = http.request({ host: u.hostname, port: u.port, path, method: 'GET', headers: options.headers ?? {}, agent: false, ...source });
  const sent = new Promise<void>((resolve, reject) => {
    req.once('finish', resolve);
    req.once('error', reject);
  });
  req.on('error', () => undefined);
  req.end();
  return { sent, leave: () => void req.destroy() };
}

/**
 * Writes `chunk` `times` times, waiting for 'drain' when the stream asks, then ends it; stops
 * once the stream is destroyed (its reader went away). `onFlushed` is called as each write leaves
 * the stream's buffer.
 */
export function writeRepeated(out: Writable, chunk: Buffer, times: number, onFlushed?: (bytes: number) => void): void {
  let written = 0;
  const next = () => {
    while (written < times && !out.destroyed) {
      written++;
      const more = onFlushed ? out.write(chunk, (error) => error || onFlushed(chunk.length)) : out.write(chunk);
      if (!more) return void out.once('drain', next);
    }
    if (!out.destroyed) out.end();
  };
  next();
}

export interface SlowUpstreamOptions {
  readonly chunkBytes: number;
  readonly intervalMs: number;
  /** Send `content-length: body.length`, or answer chunked. */
  readonly announceLength: boolean;
  readonly contentType: string;
  /** Close the connection once this many bytes were sent (a body cut mid-transfer). */
  readonly cutAfterBytes?: number;
  /** Gets, for each answer sent whole, when it began and ended (performance.now()). */
  readonly whole?: Array<{ readonly from: number; readonly to: number }>;
}

/** The most of `spans` that overlap at one moment. */
export function mostAtOnce(spans: ReadonlyArray<{ readonly from: number; readonly to: number }>): number {
  return Math.max(0, ...spans.map((s) => spans.filter((o) => o.from <= s.from && s.from < o.to).length));
}

/**
 * A registry that answers every request with `body`, sent `chunkBytes` at a time every
 * `intervalMs` (docker-registry cannot be made slow, nor made to cut a body it announced whole);
 * with its Content-Length, or chunked.
 */
export function slowUpstream(body: Buffer, options: SlowUpstreamOptions): Promise<RunningServer> {
  const end = Math.min(body.length, options.cutAfterBytes ?? body.length);
  return listen(
    (_req, res) => {
      const from = performance.now();
      res.writeHead(200, { 'content-type': options.contentType, ...(options.announceLength ? { 'content-length': body.length } : {}) });
      let sent = 0;
      const timer = setInterval(() => {
        const chunk = body.subarray(sent, Math.min(end, sent + options.chunkBytes));
        sent += chunk.length;
        if (sent < end) return void res.write(chunk);
        clearInterval(timer);
        if (end === body.length) res.end(chunk, () => options.whole?.push({ from, to: performance.now() }));
        else res.write(chunk, () => res.destroy());
      }, options.intervalMs);
      res.on('close', () => clearInterval(timer));
    },
    { host: '127.0.0.1', port: 0 },
  );
}

/** The code of a registry error document's first error ('' when there is none). */
export function errorCode(response: RawResponse): string {
  try {
    return ((JSON.parse(response.body.toString()) as { errors?: Array<{ code?: string }> }).errors?.[0]?.code) ?? '';
  } catch {
    return '';
  }
}
