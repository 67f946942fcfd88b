// Shared cache tier benchmark: N pullbridge processes ("nodes", each with a NODE_NAME of its own)
// in front of one docker-registry, all asked for the same new 1 GiB layer at the same moment, one
// curl per node. Side by side in one run:
//
//   relay        no cache: every node streams the layer from the upstream
//   node cache   cache.path only: every node fills its own store from the upstream
//   shared S3    cache.path + cache.shared.s3 on one versitygw: one node claims the fill, fetches from
//                the upstream and uploads; the others wait for the upload and read it from the store
//   shared fs    cache.path + cache.shared.filesystem on one directory (a ReadWriteMany volume)
//
// Measured per setup: the bytes the upstream sent (the size fields of its access log, blob GETs of
// the layer), wall time until the last client finished, each client's time to its first byte and
// to its last, the bytes the nodes wrote to and read from the shared store (their
// pullbridge_cache_shared_bytes_total counters), when the first node had the layer stored and when
// the shared store had it (a waiting node waits for both: the upload follows the fill), the CPU
// seconds of the nodes, the object store and the upstream, and, for the shared setups, one more node
// pulling the layer afterwards with the upstream killed. Every client's bytes are hashed as they
// arrive (curl | sha256sum) and must hash to the layer's digest.
//
// Each round starts every setup from nothing (new proxy processes, node stores, shared store); the
// setups alternate their order between rounds and every figure is the median of the rounds.
//
// With --upstream-mbps N, what the upstream sends is capped at N Mbit/s in all (an HTB class on the
// loopback device for the registry's port, in a network namespace of the bench's own): the tunnel
// the nodes share in production, which loopback otherwise is not.
//
//   npm run bench -- shared [--size-mb 1024] [--nodes 4] [--rounds 2] [--upstream-mbps N]

import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVersitygw, type S3Server } from '../test/support/objectstores.js';
import { run, type Proc } from '../test/support/procs.js';
import { startRegistry, type RegistryHandle } from '../test/support/registry.js';
import { flushDisk, median, storedPath } from './cache.js';
import { cpuSeconds, curl, curlDigest, pushBlob, startPullbridge, type PullbridgeOptions } from './proxy.js';

/** A small blob each fresh proxy pulls first, so that the measured pull meets warm code (and, in
 * the shared setups, a store client that has connected and a tier that has claimed, uploaded and read). */
const WARM_MB = 16;
const MiB = 2 ** 20;
/** How long the bench waits for the nodes' uploads to the shared store to land. */
const UPLOAD_WAIT_MS = 300_000;
/** How often the bench looks, during the pull, for the layer stored on a node and in the shared store. */
const WATCH_MS = 250;

type SetupId = 'relay' | 'node-cache' | 'shared-s3' | 'shared-fs';

const SETUPS: ReadonlyArray<{ readonly id: SetupId; readonly name: string }> = [
  { id: 'relay', name: 'relay (no cache)' },
  { id: 'node-cache', name: 'node cache alone (cache.path)' },
  { id: 'shared-s3', name: 'shared tier, S3 API (versitygw)' },
  { id: 'shared-fs', name: 'shared tier, filesystem (one directory)' },
];

export interface SharedRow {
  readonly id: SetupId;
  readonly setup: string;
  /** Layer bytes the upstream sent, each round (its access log). */
  readonly upstreamBytes: readonly number[];
  /** Layer GETs the upstream answered, each round. */
  readonly upstreamGets: readonly number[];
  /** Median over the rounds: seconds until the last client finished (spawning the curls to the last exit). */
  readonly wallSeconds: number;
  /** Median over the rounds: the fastest client's total seconds (curl's own). */
  readonly firstDoneSeconds: number;
  /** Median over the rounds: the latest first byte any client got, seconds (curl's own). */
  readonly latestFirstByteSeconds: number;
  /** Median over the rounds: seconds from the start until the first node had the layer in its store
   * (filled and verified), and until the shared store had it (uploaded); undefined where none does. */
  readonly storedSeconds: number | undefined;
  readonly uploadedSeconds: number | undefined;
  /** Median over the rounds: CPU seconds the nodes (together), the object store and the upstream used during the pull. */
  readonly cpu: CpuSplit;
  /** Median over the rounds, bytes all nodes wrote to / read from the shared store for the layer. */
  readonly sharedWritten: number;
  readonly sharedRead: number;
  /** Median over the rounds: one more fresh node pulling the layer from the shared tier with the upstream killed, seconds. */
  readonly afterOutageSeconds: number | undefined;
}

