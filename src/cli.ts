#!/usr/bin/env node
// The one binary: `pullbridge <command> [options]`.

import { accessSync, constants, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { homedir, hostname } from 'node:os';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { filesReadBy, filesWebhookReads, formatConfigErrors, isDnsLabel, type Config, type ConfigError, type ConfigResult } from './rules/config.js';
import { decideImage, ruleByName } from './rules/decide.js';
import { unknownWithoutUpstream } from './webhook/upstreamplan.js';
import { formatBytes } from './rules/quantity.js';
import { parsePlatform, type Platform } from './cache/warmplan.js';
import { filesReadByAny, readConfigFile, unloadableFiles } from './shell/configfile.js';
import type { RegistryConnectionStatus } from './k8s/connectionstatus.js';
import { describeListenError, type PortSource } from './shell/listenerrors.js';
import { describeFileError } from './shell/secretfiles.js';
import { configWarnings, suggestKey } from './rules/lint.js';

// Each command loads only what it runs: the proxy DaemonSet runs on every node, and express,
// node-forge and the webhook code would add tens of MB to each of its processes.
const load = {
  certs: () => import('./certs/certs.js'),
  defaults: () => import('./defaults.js'),
  webhookRun: () => import('./webhook/run.js'),
  proxyRun: () => import('./proxy/run.js'),
  startupGate: () => import('./shell/startupgate.js'),
  credentials: () => import('./rules/credentials.js'),
  secretfiles: () => import('./shell/secretfiles.js'),
  nodeSetup: () => import('./shell/nodesetup.js'),
  connections: () => Promise.all([import('@kubernetes/client-node'), import('./k8s/connectionstatus.js'), import('./k8s/client.js')]),
  demo: () => import('./demo/demo.js'),
  sampleImage: () => import('./demo/sampleimage.js'),
  sampleRegistry: () => import('./demo/sampleregistry.js'),
  warm: () => Promise.all([import('./cache/warm.js'), import('./cache/nodecache.js'), import('./proxy/runtime.js'), import('./log.js'), import('./metrics.js')]),
};

/** Each command's usage, printed by `pullbridge COMMAND --help` and together by `pullbridge --help`. */
const COMMAND_USAGE: Readonly<Record<string, string>> = {
  rewrite: `pullbridge rewrite --config FILE [--namespace NS] [--json] IMAGE...
                     (prints each image's rewrite decision under the config, without a server)`,
  validate: `pullbridge validate --config FILE [--skip-files]
                     (checks the config and the files it names, as the proxy will: keys, credentials, CA
                      bundles; --skip-files where they are mounted elsewhere. Warns about rules that can never match)`,
  webhook: `pullbridge webhook --config FILE --port N [--host ADDR] [--tls-cert F --tls-key F]
                     [--kubeconfig F] [--configmap NAME] [--pull-secret-failure deny|admit-unchanged] [--webhook-timeout SECONDS]
                     [--tls-secret NAME --webhook-configuration NAME [--service NAME] [--owner-deployment NAME]]
                     [--client-ca FILE [--client-name NAME]...] [--metrics-port N]
                     [--credential-mirror SECRET --credential-sources FILE]
                     [--status-ops-port N --status-proxy-selector SELECTOR --status-proxy-daemonset NAME [--status-interval SECONDS]]
                     [--resolver-url URL]... [--resolver-ops-port N] [--resolver-deadline-ms MS]
                     (--status-*: one replica, elected with a Lease, reads the proxy Pods' /status and writes
                      the RegistryConnection objects that \`kubectl get regconn\` and \`pullbridge status\` show;
                      only Running Pods that the DaemonSet NAME controls are read.
                      --resolver-*: where admission asks about upstreams (private-only, pinDigest, verify): a
                      proxy's operations URL (repeatable, e.g. http://127.0.0.1:9090), and/or every Ready Pod
                      of --status-proxy-daemonset (--status-proxy-selector) on --resolver-ops-port; each
                      question bounded by --resolver-deadline-ms, default 2000, failover included)`,
  proxy: `pullbridge proxy --config FILE [--port N] [--host ADDR] [--ops-port N [--ops-host ADDR] [--ops-collector-host ADDR]] [--probe-interval SECONDS]
                     (--host defaults to 0.0.0.0: every address of the machine, so the registry port is
                      reachable from the network; on a laptop pass --host 127.0.0.1.
                      --ops-collector-host: the operations port also listens there, e.g. the Pod IP, for the
                      webhook: there only GET /status (status collector) and /admission/… (admission resolver),
                      each with its own bearer token, /healthz and /readyz.
                      --port defaults to the config's proxy.port, the port written into rewritten references.
                      On a loopback --host, as the chart's hostNetwork exposure runs it, it checks at start and
                      every --probe-interval that its own address is answered by itself: a NodePort Service
                      on the same port takes the address over under kube-proxy's iptables mode; then /readyz
                      fails, /status shows who answers, and pullbridge_proxy_listener_claimed is 0)`,
  'pull-secret': `pullbridge pull-secret --config FILE --namespace NS [--rule R]
                     (prints the .dockerconfigjson of the namespace's pull secret; with --rule, that of
                      the rewrite: never rule R: its upstream credential for its registry hosts)`,
  warm: `pullbridge warm --config FILE [--platform OS/ARCH[/VARIANT]]... [--json] IMAGE...
                     (fetches each image through the config's rules into the node cache (cache.path), as a
                      pull would, so that later pulls on this node are served from the cache)`,
  purge: `pullbridge purge --ops-port N [--ops-host ADDR] --rule R --repository REPO [--digest D]
                     (asks the running proxy on that node, on its operations port, to forget what REPO may read
                      from its cache through rule R: the link to D and the tags naming it, or all of REPO's)`,
  status: `pullbridge status [--kubeconfig F] [--namespace NS] [--json]
                     (the rules' connection state from the RegistryConnection objects in NS, default pullbridge:
                      exit 0 when every rule is Ready, 1 when one is not or the API cannot be read, 2 on usage error)`,
  'node-setup': `pullbridge node-setup --config FILE [--registries-dir DIR] [--once]
                     (CRI-O/podman: a registries.conf.d drop-in marking the proxy insecure, removed on exit)`,
  certs: `pullbridge certs --service S --namespace NS --out DIR [--ip ADDR]... [--dns NAME]... [--days N]
                     (a CA and a serving certificate for the webhook's Service S.NS.svc, written to DIR:
                      for webhook --tls-cert/--tls-key and the webhook configuration's caBundle)`,
  'client-cert': `pullbridge client-cert --name CN --out DIR [--dns NAME]... [--days N]
                     (a CA and a client certificate with common name CN, written to DIR: for the apiserver's
                      admission client, checked by webhook --client-ca and --client-name)`,
  keygen: `pullbridge keygen [--out FILE]
                     (a new broker key, the format broker.keyFiles reads: written to FILE with mode 0600,
                      never over an existing file, or printed. The same with openssl:
                      (umask 077; openssl rand -hex 32 > broker.key))`,
  'sample-registry': `pullbridge sample-registry [--port N] [--host ADDR]
                     (a read-only registry on 127.0.0.1:5000 by default serving one generated image,
                      demo/hello:1.0, anonymously, with no download: an upstream to try pullbridge offline)`,
  demo: `pullbridge demo [--port N] [--proxy-port N] [--registry-port N]
                     (what \`npm start\` runs, offline: the sample registry, a webhook and a proxy with a broker
                      rule and a node cache on loopback, and numbered steps to try them)`,
};

const USAGE = `pullbridge — rewrite Pod images to a node-local registry proxy

Usage:
${Object.values(COMMAND_USAGE)
  .map((text) => `  ${text}`)
  .join('\n')}
  pullbridge COMMAND --help
  pullbridge --version
`;

class UsageError extends Error {}
/** A command that cannot do its work (a port taken, a file missing): one line naming the flag or file, exit 1. */
class CommandError extends Error {}

/** Runs a server's start; a listen error becomes one line naming the flag whose port it is. */
async function listening<T>(start: () => Promise<T>, ports: Readonly<Record<string, number | PortSource | undefined>>, hosts: Readonly<Record<string, string | undefined>> = {}): Promise<T> {
  try {
    return await start();
  } catch (error) {
    const line = describeListenError(error, ports, hosts);
    throw line === null ? error : new CommandError(line);
  }
}

/** A file a flag names must be readable before a server takes it up: `--tls-cert /x: no such file`. */
function requireReadableFile(path: string, flag: string): void {
  try {
    accessSync(path, constants.R_OK);
  } catch (error) {
    throw new CommandError(`${flag} ${path}: ${describeFileError(error)}`);
  }
}

/** The content of a file a flag names, or one line naming the flag and why it cannot be read. */
function readFlagFile(path: string, flag: string): Buffer {
  try {
    return readFileSync(path);
  } catch (error) {
    throw new CommandError(`${flag} ${path}: ${describeFileError(error)}`);
  }
}

/** The webhook's certificate and key must parse and belong together: one line naming the flag, not a TLS stack trace. */
async function requireTlsPair(certFile: string, keyFile: string): Promise<void> {
  const { X509Certificate, createPrivateKey } = await import('node:crypto');
  let certificate: InstanceType<typeof X509Certificate>;
  try {
    certificate = new X509Certificate(readFlagFile(certFile, '--tls-cert'));
  } catch (error) {
    throw error instanceof CommandError ? error : new CommandError(`--tls-cert ${certFile}: not a PEM certificate`);
  }
  let key: ReturnType<typeof createPrivateKey>;
  try {
    key = createPrivateKey(readFlagFile(keyFile, '--tls-key'));
  } catch (error) {
    throw error instanceof CommandError ? error : new CommandError(`--tls-key ${keyFile}: not a PEM private key`);
  }
  if (!certificate.checkPrivateKey(key)) throw new CommandError(`--tls-key ${keyFile}: does not match --tls-cert ${certFile}`);
}

/** Unknown keys get a suggestion from the schema's known keys (did you mean ...?), in every command that reads the config. */
function withSuggestions(errors: readonly ConfigError[]): ConfigError[] {
  return errors.map((e) => {
    const suggestion = e.message === 'unknown key' ? suggestKey(e.key) : null;
    return suggestion ? { key: e.key, message: `unknown key; did you mean ${suggestion}?` } : e;
  });
}

function requireOption(value: string | undefined, flag: string): string {
  if (value === undefined || value === '') throw new UsageError(`${flag} is required`);
  return value;
}

function parsePort(value: string | undefined, flag: string): number {
  const port = Number(requireOption(value, flag));
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new UsageError(`${flag} must be a port number (0-65535), got "${value}"`);
  return port;
}

function loadConfigOrExit(path: string): Config {
  const result: ConfigResult = readConfigFile(path);
  if (!result.ok) {
    process.stderr.write(`invalid config ${path}:\n${formatConfigErrors(withSuggestions(result.errors))}\n`);
    process.exit(1);
  }
  return result.config;
}

/** Loads the files the component reads for the config (keys, credentials, CA bundles), or exits. */
function loadConfigFilesOrExit(path: string, config: Config, component: 'proxy' | 'webhook'): void {
  const errors = unloadableFiles(filesReadBy(config, component));
  if (errors.length > 0) {
    process.stderr.write(`cannot load what config ${path} names:\n${formatConfigErrors(errors)}\n`);
    process.exit(1);
  }
}

function cmdValidate(args: string[]): number {
  const { values } = parseArgs({ args, options: { config: { type: 'string' }, 'skip-files': { type: 'boolean', default: false } }, strict: true });
  const path = requireOption(values.config, '--config');
  const result = readConfigFile(path);
  if (!result.ok) {
    const errors = withSuggestions(result.errors);
    process.stderr.write(`${path}: ${errors.length} error(s)\n${formatConfigErrors(errors)}\n`);
    return 1;
  }
  // What the proxy or the webhook would refuse at start: every file the config names (keys, credentials, CA bundles, cosign keys).
  const fileErrors = values['skip-files'] ? [] : unloadableFiles(filesReadByAny(result.config));
  if (fileErrors.length > 0) {
    process.stderr.write(`${path}: ${fileErrors.length} error(s)\n${formatConfigErrors(fileErrors)}\n`);
    return 1;
  }
  for (const warning of configWarnings(result.config)) process.stderr.write(`warning: ${warning.key}: ${warning.message}\n`);
  process.stdout.write(`${path}: valid, ${result.config.registries.length} registry rule(s)\n`);
  return 0;
}

function cmdRewrite(args: string[]): number {
  const { values, positionals } = parseArgs({
    args,
    options: { config: { type: 'string' }, namespace: { type: 'string' }, json: { type: 'boolean', default: false } },
    allowPositionals: true,
    strict: true,
  });
  const config = loadConfigOrExit(requireOption(values.config, '--config'));
  if (positionals.length === 0) throw new UsageError('give at least one IMAGE');
  const decisions = positionals.map((image) => {
    const decision = decideImage(config, image, values.namespace);
    // The string alone cannot tell what a rule that asks the upstream at admission will decide.
    const rule = decision.reason === 'rewritten' && decision.rule !== null ? ruleByName(config, decision.rule) : undefined;
    const unknown = rule ? unknownWithoutUpstream(rule, image) : undefined;
    return unknown === undefined ? decision : { ...decision, detail: unknown, upstreamUnknown: true };
  });
  if (values.json) {
    process.stdout.write(`${JSON.stringify(decisions, null, 2)}\n`);
  } else {
    for (const d of decisions) {
      const outcome = d.rewritten ?? '(unchanged)';
      process.stdout.write(`${d.image} -> ${outcome}  [${d.reason}${d.rule ? `, rule ${d.rule}` : ''}${d.detail ? `: ${d.detail}` : ''}]\n`);
    }
  }
  return 0;
}

async function cmdCerts(args: string[]): Promise<number> {
  const { generateCertificates } = await load.certs();
  const { values } = parseArgs({
    args,
    options: { service: { type: 'string' }, namespace: { type: 'string' }, out: { type: 'string' }, ip: { type: 'string', multiple: true }, dns: { type: 'string', multiple: true }, days: { type: 'string' } },
    strict: true,
  });
  const service = requireOption(values.service, '--service');
  const namespace = requireOption(values.namespace, '--namespace');
  const out = requireOption(values.out, '--out');
  const days = values.days === undefined ? 365 : Number(values.days);
  if (!Number.isInteger(days) || days < 1) throw new UsageError(`--days must be a positive whole number, got "${values.days}"`);
  const bundle = generateCertificates({ service, namespace, extraNames: [...(values.ip ?? []), ...(values.dns ?? [])], validityDays: days });
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, 'ca.crt'), bundle.caCert);
  writeFileSync(join(out, 'ca.key'), bundle.caKey, { mode: 0o600 });
  writeFileSync(join(out, 'tls.crt'), bundle.cert);
  writeFileSync(join(out, 'tls.key'), bundle.key, { mode: 0o600 });
  process.stdout.write(`wrote ca.crt, ca.key, tls.crt, tls.key to ${out} (serving cert valid until ${bundle.notAfter.toISOString()})\n`);
  return 0;
}

