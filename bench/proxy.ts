// Proxy benchmark: one large blob pulled direct from docker-registry, through nginx as a plain
// reverse proxy (the reference setup), and through pullbridge, in one run, single and concurrent.
// curl is the client (cheap, so the servers are what is measured); peak RSS is read from /proc.
//
//   npm run bench -- proxy [--size-mb 1024] [--concurrency 16] [--rounds 2]

import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ConfigInput } from '../src/rules/config.js';
import { writeRepeated } from '../test/support/http.js';
import { freePort, startProcess, waitForPort, type Proc } from '../test/support/procs.js';
import { startRegistry, type RegistryHandle } from '../test/support/registry.js';

const CHUNK = randomBytes(1024 * 1024);

/**
 * What the image and chart run the proxy with (NODE_OPTIONS): a small young generation collects
 * the few short-lived objects per request promptly, which keeps RSS flat under load.
 */
export const PROXY_NODE_FLAGS = ['--max-semi-space-size=1'];

/** Pushes `sizeMb` MiB as one blob with a streamed monolithic upload; returns its digest. */
export async function pushBlob(registry: RegistryHandle, repository: string, sizeMb: number): Promise<string> {
  const hash = createHash('sha256');
  for (let i = 0; i < sizeMb; i++) hash.update(CHUNK);
  const digest = `sha256:${hash.digest('hex')}`;
  const start = await fetch(`${registry.url}/v2/${repository}/blobs/uploads/`, { method: 'POST' });
  const location = new URL(start.headers.get('location') ?? '', registry.url);
  location.searchParams.set('digest', digest);
  await new Promise<void>((resolve, reject) => {
    const req = http.request(location, { method: 'PUT', headers: { 'content-type': 'application/octet-stream', 'content-length': sizeMb * CHUNK.length } }, (res) => {
      res.resume();
      res.on('end', () => (res.statusCode === 201 ? resolve() : reject(new Error(`upload answered ${res.statusCode}`))));
    });
    req.on('error', reject);
    writeRepeated(req, CHUNK, sizeMb);
  });
  return digest;
}

/**
 * One GET with curl, its body hashed by sha256sum as it arrives (a pipe between the two processes,
 * so the bytes never pass through this one): bytes, seconds to the first byte and in total (curl's
 * own), and the digest of what the client received.
 */
export function curlDigest(url: string): Promise<{ bytes: number; firstByteSeconds: number; seconds: number; digest: string }> {
  return new Promise((resolve, reject) => {
    // pipefail: a curl that failed must not pass for sha256sum's success.
    const child = spawn('bash', ['-c', 'set -o pipefail; curl -sS --fail -w "%{stderr}%{size_download} %{time_starttransfer} %{time_total}" -o - "$0" | sha256sum', url]);
    let out = '';
    let err = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    child.on('close', (code) => {
      const [bytes, firstByteSeconds, seconds] = (err.trim().split('\n').at(-1) ?? '').split(' ').map(Number);
      const hex = out.trim().split(/\s+/)[0] ?? '';
      if (code === 0 && bytes !== undefined && firstByteSeconds !== undefined && seconds !== undefined && /^[0-9a-f]{64}$/.test(hex)) resolve({ bytes, firstByteSeconds, seconds, digest: `sha256:${hex}` });
      else reject(new Error(`curl ${url} failed: ${err}${out}`));
    });
  });
}

/** One GET with curl to /dev/null: bytes received and curl's own total time. */
export function curl(url: string): Promise<{ bytes: number; seconds: number }> {
  return new Promise((resolve, reject) => {
    const child = spawn('curl', ['-sS', '--fail', '-o', '/dev/null', '-w', '%{size_download} %{time_total}', url]);
    let out = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr.on('data', (c: Buffer) => (out += c.toString()));
    child.on('close', (code) => {
      const [bytes, seconds] = out.trim().split(' ').map(Number);
      if (code === 0 && bytes !== undefined && seconds !== undefined) resolve({ bytes, seconds });
      else reject(new Error(`curl ${url} failed: ${out}`));
    });
  });
}

