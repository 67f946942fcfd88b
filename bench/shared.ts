// Shared cache tier benchmark: N pullbridge processes ("nodes", each with a NODE_NAME of its own)
// in front of one docker-registry, all asked for the same new 1 GiB layer at the same moment, one
// client per node. Side by side in one run:
//
//   one transfer  one client straight from the registry (through the same cap, if any): the time
//                 one tunnel transfer of the layer takes, which the rollout's time is measured against
//   relay         no cache: every node streams the layer from the upstream
//   node cache    cache.path only: every node fills its own store from the upstream
//   shared S3     cache.path + cache.shared.s3 on one versitygw: one node claims the fill and fetches
//                 from the upstream, the others get the layer through the store. Twice:
//                 streamFills: false (before: they wait for the whole blob to be uploaded) and
//                 streamFills: true (after: they follow the filler's segment objects as they land)
//   shared fs     the same with cache.shared.filesystem on one directory (a ReadWriteMany volume)
//
// Measured per setup: wall time until the last client finished against one transfer (target 1.15×),
// each client's time to its first byte and its longest stretch without bytes (target < 10 s), the
// bytes and blob GETs the upstream answered (its access log, settled), what the filler wrote to and
// the followers read from the shared store (the nodes' counters, segments and takeovers included),
// when the first node had the layer stored and when the shared store had it, the CPU seconds of
// each role (filler, other nodes, object store, upstream, clients) per GiB delivered, the machine's
// saturation, and, for the shared setups, one more node pulling the layer afterwards with the
// upstream killed. Every client is the same small Node process (bench/streamclient.ts) hashing the
// bytes as they arrive; they must hash to the layer's digest.
//
// Each round starts every setup from nothing (new proxy processes, node stores, shared store); the
// setups rotate their order between rounds, a shared setup's before/after rows swap theirs, and
// every figure is the median of the rounds.
//
// With --upstream-mbps N, what the upstream sends is capped at N Mbit/s in all (an HTB class on the
// loopback device for the registry's port, in a network namespace of the bench's own): the tunnel
// the nodes share in production, which loopback otherwise is not.
//
//   npm run bench -- shared [--size-mb 1024] [--nodes 4] [--rounds 2] [--upstream-mbps N]
//                           [--setups relay,node-cache,shared-s3,shared-fs,shared-s3-after,…]

import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSharedStore } from '../src/cache/shared/open.js';
import type { SharedStore } from '../src/cache/shared/store.js';
import { sharedKeys } from '../src/cache/shared/tier.js';
import { formatConfigErrors, validateConfig } from '../src/rules/config.js';
import { startVersitygw, type S3Server } from '../test/support/objectstores.js';
import { run, type Proc } from '../test/support/procs.js';
import { startRegistry, type RegistryHandle } from '../test/support/registry.js';
import { flushDisk, median, storedPath } from './cache.js';
import { reportedKib } from './pageframes.js';
import { cpuSeconds, curl, pushBlob, startPullbridge, type PullbridgeOptions } from './proxy.js';
import { streamClient, type StreamClientResult } from './streamclient.js';

/** A small blob each fresh proxy pulls first, so that the measured pull meets warm code (and, in
 * the shared setups, a store client that has connected and a tier that has claimed, uploaded and read). */
const WARM_MB = 16;
const MiB = 2 ** 20;
const GiB = 2 ** 30;
/** How long the bench waits for the filler's upload to the shared store to land. */
const UPLOAD_WAIT_MS = 300_000;
/** How long, after the upload, for the filler to remove the fill's segment objects. */
const SEGMENTS_GONE_WAIT_MS = 30_000;
/** How often the bench looks, during the pull, for the layer stored on a node and in the shared store. */
const WATCH_MS = 250;
/** Issue 24's targets: the last node done within 1.15× one tunnel transfer; no client without a byte for 10 s. */
const ONE_TRANSFER_TARGET = 1.15;
const GAP_TARGET_SECONDS = 10;

type SetupId = 'relay' | 'node-cache' | 'shared-s3' | 'shared-fs';
export type RowId = 'one-transfer' | 'relay' | 'node-cache' | 'shared-s3-before' | 'shared-s3-after' | 'shared-fs-before' | 'shared-fs-after';

interface RowSpec {
  readonly id: RowId;
  /** The setup the row runs (its nodes and store); 'one-transfer' runs no node. */
  readonly setup: SetupId | 'one-transfer';
  /** The setup's name, the same for its before and after rows. */
  readonly group: string;
  readonly name: string;
  /** cache.shared.streamFills for the shared setups. */
  readonly streamFills?: boolean;
}

/** The rows, in groups: a group's rows run one after the other, their order swapped every round. */
const GROUPS: ReadonlyArray<readonly RowSpec[]> = [
  [{ id: 'one-transfer', setup: 'one-transfer', group: 'one transfer', name: 'one transfer: one client straight from the registry' }],
  [{ id: 'relay', setup: 'relay', group: 'relay', name: 'relay (no cache)' }],
  [{ id: 'node-cache', setup: 'node-cache', group: 'node cache', name: 'node cache alone (cache.path)' }],
  [
    { id: 'shared-s3-before', setup: 'shared-s3', group: 'shared tier, S3 API (versitygw)', name: 'shared tier, S3 API (versitygw), streamFills: false (before)', streamFills: false },
    { id: 'shared-s3-after', setup: 'shared-s3', group: 'shared tier, S3 API (versitygw)', name: 'shared tier, S3 API (versitygw), streamFills: true (after)', streamFills: true },
  ],
  [
    { id: 'shared-fs-before', setup: 'shared-fs', group: 'shared tier, filesystem (one directory)', name: 'shared tier, filesystem (one directory), streamFills: false (before)', streamFills: false },
    { id: 'shared-fs-after', setup: 'shared-fs', group: 'shared tier, filesystem (one directory)', name: 'shared tier, filesystem (one directory), streamFills: true (after)', streamFills: true },
  ],
];
const ROWS = GROUPS.flat();

