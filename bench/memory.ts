// Proxy memory: the resident set of `pullbridge proxy` as deployed (the image's node flags and
// MALLOC_ARENA_MAX, a node cache), idle after start, idle again after a few pulls, and its peak. The
// chart's proxy memory request and limit are sized from these figures.
//
//   idle         RSS once started and settled (median of samples over `settleSeconds`)
//   after pulls  the same, after pulling a small multi-arch image and one `sizeMb` blob three times
//                (a miss that fills the cache, then two hits), with the process idle again
//   peak         VmHWM: the highest RSS the process had
//
// Each round is a fresh proxy process and cache directory; figures are the median of the rounds.
//
//   npm run bench -- memory [--size-mb 256] [--rounds 3]

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildImage } from '../test/support/oci.js';
import { startRegistry } from '../test/support/registry.js';
import { readRssMb } from './load.js';
import { peakRssMb, pushBlob, startPullbridge } from './proxy.js';

export interface MemoryRound {
  readonly idleMb: number;
  readonly afterPullsMb: number;
  readonly peakMb: number;
}

export interface MemoryBenchResult {
  readonly sizeMb: number;
  readonly settleSeconds: number;
  readonly rounds: readonly MemoryRound[];
}

const median = (values: readonly number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? 0) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
};

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The median RSS of a process over `seconds`, sampled every 250 ms: its settled size. */
async function settledRssMb(pid: number, seconds: number): Promise<number> {
  const samples: number[] = [];
  for (let i = 0; i < seconds * 4; i++) {
    await sleep(250);
    samples.push(readRssMb(pid));
  }
  return median(samples);
}

async function drain(url: string): Promise<void> {
  const res = await fetch(url, { headers: { accept: 'application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json' } });
  if (!res.ok) throw new Error(`${url}: ${res.status}`);
  // Read and drop, as a client would: nothing kept in this process.
  const reader = res.body?.getReader();
  for (;;) {
    const chunk = await reader?.read();
    if (!chunk || chunk.done) break;
  }
}

export async function runMemoryBench(sizeMb: number, rounds: number, settleSeconds = 5): Promise<MemoryBenchResult> {
  const registry = await startRegistry({ auth: 'none' });
  const results: MemoryRound[] = [];
  try {
    const image = buildImage();
    await registry.push(image, 'team/app', '1.0');
    const large = await pushBlob(registry, 'team/large', sizeMb);
    for (let round = 0; round < rounds; round++) {
      const cachePath = mkdtempSync(join(tmpdir(), 'pullbridge-bench-memory-'));
      const { port, proc } = await startPullbridge(registry, { cachePath });
      try {
        const pid = proc.child.pid ?? 0;
        const idleMb = await settledRssMb(pid, settleSeconds);
        const base = `http://127.0.0.1:${port}/v2/corp`;
        await drain(`${base}/team/app/manifests/1.0`);
        for (const manifest of image.manifests) await drain(`${base}/team/app/manifests/${manifest.digest}`);
        for (const blob of [...image.configs, ...image.layers]) await drain(`${base}/team/app/blobs/${blob.digest}`);
        for (let i = 0; i < 3; i++) await drain(`${base}/team/large/blobs/${large}`);
        const afterPullsMb = await settledRssMb(pid, settleSeconds);
        results.push({ idleMb, afterPullsMb, peakMb: peakRssMb(pid) });
      } finally {
        await proc.stop();
        rmSync(cachePath, { recursive: true, force: true });
      }
    }
  } finally {
    await registry.stop();
  }
  return { sizeMb, settleSeconds, rounds: results };
}

export function formatMemoryBench(result: MemoryBenchResult): string {
  const mb = (value: number) => `${value.toFixed(0)} MiB`;
  const row = (name: string, pick: (r: MemoryRound) => number) => `| ${name} | ${mb(median(result.rounds.map(pick)))} | ${result.rounds.map((r) => mb(pick(r))).join(', ')} |`;
  return [
    `\`pullbridge proxy\` as deployed (NODE_OPTIONS=--max-semi-space-size=1, MALLOC_ARENA_MAX=2, a node cache), resident set (RSS) from /proc; a fresh process per round.`,
    '',
    '| RSS | median | rounds |',
    '| --- | ---: | --- |',
    row('idle after start', (r) => r.idleMb),
    row(`idle after pulls (a small image; one ${result.sizeMb} MiB blob: a miss, then two hits)`, (r) => r.afterPullsMb),
    row('peak (VmHWM)', (r) => r.peakMb),
    '',
    `Idle figures are the median of ${result.settleSeconds} s of samples every 250 ms.`,
  ].join('\n');
}