/** `proc`, whose stop also removes `dir`. */
function removingDir(proc: Proc, dir: string): Proc {
  return { child: proc.child, output: proc.output, stop: () => proc.stop().then(() => rmSync(dir, { recursive: true, force: true })) };
}

export async function startNginx(registryPort: number): Promise<{ port: number; proc: Proc }> {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-nginx-'));
  // nginx's worker drops to an unprivileged user when started as root; it must reach its temp files.
  chmodSync(dir, 0o755);
  for (const sub of ['proxy', 'cache']) {
    mkdirSync(join(dir, sub));
    chmodSync(join(dir, sub), 0o777);
  }
  const port = await freePort();
  writeFileSync(
    join(dir, 'nginx.conf'),
    `daemon off;
worker_processes 1;
error_log ${dir}/error.log warn;
pid ${dir}/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${dir}/body; proxy_temp_path ${dir}/proxy; fastcgi_temp_path ${dir}/fcgi; uwsgi_temp_path ${dir}/uwsgi; scgi_temp_path ${dir}/scgi;
  upstream registry { server 127.0.0.1:${registryPort}; keepalive 32; }
  # nginx's own cache, for the like-for-like comparison of cache hits (a blob is content-addressed:
  # kept as long as the run, whatever the registry's caching headers say).
  proxy_cache_path ${dir}/cache levels=1:2 keys_zone=blobs:10m max_size=8g inactive=1d use_temp_path=off;
  server {
    listen 127.0.0.1:${port};
    # A plain reverse proxy: nginx's defaults (buffering on, 8 × one-page buffers, temp files up to 1 GiB).
    location /v2/plain/ {
      proxy_pass http://registry/v2/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_read_timeout 900;
    }
    # Streaming, as a registry front must for large layers.
    location /v2/corp/ {
      proxy_pass http://registry/v2/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_buffering off;
      proxy_read_timeout 900;
    }
    # A caching reverse proxy: the first pull fills nginx's cache, the next are served from its file.
    location /v2/cached/ {
      proxy_pass http://registry/v2/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_cache blobs;
      proxy_cache_key $uri;
      proxy_cache_valid 200 1d;
      proxy_ignore_headers Cache-Control Expires;
      proxy_cache_lock on;
      proxy_buffers 16 64k;
      proxy_read_timeout 900;
    }
    # nginx's default buffering, with temp files off (they fail on big layers).
    location /v2/buffered/ {
      proxy_pass http://registry/v2/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_buffers 16 64k;
      proxy_max_temp_file_size 0;
      proxy_read_timeout 900;
    }
  }
}
`,
  );
  // One worker: pullbridge is one process on one core too.
  const proc = startProcess('nginx', ['-c', join(dir, 'nginx.conf'), '-p', dir]);
  await waitForPort(port);
  // Stopping it removes its directory: its cache holds a copy of every blob it served.
  return { port, proc: removingDir(proc, dir) };
}

export interface PullbridgeOptions {
  /** A node cache in this directory (`cache.path`); none: every pull is relayed. */
  readonly cachePath?: string;
  /** The shared tier (`cache.shared`), with cachePath. */
  readonly shared?: NonNullable<ConfigInput['cache']>['shared'];
  /** cache.shared.streamFills, with shared; unset: the build's default. */
  readonly streamFills?: boolean;
  /** NODE_NAME, as the chart sets it: the node a shared-tier claim names. */
  readonly nodeName?: string;
  /** More node flags (e.g. `--cpu-prof`), after PROXY_NODE_FLAGS. */
  readonly nodeFlags?: readonly string[];
}

/**
 * `pullbridge proxy` in front of `registry` with two anonymous rules on it: corp (blob digests
 * verified, the default) and fast (verifyBlobDigests: false).
 */