/**
 * The rows a `--setups` list names (comma-separated setups, `shared-s3` for both its rows or
 * `shared-s3-after` for one); undefined: all. One transfer always runs: the ratio needs it.
 * Throws a one-line error naming the flag for an unknown name.
 */
export function selectRows(setups: string | undefined): RowId[] {
  if (setups === undefined) return ROWS.map((r) => r.id);
  const known: string[] = [...new Set(ROWS.flatMap((r) => (r.setup === 'one-transfer' ? [] : [r.setup, r.id])))];
  const names = setups.split(',').map((name) => name.trim());
  const unknown = names.find((name) => !known.includes(name));
  if (unknown !== undefined) throw new Error(`--setups: unknown setup "${unknown}" (known: ${known.join(', ')})`);
  return ROWS.filter((r) => r.setup === 'one-transfer' || names.includes(r.id) || names.includes(r.setup)).map((r) => r.id);
}

/** CPU seconds per role during the pull (until the shared store had the blob and the segments were removed). */
export interface RoleCpu {
  /** The node that filled from the upstream (the one that wrote the layer to the shared store). */
  readonly filler: number | undefined;
  /** Each other node (the median of them); undefined with no node. */
  readonly otherNode: number | undefined;
  /** All nodes together. */
  readonly nodes: number;
  readonly store: number | undefined;
  readonly upstream: number;
  /** All clients together (their own account, from their request to their last byte). */
  readonly clients: number;
  /** Everything above together. */
  readonly total: number;
}

export interface SharedRow {
  readonly id: RowId;
  readonly group: string;
  readonly setup: string;
  readonly streamFills: boolean | undefined;
  /** Clients that pulled the layer at once (the nodes; 1 for one transfer). */
  readonly clients: number;
  /** Layer bytes the upstream sent, each round (its access log). */
  readonly upstreamBytes: readonly number[];
  /** Layer GETs the upstream answered 200 and 206 (a range: a takeover), each round. */
  readonly upstreamGets: readonly number[];
  readonly upstreamRangeGets: readonly number[];
  /** Medians over the rounds, seconds from the start: until the last client finished (spawning the
   * clients to the last exit), the fastest client's own total, the latest first byte any client got. */
  readonly wallSeconds: number;
  readonly firstDoneSeconds: number;
  readonly latestFirstByteSeconds: number;
  /** Median over the rounds of the worst client's longest stretch without bytes (its wait for the first byte included). */
  readonly longestGapSeconds: number;
  /** Median over the rounds: when the first node had the layer in its store (filled and verified), and
   * when the shared store had the whole blob; undefined where none does. */
  readonly storedSeconds: number | undefined;
  readonly inStoreSeconds: number | undefined;
  /** Medians over the rounds, bytes: what the filler wrote to the shared store, what the other nodes read from it, all nodes' totals. */
  readonly fillerWritten: number | undefined;
  readonly followersRead: number | undefined;
  readonly sharedWritten: number;
  readonly sharedRead: number;
  /** Medians over the rounds: segment objects all nodes wrote / read, fills taken over. */
  readonly segmentsWritten: number;
  readonly segmentsRead: number;
  readonly takeovers: number;
  /** The most segment objects of the layer left in the store after the fill was shared, over the rounds. */
  readonly segmentsLeft: number | undefined;
  readonly cpu: RoleCpu;
  /** Median over the rounds: Σ CPU seconds of the roles until the last client finished / (cores × wall). */
  readonly saturation: number;
  /** Median over the rounds: one more fresh node pulling the layer from the shared tier with the upstream killed, seconds. */
  readonly afterOutageSeconds: number | undefined;
  /** Median over the rounds: MiB the guest reported free to its host during the pulls (pageframes.ts). */
  readonly reportedMib: number | undefined;
}

export interface SharedBenchResult {
  readonly sizeMb: number;
  readonly nodes: number;
  readonly rounds: number;
  /** The cap on what the upstream sends, Mbit/s; undefined: none (loopback). */
  readonly upstreamMbps: number | undefined;
  readonly cores: number;
  readonly rows: readonly SharedRow[];
}

export interface SharedBenchOptions {
  readonly sizeMb: number;
  readonly nodes: number;
  readonly rounds: number;
  readonly upstreamMbps?: number;
  /** The rows to run (selectRows); all when undefined. */
  readonly rows?: readonly RowId[];
}

interface RoundResult {
  readonly clients: readonly StreamClientResult[];
  readonly wallSeconds: number;
  readonly storedSeconds: number | undefined;
  readonly inStoreSeconds: number | undefined;
  readonly upstreamBytes: number;
  readonly upstreamGets: number;
  readonly upstreamRangeGets: number;
  readonly fillerWritten: number | undefined;
  readonly followersRead: number | undefined;
  readonly shared: NodeCounters;
  readonly segmentsLeft: number | undefined;
  readonly cpu: RoleCpu;
  readonly saturation: number;
  readonly afterOutageSeconds: number | undefined;
  /** KiB the guest reported free to its host during the pulls (pageframes.ts); undefined where it does not report. */
  readonly reportedKib: number | undefined;
}