async function cmdClientCert(args: string[]): Promise<number> {
  const { generateClientCertificate } = await load.certs();
  const { values } = parseArgs({ args, options: { name: { type: 'string' }, out: { type: 'string' }, dns: { type: 'string', multiple: true }, days: { type: 'string' } }, strict: true });
  const name = requireOption(values.name, '--name');
  const out = requireOption(values.out, '--out');
  const days = values.days === undefined ? 365 : Number(values.days);
  if (!Number.isInteger(days) || days < 1) throw new UsageError(`--days must be a positive whole number, got "${values.days}"`);
  const bundle = generateClientCertificate({ commonName: name, dnsNames: values.dns ?? [], validityDays: days });
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, 'ca.crt'), bundle.caCert);
  writeFileSync(join(out, 'ca.key'), bundle.caKey, { mode: 0o600 });
  writeFileSync(join(out, 'client.crt'), bundle.cert);
  writeFileSync(join(out, 'client.key'), bundle.key, { mode: 0o600 });
  process.stdout.write(`wrote ca.crt, ca.key, client.crt, client.key to ${out} (client cert CN=${name}, valid until ${bundle.notAfter.toISOString()})\n`);
  return 0;
}

function onTermination(stop: () => Promise<void>, signals: readonly NodeJS.Signals[] = ['SIGTERM', 'SIGINT']): void {
  let stopping = false;
  const handler = () => {
    if (stopping) return;
    stopping = true;
    void stop().then(() => process.exit(0));
  };
  for (const signal of signals) process.on(signal, handler);
}

