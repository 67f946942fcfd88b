// The webhook process: server, live config, and — with API access — pull secrets, namespace
// opt-out and events. Everything here is wiring.

import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import https from 'node:https';
import type { V1OwnerReference } from '@kubernetes/client-node';
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import { createLogger, type Logger } from '../log.js';
import { createMetricsRegistry } from '../metrics.js';
import { filesWebhookReads, type Config, type ConfigError } from '../rules/config.js';
import type { RegistryView } from '../rules/registryview.js';
import { unloadableFiles } from '../shell/configfile.js';
import { ConfigWatcher } from '../shell/configwatch.js';
import { listen, type RunningServer, type TlsFiles } from '../shell/serve.js';
import { BrokerKeys, RuleCredentialFiles } from '../shell/secretfiles.js';
import { listenGated, PROBE_PORT_MAX_CONNECTIONS, PROBE_PORT_MAX_CONNECTIONS_PER_SOURCE, serveGated, type GatedListener } from '../shell/startupgate.js';
import { createMetricsHandler, createWebhookApp, DEFAULT_WEBHOOK_TIMEOUT_SECONDS, type WebhookSideEffects } from './server.js';
import { budgetFor, type ReplicaSetPinsReader, type SignatureCheck } from './upstream.js';
import { rulesAskingUpstream } from './upstreamplan.js';

export interface WebhookRunOptions {
  readonly config: Config;
  /** The mounted config file to watch for changes; none for a fixed config. */
  readonly configPath?: string;
  readonly host: string;
  readonly port: number;
  readonly tls?: TlsFiles;
  /** TLS files to serve from and re-read periodically (cert-manager rotates them in place). */
  readonly tlsFiles?: { readonly cert: string; readonly key: string };
  /** Without cert-manager: keep the serving certificate in this Secret and inject its CA. */
  readonly tlsBootstrap?: { readonly secretName: string; readonly service: string; readonly webhookConfiguration: string; readonly namespace: string; readonly validityDays?: number; readonly extraNames?: readonly string[]; /** The Deployment that owns the Secret (deleted with it). */ readonly ownerDeployment?: string };
  /** Kubernetes access: a kubeconfig path, 'in-cluster', or undefined for none (local use). */
  readonly kubeconfig?: string;
  /** Where events about the config go: the ConfigMap and the webhook's own namespace. */
  readonly configMap?: { name: string; namespace: string };
  readonly pullSecretFailure?: 'deny' | 'admit-unchanged';
  readonly reconcileIntervalMs?: number;
  /** How long a pull secret is kept without Pods after the last admission that needed it (default
   * 10 minutes). Admissions record themselves on the Secret, and confirmations of it expire, every
   * quarter of this (at most a minute). */
  readonly reconcileGraceMs?: number;
  /** How often the TLS files (serving certificate, client CA) are re-read; default 1 hour. */
  readonly tlsRefreshMs?: number;
  /**
   * Accept POST /mutate only from callers presenting a client certificate signed by the CA in
   * `caFile` (the kube-apiserver, configured with an AdmissionConfiguration), and whose CN or a DNS
   * SAN is in `allowedNames` when that is given.
   */
  readonly clientAuth?: { readonly caFile: string; readonly allowedNames?: readonly string[] };
  /** Also serve GET /metrics over plain HTTP on this port (same host), for Prometheus, and
   * GET /startupz for the startup probe. */
  readonly metricsPort?: number;
  /** That port, already listening (the caller opened it before loading this module). */
  readonly metricsListener?: GatedListener;
  /** With API access: copy the upstream credentials of rules with a credentialsSecret into this
   * Secret, which the proxies mount (see k8s/credentialmirror.ts). */
  readonly credentialMirror?: { readonly secret: string; readonly sourcesPath: string; readonly namespace: string };
  /** Where logs and audit records go; stdout when absent. */
  readonly logger?: Logger;
  /**
   * Collect the proxies' /status into RegistryConnection objects (needs API access and a broker key):
   * one replica at a time, elected with a Lease in `namespace` (src/k8s/connections.ts).
   */
  readonly statusCollector?: { readonly namespace: string; readonly proxySelector: string; readonly proxyDaemonSet: string; readonly opsPort: number; readonly intervalMs: number; readonly identity: string };
  /**
   * Where admission asks about upstreams (the proxies' admission endpoints, src/webhook/proxytier.ts):
   * fixed operations URLs, or the proxy DaemonSet's Ready Pods (needs API access). Needs a broker key.
   */
  readonly resolver?: {
    readonly urls?: readonly string[];
    readonly discovery?: { readonly namespace: string; readonly proxySelector: string; readonly proxyDaemonSet: string; readonly opsPort: number; readonly intervalMs: number };
    /** One question's deadline (DEFAULT_RESOLVER_DEADLINE_MS). */
    readonly deadlineMs?: number;
  };
  /**
   * The apiserver's timeoutSeconds for this webhook (the chart's webhook.timeoutSeconds): the upstream
   * questions of one review share a budget that fits inside it (budgetFor). Default 5.
   */
  readonly webhookTimeoutSeconds?: number;
  /** The proxy tier as rules with rewrite: private-only, pinDigest or verify ask it, and the signature verifier. */
  readonly upstream?: { readonly view?: RegistryView; readonly signatureCheck?: SignatureCheck };
}