export async function startPullbridge(registry: RegistryHandle, options: PullbridgeOptions = {}): Promise<{ port: number; proc: Proc }> {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-bench-'));
  const port = await freePort();
  // JSON is YAML: the shared tier's settings go in as they are.
  const cache = options.cachePath === undefined ? '' : `cache: ${JSON.stringify({ path: options.cachePath, maxBytes: '20Gi', ...(options.shared ? { shared: { ...options.shared, ...(options.streamFills === undefined ? {} : { streamFills: options.streamFills }) } } : {}) })}\n`;
  writeFileSync(
    join(dir, 'config.yaml'),
    `${cache}registries:\n  - {name: corp, match: [r.example], upstream: "${registry.url}", auth: {mode: anonymous}}\n  - {name: fast, match: [f.example], upstream: "${registry.url}", auth: {mode: anonymous}, verifyBlobDigests: false}\n`,
  );
  const cli = fileURLToPath(new URL('../src/cli.js', import.meta.url));
  // Run as deployed: PROXY_NODE_FLAGS and MALLOC_ARENA_MAX are what the image sets for the proxy.
  const proc = startProcess(process.execPath, [...PROXY_NODE_FLAGS, ...(options.nodeFlags ?? []), cli, 'proxy', '--config', join(dir, 'config.yaml'), '--port', String(port), '--host', '127.0.0.1'], { PULLBRIDGE_LOG_LEVEL: 'warn', MALLOC_ARENA_MAX: '2', ...(options.nodeName ? { NODE_NAME: options.nodeName } : {}) });
  // Stopping it removes its config directory too.
  const running = removingDir(proc, dir);
  try {
    await waitForPort(port);
  } catch (error) {
    await running.stop();
    throw new Error(`${(error as Error).message}\n${proc.output()}`);
  }
  return { port, proc: running };
}

const CLOCK_TICKS = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;

/** CPU seconds (user + system) a running process has used so far. */
export function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // The fields after the command name, which is in parentheses and may hold spaces: utime and stime
  // are fields 14 and 15 of the line.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS;
}

/**
 * CPU seconds a server has used so far: the process and its children (nginx's master and its
 * worker; a Node process's threads are in its own figure already).
 */
export function serverCpuSeconds(pid: number): number {
  let children: number[] = [];
  try {
    children = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    // No children file (older kernels): the process alone.
  }
  return cpuSeconds(pid) + children.reduce((sum, child) => sum + cpuSeconds(child), 0);
}

/** Peak resident set of a process (and its children for nginx's master + worker), in MiB. */
export function peakRssMb(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? 0) / 1024;
}

type Target = 'direct' | 'nginx-plain' | 'nginx-streaming' | 'nginx-tuned' | 'pullbridge' | 'pullbridge-unverified';

export interface ProxyBenchRow {
  readonly id: Target;
  readonly target: string;
  readonly singleMBps: number;
  readonly concurrentMBps: number;
}

export interface ProxyBenchResult {
  readonly sizeMb: number;
  readonly concurrency: number;
  readonly rounds: number;
  readonly rows: readonly ProxyBenchRow[];
  readonly pullbridgePeakRssMb: number;
}