/** The webhook's status collector settings (--status-*), or undefined when --status-ops-port is not given. */
type ProxyPodFlags = { 'status-ops-port'?: string; 'status-proxy-selector'?: string; 'status-proxy-daemonset'?: string; 'status-interval'?: string; 'resolver-ops-port'?: string };

/** The proxy Pods' selector and DaemonSet (--status-proxy-*), for the status collector and the resolver's discovery. */
function proxyPods(values: ProxyPodFlags): { proxySelector: string; proxyDaemonSet: string } {
  const proxySelector = requireOption(values['status-proxy-selector'], '--status-proxy-selector');
  const proxyDaemonSet = requireOption(values['status-proxy-daemonset'], '--status-proxy-daemonset');
  if (!/^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/.test(proxyDaemonSet)) throw new UsageError(`--status-proxy-daemonset must be a DaemonSet name, got "${proxyDaemonSet}"`);
  return { proxySelector, proxyDaemonSet };
}

/** How often the admission resolver lists the proxy Pods (a Pod gone meanwhile costs a failover). */
const RESOLVER_DISCOVERY_INTERVAL_MS = 15_000;

/** The admission resolver's settings (--resolver-*), or undefined when neither URLs nor discovery are given. */
function webhookResolver(values: ProxyPodFlags & { 'resolver-url'?: string[]; 'resolver-deadline-ms'?: string }, namespace: string, kubeconfig: string | undefined) {
  const urls = (values['resolver-url'] ?? []).map((raw) => {
    let url: URL;
    try {
      url = new URL(raw);
    } catch {
      throw new UsageError(`--resolver-url must be a URL such as http://127.0.0.1:9090, got "${raw}"`);
    }
    if (url.protocol !== 'http:' || url.pathname !== '/' || url.search !== '' || url.username !== '' || url.password !== '') throw new UsageError(`--resolver-url must be http://HOST:PORT, a proxy's operations port (no path, query or credentials), got "${raw}"`);
    return url.origin;
  });
  const deadline = values['resolver-deadline-ms'];
  if (deadline !== undefined && !(/^\d+$/.test(deadline) && Number(deadline) >= 100 && Number(deadline) <= 30_000)) throw new UsageError(`--resolver-deadline-ms must be whole milliseconds from 100 to 30000, got "${deadline}"`);
  const opsPort = values['resolver-ops-port'] === undefined ? undefined : parsePort(values['resolver-ops-port'], '--resolver-ops-port');
  if (opsPort === undefined && urls.length === 0) {
    if (deadline !== undefined) throw new UsageError('--resolver-deadline-ms needs --resolver-url or --resolver-ops-port');
    return undefined;
  }
  if (opsPort !== undefined && !kubeconfig) throw new UsageError('--resolver-ops-port finds the proxy Pods through the Kubernetes API (in a cluster, or --kubeconfig); or give --resolver-url');
  return {
    urls,
    ...(opsPort !== undefined ? { discovery: { namespace, ...proxyPods(values), opsPort, intervalMs: RESOLVER_DISCOVERY_INTERVAL_MS } } : {}),
    ...(deadline !== undefined ? { deadlineMs: Number(deadline) } : {}),
  };
}

