// Webhook benchmark: admissions per second over HTTPS keep-alive for a Pod with 10 containers,
// against the same express server answering a constant allowed response, in one run, alternating
// rounds so that machine noise hits both alike. Also the in-process decision cost.
//
//   npm run bench -- webhook [--seconds 5] [--rounds 3] [--connections 8]

import { fork, type ChildProcess } from 'node:child_process';
import https from 'node:https';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import express from 'express';
import { pino } from 'pino';
import { generateCertificates } from '../src/certs/certs.js';
import { createLogger } from '../src/log.js';
import { createMetricsRegistry } from '../src/metrics.js';
import { parseConfig } from '../src/rules/config.js';
import { listen } from '../src/shell/serve.js';
import { admitPod, parseAdmissionReview } from '../src/webhook/admission.js';
import { createWebhookApp } from '../src/webhook/server.js';

// Without API access the webhook provisions no pull secrets, so it never reads the broker key.
const CONFIG = `
broker: {keyFiles: [/nonexistent/pullbridge/broker-key]}
registries:
  - {name: corp, match: ["registry.corp.example:5000"], upstream: "https://127.0.0.1:5000"}
  - {name: hub, match: [docker.io], upstream: "https://127.0.0.1:5001", auth: {mode: anonymous}}
`;

export const BENCH_REVIEW_UID = '8d1d7a52-0000-4000-8000-000000000000';

export function benchReview(): Record<string, unknown> {
  const containers = Array.from({ length: 10 }, (_, i) => ({
    name: `c${i}`,
    image: i % 3 === 0 ? `nginx:1.${i}` : i % 3 === 1 ? `registry.corp.example:5000/team/app${i}:1.${i}` : `quay.io/other/img${i}:v${i}`,
    resources: { requests: { cpu: '10m', memory: '16Mi' } },
    env: [{ name: 'A', value: 'b' }],
  }));
  return {
    apiVersion: 'admission.k8s.io/v1',
    kind: 'AdmissionReview',
    request: {
      uid: BENCH_REVIEW_UID,
      kind: { group: '', version: 'v1', kind: 'Pod' },
      resource: { group: '', version: 'v1', resource: 'pods' },
      namespace: 'bench',
      operation: 'CREATE',
      userInfo: { username: 'system:serviceaccount:kube-system:replicaset-controller' },
      object: { apiVersion: 'v1', kind: 'Pod', metadata: { generateName: 'bench-', namespace: 'bench', labels: { app: 'bench' } }, spec: { containers } },
      dryRun: false,
    },
  };
}

function config() {
  const parsed = parseConfig(CONFIG);
  if (!parsed.ok) throw new Error('bench config invalid');
  return parsed.config;
}