interface Node {
  readonly port: number;
  readonly proc: Proc;
}

/** A node's shared-tier counters, from its /metrics. */
interface NodeCounters {
  /** pullbridge_cache_shared_bytes_total{direction}: segments and blobs. */
  readonly read: number;
  readonly written: number;
  /** pullbridge_cache_shared_segments_total{direction}: segment objects. */
  readonly segmentsRead: number;
  readonly segmentsWritten: number;
  /** pullbridge_cache_shared_takeovers_total. */
  readonly takeovers: number;
}

const sum = (values: readonly number[]) => values.reduce((t, v) => t + v, 0);

const NO_COUNTERS: NodeCounters = { read: 0, written: 0, segmentsRead: 0, segmentsWritten: 0, takeovers: 0 };

async function nodeCounters(node: Node): Promise<NodeCounters> {
  const text = await (await fetch(`http://127.0.0.1:${node.port}/metrics`)).text();
  // A counter a build does not have (segments before streamFills) reads as 0.
  const value = (name: string, direction?: string) => Number(new RegExp(`^${name}${direction === undefined ? '' : `\\{direction="${direction}"\\}`} (\\S+)$`, 'm').exec(text)?.[1] ?? 0);
  return {
    read: value('pullbridge_cache_shared_bytes_total', 'read'),
    written: value('pullbridge_cache_shared_bytes_total', 'written'),
    segmentsRead: value('pullbridge_cache_shared_segments_total', 'read'),
    segmentsWritten: value('pullbridge_cache_shared_segments_total', 'written'),
    takeovers: value('pullbridge_cache_shared_takeovers_total'),
  };
}

const countersDelta = (after: NodeCounters, before: NodeCounters): NodeCounters => ({
  read: after.read - before.read,
  written: after.written - before.written,
  segmentsRead: after.segmentsRead - before.segmentsRead,
  segmentsWritten: after.segmentsWritten - before.segmentsWritten,
  takeovers: after.takeovers - before.takeovers,
});

const countersTotal = (each: readonly NodeCounters[]): NodeCounters => ({
  read: sum(each.map((c) => c.read)),
  written: sum(each.map((c) => c.written)),
  segmentsRead: sum(each.map((c) => c.segmentsRead)),
  segmentsWritten: sum(each.map((c) => c.segmentsWritten)),
  takeovers: sum(each.map((c) => c.takeovers)),
});

/** The shared store the nodes use, opened through the project's own adapter (the bench looks for
 * the blob and the segments in it, as a node would). */
async function openBenchStore(shared: NonNullable<PullbridgeOptions['shared']>): Promise<SharedStore> {
  const validated = validateConfig({ cache: { path: '/unused', shared } });
  if (!validated.ok || !validated.config.cache?.shared) throw new Error(`the bench's shared store config is refused: ${validated.ok ? 'no cache.shared' : formatConfigErrors(validated.errors)}`);
  return openSharedStore(validated.config.cache.shared);
}

/** Segment objects of the blob in the store. */
async function segmentsIn(store: SharedStore, digest: string): Promise<number> {
  let count = 0;
  for await (const _ of store.list(sharedKeys.segments(digest))) count++;
  return count;
}

/**
 * Waits until the shared store has each blob whole (the filler uploads after the fill, and with
 * streamFills after its segments), then until the fills' segment objects are gone (the filler
 * removes them after the upload). Answers when the blobs were there (performance.now()) and how
 * many of the last blob's segments were left after SEGMENTS_GONE_WAIT_MS (0 when all went).
 */
async function waitShared(store: SharedStore, digests: readonly string[]): Promise<{ presentAt: number; segmentsLeft: number }> {
  let presentAt: number;
  for (const deadline = Date.now() + UPLOAD_WAIT_MS; ; await new Promise((r) => setTimeout(r, 200))) {
    const present = await Promise.all(digests.map((d) => store.stat(sharedKeys.blob(d))));
    presentAt = performance.now();
    if (present.every((o) => o !== undefined)) break;
    if (Date.now() > deadline) throw new Error(`the shared store did not have ${digests.filter((_, i) => present[i] === undefined).join(', ')} within ${UPLOAD_WAIT_MS / 1000} s of the pull`);
  }
  for (const deadline = Date.now() + SEGMENTS_GONE_WAIT_MS; ; await new Promise((r) => setTimeout(r, 200))) {
    const counts = await Promise.all(digests.map((d) => segmentsIn(store, d)));
    if (counts.every((n) => n === 0) || Date.now() > deadline) return { presentAt, segmentsLeft: counts.at(-1) ?? 0 };
  }
}

/**
 * Caps what the upstream sends (packets from its port on the loopback device) at `mbps` in all, as
 * one tunnel all nodes share: an HTB class with that rate takes the registry's packets; the rest
 * names no class (`default` points at none) and leaves unshaped. Only in a network namespace of the
 * bench's own (run.ts starts it so), where the loopback device is nobody else's.
 */
function throttleUpstream(port: number, mbps: number): void {
  if (process.env['PULLBRIDGE_BENCH_NETNS'] !== '1') throw new Error('--upstream-mbps shapes the loopback device: only in the network namespace bench/run.ts starts for it');
  // r2q: the class's quantum from its rate, kept under HTB's limit for rates of hundreds of Mbit/s.
  run('tc', ['qdisc', 'add', 'dev', 'lo', 'root', 'handle', '1:', 'htb', 'default', '99', 'r2q', '1000']);
  run('tc', ['class', 'add', 'dev', 'lo', 'parent', '1:', 'classid', '1:20', 'htb', 'rate', `${mbps}mbit`, 'ceil', `${mbps}mbit`, 'burst', '256kb', 'cburst', '256kb']);
  run('tc', ['filter', 'add', 'dev', 'lo', 'parent', '1:', 'protocol', 'ip', 'u32', 'match', 'ip', 'sport', String(port), '0xffff', 'flowid', '1:20']);
}

