// Node cache benchmark: one large blob through pullbridge's node cache, side by side in one run with
// the same blob direct from docker-registry, through nginx and through pullbridge without a cache.
//
//   hit     the blob stored: pullbridge from its cache / direct / nginx with tuned buffers, single and
//           concurrent; pullbridge's peak RSS while it serves hits (a proxy process that only did that)
//   miss    the blob not stored (a fresh cache directory and proxy process every round): filled while
//           served, digest verified / nginx as a plain reverse proxy (its defaults) / pullbridge relaying
//   flight  N clients at once for the blob not stored: wall time against one client, and the
//           transfers the registry made (from its access log: one fill for everyone)
//
// Beside every figure: the server's own CPU seconds per GiB delivered (user + system from /proc,
// the serving process only: on two shared cores wall-clock rates mostly measure the clients).
//
// curl is the client; targets alternate their order between rounds and each figure is the median
// of the rounds. Cache directories are removed after each round.
//
//   npm run bench -- cache [--size-mb 1024] [--concurrency 16] [--rounds 2] [--cpu-prof DIR]

import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Proc } from '../test/support/procs.js';
import { startRegistry, type RegistryHandle } from '../test/support/registry.js';
import { reportedKib } from './pageframes.js';
import { curl, curlDigest, peakRssMb, pushBlob, serverCpuSeconds, startNginx, startPullbridge } from './proxy.js';

/** A small blob each fresh proxy pulls first (filled, then hit), so the measured pull meets warm code. */
const WARM_MB = 16;

type HitTarget = 'direct' | 'nginx-tuned' | 'nginx-cache-hit' | 'pullbridge-hit';
type MissTarget = 'nginx-plain' | 'pullbridge-relay' | 'pullbridge-miss' | 'pullbridge-flight';

export interface HitRow {
  readonly id: HitTarget;
  readonly target: string;
  /** Median over the rounds, MiB/s. */
  readonly singleMBps: number;
  /** Median over the rounds of all bytes / wall time of the concurrent pulls, MiB/s. */
  readonly concurrentMBps: number;
  /** Median over the rounds of the server's CPU seconds per GiB delivered, one pull. */
  readonly singleCpuPerGiB: number;
  /** The same for the concurrent pulls. */
  readonly concurrentCpuPerGiB: number;
}

export interface MissRow {
  readonly id: Exclude<MissTarget, 'pullbridge-flight'>;
  readonly target: string;
  /** Median over the rounds, MiB/s. */
  readonly singleMBps: number;
  /** Median over the rounds of the server's CPU seconds per GiB delivered (a miss: until stored). */
  readonly cpuPerGiB: number;
  /** Every round's figure, for the noise. */
  readonly cpuPerGiBRounds: readonly number[];
}

export interface CacheBenchResult {
  readonly sizeMb: number;
  readonly concurrency: number;
  readonly rounds: number;
  readonly hit: readonly HitRow[];
  /** Peak RSS of a pullbridge process that served only hits (single and concurrent), MiB. */
  readonly hitPeakRssMb: number;
  readonly miss: readonly MissRow[];
  /** Peak RSS of the fresh proxies that filled while serving, single client, largest over the rounds. */
  readonly missPeakRssMb: number;
  /** One client, blob not stored: median wall seconds (spawning curl to its exit). */
  readonly missSingleWallSeconds: number;
  /** `concurrency` clients at once, blob not stored: median wall seconds until the last finished. */
  readonly flightWallSeconds: number;
  /** Total MiB/s delivered to the concurrent clients of the flight (median round). */
  readonly flightMBps: number;
  /** The proxy's CPU seconds per GiB delivered to the clients of the flight (median round). */
  readonly flightCpuPerGiB: number;
  /** Blob GETs the registry answered during each round's concurrent miss. */
  readonly flightUpstreamGets: readonly number[];
  /** Peak RSS of the fresh proxies that filled for `concurrency` clients, largest over the rounds. */
  readonly flightPeakRssMb: number;
  /** Where proxy CPU profiles of the miss rounds went, when asked for. */
  readonly cpuProfileDir: string | undefined;
  /** Per miss target (the flight's too): median MiB the guest reported free to its host during its pulls; none where it does not report. */
  readonly missReportedMib: ReadonlyArray<{ readonly id: MissTarget; readonly mib: number }>;
}

/**
 * Waits for a fill to be stored: clients get the last byte once it hashed right, before it is
 * flushed and renamed into place. Throws when it is not stored within 60 s (the fill stored nothing).
 */
