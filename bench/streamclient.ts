// The shared bench's client: one GET, its body hashed (sha256) as it arrives and dropped, as
// `curl | sha256sum` does, in a process of its own (so that its CPU is its own and the bench's event
// loop times no one's bytes). It also records what curl cannot: the longest stretch with no byte
// arriving, which is what containerd's image_pull_progress_timeout watches. Every row of the shared
// bench uses it, so every row pays the same client CPU.
//
//   node dist/bench/streamclient.js URL   → one JSON line (StreamClientResult) on stdout

import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import http from 'node:http';
import { fileURLToPath } from 'node:url';

export interface StreamClientResult {
  readonly status: number;
  readonly bytes: number;
  /** The response's content-length header; undefined when it had none. */
  readonly contentLength: number | undefined;
  /** Seconds from sending the request to the response headers, and to the first body byte. */
  readonly headersSeconds: number;
  readonly firstByteSeconds: number;
  /** Seconds from sending the request to the last body byte. */
  readonly seconds: number;
  /** The longest stretch with no body byte arriving, seconds, from sending the request to the last
   * byte: the wait for the first byte counts (a client that got headers but no bytes is still waiting). */
  readonly longestGapSeconds: number;
  /** When (seconds from the request) that longest gap ended. */
  readonly longestGapEndSeconds: number;
  /** `sha256:<hex>` of the body received. */
  readonly digest: string;
  /** CPU seconds this client process used (user + system) from sending the request to the last
   * byte: its Node start-up (≈ 0.05 s, curl's is less) left out, so that it is the per-byte cost. */
  readonly cpuSeconds: number;
}

function get(url: string): Promise<StreamClientResult> {
  return new Promise((resolve, reject) => {
    const cpuBefore = process.cpuUsage();
    const began = performance.now();
    const at = () => (performance.now() - began) / 1000;
    const req = http.get(url, (res) => {
      const headersSeconds = at();
      const hash = createHash('sha256');
      let bytes = 0;
      let firstByteSeconds: number | undefined;
      let last = 0;
      let longestGapSeconds = 0;
      let longestGapEndSeconds = 0;
      res.on('data', (chunk: Buffer) => {
        const now = at();
        firstByteSeconds ??= now;
        if (now - last > longestGapSeconds) {
          longestGapSeconds = now - last;
          longestGapEndSeconds = now;
        }
        last = now;
        bytes += chunk.length;
        hash.update(chunk);
      });
      res.on('end', () => {
        const header = res.headers['content-length'];
        const usage = process.cpuUsage(cpuBefore);
        if (!res.complete) reject(new Error(`${url}: the response ended after ${bytes} bytes, before its end`));
        else
          resolve({
            status: res.statusCode ?? 0,
            bytes,
            contentLength: header === undefined ? undefined : Number(header),
            headersSeconds,
            firstByteSeconds: firstByteSeconds ?? at(),
            seconds: at(),
            longestGapSeconds,
            longestGapEndSeconds,
            digest: `sha256:${hash.digest('hex')}`,
            cpuSeconds: (usage.user + usage.system) / 1e6,
          });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
  });
}

/** Runs the client in a process of its own for `url`; rejects when it fails or the answer is not a 200. */
export function streamClient(url: string): Promise<StreamClientResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [fileURLToPath(import.meta.url), url], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      if (code !== 0) return reject(new Error(`the client of ${url} failed: ${err.trim() || `exit ${code}`}`));
      const result = JSON.parse(out) as StreamClientResult;
      if (result.status !== 200) return reject(new Error(`${url} answered ${result.status}`));
      resolve(result);
    });
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const url = process.argv[2];
  if (url === undefined) {
    process.stderr.write('usage: streamclient.js URL\n');
    process.exit(2);
  }
  get(url).then(
    (result) => process.stdout.write(`${JSON.stringify(result)}\n`),
    (error: unknown) => {
      process.stderr.write(`${error instanceof Error ? error.message : String(error)}\n`);
      process.exitCode = 1;
    },
  );
}