/** Layer GETs the upstream answered (200s, 206s) and the bytes it sent for them since the access log
 * had `from` entries; requests() settles the log first (the registry writes a line after answering). */
async function upstreamSince(registry: RegistryHandle, digest: string, from: number): Promise<{ bytes: number; gets: number; rangeGets: number }> {
  const gets = (await registry.requests()).slice(from).filter((r) => r.method === 'GET' && r.status < 300 && r.path.endsWith(`/blobs/${digest}`));
  return { bytes: gets.reduce((n, r) => n + r.bytes, 0), gets: gets.filter((r) => r.status === 200).length, rangeGets: gets.filter((r) => r.status === 206).length };
}

export async function runSharedBench(options: SharedBenchOptions): Promise<SharedBenchResult> {
  const { sizeMb, nodes: nodeCount, rounds, upstreamMbps } = options;
  const selected = options.rows ?? ROWS.map((r) => r.id);
  const cores = availableParallelism();
  const registry = await startRegistry({ auth: 'none', accessLog: true });
  const size = sizeMb * MiB;
  try {
    if (upstreamMbps !== undefined) throttleUpstream(registry.port, upstreamMbps);
    const digest = await pushBlob(registry, 'bench/image', sizeMb);
    const warmDigest = await pushBlob(registry, 'bench/warm', WARM_MB);
    const warmAllDigest = await pushBlob(registry, 'bench/warm-all', WARM_MB);
    const layerUrl = (port: number) => `http://127.0.0.1:${port}/v2/corp/bench/image/blobs/${digest}`;
    const warmUrl = (port: number, repository = 'warm', d = warmDigest) => `http://127.0.0.1:${port}/v2/corp/bench/${repository}/blobs/${d}`;
    const directUrl = `${registry.url}/v2/bench/image/blobs/${digest}`;
    // The registry reads the layer from its page cache in every setup, the first one included.
    await curl(directUrl);

    const checked = (who: string, r: StreamClientResult) => {
      if (r.bytes !== size || r.digest !== digest) throw new Error(`${who} received ${r.bytes} bytes hashing to ${r.digest}; the layer is ${size} bytes, ${digest}`);
    };
    const saturationOf = (cpuSecondsUsed: number, wall: number) => cpuSecondsUsed / (cores * wall);

    // One client straight from the registry, through the cap if any: one tunnel transfer.
    const runOneTransfer = async (): Promise<RoundResult> => {
      const logFrom = (await registry.requests()).length;
      flushDisk();
      const pid = registry.process.child.pid ?? 0;
      const upstreamBefore = cpuSeconds(pid);
      const began = performance.now();
      const client = await streamClient(directUrl);
      const wallSeconds = (performance.now() - began) / 1000;
      const upstreamCpu = cpuSeconds(pid) - upstreamBefore;
      checked('the client straight from the registry', client);
      const upstream = await upstreamSince(registry, digest, logFrom);
      const cpu: RoleCpu = { filler: undefined, otherNode: undefined, nodes: 0, store: undefined, upstream: upstreamCpu, clients: client.cpuSeconds, total: upstreamCpu + client.cpuSeconds };
      return {
        clients: [client],
        wallSeconds,
        storedSeconds: undefined,
        inStoreSeconds: undefined,
        upstreamBytes: upstream.bytes,
        upstreamGets: upstream.gets,
        upstreamRangeGets: upstream.rangeGets,
        fillerWritten: undefined,
        followersRead: undefined,
        shared: NO_COUNTERS,
        segmentsLeft: undefined,
        cpu,
        saturation: saturationOf(cpu.total, wallSeconds),
        afterOutageSeconds: undefined,
        reportedKib: undefined,
      };
    };

    // Every node setup, and a shared setup's before and after rows alike (they differ only in streamFills).
    const runSetup = async (row: RowSpec & { readonly setup: SetupId }): Promise<RoundResult> => {
      const id = row.setup;
      const scratch = mkdtempSync(join(tmpdir(), 'pullbridge-shared-bench-'));
      const nodes: Node[] = [];
      let s3: S3Server | undefined;
      let store: SharedStore | undefined;
      try {
        let shared: PullbridgeOptions['shared'];
        if (id === 'shared-s3') {
          s3 = await startVersitygw();
          shared = { s3: { bucket: s3.bucket, endpoint: s3.endpoint, forcePathStyle: true, accessKeyFile: s3.accessKeyFile, secretKeyFile: s3.secretKeyFile } };
        } else if (id === 'shared-fs') {
          shared = { filesystem: { path: join(scratch, 'shared') } };
        }
        if (shared) store = await openBenchStore(shared);
        const cachePath = (name: string) => join(scratch, name);
        const startNode = (name: string) =>
          startPullbridge(registry, { ...(id === 'relay' ? {} : { cachePath: cachePath(name) }), ...(shared ? { shared } : {}), ...(row.streamFills === undefined ? {} : { streamFills: row.streamFills }), nodeName: name });
        // One after another, so that each later node reads the warm blob from the shared tier once
        // the first has filled and uploaded it (the paths the measured pull takes, warmed).
        const warm = async (node: Node) => {
          for (let i = 0; i < 2; i++) {
            const r = await curl(warmUrl(node.port));
            if (r.bytes !== WARM_MB * MiB) throw new Error(`warm-up pull got ${r.bytes} bytes\n${node.proc.output()}`);
          }
        };
        for (let i = 1; i <= nodeCount; i++) {
          const node = await startNode(`node-${i}`);
          nodes.push(node);
          await warm(node);
        }
        // Then all at once for another blob: the path of the nodes that lose the claim (waiting, or
        // following the filler's segments), warmed too.
        await Promise.all(
          nodes.map(async (node) => {
            const r = await curl(warmUrl(node.port, 'warm-all', warmAllDigest));
            if (r.bytes !== WARM_MB * MiB) throw new Error(`warm-up pull got ${r.bytes} bytes\n${node.proc.output()}`);
          }),
        );
        if (store) await waitShared(store, [warmDigest, warmAllDigest]);
        const countersBefore = store ? await Promise.all(nodes.map(nodeCounters)) : nodes.map(() => NO_COUNTERS);
        const logFrom = (await registry.requests()).length;
        flushDisk();
        const reportedBefore = reportedKib();

        const pids = { nodes: nodes.map((n) => n.proc.child.pid ?? 0), store: s3?.pid, upstream: registry.process.child.pid ?? 0 };
        const cpu = () => ({ nodes: pids.nodes.map(cpuSeconds), store: pids.store === undefined ? undefined : cpuSeconds(pids.store), upstream: cpuSeconds(pids.upstream) });
        const cpuBefore = cpu();
        const began = performance.now();
        const elapsed = () => (performance.now() - began) / 1000;
        // While the clients pull: when the first node has the layer stored (its fill verified and
        // renamed into place) and when the shared store has it whole (the filler's upload done).
        const marks: { stored?: number; inStore?: number } = {};
        let pulling = true;
        const watching = (async () => {
          for (; pulling; await new Promise((r) => setTimeout(r, WATCH_MS))) {
            if (marks.stored === undefined && id !== 'relay' && nodes.some((_, i) => existsSync(storedPath(cachePath(`node-${i + 1}`), digest)))) marks.stored = elapsed();
            if (store && marks.inStore === undefined && (await store.stat(sharedKeys.blob(digest))) !== undefined) marks.inStore = elapsed();
          }
        })();
        watching.catch(() => undefined); // awaited below; a failure then is the bench's
        const clients = await Promise.all(nodes.map((n) => streamClient(layerUrl(n.port)))).finally(() => (pulling = false));
        const wallSeconds = elapsed();
        const cpuAtDone = cpu();
        await watching;
        clients.forEach((c, i) => checked(`the client of node-${i + 1} (${row.id})`, c));
        // The filler's work ends after the last client's: the final blob's upload and the segments' removal.
        const settledShare = store ? await waitShared(store, [digest]) : undefined;
        const segmentsLeft = settledShare?.segmentsLeft;
        if (settledShare) marks.inStore ??= (settledShare.presentAt - began) / 1000;
        const cpuSettled = cpu();
        const reportedAfter = reportedKib();
        const upstream = await upstreamSince(registry, digest, logFrom);
        const countersEach = store ? (await Promise.all(nodes.map(nodeCounters))).map((c, i) => countersDelta(c, countersBefore[i] ?? NO_COUNTERS)) : nodes.map(() => NO_COUNTERS);

        let afterOutageSeconds: number | undefined;
        if (store) {
          // One more node that never pulled, the upstream gone (SIGKILL): the layer from the shared tier alone.
          await registry.kill();
          try {
            const late = await startNode(`node-${nodeCount + 1}`);
            nodes.push(late);
            await warm(late);
            const r = await streamClient(layerUrl(late.port));
            checked(`the client of node-${nodeCount + 1} with the upstream down (${row.id})`, r);
            afterOutageSeconds = r.seconds;
          } finally {
            await registry.restart();
          }
        }
        // The filler is the node that wrote the layer to the shared store (most of all, at least its size).
        const mostWritten = Math.max(...countersEach.map((c) => c.written));
        const filler = store && mostWritten >= size ? countersEach.findIndex((c) => c.written === mostWritten) : -1;
        const used = (at: ReturnType<typeof cpu>) => ({
          nodes: at.nodes.map((t, i) => t - (cpuBefore.nodes[i] ?? 0)),
          store: at.store === undefined || cpuBefore.store === undefined ? undefined : at.store - cpuBefore.store,
          upstream: at.upstream - cpuBefore.upstream,
        });
        const settled = used(cpuSettled);
        const atDone = used(cpuAtDone);
        const clientCpu = sum(clients.map((c) => c.cpuSeconds));
        const nodesCpu = sum(settled.nodes);
        const others = settled.nodes.filter((_, i) => i !== filler);
        const roles: RoleCpu = {
          filler: filler >= 0 ? settled.nodes[filler] : undefined,
          otherNode: others.length > 0 ? median(others) : undefined,
          nodes: nodesCpu,
          store: settled.store,
          upstream: settled.upstream,
          clients: clientCpu,
          total: nodesCpu + (settled.store ?? 0) + settled.upstream + clientCpu,
        };
        const result: RoundResult = {
          clients,
          wallSeconds,
          storedSeconds: marks.stored,
          inStoreSeconds: marks.inStore,
          upstreamBytes: upstream.bytes,
          upstreamGets: upstream.gets,
          upstreamRangeGets: upstream.rangeGets,
          fillerWritten: filler >= 0 ? countersEach[filler]?.written : undefined,
          followersRead: filler >= 0 ? sum(countersEach.filter((_, i) => i !== filler).map((c) => c.read)) : undefined,
          shared: countersTotal(countersEach),
          segmentsLeft,
          cpu: roles,
          saturation: saturationOf(sum(atDone.nodes) + (atDone.store ?? 0) + atDone.upstream + clientCpu, wallSeconds),
          afterOutageSeconds,
          reportedKib: reportedBefore === undefined || reportedAfter === undefined ? undefined : reportedAfter - reportedBefore,
        };
        return result;
      } finally {
        await Promise.all(nodes.map((n) => n.proc.stop()));
        await store?.close();
        await s3?.stop();
        rmSync(scratch, { recursive: true, force: true });
      }
    };

    const runs = new Map<RowId, RoundResult[]>(ROWS.map((r) => [r.id, []]));
    const groups = GROUPS.map((g) => g.filter((r) => selected.includes(r.id))).filter((g) => g.length > 0);
    for (let round = 0; round < rounds; round++) {
      for (let k = 0; k < groups.length; k++) {
        const group = groups[(k + round) % groups.length]!;
        for (const row of round % 2 === 0 ? group : [...group].reverse()) {
          const result = row.setup === 'one-transfer' ? await runOneTransfer() : await runSetup({ ...row, setup: row.setup });
          runs.get(row.id)!.push(result);
          process.stderr.write(`round ${round + 1}: ${roundLine(row, result, size)}\n`);
        }
      }
    }
    return {
      sizeMb,
      nodes: nodeCount,
      rounds,
      upstreamMbps,
      cores,
      rows: ROWS.filter((row) => selected.includes(row.id)).map((row) => summarize(row, runs.get(row.id)!)),
    };
  } finally {
    await registry.stop();
  }
}

