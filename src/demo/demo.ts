// `pullbridge demo` (what `npm start` runs): a self-contained, offline walk-through. The sample
// registry runs as a child process (so that a step can kill it), a webhook and a proxy with a node
// cache listen on loopback, and numbered steps (demosteps.ts) say what to run. Everything it writes
// lives in one temporary directory, which holds a broker key: removed on exit and on a failed start.
// The components' JSON logs go to a file there, so that the terminal shows the steps.

import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateCertificates } from '../certs/certs.js';
import { DEMO_REGISTRY, sampleAdmissionReview, sampleConfigYaml } from '../defaults.js';
import { namespaceToken } from '../rules/credentials.js';
import { runProxy } from '../proxy/run.js';
import { formatConfigErrors, parseConfig } from '../rules/config.js';
import { decideImage } from '../rules/decide.js';
import { runWebhook } from '../webhook/run.js';
import { createLogger } from '../log.js';
import { demoSteps, formatDemoSteps } from './demosteps.js';
import { describeListenError } from '../shell/listenerrors.js';
import { SAMPLE_REPOSITORY, SAMPLE_TAG } from './sampleimage.js';

export interface DemoOptions {
  readonly port: number;
  readonly proxyPort: number;
  readonly registryPort: number;
  /** This CLI's entry point, to start `sample-registry` as a child process. */
  readonly cliPath: string;
  /** How the printed commands invoke the CLI. */
  readonly cliCommand: string;
  readonly write: (text: string) => void;
}

export interface Demo {
  readonly dir: string;
  /** Resolves once every step can be run (rejects, after the cleanup, when the start failed). */
  readonly started: Promise<void>;
  /** Stops what runs and removes the directory; at any time, also while starting. */
  shutdown(): Promise<void>;
}

/** A start that failed after its cleanup: one line for the user. */
export class DemoStartError extends Error {}

const NAMESPACE = 'default';

/** Starts `pullbridge sample-registry` and resolves with its URL once it printed it. */
function startSampleRegistry(cliPath: string, port: number): Promise<{ child: ChildProcess; url: string }> {
  // An IPC channel, so that the registry ends with the demo even when the demo is killed outright.
  const child = spawn(process.execPath, [cliPath, 'sample-registry', '--host', '127.0.0.1', '--port', String(port)], { stdio: ['ignore', 'pipe', 'pipe', 'ipc'] });
  return new Promise((resolve, reject) => {
    let stdout = '';
    let stderr = '';
    child.stdout?.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
      const url = /(http:\/\/127\.0\.0\.1:\d+)/.exec(stdout)?.[1];
      if (url) resolve({ child, url });
    });
    child.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.once('error', (error) => reject(new DemoStartError(`cannot start the sample registry: ${error.message}`)));
    child.once('exit', () => reject(new DemoStartError(stderr.trim().split('\n')[0] || 'the sample registry exited at start')));
  });
}