/** Child process: serve one variant and report the port. */
async function serve(variant: string, cert: string, key: string): Promise<void> {
  let app: express.Express;
  if (variant === 'pullbridge' || variant === 'lean') {
    // "lean" switches off the audit record and the process metrics, to show what they cost.
    const cfg = config();
    // The production logger as deployed: redacting, synchronous writes to stdout (here /dev/null).
    const sink = createLogger();
    const audit = variant === 'lean' ? pino({ level: 'silent' }) : sink;
    app = createWebhookApp({ config: () => cfg, logger: sink, audit, metrics: createMetricsRegistry(variant !== 'lean') });
  } else {
    app = express();
    app.post('/mutate', express.json({ limit: 7 * 1024 * 1024 }), (req, res) => {
      const uid = (req.body as { request?: { uid?: string } }).request?.uid ?? '';
      res.json({ apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview', response: { uid, allowed: true } });
    });
  }
  const running = await listen(app, { host: '127.0.0.1', port: 0, tls: { cert, key } });
  // CPU time used by the server is far steadier than wall-clock throughput on a shared machine.
  process.on('message', () => {
    const usage = process.cpuUsage();
    process.send?.({ cpuMicros: usage.user + usage.system });
  });
  process.send?.({ port: running.port });
}

interface RoundResult {
  readonly cpuMicros?: number;
  readonly requests: number;
  readonly errors: number;
  readonly seconds: number;
  readonly latenciesMs: number[];
}

/** `connections` keep-alive clients posting `body` for `seconds`; `correct` judges each answer (default: status 200). */
export async function drive(port: number, ca: string, body: string, seconds: number, connections: number, correct: (status: number, body: string) => boolean = (status) => status === 200): Promise<RoundResult> {
  const agent = new https.Agent({ keepAlive: true, maxSockets: connections, ca });
  const deadline = performance.now() + seconds * 1000;
  const latenciesMs: number[] = [];
  let errors = 0;
  const one = () =>
    new Promise<void>((resolve) => {
      const started = performance.now();
      const req = https.request({ host: '127.0.0.1', port, path: '/mutate', method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (text += chunk));
        res.on('end', () => {
          if (correct(res.statusCode ?? 0, text)) latenciesMs.push(performance.now() - started);
          else errors++;
          resolve();
        });
      });
      req.on('error', () => {
        errors++;
        resolve();
      });
      req.end(body);
    });
  const worker = async () => {
    while (performance.now() < deadline) await one();
  };
  const begun = performance.now();
  await Promise.all(Array.from({ length: connections }, worker));
  agent.destroy();
  return { requests: latenciesMs.length, errors, seconds: (performance.now() - begun) / 1000, latenciesMs };
}

export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] ?? NaN;
}

function cpuOf(child: ChildProcess): Promise<number> {
  return new Promise((resolve) => {
    child.once('message', (m) => resolve((m as { cpuMicros: number }).cpuMicros));
    child.send('cpu');
  });
}

async function measuredRound(server: { child: ChildProcess; port: number }, ca: string, body: string, seconds: number, connections: number): Promise<RoundResult> {
  const before = await cpuOf(server.child);
  const result = await drive(server.port, ca, body, seconds, connections);
  return { ...result, cpuMicros: (await cpuOf(server.child)) - before };
}