/** One round of one row, for the bench's progress output. */
function roundLine(row: RowSpec, r: RoundResult, size: number): string {
  const o = (n: number | undefined, digits = 2) => (n === undefined ? '–' : n.toFixed(digits));
  const each = (pick: (c: StreamClientResult) => number) => r.clients.map((c) => pick(c).toFixed(2)).join(' ');
  return (
    `${row.id} ${r.wallSeconds.toFixed(2)} s wall, upstream ${(r.upstreamBytes / size).toFixed(2)}× (${r.upstreamGets} GETs, ${r.upstreamRangeGets} ranges), ` +
    `clients' first byte [${each((c) => c.firstByteSeconds)}] s, longest gap [${each((c) => c.longestGapSeconds)}] s, done [${each((c) => c.seconds)}] s, ` +
    `stored ${o(r.storedSeconds)} s, in the shared store ${o(r.inStoreSeconds)} s, ` +
    `filler wrote ${o(r.fillerWritten === undefined ? undefined : r.fillerWritten / size)}×, followers read ${o(r.followersRead === undefined ? undefined : r.followersRead / size)}×, segments ${r.shared.segmentsWritten}/${r.shared.segmentsRead}, takeovers ${r.shared.takeovers}, segments left ${r.segmentsLeft ?? '–'}, ` +
    `CPU s filler ${o(r.cpu.filler, 1)} other ${o(r.cpu.otherNode, 1)} store ${o(r.cpu.store, 1)} upstream ${r.cpu.upstream.toFixed(1)} clients ${r.cpu.clients.toFixed(1)}, saturation ${r.saturation.toFixed(2)}` +
    (r.afterOutageSeconds === undefined ? '' : `, upstream down: ${r.afterOutageSeconds.toFixed(2)} s`) +
    (r.reportedKib === undefined ? '' : `, memory reported to the host ${(r.reportedKib / 1024).toFixed(0)} MiB`)
  );
}

