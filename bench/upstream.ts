// Upstream-aware admission benchmark: admissions/s and latency of the webhook server for a Pod of 10
// containers (5 repositories) whose rule is plain (today's rewrite), rewrite: private-only,
// pinDigest, or verify (real cosign signatures, checked with the rule's key), each question asked
// the way the product asks it: through a real proxy process's admission endpoints (ProxyTierView),
// which relays to a real docker-registry on loopback. Side by side in one run, each asking variant
// twice: uncached (the webhook's answer cache off, the proxy without a node cache: every question
// reaches the registry) and cached (CachedRegistryView, as the webhook runs, warmed by one round).
// The registry's request count per review is read from its settled access log.
//
//   npm run bench -- upstream [--seconds 5] [--connections 8]

import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { generateCertificates } from '../src/certs/certs.js';
import { createMetricsRegistry } from '../src/metrics.js';
import { namespaceToken, opsToken } from '../src/rules/credentials.js';
import { parseConfig } from '../src/rules/config.js';
import type { RegistryView } from '../src/rules/registryview.js';
import { listen } from '../src/shell/serve.js';
import { ProxyTierView } from '../src/webhook/proxytier.js';
import { createWebhookApp } from '../src/webhook/server.js';
import { cosignSignatureCheck } from '../src/webhook/signatures.js';
import { CachedRegistryView } from '../src/webhook/viewcache.js';
import { generateKeyPair, sign } from '../test/support/cosign.js';
import { buildImage } from '../test/support/oci.js';
import { runProxyUnderTest } from '../test/support/proxy.js';
import { startRegistry } from '../test/support/registry.js';
import { drive, percentile } from './webhook.js';

const REPOSITORIES = 5;

function review(): string {
  const containers = Array.from({ length: 10 }, (_, i) => ({ name: `c${i}`, image: `bench.example/team/app${i % REPOSITORIES}:1` }));
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
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-bench-upstream-'));
  const registry = await startRegistry({ accessLog: true });
  const key = Buffer.from(randomBytes(32).toString('hex'));
  const keyFile = join(dir, 'broker.key');
  writeFileSync(keyFile, `${key.toString()}\n`);
  const cosignKey = await generateKeyPair();
  const image = buildImage({ layerSizes: [64] });
  for (let i = 0; i < REPOSITORIES; i++) {
    await registry.push(image, `team/app${i}`, '1');
    await sign(`127.0.0.1:${registry.port}/team/app${i}@${image.index.digest}`, cosignKey);
  }
  const rule = { name: 'bench', match: ['bench.example'], upstream: registry.url, auth: { mode: 'anonymous' as const } };
  const proxy = await runProxyUnderTest({ registries: [rule] }, key);
  const certs = generateCertificates({ service: 'bench', namespace: 'bench', extraNames: ['127.0.0.1'] });
  const body = review();
  const variants: ReadonlyArray<readonly [string, string, boolean]> = [
    ['plain', '', false],
    ['private-only, uncached', 'rewrite: private-only', false],
    ['private-only, cached', 'rewrite: private-only', true],
    ['pinDigest, uncached', 'pinDigest: true', false],
    ['pinDigest, cached', 'pinDigest: true', true],
    ['verify, uncached', `verify: {cosign: {publicKeyFiles: ["${cosignKey.publicKeyFile}"]}}`, false],
    ['verify, cached', `verify: {cosign: {publicKeyFiles: ["${cosignKey.publicKeyFile}"]}}`, true],
  ];
  const rows: string[] = [];
  try {
    for (const [name, keys, cached] of variants) {
      const parsed = parseConfig(`proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: ["${keyFile}"]}
registries: [{name: bench, match: [bench.example], upstream: "${registry.url}", auth: {mode: anonymous}${keys ? `, ${keys}` : ''}}]
`);
      if (!parsed.ok) throw new Error(JSON.stringify(parsed.errors));
      const config = parsed.config;
      const tier = new ProxyTierView({
        endpoints: () => [proxy.opsUrl],
        token: () => opsToken(key, 'resolver'),
        namespaceAuthorization: (namespace) => `Basic ${Buffer.from(`${namespace}:${namespaceToken(key, namespace)}`).toString('base64')}`,
      });
      const view: RegistryView = cached ? new CachedRegistryView(tier) : tier;
      const silent = pino({ level: 'silent' });
      const app = createWebhookApp({ config: () => config, logger: silent, audit: silent, metrics: createMetricsRegistry(false), upstream: { view, signatureCheck: cosignSignatureCheck(view, () => config), budgetMs: 4000 } });
      const running = await listen(app, { host: '127.0.0.1', port: 0, tls: { cert: certs.cert, key: certs.key } });
      try {
        await drive(running.port, certs.caCert, body, 1, connections);
        const before = (await registry.requests()).length;
        const result = await drive(running.port, certs.caCert, body, seconds, connections, (status, text) => status === 200 && text.includes('"allowed":true'));
        const asked = (await registry.requests()).length - before;
        const latencies = [...result.latenciesMs].sort((a, b) => a - b);
        rows.push(`| ${name} | ${(result.requests / result.seconds).toFixed(0)} | ${percentile(latencies, 50).toFixed(2)} | ${percentile(latencies, 99).toFixed(2)} | ${(asked / Math.max(1, result.requests)).toFixed(2)} | ${result.errors} |`);
      } finally {
        await running.close();
        await tier.close();
      }
    }
  } finally {
    await proxy.close();
    await registry.stop();
    rmSync(dir, { recursive: true, force: true });
  }
  return [
    `| rule (10 containers, ${REPOSITORIES} repositories; webhook → proxy admission endpoint → docker-registry, all on this machine; ${connections} connections, ${seconds}s) | admissions/s | p50 ms | p99 ms | registry requests/review | errors |`,
    '|---|---|---|---|---|---|',
    ...rows,
  ].join('\n');
}

if (process.argv[1]?.endsWith('upstream.js')) {
  const { values } = parseArgs({ options: { seconds: { type: 'string', default: '5' }, connections: { type: 'string', default: '8' } } });
  process.stdout.write(`${await runUpstreamBench(Number(values.seconds), Number(values.connections))}\n`);
}
