// The Helm chart: lint clean, and what `helm template` renders is accepted by a real apiserver
// (server-side dry run, as `kubectl apply --dry-run=server` does), with a config the project accepts.

import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { X509Certificate } from 'node:crypto';
import { AdmissionregistrationV1Api, CoreV1Api, KubeConfig, KubernetesObjectApi, type KubernetesObject } from '@kubernetes/client-node';
import { parseAllDocuments } from 'yaml';
import { parseConfig } from '../src/rules/config.js';
import { cachedBinary, KUBE_VERSION, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { runAsync } from './support/procs.js';

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
    assert.equal(corp?.credentials?.passwordFile, '/etc/pullbridge/credentials/corp/password');
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
    const daemonset = JSON.stringify(rendered.find((o) => o.kind === 'DaemonSet'));
    assert.match(daemonset, /"operator":"Exists"/, 'tolerates all taints');
    assert.match(daemonset, /system-node-critical/);
  });

  it('probes and scrapes the proxy on its operations port, which no exposure publishes (loopback with hostNetwork)', async () => {
    type Container = { args: string[]; ports: Array<{ name: string; containerPort: number; hostPort?: number }>; readinessProbe: { httpGet: { port: string; host?: string } }; livenessProbe: { httpGet: { port: string; host?: string } } };
    for (const exposure of ['nodePort', 'hostPort', 'hostNetwork']) {
      const rendered = await render('--set', `proxy.exposure=${exposure}`);
      const proxy = (rendered.find((o) => o.kind === 'DaemonSet') as unknown as { spec: { template: { spec: { containers: Container[] } } } }).spec.template.spec.containers[0];
      assert.ok(proxy);
      assert.ok(proxy.args.includes('--ops-port=9090'), exposure);
      const ops = proxy.ports.find((p) => p.name === 'ops');
      assert.equal(ops?.containerPort, 9090);
      assert.equal(ops?.hostPort, undefined, 'never a hostPort');
      for (const probe of [proxy.readinessProbe, proxy.livenessProbe]) {
        assert.equal(probe.httpGet.port, 'ops');
        // A hostNetwork Pod's IP is the node's address; the proxy listens on loopback there.
        assert.equal(probe.httpGet.host, exposure === 'hostNetwork' ? '127.0.0.1' : undefined, exposure);
      }
      assert.equal(proxy.args.includes('--ops-host=127.0.0.1'), exposure === 'hostNetwork');
      const services = rendered.filter((o) => o.kind === 'Service') as unknown as Array<{ spec: { ports: Array<{ targetPort: string }> } }>;
      assert.ok(services.every((svc) => svc.spec.ports.every((p) => p.targetPort !== 'ops')), 'no Service publishes the operations port by default');
    }
  });

  it('refuses an unknown proxy exposure or certificate mode with a clear message', async () => {
    await assert.rejects(render('--set', 'proxy.exposure=ingress'), /proxy\.exposure must be nodePort, hostPort or hostNetwork/);
    await assert.rejects(render('--set', 'webhook.certificates.mode=manual'), /webhook\.certificates\.mode must be bootstrap, certManager or secret/);
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

  it('builds the image\'s code from src alone (tsconfig.build.json, as the Dockerfile does)', async () => {
    await runAsync('npx', ['tsc', '-p', fileURLToPath(new URL('../../tsconfig.build.json', import.meta.url)), '--noEmit']);
  });
});