async function waitStored(path: string): Promise<void> {
  for (const deadline = Date.now() + 60_000; ; await new Promise((r) => setTimeout(r, 50))) {
    try {
      statSync(path);
      return;
    } catch (error) {
      if (Date.now() > deadline) throw error;
    }
  }
}

export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

const mibPerSecond = (bytes: number, seconds: number) => bytes / 2 ** 20 / seconds;

/** `work` with the CPU seconds the server process `pid` spent meanwhile, per GiB of `bytes(result)`. */
async function withCpu<T>(pid: number, work: () => Promise<T>, bytes: (result: T) => number): Promise<{ value: T; cpuPerGiB: number }> {
  const before = serverCpuSeconds(pid);
  const value = await work();
  return { value, cpuPerGiB: (serverCpuSeconds(pid) - before) / (bytes(value) / 2 ** 30) };
}

/** `count` curls at once: total bytes and wall seconds until the last one exited. */
async function concurrentCurl(url: string, count: number, expectBytes: number): Promise<{ bytes: number; seconds: number }> {
  const began = performance.now();
  const all = await Promise.all(Array.from({ length: count }, () => curl(url)));
  const seconds = (performance.now() - began) / 1000;
  for (const r of all) if (r.bytes !== expectBytes) throw new Error(`${url}: ${r.bytes} bytes, expected ${expectBytes}`);
  return { bytes: all.reduce((n, r) => n + r.bytes, 0), seconds };
}

async function singleCurl(url: string, expectBytes: number): Promise<{ bytes: number; seconds: number; wallSeconds: number }> {
  const began = performance.now();
  const r = await curl(url);
  const wallSeconds = (performance.now() - began) / 1000;
  if (r.bytes !== expectBytes) throw new Error(`${url}: ${r.bytes} bytes, expected ${expectBytes}`);
  return { ...r, wallSeconds };
}

export function storedPath(cachePath: string, digest: string): string {
  const [algorithm, hex] = digest.split(':');
  return join(cachePath, 'blobs', algorithm ?? '', hex ?? '');
}

/**
 * Writes dirty pages out (the pushed blob, nginx's and the cache's files) so that no measured pull
 * pays for another's writeback: the kernel starts flushing them 30 s later, in the middle of a pull.
 */
export const flushDisk = () => void spawnSync('sync');

/** The registry writes its access log line as a request ends; give the pipe a moment to deliver it. */

interface Running {
  readonly port: number;
  readonly proc: Proc;
}