export interface SharedBenchResult {
  readonly sizeMb: number;
  readonly nodes: number;
  readonly rounds: number;
  /** The cap on what the upstream sends, Mbit/s; undefined: none (loopback). */
  readonly upstreamMbps: number | undefined;
  readonly rows: readonly SharedRow[];
}

interface CpuSplit {
  /** All nodes together. */
  readonly nodes: number;
  /** The node that filled from the upstream (and uploaded), in the shared setups. */
  readonly filler: number | undefined;
  /** Each other node (the median of them). */
  readonly otherNode: number;
  readonly store: number | undefined;
  readonly upstream: number;
}

interface RoundResult {
  readonly storedSeconds: number | undefined;
  readonly uploadedSeconds: number | undefined;
  readonly cpu: CpuSplit;
  readonly upstreamBytes: number;
  readonly upstreamGets: number;
  readonly wallSeconds: number;
  readonly firstDoneSeconds: number;
  readonly latestFirstByteSeconds: number;
  readonly sharedWritten: number;
  readonly sharedRead: number;
  readonly afterOutageSeconds: number | undefined;
}

interface Node {
  readonly port: number;
  readonly proc: Proc;
}

/** A node's shared-tier byte counters (pullbridge_cache_shared_bytes_total), from its /metrics. */
async function sharedBytes(node: Node): Promise<{ read: number; written: number }> {
  const text = await (await fetch(`http://127.0.0.1:${node.port}/metrics`)).text();
  const value = (direction: string) => Number(new RegExp(`^pullbridge_cache_shared_bytes_total\\{direction="${direction}"\\} (\\S+)$`, 'm').exec(text)?.[1] ?? 0);
  return { read: value('read'), written: value('written') };
}

type SharedBytes = Awaited<ReturnType<typeof sharedBytes>>;

const totalOf = (each: readonly SharedBytes[]): SharedBytes => ({ read: each.reduce((n, b) => n + b.read, 0), written: each.reduce((n, b) => n + b.written, 0) });

async function sharedTotals(nodes: readonly Node[]): Promise<SharedBytes> {
  return totalOf(await Promise.all(nodes.map(sharedBytes)));
}

/**
 * Waits until the nodes wrote `bytes` to the shared store in all: a filler uploads after its client
 * got the last byte, so the pull ending does not mean the store has the blob.
 */
