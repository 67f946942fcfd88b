// Connection status in kubectl, against a real kube-apiserver: two real `pullbridge proxy`
// processes (one per "node") probe a real docker-registry; their proxy Pods are real Pod objects
// whose status.podIP is each proxy's collector address on loopback (no kubelet here). Two webhook
// replicas, with the chart's RBAC alone, elect one collector with a Lease; it writes the
// RegistryConnection objects (the chart's CRD) and Events. Then the upstream is killed and
// restarted on the same port, and `kubectl` and `pullbridge status` show what happened.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnSync } from 'node:child_process';
import { AppsV1Api, CoordinationV1Api, CoreV1Api, CustomObjectsApi, KubeConfig, KubernetesObjectApi, type KubernetesObject } from '@kubernetes/client-node';
import { parseAllDocuments } from 'yaml';
import { StatusCollector } from '../src/k8s/connections.js';
import { COLLECTOR_MAX_CONNECTIONS_PER_SOURCE } from '../src/proxy/run.js';
import { opsToken } from '../src/rules/credentials.js';
import { buildImage, type TestImage } from './support/oci.js';
import { runWebhook, type WebhookProcess } from '../src/webhook/run.js';
import { CLI, exitOf, startCli, type RunningCli } from './support/cli.js';
import { configFrom } from './support/config.js';
import { cachedBinary, KUBE_VERSION, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { memoryLogger } from './support/logs.js';
import { freePort, runAsync } from './support/procs.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const CHART = fileURLToPath(new URL('../../charts/pullbridge', import.meta.url));
const NS = 'pullbridge';
const SELECTOR = 'app.kubernetes.io/name=pullbridge,app.kubernetes.io/instance=pb,app.kubernetes.io/component=proxy';
const PROBE_SECONDS = 1;
const COLLECT_MS = 1000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls `done` until it holds or `timeoutMs` passes; resolves with its last answer. */
async function eventually(done: () => boolean | Promise<boolean>, timeoutMs: number): Promise<boolean> {
  for (const deadline = Date.now() + timeoutMs; Date.now() < deadline; await sleep(200)) if (await done()) return true;
  return done();
}

interface Condition {
  type: string;
  status: string;
  reason: string;
  message: string;
}
interface Connection {
  metadata: { name: string };
  status?: { upstream: string; conditions: Condition[]; nodesReady: string; latency: string; lastError: string; lastSuccess: string | null; nodes: Array<{ node: string; reachable: boolean | null; lastError: string | null }> };
}
interface Event {
  type: string;
  reason: string;
  message: string;
  involvedObject: { kind: string; name: string; apiVersion: string };
}

const PROXY_DAEMONSET = 'pb-pullbridge-proxy';
const selectorLabels = () => Object.fromEntries(SELECTOR.split(',').map((kv) => kv.split('=') as [string, string]));

/** The proxy DaemonSet object, as the chart names it; its uid for the Pods' owner reference. */
async function createProxyDaemonSet(kc: KubeConfig, namespace: string): Promise<{ name: string; uid: string }> {
  const created = await kc.makeApiClient(AppsV1Api).createNamespacedDaemonSet({ namespace, body: { metadata: { name: PROXY_DAEMONSET }, spec: { selector: { matchLabels: selectorLabels() }, template: { metadata: { labels: selectorLabels() }, spec: { containers: [{ name: 'proxy', image: 'pullbridge:test' }] } } } } });
  return { name: PROXY_DAEMONSET, uid: created.metadata?.uid ?? '' };
}

/** A Pod with the proxy labels and the address and phase a kubelet would report; controlled by
 * `owner` (as the DaemonSet controller makes them) unless null. */
async function createProxyPod(kc: KubeConfig, namespace: string, owner: { name: string; uid: string } | null, pod: { name: string; node: string; podIP: string; phase?: string }): Promise<void> {
  const core = kc.makeApiClient(CoreV1Api);
  const ownerReferences = owner ? [{ apiVersion: 'apps/v1', kind: 'DaemonSet', name: owner.name, uid: owner.uid, controller: true, blockOwnerDeletion: true }] : undefined;
  await core.createNamespacedPod({ namespace, body: { metadata: { name: pod.name, labels: selectorLabels(), ...(ownerReferences ? { ownerReferences } : {}) }, spec: { nodeName: pod.node, containers: [{ name: 'proxy', image: 'pullbridge:test' }] } } });
  const read = await core.readNamespacedPod({ namespace, name: pod.name });
  const phase = pod.phase ?? 'Running';
  // A Running proxy Pod is Ready, its container running for a while (a Pod not Ready yet and just
  // started counts as starting: connectionstatus.ts).
  const running = phase === 'Running';
  const ready = { type: 'Ready', status: running ? 'True' : 'False', lastTransitionTime: new Date() };
  const container = { name: 'proxy', image: 'pullbridge:test', imageID: '', ready: running, restartCount: 0, state: running ? { running: { startedAt: new Date(Date.now() - 3_600_000) } } : { terminated: { exitCode: 1 } } };
  await core.replaceNamespacedPodStatus({ namespace, name: pod.name, body: { ...read, status: { ...read.status, phase, podIP: pod.podIP, podIPs: [{ ip: pod.podIP }], conditions: [ready], containerStatuses: [container] } } });
}

describe('connection status in kubectl, against a real kube-apiserver', function () {
  this.timeout(180_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-status-'));
  const keyFile = join(dir, 'broker.key');
  const passwordFile = join(dir, 'registry.password');
  const configFile = join(dir, 'config.yaml');
  let cp: ControlPlane;
  let registry: RegistryHandle;
  let opsPort: number;
  let image: TestImage;
  const proxies: RunningCli[] = [];
  const replicas: WebhookProcess[] = [];
  const replicaLogs: Array<ReturnType<typeof memoryLogger>> = [];
  /** "node" name -> the proxy's collector address (its Pod IP) and its loopback operations address. */
  const nodes = [
    { node: 'node-a', podIP: '127.0.0.2', opsHost: '127.0.0.11' },
    { node: 'node-b', podIP: '127.0.0.3', opsHost: '127.0.0.12' },
  ];
  const configYaml = (extraRule = '') => `proxy: {host: 127.0.0.1, port: 30500}
webhook: {namespace: ${NS}}
broker: {keyFiles: [${keyFile}]}
registries:
  - {name: corp, match: ["registry.corp.example:5000"], upstream: "${registry.url}", credentials: {username: puller, passwordFile: ${passwordFile}}}
${extraRule}`;

  const kubectl = (args: string[]) => runAsync(cachedBinary('kubectl'), ['--kubeconfig', cp.kubeconfig, '-n', NS, ...args]);
  const connections = async () => (JSON.parse(await kubectl(['get', 'registryconnections', '-o', 'json'])) as { items: Connection[] }).items;
  const connection = async (name: string) => (await connections()).find((c) => c.metadata.name === name);
  const condition = (c: Connection | undefined, type: string) => c?.status?.conditions.find((x) => x.type === type);
  const events = async () => (JSON.parse(await kubectl(['get', 'events', '-o', 'json'])) as { items: Event[] }).items.filter((e) => e.involvedObject.kind === 'RegistryConnection');
  const status = (args: string[] = []) => spawnSync(process.execPath, [CLI, 'status', '--kubeconfig', cp.kubeconfig, '--namespace', NS, ...args], { encoding: 'utf8', timeout: 30_000 });

  before(async () => {
    writeFileSync(keyFile, randomBytes(32).toString('hex'));
    writeFileSync(passwordFile, DEFAULT_USERS.puller);
    [cp, registry, opsPort] = await Promise.all([startControlPlane(), startRegistry({ auth: 'basic' }), freePort()]);
    writeFileSync(configFile, configYaml());
    image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [256] });
    await registry.push(image, 'team/app', '1');
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    const core = kc.makeApiClient(CoreV1Api);
    await core.createNamespace({ body: { metadata: { name: NS } } });
    // What the chart grants the webhook, and the chart's CRD, exactly as rendered.
    const rendered = await runAsync(cachedBinary('helm'), ['template', 'pb', CHART, '-n', NS, '--kube-version', KUBE_VERSION.slice(1), '--show-only', 'templates/rbac.yaml', '--show-only', 'templates/registryconnections.yaml']);
    const objects = KubernetesObjectApi.makeApiClient(kc);
    for (const doc of parseAllDocuments(rendered)) {
      const object = doc.toJS() as KubernetesObject | null;
      if (object?.kind) await objects.create(object);
    }
    await eventually(async () => (await kubectl(['get', 'regconn', '-o', 'name']).then(() => true, () => false)), 30_000);
    // The proxy DaemonSet's object (no controllers run here: it makes no Pods; they are made below).
    const daemonSet = await createProxyDaemonSet(kc, NS);

    // The proxies, as the chart runs them with hostNetwork: operations on loopback, plus the collector address.
    for (const n of nodes) {
      proxies.push(
        await startCli(['proxy', '--config', configFile, '--host', '127.0.0.1', '--port', '0', '--ops-port', String(opsPort), '--ops-host', n.opsHost, '--ops-collector-host', n.podIP, '--probe-interval', String(PROBE_SECONDS)], /operations endpoints for the status collector listening/),
      );
      // Their Pods: created as the DaemonSet would, with the address and phase the kubelet would report.
      await createProxyPod(kc, NS, daemonSet, { name: `pb-proxy-${n.node}`, node: n.node, podIP: n.podIP });
    }
    // Two replicas of the webhook Deployment, as its service account.
    const asWebhook = join(dir, 'kubeconfig');
    const admin = JSON.parse(readFileSync(cp.kubeconfig, 'utf8')) as { users: Array<{ user: Record<string, string> }> };
    for (const u of admin.users) u.user.as = `system:serviceaccount:${NS}:pb-pullbridge-webhook`;
    writeFileSync(asWebhook, JSON.stringify(admin));
    for (const identity of ['webhook-1', 'webhook-2']) {
      const logs = memoryLogger();
      replicaLogs.push(logs);
      replicas.push(
        await runWebhook({ config: configFrom(configYaml()), configPath: configFile, host: '127.0.0.1', port: 0, kubeconfig: asWebhook, reconcileIntervalMs: 3_600_000, metricsPort: 0, logger: logs.logger, statusCollector: { namespace: NS, proxySelector: SELECTOR, proxyDaemonSet: PROXY_DAEMONSET, opsPort, intervalMs: COLLECT_MS, identity }, resolver: { discovery: { namespace: NS, proxySelector: SELECTOR, proxyDaemonSet: PROXY_DAEMONSET, opsPort, intervalMs: COLLECT_MS } } }),
      );
    }
  });

  after(async () => {
    await Promise.all(replicas.map((r) => r.shutdown()));
    for (const p of proxies) {
      p.child.kill('SIGTERM');
      await exitOf(p.child);
    }
    await registry?.stop();
    await cp?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('the collector address answers health to anyone, GET /status only to the collector token of this broker key, nothing else to anyone', async () => {
    const [n] = nodes;
    assert.ok(n);
    // One connection per request, from an address of its own: the collecting replica and the
    // admission resolvers hold connections from 127.0.0.1.
    const request = (method: string, host: string, path: string, token?: string) =>
      new Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }>((resolve, reject) => {
        const req = http.request({ method, host, port: opsPort, path, localAddress: '127.0.0.23', agent: false, headers: token ? { authorization: `Bearer ${token}` } : {} }, (res) => {
          let body = '';
          res.setEncoding('utf8');
          res.on('data', (chunk: string) => (body += chunk));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
        });
        req.on('error', reject);
        req.end(method === 'POST' ? '{"images": []}' : undefined);
      });
    const get = (host: string, path: string, token?: string) => request('GET', host, path, token);
    const key = readFileSync(keyFile);
    assert.equal((await get(n.podIP, '/healthz')).status, 200);
    assert.equal((await get(n.podIP, '/readyz')).status, 200);
    const anonymous = await get(n.podIP, '/status');
    assert.equal(anonymous.status, 401);
    assert.match(anonymous.headers['www-authenticate'] ?? '', /^Bearer /);
    // Nothing but /status and health exists there, token or not: no metrics, no cache changes.
    assert.equal((await get(n.podIP, '/metrics', opsToken(key, 'collector'))).status, 404);
    for (const path of ['/warm', '/purge?rule=corp&repository=team/app']) {
      assert.equal((await request('POST', n.podIP, path, opsToken(key, 'collector'))).status, 404, path);
    }
    assert.equal((await get(n.podIP, '/status', opsToken(randomBytes(32), 'collector'))).status, 403, 'a token of another key');
    assert.equal((await get(n.podIP, '/status', key.toString())).status, 403, 'the broker key itself is not the token');
    const right = await get(n.podIP, '/status', opsToken(key, 'collector'));
    assert.equal(right.status, 200);
    assert.deepEqual((JSON.parse(right.body) as { rules: string[] }).rules, ['corp']);
    // On its loopback operations address (kubectl port-forward arrives there), no token is needed.
    assert.equal((await get(n.opsHost, '/status')).status, 200);
    assert.equal((await get(n.opsHost, '/metrics')).status, 200);
  });

  it('one peer holding connections cannot lock others out: 16 per source on the collector address (the admission resolver asks concurrently), 8 on the operations port; the collector address closes a connection that sends no request', async () => {
    const [n] = nodes;
    assert.ok(n);
    const idle: net.Socket[] = [];
    /**
     * A connection from `source`, once the server has it: one that says nothing on the operations
     * port; on the collector address, where a silent connection is closed after 2 s, one kept alive
     * after a first request (the server keeps it 5 s).
     */
    const hold = (host: string, source: string, request: boolean) =>
      new Promise<void>((resolve, reject) => {
        const socket = net.connect({ host, port: opsPort, localAddress: source }, () => {
          if (!request) resolve();
          else socket.write(`GET /healthz HTTP/1.1\r\nhost: ${host}\r\n\r\n`);
        });
        if (request) socket.once('data', () => resolve());
        socket.once('error', reject);
        idle.push(socket);
      });
    /** What a request from `source` gets back before its connection closes: '' when it is closed unanswered. */
    const answer = (host: string, source: string) =>
      new Promise<string>((resolve) => {
        let received = '';
        const socket = net.connect({ host, port: opsPort, localAddress: source }, () => socket.write(`GET /healthz HTTP/1.1\r\nhost: ${host}\r\nconnection: close\r\n\r\n`));
        socket.on('data', (chunk: Buffer) => (received += chunk.toString('latin1')));
        socket.once('error', () => undefined);
        socket.once('close', () => resolve(received));
      });
    try {
      // A silent connection to the collector address is closed by the server (whatever else it holds).
      const silent = net.connect({ host: n.podIP, port: opsPort, localAddress: '127.0.0.23' });
      silent.once('error', () => undefined);
      await new Promise((resolve) => silent.once('close', resolve));
      for (const [host, perSource, request] of [[n.podIP, COLLECTOR_MAX_CONNECTIONS_PER_SOURCE, true], [n.opsHost, 8, false]] as const) {
        await Promise.all(Array.from({ length: perSource }, () => hold(host, '127.0.0.21', request)));
        assert.equal(await answer(host, '127.0.0.21'), '', `${host}: a connection beyond ${perSource} from one source is closed unanswered`);
        assert.match(await answer(host, '127.0.0.22'), /^HTTP\/1\.1 200 /, `${host}: another source is served`);
      }
    } finally {
      for (const socket of idle) socket.destroy();
    }
  });

  it('one replica holds the collector Lease; kubectl shows the rule Ready on both nodes, with its printer columns', async () => {
    const ready = await eventually(async () => {
      const c = await connection('corp');
      return condition(c, 'Ready')?.status === 'True' && c?.status?.nodesReady === '2/2';
    }, 60_000);
    const corp = await connection('corp');
    assert.ok(ready, JSON.stringify(corp?.status, null, 2));
    assert.equal(corp?.status?.upstream, registry.url);
    assert.deepEqual(corp?.status?.conditions.map((c) => [c.type, c.status]), [
      ['Reachable', 'True'],
      ['Authenticated', 'True'],
      ['Ready', 'True'],
    ]);
    assert.deepEqual(corp?.status?.nodes.map((n) => [n.node, n.reachable, n.lastError]), [
      ['node-a', true, null],
      ['node-b', true, null],
    ]);
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    const held = await kc.makeApiClient(CoordinationV1Api).readNamespacedLease({ namespace: NS, name: 'pullbridge-status-collector' });
    assert.ok(['webhook-1', 'webhook-2'].includes(held.spec?.holderIdentity ?? ''), held.spec?.holderIdentity);
    const table = (await kubectl(['get', 'regconn'])).trimEnd().split('\n');
    assert.deepEqual(table[0]?.split(/\s{2,}/), ['NAME', 'UPSTREAM', 'READY', 'REACHABLE', 'AUTHENTICATED', 'NODES', 'LATENCY', 'LAST ERROR', 'AGE']);
    assert.match(table[1] ?? '', new RegExp(`^corp\\s+${registry.url.replace(/[.]/g, '\\.')}\\s+True\\s+True\\s+True\\s+2/2\\s+\\d+ms\\s+\\d+s$`));
    // With a rule, and every rule Ready: exit 0.
    assert.equal(status().status, 0);
  });

  it('every webhook replica finds the Ready proxy Pods and asks them admission questions on their Pod IP; a Pod no longer Ready is asked no more', async () => {
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    const core = kc.makeApiClient(CoreV1Api);
    const admitted = (proxy: RunningCli | undefined, repository: string) => (proxy?.output() ?? '').split('\n').some((line) => line.includes('"access":"admission"') && line.includes(`"repository":"${repository}"`));
    for (const replica of replicas) {
      const view = replica.registryView;
      assert.ok(view, 'the replica has a resolver');
      let probe: unknown;
      const answered = await eventually(async () => {
        probe = await view.probeAnonymous({ rule: 'corp', repository: 'team/app', reference: '1' }, AbortSignal.timeout(10_000));
        return (probe as { kind: string }).kind === 'answered';
      }, 30_000);
      assert.ok(answered, JSON.stringify(probe));
      assert.deepEqual(probe, { kind: 'answered', status: 401 }, 'the registry wants Basic from anyone: private');
      const manifest = await view.manifest({ rule: 'corp', repository: 'team/app', reference: '1', namespace: 'default', method: 'GET' }, AbortSignal.timeout(10_000));
      assert.equal(manifest.kind === 'found' && manifest.digest, image.index.digest, JSON.stringify(manifest));
    }
    assert.ok(await eventually(() => proxies.some((p) => admitted(p, 'team/app')), 10_000), 'a proxy logged the admission requests');
    // node-a's Pod stops being Ready: once the replicas listed the Pods again, only node-b is asked.
    const name = 'pb-proxy-node-a';
    const read = await core.readNamespacedPod({ namespace: NS, name });
    const notReady = { ...read, status: { ...read.status, conditions: [{ type: 'Ready', status: 'False', lastTransitionTime: new Date() }] } };
    await core.replaceNamespacedPodStatus({ namespace: NS, name, body: notReady });
    try {
      const [a, b] = proxies;
      const listedOne = (logs: ReturnType<typeof memoryLogger>) => logs.records.some((r) => r.msg === 'admission resolver: proxy endpoints changed' && r.proxies === 1);
      assert.ok(await eventually(() => replicaLogs.every(listedOne), 30_000), 'every replica listed the Pods again');
      // Eight repositories, each with its own rendezvous order (about half would rank node-a first): all on node-b.
      const moved = Array.from({ length: 8 }, (_, k) => `team/moved-${k}`);
      for (const replica of replicas) for (const repository of moved) assert.equal((await replica.registryView?.probeAnonymous({ rule: 'corp', repository, reference: '1' }, AbortSignal.timeout(10_000)))?.kind, 'answered');
      await b?.waitForOutput(() => moved.every((r) => admitted(b, r)), 10_000);
      assert.ok(moved.every((r) => !admitted(a, r)), 'node-a was not asked');
    } finally {
      const current = await core.readNamespacedPod({ namespace: NS, name });
      await core.replaceNamespacedPodStatus({ namespace: NS, name, body: { ...current, status: { ...current.status, conditions: [{ type: 'Ready', status: 'True', lastTransitionTime: new Date() }] } } });
    }
  });

  it('the opt-in PrometheusRule names only metrics the real proxy and webhook export', async () => {
    const rendered = await runAsync(cachedBinary('helm'), ['template', 'pb', CHART, '-n', NS, '--kube-version', KUBE_VERSION.slice(1), '--set', 'metrics.prometheusRule.enabled=true', '--show-only', 'templates/prometheusrule.yaml']);
    const rule = parseAllDocuments(rendered)[0]?.toJS() as { kind: string; spec: { groups: Array<{ rules: Array<{ alert: string; expr: string }> }> } };
    assert.equal(rule.kind, 'PrometheusRule');
    const alerts = rule.spec.groups.flatMap((g) => g.rules);
    assert.deepEqual(alerts.map((a) => a.alert), ['PullbridgeRegistryRuleDown', 'PullbridgeRegistryAuthFailing', 'PullbridgePullSecretProvisioningFailing', 'PullbridgeSharedTierDown', 'PullbridgeCacheFillsPaused', 'PullbridgeCacheNotFilling', 'PullbridgeWebhookCertificateExpiring']);
    const used = new Set(alerts.flatMap((a) => a.expr.match(/\bpullbridge_[a-z0-9_]+/g) ?? []));
    // A proxy with a node cache and a shared tier (filesystem), so that every proxy metric is there.
    const cacheConfig = join(dir, 'cached.yaml');
    writeFileSync(cacheConfig, `${configYaml()}cache: {path: ${join(dir, 'cache')}, shared: {filesystem: {path: ${join(dir, 'shared')}}}}\n`);
    const port = await freePort();
    const proxy = await startCli(['proxy', '--config', cacheConfig, '--host', '127.0.0.1', '--port', '0', '--ops-port', String(port), '--ops-host', '127.0.0.1', '--probe-interval', '3600'], /operations endpoints listening/);
    let exported: Set<string>;
    try {
      const names = (text: string) => [...text.matchAll(/^# TYPE (\S+) /gm)].map((m) => m[1] ?? '');
      const proxyMetrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      const webhookMetrics = await Promise.all(replicas.map(async (r) => (await fetch(`${r.metricsServer?.url ?? ''}/metrics`)).text()));
      exported = new Set([...names(proxyMetrics), ...webhookMetrics.flatMap(names)]);
    } finally {
      proxy.child.kill('SIGTERM');
      await exitOf(proxy.child);
    }
    assert.ok(used.size >= 9, [...used].join(' '));
    assert.deepEqual([...used].filter((name) => !exported.has(name)), [], `exported: ${[...exported].join(' ')}`);
  });

  it('a rule whose upstream is killed shows Reachable=False with the error, a Warning Event, and a warning in the proxies\' logs; restarted, it recovers with a Normal Event', async () => {
    await registry.kill();
    // Bounded: the probe (1 s) and the collection (1 s) run many times within it.
    // Until both nodes' probes have seen it (each proxy probes on its own timer).
    const down = await eventually(async () => {
      const c = await connection('corp');
      return condition(c, 'Reachable')?.status === 'False' && c?.status?.nodes.every((n) => n.reachable === false) === true;
    }, 60_000);
    const corp = await connection('corp');
    assert.ok(down, JSON.stringify(corp?.status, null, 2));
    assert.equal(condition(corp, 'Reachable')?.reason, 'UpstreamUnreachable');
    assert.match(condition(corp, 'Reachable')?.message ?? '', /ECONNREFUSED/);
    assert.equal(condition(corp, 'Ready')?.status, 'False');
    assert.match(condition(corp, 'Reachable')?.message ?? '', /^2\/2 node\(s\) cannot reach /);
    assert.equal(condition(corp, 'Authenticated')?.status, 'Unknown', 'not reached: credentials not checked');
    assert.match(corp?.status?.lastError ?? '', /^node-a: ECONNREFUSED/);
    const warned = await eventually(async () => (await events()).some((e) => e.type === 'Warning' && e.involvedObject.name === 'corp' && e.reason === 'UpstreamUnreachable'), 30_000);
    const warning = (await events()).find((e) => e.reason === 'UpstreamUnreachable');
    assert.ok(warned, JSON.stringify(await events(), null, 2));
    assert.equal(warning?.involvedObject.apiVersion, 'pullbridge.io/v1alpha1');
    assert.match(warning?.message ?? '', /^Reachable is False: .*ECONNREFUSED/);
    for (const p of proxies) await p.waitForOutput((o) => /"msg":"upstream went down".*"error":"ECONNREFUSED/.test(o) || /"error":"ECONNREFUSED[^"]*".*"msg":"upstream went down"/.test(o), 30_000);
    // pullbridge status: the rule not ready, exit 1.
    const whileDown = status();
    assert.equal(whileDown.status, 1, whileDown.stderr);
    assert.match(whileDown.stdout.split('\n')[1] ?? '', /^corp\s+\S+\s+False\s+False\s+Unknown\s+0\/2\s/);

    await registry.restart();
    const recovered = await eventually(async () => condition(await connection('corp'), 'Ready')?.status === 'True', 60_000);
    assert.ok(recovered, JSON.stringify((await connection('corp'))?.status, null, 2));
    assert.equal(condition(await connection('corp'), 'Reachable')?.status, 'True');
    const normal = await eventually(async () => (await events()).some((e) => e.type === 'Normal' && e.involvedObject.name === 'corp' && e.reason === 'UpstreamReachable'), 30_000);
    assert.ok(normal, JSON.stringify(await events(), null, 2));
    for (const p of proxies) await p.waitForOutput((o) => o.includes('"msg":"upstream recovered"'), 30_000);
  });

  it('probes at start: a proxy whose next probe is an hour away logs its rule up at once', async () => {
    // Also: a node whose address is its loopback (the test node's, 127.0.0.1) gives the Pod IP the
    // operations address already has: the proxy starts, without a second listener.
    const port = await freePort();
    const proxy = await startCli(['proxy', '--config', configFile, '--host', '127.0.0.1', '--port', '0', '--ops-port', String(port), '--ops-host', '127.0.0.1', '--ops-collector-host', '127.0.0.1', '--probe-interval', '3600'], /"msg":"upstream probe ok"/);
    proxy.child.kill('SIGTERM');
    await exitOf(proxy.child);
    assert.match(proxy.output(), /"rule":"corp".*"msg":"upstream probe ok"/);
    assert.match(proxy.output(), /"msg":"the operations port already listens on the collector address: no second listener"/);
  });

  it('creates an object for a rule added to the config and deletes it when the rule is removed', async () => {
    writeFileSync(configFile, configYaml(`  - {name: extra, match: ["extra.example"], upstream: "${registry.url}", auth: {mode: anonymous}, repositories: {include: ["x/**"]}}\n`));
    assert.ok(await eventually(async () => (await connection('extra')) !== undefined, 60_000), 'object for the new rule');
    writeFileSync(configFile, configYaml());
    assert.ok(await eventually(async () => (await connection('extra')) === undefined, 60_000), 'object of the removed rule deleted');
  });

  it('hostile proxy Pods: only Running Pods of the proxy DaemonSet get the token; oversized, redirecting and malformed documents become that node\'s error; a rule whose write is refused does not stop the others', async () => {
    // In a namespace of its own, with a collector run here (admin credentials), so that each
    // collection is one call and the replicas above do not interfere.
    const ns = 'hostile';
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    const core = kc.makeApiClient(CoreV1Api);
    await core.createNamespace({ body: { metadata: { name: ns } } });
    const owner = await createProxyDaemonSet(kc, ns);
    const port = await freePort();
    const seen = new Map<string, Array<string | undefined>>();
    const big = JSON.stringify({ upstreams: [], padding: 'x'.repeat(2 << 20) });
    const documentFor = (rule: string, over: Record<string, unknown>) => ({ rule, upstream: 'u', via: 'direct', reachable: true, authOk: true, latencyMs: 1, lastError: null, lastSuccess: '2026-12-06T17:00:00Z', lastCheck: '2026-12-06T17:00:00Z', ...over });
    // The fake proxies: what a real proxy never sends (a document too large, a redirect, a date that is not one).
    const behaviours: Record<string, (res: http.ServerResponse) => void> = {
      '127.0.0.31': (res) => res.writeHead(200, { 'content-type': 'application/json', 'content-length': String(big.length) }).end(big),
      '127.0.0.32': (res) => {
        res.writeHead(200, { 'content-type': 'application/json' }); // chunked: no declared size
        res.end(big);
      },
      '127.0.0.33': (res) => res.writeHead(302, { location: `http://127.0.0.36:${port}/status` }).end(),
      '127.0.0.34': (res) => res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ upstreams: [documentFor('first', { lastSuccess: 'zzzz', lastError: 'E'.repeat(900_000) }), documentFor('second', {}), documentFor('invented', {})], cache: null })),
      '127.0.0.35': (res) => res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ upstreams: [documentFor('first', {}), documentFor('second', {})], cache: null })),
      '127.0.0.36': (res) => res.writeHead(200, { 'content-type': 'application/json' }).end('{"upstreams": []}'), // the redirect target
      '127.0.0.37': (res) => res.writeHead(200).end('{"upstreams": []}'), // a labelled Pod no DaemonSet controls
      '127.0.0.38': (res) => res.writeHead(200).end('{"upstreams": []}'), // a Pod of the DaemonSet that has failed
    };
    const servers = await Promise.all(
      Object.entries(behaviours).map(
        ([host, behave]) =>
          new Promise<http.Server>((resolve) => {
            const server = http.createServer((req, res) => {
              seen.set(host, [...(seen.get(host) ?? []), req.headers.authorization]);
              behave(res);
            });
            server.listen(port, host, () => resolve(server));
          }),
      ),
    );
    const pods = [
      { name: 'big', node: 'node-big', podIP: '127.0.0.31' },
      { name: 'chunked', node: 'node-chunked', podIP: '127.0.0.32' },
      { name: 'redirect', node: 'node-redirect', podIP: '127.0.0.33' },
      { name: 'malformed', node: 'node-malformed', podIP: '127.0.0.34' },
      { name: 'good', node: 'node-good', podIP: '127.0.0.35' },
      { name: 'failed', node: 'node-failed', podIP: '127.0.0.38', phase: 'Failed' },
    ];
    for (const pod of pods) await createProxyPod(kc, ns, owner, pod);
    await createProxyPod(kc, ns, null, { name: 'unowned', node: 'node-unowned', podIP: '127.0.0.37' });
    // The API server refuses every status write of the rule "first" (a real admission policy).
    const refusing = KubernetesObjectApi.makeApiClient(kc);
    await refusing.create({ apiVersion: 'admissionregistration.k8s.io/v1', kind: 'ValidatingAdmissionPolicy', metadata: { name: 'refuse-first' }, spec: { failurePolicy: 'Fail', matchConstraints: { resourceRules: [{ apiGroups: ['pullbridge.io'], apiVersions: ['*'], operations: ['UPDATE'], resources: ['registryconnections/status'] }] }, validations: [{ expression: "object.metadata.name != 'first'", message: 'first is refused here' }] } } as KubernetesObject);
    await refusing.create({ apiVersion: 'admissionregistration.k8s.io/v1', kind: 'ValidatingAdmissionPolicyBinding', metadata: { name: 'refuse-first' }, spec: { policyName: 'refuse-first', validationActions: ['Deny'], matchResources: { namespaceSelector: { matchLabels: { 'kubernetes.io/metadata.name': ns } } } } } as KubernetesObject);
    const logs = memoryLogger();
    const collector = new StatusCollector({
      core,
      custom: kc.makeApiClient(CustomObjectsApi),
      coordination: kc.makeApiClient(CoordinationV1Api),
      namespace: ns,
      proxySelector: SELECTOR,
      proxyDaemonSet: owner.name,
      opsPort: port,
      intervalMs: 60_000,
      identity: 'here',
      config: () => configFrom(`registries:\n  - {name: first, match: [first.example], upstream: "http://127.0.0.1:1", auth: {mode: anonymous}}\n  - {name: second, match: [second.example], upstream: "http://127.0.0.1:2", auth: {mode: anonymous}}\n`),
      token: () => 'the-collector-token',
      logger: logs.logger,
      recordEvent: async () => undefined,
    });
    type Stored = { metadata: { name: string }; status?: { lastSuccess: string | null; lastCollected: string; nodes: Array<{ node: string; lastError: string | null; lastSuccess: string | null }> } };
    const stored = async (name: string) => ((await kc.makeApiClient(CustomObjectsApi).listNamespacedCustomObject({ group: 'pullbridge.io', version: 'v1alpha1', namespace: ns, plural: 'registryconnections' })) as { items: Stored[] }).items.find((o) => o.metadata.name === name);
    try {
      // Until the admission policy is in force (it is loaded asynchronously): bounded.
      const refused = () => logs.records.some((r) => r.msg === 'registry connection status not written' && r.rule === 'first');
      for (let i = 0; i < 60 && !refused(); i++) {
        await collector.collect();
        if (!refused()) await sleep(500);
      }
      assert.ok(refused(), 'the refused write of "first" is logged');
      // One more collection with the policy in force: "first" refused again, "second" written (it comes after).
      const refusals = () => logs.records.filter((r) => r.msg === 'registry connection status not written' && r.rule === 'first').length;
      const [before, refusedBefore] = [(await stored('second'))?.status?.lastCollected, refusals()];
      await collector.collect();
      assert.equal(refusals(), refusedBefore + 1);
      const second = await stored('second');
      assert.notEqual(second?.status?.lastCollected, before, 'written in the collection that could not write "first"');
      const nodesOf = new Map(second?.status?.nodes.map((n) => [n.node, n]));
      assert.deepEqual([...nodesOf.keys()], ['node-big', 'node-chunked', 'node-good', 'node-malformed', 'node-redirect'], 'only Running Pods the DaemonSet controls');
      assert.match(nodesOf.get('node-big')?.lastError ?? '', /^proxy status not collected: 127\.0\.0\.31:\d+\/status: the document is larger than 1048576 bytes$/);
      assert.match(nodesOf.get('node-chunked')?.lastError ?? '', /^proxy status not collected: 127\.0\.0\.32:\d+\/status: the document is larger than 1048576 bytes$/);
      assert.match(nodesOf.get('node-redirect')?.lastError ?? '', /^proxy status not collected: 127\.0\.0\.33:\d+: .*redirect/);
      assert.equal(nodesOf.get('node-good')?.lastError, null);
      assert.equal(nodesOf.get('node-malformed')?.lastError, null);
      assert.equal(second?.status?.lastSuccess, '2026-12-06T17:00:00Z');
      // Without the policy, "first" is written too: its bad date dropped, its error cut.
      await refusing.delete({ apiVersion: 'admissionregistration.k8s.io/v1', kind: 'ValidatingAdmissionPolicyBinding', metadata: { name: 'refuse-first' } } as KubernetesObject);
      let first = await stored('first');
      for (let i = 0; i < 60 && !first?.status; i++) {
        await collector.collect();
        first = await stored('first');
        if (!first?.status) await sleep(500);
      }
      const malformed = first?.status?.nodes.find((n) => n.node === 'node-malformed');
      assert.equal(malformed?.lastSuccess, null, 'not a date');
      assert.equal(malformed?.lastError?.length, 1024);
      assert.equal(first?.status?.lastSuccess, '2026-12-06T17:00:00Z', 'the newest real date');
      assert.deepEqual(((await kc.makeApiClient(CustomObjectsApi).listNamespacedCustomObject({ group: 'pullbridge.io', version: 'v1alpha1', namespace: ns, plural: 'registryconnections' })) as { items: Stored[] }).items.map((o) => o.metadata.name), ['first', 'second'], 'no object for a rule only a proxy names');
      assert.deepEqual([...seen.keys()].sort(), ['127.0.0.31', '127.0.0.32', '127.0.0.33', '127.0.0.34', '127.0.0.35'], 'the token went to the DaemonSet\'s Running Pods only, and was not taken along a redirect');
    } finally {
      await refusing.delete({ apiVersion: 'admissionregistration.k8s.io/v1', kind: 'ValidatingAdmissionPolicy', metadata: { name: 'refuse-first' } } as KubernetesObject).catch(() => undefined);
      await Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve))));
    }
  });

  it('the collecting replica hands over on shutdown; pullbridge status prints the table of what the objects say (exact rows), and one line when the CRD is missing or the API is unreachable', async () => {
    // The collecting replica stops: it hands the Lease back, and the other takes over.
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    const coordination = kc.makeApiClient(CoordinationV1Api);
    const holder = async () => (await coordination.readNamespacedLease({ namespace: NS, name: 'pullbridge-status-collector' })).spec?.holderIdentity;
    const first = await holder();
    const index = first === 'webhook-1' ? 0 : 1;
    await replicas[index]?.shutdown();
    replicas.splice(index, 1);
    const other = first === 'webhook-1' ? 'webhook-2' : 'webhook-1';
    assert.ok(await eventually(async () => (await holder()) === other, 30_000), `the Lease stayed with ${String(await holder())}`);
    // Stop collecting, so that what is printed and what is read below are the same state.
    await Promise.all(replicas.splice(0).map((r) => r.shutdown()));
    const corp = await connection('corp');
    const s = corp?.status;
    assert.ok(s?.lastSuccess);
    const printed = status();
    assert.equal(printed.status, 0, printed.stderr);
    const pad = (cells: string[], widths: number[]) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join('  ');
    const header = ['RULE', 'UPSTREAM', 'READY', 'REACHABLE', 'AUTHENTICATED', 'NODES', 'LATENCY', 'LAST SUCCESS', 'LAST ERROR'];
    const row = ['corp', registry.url, 'True', 'True', 'True', '2/2', s.latency, s.lastSuccess, '-'];
    const widths = header.map((h, i) => Math.max(h.length, (row[i] ?? '').length));
    assert.deepEqual(printed.stdout.split('\n').slice(0, 2), [pad(header, widths), pad(row, widths)]);
    // The proxies here run without a node cache: each node's line says so.
    assert.deepEqual(printed.stdout.split('\n').slice(3).filter(Boolean).map((l) => l.split(/\s+/).slice(0, 2).join(' ')), ['NODE CACHE', 'node-a off', 'node-b off']);
    const json = status(['--json']);
    assert.equal(json.status, 0);
    assert.deepEqual((JSON.parse(json.stdout) as Array<{ name: string }>).map((o) => o.name), ['corp']);

    await kubectl(['delete', 'crd', 'registryconnections.pullbridge.io', '--wait=true']);
    const missing = status();
    assert.equal(missing.status, 1);
    assert.equal(missing.stderr, `pullbridge status: the RegistryConnection resource (registryconnections.pullbridge.io) is not installed at ${cp.url}: install or upgrade the pullbridge chart\n`);
    const unreachable = join(dir, 'unreachable.kubeconfig');
    const port = await freePort();
    writeFileSync(unreachable, readFileSync(cp.kubeconfig, 'utf8').replace(cp.url, `https://127.0.0.1:${port}`));
    const down = spawnSync(process.execPath, [CLI, 'status', '--kubeconfig', unreachable], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(down.status, 1);
    assert.equal(down.stderr, `pullbridge status: cannot reach the Kubernetes API at https://127.0.0.1:${port}: ECONNREFUSED\n`);
    const usage = spawnSync(process.execPath, [CLI, 'status', '--namespace', 'Not_A_Namespace'], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(usage.status, 2);
    assert.match(usage.stderr, /^pullbridge status: --namespace must be a namespace name, got "Not_A_Namespace"\n/);
  });
});