function webhookStatusCollector(values: ProxyPodFlags, namespace: string, kubeconfig: string | undefined) {
  if (values['status-ops-port'] === undefined) {
    if (values['resolver-ops-port'] === undefined) {
      if (values['status-proxy-selector'] !== undefined) throw new UsageError('--status-proxy-selector needs --status-ops-port or --resolver-ops-port');
      if (values['status-proxy-daemonset'] !== undefined) throw new UsageError('--status-proxy-daemonset needs --status-ops-port or --resolver-ops-port');
    }
    return undefined;
  }
  const opsPort = parsePort(values['status-ops-port'], '--status-ops-port');
  const { proxySelector, proxyDaemonSet } = proxyPods(values);
  const interval = Number(values['status-interval']);
  if (!(interval > 0)) throw new UsageError(`--status-interval must be a positive number of seconds, got "${values['status-interval']}"`);
  if (!kubeconfig) throw new UsageError('--status-ops-port needs Kubernetes API access (in a cluster, or --kubeconfig)');
  // The chart sets POD_NAME (downward API): the Lease names the replica that collects.
  return { namespace, proxySelector, proxyDaemonSet, opsPort, intervalMs: interval * 1000, identity: process.env['POD_NAME'] ?? `${hostname()}-${process.pid}` };
}