export async function runCacheBench(sizeMb: number, concurrency: number, rounds: number, cpuProfileDir?: string): Promise<CacheBenchResult> {
  const registry: RegistryHandle = await startRegistry({ auth: 'none', accessLog: true });
  const scratch = mkdtempSync(join(tmpdir(), 'pullbridge-cache-bench-'));
  const procs: Proc[] = [registry.process];
  const size = sizeMb * 2 ** 20;
  try {
    const digest = await pushBlob(registry, 'bench/blob', sizeMb);
    const warmDigest = await pushBlob(registry, 'bench/warm', WARM_MB);
    flushDisk();
    const nginx = await startNginx(registry.port);
    const relay = await startPullbridge(registry);
    procs.push(nginx.proc, relay.proc);
    const blobUrl = (port: number, prefix: string) => `http://127.0.0.1:${port}/v2/${prefix}bench/blob/blobs/${digest}`;
    const warm = async (p: Running) => {
      for (let i = 0; i < 2; i++) await singleCurl(`http://127.0.0.1:${p.port}/v2/corp/bench/warm/blobs/${warmDigest}`, WARM_MB * 2 ** 20);
    };

    // ---- hits: fill the cache with one proxy, then serve it from a new process on the same store,
    // so that process's peak RSS is what serving hits takes.
    const hitCache = join(scratch, 'hit');
    let hitProxy: Running = await startPullbridge(registry, { cachePath: hitCache });
    await singleCurl(blobUrl(hitProxy.port, 'corp/'), size);
    await waitStored(storedPath(hitCache, digest));
    await hitProxy.proc.stop();
    hitProxy = await startPullbridge(registry, { cachePath: hitCache });
    procs.push(hitProxy.proc);
    const gets = await registry.blobGets(digest);
    const hitTargets: Array<{ id: HitTarget; name: string; url: string; pid: number }> = [
      { id: 'direct', name: 'direct from docker-registry', url: blobUrl(registry.port, ''), pid: registry.process.child.pid ?? 0 },
      { id: 'nginx-tuned', name: 'nginx reverse proxy tuned (buffering on, 16×64k, no temp file), relaying', url: blobUrl(nginx.port, 'buffered/'), pid: nginx.proc.child.pid ?? 0 },
      { id: 'nginx-cache-hit', name: 'nginx proxy_cache, blob in its cache (hit)', url: blobUrl(nginx.port, 'cached/'), pid: nginx.proc.child.pid ?? 0 },
      { id: 'pullbridge-hit', name: 'pullbridge, blob in its node cache (hit)', url: blobUrl(hitProxy.port, 'corp/'), pid: hitProxy.proc.child.pid ?? 0 },
    ];
    // Warm the page cache, connections and JIT: a cold first pull is not the steady state. (It also
    // fills nginx's cache: its one GET of the blob.)
    for (const t of hitTargets) await singleCurl(t.url, size);
    const hitRuns = hitTargets.map(() => ({ single: [] as number[], concurrent: [] as number[], singleCpu: [] as number[], concurrentCpu: [] as number[] }));
    for (let round = 0; round < rounds; round++) {
      for (const i of hitTargets.map((_, k) => (k + round) % hitTargets.length)) {
        const t = hitTargets[i]!;
        const single = await withCpu(t.pid, () => singleCurl(t.url, size), (r) => r.bytes);
        hitRuns[i]!.single.push(mibPerSecond(single.value.bytes, single.value.seconds));
        hitRuns[i]!.singleCpu.push(single.cpuPerGiB);
        const all = await withCpu(t.pid, () => concurrentCurl(t.url, concurrency, size), (r) => r.bytes);
        hitRuns[i]!.concurrent.push(mibPerSecond(all.value.bytes, all.value.seconds));
        hitRuns[i]!.concurrentCpu.push(all.cpuPerGiB);
        process.stderr.write(`hit round ${round + 1}: ${t.id} ${hitRuns[i]!.single.at(-1)!.toFixed(0)} MiB/s ${single.cpuPerGiB.toFixed(2)} CPU-s/GiB, ${concurrency}× ${hitRuns[i]!.concurrent.at(-1)!.toFixed(0)} MiB/s ${all.cpuPerGiB.toFixed(2)} CPU-s/GiB\n`);
      }
    }
    const hitPeakRssMb = peakRssMb(hitProxy.proc.child.pid ?? 0);
    // pullbridge from its cache never asked the registry for the blob (the direct and relaying nginx
    // pulls did), nor did nginx's cache after its one fill.
    const directGets = rounds * (1 + concurrency) + 1;
    const nginxGets = directGets + 1;
    const hitGets = (await registry.blobGets(digest)) - gets;
    if (hitGets !== directGets + nginxGets) throw new Error(`hits reached the registry: ${hitGets} blob GETs, expected ${directGets + nginxGets} (direct, relaying nginx and nginx's one cache fill)`);
    const { digest: hitDigest } = await curlDigest(blobUrl(hitProxy.port, 'corp/'));
    if (hitDigest !== digest) throw new Error(`a hit delivered ${hitDigest}, not ${digest}`);
    await hitProxy.proc.stop();
    rmSync(hitCache, { recursive: true, force: true });

    // ---- misses: a fresh proxy on a fresh cache directory for every pull that must miss.
    let missRound = 0;
    /** `body` on a fresh proxy; `cpuSeconds`: what the proxy spent from the start of `body` until the blob was stored. */
    const fresh = async <T>(what: string, body: (p: Running, cachePath: string) => Promise<T>): Promise<{ value: T; peakRssMb: number; cpuSeconds: number }> => {
      const cachePath = join(scratch, `miss-${missRound++}`);
      const flags: string[] = [];
      if (cpuProfileDir) {
        mkdirSync(cpuProfileDir, { recursive: true });
        flags.push('--cpu-prof', `--cpu-prof-dir=${cpuProfileDir}`, `--cpu-prof-name=${what}-${missRound}.cpuprofile`);
      }
      const p = await startPullbridge(registry, { cachePath, nodeFlags: flags });
      try {
        await warm(p);
        const pid = p.proc.child.pid ?? 0;
        const before = serverCpuSeconds(pid);
        const value = await body(p, cachePath);
        await waitStored(storedPath(cachePath, digest)); // filled, verified and stored, not relayed
        return { value, peakRssMb: peakRssMb(pid), cpuSeconds: serverCpuSeconds(pid) - before };
      } finally {
        await p.proc.stop();
        rmSync(cachePath, { recursive: true, force: true });
      }
    };
    const missTargets: Array<{ id: MissTarget; name: string }> = [
      { id: 'nginx-plain', name: 'nginx plain reverse proxy (its defaults: buffering on, 8×4k, temp file)' },
      { id: 'pullbridge-relay', name: 'pullbridge without a cache (relay, digest verified while streaming)' },
      { id: 'pullbridge-miss', name: 'pullbridge, node cache miss (fresh cache dir: filled while served, digest verified)' },
      { id: 'pullbridge-flight', name: `pullbridge, node cache miss, ${concurrency} clients at once` },
    ];
    const missRuns = new Map<MissTarget, number[]>(missTargets.map((t) => [t.id, []]));
    const missCpu = new Map<MissTarget, number[]>(missTargets.map((t) => [t.id, []]));
    const missReportedKib = new Map<MissTarget, number[]>(missTargets.map((t) => [t.id, []]));
    const gib = (bytes: number) => bytes / 2 ** 30;
    const missWall: number[] = [];
    const flightWall: number[] = [];
    const flightRate: number[] = [];
    const flightUpstreamGets: number[] = [];
    let missPeakRssMb = 0;
    let flightPeakRssMb = 0;
    await singleCurl(blobUrl(nginx.port, 'plain/'), size);
    await singleCurl(blobUrl(relay.port, 'corp/'), size);
    for (let round = 0; round < rounds; round++) {
      for (const i of missTargets.map((_, k) => (k + round) % missTargets.length)) {
        const t = missTargets[i]!;
        flushDisk();
        const reportedBefore = reportedKib();
        let note: string;
        if (t.id === 'nginx-plain' || t.id === 'pullbridge-relay') {
          const server = t.id === 'nginx-plain' ? nginx : relay;
          const { value: r, cpuPerGiB } = await withCpu(server.proc.child.pid ?? 0, () => singleCurl(blobUrl(server.port, t.id === 'nginx-plain' ? 'plain/' : 'corp/'), size), (x) => x.bytes);
          missRuns.get(t.id)!.push(mibPerSecond(r.bytes, r.seconds));
          missCpu.get(t.id)!.push(cpuPerGiB);
          note = `${missRuns.get(t.id)!.at(-1)!.toFixed(0)} MiB/s, ${cpuPerGiB.toFixed(2)} CPU-s/GiB`;
        } else if (t.id === 'pullbridge-miss') {
          const { value: r, peakRssMb: rss, cpuSeconds } = await fresh('miss', (p) => singleCurl(blobUrl(p.port, 'corp/'), size));
          missRuns.get(t.id)!.push(mibPerSecond(r.bytes, r.seconds));
          missCpu.get(t.id)!.push(cpuSeconds / gib(r.bytes));
          missWall.push(r.wallSeconds);
          missPeakRssMb = Math.max(missPeakRssMb, rss);
          note = `${missRuns.get(t.id)!.at(-1)!.toFixed(0)} MiB/s, ${r.wallSeconds.toFixed(2)} s wall, ${missCpu.get(t.id)!.at(-1)!.toFixed(2)} CPU-s/GiB`;
        } else {
          const { value, peakRssMb: rss, cpuSeconds } = await fresh('flight', async (p) => {
            const before = await registry.blobGets(digest);
            const r = await concurrentCurl(blobUrl(p.port, 'corp/'), concurrency, size);
            return { ...r, gets: (await registry.blobGets(digest)) - before };
          });
          flightWall.push(value.seconds);
          flightRate.push(mibPerSecond(value.bytes, value.seconds));
          flightUpstreamGets.push(value.gets);
          missCpu.get(t.id)!.push(cpuSeconds / gib(value.bytes));
          flightPeakRssMb = Math.max(flightPeakRssMb, rss);
          note = `${value.seconds.toFixed(2)} s wall, ${value.gets} upstream GETs, ${missCpu.get(t.id)!.at(-1)!.toFixed(2)} CPU-s/GiB`;
        }
        const reportedAfter = reportedKib();
        if (reportedBefore !== undefined && reportedAfter !== undefined) missReportedKib.get(t.id)!.push(reportedAfter - reportedBefore);
        process.stderr.write(`miss round ${round + 1}: ${t.id} ${note}\n`);
      }
    }
    return {
      sizeMb,
      concurrency,
      rounds,
      hit: hitTargets.map((t, i) => ({
        id: t.id,
        target: t.name,
        singleMBps: median(hitRuns[i]!.single),
        concurrentMBps: median(hitRuns[i]!.concurrent),
        singleCpuPerGiB: median(hitRuns[i]!.singleCpu),
        concurrentCpuPerGiB: median(hitRuns[i]!.concurrentCpu),
      })),
      hitPeakRssMb,
      miss: missTargets.flatMap((t) => (t.id === 'pullbridge-flight' ? [] : [{ id: t.id, target: t.name, singleMBps: median(missRuns.get(t.id)!), cpuPerGiB: median(missCpu.get(t.id)!), cpuPerGiBRounds: missCpu.get(t.id)! }])),
      missPeakRssMb,
      missSingleWallSeconds: median(missWall),
      flightWallSeconds: median(flightWall),
      flightMBps: median(flightRate),
      flightCpuPerGiB: median(missCpu.get('pullbridge-flight')!),
      flightUpstreamGets,
      flightPeakRssMb,
      cpuProfileDir,
      missReportedMib: missTargets.flatMap((t) => {
        const kib = missReportedKib.get(t.id)!;
        return kib.length > 0 ? [{ id: t.id, mib: median(kib) / 1024 }] : [];
      }),
    };
  } finally {
    for (const p of procs.reverse()) await p.stop();
    rmSync(scratch, { recursive: true, force: true });
    rmSync(registry.dir, { recursive: true, force: true });
  }
}

