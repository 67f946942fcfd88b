// A real node: kubelet, containerd's CRI plugin and runc (./support/node.ts) joined to a real
// kube-apiserver with the webhook registered from webhook-config/. A Pod is created with its
// original image; what runs is what kubelet pulled through the proxy from docker-registry with the
// pull secret the webhook provisioned. The refusals are the ones a cluster operator would see.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoreV1Api, KubeConfig, type V1Pod, type V1PodSpec } from '@kubernetes/client-node';
import { generateCertificates } from '../src/certs/certs.js';
import { desiredPullSecret } from '../src/k8s/pullsecret.js';
import { parseConfig, type Config } from '../src/rules/config.js';
import { runWebhook, type WebhookProcess } from '../src/webhook/run.js';
import { isRunning, registerWebhook, waitForNode, waitForPod, waitingState } from './support/cluster.js';
import { cachedBinary, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { memoryLogger } from './support/logs.js';
import { buildWorkloadImage, nodePod, startNode, stopAllNodes, type RealNode } from './support/node.js';
import type { TestImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const [USER, PASSWORD] = Object.entries(DEFAULT_USERS)[0] as [string, string];
const CORP_IMAGE = 'registry.corp.example:5000/team/app:1.0';
const PULL_SECRET = 'pullbridge-pull';
// A first Pod can wait ~15 s on the Node-authorizer race (kubelet asks for the pull secret before
// the authorizer's graph knows the Pod, pulls anonymously, backs off): see the README.
const POD_TIMEOUT_MS = 120_000;

describe('a real node: kubelet pulls rewritten Pods through the proxy', function () {
  this.timeout(300_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-node-test-'));
  const message = `hello from team/app ${randomBytes(4).toString('hex')}`;
  let cp: ControlPlane;
  let registry: RegistryHandle;
  let proxy: ProxyUnderTest;
  let webhook: WebhookProcess;
  let node: RealNode | undefined;
  let core: CoreV1Api;
  let config: Config;
  let image: TestImage;
  let proxied: string;
  const webhookLogs = memoryLogger();

  const pod = (name: string, image: string, spec: Partial<V1PodSpec> = {}, labels: Record<string, string> = {}): V1Pod => {
    if (!node) throw new Error('the node is not running');
    return nodePod(node, name, image, spec, labels);
  };
  /** Proxy access-log records of pulls through the rule, from `since` on. */
  const pulls = (since: number) => proxy.logs.records.slice(since).filter((r) => r.access === 'pull' && r.rule === 'corp');
  const failure = (error: unknown) => new Error(`${(error as Error).message}\n--- node ---\n${node?.logs().slice(-6000) ?? ''}`);

  before(async function () {
    this.timeout(300_000);
    const passwordFile = join(dir, 'password');
    writeFileSync(passwordFile, PASSWORD);
    [cp, registry] = await Promise.all([startControlPlane(), startRegistry({ auth: 'basic' })]);
    image = buildWorkloadImage(dir, message);
    await registry.push(image, 'team/app', '1.0');
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);

    // Only namespace "shop" may pull through the rule; the proxy enforces it as the webhook does.
    const rule = { name: 'corp', match: ['registry.corp.example:5000'], upstream: registry.url, credentials: { username: USER, passwordFile }, namespaces: { include: ['shop', 'bare', 'cached'], exclude: [] } };
    // With the node cache; tagTTLSeconds 0 asks every tag upstream, so the outage below is met.
    proxy = await startProxy({ cache: { path: join(dir, 'cache'), tagTTLSeconds: 0 }, registries: [rule] });
    proxied = `localhost:${proxy.server.port}/corp/team/app:1.0`;
    const configPath = join(dir, 'config.yaml');
    writeFileSync(
      configPath,
      JSON.stringify({ proxy: { host: 'localhost', port: proxy.server.port }, webhook: { pullSecretName: PULL_SECRET, namespace: 'pullbridge' }, broker: { keyFiles: [proxy.keyFile] }, registries: [rule] }),
    );
    const parsed = parseConfig(readFileSync(configPath, 'utf8'));
    if (!parsed.ok) throw new Error(JSON.stringify(parsed.errors));
    config = parsed.config;
    const certs = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1'] });
    await core.createNamespace({ body: { metadata: { name: 'pullbridge' } } });
    webhook = await runWebhook({ config, configPath, host: '127.0.0.1', port: 0, tls: { cert: certs.cert, key: certs.key }, kubeconfig: cp.kubeconfig, reconcileIntervalMs: 3_600_000, reconcileGraceMs: 0, logger: webhookLogs.logger });
    await registerWebhook(kc, `${webhook.running.url}/mutate`, certs.caCert, CORP_IMAGE, 'shop');

    node = await startNode({ controlPlane: cp, token: cp.nodeToken });
    await node.reach(proxy.server.port);
    await waitForNode(core, node.name, 60_000).catch((error: unknown) => {
      throw failure(error);
    });
  });

  after(async () => {
    await node?.stop();
    await stopAllNodes(); // one whose start outlived a timed-out setup
    await webhook?.shutdown();
    await proxy?.close();
    await registry?.stop();
    await cp?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('runs a Pod created with its original image: rewritten, pull secret provisioned, pulled by kubelet through the proxy, output in kubectl logs', async () => {
    const since = proxy.logs.records.length;
    await core.createNamespacedPod({ namespace: 'shop', body: pod('web', CORP_IMAGE) });
    const stored = await core.readNamespacedPod({ namespace: 'shop', name: 'web' });
    assert.equal(stored.spec?.containers[0]?.image, proxied);
    assert.deepEqual(stored.spec?.imagePullSecrets?.map((s) => s.name), [PULL_SECRET]);
    await core.readNamespacedSecret({ namespace: 'shop', name: PULL_SECRET });

    const running = await waitForPod(core, 'shop', 'web', isRunning, POD_TIMEOUT_MS, 'Running').catch((error: unknown) => {
      throw failure(error);
    });
    // The image the container runs is the one pushed upstream, by digest.
    assert.equal(running.status?.containerStatuses?.[0]?.imageID, `localhost:${proxy.server.port}/corp/team/app@${image.index.digest}`);
    const served = pulls(since).filter((r) => r.status === 200 && r.namespace === 'shop');
    for (const digest of [image.manifests[0]?.digest, image.configs[0]?.digest, image.layers[0]?.digest]) {
      assert.ok(served.some((r) => r.reference === digest), `kubelet pulled ${digest} through the proxy as namespace shop`);
    }
    // containerd sends credentials only after a challenge: the first manifest request is anonymous.
    assert.ok(pulls(since).some((r) => r.status === 401 && r.namespace === null), 'an anonymous 401 before the credentialed pull');

    const logs = await runAsync(cachedBinary('kubectl'), ['--kubeconfig', cp.kubeconfig, 'logs', '-n', 'shop', 'web']);
    assert.equal(logs.trim(), message);
  });

  it('a Pod without the pull secret gets ErrImagePull with 401, and the proxy serves it nothing', async () => {
    const since = proxy.logs.records.length;
    // Written at the proxy directly and opted out of the webhook, so no secret is added.
    await core.createNamespace({ body: { metadata: { name: 'bare' } } });
    await core.createNamespacedPod({ namespace: 'bare', body: pod('nosecret', proxied, {}, { 'pullbridge.io/ignore': 'true' }) });
    const failed = await waitForPod(core, 'bare', 'nosecret', (p) => /ErrImagePull|ImagePullBackOff/.test(waitingState(p)) && waitingState(p).includes('401'), POD_TIMEOUT_MS, 'ErrImagePull 401');
    assert.match(waitingState(failed), /401 Unauthorized/);
    assert.equal(isRunning(failed), false);
    const answered = pulls(since);
    assert.ok(answered.length > 0, 'kubelet did ask the proxy');
    assert.deepEqual(answered.filter((r) => r.status !== 401), [], 'nothing but 401 answered');
  });

  it('a namespace the rule refuses, pulling with its own valid credential, gets 403 and does not run', async () => {
    const since = proxy.logs.records.length;
    await core.createNamespace({ body: { metadata: { name: 'other' } } });
    // The credential the webhook would provision for "other": valid, but the rule does not admit it.
    const key = readFileSync(proxy.keyFile, 'utf8').trim();
    await core.createNamespacedSecret({ namespace: 'other', body: desiredPullSecret(config, 'other', PULL_SECRET, Buffer.from(key)) });
    await core.createNamespacedPod({ namespace: 'other', body: pod('intruder', proxied, { imagePullSecrets: [{ name: PULL_SECRET }] }) });
    const failed = await waitForPod(core, 'other', 'intruder', (p) => waitingState(p).includes('403'), POD_TIMEOUT_MS, 'ErrImagePull 403');
    assert.match(waitingState(failed), /ErrImagePull|ImagePullBackOff/);
    assert.equal(isRunning(failed), false);
    const answered = pulls(since).filter((r) => r.namespace === 'other');
    assert.ok(answered.length > 0 && answered.every((r) => r.status === 403), `every authenticated request of "other" refused: ${JSON.stringify(answered.map((r) => r.status))}`);
  });

  it('an image already on the node starts an IfNotPresent Pod without asking the proxy (KEP-2535 off, as documented)', async () => {
    const since = proxy.logs.records.length;
    await core.createNamespace({ body: { metadata: { name: 'cached' } } });
    const body = pod('reuse', proxied, {}, { 'pullbridge.io/ignore': 'true' });
    const container = body.spec?.containers[0];
    if (container) container.imagePullPolicy = 'IfNotPresent';
    await core.createNamespacedPod({ namespace: 'cached', body });
    await waitForPod(core, 'cached', 'reuse', isRunning, POD_TIMEOUT_MS, 'Running');
    assert.deepEqual(pulls(since), [], 'no request reached the proxy');
  });

  it('starts a new Pod from the node cache while the registry is down: image removed from the node, pulled again by tag (Always)', async () => {
    if (!node) throw new Error('the node is not running');
    await registry.kill();
    // CRI names an image by its references and by its config digest: remove all, content with them.
    const ofImage = (reference: string) => reference.includes('/corp/team/app') || reference === image.configs[0]?.digest;
    await node.removeImages((await node.images()).filter(ofImage));
    assert.deepEqual((await node.images()).filter(ofImage), [], 'the image is gone from the node');
    const since = proxy.logs.records.length;
    const body = pod('after-outage', CORP_IMAGE);
    const container = body.spec?.containers[0];
    if (container) container.imagePullPolicy = 'Always';
    await core.createNamespacedPod({ namespace: 'shop', body });
    const running = await waitForPod(core, 'shop', 'after-outage', isRunning, POD_TIMEOUT_MS, 'Running').catch((error: unknown) => {
      throw failure(error);
    });
    assert.equal(running.status?.containerStatuses?.[0]?.imageID, `localhost:${proxy.server.port}/corp/team/app@${image.index.digest}`);
    const served = pulls(since).filter((r) => r.status === 200);
    assert.ok(served.some((r) => r.kind === 'manifest' && r.reference === '1.0' && r.cache === 'stale'), 'the tag answered from the cache, stale');
    // The layer's unpacked snapshot stays on the node (running containers use it), so containerd
    // does not fetch the layer again; manifests and config are fetched, from the cache.
    const asked = JSON.stringify(pulls(since).map((r) => [r.kind, r.reference, r.status, r.cache]));
    for (const digest of [image.manifests[0]?.digest, image.configs[0]?.digest]) {
      assert.ok(served.some((r) => r.reference === digest && r.cache === 'hit'), `${digest} served from the cache: ${asked}`);
    }
    const logs = await runAsync(cachedBinary('kubectl'), ['--kubeconfig', cp.kubeconfig, 'logs', '-n', 'shop', 'after-outage']);
    assert.equal(logs.trim(), message);
  });

  it('stops cleanly: no process, mount, cgroup or changed sysctl left on this machine', async () => {
    const stopping = node;
    node = undefined;
    assert.ok(stopping);
    assert.deepEqual(await stopping.stop(), []);
  });
});
