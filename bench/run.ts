// `npm run bench [-- webhook|upstream|proxy|cache|shared|memory] [--seconds N] [--rounds N]`: runs the benchmarks
// (webhook and proxy when none is named) and writes their tables to BENCHMARKS.md, with the command and the
// machine they ran on. `cache --cpu-prof DIR` profiles the proxies of the miss rounds and writes no
// report section. `shared --upstream-mbps N` caps the upstream at N Mbit/s (a qdisc on the loopback
// device): the bench then runs itself again in a network namespace of its own, whose loopback
// device nothing else uses. `shared --setups relay,shared-s3,…` runs only the named setups (and one
// transfer, which the ratios need).

import { spawnSync } from 'node:child_process';
import { parseArgs } from 'node:util';
import { formatCacheBench, runCacheBench } from './cache.js';
import { formatMemoryBench, runMemoryBench } from './memory.js';
import { formatProxyBench, runProxyBench } from './proxy.js';
import { writeReportSection } from './report.js';
import { formatSharedBench, runSharedBench, selectRows } from './shared.js';
import { runUpstreamBench } from './upstream.js';
import { formatWebhookBench, runWebhookBench } from './webhook.js';

const { values, positionals } = parseArgs({
  options: {
    seconds: { type: 'string', default: '5' },
    rounds: { type: 'string', default: '3' },
    connections: { type: 'string', default: '8' },
    'size-mb': { type: 'string', default: '1024' },
    concurrency: { type: 'string', default: '16' },
    nodes: { type: 'string', default: '4' },
    'cpu-prof': { type: 'string' },
    'upstream-mbps': { type: 'string' },
    setups: { type: 'string' },
  },
  allowPositionals: true,
});
const which = positionals.length > 0 ? positionals : ['webhook', 'proxy'];
const upstreamMbps = values['upstream-mbps'] === undefined ? undefined : Number(values['upstream-mbps']);

if (upstreamMbps !== undefined && process.env['PULLBRIDGE_BENCH_NETNS'] !== '1') {
  // Everything the benchmarks start listens on 127.0.0.1: a namespace with its loopback up is enough.
  const inner = spawnSync('unshare', ['--net', '--', 'sh', '-c', 'ip link set lo up && exec "$@"', 'sh', process.execPath, ...process.argv.slice(1)], { stdio: 'inherit', env: { ...process.env, PULLBRIDGE_BENCH_NETNS: '1' } });
  process.exit(inner.status ?? 1);
}

for (const name of which) {
  if (name === 'webhook') {
    const result = await runWebhookBench(Number(values.seconds), Number(values.rounds), Number(values.connections));
    const text = formatWebhookBench(result);
    writeReportSection('bench-webhook', 'Benchmark: webhook', `npm run bench -- webhook --seconds ${values.seconds} --rounds ${values.rounds} --connections ${values.connections}`, text);
    process.stdout.write(`${text}\n`);
  } else if (name === 'upstream') {
    const text = await runUpstreamBench(Number(values.seconds), Number(values.connections));
    writeReportSection('bench-upstream', 'Benchmark: webhook asking the upstream through the proxy tier', `npm run bench -- upstream --seconds ${values.seconds} --connections ${values.connections}`, text);
    process.stdout.write(`${text}\n`);
  } else if (name === 'proxy') {
    const result = await runProxyBench(Number(values['size-mb']), Number(values.concurrency), Number(values.rounds));
    const text = formatProxyBench(result);
    writeReportSection('bench-proxy', 'Benchmark: proxy', `npm run bench -- proxy --size-mb ${values['size-mb']} --concurrency ${values.concurrency} --rounds ${values.rounds}`, text);
    process.stdout.write(`${text}\n`);
  } else if (name === 'cache') {
    const result = await runCacheBench(Number(values['size-mb']), Number(values.concurrency), Number(values.rounds), values['cpu-prof']);
    const text = formatCacheBench(result);
    // A profiled run is slower: its figures are not written to the report.
    if (!values['cpu-prof']) writeReportSection('bench-cache', 'Benchmark: node cache', `npm run bench -- cache --size-mb ${values['size-mb']} --concurrency ${values.concurrency} --rounds ${values.rounds}`, text);
    process.stdout.write(`${text}\n`);
  } else if (name === 'shared') {
    const nodes = Number(values.nodes);
    let rows: ReturnType<typeof selectRows>;
    try {
      if (!Number.isInteger(nodes) || nodes < 2) throw new Error(`--nodes: ${values.nodes} is not a whole number of nodes, at least 2`);
      rows = selectRows(values.setups);
    } catch (error) {
      process.stderr.write(`${(error as Error).message}\n`);
      process.exit(2);
    }
    const result = await runSharedBench({ sizeMb: Number(values['size-mb']), nodes, rounds: Number(values.rounds), upstreamMbps, rows });
    const text = formatSharedBench(result);
    const command = `npm run bench -- shared --size-mb ${values['size-mb']} --nodes ${nodes} --rounds ${values.rounds}${values.setups === undefined ? '' : ` --setups ${values.setups}`}`;
    // One section per node count and cap, loopback apart: each run replaces only its own. (4 nodes
    // keep the sections' first names.)
    const section = `bench-shared${nodes === 4 ? '' : `-n${nodes}`}`;
    if (upstreamMbps === undefined) writeReportSection(section, `Benchmark: shared cache tier, ${nodes} nodes`, command, text);
    else writeReportSection(`${section}-throttled-${upstreamMbps}`, `Benchmark: shared cache tier, ${nodes} nodes, upstream capped at ${upstreamMbps} Mbit/s`, `${command} --upstream-mbps ${upstreamMbps}`, text);
    process.stdout.write(`${text}\n`);
  } else if (name === 'memory') {
    // The default blob size here is the memory run's own (a few pulls, not a throughput run).
    const sizeMb = process.argv.includes('--size-mb') ? Number(values['size-mb']) : 256;
    const result = await runMemoryBench(sizeMb, Number(values.rounds));
    const text = formatMemoryBench(result);
    writeReportSection('bench-memory', 'Benchmark: proxy memory', `npm run bench -- memory --size-mb ${sizeMb} --rounds ${values.rounds}`, text);
    process.stdout.write(`${text}\n`);
  } else {
    process.stderr.write(`unknown benchmark "${name}" (known: webhook, upstream, proxy, cache, shared, memory)\n`);
    process.exitCode = 2;
  }
}