export async function runProxyBench(sizeMb: number, concurrency: number, rounds: number): Promise<ProxyBenchResult> {
  const registry = await startRegistry({ auth: 'none' });
  const procs: Proc[] = [registry.process];
  try {
    const digest = await pushBlob(registry, 'bench/blob', sizeMb);
    const nginx = await startNginx(registry.port);
    const pullbridge = await startPullbridge(registry);
    procs.push(nginx.proc, pullbridge.proc);
    const targets: Array<{ id: Target; name: string; url: string }> = [
      { id: 'direct', name: 'direct from docker-registry', url: `http://127.0.0.1:${registry.port}/v2/bench/blob/blobs/${digest}` },
      { id: 'nginx-plain', name: 'nginx plain reverse proxy (its defaults: buffering on, 8×4k, temp file)', url: `http://127.0.0.1:${nginx.port}/v2/plain/bench/blob/blobs/${digest}` },
      { id: 'nginx-streaming', name: 'nginx reverse proxy (proxy_buffering off)', url: `http://127.0.0.1:${nginx.port}/v2/corp/bench/blob/blobs/${digest}` },
      { id: 'nginx-tuned', name: 'nginx reverse proxy tuned (buffering on, 16×64k, no temp file)', url: `http://127.0.0.1:${nginx.port}/v2/buffered/bench/blob/blobs/${digest}` },
      { id: 'pullbridge', name: 'pullbridge proxy (digest verified while streaming, the default)', url: `http://127.0.0.1:${pullbridge.port}/v2/corp/bench/blob/blobs/${digest}` },
      { id: 'pullbridge-unverified', name: 'pullbridge proxy, verifyBlobDigests: false', url: `http://127.0.0.1:${pullbridge.port}/v2/fast/bench/blob/blobs/${digest}` },
    ];
    const totals = targets.map(() => ({ single: { bytes: 0, seconds: 0 }, concurrent: { bytes: 0, seconds: 0 } }));
    // Warm the page cache, the connections and the JIT: a cold first pull is not the steady state.
    for (let i = 0; i < 2; i++) for (const t of targets) await curl(t.url);
    for (let round = 0; round < rounds; round++) {
      const order = targets.map((_, i) => (i + round) % targets.length);
      for (const i of order) {
        const single = await curl(targets[i]!.url);
        totals[i]!.single.bytes += single.bytes;
        totals[i]!.single.seconds += single.seconds;
        const began = performance.now();
        const all = await Promise.all(Array.from({ length: concurrency }, () => curl(targets[i]!.url)));
        totals[i]!.concurrent.bytes += all.reduce((n, r) => n + r.bytes, 0);
        totals[i]!.concurrent.seconds += (performance.now() - began) / 1000;
      }
    }
    const mb = (t: { bytes: number; seconds: number }) => t.bytes / 2 ** 20 / t.seconds;
    return {
      sizeMb,
      concurrency,
      rounds,
      rows: targets.map((t, i) => ({ id: t.id, target: t.name, singleMBps: mb(totals[i]!.single), concurrentMBps: mb(totals[i]!.concurrent) })),
      pullbridgePeakRssMb: peakRssMb(pullbridge.proc.child.pid ?? 0),
    };
  } finally {
    for (const p of procs.reverse()) await p.stop();
  }
}

export function formatProxyBench(r: ProxyBenchResult): string {
  const row = (id: Target) => r.rows.find((x) => x.id === id);
  const f = (n: number) => n.toFixed(0);
  const lines = [
    `| path (${r.sizeMb} MiB blob, ${r.rounds} rounds alternating) | 1 pull MiB/s | ${r.concurrency} concurrent pulls, total MiB/s |`,
    '|---|---|---|',
    ...r.rows.map((x) => `| ${x.target} | ${f(x.singleMBps)} | ${f(x.concurrentMBps)} |`),
    '',
    '| ratio (single, concurrent) | pullbridge (verified) | pullbridge, verifyBlobDigests: false |',
    '|---|---|---|',
  ];
  const pb = row('pullbridge');
  const fast = row('pullbridge-unverified');
  const ratio = (a: ProxyBenchRow | undefined, b: ProxyBenchRow | undefined) => (a && b ? `${(a.singleMBps / b.singleMBps).toFixed(2)}×, ${(a.concurrentMBps / b.concurrentMBps).toFixed(2)}×` : '?');
  const against: Array<[Target, string]> = [
    ['nginx-plain', '/ nginx, plain reverse proxy (defaults)'],
    ['nginx-streaming', '/ nginx, proxy_buffering off'],
    ['nginx-tuned', '/ nginx, tuned buffers'],
    ['direct', '/ direct from the registry'],
  ];
  for (const [id, label] of against) lines.push(`| ${label} | ${ratio(pb, row(id))} | ${ratio(fast, row(id))} |`);
  lines.push('', `pullbridge peak RSS over the whole run (including ${r.concurrency} × ${r.sizeMb} MiB concurrently, both rules): **${r.pullbridgePeakRssMb.toFixed(0)} MiB**.`);
  return lines.join('\n');
}