async function cmdWebhook(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      config: { type: 'string' },
      port: { type: 'string' },
      host: { type: 'string', default: '0.0.0.0' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      kubeconfig: { type: 'string' },
      configmap: { type: 'string' },
      'pull-secret-failure': { type: 'string', default: 'deny' },
      'tls-secret': { type: 'string' },
      'webhook-configuration': { type: 'string' },
      'owner-deployment': { type: 'string' },
      service: { type: 'string', default: 'pullbridge-webhook' },
      'client-ca': { type: 'string' },
      'client-name': { type: 'string', multiple: true },
      'metrics-port': { type: 'string' },
      'credential-mirror': { type: 'string' },
      'credential-sources': { type: 'string' },
      'status-ops-port': { type: 'string' },
      'status-proxy-selector': { type: 'string' },
      'status-proxy-daemonset': { type: 'string' },
      'status-interval': { type: 'string', default: '30' },
      'resolver-url': { type: 'string', multiple: true },
      'resolver-ops-port': { type: 'string' },
      'resolver-deadline-ms': { type: 'string' },
      'webhook-timeout': { type: 'string', default: '5' },
    },
    strict: true,
  });
  const configPath = requireOption(values.config, '--config');
  const config = loadConfigOrExit(configPath);
  const port = parsePort(values.port, '--port');
  const webhookTimeout = Number(values['webhook-timeout']);
  // The apiserver allows 1 to 30 seconds (timeoutSeconds).
  if (!Number.isInteger(webhookTimeout) || webhookTimeout < 1 || webhookTimeout > 30) throw new UsageError(`--webhook-timeout must be the webhook's timeoutSeconds, a whole number from 1 to 30, got "${values['webhook-timeout']}"`);
  const mirrorSecret = values['credential-mirror'];
  const credentialSources = values['credential-sources'];
  if ((mirrorSecret === undefined) !== (credentialSources === undefined)) throw new UsageError('--credential-mirror and --credential-sources go together');
  const certFile = values['tls-cert'];
  const keyFile = values['tls-key'];
  if ((certFile === undefined) !== (keyFile === undefined)) throw new UsageError('--tls-cert and --tls-key go together');
  if (certFile !== undefined && keyFile !== undefined) await requireTlsPair(certFile, keyFile);
  if (values.kubeconfig !== undefined) readFlagFile(values.kubeconfig, '--kubeconfig');
  const failure = values['pull-secret-failure'];
  if (failure !== 'deny' && failure !== 'admit-unchanged') throw new UsageError('--pull-secret-failure must be deny or admit-unchanged');
  const kubeconfig = values.kubeconfig ?? (process.env.KUBERNETES_SERVICE_HOST ? 'in-cluster' : undefined);
  const namespace = process.env.POD_NAMESPACE ?? config.webhook.namespace;
  const tlsSecret = values['tls-secret'];
  const webhookConfiguration = values['webhook-configuration'];
  if (tlsSecret && certFile) throw new UsageError('--tls-secret (certificate bootstrap) and --tls-cert/--tls-key exclude each other');
  if (tlsSecret && !webhookConfiguration) throw new UsageError('--tls-secret needs --webhook-configuration, whose caBundle it maintains');
  if (values['owner-deployment'] && !tlsSecret) throw new UsageError('--owner-deployment names the owner of the --tls-secret Secret');
  const clientCa = values['client-ca'];
  const clientNames = values['client-name'];
  if (clientCa !== undefined) requireReadableFile(clientCa, '--client-ca');
  if (clientCa && !certFile && !tlsSecret) throw new UsageError('--client-ca needs HTTPS: --tls-cert/--tls-key or --tls-secret');
  if (clientNames && !clientCa) throw new UsageError('--client-name needs --client-ca');
  const metricsPort = values['metrics-port'] === undefined ? undefined : parsePort(values['metrics-port'], '--metrics-port');
  const statusCollector = webhookStatusCollector(values, namespace, kubeconfig);
  const resolver = webhookResolver(values, namespace, kubeconfig);
  // What it reads, with or without API access: the cosign keys; the broker key for pull secrets and the resolver token.
  const webhookFileErrors = unloadableFiles(filesWebhookReads(config, { pullSecrets: kubeconfig !== undefined, resolver: resolver !== undefined }));
  if (webhookFileErrors.length > 0) {
    process.stderr.write(`cannot load what config ${configPath} names:\n${formatConfigErrors(webhookFileErrors)}\n`);
    return 1;
  }
  // The metrics port answers the startup probe before the webhook's modules load.
  const { listenGated, PROBE_PORT_MAX_CONNECTIONS, PROBE_PORT_MAX_CONNECTIONS_PER_SOURCE } = await load.startupGate();
  const metricsListener = metricsPort !== undefined ? await listening(() => listenGated({ host: values.host, port: metricsPort, maxConnections: PROBE_PORT_MAX_CONNECTIONS, maxConnectionsPerSource: PROBE_PORT_MAX_CONNECTIONS_PER_SOURCE }), { '--metrics-port': metricsPort }) : undefined;
  const { runWebhook } = await load.webhookRun();
  const run = await listening(() => runWebhook({
    config,
    configPath,
    host: values.host,
    port,
    ...(certFile && keyFile ? { tlsFiles: { cert: certFile, key: keyFile } } : {}),
    ...(tlsSecret && webhookConfiguration ? { tlsBootstrap: { secretName: tlsSecret, service: values.service, webhookConfiguration, namespace, ...(values['owner-deployment'] ? { ownerDeployment: values['owner-deployment'] } : {}) } } : {}),
    ...(kubeconfig ? { kubeconfig } : {}),
    ...(values.configmap ? { configMap: { name: values.configmap, namespace } } : {}),
    pullSecretFailure: failure,
    webhookTimeoutSeconds: webhookTimeout,
    ...(clientCa ? { clientAuth: { caFile: clientCa, ...(clientNames ? { allowedNames: clientNames } : {}) } } : {}),
    ...(metricsPort !== undefined ? { metricsPort } : {}),
    ...(metricsListener ? { metricsListener } : {}),
    ...(mirrorSecret && credentialSources ? { credentialMirror: { secret: mirrorSecret, sourcesPath: credentialSources, namespace } } : {}),
    ...(statusCollector ? { statusCollector } : {}),
    ...(resolver ? { resolver } : {}),
  }), { '--port': port, '--metrics-port': metricsPort }, { '--host': values.host });
  onTermination(() => run.shutdown());
  return -1; // keeps running
}

async function cmdProxy(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: { config: { type: 'string' }, port: { type: 'string' }, host: { type: 'string', default: '0.0.0.0' }, 'ops-port': { type: 'string' }, 'ops-host': { type: 'string' }, 'ops-collector-host': { type: 'string' }, 'probe-interval': { type: 'string', default: '30' } },
    strict: true,
  });
  const configPath = requireOption(values.config, '--config');
  const config = loadConfigOrExit(configPath);
  loadConfigFilesOrExit(configPath, config, 'proxy');
  for (const warning of configWarnings(config)) process.stderr.write(`warning: ${warning.key}: ${warning.message}\n`);
  // Without --port: the port rewritten references name (hostNetwork, a laptop).
  const port = values.port === undefined ? config.proxy.port : parsePort(values.port, '--port');
  const opsPort = values['ops-port'] === undefined ? undefined : parsePort(values['ops-port'], '--ops-port');
  if (opsPort !== undefined && opsPort === port) throw new UsageError('--ops-port must differ from --port');
  const collectorHost = values['ops-collector-host'];
  if (collectorHost !== undefined && opsPort === undefined) throw new UsageError('--ops-collector-host needs --ops-port (it listens on that port)');
  const interval = Number(values['probe-interval']);
  if (!(interval > 0)) throw new UsageError('--probe-interval must be a positive number of seconds');
  // The operations port answers the startup probe before the proxy's modules load (a second on a busy node).
  const { listenGated, PROBE_PORT_MAX_CONNECTIONS, PROBE_PORT_MAX_CONNECTIONS_PER_SOURCE } = await load.startupGate();
  const opsListener = opsPort !== undefined ? await listening(() => listenGated({ host: values['ops-host'] ?? values.host, port: opsPort, maxConnections: PROBE_PORT_MAX_CONNECTIONS, maxConnectionsPerSource: PROBE_PORT_MAX_CONNECTIONS_PER_SOURCE }), { '--ops-port': opsPort }, values['ops-host'] !== undefined ? { '--ops-host': values['ops-host'] } : { '--host': values.host }) : undefined;
  const { runProxy } = await load.proxyRun();
  const run = await listening(() => runProxy({
    config,
    configPath,
    host: values.host,
    port,
    ...(opsPort !== undefined ? { opsPort } : {}),
    ...(opsListener ? { opsListener } : {}),
    ...(values['ops-host'] !== undefined ? { opsHost: values['ops-host'] } : {}),
    ...(collectorHost !== undefined ? { opsCollectorHost: collectorHost } : {}),
    // The chart sets NODE_NAME to the Node's name (downward API): shared-tier claims say which node fetches.
    ...(process.env['NODE_NAME'] ? { nodeName: process.env['NODE_NAME'] } : {}),
    probeIntervalMs: interval * 1000,
  }), { '--port': values.port === undefined ? { port, described: `proxy.port ${port} from ${configPath} (override with --port)` } : port, '--ops-port': opsPort }, { '--host': values.host });
  onTermination(() => run.shutdown());
  return -1;
}