const verdict = (met: boolean) => (met ? 'met' : '**missed**');

export function formatCacheBench(r: CacheBenchResult): string {
  const f = (n: number) => n.toFixed(0);
  const c = (n: number) => n.toFixed(2);
  const x = (n: number) => `${n.toFixed(2)}×`;
  const hit = (id: HitTarget) => r.hit.find((row) => row.id === id)!;
  const miss = (id: MissRow['id']) => r.miss.find((row) => row.id === id)!;
  const pbHit = hit('pullbridge-hit');
  const pbMiss = miss('pullbridge-miss');
  const hitVsDirect = pbHit.singleMBps / hit('direct').singleMBps;
  const hitVsNginxHit = pbHit.singleMBps / hit('nginx-cache-hit').singleMBps;
  const hitVsNginxHitConcurrent = pbHit.concurrentMBps / hit('nginx-cache-hit').concurrentMBps;
  const hitConcurrent = pbHit.concurrentMBps / hit('direct').concurrentMBps;
  const missVsPlain = pbMiss.singleMBps / miss('nginx-plain').singleMBps;
  const missVsRelay = pbMiss.singleMBps / miss('pullbridge-relay').singleMBps;
  const flightRatio = r.flightWallSeconds / r.missSingleWallSeconds;
  const deliverySeconds = (r.concurrency * r.sizeMb) / pbHit.concurrentMBps;
  const oneGet = r.flightUpstreamGets.every((n) => n === 1);
  const lines = [
    `One ${r.sizeMb} MiB blob, curl as the client, ${r.rounds} rounds with the order of the targets alternating; every figure is the median of the rounds. The machine has 2 cores shared by curl, docker-registry, nginx and the proxy, so figures are relative to each other, not to a real node.`,
    '',
    `**Hit** (the blob in pullbridge's node cache, served from its file; the fair twin is nginx serving it from its own \`proxy_cache\`; the relaying rows are there for scale):`,
    '',
    `| path | 1 pull MiB/s | ${r.concurrency} concurrent pulls, total MiB/s | server CPU-s per GiB, 1 pull | server CPU-s per GiB, ${r.concurrency} concurrent |`,
    '|---|---|---|---|---|',
    ...r.hit.map((row) => `| ${row.target} | ${f(row.singleMBps)} | ${f(row.concurrentMBps)} | ${c(row.singleCpuPerGiB)} | ${c(row.concurrentCpuPerGiB)} |`),
    '',
    `**Miss** (a fresh proxy process and cache directory for every pull through the cache; the other two relay the same blob from the registry; dirty pages are flushed with \`sync\` before each):`,
    '',
    '| path | 1 pull MiB/s | server CPU-s per GiB (median; every round) |',
    '|---|---|---|',
    ...r.miss.map((row) => `| ${row.target} | ${f(row.singleMBps)} | ${c(row.cpuPerGiB)} (${row.cpuPerGiBRounds.map(c).join(', ')}) |`),
    '',
    'A miss does what nginx plain does with a large body (write it to a file, read it back) and also hashes every byte before the blob is kept (sha256, about 0.6 CPU-seconds per GiB, as the bytes are written), on two cores that the client and the registry need too; nginx keeps nothing and checks nothing. The fair comparison of the cache\'s own cost is the relay row: pullbridge\'s verified relay, which hashes inline.',
    '',
    `**Single flight** (${r.concurrency} clients at once for the blob not in the cache, fresh proxy and cache directory each round): ${r.flightWallSeconds.toFixed(2)} s until the last client finished (${f(r.flightMBps)} MiB/s delivered in total, ${c(r.flightCpuPerGiB)} proxy CPU-s per GiB delivered), against ${r.missSingleWallSeconds.toFixed(2)} s for one client; upstream blob GETs per round, from the registry's access log: ${r.flightUpstreamGets.join(', ')}. Delivering ${r.concurrency} × ${r.sizeMb} MiB at the rate pullbridge serves ${r.concurrency} concurrent hits (${f(pbHit.concurrentMBps)} MiB/s) alone takes ${deliverySeconds.toFixed(2)} s (${x(deliverySeconds / r.missSingleWallSeconds)} the single miss): on this machine the clients' bytes, not the upstream transfer, bound this figure.`,
    '',
    '| measure | value | target | |',
    '|---|---|---|---|',
    `| hit, 1 pull / direct from the registry | ${x(hitVsDirect)} | ≥ 0.80× | ${verdict(hitVsDirect >= 0.8)} |`,
    `| hit, 1 pull / nginx proxy_cache hit | ${x(hitVsNginxHit)} | ≥ 1.00× | ${verdict(hitVsNginxHit >= 1)} |`,
    `| hit, ${r.concurrency} concurrent / ${r.concurrency} concurrent nginx proxy_cache hits | ${x(hitVsNginxHitConcurrent)} | (reported) | |`,
    `| hit, ${r.concurrency} concurrent / ${r.concurrency} concurrent direct (total throughput) | ${x(hitConcurrent)} | (reported) | |`,
    `| pullbridge peak RSS, a process serving only hits | ${f(r.hitPeakRssMb)} MiB | ≤ 100 MiB | ${verdict(r.hitPeakRssMb <= 100)} |`,
    `| miss, 1 pull / nginx plain reverse proxy | ${x(missVsPlain)} | ≥ 1.00× | ${verdict(missVsPlain >= 1)} |`,
    `| miss, 1 pull / pullbridge relay (no cache) | ${x(missVsRelay)} | (reported) | |`,
    `| miss, server CPU-s per GiB (until stored) | ${c(pbMiss.cpuPerGiB)} | ≤ 1.40 | ${verdict(pbMiss.cpuPerGiB <= 1.4)} |`,
    `| relay (no cache, verified), server CPU-s per GiB | ${c(miss('pullbridge-relay').cpuPerGiB)} | ≤ 1.10 | ${verdict(miss('pullbridge-relay').cpuPerGiB <= 1.1)} |`,
    `| hit, server CPU-s per GiB, 1 pull | ${c(pbHit.singleCpuPerGiB)} | ≤ 0.45 | ${verdict(pbHit.singleCpuPerGiB <= 0.45)} |`,
    `| miss, ${r.concurrency} clients at once / 1 client (wall time) | ${x(flightRatio)} | ≤ 1.30× | ${verdict(flightRatio <= 1.3)} |`,
    `| upstream GETs for ${r.concurrency} concurrent clients of an uncached blob | ${r.flightUpstreamGets.join(', ')} | 1 | ${verdict(oneGet)} |`,
    '',
    `pullbridge peak RSS while filling: ${f(r.missPeakRssMb)} MiB for one client, ${f(r.flightPeakRssMb)} MiB for ${r.concurrency} clients (each a fresh process, largest over the rounds).`,
    `Checked on every run: each pull delivered ${r.sizeMb} MiB; every miss stored the blob under its digest (fill verified); the hits never reached the registry (nginx's cache: its one fill); one hit's bytes hashed by the client to the digest.`,
  ];
  if (r.missReportedMib.length > 0) {
    lines.push(
      `Memory the guest reported free to its host during the miss pulls, MiB (median): ${r.missReportedMib.map((x) => `${x.id} ${x.mib.toFixed(0)}`).join(', ')}. Page-cache writes into frames handed back cost about 2.5 CPU-s per GiB more on this VM (bench/pageframes.ts): the miss's figure moves with it, the relays' do not.`,
    );
  }
  if (r.cpuProfileDir) lines.push(`CPU profiles of the miss proxies: ${r.cpuProfileDir}.`);
  return lines.join('\n');
}