export function startDemo(options: DemoOptions): Demo {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-demo-'));
  const stops: Array<() => Promise<void>> = [];
  let stopping: Promise<void> | undefined;
  const shutdown = () =>
    (stopping ??= (async () => {
      for (const stop of stops.reverse()) await stop().catch(() => undefined);
      rmSync(dir, { recursive: true, force: true });
    })());
  /** Registers how to stop what just started; throws when the demo is being stopped meanwhile. */
  const started = <T>(value: T, stop: (value: T) => Promise<void>): T => {
    stops.push(() => stop(value));
    if (stopping) throw new DemoStartError('stopped while starting');
    return value;
  };
  const start = async () => {
    const registry = started(await startSampleRegistry(options.cliPath, options.registryPort), async ({ child }) => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    });
    const keyFile = join(dir, 'broker.key');
    const key = randomBytes(32).toString('hex');
    writeFileSync(keyFile, `${key}\n`, { mode: 0o600 });
    const configText = sampleConfigYaml({ brokerKeyFile: keyFile, upstream: registry.url, proxyPort: options.proxyPort, cachePath: join(dir, 'cache') });
    const parsed = parseConfig(configText);
    if (!parsed.ok) throw new Error(`embedded config is invalid: ${formatConfigErrors(parsed.errors)}`);
    const config = parsed.config;
    const configFile = join(dir, 'config.yaml');
    writeFileSync(configFile, configText);
    const bundle = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1', 'localhost'] });
    const caFile = join(dir, 'ca.crt');
    writeFileSync(caFile, bundle.caCert);
    const reviewFile = join(dir, 'review.json');
    writeFileSync(reviewFile, JSON.stringify(sampleAdmissionReview(NAMESPACE), null, 2));

    // Synchronous writes to a file of its own: nothing to flush when the directory is removed.
    const logFile = join(dir, 'demo.log');
    const logFd = openSync(logFile, 'a', 0o600);
    let logOpen = true;
    stops.push(async () => {
      logOpen = false;
      closeSync(logFd);
    });
    const logDestination = { write: (line: string) => void (logOpen && writeSync(logFd, line)) };
    const webhookLogger = createLogger({ name: 'pullbridge-webhook', destination: logDestination });
    const proxyLogger = createLogger({ name: 'pullbridge-proxy', destination: logDestination });

    const opsPort = options.proxyPort === 65535 ? 0 : options.proxyPort + 1;
    const ports = { '--port': options.port, '--proxy-port': options.proxyPort, '--proxy-port (+1, operations)': opsPort };
    const listening = async <T>(start: () => Promise<T>): Promise<T> => {
      try {
        return await start();
      } catch (error) {
        const line = describeListenError(error, ports);
        throw line ? new DemoStartError(line) : error;
      }
    };
    const webhook = started(await listening(() => runWebhook({ config, host: '127.0.0.1', port: options.port, tls: { cert: bundle.cert, key: bundle.key }, logger: webhookLogger })), (w) => w.shutdown());
    const proxy = started(await listening(() => runProxy({ config, configPath: configFile, host: '127.0.0.1', port: options.proxyPort, opsPort, probeIntervalMs: 30_000, logger: proxyLogger })), (p) => p.shutdown());

    const image = `${DEMO_REGISTRY}/${SAMPLE_REPOSITORY}:${SAMPLE_TAG}`;
    const rewrittenImage = decideImage(config, image, NAMESPACE).rewritten;
    if (rewrittenImage === null) throw new Error(`the demo rule does not rewrite ${image}`);
    const steps = demoSteps({
      cli: options.cliCommand,
      dir,
      configFile,
      caFile,
      reviewFile,
      webhookUrl: webhook.running.url,
      proxyAuthority: config.proxyAuthority,
      image,
      rewrittenImage,
      namespace: NAMESPACE,
      token: namespaceToken(Buffer.from(key), NAMESPACE),
      upstreamPid: registry.child.pid ?? 0,
    });
    const opsUrl = proxy.ops?.url ?? proxy.running.url;
    options.write(`
pullbridge demo — offline, on loopback; config ${configFile}
  sample registry (upstream): ${registry.url}  pid ${registry.child.pid ?? '?'}  serving ${SAMPLE_REPOSITORY}:${SAMPLE_TAG}
  rule "corp": ${DEMO_REGISTRY} -> ${registry.url}  (broker auth, node cache in ${join(dir, 'cache')})
  webhook: ${webhook.running.url}    registry proxy: ${proxy.running.url}    operations: ${opsUrl}/status ${opsUrl}/metrics

${formatDemoSteps(steps)}
Logs (JSON, the webhook's and the proxy's): ${logFile}
Ctrl-C stops the demo and removes ${dir}.
`);
  };
  const run = start().catch(async (error: unknown) => {
    await shutdown();
    throw error;
  });
  return { dir, started: run, shutdown };
}
