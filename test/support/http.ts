import type { Writable } from 'node:stream';
import http from 'node:http';

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


/**
 * Writes `chunk` `times` times, waiting for 'drain' when the stream asks, then ends it.
 * `onFlushed` is called as each write leaves the stream's buffer.
 */
export function writeRepeated(out: Writable, chunk: Buffer, times: number, onFlushed?: (bytes: number) => void): void {
  let written = 0;
  const next = () => {
    while (written < times) {
      written++;
      const more = onFlushed ? out.write(chunk, () => onFlushed(chunk.length)) : out.write(chunk);
      if (!more) return void out.once('drain', next);
    }
    out.end();
  };
  next();
}
