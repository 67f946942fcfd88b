// Upstream-aware admission benchmark: admissions/s and latency of the webhook server for a Pod of 10
// containers whose rule is plain (today's rewrite), rewrite: private-only, pinDigest, or verify (a
// stub signature check that answers at once), each question asked of a real docker-registry on
// loopback through a RegistryView that goes to the registry directly and caches nothing: the
// uncached case. The proxy tier's cached view is measured where it is built.
//
//   npm run bench -- upstream [--seconds 5] [--connections 8]

import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { generateCertificates } from '../src/certs/certs.js';
import { createMetricsRegistry } from '../src/metrics.js';
import { parseConfig } from '../src/rules/config.js';
import { listen } from '../src/shell/serve.js';
import { createWebhookApp } from '../src/webhook/server.js';
import type { SignatureCheck } from '../src/webhook/upstream.js';
import { directRegistryView } from '../test/support/directview.js';
import { buildImage } from '../test/support/oci.js';
import { startRegistry } from '../test/support/registry.js';
import { drive, percentile } from './webhook.js';

const VARIANTS = {
  plain: '',
  'private-only': 'rewrite: private-only',
  pinDigest: 'pinDigest: true',
  'verify (stub check)': 'verify: {cosign: {publicKeyFiles: [/k.pub]}}',
} as const;

function review(): string {
  const containers = Array.from({ length: 10 }, (_, i) => ({ name: `c${i}`, image: `bench.example/team/app${i % 5}:1` }));
  return JSON.stringify({
    apiVersion: 'admission.k8s.io/v1',
    kind: 'AdmissionReview',
    request: {
      uid: '8d1d7a52-0000-4000-8000-000000000001',
      kind: { group: '', version: 'v1', kind: 'Pod' },
      resource: { group: '', version: 'v1', resource: 'pods' },
      namespace: 'bench',
      operation: 'CREATE',
      object: { apiVersion: 'v1', kind: 'Pod', metadata: { generateName: 'bench-' }, spec: { containers } },
    },
  });
}

export async function runUpstreamBench(seconds: number, connections: number): Promise<string> {
  const registry = await startRegistry();
  const image = buildImage({ layerSizes: [64] });
  for (let i = 0; i < 5; i++) await registry.push(image, `team/app${i}`, '1');
  const certs = generateCertificates({ service: 'bench', namespace: 'bench', extraNames: ['127.0.0.1'] });
  const body = review();
  const rows: string[] = [];
  const signatureCheck: SignatureCheck = () => Promise.resolve({ verified: true });
  try {
    for (const [name, keys] of Object.entries(VARIANTS)) {
      const parsed = parseConfig(`proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
registries: [{name: bench, match: [bench.example], upstream: "${registry.url}", auth: {mode: anonymous}${keys ? `, ${keys}` : ''}}]
`);
      if (!parsed.ok) throw new Error(JSON.stringify(parsed.errors));
      const config = parsed.config;
      const view = directRegistryView({ upstream: registry.url });
      const silent = pino({ level: 'silent' });
      const app = createWebhookApp({ config: () => config, logger: silent, audit: silent, metrics: createMetricsRegistry(false), upstream: { view, signatureCheck, budgetMs: 4000 } });
      const running = await listen(app, { host: '127.0.0.1', port: 0, tls: { cert: certs.cert, key: certs.key } });
      try {
        await drive(running.port, certs.caCert, body, 1, connections);
        const asked = view.requests.length;
        const result = await drive(running.port, certs.caCert, body, seconds, connections, (status, text) => status === 200 && text.includes('"allowed":true'));
        const latencies = [...result.latenciesMs].sort((a, b) => a - b);
        const perReview = (view.requests.length - asked) / Math.max(1, result.requests);
        rows.push(`| ${name} | ${(result.requests / result.seconds).toFixed(0)} | ${percentile(latencies, 50).toFixed(2)} | ${percentile(latencies, 99).toFixed(2)} | ${perReview.toFixed(1)} | ${result.errors} |`);
      } finally {
        await running.close();
      }
    }
  } finally {
    await registry.stop();
  }
  return [
    `| rule (10 containers, 5 repositories, uncached; ${connections} connections, ${seconds}s, server and registry on one machine) | admissions/s | p50 ms | p99 ms | registry requests/review | errors |`,
    '|---|---|---|---|---|---|',
    ...rows,
  ].join('\n');
}

if (process.argv[1]?.endsWith('upstream.js')) {
  const { values } = parseArgs({ options: { seconds: { type: 'string', default: '5' }, connections: { type: 'string', default: '8' } } });
  process.stdout.write(`${await runUpstreamBench(Number(values.seconds), Number(values.connections))}\n`);
}
