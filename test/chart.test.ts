// The Helm chart: lint clean, and what `helm template` renders is accepted by a real apiserver
// (server-side dry run, as `kubectl apply --dry-run=server` does), with a config the project accepts.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { generateKeyPairSync, randomBytes, X509Certificate } from 'node:crypto';
import { AdmissionregistrationV1Api, AppsV1Api, CoreV1Api, KubeConfig, KubernetesObjectApi, PatchStrategy, setHeaderOptions, type KubernetesObject } from '@kubernetes/client-node';
import { parse as parseYaml, parseAllDocuments, stringify as stringifyYaml } from 'yaml';
import { generateClientCertificate } from '../src/certs/certs.js';
import { filesReadBy, parseConfig, validateConfig } from '../src/rules/config.js';
import { cachedBinary, KUBE_VERSION, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { runAsync, startProcess } from './support/procs.js';
import { runWebhook } from '../src/webhook/run.js';
import { STARTUP_HOLD_MS } from '../src/shell/startupgate.js';
import { generateKeyPair, removeCosignFiles, sign, type CosignKeyPair } from './support/cosign.js';
import { directRegistryView } from './support/directview.js';
import { memoryLogger } from './support/logs.js';
import { buildImage, type TestImage } from './support/oci.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';
import { applyPatch, decodePatch, podWith, reviewFor, type PodShape } from './support/review.js';

const CHART = fileURLToPath(new URL('../../charts/pullbridge', import.meta.url));
const VALUES = `
registries:
  - name: corp
    match: [registry.corp.example:5000]
    upstream: https://registry.corp.example:5000
    credentials: {username: robot, password: s3cret}
    caBundle: |
      -----BEGIN CERTIFICATE-----
      MIIBnotreal
      -----END CERTIFICATE-----
    namespaces: {exclude: ["sandbox-*"]}
  - name: onprem
    match: [onprem.example:443]
    upstream: http://onprem.example:443
    auth: {mode: passthrough}
    forwardProxy: {url: "http://connectivity-proxy.kyma-system:20003", mode: forward, headers: {SAP-Connectivity-SCC-Location_ID: loc-1}}
  - name: hub
    match: [docker.io]
    upstream: https://registry-1.docker.io
    auth: {mode: anonymous}
webhook:
  excludedNamespaces: [monitoring]
`;

/** How long a startup probe lets a component start: each try is held up to STARTUP_HOLD_MS, and
 * kubelet must wait longer than that for the answer (a timeout would be a failure with no reason). */
function startupBudgetSeconds(probe: { periodSeconds?: number; failureThreshold?: number; timeoutSeconds?: number }): number {
  const holdSeconds = STARTUP_HOLD_MS / 1000;
  assert.ok((probe.timeoutSeconds ?? 1) > holdSeconds, `timeoutSeconds ${probe.timeoutSeconds ?? 1} outlasts the ${holdSeconds} s hold`);
  return (probe.failureThreshold ?? 3) * (holdSeconds + (probe.periodSeconds ?? 10));
}

describe('Helm chart', function () {
  this.timeout(120_000);
  const helm = cachedBinary('helm');
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-chart-'));
  const valuesFile = join(dir, 'values.yaml');
  writeFileSync(valuesFile, VALUES);
  let cp: ControlPlane;
  let objects: KubernetesObjectApi;

  before(async () => {
    cp = await startControlPlane();
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    objects = KubernetesObjectApi.makeApiClient(kc);
    await kc.makeApiClient(CoreV1Api).createNamespace({ body: { metadata: { name: 'pullbridge' } } });
  });
  after(async () => cp?.stop());

  const render = async (...extra: string[]): Promise<KubernetesObject[]> => {
    const out = await runAsync(helm, ['template', 'pullbridge', CHART, '-n', 'pullbridge', '--kube-version', KUBE_VERSION.slice(1), '-f', valuesFile, ...extra]);
    return parseAllDocuments(out).map((d) => d.toJS() as KubernetesObject).filter((o) => o && o.kind);
  };

  it('renders offline without --kube-version, as a released helm does (its Kubernetes version is stamped)', async () => {
    // An unstamped helm says v1.20.0 here and fails the chart's `kubeVersion: >=1.25`.
    const version = await runAsync(helm, ['version', '--template', '{{.Version}}']);
    assert.match(version, /^v3\./);
    const out = await runAsync(helm, ['template', 'pullbridge', CHART, '-n', 'pullbridge', '-f', valuesFile]);
    assert.match(out, /kind: DaemonSet/);
  });

  it('lints clean with default and with full values', async () => {
    const plain = await runAsync(helm, ['lint', CHART, '--strict']);
    assert.match(plain, /1 chart\(s\) linted, 0 chart\(s\) failed/);
    const full = await runAsync(helm, ['lint', CHART, '--strict', '-f', valuesFile]);
    assert.match(full, /0 chart\(s\) failed/);
  });

  for (const exposure of ['nodePort', 'hostPort', 'hostNetwork']) {
    it(`renders objects the apiserver accepts (proxy exposure ${exposure})`, async () => {
      const rendered = await render('--set', `proxy.exposure=${exposure}`);
      const kinds = rendered.map((o) => o.kind).sort();
      for (const kind of ['ClusterRole', 'ConfigMap', 'DaemonSet', 'Deployment', 'MutatingWebhookConfiguration', 'PodDisruptionBudget', 'Secret']) assert.ok(kinds.includes(kind), `${kind} rendered`);
      assert.equal(kinds.includes('Service') && rendered.some((o) => o.kind === 'Service' && (o as { spec?: { type?: string } }).spec?.type === 'NodePort'), exposure === 'nodePort');
      // hostNetwork Pods are not subject to NetworkPolicy: no proxy policy for that exposure.
      const policies = rendered.filter((o) => o.kind === 'NetworkPolicy').map((o) => o.metadata?.name);
      assert.deepEqual(policies, exposure === 'hostNetwork' ? ['pullbridge-webhook'] : ['pullbridge-webhook', 'pullbridge-proxy']);
      for (const object of rendered) {
        await objects.create(object, undefined, 'All').catch((error: { body?: unknown }) => {
          throw new Error(`${object.kind}/${object.metadata?.name} rejected: ${JSON.stringify(error.body ?? error)}`);
        });
      }
    });
  }

  it('renders a config.yaml that pullbridge validates, with credentials and CA as mounted files', async () => {
    const configMap = (await render()).find((o) => o.kind === 'ConfigMap') as KubernetesObject & { data: Record<string, string> };
    const result = parseConfig(configMap.data['config.yaml'] ?? '');
    assert.ok(result.ok, result.ok ? '' : JSON.stringify(result.errors));
    const corp = result.config.registries.find((r) => r.name === 'corp');
    assert.equal(corp?.credentials?.passwordFile, '/etc/pullbridge/credentials/corp.password');
    assert.equal(corp?.tls?.caFile, '/etc/pullbridge/config/ca-corp.crt');
    assert.match(configMap.data['ca-corp.crt'] ?? '', /BEGIN CERTIFICATE/);
    assert.equal(result.config.registries.find((r) => r.name === 'onprem')?.forwardProxy?.headers['SAP-Connectivity-SCC-Location_ID'], 'loc-1');
  });

  it('runs both workloads non-root with a read-only root filesystem, and the webhook as configured', async () => {
    const rendered = await render();
    for (const kind of ['Deployment', 'DaemonSet']) {
      const workload = rendered.find((o) => o.kind === kind) as KubernetesObject & { spec: { template: { spec: { securityContext: { runAsNonRoot: boolean }; containers: Array<{ securityContext: { readOnlyRootFilesystem: boolean; allowPrivilegeEscalation: boolean } }> } } } };
      assert.equal(workload.spec.template.spec.securityContext.runAsNonRoot, true, kind);
      assert.equal(workload.spec.template.spec.containers[0]?.securityContext.readOnlyRootFilesystem, true, kind);
      assert.equal(workload.spec.template.spec.containers[0]?.securityContext.allowPrivilegeEscalation, false, kind);
    }
    const hook = rendered.find((o) => o.kind === 'MutatingWebhookConfiguration') as KubernetesObject & { webhooks: Array<Record<string, unknown>> };
    const w = hook.webhooks[0] ?? {};
    assert.equal(w.sideEffects, 'NoneOnDryRun');
    assert.equal(w.reinvocationPolicy, 'IfNeeded');
    assert.deepEqual(w.admissionReviewVersions, ['v1']);
    assert.equal(w.failurePolicy, 'Ignore');
    assert.match(JSON.stringify(w.namespaceSelector), /"kube-system","pullbridge","monitoring"/);
    // Pods for CREATE and for UPDATE (an image change is decided too), ReplicaSets for both (pins).
    assert.deepEqual((w.rules as Array<{ operations: string[]; resources: string[] }>).map((r) => `${r.resources.join()} ${r.operations.join()}`), ['pods CREATE,UPDATE', 'pods/ephemeralcontainers UPDATE', 'replicasets CREATE,UPDATE']);
    assert.deepEqual(w.objectSelector, { matchExpressions: [{ key: 'pullbridge.io/ignore', operator: 'NotIn', values: ['true'] }] }, 'without verify rules, opted-out Pods are never sent');
    const daemonset = JSON.stringify(rendered.find((o) => o.kind === 'DaemonSet'));
    assert.match(daemonset, /"operator":"Exists"/, 'tolerates all taints');
    assert.match(daemonset, /system-node-critical/);
  });

  it('with a verify rule, sends opted-out Pods too (the webhook checks their images on the proxy): no objectSelector', async () => {
    const publicKeyPem = generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).publicKey.export({ type: 'spki', format: 'pem' }).toString();
    const file = join(dir, 'verify-selector.yaml');
    writeFileSync(file, stringifyYaml({ webhook: { failurePolicy: 'Fail' }, registries: [{ name: 'corp', match: ['r.example'], upstream: 'https://r.example', auth: { mode: 'anonymous' }, verify: { cosign: { publicKeys: [publicKeyPem] } } }] }));
    const hook = (await render('-f', file)).find((o) => o.kind === 'MutatingWebhookConfiguration') as KubernetesObject & { webhooks: Array<Record<string, unknown>> };
    assert.equal(hook.webhooks[0]?.objectSelector, undefined);
    assert.match(JSON.stringify(hook.webhooks[0]?.namespaceSelector), /pullbridge\.io\/ignore/, 'the namespace opt-out (set by whoever may label namespaces) stays');
  });

  it('rolls no Pod on a rule change: the Pod templates carry no config checksum (config.yaml is reloaded in place)', async () => {
    type Workload = KubernetesObject & { spec: { template: { metadata: { annotations?: Record<string, string> } } } };
    const templates = (objects: KubernetesObject[]) => new Map(objects.filter((o) => o.kind === 'DaemonSet' || o.kind === 'Deployment').map((o) => [o.kind ?? '', (o as Workload).spec.template]));
    const before = templates(await render());
    // A rule added, cache sizes and excluded namespaces changed.
    const changedValues = join(dir, 'changed.yaml');
    writeFileSync(changedValues, VALUES.replace('webhook:', '  - {name: other, match: [other.example], upstream: "https://other.example", auth: {mode: anonymous}}\nwebhook:').replace('[monitoring]', '[monitoring, ci]') + 'cache: {maxBytes: 5Gi}\n');
    const changed = await render('-f', changedValues);
    const configMap = changed.find((o) => o.kind === 'ConfigMap' && o.metadata?.name === 'pullbridge-config') as KubernetesObject & { data: Record<string, string> };
    assert.match(configMap.data['config.yaml'] ?? '', /other\.example/, 'the config did change');
    const after = templates(changed);
    assert.deepEqual([...before.keys()].sort(), ['DaemonSet', 'Deployment']);
    for (const [kind, template] of before) {
      assert.ok(!Object.keys(template.metadata.annotations ?? {}).some((k) => k.startsWith('checksum/config')), `${kind}: no config checksum`);
      assert.deepEqual(after.get(kind), template, `${kind}: the Pod template is unchanged, so nothing rolls`);
    }
    // The pull secret name is read once at start: changing it rolls the webhook, not the proxy.
    const renamed = templates(await render('--set', 'webhook.pullSecretName=other-pull'));
    assert.notDeepEqual(renamed.get('Deployment'), before.get('Deployment'));
    assert.deepEqual(renamed.get('DaemonSet'), before.get('DaemonSet'));
    const operations = readFileSync(fileURLToPath(new URL('../../docs/operations.md', import.meta.url)), 'utf8');
    assert.match(operations.replace(/\s+/g, ' '), /config changes are picked up within the kubelet sync period/);
  });

  it('gives the proxy its node cache on a hostPath it owns, with the cache settings and per-rule opt-outs in config.yaml', async () => {
    type Spec = { initContainers?: Array<{ name: string; command: string[]; securityContext: { runAsUser: number; capabilities: { drop: string[]; add: string[] } }; volumeMounts: Array<{ name: string; mountPath: string }> }>; containers: Array<{ volumeMounts: Array<{ name: string; mountPath: string }> }>; volumes: Array<{ name: string; hostPath?: { path: string; type: string } }> };
    const specOf = (objects: KubernetesObject[]) => (objects.find((o) => o.kind === 'DaemonSet') as unknown as { spec: { template: { spec: Spec } } }).spec.template.spec;
    const configOf = (objects: KubernetesObject[]) => {
      const result = parseConfig((objects.find((o) => o.kind === 'ConfigMap') as KubernetesObject & { data: Record<string, string> }).data['config.yaml'] ?? '');
      assert.ok(result.ok, result.ok ? '' : JSON.stringify(result.errors));
      return result.config;
    };
    const rendered = await render('--set', 'cache.maxBytes=50Gi', '--set', 'cache.hostPath=/data/pullbridge', '--set', 'registries[0].cache=false', '--set', 'registries[0].name=corp', '--set', 'registries[0].match[0]=r.example', '--set', 'registries[0].upstream=https://r.example');
    const config = configOf(rendered);
    assert.equal(config.cache?.path, '/var/lib/pullbridge/cache');
    assert.equal(config.cache?.maxBytes, 50 * 2 ** 30);
    assert.equal(config.registries.find((r) => r.name === 'corp')?.cache, false);
    const spec = specOf(rendered);
    assert.deepEqual(spec.volumes.find((v) => v.name === 'cache')?.hostPath, { path: '/data/pullbridge', type: 'DirectoryOrCreate' });
    assert.ok(spec.containers[0]?.volumeMounts.some((m) => m.name === 'cache' && m.mountPath === '/var/lib/pullbridge/cache'));
    // The init container hands the directory to the proxy's user with CHOWN alone.
    const owner = spec.initContainers?.find((c) => c.name === 'cache-owner');
    assert.ok(owner);
    assert.equal(owner.securityContext.runAsUser, 0);
    assert.deepEqual(owner.securityContext.capabilities, { drop: ['ALL'], add: ['CHOWN'] });
    assert.match(owner.command.join(' '), /chownSync\(dir, 65532, 65532\)/);
    // Off: no hostPath, no init container, no cache in config.yaml.
    const off = await render('--set', 'cache.enabled=false');
    assert.equal(configOf(off).cache, undefined);
    assert.equal(specOf(off).initContainers, undefined);
    assert.ok(!specOf(off).volumes.some((v) => v.name === 'cache'));
  });

  it('probes and scrapes the proxy on its operations port, which no exposure publishes (loopback with hostNetwork)', async () => {
    type Probe = { httpGet: { path: string; port: string | number; host?: string; scheme?: string }; initialDelaySeconds?: number; periodSeconds?: number; failureThreshold?: number };
    type Container = { args: string[]; ports: Array<{ name: string; containerPort: number; hostPort?: number }>; readinessProbe: Probe; livenessProbe: Probe; startupProbe?: Probe };
    for (const exposure of ['nodePort', 'hostPort', 'hostNetwork']) {
      const rendered = await render('--set', `proxy.exposure=${exposure}`);
      const proxy = (rendered.find((o) => o.kind === 'DaemonSet') as unknown as { spec: { template: { spec: { containers: Container[] } } } }).spec.template.spec.containers[0];
      assert.ok(proxy);
      assert.ok(proxy.args.includes('--ops-port=9090'), exposure);
      const ops = proxy.ports.find((p) => p.name === 'ops');
      // With hostNetwork a declared port becomes a hostPort (the apiserver defaults it): none then.
      assert.equal(ops?.containerPort, exposure === 'hostNetwork' ? undefined : 9090);
      assert.equal(ops?.hostPort, undefined, 'never a hostPort');
      // A startup probe holds the others back while the proxy starts; /startupz holds each try.
      assert.ok(proxy.startupProbe, `${exposure}: a startup probe`);
      assert.equal(proxy.startupProbe.httpGet.path, '/startupz');
      assert.equal(proxy.readinessProbe.httpGet.path, '/readyz');
      assert.ok(startupBudgetSeconds(proxy.startupProbe) >= 120, 'minutes to open a large node cache');
      for (const probe of [proxy.readinessProbe, proxy.livenessProbe, proxy.startupProbe]) {
        assert.equal(probe.httpGet.port, exposure === 'hostNetwork' ? 9090 : 'ops');
        // A hostNetwork Pod's IP is the node's address; the proxy listens on loopback there.
        assert.equal(probe.httpGet.host, exposure === 'hostNetwork' ? '127.0.0.1' : undefined, exposure);
      }
      assert.equal(proxy.args.includes('--ops-host=127.0.0.1'), exposure === 'hostNetwork');
      const services = rendered.filter((o) => o.kind === 'Service') as unknown as Array<{ spec: { ports: Array<{ targetPort: string }> } }>;
      assert.ok(services.every((svc) => svc.spec.ports.every((p) => p.targetPort !== 'ops')), 'no Service publishes the operations port by default');
    }
  });

  it('collects connection status and resolves admission questions by default: the CRD, the webhook\'s collector and resolver flags and rights, the proxies\' collector address; none of it when both are disabled', async () => {
    type Container = { args: string[]; env: Array<{ name: string; valueFrom?: { fieldRef?: { fieldPath: string } } }> };
    const containerOf = (rendered: KubernetesObject[], kind: string) => (rendered.find((o) => o.kind === kind) as unknown as { spec: { template: { spec: { containers: Container[] } } } }).spec.template.spec.containers[0];
    const fieldOf = (c: Container | undefined, name: string) => c?.env.find((e) => e.name === name)?.valueFrom?.fieldRef?.fieldPath;
    const rendered = await render();
    const crd = rendered.find((o) => o.kind === 'CustomResourceDefinition') as unknown as { metadata: { name: string }; spec: { names: { shortNames: string[] }; scope: string; versions: Array<{ additionalPrinterColumns: Array<{ name: string }> }> } } | undefined;
    assert.equal(crd?.metadata.name, 'registryconnections.pullbridge.io');
    assert.equal(crd?.spec.scope, 'Namespaced');
    assert.deepEqual(crd?.spec.names.shortNames, ['regconn']);
    assert.deepEqual(crd?.spec.versions[0]?.additionalPrinterColumns.map((c) => c.name), ['Upstream', 'Ready', 'Reachable', 'Authenticated', 'Nodes', 'Latency', 'Last Error', 'Last Success', 'Age']);
    const webhook = containerOf(rendered, 'Deployment');
    assert.ok(webhook?.args.includes('--status-ops-port=9090'));
    assert.ok(webhook?.args.includes('--status-proxy-selector=app.kubernetes.io/name=pullbridge,app.kubernetes.io/instance=pullbridge,app.kubernetes.io/component=proxy'));
    const daemonSet = rendered.find((o) => o.kind === 'DaemonSet');
    assert.ok(webhook?.args.includes(`--status-proxy-daemonset=${daemonSet?.metadata?.name ?? ''}`), 'the collector reads the Pods of the proxy DaemonSet the chart renders');
    assert.ok(webhook?.args.includes('--status-interval=30'), 'proxy.probeIntervalSeconds by default');
    assert.equal(fieldOf(webhook, 'POD_NAME'), 'metadata.name');
    // The proxy Pods the selector names are the DaemonSet's.
    const daemonset = rendered.find((o) => o.kind === 'DaemonSet') as unknown as { spec: { template: { metadata: { labels: Record<string, string> } } } };
    assert.deepEqual(Object.fromEntries(Object.entries(daemonset.spec.template.metadata.labels).filter(([k]) => k.startsWith('app.kubernetes.io/'))), { 'app.kubernetes.io/name': 'pullbridge', 'app.kubernetes.io/instance': 'pullbridge', 'app.kubernetes.io/component': 'proxy' });
    const proxy = containerOf(rendered, 'DaemonSet');
    assert.ok(proxy?.args.includes('--ops-collector-host=$(POD_IP)'), 'hostNetwork: the operations port also on the Pod IP');
    assert.equal(fieldOf(proxy, 'POD_IP'), 'status.podIP');
    const role = rendered.find((o) => o.kind === 'Role') as unknown as { rules: Array<{ apiGroups: string[]; resources: string[]; verbs: string[]; resourceNames?: string[] }> };
    const granted = (group: string, resource: string) => role.rules.filter((r) => r.apiGroups.includes(group) && r.resources.includes(resource)).flatMap((r) => r.verbs.map((v) => `${v}${r.resourceNames ? `:${r.resourceNames.join(',')}` : ''}`)).sort();
    assert.deepEqual(granted('coordination.k8s.io', 'leases'), ['create', 'get:pullbridge-status-collector', 'update:pullbridge-status-collector']);
    // Only what the collector calls: list, create, delete, and replace of the status.
    assert.deepEqual(granted('pullbridge.io', 'registryconnections'), ['create', 'delete', 'list']);
    assert.deepEqual(granted('pullbridge.io', 'registryconnections/status'), ['update']);
    const interval = containerOf(await render('--set', 'status.intervalSeconds=10'), 'Deployment');
    assert.ok(interval?.args.includes('--status-interval=10'));
    // Other exposures: the operations port already listens on the Pod IP; the collector may reach it through the NetworkPolicy.
    const nodePort = await render('--set', 'proxy.exposure=nodePort');
    assert.ok(!containerOf(nodePort, 'DaemonSet')?.args.some((a) => a.startsWith('--ops-collector-host')));
    const policy = JSON.stringify(nodePort.find((o) => o.kind === 'NetworkPolicy' && o.metadata?.name === 'pullbridge-proxy'));
    assert.match(policy, /\{"ports":\[\{"protocol":"TCP","port":9090\}\],"from":\[\{"podSelector":\{"matchLabels":\{"app.kubernetes.io\/name":"pullbridge","app.kubernetes.io\/instance":"pullbridge","app.kubernetes.io\/component":"webhook"\}\}\}\]\}/);
    // The admission resolver (on by default) finds the same Pods and reaches them on the same address.
    assert.ok(webhook?.args.includes('--resolver-ops-port=9090'));
    assert.ok(webhook?.args.includes('--resolver-deadline-ms=2000'), '40% of webhook.timeoutSeconds (5)');
    const statusOff = await render('--set', 'status.enabled=false');
    assert.equal(statusOff.find((o) => o.kind === 'CustomResourceDefinition'), undefined);
    assert.ok(!containerOf(statusOff, 'Deployment')?.args.some((a) => a.startsWith('--status-ops-port') || a.startsWith('--status-interval')));
    assert.ok(containerOf(statusOff, 'Deployment')?.args.includes('--resolver-ops-port=9090'), 'the resolver still finds the proxies');
    assert.ok(containerOf(statusOff, 'DaemonSet')?.args.includes('--ops-collector-host=$(POD_IP)'), 'and still reaches them on the Pod IP');
    assert.ok(!JSON.stringify(statusOff.find((o) => o.kind === 'Role')).includes('registryconnections'));
    const off = await render('--set', 'status.enabled=false', '--set', 'webhook.resolver.enabled=false');
    assert.ok(!containerOf(off, 'Deployment')?.args.some((a) => a.startsWith('--status-') || a.startsWith('--resolver-')));
    assert.ok(!containerOf(off, 'DaemonSet')?.args.some((a) => a.startsWith('--ops-collector-host')));
    assert.equal(fieldOf(containerOf(off, 'DaemonSet'), 'POD_IP'), undefined);
    const noCrd = await render('--set', 'status.installCRD=false');
    assert.equal(noCrd.find((o) => o.kind === 'CustomResourceDefinition'), undefined, 'a second release leaves the definition to the first');
    assert.ok(containerOf(noCrd, 'Deployment')?.args.includes('--status-ops-port=9090'));
    // The PrometheusRule is opt-in (test/status-cluster.test.ts checks its metric names against the real exports).
    assert.equal(rendered.find((o) => o.kind === 'PrometheusRule'), undefined);
    const rule = (await render('--set', 'metrics.prometheusRule.enabled=true', '--set', 'metrics.prometheusRule.labels.release=prom')).find((o) => o.kind === 'PrometheusRule');
    assert.equal(rule?.metadata?.labels?.release, 'prom');
    assert.equal(rule?.apiVersion, 'monitoring.coreos.com/v1');
  });

  it('gives the webhook a startup probe on its metrics port (up before the certificate bootstrap), and the apiserver accepts both workloads with theirs', async () => {
    type Probe = { httpGet: { path: string; port: string | number; scheme?: string }; periodSeconds?: number; failureThreshold?: number; timeoutSeconds?: number };
    const rendered = await render();
    const webhook = (rendered.find((o) => o.kind === 'Deployment') as unknown as { spec: { template: { spec: { containers: Array<{ readinessProbe: Probe; startupProbe?: Probe }> } } } }).spec.template.spec.containers[0];
    assert.ok(webhook?.startupProbe);
    // On the metrics port, which listens before the certificate bootstrap (HTTPS opens after it).
    assert.deepEqual(webhook.startupProbe.httpGet, { path: '/startupz', port: 'metrics' });
    assert.deepEqual(webhook.readinessProbe.httpGet, { path: '/readyz', port: 'https', scheme: 'HTTPS' });
    assert.ok(startupBudgetSeconds(webhook.startupProbe) >= 60, 'time for the certificate bootstrap');
    for (const exposure of ['nodePort', 'hostPort', 'hostNetwork']) {
      const workloads = (await render('--set', `proxy.exposure=${exposure}`)).filter((o) => o.kind === 'DaemonSet' || o.kind === 'Deployment');
      for (const object of workloads) {
        object.metadata = { ...object.metadata, name: `${object.metadata?.name ?? ''}-startup-${exposure.toLowerCase()}` };
        const created = (await objects.create(object, undefined, 'All')) as unknown as { spec: { template: { spec: { containers: Array<{ startupProbe?: Probe }> } } } };
        assert.ok(created.spec.template.spec.containers[0]?.startupProbe, `${object.kind} (${exposure}) keeps its startup probe`);
      }
    }
  });

  describe('rewrite: never rules', () => {
    const NEVER_RULE = '  - {name: vendor, match: ["vendor.example:5000", docker.io], upstream: "https://vendor.example:5000", rewrite: never, shareUpstreamCredentials: true, namespaces: {include: ["team-*"]}, credentials: {username: vendor-robot, password: vendor-s3cret}}\n';
    const neverValues = join(dir, 'never.yaml');
    writeFileSync(neverValues, VALUES.replace('webhook:', `${NEVER_RULE}webhook:`));
    type Workload = KubernetesObject & { spec: { template: { spec: { containers: Array<{ volumeMounts: Array<{ name: string; mountPath: string }> }>; volumes: Array<{ name: string; secret?: { secretName: string } }> } } } };
    const secretData = (objects: KubernetesObject[], name: string) => ((objects.find((o) => o.kind === 'Secret' && o.metadata?.name === name) as (KubernetesObject & { data?: Record<string, string> }) | undefined)?.data ?? {});

    it('keeps the never rule\'s credential in a Secret of its own, which the webhook mounts and reads, and no other rule\'s', async () => {
      const rendered = await render('-f', neverValues);
      assert.deepEqual(Object.keys(secretData(rendered, 'pullbridge-pull-secret-credentials')).sort(), ['vendor.password', 'vendor.username']);
      assert.equal(Buffer.from(secretData(rendered, 'pullbridge-pull-secret-credentials')['vendor.password'] ?? '', 'base64').toString(), 'vendor-s3cret');
      assert.deepEqual(Object.keys(secretData(rendered, 'pullbridge-upstream-credentials')).sort(), ['corp.password', 'corp.username'], 'the proxies\' Secret holds the others');
      const configMap = rendered.find((o) => o.kind === 'ConfigMap' && o.metadata?.name === 'pullbridge-config') as KubernetesObject & { data: Record<string, string> };
      const result = parseConfig(configMap.data['config.yaml'] ?? '');
      assert.ok(result.ok, result.ok ? '' : JSON.stringify(result.errors));
      const vendor = result.config.registries.find((r) => r.name === 'vendor');
      assert.deepEqual([vendor?.rewrite, vendor?.shareUpstreamCredentials, vendor?.credentials?.passwordFile], ['never', true, '/etc/pullbridge/pull-secret-credentials/vendor.password']);
      // Every file the webhook reads for this config is in a volume the webhook mounts; the other rules' credentials are not.
      const mountsOf = (kind: string) => {
        const workload = rendered.find((o) => o.kind === kind) as Workload;
        const volumes = new Map(workload.spec.template.spec.volumes.map((v) => [v.name, v.secret?.secretName]));
        return workload.spec.template.spec.containers[0]?.volumeMounts.map((m) => ({ path: m.mountPath, secret: volumes.get(m.name) })) ?? [];
      };
      const webhookMounts = mountsOf('Deployment');
      for (const file of filesReadBy(result.config, 'webhook')) {
        assert.ok(webhookMounts.some((m) => file.path.startsWith(`${m.path}/`)), `${file.key} ${file.path} is mounted in the webhook`);
      }
      assert.ok(filesReadBy(result.config, 'webhook').some((f) => f.path === '/etc/pullbridge/pull-secret-credentials/vendor.password'));
      assert.deepEqual(webhookMounts.map((m) => m.secret).filter((s) => s !== undefined && /credentials/.test(s)), ['pullbridge-pull-secret-credentials']);
      const proxyMounts = mountsOf('DaemonSet');
      for (const file of filesReadBy(result.config, 'proxy')) assert.ok(proxyMounts.some((m) => file.path.startsWith(`${m.path}/`)), `${file.key} ${file.path} is mounted in the proxy`);
    });

    it('lets the webhook manage the rule\'s pull secret by name (RBAC), rolls no Pod when a never rule is added, and the apiserver accepts it all', async () => {
      const rendered = await render('-f', neverValues);
      const role = rendered.find((o) => o.kind === 'ClusterRole' && o.metadata?.name === 'pullbridge-webhook') as KubernetesObject & { rules: Array<{ resources: string[]; resourceNames?: string[]; verbs: string[] }> };
      assert.deepEqual(role.rules.find((r) => r.resources.includes('secrets') && r.verbs.includes('delete'))?.resourceNames, ['pullbridge-pull', 'pullbridge-pull-vendor']);
      type Templated = KubernetesObject & { spec: { template: unknown } };
      const templates = (objects: KubernetesObject[]) => objects.filter((o) => o.kind === 'DaemonSet' || o.kind === 'Deployment').map((o) => (o as Templated).spec.template);
      assert.deepEqual(templates(rendered), templates(await render()), 'the Pod templates do not depend on the rules');
      for (const object of rendered) {
        await objects.create(object, undefined, 'All').catch((error: { body?: unknown }) => {
          throw new Error(`${object.kind}/${object.metadata?.name} rejected: ${JSON.stringify(error.body ?? error)}`);
        });
      }
    });

    it('refuses a never rule without the opt-in or the namespace list, with a credentialsSecret, and the opt-in elsewhere, naming the key', async () => {
      const refused = async (rule: string, message: RegExp) => {
        const file = join(dir, 'never-bad.yaml');
        writeFileSync(file, `registries:\n${rule}`);
        await assert.rejects(render('-f', file), message);
      };
      await refused(NEVER_RULE.replace('shareUpstreamCredentials: true, ', ''), /registries\[0\]\.shareUpstreamCredentials: rewrite: never writes this rule's upstream credential itself/);
      await refused(NEVER_RULE.replace('namespaces: {include: ["team-*"]}, ', ''), /registries\[0\]\.namespaces\.include: rewrite: never hands the upstream credential to namespaces/);
      await refused(NEVER_RULE.replace('credentials: {username: vendor-robot, password: vendor-s3cret}', 'credentialsSecret: vendor-robot'), /registries\[0\]\.credentialsSecret: not with rewrite: never/);
      await refused('  - {name: corp, match: [c.example], upstream: "https://c.example", shareUpstreamCredentials: true}\n', /registries\[0\]\.shareUpstreamCredentials: only with rewrite: never/);
    });
  });

  describe('verify rules: the webhook takes up the keys the chart writes', function () {
    this.timeout(300_000);
    let registry: RegistryHandle;
    let signer: CosignKeyPair;
    let rotated: CosignKeyPair;
    const images = new Map<string, TestImage>();

    before(async () => {
      registry = await startRegistry({ auth: 'none' });
      for (const tag of ['signed', 'unsigned']) {
        const image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [256] });
        images.set(tag, image);
        await registry.push(image, 'team/app', tag);
      }
      [signer, rotated] = await Promise.all([generateKeyPair(), generateKeyPair()]);
      await sign(`${registry.host}/team/app@${images.get('signed')!.index.digest}`, signer);
      const kc = new KubeConfig();
      kc.loadFromFile(cp.kubeconfig);
      await kc.makeApiClient(CoreV1Api).createNamespace({ body: { metadata: { name: 'team' } } });
    });
    after(async () => {
      await registry?.stop();
      removeCosignFiles();
    });

    it('a verify rule whose key file reaches the webhook after config.yaml is retried and taken up then; the chart\'s keys arrive with config.yaml (one ConfigMap volume) and are taken up at once', async () => {
      // The Pod's volumes as kubelet writes them: the config ConfigMap by its atomic writer (a new
      // `..data` symlink renamed over the old one), the broker Secret, and a directory standing for a
      // key ConfigMap of its own that kubelet updates at another moment.
      const root = mkdtempSync(join(dir, 'webhook-volumes-'));
      const configVolume = join(root, 'config');
      const keysVolume = join(root, 'keys');
      mkdirSync(configVolume);
      mkdirSync(join(root, 'broker'));
      writeFileSync(join(root, 'broker', 'key-0'), randomBytes(32).toString('hex'));
      let generation = 0;
      let published: string | undefined;
      const publish = (data: Record<string, string>) => {
        const dataDir = `..2026_12_06_21_00_0${generation++}.1`;
        mkdirSync(join(configVolume, dataDir));
        for (const [name, text] of Object.entries(data)) writeFileSync(join(configVolume, dataDir, name), text.replaceAll('/etc/pullbridge/', `${root}/`));
        symlinkSync(dataDir, join(configVolume, '..data_tmp'));
        renameSync(join(configVolume, '..data_tmp'), join(configVolume, '..data'));
        if (published) rmSync(join(configVolume, published), { recursive: true });
        // Each key's own symlink into `..data`, made once, for a key the ConfigMap did not have before.
        for (const name of Object.keys(data)) if (!existsSync(join(configVolume, name))) symlinkSync(`..data/${name}`, join(configVolume, name));
        published = dataDir;
      };
      const chartConfigMap = async (verify: Record<string, unknown> | undefined): Promise<Record<string, string>> => {
        const file = join(dir, `verify-${generation}.yaml`);
        writeFileSync(file, stringifyYaml({ webhook: { failurePolicy: 'Fail' }, registries: [{ name: 'corp', match: [registry.host], upstream: registry.url, auth: { mode: 'anonymous' }, ...(verify ? { verify } : {}) }] }));
        const rendered = await runAsync(helm, ['template', 'pullbridge', CHART, '-n', 'pullbridge', '--kube-version', KUBE_VERSION.slice(1), '-f', file]);
        const configMap = parseAllDocuments(rendered).map((d) => d.toJS() as KubernetesObject & { data?: Record<string, string> }).find((o) => o?.kind === 'ConfigMap' && o.metadata?.name === 'pullbridge-config');
        return configMap?.data ?? {};
      };

      // No verify yet: the rule rewrites without asking for signatures.
      const plain = await chartConfigMap(undefined);
      publish(plain);
      const initial = parseConfig(readFileSync(join(configVolume, 'config.yaml'), 'utf8'));
      assert.ok(initial.ok, initial.ok ? '' : JSON.stringify(initial.errors));
      const logs = memoryLogger();
      const webhook = await runWebhook({ config: initial.config, configPath: join(configVolume, 'config.yaml'), host: '127.0.0.1', port: 0, kubeconfig: cp.kubeconfig, logger: logs.logger, reconcileIntervalMs: 3_600_000, upstream: { view: directRegistryView({ upstream: registry.url }) } });
      const admit = async (tag: string) => {
        const pod = podWith({ containers: [{ name: 'app', image: `${registry.host}/team/app:${tag}` }] }, { name: `web-${tag}`, namespace: 'team' });
        const res = await fetch(`${webhook.running.url}/mutate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(reviewFor(pod, { namespace: 'team' })) });
        const { response } = (await res.json()) as { response: { allowed: boolean; patch?: string; status?: { message: string } } };
        return { allowed: response.allowed, message: response.status?.message ?? '', image: response.patch ? applyPatch(pod as unknown as PodShape, decodePatch(response.patch)).spec.containers[0]?.image : undefined };
      };
      const inForce = () => webhook.watcher?.current().registries[0]?.verify;
      const rejections = () => logs.records.filter((r) => r.msg === 'config change rejected; the last good config stays in force').length;
      /** Polls (bounded) until the webhook's config watcher took a config up. */
      const takenUp = async (what: string, done: () => boolean) => {
        for (let i = 0; i < 200 && !done(); i++) {
          webhook.watcher?.check();
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
        assert.ok(done(), what);
      };
      const signedDigest = images.get('signed')!.index.digest;
      try {
        assert.equal((await admit('unsigned')).image, `localhost:30500/corp/team/app:unsigned`);

        // 1. config.yaml names a key file in another volume that kubelet has not updated yet.
        const separate = { ...plain, 'config.yaml': plain['config.yaml']!.replace('auth: {"mode":"anonymous"}', `auth: {"mode":"anonymous"}\n    verify: {cosign: {publicKeyFiles: [${keysVolume}/corp-0.pub]}}`) };
        publish(separate);
        await takenUp('the change is seen and rejected: its key file is not there', () => rejections() === 1);
        assert.equal(inForce(), undefined, 'the last good config stays in force');
        assert.match(JSON.stringify(logs.records.filter((r) => r.msg === 'config change rejected; the last good config stays in force')), /registries\[0\]\.verify\.cosign\.publicKeyFiles\[0\]/);
        assert.equal((await admit('unsigned')).allowed, true, 'meanwhile admitted as before');
        // ...then the key arrives: the same config.yaml is tried again and taken up.
        mkdirSync(keysVolume);
        writeFileSync(join(keysVolume, 'corp-0.pub'), signer.publicKeyPem);
        await takenUp('taken up once the key file is there', () => inForce() !== undefined);
        assert.equal(rejections(), 1, 'reported once, not at every retry');
        assert.equal((await admit('signed')).image, `localhost:30500/corp/team/app:signed@${signedDigest}`);
        const unsigned = await admit('unsigned');
        assert.equal(unsigned.allowed, false);
        assert.match(unsigned.message, /image .*team\/app:unsigned: .*unsigned/);

        // 2. The chart's way: the key in the config ConfigMap beside config.yaml, here a rotated one.
        publish(await chartConfigMap({ cosign: { publicKeys: [rotated.publicKeyPem] } }));
        await takenUp('the chart\'s ConfigMap is taken up', () => inForce()?.cosign.publicKeyFiles[0] === `${configVolume}/cosign-corp-0.pub`);
        assert.equal(rejections(), 1, 'never rejected: its key file came with it');
        const byOldKey = await admit('signed');
        assert.equal(byOldKey.allowed, false, 'verified with the rotated key, which did not sign it');
        assert.match(byOldKey.message, /signed by another key/);
        // ...and back to the key that signed it, with onFailure: warn.
        publish(await chartConfigMap({ cosign: { publicKeys: [rotated.publicKeyPem, signer.publicKeyPem] }, onFailure: 'warn' }));
        await takenUp('two keys taken up', () => inForce()?.cosign.publicKeyFiles.length === 2);
        assert.equal((await admit('signed')).image, `localhost:30500/corp/team/app:signed@${signedDigest}`);
        assert.equal((await admit('unsigned')).allowed, true, 'warn admits');
        assert.equal(rejections(), 1);
      } finally {
        await webhook.shutdown();
      }
    });
  });

  describe('shared cache tier (cache.shared)', () => {
    type Mount = { name: string; mountPath: string; readOnly?: boolean };
    type Volume = { name: string; secret?: { secretName: string; items?: Array<{ key: string; path: string }> }; persistentVolumeClaim?: { claimName: string } };
    type EnvVar = { name: string; value?: string; valueFrom?: { fieldRef?: { fieldPath: string } } };
    type PodTemplate = { metadata: { annotations?: Record<string, string> }; spec: { securityContext: Record<string, unknown>; containers: Array<{ name: string; env: EnvVar[]; volumeMounts: Mount[] }>; volumes: Volume[] } };
    const template = (objects: KubernetesObject[]) => (objects.find((o) => o.kind === 'DaemonSet') as unknown as { spec: { template: PodTemplate } }).spec.template;
    /** config.yaml from the ConfigMap, as YAML (not through the project's parser: that is checked separately). */
    const configDocument = (objects: KubernetesObject[]): { cache?: { shared?: Record<string, unknown> } } => {
      const configMap = objects.find((o) => o.kind === 'ConfigMap' && o.metadata?.name === 'pullbridge-config') as KubernetesObject & { data: Record<string, string> };
      return parseYaml(configMap.data['config.yaml'] ?? '') as { cache?: { shared?: Record<string, unknown> } };
    };
    const renderWith = async (values: unknown, ...extra: string[]) => {
      const file = join(dir, `shared-${randomBytes(4).toString('hex')}.yaml`);
      writeFileSync(file, stringifyYaml(values));
      return render('-f', file, ...extra);
    };
    const shared = (settings: Record<string, unknown>) => ({ cache: { shared: settings } });

    // Each backend as a user writes it, what config.yaml must say, and the Secret keys mounted (file -> key).
    const cases: Array<{ name: string; values: Record<string, unknown>; config: Record<string, unknown>; items?: Record<string, string>; claim?: string }> = [
      {
        name: 's3, a Kyma DockerRegistry storage Secret (accessKey, secretKey)',
        values: { backend: 's3', existingSecret: 's3-storage', s3: { bucket: 'images', region: 'eu-central-1' } },
        config: { s3: { bucket: 'images', region: 'eu-central-1', forcePathStyle: false, accessKeyFile: '/etc/pullbridge/shared/access-key', secretKeyFile: '/etc/pullbridge/shared/secret-key' } },
        items: { 'access-key': 'accessKey', 'secret-key': 'secretKey' },
      },
      {
        name: 's3, an SAP BTP Object Store binding Secret (AWS)',
        values: { backend: 's3', existingSecret: 'objectstore-binding', s3: { bucket: 'hcp-1234', region: 'eu-central-1', secretKeys: { accessKey: 'access_key_id', secretKey: 'secret_access_key' } } },
        config: { s3: { bucket: 'hcp-1234', region: 'eu-central-1', forcePathStyle: false, accessKeyFile: '/etc/pullbridge/shared/access-key', secretKeyFile: '/etc/pullbridge/shared/secret-key' } },
        items: { 'access-key': 'access_key_id', 'secret-key': 'secret_access_key' },
      },
      {
        name: 's3-compatible store with the default credential chain (no Secret), a prefix and tuned timings',
        values: { backend: 's3', fillWaitSeconds: 60, timeoutSeconds: 10, streamFills: false, s3: { bucket: 'images', endpoint: 'http://minio.storage:9000', forcePathStyle: true, prefix: 'pullbridge/' } },
        config: { fillWaitSeconds: 60, timeoutSeconds: 10, streamFills: false, s3: { bucket: 'images', region: 'us-east-1', endpoint: 'http://minio.storage:9000', forcePathStyle: true, prefix: 'pullbridge/' } },
      },
      {
        name: 'azure, a Kyma DockerRegistry storage Secret (accountName, accountKey)',
        values: { backend: 'azure', existingSecret: 'azure-storage', azure: { container: 'images' } },
        config: { azure: { container: 'images', accountNameFile: '/etc/pullbridge/shared/account-name', accountKeyFile: '/etc/pullbridge/shared/account-key' } },
        items: { 'account-name': 'accountName', 'account-key': 'accountKey' },
      },
      {
        name: 'azure, an SAP BTP Object Store binding Secret (account_name, sas_token) at its DNS-zone endpoint',
        values: { backend: 'azure', existingSecret: 'objectstore-binding', azure: { container: 'sap-cp-osaas-1234', endpoint: 'https://acct.z17.blob.storage.azure.net', secretKeys: { accountName: 'account_name', sasToken: 'sas_token' } } },
        config: { azure: { container: 'sap-cp-osaas-1234', endpoint: 'https://acct.z17.blob.storage.azure.net', accountNameFile: '/etc/pullbridge/shared/account-name', sasTokenFile: '/etc/pullbridge/shared/sas-token' } },
        items: { 'account-name': 'account_name', 'sas-token': 'sas_token' },
      },
      {
        name: 'azure, the account name in the values and the key from the Secret',
        values: { backend: 'azure', existingSecret: 'azure-storage', azure: { container: 'images', accountName: 'corpimages', prefix: 'cache/' } },
        config: { azure: { container: 'images', accountName: 'corpimages', prefix: 'cache/', accountKeyFile: '/etc/pullbridge/shared/account-key' } },
        items: { 'account-key': 'accountKey' },
      },
      {
        name: 'gcs, a Kyma DockerRegistry storage Secret (accountkey)',
        values: { backend: 'gcs', existingSecret: 'gcs-secret', gcs: { bucket: 'images' } },
        config: { gcs: { bucket: 'images', keyFile: '/etc/pullbridge/shared/key' } },
        items: { key: 'accountkey' },
      },
      {
        name: 'gcs, an SAP BTP Object Store binding Secret (base64EncodedPrivateKeyData: the key file holds base64 of the JSON key, which the store decodes)',
        values: { backend: 'gcs', existingSecret: 'objectstore-binding', gcs: { bucket: 'sap-cp-osaas-1234', secretKeys: { key: 'base64EncodedPrivateKeyData' } } },
        config: { gcs: { bucket: 'sap-cp-osaas-1234', keyFile: '/etc/pullbridge/shared/key' } },
        items: { key: 'base64EncodedPrivateKeyData' },
      },
      {
        name: 'gcs with workload identity (no Secret)',
        values: { backend: 'gcs', gcs: { bucket: 'images', prefix: 'pullbridge/' } },
        config: { gcs: { bucket: 'images', prefix: 'pullbridge/' } },
      },
      {
        name: 'filesystem, a ReadWriteMany claim',
        values: { backend: 'filesystem', filesystem: { existingClaim: 'pullbridge-shared' } },
        config: { filesystem: { path: '/var/lib/pullbridge/shared' } },
        claim: 'pullbridge-shared',
      },
    ];

    for (const c of cases) {
      it(`${c.name}: config.yaml the proxy accepts, the Secret's keys as files, NODE_NAME, and the apiserver accepts it all`, async () => {
        const rendered = await renderWith(shared(c.values));
        const document = configDocument(rendered);
        assert.deepEqual(document.cache?.shared, { fillWaitSeconds: 120, timeoutSeconds: 30, streamFills: true, ...c.config });
        // The proxy's own validation: chart and proxy agree on every key.
        const result = validateConfig(document);
        assert.ok(result.ok, result.ok ? '' : JSON.stringify(result.errors));
        assert.ok(result.config.cache?.shared, 'the proxy sees a shared tier');

        const pod = template(rendered);
        const proxy = pod.spec.containers.find((container) => container.name === 'proxy');
        assert.ok(proxy);
        assert.deepEqual(proxy.env.find((e) => e.name === 'NODE_NAME')?.valueFrom, { fieldRef: { fieldPath: 'spec.nodeName' } });
        const credentials = pod.spec.volumes.find((v) => v.name === 'shared-credentials');
        const credentialMount = proxy.volumeMounts.find((m) => m.name === 'shared-credentials');
        if (c.items) {
          assert.equal(credentials?.secret?.secretName, c.values['existingSecret']);
          assert.deepEqual(Object.fromEntries((credentials?.secret?.items ?? []).map((i) => [i.path, i.key])), c.items);
          assert.deepEqual(credentialMount, { name: 'shared-credentials', mountPath: '/etc/pullbridge/shared', readOnly: true });
          // Every file config.yaml names is one the volume provides.
          const named = Object.entries((Object.values(c.config).find((v) => typeof v === 'object') ?? {}) as Record<string, unknown>).filter(([k]) => k.endsWith('File')).map(([, v]) => v);
          assert.deepEqual(named.sort(), Object.keys(c.items).map((file) => `/etc/pullbridge/shared/${file}`).sort());
        } else {
          assert.equal(credentials, undefined, 'no Secret: the default credential chain');
          assert.equal(credentialMount, undefined);
        }
        if (c.claim) {
          assert.deepEqual(pod.spec.volumes.find((v) => v.name === 'shared')?.persistentVolumeClaim, { claimName: c.claim });
          assert.deepEqual(proxy.volumeMounts.find((m) => m.name === 'shared'), { name: 'shared', mountPath: '/var/lib/pullbridge/shared' });
          assert.equal(pod.spec.securityContext['fsGroup'], 65532, 'the proxy\'s group may write the share');
        } else {
          assert.ok(!pod.spec.volumes.some((v) => v.name === 'shared'));
          assert.equal(pod.spec.securityContext['fsGroup'], undefined);
        }
        assert.match(pod.metadata.annotations?.['checksum/cache-shared'] ?? '', /^[0-9a-f]{64}$/);
        // Server-side dry run of everything rendered with the shared tier on.
        for (const object of rendered) {
          await objects.create(object, undefined, 'All').catch((error: { body?: unknown }) => {
            throw new Error(`${object.kind}/${object.metadata?.name} rejected: ${JSON.stringify(error.body ?? error)}`);
          });
        }
      });
    }

    it('is off by default: no shared tier in config.yaml, no volume, no checksum; NODE_NAME is set anyway', async () => {
      const rendered = await render();
      assert.equal(configDocument(rendered).cache?.shared, undefined);
      const pod = template(rendered);
      assert.ok(!pod.spec.volumes.some((v) => v.name.startsWith('shared')));
      assert.equal(pod.metadata.annotations, undefined);
      assert.ok(pod.spec.containers[0]?.env.some((e) => e.name === 'NODE_NAME'));
      // Settings kept with the backend emptied are off too.
      const off = await renderWith(shared({ backend: '', existingSecret: 's3-storage', s3: { bucket: 'images' } }));
      assert.equal(configDocument(off).cache?.shared, undefined);
      assert.equal(template(off).metadata.annotations, undefined);
      // Values without the block at all (an upgrade with --reuse-values from an older chart).
      assert.equal(configDocument(await render('--set', 'cache.shared=null')).cache?.shared, undefined);
    });

    it('rolls the proxies when the shared settings change, and only then (the proxy reads them at start)', async () => {
      const base = { backend: 's3', existingSecret: 's3-storage', s3: { bucket: 'images', region: 'eu-central-1' } };
      const checksum = async (values: unknown, ...extra: string[]) => template(await renderWith(values, ...extra)).metadata.annotations?.['checksum/cache-shared'];
      const before = await checksum(shared(base));
      assert.ok(before);
      // Rules, cache sizes and TTLs are reloaded in place: the Pod template stays as it is.
      const unrelated = await renderWith(shared(base), '--set', 'registries[2].upstream=https://mirror.example', '--set', 'cache.maxBytes=5Gi', '--set', 'cache.tagTTLSeconds=60');
      assert.match(JSON.stringify(configDocument(unrelated)), /mirror\.example/);
      assert.deepEqual(template(unrelated), template(await renderWith(shared(base))));
      for (const change of [{ s3: { ...base.s3, bucket: 'other' } }, { timeoutSeconds: 5 }, { fillWaitSeconds: 30 }, { s3: { ...base.s3, prefix: 'p/' } }]) {
        assert.notEqual(await checksum(shared({ ...base, ...change })), before, JSON.stringify(change));
      }
      // Another backend is another checksum.
      assert.notEqual(await checksum(shared({ backend: 'gcs', existingSecret: 's3-storage', gcs: { bucket: 'images' } })), before);
      // values.yaml says so where it lists what rolls the Pods.
      const values = readFileSync(join(CHART, 'values.yaml'), 'utf8').split('\n').slice(0, 16).join(' ');
      assert.match(values, /what cannot be \(.*cache\.shared.*\) changes the Pod templates and rolls them/);
    });

    it('refuses an unknown backend, two backends, a backend without its store or needed Secret, with a clear message', async () => {
      const refusals: Array<[Record<string, unknown>, RegExp]> = [
        // The values schema refuses these first, naming the key.
        [{ backend: 'minio' }, /cache\.shared\.backend: cache\.shared\.backend must be one of the following: "", "s3", "azure", "gcs", "filesystem"/],
        [{ backend: 's3', s3: { bucket: 'images' }, minio: { bucket: 'x' } }, /cache\.shared: Additional property minio is not allowed/],
        [{ backend: 's3', s3: { bucket: 'images' }, azure: { container: 'images' } }, /cache\.shared\.backend is s3, but cache\.shared\.azure\.container is set too: the shared tier has one backend/],
        [{ backend: 'gcs', gcs: { bucket: 'images' }, filesystem: { existingClaim: 'shared' } }, /cache\.shared\.backend is gcs, but cache\.shared\.filesystem\.existingClaim is set too/],
        [{ backend: 's3' }, /cache\.shared\.backend is s3: set cache\.shared\.s3\.bucket/],
        [{ backend: 'filesystem' }, /cache\.shared\.backend is filesystem: set cache\.shared\.filesystem\.existingClaim/],
        [{ backend: 'azure', azure: { container: 'images' } }, /cache\.shared\.backend is azure: set cache\.shared\.existingSecret, a Secret with the storage account key or a SAS token/],
        [{ backend: 'azure', existingSecret: 'a', azure: { container: 'images', secretKeys: { accountKey: '' } } }, /cache\.shared\.azure\.secretKeys needs accountKey or sasToken/],
        [{ backend: 'azure', existingSecret: 'a', azure: { container: 'images', secretKeys: { accountName: '' } } }, /cache\.shared\.azure needs accountName, or secretKeys\.accountName/],
        [{ backend: 's3', existingSecret: 'a', s3: { bucket: 'images', secretKeys: { secretKey: '' } } }, /cache\.shared\.s3\.secretKeys needs accessKey and secretKey/],
        [{ backend: 'gcs', existingSecret: 'a', gcs: { bucket: 'images', secretKeys: { key: '' } } }, /cache\.shared\.gcs\.secretKeys\.key must name the key/],
      ];
      for (const [values, message] of refusals) await assert.rejects(renderWith(shared(values)), message, JSON.stringify(values));
      await assert.rejects(renderWith(shared({ backend: 's3', s3: { bucket: 'images' } }), '--set', 'cache.enabled=false'), /cache\.shared needs the node cache: set cache\.enabled=true/);
    });

    it('lints clean with a shared backend', async () => {
      const file = join(dir, 'shared-lint.yaml');
      writeFileSync(file, stringifyYaml(shared({ backend: 'azure', existingSecret: 'azure-storage', azure: { container: 'images' } })));
      assert.match(await runAsync(helm, ['lint', CHART, '--strict', '-f', valuesFile, '-f', file]), /0 chart\(s\) failed/);
    });
  });

  describe('NetworkPolicies', () => {
    type Peer = Record<string, unknown>;
    type Policy = KubernetesObject & { spec: { podSelector: { matchLabels: Record<string, string> }; policyTypes: string[]; ingress: Array<{ ports: Array<{ port: string | number; protocol: string }>; from: Peer[] }> } };
    const policies = (objects: KubernetesObject[]) => new Map(objects.filter((o) => o.kind === 'NetworkPolicy').map((o) => [o.metadata?.name ?? '', o as Policy]));
    const containerPorts = (objects: KubernetesObject[], kind: string) =>
      ((objects.find((o) => o.kind === kind) as unknown as { spec: { template: { spec: { containers: Array<{ ports: Array<{ name: string; containerPort: number }> }> } } } }).spec.template.spec.containers[0]?.ports ?? []).map((p) => p.name);

    it('by default: the webhook port from the apiserver sources, metrics from Prometheus; the proxy registry port from the node alone (nodePort), no proxy policy (hostNetwork, the default)', async () => {
      // hostNetwork Pods are not subject to NetworkPolicy; the default proxy listens on loopback only.
      assert.deepEqual([...policies(await render()).keys()], ['pullbridge-webhook']);
      const rendered = await render('--set', 'proxy.exposure=nodePort');
      const webhook = policies(rendered).get('pullbridge-webhook');
      assert.ok(webhook);
      assert.deepEqual(webhook.spec.podSelector.matchLabels, { 'app.kubernetes.io/name': 'pullbridge', 'app.kubernetes.io/instance': 'pullbridge', 'app.kubernetes.io/component': 'webhook' });
      assert.deepEqual(webhook.spec.policyTypes, ['Ingress']);
      assert.deepEqual(webhook.spec.ingress.map((r) => r.ports), [[{ protocol: 'TCP', port: 'https' }], [{ protocol: 'TCP', port: 'metrics' }]]);
      assert.deepEqual(webhook.spec.ingress[0]?.from, [
        { ipBlock: { cidr: '0.0.0.0/0' } },
        { ipBlock: { cidr: '::/0' } },
        { namespaceSelector: { matchLabels: { 'kubernetes.io/metadata.name': 'kube-system' } } },
      ]);
      const prometheus = [{ namespaceSelector: {}, podSelector: { matchLabels: { 'app.kubernetes.io/name': 'prometheus' } } }];
      const collector = { podSelector: { matchLabels: { 'app.kubernetes.io/name': 'pullbridge', 'app.kubernetes.io/instance': 'pullbridge', 'app.kubernetes.io/component': 'webhook' } } };
      assert.deepEqual(webhook.spec.ingress[1]?.from, prometheus);
      // Named ports must be ports the Pods declare, or the rule opens nothing.
      assert.deepEqual(containerPorts(rendered, 'Deployment'), ['https', 'metrics']);
      const args = JSON.stringify(rendered.find((o) => o.kind === 'Deployment'));
      assert.match(args, /--metrics-port=9090/);

      const proxy = policies(rendered).get('pullbridge-proxy');
      assert.ok(proxy);
      assert.equal(proxy.spec.podSelector.matchLabels['app.kubernetes.io/component'], 'proxy');
      // No rule names the registry port: only the node's own traffic (never blocked) reaches it.
      // The operations port: Prometheus, and the webhook's status collector.
      assert.deepEqual(proxy.spec.ingress.map((r) => r.ports), [[{ protocol: 'TCP', port: 9090 }], [{ protocol: 'TCP', port: 9090 }]]);
      assert.deepEqual(proxy.spec.ingress[0]?.from, prometheus);
      assert.deepEqual(proxy.spec.ingress[1]?.from, [collector]);
    });

    it('takes the sources from values, renders a closed policy for empty ones, and none when disabled; the apiserver accepts them', async () => {
      const custom = join(dir, 'netpol.yaml');
      writeFileSync(custom, `
networkPolicy:
  apiserverSources: [{ipBlock: {cidr: 192.0.2.0/28}}]
  metricsSources: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]
  proxyRegistrySources: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ci}}}]
proxy: {exposure: hostPort, opsPort: 9100}
webhook: {metricsPort: 9191}
`);
      const rendered = await render('-f', custom);
      const byName = policies(rendered);
      const collectorPeer = { podSelector: { matchLabels: { 'app.kubernetes.io/name': 'pullbridge', 'app.kubernetes.io/instance': 'pullbridge', 'app.kubernetes.io/component': 'webhook' } } };
      assert.deepEqual(byName.get('pullbridge-webhook')?.spec.ingress[0]?.from, [{ ipBlock: { cidr: '192.0.2.0/28' } }]);
      assert.deepEqual(byName.get('pullbridge-webhook')?.spec.ingress[1]?.from, [{ namespaceSelector: { matchLabels: { 'kubernetes.io/metadata.name': 'monitoring' } } }]);
      assert.deepEqual(byName.get('pullbridge-proxy')?.spec.ingress, [
        { ports: [{ protocol: 'TCP', port: 'registry' }], from: [{ namespaceSelector: { matchLabels: { 'kubernetes.io/metadata.name': 'ci' } } }] },
        { ports: [{ protocol: 'TCP', port: 9100 }], from: [{ namespaceSelector: { matchLabels: { 'kubernetes.io/metadata.name': 'monitoring' } } }] },
        { ports: [{ protocol: 'TCP', port: 9100 }], from: [collectorPeer] },
      ]);
      assert.match(JSON.stringify(rendered.find((o) => o.kind === 'Service' && o.metadata?.name === 'pullbridge-webhook')), /"port":9191,"targetPort":"metrics"/);
      for (const object of rendered.filter((o) => o.kind === 'NetworkPolicy')) await objects.create(object, undefined, 'All');

      const closed = policies(await render('--set', 'proxy.exposure=nodePort', '--set', 'networkPolicy.apiserverSources=null', '--set', 'networkPolicy.metricsSources=null'));
      assert.deepEqual(closed.get('pullbridge-webhook')?.spec.ingress, []);
      // Only the webhook's way to the operations port stays open (status collector, admission resolver; none with both disabled).
      assert.deepEqual(closed.get('pullbridge-proxy')?.spec.ingress, [{ ports: [{ protocol: 'TCP', port: 9090 }], from: [collectorPeer] }]);
      const noStatus = policies(await render('--set', 'proxy.exposure=nodePort', '--set', 'networkPolicy.apiserverSources=null', '--set', 'networkPolicy.metricsSources=null', '--set', 'status.enabled=false'));
      assert.deepEqual(noStatus.get('pullbridge-proxy')?.spec.ingress, [{ ports: [{ protocol: 'TCP', port: 9090 }], from: [collectorPeer] }], 'the admission resolver still asks there');
      const neither = policies(await render('--set', 'proxy.exposure=nodePort', '--set', 'networkPolicy.apiserverSources=null', '--set', 'networkPolicy.metricsSources=null', '--set', 'status.enabled=false', '--set', 'webhook.resolver.enabled=false'));
      assert.deepEqual(neither.get('pullbridge-proxy')?.spec.ingress, []);
      for (const object of closed.values()) await objects.create(object, undefined, 'All');

      assert.equal(policies(await render('--set', 'networkPolicy.enabled=false')).size, 0);
      const lint = await runAsync(helm, ['lint', CHART, '--strict', '-f', valuesFile, '-f', custom]);
      assert.match(lint, /0 chart\(s\) failed/);
    });
  });

  describe('client certificates (webhook.clientAuth)', () => {
    const deployment = (objects: KubernetesObject[]) =>
      (objects.find((o) => o.kind === 'Deployment') as unknown as { spec: { template: { spec: { containers: Array<{ args: string[]; volumeMounts: Array<{ name: string; mountPath: string }> }>; volumes: Array<{ name: string; configMap?: { name: string } }> } } } }).spec.template.spec;

    it('is off by default', async () => {
      const rendered = await render();
      assert.ok(!deployment(rendered).containers[0]?.args.some((a) => a.startsWith('--client-')));
      assert.ok(!rendered.some((o) => o.metadata?.name === 'pullbridge-webhook-client-ca'));
    });

    it('with a CA bundle: a ConfigMap, mounted, --client-ca and --client-name per allowed name; the apiserver accepts them', async () => {
      const ca = generateClientCertificate({ commonName: 'kube-apiserver-admission' }).caCert;
      const custom = join(dir, 'clientauth.yaml');
      writeFileSync(custom, stringifyYaml({ webhook: { clientAuth: { caBundle: ca, allowedNames: ['kube-apiserver-admission', 'apiserver.example'] } } }));
      const rendered = await render('-f', custom);
      const configMap = rendered.find((o) => o.kind === 'ConfigMap' && o.metadata?.name === 'pullbridge-webhook-client-ca') as KubernetesObject & { data: Record<string, string> };
      assert.equal(configMap.data['ca.crt']?.trim(), ca.replace(/\r\n/g, '\n').trim()); // node-forge writes CRLF
      const spec = deployment(rendered);
      const args = spec.containers[0]?.args ?? [];
      assert.deepEqual(args.filter((a) => a.startsWith('--client-')), ['--client-ca=/etc/pullbridge/client-ca/ca.crt', '--client-name=kube-apiserver-admission', '--client-name=apiserver.example']);
      assert.ok(spec.containers[0]?.volumeMounts.some((m) => m.name === 'client-ca' && m.mountPath === '/etc/pullbridge/client-ca'));
      assert.deepEqual(spec.volumes.find((v) => v.name === 'client-ca')?.configMap, { name: 'pullbridge-webhook-client-ca' });
      for (const object of rendered.filter((o) => o.kind === 'Deployment' || o.metadata?.name === 'pullbridge-webhook-client-ca')) await objects.create(object, undefined, 'All');
      const lint = await runAsync(helm, ['lint', CHART, '--strict', '-f', valuesFile, '-f', custom]);
      assert.match(lint, /0 chart\(s\) failed/);
    });

    it('with an existing ConfigMap: mounted, none rendered; allowed names without a CA are refused', async () => {
      const rendered = await render('--set', 'webhook.clientAuth.existingConfigMap=apiserver-client-ca');
      assert.deepEqual(deployment(rendered).volumes.find((v) => v.name === 'client-ca')?.configMap, { name: 'apiserver-client-ca' });
      assert.ok(!rendered.some((o) => o.metadata?.name === 'pullbridge-webhook-client-ca'));
      await assert.rejects(render('--set', 'webhook.clientAuth.allowedNames={kube-apiserver}'), /webhook\.clientAuth\.allowedNames needs webhook\.clientAuth\.caBundle or webhook\.clientAuth\.existingConfigMap/);
    });
  });

  describe('Istio (istio.*)', () => {
    type PodTemplate = { metadata: { labels: Record<string, string>; annotations?: Record<string, string> } };
    const template = (rendered: KubernetesObject[], kind: 'DaemonSet' | 'Deployment'): PodTemplate =>
      (rendered.find((o) => o.kind === kind) as unknown as { spec: { template: PodTemplate } }).spec.template;
    type PeerAuthentication = KubernetesObject & { spec: { selector: { matchLabels: Record<string, string> }; mtls: { mode: string }; portLevelMtls: Record<string, { mode: string }> } };
    const peerAuthentications = (rendered: KubernetesObject[]) => rendered.filter((o): o is PeerAuthentication => o.kind === 'PeerAuthentication');

    it('by default: no sidecar for either workload (said on the Pods, whatever the namespace default), no PeerAuthentication', async () => {
      const rendered = await render();
      assert.equal(template(rendered, 'DaemonSet').metadata.labels['sidecar.istio.io/inject'], 'false');
      assert.equal(template(rendered, 'Deployment').metadata.labels['sidecar.istio.io/inject'], 'false');
      assert.equal(template(rendered, 'Deployment').metadata.annotations?.['traffic.sidecar.istio.io/excludeInboundPorts'], undefined);
      assert.deepEqual(peerAuthentications(rendered), []);
    });

    it('injects where asked, never into a hostNetwork proxy; the webhook\'s HTTPS port stays out of its sidecar; the apiserver accepts the workloads', async () => {
      for (const exposure of ['nodePort', 'hostPort', 'hostNetwork']) {
        const rendered = await render('--set', `proxy.exposure=${exposure}`, '--set', 'istio.sidecarInjection.proxy=true', '--set', 'istio.sidecarInjection.webhook=true');
        assert.equal(template(rendered, 'DaemonSet').metadata.labels['sidecar.istio.io/inject'], exposure === 'hostNetwork' ? 'false' : 'true', exposure);
        const webhook = template(rendered, 'Deployment').metadata;
        assert.equal(webhook.labels['sidecar.istio.io/inject'], 'true');
        assert.equal(webhook.annotations?.['traffic.sidecar.istio.io/excludeInboundPorts'], '8443', 'the apiserver reaches the webhook\'s own TLS');
        assert.deepEqual(JSON.parse(webhook.annotations?.['proxy.istio.io/config'] ?? '{}'), { holdApplicationUntilProxyStarts: true });
        for (const object of rendered.filter((o) => o.kind === 'DaemonSet' || o.kind === 'Deployment')) await objects.create(object, undefined, 'All');
      }
      const moved = await render('--set', 'istio.sidecarInjection.webhook=true', '--set', 'webhook.port=9443');
      assert.equal(template(moved, 'Deployment').metadata.annotations?.['traffic.sidecar.istio.io/excludeInboundPorts'], '9443');
    });

    it('peerAuthentication: mTLS on each workload but PERMISSIVE on the ports callers outside the mesh use', async () => {
      const byName = (rendered: KubernetesObject[]) => Object.fromEntries(peerAuthentications(rendered).map((o) => [o.metadata?.name, o.spec]));
      // nodePort: the registry port is the container port; the webhook (no sidecar) asks the operations port.
      const nodePort = byName(await render('--set', 'istio.peerAuthentication.enabled=true', '--set', 'proxy.exposure=nodePort', '--set', 'istio.sidecarInjection.proxy=true'));
      assert.deepEqual(Object.keys(nodePort).sort(), ['pullbridge-proxy', 'pullbridge-webhook']);
      assert.equal(nodePort['pullbridge-proxy']?.selector.matchLabels['app.kubernetes.io/component'], 'proxy');
      assert.equal(nodePort['pullbridge-proxy']?.mtls.mode, 'STRICT');
      assert.deepEqual(nodePort['pullbridge-proxy']?.portLevelMtls, { 5000: { mode: 'PERMISSIVE' }, 9090: { mode: 'PERMISSIVE' } });
      assert.equal(nodePort['pullbridge-webhook']?.selector.matchLabels['app.kubernetes.io/component'], 'webhook');
      assert.equal(nodePort['pullbridge-webhook']?.mtls.mode, 'STRICT');
      assert.deepEqual(nodePort['pullbridge-webhook']?.portLevelMtls, { 8443: { mode: 'PERMISSIVE' } });
      // A webhook in the mesh reaches the operations port with mTLS: STRICT there.
      const meshed = byName(await render('--set', 'istio.peerAuthentication.enabled=true', '--set', 'proxy.exposure=hostPort', '--set', 'istio.sidecarInjection.proxy=true', '--set', 'istio.sidecarInjection.webhook=true'));
      assert.deepEqual(meshed['pullbridge-proxy']?.portLevelMtls, { 5000: { mode: 'PERMISSIVE' } });
      // hostNetwork: the proxy listens on proxy.port itself.
      const hostNetwork = byName(await render('--set', 'istio.peerAuthentication.enabled=true'));
      assert.deepEqual(Object.keys(hostNetwork['pullbridge-proxy']?.portLevelMtls ?? {}), ['9090', '30500']);
      const lint = await runAsync(helm, ['lint', CHART, '--strict', '-f', valuesFile, '--set', 'istio.peerAuthentication.enabled=true', '--set', 'istio.sidecarInjection.webhook=true']);
      assert.match(lint, /0 chart\(s\) failed/);
      await assert.rejects(render('--set', 'istio.peerAuthentication.mode=STRICT'), /istio\.peerAuthentication: Additional property mode is not allowed/);
    });
  });

  it('refuses an unknown proxy exposure or certificate mode with a clear message', async () => {
    // The values schema refuses them (the templates' own checks remain for a chart used without it).
    await assert.rejects(render('--set', 'proxy.exposure=ingress'), /proxy\.exposure: proxy\.exposure must be one of the following: "hostNetwork", "nodePort", "hostPort"/);
    await assert.rejects(render('--set', 'webhook.certificates.mode=manual'), /webhook\.certificates\.mode: webhook\.certificates\.mode must be one of the following: "bootstrap", "certManager", "secret"/);
  });

  it('mounts a provided certificate Secret in secret mode, and bootstraps by default', async () => {
    const args = (objects: KubernetesObject[]) => JSON.stringify((objects.find((o) => o.kind === 'Deployment') as unknown as { spec: { template: { spec: { containers: Array<{ args: string[] }> } } } }).spec.template.spec.containers[0]?.args);
    const bootstrap = args(await render());
    assert.match(bootstrap, /--tls-secret=pullbridge-webhook-tls/);
    assert.match(bootstrap, /--webhook-configuration=pullbridge/);
    const secret = await render('--set', 'webhook.certificates.mode=secret');
    assert.match(args(secret), /--tls-cert=\/etc\/pullbridge\/tls\/tls\.crt/);
    for (const object of secret.filter((o) => o.kind === 'Deployment')) await objects.create(object, undefined, 'All');
  });

  it('certs-scripts/install-certs.sh stores a serving certificate and sets caBundle; a re-run keeps a valid one', async () => {
    const kubectl = `${cachedBinary('kubectl')} --kubeconfig ${cp.kubeconfig}`;
    const hook = (await render()).find((o) => o.kind === 'MutatingWebhookConfiguration') as KubernetesObject;
    hook.metadata = { name: 'pullbridge-scripted' };
    await objects.create(hook);
    const script = fileURLToPath(new URL('../../certs-scripts/install-certs.sh', import.meta.url));
    const cli = fileURLToPath(new URL('../src/cli.js', import.meta.url));
    const env = { KUBECTL: kubectl, PULLBRIDGE: `${process.execPath} ${cli}`, NAMESPACE: 'pullbridge', SECRET: 'scripted-tls', WEBHOOK: 'pullbridge-scripted', SERVICE: 'pullbridge-webhook' };
    const first = await runAsync('bash', [script], { env });
    assert.match(first, /new certificate for pullbridge-webhook\.pullbridge\.svc/);
    assert.match(first, /caBundle set on 1 webhook/);
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    const secret = await kc.makeApiClient(CoreV1Api).readNamespacedSecret({ namespace: 'pullbridge', name: 'scripted-tls' });
    assert.equal(secret.type, 'kubernetes.io/tls');
    const leaf = new X509Certificate(Buffer.from(secret.data?.['tls.crt'] ?? '', 'base64'));
    const ca = new X509Certificate(Buffer.from(secret.data?.['ca.crt'] ?? '', 'base64'));
    assert.ok(leaf.verify(ca.publicKey));
    assert.ok(leaf.checkHost('pullbridge-webhook.pullbridge.svc'));
    const stored = await kc.makeApiClient(AdmissionregistrationV1Api).readMutatingWebhookConfiguration({ name: 'pullbridge-scripted' });
    assert.equal(stored.webhooks?.[0]?.clientConfig.caBundle, secret.data?.['ca.crt']);
    const second = await runAsync('bash', [script], { env });
    assert.match(second, /certificate valid for more than 30 days, kept/);
  });

  it('bootstrap mode: the webhook, with the chart\'s RBAC alone, makes its TLS Secret owned by its Deployment, and the garbage collector deletes it with the Deployment (helm uninstall)', async function () {
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    const core = kc.makeApiClient(CoreV1Api);
    const rendered = await render();
    const deployment = rendered.find((o) => o.kind === 'Deployment') as unknown as { spec: { template: { spec: { containers: Array<{ args: string[] }> } } } } & KubernetesObject;
    const arg = (name: string) => deployment.spec.template.spec.containers[0]?.args.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
    assert.equal(arg('owner-deployment'), 'pullbridge-webhook');
    // The chart's service account, RBAC and Deployment, for real; the webhook configuration too.
    const needed = rendered.filter((o) => ['ServiceAccount', 'ClusterRole', 'ClusterRoleBinding', 'Role', 'RoleBinding', 'Deployment', 'MutatingWebhookConfiguration'].includes(o.kind ?? '') && o.metadata?.name?.startsWith('pullbridge'));
    for (const object of needed) await objects.create(object);
    const gc = startProcess(cachedBinary('kube-controller-manager'), [`--kubeconfig=${cp.kubeconfig}`, '--controllers=garbagecollector', '--leader-elect=false', '--secure-port=0', '--use-service-account-credentials=false']);
    try {
      const token = await core.createNamespacedServiceAccountToken({ namespace: 'pullbridge', name: 'pullbridge-webhook', body: { spec: { audiences: [], expirationSeconds: 3600 } } });
      const saKubeconfig = join(dir, 'webhook-sa.kubeconfig');
      writeFileSync(saKubeconfig, JSON.stringify({
        apiVersion: 'v1', kind: 'Config', 'current-context': 'sa',
        clusters: [{ name: 'test', cluster: { server: cp.url, 'certificate-authority-data': Buffer.from(cp.caCert).toString('base64') } }],
        users: [{ name: 'sa', user: { token: token.status?.token } }],
        contexts: [{ name: 'sa', context: { cluster: 'test', user: 'sa' } }],
      }));
      const keyFile = join(dir, 'broker-key');
      writeFileSync(keyFile, randomBytes(32).toString('hex'));
      const parsed = parseConfig(`webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}\nbroker: {keyFiles: [${keyFile}]}\nregistries: []\n`);
      assert.ok(parsed.ok);
      const tlsBootstrap = { secretName: arg('tls-secret') ?? '', service: arg('service') ?? '', webhookConfiguration: arg('webhook-configuration') ?? '', namespace: 'pullbridge', ownerDeployment: arg('owner-deployment') ?? '' };
      const start = async () => (await runWebhook({ config: parsed.config, host: '127.0.0.1', port: 0, kubeconfig: saKubeconfig, tlsBootstrap, reconcileIntervalMs: 3_600_000 })).shutdown();
      await start();
      const uid = (await kc.makeApiClient(AppsV1Api).readNamespacedDeployment({ namespace: 'pullbridge', name: 'pullbridge-webhook' })).metadata?.uid;
      const secret = await core.readNamespacedSecret({ namespace: 'pullbridge', name: 'pullbridge-webhook-tls' });
      assert.deepEqual(secret.metadata?.ownerReferences?.map((r) => [r.apiVersion, r.kind, r.name, r.uid]), [['apps/v1', 'Deployment', 'pullbridge-webhook', uid]]);
      // A Secret made before it had an owner (an upgrade from an earlier version) is adopted as it is.
      await core.replaceNamespacedSecret({ namespace: 'pullbridge', name: 'pullbridge-webhook-tls', body: { ...secret, metadata: { ...secret.metadata, ownerReferences: [] } } });
      await start();
      const adopted = await core.readNamespacedSecret({ namespace: 'pullbridge', name: 'pullbridge-webhook-tls' });
      assert.equal(adopted.metadata?.ownerReferences?.[0]?.uid, uid);
      assert.equal(adopted.data?.['tls.crt'], secret.data?.['tls.crt'], 'the certificate is kept');
      // helm uninstall deletes the Deployment (background propagation): the collector takes the Secret.
      await kc.makeApiClient(AppsV1Api).deleteNamespacedDeployment({ namespace: 'pullbridge', name: 'pullbridge-webhook', propagationPolicy: 'Background' });
      let gone = false;
      for (let i = 0; i < 600 && !gone; i++) {
        gone = await core.readNamespacedSecret({ namespace: 'pullbridge', name: 'pullbridge-webhook-tls' }).then(() => false, (error: { code?: number }) => error.code === 404);
        if (!gone) await new Promise((r) => setTimeout(r, 200));
      }
      assert.ok(gone, `the garbage collector deleted the Secret:\n${gc.output().slice(-3000)}`);
    } finally {
      await gc.stop();
      for (const object of needed.reverse()) await objects.delete(object).catch(() => undefined);
    }
  });

  describe('Pod Security Admission', () => {
    type Template = { metadata: { labels: Record<string, string> }; spec: Record<string, unknown> };
    const podOf = (objects: KubernetesObject[], kind: string, name: string) => {
      const template = (objects.find((o) => o.kind === kind) as unknown as { spec: { template: Template } }).spec.template;
      return { apiVersion: 'v1', kind: 'Pod', metadata: { name, labels: template.metadata.labels }, spec: template.spec };
    };
    const core = () => {
      const kc = new KubeConfig();
      kc.loadFromFile(cp.kubeconfig);
      return kc.makeApiClient(CoreV1Api);
    };
    const labelled = async (name: string, level: string) => {
      await core().createNamespace({ body: { metadata: { name, labels: { 'pod-security.kubernetes.io/enforce': level } } } });
    };
    const refusal = (namespace: string, pod: KubernetesObject) =>
      objects.create({ ...pod, metadata: { ...pod.metadata, namespace } }).then(
        () => '',
        (error: { body?: unknown }) => (JSON.parse(typeof error.body === 'string' ? error.body : JSON.stringify(error.body ?? {})) as { message?: string }).message ?? String(error),
      );

    it('a namespace enforcing baseline refuses the proxy\'s Pods, naming the violations; one labelled privileged, as the README says, accepts them', async () => {
      await labelled('psa-baseline', 'baseline');
      const readme = readFileSync(fileURLToPath(new URL('../../README.md', import.meta.url)), 'utf8');
      const label = /kubectl label namespace pullbridge (pod-security\.kubernetes\.io\/enforce)=(\w+)/.exec(readme);
      assert.ok(label, 'the README says how to label the namespace');
      await labelled('psa-readme', label[2] ?? '');
      const expected: Record<string, RegExp[]> = {
        nodePort: [/hostPath volumes \(volume "cache"\)/],
        hostPort: [/hostPort \(container "proxy" uses hostPort 30500\)/, /hostPath volumes/],
        hostNetwork: [/host namespaces \(hostNetwork=true\)/, /hostPath volumes/],
      };
      for (const [exposure, violations] of Object.entries(expected)) {
        const pod = podOf(await render('--set', `proxy.exposure=${exposure}`), 'DaemonSet', `proxy-${exposure.toLowerCase()}`);
        const refused = await refusal('psa-baseline', pod);
        assert.match(refused, /violates PodSecurity "baseline:latest"/, `${exposure}: ${refused}`);
        for (const violation of violations) assert.match(refused, violation, exposure);
        assert.equal(await refusal('psa-readme', pod), '', `${exposure}: accepted where the README's label is`);
      }
      // The webhook's Pods, and a proxy without the cache behind a NodePort, fit even `restricted`.
      await labelled('psa-restricted', 'restricted');
      const plain = await render('--set', 'cache.enabled=false', '--set', 'proxy.exposure=nodePort');
      assert.equal(await refusal('psa-restricted', podOf(plain, 'Deployment', 'webhook')), '');
      assert.equal(await refusal('psa-restricted', podOf(plain, 'DaemonSet', 'proxy-nocache')), '');
    });

    it('helm refuses to install into a namespace that enforces a stricter level than the proxy needs, with the fix in the message', async () => {
      await labelled('psa-install', 'baseline');
      const template = (...extra: string[]) => runAsync(helm, ['template', 'pullbridge', CHART, '-n', 'psa-install', '--dry-run=server', '--kubeconfig', cp.kubeconfig, '-f', valuesFile, ...extra]);
      await assert.rejects(template('--set', 'proxy.exposure=hostNetwork'), /namespace psa-install enforces Pod Security "baseline", but the proxy needs "privileged" \(a hostPath for the cache, hostNetwork\): kubectl label namespace psa-install pod-security\.kubernetes\.io\/enforce=privileged/);
      await assert.rejects(template('--set', 'cache.enabled=false'), /the proxy needs "privileged" \(hostNetwork\)/, 'the default exposure alone needs it');
      assert.match(await template('--set', 'cache.enabled=false', '--set', 'proxy.exposure=nodePort'), /kind: DaemonSet/, 'nothing beyond baseline: installs');
      assert.match(await template('--set', 'podSecurity.checkNamespace=false'), /kind: DaemonSet/);
      await core().patchNamespace({ name: 'psa-install', body: { metadata: { labels: { 'pod-security.kubernetes.io/enforce': 'privileged' } } } }, setHeaderOptions('Content-Type', PatchStrategy.MergePatch));
      assert.match(await template('--set', 'proxy.exposure=hostNetwork'), /kind: DaemonSet/);
    });
  });

  describe('priority class, where the apiserver limits system-node-critical to namespaces with a quota for it', () => {
    let limited: ControlPlane;
    let limitedObjects: KubernetesObjectApi;
    let limitedCore: CoreV1Api;
    before(async () => {
      // The Kubernetes docs' "Limit Priority Class consumption by default", as GKE does.
      const quota = { apiVersion: 'apiserver.config.k8s.io/v1', kind: 'ResourceQuotaConfiguration', limitedResources: [{ resource: 'pods', matchScopes: [{ scopeName: 'PriorityClass', operator: 'In', values: ['system-node-critical', 'system-cluster-critical'] }] }] };
      limited = await startControlPlane({ admissionPlugins: [{ name: 'ResourceQuota', configuration: quota }] });
      const kc = new KubeConfig();
      kc.loadFromFile(limited.kubeconfig);
      limitedObjects = KubernetesObjectApi.makeApiClient(kc);
      limitedCore = kc.makeApiClient(CoreV1Api);
    });
    after(async () => limited?.stop());

    const proxyPod = (objects: KubernetesObject[], namespace: string, name: string): KubernetesObject => {
      const template = (objects.find((o) => o.kind === 'DaemonSet') as unknown as { spec: { template: { metadata: { labels: Record<string, string> }; spec: Record<string, unknown> } } }).spec.template;
      return { apiVersion: 'v1', kind: 'Pod', metadata: { name, namespace, labels: template.metadata.labels }, spec: template.spec } as KubernetesObject;
    };
    const outcome = (pod: KubernetesObject) => limitedObjects.create(pod).then(() => 'created', (error: { body?: unknown }) => (typeof error.body === 'string' ? error.body : JSON.stringify(error.body)));

    it('is refused without the quota, accepted with the README\'s quota, and can be emptied', async () => {
      for (const name of ['no-quota', 'with-quota']) await limitedCore.createNamespace({ body: { metadata: { name } } });
      const defaults = await render();
      assert.match(await outcome(proxyPod(defaults, 'no-quota', 'proxy')), /insufficient quota to match these scopes.*system-node-critical/);
      const install = readFileSync(fileURLToPath(new URL('../../docs/install.md', import.meta.url)), 'utf8');
      const snippet = /```yaml\n(apiVersion: v1\nkind: ResourceQuota\n[\s\S]*?)```/.exec(install)?.[1];
      assert.ok(snippet, 'docs/install.md shows the quota');
      const quota = parseAllDocuments(snippet)[0]?.toJS() as { metadata: { name: string; namespace?: string }; spec: { hard: Record<string, string> } };
      await limitedCore.createNamespacedResourceQuota({ namespace: 'with-quota', body: { ...quota, metadata: { ...quota.metadata, namespace: 'with-quota' } } });
      // The quota controller would fill in its status; admission needs it.
      const stored = await limitedCore.readNamespacedResourceQuota({ namespace: 'with-quota', name: quota.metadata.name });
      await limitedCore.replaceNamespacedResourceQuotaStatus({ namespace: 'with-quota', name: quota.metadata.name, body: { ...stored, status: { hard: quota.spec.hard, used: { pods: '0' } } } });
      assert.equal(await outcome(proxyPod(defaults, 'with-quota', 'proxy')), 'created');
      const emptied = await render('--set', 'proxy.priorityClassName=');
      const pod = proxyPod(emptied, 'no-quota', 'proxy-plain') as KubernetesObject & { spec: { priorityClassName?: string } };
      assert.equal(pod.spec.priorityClassName, undefined);
      assert.equal(await outcome(pod), 'created');
    });
  });

  it('builds the image\'s code from src alone (tsconfig.build.json, as the Dockerfile does)', async () => {
    await runAsync('npx', ['tsc', '-p', fileURLToPath(new URL('../../tsconfig.build.json', import.meta.url)), '--noEmit']);
  });
});
