// rewrite: never on a real node: kubelet (with containerd's CRI plugin) pulls an image that the
// webhook left as written, from a docker-registry with htpasswd auth, with the rule's pull secret the
// webhook provisioned: kubelet finds the credential under the registry's host in that
// dockerconfigjson, as it would a user's own. A namespace outside the rule's filter gets no secret,
// and kubelet's pull is refused with 401.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoreV1Api, KubeConfig } from '@kubernetes/client-node';
import { generateCertificates } from '../src/certs/certs.js';
import { runWebhook, type WebhookProcess } from '../src/webhook/run.js';
import { isRunning, readSecretOrNull, registerWebhook, waitForNode, waitForPod, waitingState } from './support/cluster.js';
import { configFrom } from './support/config.js';
import { cachedBinary, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { memoryLogger } from './support/logs.js';
import { buildWorkloadImage, nodePod, startNode, stopAllNodes, type RealNode } from './support/node.js';
import type { TestImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const SECRET = 'pullbridge-pull-vendor';
const ROBOT = { user: 'vendor-robot', password: `pw-${randomBytes(8).toString('hex')}` };
// A first Pod can wait ~15 s on the Node-authorizer race (kubelet asks for the pull secret before
// the authorizer's graph knows the Pod, pulls anonymously, backs off).
const POD_TIMEOUT_MS = 120_000;

describe('rewrite: never on a real node: kubelet pulls the original image with the rule\'s pull secret', function () {
  this.timeout(300_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-never-node-'));
  const message = `hello from the vendor registry ${randomBytes(4).toString('hex')}`;
  let cp: ControlPlane;
  let registry: RegistryHandle;
  let webhook: WebhookProcess;
  let node: RealNode | undefined;
  let core: CoreV1Api;
  let image: TestImage;
  /** As the Pod's author writes it: the registry's own host (localhost on the node, as for the proxy). */
  let original = '';
  const logs = memoryLogger();
  const failure = (error: unknown) => new Error(`${(error as Error).message}\n--- node ---\n${node?.logs().slice(-6000) ?? ''}`);

  before(async function () {
    this.timeout(300_000);
    [cp, registry] = await Promise.all([startControlPlane(), startRegistry({ auth: 'basic', users: { [ROBOT.user]: ROBOT.password } })]);
    image = buildWorkloadImage(dir, message);
    await registry.push(image, 'vendor/app', '1.0');
    original = `localhost:${registry.port}/vendor/app:1.0`;
    writeFileSync(join(dir, 'broker.key'), randomBytes(32).toString('hex'));
    writeFileSync(join(dir, 'vendor.password'), `${ROBOT.password}\n`);
    const config = configFrom(`proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [${join(dir, 'broker.key')}]}
registries:
  - {name: corp, match: [registry.corp.example:5000], upstream: "https://127.0.0.1:5000"}
  - name: vendor
    match: ["localhost:${registry.port}"]
    upstream: ${registry.url}
    rewrite: never
    shareUpstreamCredentials: true
    namespaces: {include: [shop]}
    credentials: {username: ${ROBOT.user}, passwordFile: ${join(dir, 'vendor.password')}}
`);
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);
    for (const name of ['pullbridge', 'shop', 'other']) await core.createNamespace({ body: { metadata: { name } } });
    const certs = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1'] });
    webhook = await runWebhook({ config, host: '127.0.0.1', port: 0, tls: { cert: certs.cert, key: certs.key }, kubeconfig: cp.kubeconfig, reconcileIntervalMs: 3_600_000, logger: logs.logger });
    await registerWebhook(kc, `${webhook.running.url}/mutate`, certs.caCert, 'registry.corp.example:5000/team/app:1');
    node = await startNode({ controlPlane: cp, token: cp.nodeToken });
    await node.reach(registry.port);
    await waitForNode(core, node.name, 60_000).catch((error: unknown) => {
      throw failure(error);
    });
  });

  after(async () => {
    await node?.stop();
    await stopAllNodes(); // one whose start outlived a timed-out setup
    await webhook?.shutdown();
    await registry?.stop();
    await cp?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('runs the Pod in an admitted namespace: image as written, the rule\'s pull secret, pulled from the registry by kubelet, output in kubectl logs', async () => {
    if (!node) throw new Error('the node is not running');
    await core.createNamespacedPod({ namespace: 'shop', body: nodePod(node, 'web', original) });
    const stored = await core.readNamespacedPod({ namespace: 'shop', name: 'web' });
    assert.equal(stored.spec?.containers[0]?.image, original);
    assert.deepEqual(stored.spec?.imagePullSecrets?.map((s) => s.name), [SECRET]);
    const running = await waitForPod(core, 'shop', 'web', isRunning, POD_TIMEOUT_MS, 'Running').catch((error: unknown) => {
      throw failure(error);
    });
    assert.equal(running.status?.containerStatuses?.[0]?.imageID, `localhost:${registry.port}/vendor/app@${image.index.digest}`);
    const output = await runAsync(cachedBinary('kubectl'), ['--kubeconfig', cp.kubeconfig, 'logs', '-n', 'shop', 'web']);
    assert.equal(output.trim(), message);
  });

  it('a namespace outside the rule\'s filter gets no secret, and kubelet\'s pull is refused with 401', async () => {
    if (!node) throw new Error('the node is not running');
    await node.removeImages([original]); // nothing left on the node from the Pod above (imagePullPolicy: Always pulls anyway)
    await core.createNamespacedPod({ namespace: 'other', body: nodePod(node, 'web', original) });
    const stored = await core.readNamespacedPod({ namespace: 'other', name: 'web' });
    assert.equal(stored.spec?.imagePullSecrets, undefined);
    assert.equal(await readSecretOrNull(core, 'other', SECRET), null);
    const failed = await waitForPod(core, 'other', 'web', (p) => /ErrImagePull|ImagePullBackOff/.test(waitingState(p)) && waitingState(p).includes('401'), POD_TIMEOUT_MS, 'ErrImagePull 401').catch((error: unknown) => {
      throw failure(error);
    });
    assert.equal(isRunning(failed), false);
  });
});