async function cmdPullSecret(args: string[]): Promise<number> {
  const [{ dockerConfigJson }, { BrokerKeys }] = await Promise.all([load.credentials(), load.secretfiles()]);
  const { values } = parseArgs({ args, options: { config: { type: 'string' }, namespace: { type: 'string' }, rule: { type: 'string' } }, strict: true });
  const configPath = requireOption(values.config, '--config');
  const config = loadConfigOrExit(configPath);
  const namespace = requireOption(values.namespace, '--namespace');
  if (!isDnsLabel(namespace)) throw new UsageError(`--namespace must be a namespace name, got "${namespace}"`);
  if (values.rule !== undefined) {
    const rule = config.registries.find((r) => r.name === values.rule);
    if (rule === undefined) throw new UsageError(`--rule: no rule "${values.rule}" in ${configPath}`);
    if (rule.rewrite !== 'never') throw new UsageError(`--rule: rule "${rule.name}" has rewrite: ${rule.rewrite}; only a rewrite: never rule has a pull secret of its own`);
    if (rule.namespaceFilter.refuse(namespace) !== null) {
      process.stderr.write(`rule "${rule.name}" does not admit namespace "${namespace}": the webhook provisions no pull secret of it there\n`);
      return 1;
    }
    loadConfigFilesOrExit(configPath, config, 'webhook'); // the rule's credential files, as the webhook reads them
    const [{ upstreamDockerConfigJson }, { RuleCredentialFiles }] = await Promise.all([import('./rules/upstreamsecret.js'), load.secretfiles()]);
    process.stdout.write(`${upstreamDockerConfigJson(rule, new RuleCredentialFiles().read(rule))}\n`);
    return 0;
  }
  if (!config.broker) {
    process.stderr.write('the config has no broker.keyFiles: there is no namespace credential to provision\n');
    return 1;
  }
  loadConfigFilesOrExit(configPath, config, 'webhook'); // reads what the webhook signs with
  process.stdout.write(`${dockerConfigJson(config.proxyAuthority, namespace, new BrokerKeys(config.broker.keyFiles).signingKey())}\n`);
  return 0;
}

/** Fills the node cache at the config's cache.path with images, in this process; a running proxy
 * on the same path serves what it stored. */
async function cmdWarm(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    options: { config: { type: 'string' }, platform: { type: 'string', multiple: true }, json: { type: 'boolean', default: false } },
    allowPositionals: true,
    strict: true,
  });
  const configPath = requireOption(values.config, '--config');
  const config = loadConfigOrExit(configPath);
  if (positionals.length === 0) throw new UsageError('give at least one IMAGE');
  const platforms: Platform[] = [];
  for (const text of values.platform ?? []) {
    const parsed = parsePlatform(text);
    if (!parsed.ok) throw new UsageError(`--platform: ${parsed.error}`);
    platforms.push(parsed.platform);
  }
  if (!config.cache) {
    process.stderr.write(`config ${configPath} has no cache (cache.path): there is no node cache to warm\n`);
    return 1;
  }
  loadConfigFilesOrExit(configPath, config, 'proxy'); // the rules' upstream credentials and CA bundles
  const [{ warmImages }, { NodeCache }, { createProxyRuntime }, { createLogger }, { createMetricsRegistry }] = await load.warm();
  // Logs go to stderr: stdout is the report.
  const logger = createLogger({ name: 'pullbridge-warm', destination: process.stderr });
  // A proxy may be running on the same store: its fills in progress (tmp/) are left alone.
  const cache = await NodeCache.open(config.cache, createMetricsRegistry(false), logger, Date.now, { removePartialFills: false });
  const runtime = createProxyRuntime(config, {}, undefined, cache);
  const abort = new AbortController();
  const stop = () => abort.abort();
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  const report = await warmImages({ content: runtime.content, rules: runtime.rules, config, images: positionals, platforms, signal: abort.signal }).finally(async () => {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    await runtime.close();
    await cache.close();
  });
  if (values.json) {
    process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  } else {
    for (const r of report.images) {
      if (r.status === 'skipped' || r.reason !== undefined) {
        process.stdout.write(`${r.image} -> ${r.status}  [${r.reason ?? ''}${r.detail ? `: ${r.detail}` : ''}]\n`);
        continue;
      }
      const where = `rule ${r.rule}, ${r.repository}@${r.digest ?? r.reference}`;
      const platformsText = r.platforms.length > 0 ? `, ${r.platforms.join(' ')}` : '';
      const counts = `${r.manifests.count} manifest(s), ${r.blobs.count} blob(s) ${formatBytes(r.blobs.bytes)}: ${r.blobs.cached} already cached, ${r.blobs.filled} filled`;
      process.stdout.write(`${r.image} -> ${r.status}  [${where}${platformsText}; ${counts}]\n`);
      for (const error of r.errors) process.stdout.write(`    error: ${error}\n`);
    }
  }
  return report.ok ? 0 : 1;
}

/**
 * Asks a running proxy (its operations port, where `POST /purge` is served: never the registry port)
 * to forget what a repository may read from its node cache; prints what it removed.
 */