function startChild(variant: string, cert: string, key: string): Promise<{ child: ChildProcess; port: number }> {
  return new Promise((resolve, reject) => {
    const child = fork(fileURLToPath(import.meta.url), ['serve', variant], { env: { ...process.env, BENCH_CERT: cert, BENCH_KEY: key }, stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
    child.once('message', (m) => resolve({ child, port: (m as { port: number }).port }));
    child.once('exit', (code) => reject(new Error(`${variant} server exited ${code}`)));
  });
}

function decisionCost(iterations: number): number {
  const cfg = config();
  const parsed = parseAdmissionReview(benchReview());
  if (!parsed.ok) throw new Error(parsed.error);
  for (let i = 0; i < 2000; i++) admitPod(cfg, parsed.request);
  const started = performance.now();
  for (let i = 0; i < iterations; i++) admitPod(cfg, parsed.request);
  return ((performance.now() - started) * 1000) / iterations; // µs
}

interface Summary {
  /** Server CPU time per admission. */
  readonly cpuMicrosPerRequest: number;
  readonly rps: number;
  readonly p50: number;
  readonly p99: number;
  readonly errors: number;
}

export interface WebhookBenchResult {
  readonly decisionMicros: number;
  readonly pullbridge: Summary;
  readonly lean: Summary;
  readonly baseline: Summary;
  readonly ratio: number;
  readonly leanRatio: number;
  /** Capacity ratio from server CPU per admission: constant / pullbridge. */
  readonly cpuRatio: number;
  readonly settings: { seconds: number; rounds: number; connections: number; containers: number };
}

export async function runWebhookBench(seconds: number, rounds: number, connections: number): Promise<WebhookBenchResult> {
  const certs = generateCertificates({ service: 'bench', namespace: 'bench', extraNames: ['127.0.0.1'] });
  const body = JSON.stringify(benchReview());
  const variants = ['pullbridge', 'lean', 'baseline'] as const;
  const servers = await Promise.all(variants.map((v) => startChild(v, certs.cert, certs.key)));
  const totals = { pullbridge: [] as RoundResult[], lean: [] as RoundResult[], baseline: [] as RoundResult[] };
  try {
    for (const s of servers) await drive(s.port, certs.caCert, body, 1, connections); // warm-up
    for (let round = 0; round < rounds; round++) {
      // Rotate the order each round so no variant always runs on a warmer machine.
      const order = variants.map((_, i) => (i + round) % variants.length);
      for (const i of order) totals[variants[i]!].push(await measuredRound(servers[i]!, certs.caCert, body, seconds, connections));
    }
  } finally {
    for (const s of servers) s.child.kill();
  }
  const summarise = (results: RoundResult[]) => {
    const latencies = results.flatMap((r) => r.latenciesMs).sort((a, b) => a - b);
    const requests = results.reduce((n, r) => n + r.requests, 0);
    const time = results.reduce((n, r) => n + r.seconds, 0);
    const cpu = results.reduce((n, r) => n + (r.cpuMicros ?? 0), 0);
    return { cpuMicrosPerRequest: cpu / requests, rps: requests / time, p50: percentile(latencies, 50), p99: percentile(latencies, 99), errors: results.reduce((n, r) => n + r.errors, 0) };
  };
  const pullbridge = summarise(totals.pullbridge);
  const lean = summarise(totals.lean);
  const baseline = summarise(totals.baseline);
  return {
    decisionMicros: decisionCost(20_000),
    pullbridge,
    lean,
    baseline,
    ratio: pullbridge.rps / baseline.rps,
    leanRatio: lean.rps / baseline.rps,
    cpuRatio: baseline.cpuMicrosPerRequest / pullbridge.cpuMicrosPerRequest,
    settings: { seconds, rounds, connections, containers: 10 },
  };
}

export function formatWebhookBench(r: WebhookBenchResult): string {
  const f = (n: number, d = 0) => n.toFixed(d);
  return [
    `In-process decision (parse review + admitPod, 10 containers): ${f(r.decisionMicros, 1)} µs`,
    '',
    `| server (HTTPS keep-alive, ${r.settings.connections} connections, ${r.settings.rounds} × ${r.settings.seconds}s alternating) | admissions/s | p50 ms | p99 ms | errors | server CPU µs/admission |`,
    '|---|---|---|---|---|---|',
    `| pullbridge webhook (/mutate, audit on) | ${f(r.pullbridge.rps)} | ${f(r.pullbridge.p50, 2)} | ${f(r.pullbridge.p99, 2)} | ${r.pullbridge.errors} | ${f(r.pullbridge.cpuMicrosPerRequest)} |`,
    `| pullbridge webhook, audit and process metrics off | ${f(r.lean.rps)} | ${f(r.lean.p50, 2)} | ${f(r.lean.p99, 2)} | ${r.lean.errors} | ${f(r.lean.cpuMicrosPerRequest)} |`,
    `| same express server, constant allowed response | ${f(r.baseline.rps)} | ${f(r.baseline.p50, 2)} | ${f(r.baseline.p99, 2)} | ${r.baseline.errors} | ${f(r.baseline.cpuMicrosPerRequest)} |`,
    '',
    `Throughput ratio pullbridge / constant: **${f(r.ratio * 100)}%** (audit and process metrics off: ${f(r.leanRatio * 100)}%).`,
    `Capacity ratio from server CPU per admission (constant / pullbridge), the steadier figure on a shared machine: **${f(r.cpuRatio * 100)}%**.`,
  ].join('\n');
}

if (process.argv[2] === 'serve') {
  await serve(process.argv[3] ?? 'pullbridge', process.env.BENCH_CERT ?? '', process.env.BENCH_KEY ?? '');
} else if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { seconds: { type: 'string', default: '5' }, rounds: { type: 'string', default: '3' }, connections: { type: 'string', default: '8' } } });
  const result = await runWebhookBench(Number(values.seconds), Number(values.rounds), Number(values.connections));
  process.stdout.write(`${formatWebhookBench(result)}\n`);
}
