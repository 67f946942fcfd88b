// The whole chain a cluster runs, against a real kube-apiserver: Pods created through the API are
// rewritten by the webhook (registered from webhook-config/), the pull secret appears in their
// namespace, and containerd pulls the rewritten image through the proxy with that secret's
// credential from a real registry.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AdmissionregistrationV1Api, CoreV1Api, KubeConfig, PatchStrategy, setHeaderOptions, type V1MutatingWebhookConfiguration, type V1Pod } from '@kubernetes/client-node';
import { parse as parseYaml } from 'yaml';
import { generateCertificates } from '../src/certs/certs.js';
import { parseConfig } from '../src/rules/config.js';
import { runWebhook, type WebhookProcess } from '../src/webhook/run.js';
import { startContainerd, type Containerd } from './support/containerd.js';
import { memoryLogger } from './support/logs.js';
import { readSecretOrNull, registerWebhook, WEBHOOK_YAML } from './support/cluster.js';
import { startControlPlane, type ControlPlane } from './support/controlplane.js';
import { buildImage, type TestImage } from './support/oci.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const [USER, PASSWORD] = Object.entries(DEFAULT_USERS)[0] as [string, string];
const CORP_IMAGE = 'registry.corp.example:5000/team/app:1.0';

describe('end to end against a real kube-apiserver', function () {
  this.timeout(180_000);
  let cp: ControlPlane;
  let core: CoreV1Api;
  let registry: RegistryHandle;
  let containerd: Containerd;
  let proxy: ProxyUnderTest;
  let webhook: WebhookProcess;
  let image: TestImage;
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-e2e-'));
  const configPath = join(dir, 'config.yaml');
  const keyFile = join(dir, 'broker.key');
  const newKeyFile = join(dir, 'broker-new.key');
  const passwordFile = join(dir, 'password');
  const logs = memoryLogger();

  function configYaml(proxyPort: number, keyFiles: string[], extraRules = ''): string {
    return `proxy: {host: 127.0.0.1, port: ${proxyPort}}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [${keyFiles.join(', ')}]}
registries:
  - name: corp
    match: [registry.corp.example:5000]
    upstream: ${registry.url}
    credentials: {username: ${USER}, passwordFile: ${passwordFile}}
${extraRules}`;
  }

  const pod = (name: string, labels: Record<string, string> = {}, images: string[] = [CORP_IMAGE]): V1Pod => ({
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name, labels },
    spec: { containers: images.map((image, i) => ({ name: `c${i}`, image })) },
  });

  async function namespace(name: string, labels: Record<string, string> = {}): Promise<void> {
    await core.createNamespace({ body: { metadata: { name, labels } } });
  }

  const secretOrNull = (namespace: string) => readSecretOrNull(core, namespace);

  before(async () => {
    writeFileSync(keyFile, randomBytes(32).toString('hex'));
    writeFileSync(newKeyFile, randomBytes(32).toString('hex'));
    writeFileSync(passwordFile, PASSWORD);
    [cp, registry, containerd] = await Promise.all([startControlPlane(), startRegistry({ auth: 'basic' }), startContainerd()]);
    image = buildImage();
    await registry.push(image, 'team/app', '1.0');

    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);

    // The proxy first: its port goes into the rewritten references and the pull secret.
    proxy = await startProxy({ broker: { keyFiles: [keyFile] }, registries: [{ name: 'corp', match: ['registry.corp.example:5000'], upstream: registry.url, credentials: { username: USER, passwordFile } }] });
    writeFileSync(configPath, configYaml(proxy.server.port, [keyFile]));
    const parsed = parseConfig(readFileSync(configPath, 'utf8'));
    assert.ok(parsed.ok);

    const certs = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1'] });
    await namespace('pullbridge');
    webhook = await runWebhook({
      config: parsed.config,
      configPath,
      host: '127.0.0.1',
      port: 0,
      tls: { cert: certs.cert, key: certs.key },
      kubeconfig: cp.kubeconfig,
      configMap: { name: 'pullbridge-config', namespace: 'pullbridge' },
      reconcileIntervalMs: 3_600_000,
      reconcileGraceMs: 0,
      logger: logs.logger,
    });

    // Register the shipped configuration, pointed at this webhook by URL.
    await registerWebhook(kc, `${webhook.running.url}/mutate`, certs.caCert, CORP_IMAGE);
  });

  after(async () => {
    await webhook?.shutdown();
    await proxy?.close();
    await containerd?.stop();
    await registry?.stop();
    await cp?.stop();
  });

  it('stores the rewritten Pod, provisions the pull secret, and containerd pulls with it through the proxy', async () => {
    await namespace('shop');
    await core.createNamespacedPod({ namespace: 'shop', body: pod('web', { app: 'web' }) });
    const stored = await core.readNamespacedPod({ namespace: 'shop', name: 'web' });
    const rewritten = `127.0.0.1:${proxy.server.port}/corp/team/app:1.0`;
    assert.equal(stored.spec?.containers[0]?.image, rewritten);
    assert.deepEqual(stored.spec?.imagePullSecrets?.map((s) => s.name), ['pullbridge-pull']);
    assert.deepEqual(JSON.parse(stored.metadata?.annotations?.['pullbridge.io/original-images'] ?? '{}'), { 'containers/c0': CORP_IMAGE });
    assert.equal(stored.metadata?.labels?.['pullbridge.io/rewritten'], 'true');

    const secret = await secretOrNull('shop');
    assert.ok(secret, 'the pull secret exists in the namespace');
    assert.equal(secret.type, 'kubernetes.io/dockerconfigjson');
    assert.equal(secret.metadata?.labels?.['app.kubernetes.io/managed-by'], 'pullbridge');
    const auths = (JSON.parse(Buffer.from(secret.data?.['.dockerconfigjson'] ?? '', 'base64').toString()) as { auths: Record<string, { username: string; password: string }> }).auths;
    const entry = auths[`127.0.0.1:${proxy.server.port}`];
    assert.ok(entry, `keyed by the proxy's host:port, as kubelet matches it: ${Object.keys(auths).join(',')}`);

    // What kubelet does next: pull the rewritten reference with the secret's credential.
    await containerd.fetch(rewritten, { user: `${entry.username}:${entry.password}`, allPlatforms: true });
    for (const [digest, blob] of image.blobs) assert.ok((await containerd.content(digest)).equals(blob.data), digest);
  });

  it('shows the mutation on dryRun but creates no Secret', async () => {
    await namespace('dry');
    const dry = await core.createNamespacedPod({ namespace: 'dry', body: pod('web'), dryRun: 'All' });
    assert.match(dry.spec?.containers[0]?.image ?? '', /^127\.0\.0\.1:\d+\/corp\/team\/app:1\.0$/);
    assert.equal(await secretOrNull('dry'), null);
  });

  it('leaves kube-system, opted-out namespaces and opted-out Pods untouched', async () => {
    await core.createNamespacedPod({ namespace: 'kube-system', body: pod('sys') });
    assert.equal((await core.readNamespacedPod({ namespace: 'kube-system', name: 'sys' })).spec?.containers[0]?.image, CORP_IMAGE);
    await namespace('quiet', { 'pullbridge.io/ignore': 'true' });
    await core.createNamespacedPod({ namespace: 'quiet', body: pod('q') });
    assert.equal((await core.readNamespacedPod({ namespace: 'quiet', name: 'q' })).spec?.containers[0]?.image, CORP_IMAGE);
    assert.equal(await secretOrNull('quiet'), null);
    await namespace('mixed');
    await core.createNamespacedPod({ namespace: 'mixed', body: pod('out', { 'pullbridge.io/ignore': 'true' }) });
    const out = await core.readNamespacedPod({ namespace: 'mixed', name: 'out' });
    assert.equal(out.spec?.containers[0]?.image, CORP_IMAGE);
    assert.equal(out.spec?.imagePullSecrets, undefined);
  });

  it('rewrites an ephemeral container added through the subresource', async () => {
    const current = await core.readNamespacedPod({ namespace: 'shop', name: 'web' });
    current.spec = { ...current.spec!, ephemeralContainers: [{ name: 'debug', image: 'registry.corp.example:5000/team/debug:1' }] };
    await core.replaceNamespacedPodEphemeralcontainers({ namespace: 'shop', name: 'web', body: current });
    const stored = await core.readNamespacedPod({ namespace: 'shop', name: 'web' });
    assert.equal(stored.spec?.ephemeralContainers?.[0]?.image, `127.0.0.1:${proxy.server.port}/corp/team/debug:1`);
  });

  it('survives concurrent admissions in a new namespace: every Pod admitted, one Secret', async () => {
    await namespace('burst');
    const results = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => core.createNamespacedPod({ namespace: 'burst', body: pod(`p${i}`) })));
    assert.deepEqual(results.map((r) => r.status), Array(8).fill('fulfilled'));
    const pods = await core.listNamespacedPod({ namespace: 'burst' });
    assert.ok(pods.items.every((p) => p.spec?.containers[0]?.image?.startsWith('127.0.0.1:')));
    const secrets = await core.listNamespacedSecret({ namespace: 'burst', labelSelector: 'app.kubernetes.io/managed-by=pullbridge' });
    assert.equal(secrets.items.length, 1);
  });

  it('bootstraps its own serving certificate without cert-manager: Secret, caBundle, and the apiserver trusts it', async () => {
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    const admission = kc.makeApiClient(AdmissionregistrationV1Api);
    const shipped = parseYaml(readFileSync(WEBHOOK_YAML, 'utf8')) as V1MutatingWebhookConfiguration;
    shipped.metadata = { name: 'pullbridge-bootstrap' };
    for (const hook of shipped.webhooks ?? []) {
      hook.clientConfig = { url: 'https://127.0.0.1:1/mutate' };
      hook.objectSelector = { matchLabels: { 'bootstrap-test': 'yes' } };
    }
    await admission.createMutatingWebhookConfiguration({ body: shipped });
    const bootLogs = memoryLogger();
    const parsed = parseConfig(readFileSync(configPath, 'utf8'));
    assert.ok(parsed.ok);
    const tlsBootstrap = { secretName: 'bootstrap-tls', service: 'pullbridge-webhook', webhookConfiguration: 'pullbridge-bootstrap', namespace: 'pullbridge', extraNames: ['127.0.0.1'] };
    const boot = await runWebhook({ config: parsed.config, host: '127.0.0.1', port: 0, kubeconfig: cp.kubeconfig, tlsBootstrap, logger: bootLogs.logger });
    try {
      const secret = await core.readNamespacedSecret({ namespace: 'pullbridge', name: 'bootstrap-tls' });
      assert.equal(secret.type, 'kubernetes.io/tls');
      const ca = secret.data?.['ca.crt'] ?? '';
      const stored = await admission.readMutatingWebhookConfiguration({ name: 'pullbridge-bootstrap' });
      assert.equal(stored.webhooks?.[0]?.clientConfig.caBundle, ca, 'caBundle injected');
      // Point the configuration at this instance; the apiserver must trust the bootstrapped cert.
      for (const hook of stored.webhooks ?? []) hook.clientConfig.url = `${boot.running.url}/mutate`;
      await admission.replaceMutatingWebhookConfiguration({ name: 'pullbridge-bootstrap', body: stored });
      await namespace('boot');
      const deadline = Date.now() + 30_000;
      let seen = false;
      for (let i = 0; !seen && Date.now() < deadline; i++) {
        await core.createNamespacedPod({ namespace: 'boot', body: pod(`b${i}`, { 'bootstrap-test': 'yes' }), dryRun: 'All' });
        seen = bootLogs.records.some((r) => r.audit === 'admission' && r.namespace === 'boot');
        if (!seen) await new Promise((r) => setTimeout(r, 250));
      }
      assert.ok(seen, 'the apiserver called the bootstrapped webhook over TLS');
      // A second replica reuses the stored certificate rather than minting another.
      const second = await runWebhook({ config: parsed.config, host: '127.0.0.1', port: 0, kubeconfig: cp.kubeconfig, tlsBootstrap, logger: memoryLogger().logger });
      await second.shutdown();
      const again = await core.readNamespacedSecret({ namespace: 'pullbridge', name: 'bootstrap-tls' });
      assert.equal(again.data?.['tls.crt'], secret.data?.['tls.crt']);
    } finally {
      await boot.shutdown();
    }
  });

  it('rejects an invalid config change with a log, a metric and an Event, keeping the last good config', async () => {
    writeFileSync(configPath, 'registries:\n  - name: Not A Label\n');
    assert.equal(webhook.watcher?.check(), 'rejected');
    const deadline = Date.now() + 10_000;
    let reasons: string[] = [];
    while (Date.now() < deadline) {
      const events = await core.listNamespacedEvent({ namespace: 'pullbridge' });
      reasons = events.items.filter((e) => e.involvedObject.name === 'pullbridge-config').map((e) => `${e.reason}: ${e.message}`);
      if (reasons.length > 0) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.match(reasons[0] ?? '', /^InvalidConfig: config change rejected.*registries\[0\]\.name/s);
    const metrics = await webhook.metrics.metrics();
    assert.match(metrics, /pullbridge_config_reloads_total\{result="rejected"\} 1/);
    assert.match(metrics, /pullbridge_config_last_reload_ok 0/);
    assert.ok(logs.records.some((r) => r.msg === 'config change rejected; the last good config stays in force'));
    await namespace('after-bad');
    await core.createNamespacedPod({ namespace: 'after-bad', body: pod('web') });
    assert.match((await core.readNamespacedPod({ namespace: 'after-bad', name: 'web' })).spec?.containers[0]?.image ?? '', /^127\.0\.0\.1:/, 'the last good config is still in force');
  });

  it('applies a valid change live, and refreshes the pull secrets after a key rotation', async () => {
    const before = (await secretOrNull('shop'))?.data?.['.dockerconfigjson'];
    writeFileSync(configPath, configYaml(proxy.server.port, [newKeyFile, keyFile], `  - name: extra\n    match: [extra.example]\n    upstream: ${registry.url}\n`));
    assert.equal(webhook.watcher?.check(), 'applied');
    await namespace('live');
    await core.createNamespacedPod({ namespace: 'live', body: pod('web', {}, ['extra.example/team/app:1.0']) });
    assert.match((await core.readNamespacedPod({ namespace: 'live', name: 'web' })).spec?.containers[0]?.image ?? '', /^127\.0\.0\.1:\d+\/extra\/team\/app:1\.0$/);
    await webhook.reconcile?.();
    const after = (await secretOrNull('shop'))?.data?.['.dockerconfigjson'];
    assert.ok(before && after && before !== after, 'the secret now carries the new key\'s credential');
    assert.ok(await secretOrNull('burst'), 'a namespace with rewritten Pods keeps its secret');
    await core.patchNamespace({ name: 'burst', body: [{ op: 'add', path: '/metadata/labels/pullbridge.io~1ignore', value: 'true' }] }, setHeaderOptions('Content-Type', PatchStrategy.JsonPatch));
    await webhook.reconcile?.();
    assert.equal(await secretOrNull('burst'), null, 'an opted-out namespace no longer needs the secret');
    // Audit records for every admission, with the requesting user.
    assert.ok(logs.records.filter((r) => r.audit === 'admission' && r.user === 'admin').length >= 10);
  });

  it('keeps admitting and provisioning pull secrets when a verify-only key file is empty', async () => {
    const emptyKey = join(dir, 'empty-previous.key');
    writeFileSync(emptyKey, '');
    writeFileSync(configPath, configYaml(proxy.server.port, [keyFile, emptyKey]));
    assert.equal(webhook.watcher?.check(), 'applied');
    await namespace('verify-only');
    await core.createNamespacedPod({ namespace: 'verify-only', body: pod('web') });
    assert.match((await core.readNamespacedPod({ namespace: 'verify-only', name: 'web' })).spec?.containers[0]?.image ?? '', /^127\.0\.0\.1:\d+\/corp\//);
    const secret = await secretOrNull('verify-only');
    assert.ok(secret, 'the pull secret was provisioned with the signing key');
    const auths = (JSON.parse(Buffer.from(secret.data?.['.dockerconfigjson'] ?? '', 'base64').toString()) as { auths: Record<string, { username: string; password: string }> }).auths;
    const entry = auths[`127.0.0.1:${proxy.server.port}`];
    assert.ok(entry);
    // The proxy (signing with the same key) accepts the credential.
    const res = await fetch(`${proxy.url}/v2/corp/team/app/manifests/1.0`, { headers: { authorization: `Basic ${Buffer.from(`${entry.username}:${entry.password}`).toString('base64')}`, accept: 'application/vnd.oci.image.index.v1+json' } });
    assert.equal(res.status, 200);
  });

  it('rejects a config change whose signing key file is not there, and keeps provisioning with the last good one', async () => {
    const rejectedBefore = /pullbridge_config_reloads_total\{result="rejected"\} (\d+)/.exec(await webhook.metrics.metrics())?.[1];
    writeFileSync(configPath, configYaml(proxy.server.port, [join(dir, 'missing.key')]));
    assert.equal(webhook.watcher?.check(), 'rejected');
    assert.match(await webhook.metrics.metrics(), new RegExp(`pullbridge_config_reloads_total\\{result="rejected"\\} ${Number(rejectedBefore) + 1}`));
    const rejection = logs.records.filter((r) => r.msg === 'config change rejected; the last good config stays in force').at(-1);
    assert.match(JSON.stringify(rejection?.errors), /"key":"broker\.keyFiles\[0\]","message":"cannot read [^"]*missing\.key: no such file"/);
    await namespace('after-missing-key');
    await core.createNamespacedPod({ namespace: 'after-missing-key', body: pod('web') });
    assert.ok(await secretOrNull('after-missing-key'), 'pull secrets are still signed with the last good key');
  });
});