async function cmdPurge(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: { 'ops-port': { type: 'string' }, 'ops-host': { type: 'string', default: '127.0.0.1' }, rule: { type: 'string' }, repository: { type: 'string' }, digest: { type: 'string' } },
    strict: true,
  });
  const port = parsePort(values['ops-port'], '--ops-port');
  const query = new URLSearchParams({ rule: requireOption(values.rule, '--rule'), repository: requireOption(values.repository, '--repository') });
  if (values.digest !== undefined) query.set('digest', requireOption(values.digest, '--digest'));
  const host = values['ops-host'].includes(':') ? `[${values['ops-host']}]` : values['ops-host'];
  const url = `http://${host}:${port}/purge?${query.toString()}`;
  let res: Response;
  try {
    res = await fetch(url, { method: 'POST', signal: AbortSignal.timeout(60_000) });
  } catch (error) {
    const cause = (error as { cause?: { code?: string } }).cause?.code ?? (error as Error).message;
    process.stderr.write(`pullbridge purge: cannot reach the proxy's operations port at ${host}:${port} (--ops-host, --ops-port): ${cause}\n`);
    return 1;
  }
  const text = await res.text();
  let body: { error?: unknown; links?: unknown; tags?: unknown };
  try {
    body = JSON.parse(text) as typeof body;
  } catch {
    process.stderr.write(`pullbridge purge: ${host}:${port} answered ${res.status}, not a proxy's operations port? (--ops-port)\n`);
    return 1;
  }
  if (!res.ok) {
    process.stderr.write(`pullbridge purge: ${String(body.error ?? `HTTP ${res.status}`)}\n`);
    return 1;
  }
  process.stdout.write(`rule ${values.rule}, ${values.repository}${values.digest ? `@${values.digest}` : ''}: ${String(body.links)} link(s) and ${String(body.tags)} tag record(s) removed on this node and from the shared tier\n`);
  return 0;
}

/** Prints the RegistryConnection objects (what the webhook's status collector wrote) as a table. */
async function cmdStatus(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { kubeconfig: { type: 'string' }, namespace: { type: 'string', default: 'pullbridge' }, json: { type: 'boolean', default: false } }, strict: true });
  const namespace = values.namespace;
  if (!isDnsLabel(namespace)) throw new UsageError(`--namespace must be a namespace name, got "${namespace}"`);
  const [{ CustomObjectsApi, KubeConfig }, connections, { apiMessage, apiStatus }] = await load.connections();
  const kc = new KubeConfig();
  try {
    if (values.kubeconfig !== undefined) kc.loadFromFile(requireOption(values.kubeconfig, '--kubeconfig'));
    else if (!process.env.KUBECONFIG && !process.env.KUBERNETES_SERVICE_HOST && !existsSync(join(homedir(), '.kube', 'config'))) {
      // The client's last resort is http://localhost:8080, whose refusal would hide what is missing.
      process.stderr.write('pullbridge status: no kubeconfig found (KUBECONFIG is not set, there is no ~/.kube/config, and this is not a Pod): pass --kubeconfig FILE\n');
      return 1;
    } else kc.loadFromDefault();
  } catch (error) {
    process.stderr.write(`pullbridge status: cannot load the kubeconfig ${values.kubeconfig ?? process.env.KUBECONFIG ?? '~/.kube/config'} (--kubeconfig): ${(error as NodeJS.ErrnoException).code !== undefined ? describeFileError(error) : (error as Error).message.split('\n')[0]}\n`);
    return 1;
  }
  const cluster = kc.getCurrentCluster();
  if (cluster === null) {
    process.stderr.write(`pullbridge status: the kubeconfig ${values.kubeconfig ?? process.env.KUBECONFIG ?? '~/.kube/config'} has no current cluster (set current-context, or pass --kubeconfig)\n`);
    return 1;
  }
  const server = cluster.server;
  let listed: { items?: Array<{ metadata?: { name?: string }; status?: Partial<RegistryConnectionStatus> }> };
  try {
    listed = (await kc.makeApiClient(CustomObjectsApi).listNamespacedCustomObject({ group: connections.CONNECTION_GROUP, version: connections.CONNECTION_VERSION, namespace, plural: connections.CONNECTION_PLURAL })) as typeof listed;
  } catch (error) {
    const status = apiStatus(error);
    const cause = (error as { cause?: { code?: string } }).cause?.code ?? (error as { code?: unknown }).code;
    const message =
      status === 404
        ? `the RegistryConnection resource (${connections.CONNECTION_PLURAL}.${connections.CONNECTION_GROUP}) is not installed at ${server}: install or upgrade the pullbridge chart`
        : status !== undefined
          ? `cannot list ${connections.CONNECTION_PLURAL} in namespace ${namespace} at ${server}: ${apiMessage(error)}`
          : `cannot reach the Kubernetes API at ${server}: ${typeof cause === 'string' ? cause : (error as Error).message}`;
    process.stderr.write(`pullbridge status: ${message}\n`);
    return 1;
  }
  const objects = (listed.items ?? []).map((o) => ({ name: o.metadata?.name ?? '', ...(o.status ? { status: o.status } : {}) }));
  if (values.json) process.stdout.write(`${JSON.stringify(objects, null, 2)}\n`);
  else if (objects.length === 0) process.stdout.write(`no RegistryConnection objects in namespace ${namespace}: is the chart installed there with status.enabled, and its webhook running?\n`);
  else process.stdout.write(connections.formatConnectionTable(objects));
  return connections.allReady(objects) ? 0 : 1;
}

/**
 * Installs the registries.conf.d drop-in for the proxy's address and, unless --once, keeps it until
 * SIGTERM/SIGINT (the chart's node-setup DaemonSet Pod ending: uninstall), then removes it.
 */
async function cmdNodeSetup(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { config: { type: 'string' }, 'registries-dir': { type: 'string', default: '/etc/containers/registries.conf.d' }, once: { type: 'boolean', default: false } }, strict: true });
  const config = loadConfigOrExit(requireOption(values.config, '--config'));
  const dir = requireOption(values['registries-dir'], '--registries-dir');
  const { installDropIn, removeDropIn } = await load.nodeSetup();
  const path = installDropIn(dir, config.proxyAuthority);
  process.stdout.write(`${path}: ${config.proxyAuthority} marked insecure (plain HTTP) for containers/image runtimes; CRI-O reads it on SIGHUP (systemctl reload crio)\n`);
  if (values.once) return 0;
  setInterval(() => undefined, 2 ** 30); // nothing else keeps the process alive until it is stopped
  onTermination(async () => {
    removeDropIn(dir);
    process.stdout.write(`${path} removed\n`);
  });
  return -1;
}

