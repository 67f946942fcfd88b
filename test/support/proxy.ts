// The proxy under test, in-process on loopback, with a broker key in a temp file.

import { randomBytes } from 'node:crypto';
import http from 'node:http';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Registry } from 'prom-client';
import { NodeCache, type NodeCacheOptions } from '../../src/cache/nodecache.js';
import { createMetricsRegistry } from '../../src/metrics.js';
import { namespaceToken } from '../../src/rules/credentials.js';
import { createProxyRuntime, type ProxyRuntime } from '../../src/proxy/runtime.js';
import { runProxy } from '../../src/proxy/run.js';
import { createProxyHandler, type ProxyHandlerOptions } from '../../src/proxy/server.js';
import { Prober } from '../../src/upstream/probe.js';
import type { TransportOptions } from '../../src/upstream/transport.js';
import { validateConfig, type ConfigInput } from '../../src/rules/config.js';
import { listen, type ListenOptions, type RunningServer } from '../../src/shell/serve.js';
import { memoryLogger } from './logs.js';

export interface ProxyUnderTest {
  readonly server: RunningServer;
  /** `127.0.0.1:PORT`, as clients write it in references. */
  readonly host: string;
  readonly url: string;
  readonly runtime: ProxyRuntime;
  /** The node cache, when the config has `cache`. */
  readonly cache: NodeCache | undefined;
  readonly prober: Prober;
  readonly metrics: Registry;
  readonly logs: ReturnType<typeof memoryLogger>;
  readonly key: Buffer;
  readonly keyFile: string;
  /** `namespace:token`, the credential the webhook provisions for a namespace. */
  credential(namespace: string): string;
  /** `Basic …` header for a namespace. */
  authorization(namespace: string): string;
  close(): Promise<void>;
}

export async function startProxy(
  config: Omit<ConfigInput, 'broker'> & { broker?: ConfigInput['broker'] },
  transport: TransportOptions = {},
  server: Omit<ListenOptions, 'host' | 'port'> = {},
  handler: Partial<Pick<ProxyHandlerOptions, 'blobStreamsPerClient' | 'minimumClientRate' | 'bufferBudget'>> = {},
  cacheOptions: NodeCacheOptions & { readonly now?: () => number } = {},
): Promise<ProxyUnderTest> {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-proxy-'));
  const key = Buffer.from(randomBytes(32).toString('hex'));
  const keyFile = join(dir, 'broker.key');
  writeFileSync(keyFile, `${key.toString()}\n`);
  const result = validateConfig({ broker: { keyFiles: [keyFile] }, ...config });
  if (!result.ok) throw new Error(result.errors.map((e) => `${e.key}: ${e.message}`).join('\n'));
  const metrics = createMetricsRegistry(false);
  const logs = memoryLogger();
  const cache = result.config.cache ? await NodeCache.open(result.config.cache, metrics, logs.logger, cacheOptions.now ?? Date.now, cacheOptions) : undefined;
  const runtime = createProxyRuntime(result.config, transport, undefined, cache);
  const prober = new Prober(() => runtime, metrics, 3_600_000, 5_000);
  const running = await listen(createProxyHandler({ ...handler, runtime: () => runtime, logger: logs.logger, metrics, prober }), { ...server, host: '127.0.0.1', port: 0 });
  const credential = (namespace: string) => `${namespace}:${namespaceToken(key, namespace)}`;
  return {
    server: running,
    host: `127.0.0.1:${running.port}`,
    url: running.url,
    runtime,
    cache,
    prober,
    metrics,
    logs,
    key,
    keyFile,
    credential,
    authorization: (namespace) => `Basic ${Buffer.from(credential(namespace)).toString('base64')}`,
    async close() {
      prober.stop();
      await running.close(100);
      await runtime.close();
      await cache?.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export interface ProxyProcessUnderTest {
  /** The registry port's URL. */
  readonly url: string;
  /** The operations port on loopback. */
  readonly opsUrl: string;
  /** The operations port on the collector address (another loopback address, standing in for the Pod IP). */
  readonly collectorUrl: string | undefined;
  readonly logs: ReturnType<typeof memoryLogger>;
  close(): Promise<void>;
}

/**
 * The proxy as `pullbridge proxy` runs it (runProxy: registry port, operations port, collector
 * listener), in-process on loopback, with `key` as its broker key (a temp file).
 */
export async function runProxyUnderTest(config: Omit<ConfigInput, 'broker'>, key: Buffer, options: { readonly collectorHost?: string } = {}): Promise<ProxyProcessUnderTest> {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-proxy-'));
  const keyFile = join(dir, 'broker.key');
  writeFileSync(keyFile, `${key.toString()}\n`);
  const result = validateConfig({ broker: { keyFiles: [keyFile] }, ...config });
  if (!result.ok) throw new Error(result.errors.map((e) => `${e.key}: ${e.message}`).join('\n'));
  const logs = memoryLogger();
  const proxy = await runProxy({ config: result.config, host: '127.0.0.1', port: 0, opsPort: 0, opsHost: '127.0.0.1', ...(options.collectorHost ? { opsCollectorHost: options.collectorHost } : {}), probeIntervalMs: 0, logger: logs.logger });
  return {
    url: proxy.running.url,
    opsUrl: proxy.ops?.url ?? '',
    collectorUrl: proxy.opsCollector?.url,
    logs,
    async close() {
      await proxy.shutdown();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A GET through a proxy as the namespace `shop`: its status, whether the body came whole, and the
 * bytes that came (a cut or reset answer resolves with what arrived, not an error). */
export function getAsShop(proxy: ProxyUnderTest, path: string): Promise<{ status: number; complete: boolean; body: Buffer }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const req = http.get(`${proxy.url}${path}`, { headers: { authorization: proxy.authorization('shop') } }, (res) => {
      const done = () => resolve({ status: res.statusCode ?? 0, complete: res.complete, body: Buffer.concat(chunks) });
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', done);
      res.on('error', done);
      res.on('aborted', done);
    });
    req.on('error', () => resolve({ status: 0, complete: false, body: Buffer.concat(chunks) }));
  });
}
