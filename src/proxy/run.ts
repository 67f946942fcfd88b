// The proxy process: server, prober, live config (a new runtime per config; the old one drains).

import { randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { setFlagsFromString } from 'node:v8';
import { Gauge, type Registry } from 'prom-client';
import { NodeCache } from '../cache/nodecache.js';
import { createLogger, type Logger } from '../log.js';
import { createMetricsRegistry } from '../metrics.js';
import { filesReadBy, type Config } from '../rules/config.js';
import { unloadableFiles } from '../shell/configfile.js';
import { ConfigWatcher } from '../shell/configwatch.js';
import type { SkippedBrokerKey } from '../shell/secretfiles.js';
import { listen, type RunningServer } from '../shell/serve.js';
import { isLoopbackAddress } from '../upstream/addresses.js';
import { Prober } from '../upstream/probe.js';
import { ListenerCheck } from './listener.js';
import { BODY_HIGH_WATER_MARK } from './stream.js';
import { createOpsHandler } from './ops.js';
import { listenGated, PROBE_PORT_MAX_CONNECTIONS, PROBE_PORT_MAX_CONNECTIONS_PER_SOURCE, serveGated, type GatedListener } from '../shell/startupgate.js';
import { createProxyRuntime, type ProxyRuntime } from './runtime.js';
import { createProxyHandlers } from './server.js';

export interface ProxyRunOptions {
  readonly config: Config;
  readonly configPath?: string;
  readonly host: string;
  readonly port: number;
  /** 0 disables probing. */
  readonly probeIntervalMs: number;
  /**
   * A separate port for /healthz, /readyz, /metrics and /status, which the node exposure does not
   * publish. Without it they are served on the registry port, where every Pod can read them.
   */
  readonly opsPort?: number;
  /** The operations port, already listening (the caller opened it before loading this module). */
  readonly opsListener?: GatedListener;
  /** Where the operations port listens; the registry port's host when not given. */
  readonly opsHost?: string;
  /**
   * Also listen on the operations port at this address (the Pod IP, given by the chart with the
   * hostNetwork exposure, where opsHost is the node's loopback), for the webhook's status collector:
   * there every endpoint but /healthz and /readyz needs the collector's bearer token.
   */
  readonly opsCollectorHost?: string;
  /** Open connections accepted at once (a node's kubelet and pods); more are closed on arrival. */
  readonly maxConnections?: number;
  /** Of those, what one source address may hold (the node's own runtime is one source too). */
  readonly maxConnectionsPerSource?: number;
  /** This node's name, as the shared cache tier's fill claims say who fetches (the chart passes the Node's). */
  readonly nodeName?: string;
  /**
   * Where the listener check dials (see listenerCheck below); the registry's own listening address
   * when not given. Tests point it at a stand-in for another party answering that address.
   */
  readonly listenerCheckDial?: { readonly host: string; readonly port: number };
  /** Where records go; a logger to stdout when not given. */
  readonly logger?: Logger;
}

export const DEFAULT_MAX_CONNECTIONS = 1024;
export const DEFAULT_MAX_CONNECTIONS_PER_SOURCE = 256;
/**
 * Connections one source may hold on the collector listener. The status collector needs one at a
 * time; the admission resolver of a webhook replica asks concurrently, from a pool of at most
 * RESOLVER_CONNECTIONS_PER_PROXY (8, src/webhook/proxytier.ts, which also fits the operations
 * port's own per-source limit under the other exposures). Connections past the limit are closed on
 * arrival, which fails an admission question over to another proxy, so the limit is twice the pool:
 * room for sockets the server still counts after the client dropped them (keep-alive races, a
 * webhook container restarted in the same Pod, same address) and the collector's own. Under
 * hostNetwork every Pod on the node reaches this listener: connections that send no request are
 * closed after COLLECTOR_FIRST_REQUEST_TIMEOUT_MS and idle keep-alive ones after
 * COLLECTOR_KEEP_ALIVE_MS, so that holding sockets open costs a peer a steady stream of requests,
 * and the listener takes sixteen sources' worth (COLLECTOR_MAX_CONNECTIONS).
 */
export const COLLECTOR_MAX_CONNECTIONS_PER_SOURCE = 16;
/** The webhook sends its request as soon as it connects: 2 s is ample on a loaded node. */
export const COLLECTOR_FIRST_REQUEST_TIMEOUT_MS = 2_000;
/** Announced in `Keep-Alive: timeout=5`, which undici (the webhook's client) honours, so the
 * webhook's pool never races the server's close. */
export const COLLECTOR_KEEP_ALIVE_MS = 5_000;
export const COLLECTOR_MAX_CONNECTIONS = 16 * COLLECTOR_MAX_CONNECTIONS_PER_SOURCE;

/** At shutdown, how long fills in flight may take to be stored (flushing a large blob takes a moment). */
const FILL_SETTLE_MS = 30_000;

/** How long a replaced runtime keeps its connections for streams still in flight. */
const DRAIN_MS = 10 * 60_000;

/**
 * Keeps undici's HTTP parser (llhttp, WebAssembly) on V8's baseline compiler. Optimising its one
 * huge function at the first responses costs a transient ~35 MB, a third of the proxy's memory;
 * a relay does not spend its time there (measured: same throughput, peak RSS 105 → 89 MiB).
 * Set before the first upstream connection compiles the parser; NODE_OPTIONS cannot carry it.
 */
export function tuneRuntimeForRelay(): void {
  setFlagsFromString('--liftoff-only');
}

/**
 * Logs and counts skipped verify-only broker keys when the set changes, not per request; one
 * reporter for the process, so that a new runtime (config change) with the same state stays quiet.
 */
function reportSkippedBrokerKeys(logger: Logger, metrics: Registry): (skipped: readonly SkippedBrokerKey[]) => void {
  const gauge = new Gauge({ name: 'pullbridge_broker_keys_skipped', help: 'Verify-only broker key files present but unusable (empty, too short, unreadable), skipped', registers: [metrics] });
  let reported = '[]';
  return (skipped) => {
    const state = JSON.stringify(skipped);
    if (state === reported) return;
    reported = state;
    gauge.set(skipped.length);
    if (skipped.length > 0) logger.warn({ skipped }, 'broker key file skipped: credentials signed with it are refused; the signing key still works');
    else logger.info('every broker key file usable again');
  };
}

export async function runProxy(
  options: ProxyRunOptions,
): Promise<{ running: RunningServer; ops: RunningServer | undefined; opsCollector: RunningServer | undefined; watcher: ConfigWatcher | undefined; listener: ListenerCheck | undefined; shutdown(): Promise<void> }> {
  tuneRuntimeForRelay();
  const logger = options.logger ?? createLogger({ name: 'pullbridge-proxy' });
  const metrics = createMetricsRegistry();
  const onVerifyKeys = reportSkippedBrokerKeys(logger, metrics);
  // The operations port listens before the start work (the cache scan), so that the startup probe
  // is answered from the first instant (shell/startupgate.ts).
  const separateOps = options.opsPort !== undefined || options.opsListener !== undefined;
  const gated = options.opsListener ?? (separateOps ? await listenGated({ host: options.opsHost ?? options.host, port: options.opsPort ?? 0, maxConnections: PROBE_PORT_MAX_CONNECTIONS, maxConnectionsPerSource: PROBE_PORT_MAX_CONNECTIONS_PER_SOURCE }) : undefined);
  const ops = gated?.server;
  // The node cache is opened once, from the first config; later configs change its settings only.
  const cache = options.config.cache ? await NodeCache.open(options.config.cache, metrics, logger, Date.now, { nodeName: options.nodeName }).catch(async (error: unknown) => {
    await ops?.close();
    throw error;
  }) : undefined;
  let runtime: ProxyRuntime = createProxyRuntime(options.config, {}, onVerifyKeys, cache);
  const retired = new Set<ProxyRuntime>();
  const prober = new Prober(() => runtime, metrics, options.probeIntervalMs, undefined, logger);
  let draining = false;
  const watcher = options.configPath
    ? new ConfigWatcher({
        path: options.configPath,
        initial: options.config,
        logger,
        metrics,
        loadErrors: (next) => unloadableFiles(filesReadBy(next, 'proxy')),
        onApplied: (next) => {
          const old = runtime;
          if (next.cache && !cache) logger.warn({ path: next.cache.path }, 'cache added to the config: it takes effect when the proxy restarts');
          runtime = createProxyRuntime(next, {}, onVerifyKeys, cache); // throws (and the watcher rejects) if a file changed since it loaded
          retired.add(old);
          // The old runtime's pools are closed after DRAIN_MS: close() still lets requests in flight
          // finish (a stream that never ends is cut by the minimum read rate and the idle timeouts).
          const timer = setTimeout(() => void old.close().finally(() => retired.delete(old)), DRAIN_MS);
          timer.unref();
          if (options.probeIntervalMs > 0) void prober.probeAll();
        },
      })
    : undefined;
  watcher?.start();
  // Set once listening on a loopback address (below); read by /readyz and /status meanwhile.
  let listener: ListenerCheck | undefined;
  const opsOptions = { runtime: () => runtime, metrics, prober, ready: () => !draining && listener?.claimed() !== false, listener: () => listener?.status() };
  const instanceId = randomBytes(16).toString('hex');
  const handlers = createProxyHandlers({ ...opsOptions, logger, opsOnRegistryPort: !separateOps, instanceId });
  const handler = handlers.registry;
  const running = await listen(handler, { host: options.host, port: options.port, highWaterMark: BODY_HIGH_WATER_MARK, maxConnections: options.maxConnections ?? DEFAULT_MAX_CONNECTIONS, maxConnectionsPerSource: options.maxConnectionsPerSource ?? DEFAULT_MAX_CONNECTIONS_PER_SOURCE }).catch(async (error: unknown) => {
    watcher?.stop();
    await ops?.close();
    await cache?.close(0);
    throw error;
  });
  // The admission endpoints are served by the operations listeners only, never the registry port.
  if (gated) serveGated(gated, createOpsHandler({ ...opsOptions, logger, admission: handlers.admission }), opsOptions.ready);
  // A node whose address is its loopback (the Pod IP of a hostNetwork Pod is the node's address):
  // the operations port already listens there, for the node alone.
  // Likewise on a wildcard operations address (other exposures): the Pod IP is among its addresses.
  const opsBound = options.opsHost ?? options.host;
  const collectorHost = options.opsCollectorHost !== undefined && options.opsCollectorHost !== opsBound && !['0.0.0.0', '::'].includes(opsBound) ? options.opsCollectorHost : undefined;
  if (ops && options.opsCollectorHost !== undefined && collectorHost === undefined) logger.info({ host: options.opsCollectorHost }, 'the operations port already listens on the collector address: no second listener');
  const opsCollector =
    ops && collectorHost !== undefined
      ? await listen(createOpsHandler({ ...opsOptions, logger, collectorListener: true, admission: handlers.admission }), { host: collectorHost, port: ops.port, maxConnections: COLLECTOR_MAX_CONNECTIONS, maxConnectionsPerSource: COLLECTOR_MAX_CONNECTIONS_PER_SOURCE, firstRequestTimeoutMs: COLLECTOR_FIRST_REQUEST_TIMEOUT_MS, keepAliveTimeoutMs: COLLECTOR_KEEP_ALIVE_MS, headersTimeoutMs: 10_000 }).catch(async (error: unknown) => {
          watcher?.stop();
          await Promise.all([running.close(), ops.close()]);
          await cache?.close(0);
          throw error;
        })
      : undefined;
  if (opsCollector) logger.info({ url: opsCollector.url }, 'operations endpoints for the status collector listening (bearer token required)');
  // On the node's loopback (the hostNetwork exposure), a NodePort Service on the same port takes
  // this address over under kube-proxy's iptables mode: check that this process answers it.
  const bound = running.server.address() as AddressInfo;
  if (isLoopbackAddress(bound.address)) {
    listener = new ListenerCheck({ listening: { host: bound.address, port: bound.port }, ...(options.listenerCheckDial ? { dial: options.listenerCheckDial } : {}), instanceId, metrics, logger, ownListenerFull: (source) => running.full(source) });
    const check = listener;
    prober.schedule(() => check.check());
  }
  if (ops) logger.info({ url: ops.url }, 'operations endpoints listening');
  else logger.warn('/metrics and /status are served on the registry port, which every Pod on the node can reach, and name the upstreams: give the proxy an --ops-port');
  // Interval 0: no probing (the demo's sample upstreams are placeholders).
  if (options.probeIntervalMs > 0) prober.start();
  logger.info({ url: running.url, rules: options.config.registries.map((r) => `${r.name} -> ${r.upstream}`) }, 'proxy listening');
  return {
    running,
    ops,
    opsCollector,
    watcher,
    listener,
    async shutdown() {
      draining = true;
      watcher?.stop();
      prober.stop();
      await Promise.all([running.close(), ops?.close(), opsCollector?.close()]);
      await Promise.all([runtime, ...retired].map((r) => r.close()));
      await cache?.close(FILL_SETTLE_MS);
      logger.info('proxy stopped');
    },
  };
}