function summarize(row: RowSpec, r: readonly RoundResult[]): SharedRow {
  const m = (pick: (x: RoundResult) => number) => median(r.map(pick));
  const some = (pick: (x: RoundResult) => number | undefined) => {
    const values = r.flatMap((x) => pick(x) ?? []);
    return values.length > 0 ? median(values) : undefined;
  };
  const left = r.flatMap((x) => x.segmentsLeft ?? []);
  return {
    id: row.id,
    group: row.group,
    setup: row.name,
    streamFills: row.streamFills,
    clients: r[0]?.clients.length ?? 0,
    upstreamBytes: r.map((x) => x.upstreamBytes),
    upstreamGets: r.map((x) => x.upstreamGets),
    upstreamRangeGets: r.map((x) => x.upstreamRangeGets),
    wallSeconds: m((x) => x.wallSeconds),
    firstDoneSeconds: m((x) => Math.min(...x.clients.map((c) => c.seconds))),
    latestFirstByteSeconds: m((x) => Math.max(...x.clients.map((c) => c.firstByteSeconds))),
    longestGapSeconds: m((x) => Math.max(...x.clients.map((c) => c.longestGapSeconds))),
    storedSeconds: some((x) => x.storedSeconds),
    inStoreSeconds: some((x) => x.inStoreSeconds),
    fillerWritten: some((x) => x.fillerWritten),
    followersRead: some((x) => x.followersRead),
    sharedWritten: m((x) => x.shared.written),
    sharedRead: m((x) => x.shared.read),
    segmentsWritten: m((x) => x.shared.segmentsWritten),
    segmentsRead: m((x) => x.shared.segmentsRead),
    takeovers: m((x) => x.shared.takeovers),
    segmentsLeft: left.length > 0 ? Math.max(...left) : undefined,
    cpu: {
      filler: some((x) => x.cpu.filler),
      otherNode: some((x) => x.cpu.otherNode),
      nodes: m((x) => x.cpu.nodes),
      store: some((x) => x.cpu.store),
      upstream: m((x) => x.cpu.upstream),
      clients: m((x) => x.cpu.clients),
      total: m((x) => x.cpu.total),
    },
    saturation: m((x) => x.saturation),
    afterOutageSeconds: some((x) => x.afterOutageSeconds),
    reportedMib: some((x) => (x.reportedKib === undefined ? undefined : x.reportedKib / 1024)),
  };
}