async function waitUploaded(nodes: readonly Node[], bytes: number): Promise<void> {
  for (const deadline = Date.now() + UPLOAD_WAIT_MS; ; await new Promise((r) => setTimeout(r, 200))) {
    const { written } = await sharedTotals(nodes);
    if (written >= bytes) return;
    if (Date.now() > deadline) throw new Error(`the nodes wrote ${written} bytes to the shared store within ${UPLOAD_WAIT_MS / 1000} s, expected ${bytes}`);
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

/** Layer bytes the upstream sent (2xx GETs of it) since the access log had `from` entries. */
async function upstreamSince(registry: RegistryHandle, digest: string, from: number): Promise<{ bytes: number; gets: number }> {
  const gets = (await registry.requests()).slice(from).filter((r) => r.method === 'GET' && r.status < 300 && r.path.endsWith(`/blobs/${digest}`));
  return { bytes: gets.reduce((n, r) => n + r.bytes, 0), gets: gets.length };
}

export async function runSharedBench(sizeMb: number, nodeCount: number, rounds: number, upstreamMbps?: number): Promise<SharedBenchResult> {
  const registry = await startRegistry({ auth: 'none', accessLog: true });
  const size = sizeMb * MiB;
  try {
    if (upstreamMbps !== undefined) throttleUpstream(registry.port, upstreamMbps);
    const digest = await pushBlob(registry, 'bench/image', sizeMb);
    const warmDigest = await pushBlob(registry, 'bench/warm', WARM_MB);
    const layerUrl = (port: number) => `http://127.0.0.1:${port}/v2/corp/bench/image/blobs/${digest}`;
    const warmUrl = (port: number) => `http://127.0.0.1:${port}/v2/corp/bench/warm/blobs/${warmDigest}`;
    // The registry reads the layer from its page cache in every setup, the first one included.
    await curl(`${registry.url}/v2/bench/image/blobs/${digest}`);

    const checked = (who: string, r: { bytes: number; digest: string }) => {
      if (r.bytes !== size || r.digest !== digest) throw new Error(`${who} received ${r.bytes} bytes hashing to ${r.digest}; the layer is ${size} bytes, ${digest}`);
    };

    const runSetup = async (id: SetupId, round: number): Promise<RoundResult> => {
      const scratch = mkdtempSync(join(tmpdir(), 'pullbridge-shared-bench-'));
      const nodes: Node[] = [];
      let s3: S3Server | undefined;
      try {
        let shared: PullbridgeOptions['shared'];
        if (id === 'shared-s3') {
          s3 = await startVersitygw();
          shared = { s3: { bucket: s3.bucket, endpoint: s3.endpoint, forcePathStyle: true, accessKeyFile: s3.accessKeyFile, secretKeyFile: s3.secretKeyFile } };
        } else if (id === 'shared-fs') {
          shared = { filesystem: { path: join(scratch, 'shared') } };
        }
        const cachePath = (name: string) => join(scratch, name);
        const startNode = (name: string) => startPullbridge(registry, { ...(id === 'relay' ? {} : { cachePath: cachePath(name) }), ...(shared ? { shared } : {}), nodeName: name });
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
        if (shared) await waitUploaded(nodes, WARM_MB * MiB);
        const none = { read: 0, written: 0 };
        const beforeEach = shared ? await Promise.all(nodes.map(sharedBytes)) : nodes.map(() => none);
        const before = totalOf(beforeEach);
        const logFrom = (await registry.requests()).length;
        flushDisk();

        const pids = { nodes: nodes.map((n) => n.proc.child.pid ?? 0), store: s3?.pid, upstream: registry.process.child.pid ?? 0 };
        const cpu = () => ({ nodes: pids.nodes.map(cpuSeconds), store: pids.store === undefined ? undefined : cpuSeconds(pids.store), upstream: cpuSeconds(pids.upstream) });
        const cpuBefore = cpu();
        const began = performance.now();
        const elapsed = () => (performance.now() - began) / 1000;
        // While the clients pull: when the first node has the layer stored (its fill verified and
        // renamed into place) and when the shared store has it (the filler's upload done, counted by
        // its shared-tier counter), so that the wait the other nodes see can be split.
        const marks: { stored?: number; uploaded?: number } = {};
        let pulling = true;
        const watching = (async () => {
          for (; pulling; await new Promise((r) => setTimeout(r, WATCH_MS))) {
            if (marks.stored === undefined && id !== 'relay' && nodes.some((_, i) => existsSync(storedPath(cachePath(`node-${i + 1}`), digest)))) marks.stored = elapsed();
            if (shared && marks.uploaded === undefined && (await sharedTotals(nodes)).written >= before.written + size) marks.uploaded = elapsed();
          }
        })();
        watching.catch(() => undefined); // awaited below; a failure then is the bench's
        const clients = await Promise.all(nodes.map((n) => curlDigest(layerUrl(n.port)))).finally(() => (pulling = false));
        const wallSeconds = elapsed();
        const cpuAfter = cpu();
        await watching;
        clients.forEach((c, i) => checked(`the client of node-${i + 1} (${id})`, c));
        const upstream = await upstreamSince(registry, digest, logFrom);

        let afterEach = beforeEach;
        let afterOutageSeconds: number | undefined;
        if (shared) {
          await waitUploaded(nodes, before.written + size);
          afterEach = await Promise.all(nodes.map(sharedBytes));
          // One more node that never pulled, the upstream gone (SIGKILL): the layer from the shared tier alone.
          await registry.kill();
          try {
            const late = await startNode(`node-${nodeCount + 1}`);
            nodes.push(late);
            await warm(late);
            const r = await curlDigest(layerUrl(late.port));
            checked(`the client of node-${nodeCount + 1} with the upstream down (${id})`, r);
            afterOutageSeconds = r.seconds;
          } finally {
            await registry.restart();
          }
        }
        const after = totalOf(afterEach);
        // The filler is the node that wrote the layer to the shared store.
        const filler = shared ? afterEach.findIndex((a, i) => a.written - (beforeEach[i]?.written ?? 0) >= size) : -1;
        const nodeCpu = cpuAfter.nodes.map((t, i) => t - (cpuBefore.nodes[i] ?? 0));
        const result: RoundResult = {
          storedSeconds: marks.stored,
          uploadedSeconds: marks.uploaded,
          cpu: {
            nodes: nodeCpu.reduce((t, c) => t + c, 0),
            filler: filler >= 0 ? nodeCpu[filler] : undefined,
            otherNode: median(nodeCpu.filter((_, i) => i !== filler)),
            store: cpuAfter.store === undefined || cpuBefore.store === undefined ? undefined : cpuAfter.store - cpuBefore.store,
            upstream: cpuAfter.upstream - cpuBefore.upstream,
          },
          upstreamBytes: upstream.bytes,
          upstreamGets: upstream.gets,
          wallSeconds,
          firstDoneSeconds: Math.min(...clients.map((c) => c.seconds)),
          latestFirstByteSeconds: Math.max(...clients.map((c) => c.firstByteSeconds)),
          sharedWritten: after.written - before.written,
          sharedRead: after.read - before.read,
          afterOutageSeconds,
        };
        process.stderr.write(
          `round ${round + 1}: ${id} ${wallSeconds.toFixed(2)} s wall, upstream ${(upstream.bytes / size).toFixed(2)}× (${upstream.gets} GETs), stored ${marks.stored?.toFixed(2) ?? '–'} s, uploaded ${marks.uploaded?.toFixed(2) ?? '–'} s, first byte ≤ ${result.latestFirstByteSeconds.toFixed(2)} s, first done ${result.firstDoneSeconds.toFixed(2)} s, CPU s nodes ${result.cpu.nodes.toFixed(1)} (filler ${result.cpu.filler?.toFixed(1) ?? '–'}, other ${result.cpu.otherNode.toFixed(1)}) store ${result.cpu.store?.toFixed(1) ?? '–'} upstream ${result.cpu.upstream.toFixed(1)}` +
            (shared ? `, shared written ${(result.sharedWritten / MiB).toFixed(0)} MiB read ${(result.sharedRead / MiB).toFixed(0)} MiB, upstream down: ${afterOutageSeconds?.toFixed(2)} s` : '') +
            '\n',
        );
        return result;
      } finally {
        await Promise.all(nodes.map((n) => n.proc.stop()));
        await s3?.stop();
        rmSync(scratch, { recursive: true, force: true });
      }
    };

    const runs = new Map<SetupId, RoundResult[]>(SETUPS.map((s) => [s.id, []]));
    for (let round = 0; round < rounds; round++) {
      for (const i of SETUPS.map((_, k) => (k + round) % SETUPS.length)) {
        const setup = SETUPS[i]!;
        runs.get(setup.id)!.push(await runSetup(setup.id, round));
      }
    }
    return {
      sizeMb,
      nodes: nodeCount,
      rounds,
      upstreamMbps,
      rows: SETUPS.map((s) => {
        const r = runs.get(s.id)!;
        const m = (pick: (x: RoundResult) => number) => median(r.map(pick));
        const some = (pick: (x: RoundResult) => number | undefined) => {
          const values = r.flatMap((x) => pick(x) ?? []);
          return values.length > 0 ? median(values) : undefined;
        };
        return {
          id: s.id,
          setup: s.name,
          upstreamBytes: r.map((x) => x.upstreamBytes),
          upstreamGets: r.map((x) => x.upstreamGets),
          wallSeconds: m((x) => x.wallSeconds),
          firstDoneSeconds: m((x) => x.firstDoneSeconds),
          latestFirstByteSeconds: m((x) => x.latestFirstByteSeconds),
          storedSeconds: some((x) => x.storedSeconds),
          uploadedSeconds: some((x) => x.uploadedSeconds),
          cpu: { nodes: m((x) => x.cpu.nodes), filler: some((x) => x.cpu.filler), otherNode: m((x) => x.cpu.otherNode), store: some((x) => x.cpu.store), upstream: m((x) => x.cpu.upstream) },
          sharedWritten: m((x) => x.sharedWritten),
          sharedRead: m((x) => x.sharedRead),
          afterOutageSeconds: some((x) => x.afterOutageSeconds),
        };
      }),
    };
  } finally {
    await registry.stop();
  }
}

export function formatSharedBench(r: SharedBenchResult): string {
  const size = r.sizeMb * MiB;
  const relay = r.rows.find((row) => row.id === 'relay');
  const x = (n: number) => `${n.toFixed(2)}×`;
  const s = (n: number) => n.toFixed(2);
  const mib = (n: number) => (n / MiB).toFixed(0);
  const shared = (row: SharedRow) => row.id === 'shared-s3' || row.id === 'shared-fs';
  const expected = (row: SharedRow) => (shared(row) ? 1 : r.nodes);
  const opt = (n: number | undefined) => (n === undefined ? '–' : s(n));
  const cpu = (n: number) => n.toFixed(1);
  const sharedSlower = relay !== undefined && r.rows.filter(shared).every((row) => row.wallSeconds > relay.wallSeconds);
  const lines = [
    `${r.nodes} pullbridge processes ("nodes", each its own NODE_NAME and node store) pull one new ${r.sizeMb} MiB layer from one docker-registry at the same moment, one curl per node (a blob GET: the layer is what crosses the upstream; manifests are a few hundred bytes and not claimed). Every setup starts each round from nothing: new proxy processes, node stores and shared store. ${r.rounds} round(s), the setups' order alternating; times are medians of the rounds.`,
    '',
    `| setup | upstream bytes / layer size (per round) | expected | upstream layer GETs | last of ${r.nodes} clients done, s | / relay | shared store written / read, MiB | one more node, upstream killed, s |`,
    '|---|---|---|---|---|---|---|---|',
    ...r.rows.map((row) => {
      const ratios = row.upstreamBytes.map((b) => x(b / size)).join(', ');
      const met = row.upstreamBytes.every((b) => b === expected(row) * size);
      return `| ${row.setup} | ${ratios} | ${expected(row)}× ${met ? '(met)' : '**(missed)**'} | ${row.upstreamGets.join(', ')} | ${s(row.wallSeconds)} | ${relay ? x(row.wallSeconds / relay.wallSeconds) : '?'} | ${shared(row) ? `${mib(row.sharedWritten)} / ${mib(row.sharedRead)}` : '–'} | ${row.afterOutageSeconds === undefined ? '–' : s(row.afterOutageSeconds)} |`;
    }),
    '',
    `Where the time goes: seconds from the moment the ${r.nodes} curls start (clients' figures are curl's own; "stored" and "in the shared store" are seen by the bench looking every ${WATCH_MS} ms), and CPU seconds used during the pull:`,
    '',
    '| setup | first node has the layer stored | shared store has it | latest first byte | first client done | last client done | CPU s: nodes in all (the filler; each other node) / object store / upstream |',
    '|---|---|---|---|---|---|---|',
    ...r.rows.map((row) => `| ${row.setup} | ${opt(row.storedSeconds)} | ${opt(row.uploadedSeconds)} | ${s(row.latestFirstByteSeconds)} | ${s(row.firstDoneSeconds)} | ${s(row.wallSeconds)} | ${cpu(row.cpu.nodes)} (${row.cpu.filler === undefined ? '' : `${cpu(row.cpu.filler)}; `}${cpu(row.cpu.otherNode)}) / ${row.cpu.store === undefined ? '–' : cpu(row.cpu.store)} / ${cpu(row.cpu.upstream)} |`),
    '',
    'In the shared setups one node holds the claim and fills from the upstream, streaming to its client as the bytes land in its store; it uploads the layer to the shared store only once it is stored (verified), and the other nodes, which look for it every 0.5 s, get their first byte only then, and read it from the store. So a waiting node waits for the fill **and** the upload before its own transfer starts: latest first byte ≈ shared store has it ≈ stored + the upload. With the filesystem store the nodes themselves do the copying (no store process).',
    '',
    `Upstream bytes are the size fields of the registry's access log for 2xx GETs of the layer (HEADs a node makes to confirm access carry no body). Shared store bytes are the nodes' \`pullbridge_cache_shared_bytes_total{direction}\` counters (their /metrics), for the measured layer only. "One more node": after the ${r.nodes} pulls (and the upload) the registry is SIGKILLed and a fresh node with an empty node store pulls the layer; it comes from the shared store alone.`,
    '',
    r.upstreamMbps === undefined
      ? `All ${r.nodes} nodes, the clients, the object store and the upstream share this machine's 2 cores and its loopback, so the upstream here costs nothing but CPU${sharedSlower ? ': with it that free, the shared tier\'s serial fill → upload → reads and the CPU its copies take on the 2 cores make it slower than relaying,' : ','} and the time ratios say nothing of what it saves where the upstream is a tunnel of limited bandwidth (in production the tunnel is the bottleneck, and ${r.nodes}× its bytes is ${r.nodes}× its time). No bandwidth throttle is applied here (\`--upstream-mbps N\` applies one: its own section).`
      : `What the upstream sends is capped at **${r.upstreamMbps} Mbit/s in all** (an HTB class on the loopback device for the registry's port, in a network namespace of the bench's own), as a tunnel the ${r.nodes} nodes share; the nodes, the clients and the object store share this machine's 2 cores and talk over the unshaped loopback, as nodes reach an in-cluster store.`,
    `Checked on every run: every client (the late node's too) received ${r.sizeMb} MiB hashing (sha256sum, as the bytes arrived) to the layer's digest.`,
  ];
  return lines.join('\n');
}