/** A path as a shell word: quoted only where it needs to be. */
const shellQuote = (word: string): string => (/^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`);

async function cmdDemo(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { port: { type: 'string', default: '8443' }, 'proxy-port': { type: 'string', default: '30500' }, 'registry-port': { type: 'string', default: '0' } }, strict: true });
  const port = parsePort(values.port, '--port');
  const proxyPort = parsePort(values['proxy-port'], '--proxy-port');
  if (proxyPort === 0) throw new UsageError('--proxy-port must be a fixed port: rewritten references name it');
  const registryPort = parsePort(values['registry-port'], '--registry-port');
  const { startDemo, DemoStartError } = await load.demo();
  const demo = startDemo({ port, proxyPort, registryPort, cliPath: fileURLToPath(import.meta.url), cliCommand: `node ${shellQuote(fileURLToPath(import.meta.url))}`, write: (text) => process.stdout.write(text) });
  // At once: a signal while it starts must remove its directory (a broker key) too. SIGHUP: the
  // terminal it runs in was closed.
  onTermination(() => demo.shutdown(), ['SIGTERM', 'SIGINT', 'SIGHUP']);
  try {
    await demo.started;
  } catch (error) {
    if (error instanceof DemoStartError) throw new CommandError(error.message);
    throw error;
  }
  return -1;
}

/** A read-only registry serving the generated sample image (the demo's and the quick start's upstream). */
async function cmdSampleRegistry(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { port: { type: 'string', default: '5000' }, host: { type: 'string', default: '127.0.0.1' } }, strict: true });
  const port = parsePort(values.port, '--port');
  const [{ buildSampleImage }, { serveSampleRegistry }] = await Promise.all([load.sampleImage(), load.sampleRegistry()]);
  const image = buildSampleImage();
  const server = await listening(() => serveSampleRegistry(image, values.host, port), { '--port': port });
  // Started by the demo (an IPC channel): ends with it, even when the demo is killed outright.
  if (process.connected) process.once('disconnect', () => void server.close().then(() => process.exit(0)));
  process.stdout.write(`sample registry: ${server.url} serving ${image.repository}:${image.tag} (${image.manifest.digest}), read-only, anonymous\n`);
  onTermination(() => server.close());
  return -1;
}

/** A new broker key: 32 random bytes, hex (64 characters), as broker.keyFiles reads it. */
async function cmdKeygen(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { out: { type: 'string' } }, strict: true });
  const { randomBytes } = await import('node:crypto');
  const key = `${randomBytes(32).toString('hex')}\n`;
  if (values.out === undefined) {
    process.stdout.write(key);
    return 0;
  }
  const out = requireOption(values.out, '--out');
  if (existsSync(out)) throw new CommandError(`--out ${out}: already exists; not overwriting a key (remove it first, or rotate with a second keyFiles entry)`);
  try {
    // wx: fails rather than follows or overwrites whatever appeared since the check.
    writeFileSync(out, key, { mode: 0o600, flag: 'wx' });
  } catch (error) {
    throw new CommandError(`--out ${out}: ${describeFileError(error)}`);
  }
  process.stdout.write(`wrote a new broker key to ${out} (mode 0600); name it in broker.keyFiles\n`);
  return 0;
}

/** The package's version, from the package.json beside dist/. */
function packageVersion(): string {
  const manifest = JSON.parse(readFileSync(fileURLToPath(new URL('../../package.json', import.meta.url)), 'utf8')) as { version?: string };
  return manifest.version ?? 'unknown';
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...args] = argv;
  if (command === '--version' || command === '-V' || command === 'version') {
    process.stdout.write(`pullbridge ${packageVersion()}\n`);
    return 0;
  }
  if (command !== undefined && COMMAND_USAGE[command] !== undefined && (args.includes('--help') || args.includes('-h'))) {
    process.stdout.write(`Usage:\n  ${COMMAND_USAGE[command]}\n`);
    return 0;
  }
  try {
    switch (command) {
      case 'validate':
        return cmdValidate(args);
      case 'rewrite':
        return cmdRewrite(args);
      case 'certs':
        return await cmdCerts(args);
      case 'client-cert':
        return await cmdClientCert(args);
      case 'webhook':
        return await cmdWebhook(args);
      case 'proxy':
        return await cmdProxy(args);
      case 'pull-secret':
        return await cmdPullSecret(args);
      case 'warm':
        return await cmdWarm(args);
      case 'purge':
        return await cmdPurge(args);
      case 'node-setup':
        return await cmdNodeSetup(args);
      case 'status':
        return await cmdStatus(args);
      case 'demo':
        return await cmdDemo(args);
      case 'sample-registry':
        return await cmdSampleRegistry(args);
      case 'keygen':
        return await cmdKeygen(args);
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        process.stdout.write(USAGE);
        return command === undefined ? 2 : 0;
      default:
        throw new UsageError(`unknown command "${command}"`);
    }
  } catch (error) {
    if (error instanceof UsageError || (error as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      // The command's own usage; all of them only when the command itself is unknown.
      const usage = command !== undefined && COMMAND_USAGE[command] !== undefined ? `Usage:\n  ${COMMAND_USAGE[command]}\n  (pullbridge --help lists every command)\n` : USAGE;
      process.stderr.write(`pullbridge${command !== undefined && COMMAND_USAGE[command] !== undefined ? ` ${command}` : ''}: ${(error as Error).message}\n\n${usage}`);
      return 2;
    }
    if (error instanceof CommandError) {
      process.stderr.write(`pullbridge ${command}: ${error.message}\n`);
      // Exit now: a server that did start (the other port) would keep the process alive.
      process.exit(1);
    }
    throw error;
  }
}

const code = await main(process.argv.slice(2));
if (code >= 0) process.exitCode = code;