export interface WebhookProcess {
  readonly running: RunningServer;
  /** The metrics listener, with `metricsPort`. */
  readonly metricsServer: RunningServer | undefined;
  readonly watcher: ConfigWatcher | undefined;
  /** Runs the pull secret reconciler once now (it also runs on its timer); undefined without API access. */
  readonly reconcile: (() => Promise<unknown>) | undefined;
  readonly metrics: Registry;
  /** What admission asks about upstreams, cached; undefined without `resolver`. */
  readonly registryView: RegistryView | undefined;
  shutdown(): Promise<void>;
}

/** A PEM certificate's notAfter in Unix seconds; 0 when it cannot be read. */
function certificateExpiry(pem: string): number {
  try {
    return Math.floor(Date.parse(new X509Certificate(pem).validTo) / 1000);
  } catch {
    return 0;
  }
}

export async function runWebhook(options: WebhookRunOptions): Promise<WebhookProcess> {
  if (options.clientAuth && !options.tls && !options.tlsFiles && !options.tlsBootstrap) throw new Error('client certificates need HTTPS: give a serving certificate (or certificate bootstrap)');
  const logger = options.logger ?? createLogger({ name: 'pullbridge-webhook' });
  const metrics = createMetricsRegistry();
  let draining = false;
  let config = options.config;
  const stops: Array<() => void> = [];
  const stopsAsync: Array<() => Promise<void>> = [];
  let reconcile: (() => Promise<unknown>) | undefined;
  /** What follows the config in force (the pull secret watches follow the rules' names). */
  const afterConfigApplied: Array<() => void> = [];
  // The metrics port listens before the start work (API clients, the certificate bootstrap), so
  // that the startup probe on it is answered from the first instant (shell/startupgate.ts).
  const gated = options.metricsListener ?? (options.metricsPort !== undefined ? await listenGated({ host: options.host, port: options.metricsPort, maxConnections: PROBE_PORT_MAX_CONNECTIONS, maxConnectionsPerSource: PROBE_PORT_MAX_CONNECTIONS_PER_SOURCE }) : undefined);
  const metricsServer = gated?.server;

  // Keys follow the live config, so that a rotation is a config change; without broker keys only
  // the pull secrets of rewrite: never rules are provisioned (nothing asks for the broker's), and
  // neither the status collector nor the admission resolver has a token.
  let keys = new BrokerKeys(config.broker?.keyFiles ?? []);
  let keyFiles = (config.broker?.keyFiles ?? []).join('\n');
  const signingKey = (): Uint8Array => {
    const current = config.broker?.keyFiles ?? [];
    if (current.join('\n') !== keyFiles) {
      keys = new BrokerKeys(current);
      keyFiles = current.join('\n');
    }
    return keys.signingKey();
  };

  const k8s = options.kubeconfig !== undefined ? (await import('../k8s/client.js')).kubeClients(options.kubeconfig === 'in-cluster' ? undefined : options.kubeconfig) : undefined;
  let onRejected: ((message: string) => void) | undefined;
  // A new config is taken up only once the files it has the webhook read load: the signing key, the
  // cosign keys, and the upstream credentials of rewrite: never rules (only those reach the webhook).
  // With or without API access: a reload naming a missing cosign key would deny every image of its rule.
  const loadErrors = (next: Config): readonly ConfigError[] => unloadableFiles(filesWebhookReads(next, { pullSecrets: options.kubeconfig !== undefined, resolver: options.resolver !== undefined }));
  const sideEffects: WebhookSideEffects = {};
  let replicaSetPins: ReplicaSetPinsReader | undefined;
  if (k8s) {
    const [{ MAX_RECHECK_MS, PullSecretProvisioner, watchPullSecrets }, { DEFAULT_GRACE_MS, PullSecretReconciler, managedSecrets }, { NamespaceLabels }, { recordWarning }] = await Promise.all([
      import('../k8s/pullsecret.js'),
      import('../k8s/reconciler.js'),
      import('../k8s/namespaces.js'),
      import('../k8s/events.js'),
    ]);
    const labels = new NamespaceLabels(k8s.core, logger);
    sideEffects.namespaceLabels = (ns) => labels.get(ns);
    const credentials = new RuleCredentialFiles();
    const graceMs = options.reconcileGraceMs ?? DEFAULT_GRACE_MS;
    // Well inside the grace, so that a recorded admission is never older than the grace allows.
    const provisioner = new PullSecretProvisioner(k8s.core, () => config, signingKey, { recheckMs: Math.min(MAX_RECHECK_MS, graceMs / 4), upstreamCredential: (rule) => credentials.read(rule) });
    sideEffects.ensurePullSecret = (ns, name) => provisioner.ensure(ns, name);
    // The broker's name is watched whether or not the config has keys, as before; and each never rule's.
    const watch = watchPullSecrets(k8s.config, () => [config.webhook.pullSecretName, ...managedSecrets(config).map((s) => s.name)], provisioner, logger);
    afterConfigApplied.push(() => watch.sync());
    const reconciler = new PullSecretReconciler(k8s.core, () => config, provisioner, logger, { graceMs });
    reconciler.start(options.reconcileIntervalMs ?? 5 * 60_000);
    reconcile = () => reconciler.reconcile();
    stops.push(() => reconciler.stop(), () => watch.stop());
    const [{ ReplicaSetPins }, { AppsV1Api }] = await Promise.all([import('../k8s/replicasets.js'), import('@kubernetes/client-node')]);
    const pins = new ReplicaSetPins(k8s.config.makeApiClient(AppsV1Api));
    replicaSetPins = (ns, name, uid) => pins.get(ns, name, uid);
    if (config.broker) {
      const collectorOptions = options.statusCollector;
      if (collectorOptions) {
        const [{ StatusCollector }, { opsToken }, { CoordinationV1Api, CustomObjectsApi }, { recordEvent }] = await Promise.all([import('../k8s/connections.js'), import('../rules/credentials.js'), import('@kubernetes/client-node'), import('../k8s/events.js')]);
        const { CONNECTION_GROUP, CONNECTION_KIND, CONNECTION_VERSION } = await import('../k8s/connectionstatus.js');
        const collector = new StatusCollector({
          ...collectorOptions,
          core: k8s.core,
          custom: k8s.config.makeApiClient(CustomObjectsApi),
          coordination: k8s.config.makeApiClient(CoordinationV1Api),
          config: () => config,
          token: () => opsToken(signingKey(), 'collector'),
          logger,
          metrics,
          recordEvent: (name, change) => recordEvent(k8s.core, logger, { apiVersion: `${CONNECTION_GROUP}/${CONNECTION_VERSION}`, kind: CONNECTION_KIND, name, namespace: collectorOptions.namespace }, change.eventType, change.reason, `${change.type} is ${change.to}: ${change.message}`, 'pullbridge-webhook'),
        });
        collector.start();
        stopsAsync.push(() => collector.stop());
      }
    } else if (options.statusCollector) {
      logger.warn('no broker.keyFiles in the config: the status collector has no token the proxies accept, and does not run');
    }
    if (options.credentialMirror) {
      const { CredentialMirror } = await import('../k8s/credentialmirror.js');
      const { secret, sourcesPath, namespace } = options.credentialMirror;
      const mirror = new CredentialMirror({ core: k8s.core, kubeConfig: k8s.config, namespace, mirror: secret, sourcesPath, logger });
      mirror.start();
      stops.push(() => mirror.stop());
    }
    const target = options.configMap;
    if (target) onRejected = (message) => void recordWarning(k8s.core, logger, { kind: 'ConfigMap', ...target }, 'InvalidConfig', message, 'pullbridge-webhook');
  } else {
    logger.warn('no Kubernetes API access: pull secrets are not provisioned and namespace labels are not read');
  }

  // Rules that ask the upstream at admission get no answer without the proxy tier: say so at start
  // and at each reload, naming the flags, rather than let every image fall to onProbeFailure or deny.
  if (!options.resolver && !options.upstream?.view) {
    const warnNoResolver = () => {
      const asking = rulesAskingUpstream(config);
      if (asking.length > 0) logger.warn({ rules: asking }, `rules ${asking.map((r) => `"${r}"`).join(', ')} ask the upstream at admission (rewrite: private-only, pinDigest, verify), but the webhook has no access to the proxy tier: give --resolver-url or --resolver-ops-port (in the chart, webhook.resolver.enabled: true); until then their images fall to onProbeFailure, and verify denies`);
    };
    warnNoResolver();
    afterConfigApplied.push(warnNoResolver);
  }

  let registryView: RegistryView | undefined;
  if (options.resolver && !config.broker) logger.warn('no broker.keyFiles in the config: the admission resolver has no token the proxies accept, and admission cannot ask the upstreams');
  else if (options.resolver) {
    const key = signingKey;
    const resolver = options.resolver;
    const [{ ProxyTierView }, { CachedRegistryView }, { namespaceToken, opsToken }] = await Promise.all([import('./proxytier.js'), import('./viewcache.js'), import('../rules/credentials.js')]);
    let endpoints: () => readonly string[] = () => resolver.urls ?? [];
    if (resolver.discovery) {
      if (!k8s) throw new Error('finding the proxies needs Kubernetes API access (in a cluster, or --kubeconfig); or give --resolver-url');
      const { ProxyEndpoints } = await import('../k8s/proxyendpoints.js');
      const discovered = new ProxyEndpoints({ ...resolver.discovery, core: k8s.core, logger });
      discovered.start();
      stopsAsync.push(() => discovered.stop());
      const fixed = resolver.urls ?? [];
      endpoints = () => [...fixed, ...discovered.endpoints()];
    }
    const proxyQuestionSeconds = new Histogram({
      name: 'pullbridge_webhook_proxy_question_seconds',
      help: 'One admission question to one proxy of the tier, by kind (probe, manifest, blob, referrers) and outcome (answered, unavailable, stalled, unreachable, gave-up)',
      labelNames: ['kind', 'outcome'],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4],
      registers: [metrics],
    });
    const proxyFailovers = new Counter({ name: 'pullbridge_webhook_proxy_failovers_total', help: 'Admission questions a proxy of the tier did not answer (not ready, stalled, unreachable): the next proxy is asked, if any', labelNames: ['kind'], registers: [metrics] });
    const tier = new ProxyTierView({
      endpoints,
      token: () => opsToken(key(), 'resolver'),
      namespaceAuthorization: (namespace) => `Basic ${Buffer.from(`${namespace}:${namespaceToken(key(), namespace)}`).toString('base64')}`,
      ...(resolver.deadlineMs !== undefined ? { deadlineMs: resolver.deadlineMs } : {}),
      onAttempt: (attempt) => {
        proxyQuestionSeconds.observe({ kind: attempt.kind, outcome: attempt.outcome }, attempt.seconds);
        if (attempt.outcome !== 'answered' && attempt.outcome !== 'gave-up') proxyFailovers.inc({ kind: attempt.kind });
      },
    });
    stopsAsync.push(() => tier.close());
    registryView = new CachedRegistryView(tier);
  }

  // Admission asks the proxy tier (or a view the caller gives, in tests); signatures are checked
  // with the keys of the rules in force, fetched through the same view.
  const view = options.upstream?.view ?? registryView;
  const signatureCheck = options.upstream?.signatureCheck ?? (view ? (await import('./signatures.js')).cosignSignatureCheck(view, () => config) : undefined);

  let tls: TlsFiles | undefined = options.tls;
  let refreshTls: (() => Promise<TlsFiles | undefined>) | undefined;
  if (options.tlsBootstrap) {
    if (!k8s) throw new Error('certificate bootstrap needs Kubernetes API access (in a cluster, or --kubeconfig)');
    const { deploymentOwner, ensureServingCertificate } = await import('../k8s/certbootstrap.js');
    const b = options.tlsBootstrap;
    let owner: V1OwnerReference | undefined;
    if (b.ownerDeployment) {
      const { AppsV1Api } = await import('@kubernetes/client-node');
      try {
        owner = await deploymentOwner(k8s.config.makeApiClient(AppsV1Api), b.namespace, b.ownerDeployment);
      } catch (error) {
        // Serving matters more than cleanup: without an owner, uninstall leaves the Secret behind.
        logger.warn({ error: (error as Error).message }, 'the TLS Secret gets no owner: delete it by hand after uninstalling');
      }
    }
    const bootstrap = () => ensureServingCertificate({ core: k8s.core, admission: k8s.admission, namespace: b.namespace, secretName: b.secretName, service: b.service, webhookConfiguration: b.webhookConfiguration, ...(b.validityDays ? { validityDays: b.validityDays } : {}), ...(b.extraNames ? { extraNames: b.extraNames } : {}), ...(owner ? { owner } : {}) });
    tls = await bootstrap();
    refreshTls = bootstrap;
  } else if (options.tlsFiles) {
    const files = options.tlsFiles;
    refreshTls = async () => ({ cert: readFileSync(files.cert, 'utf8'), key: readFileSync(files.key, 'utf8') });
    tls = await refreshTls();
  }

  // When the serving certificate expires, for an alert well before (it is renewed in place).
  let servedCert = tls?.cert.toString();
  new Gauge({
    name: 'pullbridge_webhook_certificate_expiry_timestamp_seconds',
    help: 'When the webhook\'s serving certificate expires (Unix seconds); 0 when it serves plain HTTP',
    registers: [metrics],
    collect() {
      this.set(servedCert ? certificateExpiry(servedCert) : 0);
    },
  });
  const clientAuth = options.clientAuth;
  const readClientCa = clientAuth ? () => readFileSync(clientAuth.caFile, 'utf8') : undefined;
  if (tls && readClientCa) tls = { ...tls, clientCa: readClientCa() };

  const watcher = options.configPath
    ? new ConfigWatcher({
        path: options.configPath,
        initial: config,
        logger,
        metrics,
        loadErrors,
        onApplied: (next) => {
          config = next;
          for (const follow of afterConfigApplied) follow();
        },
        ...(onRejected ? { onRejected } : {}),
      })
    : undefined;
  watcher?.start();

  const app = createWebhookApp({
    config: () => config,
    logger,
    audit: logger.child({ stream: 'audit' }),
    metrics,
    sideEffects,
    ready: () => !draining,
    pullSecretFailure: options.pullSecretFailure ?? 'deny',
    upstream: {
      budgetMs: budgetFor(options.webhookTimeoutSeconds ?? DEFAULT_WEBHOOK_TIMEOUT_SECONDS),
      ...(view ? { view } : {}),
      ...(signatureCheck ? { signatureCheck } : {}),
      ...(replicaSetPins ? { replicaSetPins } : {}),
    },
    ...(clientAuth ? { clientAuth: { ...(clientAuth.allowedNames ? { allowedNames: clientAuth.allowedNames } : {}) } } : {}),
  });
  const running = await listen(app, { host: options.host, port: options.port, ...(tls ? { tls } : {}) }).catch(async (error: unknown) => {
    for (const stop of stops) stop();
    watcher?.stop();
    await metricsServer?.close();
    throw error;
  });
  if ((refreshTls || readClientCa) && running.server instanceof https.Server) {
    // Certificates rotate under a running server (and the client CA with them): swap the context
    // when either changes. A new context replaces the old one whole, so it carries the client CA too.
    const server = running.server;
    let served = { cert: tls?.cert.toString(), clientCa: tls?.clientCa?.toString() };
    const timer = setInterval(() => {
      Promise.resolve(refreshTls ? refreshTls() : tls)
        .then((next) => {
          if (!next) return;
          const clientCa = readClientCa?.();
          if (next.cert.toString() === served.cert && clientCa === served.clientCa) return;
          server.setSecureContext({ cert: next.cert, key: next.key, ...(clientCa ? { ca: clientCa } : {}) });
          served = { cert: next.cert.toString(), clientCa };
          servedCert = served.cert;
          logger.info('serving certificate or client CA reloaded');
        })
        .catch((error: unknown) => logger.error({ error: (error as Error).message }, 'serving certificate refresh failed'));
    }, options.tlsRefreshMs ?? 60 * 60_000);
    timer.unref();
    stops.push(() => clearInterval(timer));
  }
  if (gated) serveGated(gated, createMetricsHandler(metrics), () => !draining);
  logger.info({ url: running.url, ...(metricsServer ? { metricsUrl: metricsServer.url } : {}), rules: config.registries.map((r) => r.name) }, 'webhook listening');
  return {
    running,
    metricsServer,
    watcher,
    reconcile,
    metrics,
    registryView,
    async shutdown() {
      draining = true;
      watcher?.stop();
      for (const stop of stops) stop();
      await Promise.all([running.close(), metricsServer?.close(), ...stopsAsync.map((stop) => stop())]);
      logger.info('webhook stopped');
    },
  };
}