export function formatSharedBench(r: SharedBenchResult): string {
  const size = r.sizeMb * MiB;
  const one = r.rows.find((row) => row.id === 'one-transfer');
  const x = (n: number) => `${n.toFixed(2)}×`;
  const s = (n: number) => n.toFixed(2);
  const opt = (n: number | undefined) => (n === undefined ? '–' : s(n));
  const cpu = (n: number | undefined) => (n === undefined ? '–' : n.toFixed(1));
  const perGib = (n: number | undefined, bytes: number) => (n === undefined ? '–' : (n / (bytes / GiB)).toFixed(2));
  const ofLayer = (n: number | undefined) => (n === undefined ? '–' : x(n / size));
  const shared = (row: SharedRow) => row.streamFills !== undefined;
  const expectedUpstream = (row: SharedRow) => (row.id === 'relay' || row.id === 'node-cache' ? r.nodes : 1);
  const vsOne = (row: SharedRow) => (one ? row.wallSeconds / one.wallSeconds : undefined);
  const met = (ok: boolean) => (ok ? '(met)' : '**(missed)**');
  const pairs = [...new Set(r.rows.filter(shared).map((row) => row.group))].flatMap((group) => {
    const before = r.rows.find((row) => row.group === group && row.streamFills === false);
    const after = r.rows.find((row) => row.group === group && row.streamFills === true);
    return before && after ? [{ group, before, after }] : [];
  });
  const ratio = (row: SharedRow) => {
    const v = vsOne(row);
    return v === undefined ? '?' : `${x(v)} ${row.id === 'one-transfer' ? '' : met(v <= ONE_TRANSFER_TARGET)}`.trim();
  };

  const lines = [
    `${r.nodes} pullbridge processes ("nodes", each its own NODE_NAME and node store) pull one new ${r.sizeMb} MiB layer from one docker-registry at the same moment, one client per node (a blob GET: the layer is what crosses the upstream). Every setup starts each round from nothing: new proxy processes, node stores and shared store. ${r.rounds} round(s), the setups' order rotating and each shared setup's before/after rows swapping theirs; times are medians of the rounds. **One transfer** is one client straight from the registry${r.upstreamMbps === undefined ? '' : ', through the same cap'}, in the same run.`,
    '',
    ...pairs.map(({ group, before, after }) => {
      const b = vsOne(before);
      const a = vsOne(after);
      return `- **${group}**: last of ${r.nodes} clients done ${s(before.wallSeconds)} → **${s(after.wallSeconds)} s**${b === undefined || a === undefined ? '' : `, ${x(b)} → **${x(a)}** one transfer (target ≤ ${ONE_TRANSFER_TARGET}× ${met(a <= ONE_TRANSFER_TARGET)})`}; longest stretch without bytes ${s(before.longestGapSeconds)} → **${s(after.longestGapSeconds)} s** (target < ${GAP_TARGET_SECONDS} s ${met(after.longestGapSeconds < GAP_TARGET_SECONDS)}); latest first byte ${s(before.latestFirstByteSeconds)} → ${s(after.latestFirstByteSeconds)} s; CPU s per GiB delivered, all roles ${perGib(before.cpu.total, before.clients * size)} → ${perGib(after.cpu.total, after.clients * size)}, saturation ${s(before.saturation)} → ${s(after.saturation)}.`;
    }),
    ...(pairs.length > 0 ? [''] : []),
    `| setup | last of the clients done, s | / one transfer (target ≤ ${ONE_TRANSFER_TARGET}×) | latest first byte, s | longest stretch without bytes, worst client, s (target < ${GAP_TARGET_SECONDS} s) | first client done, s | first node has the layer stored, s | shared store has the blob, s |`,
    '|---|---|---|---|---|---|---|---|',
    ...r.rows.map(
      (row) =>
        `| ${row.setup} | ${s(row.wallSeconds)} | ${ratio(row)} | ${s(row.latestFirstByteSeconds)} | ${`${s(row.longestGapSeconds)} ${row.id === 'one-transfer' ? '' : met(row.longestGapSeconds < GAP_TARGET_SECONDS)}`.trim()} | ${s(row.firstDoneSeconds)} | ${opt(row.storedSeconds)} | ${opt(row.inStoreSeconds)} |`,
    ),
    '',
    `Bytes and requests (expected in a shared setup: upstream 1.00× in one 200 GET and no 206 without a takeover; the filler writes 1.00× before, 2.00× after (segments, then the final blob); the other nodes read ${x(r.nodes - 1)} in all; no segment object left once the fill is shared):`,
    '',
    '| setup | upstream bytes / layer size (per round) | expected | upstream layer GETs, 200 (206) per round | filler wrote / layer | other nodes read / layer | segment objects written / read | takeovers | segments left after the share | one more node, upstream killed, s |',
    '|---|---|---|---|---|---|---|---|---|---|',
    ...r.rows.map((row) => {
      const ratios = row.upstreamBytes.map((b) => x(b / size)).join(', ');
      const ok = row.upstreamBytes.every((b) => b === expectedUpstream(row) * size);
      const gets = row.upstreamGets.map((g, i) => `${g} (${row.upstreamRangeGets[i] ?? 0})`).join(', ');
      return `| ${row.setup} | ${ratios} | ${expectedUpstream(row)}× ${met(ok)} | ${gets} | ${ofLayer(row.fillerWritten)} | ${ofLayer(row.followersRead)} | ${shared(row) ? `${row.segmentsWritten} / ${row.segmentsRead}` : '–'} | ${shared(row) ? row.takeovers : '–'} | ${row.segmentsLeft ?? '–'} | ${opt(row.afterOutageSeconds)} |`;
    }),
    '',
    `CPU seconds by role, from /proc, from the moment the clients start until the last client is done and, in the shared setups, the shared store has the whole blob and the segments are removed (the filler's upload and clean-up are its work too); per GiB delivered: a node's by the GiB its own client received (the layer), the store's, the upstream's, the clients' and all together by the GiB all ${r.nodes} clients received. Saturation is Σ CPU seconds of all of them until the last client was done / (${r.cores} cores × wall): near 1.00 the cores, not the protocol, set the pace.`,
    '',
    '| setup | CPU s: filler / each other node (median) / all nodes / store / upstream / clients | CPU s per GiB delivered: filler / other node / store / upstream / clients / all | saturation |',
    '|---|---|---|---|',
    ...r.rows.map((row) => {
      const delivered = row.clients * size;
      return `| ${row.setup} | ${cpu(row.cpu.filler)} / ${cpu(row.cpu.otherNode)} / ${cpu(row.cpu.nodes)} / ${cpu(row.cpu.store)} / ${cpu(row.cpu.upstream)} / ${cpu(row.cpu.clients)} | ${perGib(row.cpu.filler, size)} / ${perGib(row.cpu.otherNode, size)} / ${perGib(row.cpu.store, delivered)} / ${perGib(row.cpu.upstream, delivered)} / ${perGib(row.cpu.clients, delivered)} / ${perGib(row.cpu.total, delivered)} | ${s(row.saturation)} |`;
    }),
    '',
    'In the shared setups one node holds the claim and fills from the upstream, streaming to its client as the bytes land in its store. **Before** (`streamFills: false`) it uploads the layer to the shared store only once it is stored (verified), and the other nodes, which look for it every 0.5 s, get their first byte only then: they wait for the fill **and** the upload. **After** (`streamFills: true`) it publishes what it has as segment objects while the bytes arrive (at most 8 MiB or 2 s each), the other nodes follow them into their own fills and their clients get bytes within about a segment of the filler; the whole blob is uploaded and the segments removed afterwards. With the filesystem store the nodes themselves do the copying (no store process).',
    '',
    `Upstream bytes and GETs are from the registry's access log (2xx GETs of the layer; settled by a marker request before counting). Bytes written/read and segment objects are the nodes' \`pullbridge_cache_shared_bytes_total{direction}\` and \`pullbridge_cache_shared_segments_total{direction}\` counters, takeovers \`pullbridge_cache_shared_takeovers_total\` (their /metrics), for the measured layer only; "segments left" is a listing of the layer's segment objects in the store. "First byte" and "longest stretch without bytes" are the client's own clock from sending its request: the wait for the first byte counts as a stretch without bytes (what containerd's image_pull_progress_timeout watches). "One more node": after the pulls (and the upload) the registry is SIGKILLed and a fresh node with an empty node store pulls the layer; it comes from the shared store alone.`,
    '',
    r.upstreamMbps === undefined
      ? `All ${r.nodes} nodes, the clients, the object store and the upstream share this machine's ${r.cores} cores and its loopback, so the upstream here costs nothing but CPU, and the time ratios say nothing of what the tier saves where the upstream is a tunnel of limited bandwidth (there the tunnel is the bottleneck, and ${r.nodes}× its bytes is ${r.nodes}× its time). No bandwidth cap is applied here (\`--upstream-mbps N\` applies one: its own section).`
      : `What the upstream sends is capped at **${r.upstreamMbps} Mbit/s in all** (an HTB class on the loopback device for the registry's port, in a network namespace of the bench's own), as a tunnel the ${r.nodes} nodes share; the nodes, the clients and the object store share this machine's ${r.cores} cores and talk over the unshaped loopback, as nodes reach an in-cluster store.`,
    `Every client, in every row, is the same small Node process reading the body and hashing it (sha256) as it arrives: the work \`curl | sha256sum\` does, the same in every row (not the same CPU as curl and sha256sum: compare client CPU within one run, not with runs that used them). Checked on every run: every client (the late node's too) received ${r.sizeMb} MiB hashing to the layer's digest.`,

    ...pageFramesLines(r),
  ];
  return lines.join('\n');
}

/** What the guest handed back to its host while the pulls ran (pageframes.ts), where it reports that. */
function pageFramesLines(r: SharedBenchResult): string[] {
  const reported = r.rows.filter((row) => row.reportedMib !== undefined).map((row) => `${row.id} ${row.reportedMib!.toFixed(0)}`);
  if (reported.length === 0) return [];
  return [`Memory the guest reported free to its host during the pulls, MiB (median of the rounds): ${reported.join(', ')}. Page-cache writes into frames handed back cost about 2.5 CPU-s per GiB more on this VM (bench/pageframes.ts): a node's CPU figures move with it.`];
}
