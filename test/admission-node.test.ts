// Admission that knows the upstream, on a real node (kubelet + containerd CRI): one Pod per mode.
// The webhook asks a real proxy's admission endpoints (its --resolver-url), which answer through
// the rules' transport from docker-registry; kubelet then pulls what the webhook wrote.
// - rewrite: private-only: a public repository (the registry's token server grants anonymous pull)
//   stays as written and kubelet pulls it straight from the registry; a private one is rewritten and
//   pulled through the proxy with the namespace's pull secret.
// - pinDigest: the Pod runs the digest the tag named at admission, written as tag@sha256.
// - verify: an image signed with cosign (real cosign, built from its module) runs, pinned to the
//   digest verified; an unsigned one is refused at creation with the reason.
// (rewrite: never on a real node: test/never-node.test.ts.)

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoreV1Api, KubeConfig, type V1Pod } from '@kubernetes/client-node';
import { generateCertificates } from '../src/certs/certs.js';
import { parseConfig } from '../src/rules/config.js';
import { runWebhook, type WebhookProcess } from '../src/webhook/run.js';
import { isRunning, registerWebhook, waitForNode, waitForPod } from './support/cluster.js';
import { cachedBinary, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { generateKeyPair, sign, type CosignKeyPair } from './support/cosign.js';
import { memoryLogger } from './support/logs.js';
import { buildWorkloadImage, nodePod, startNode, stopAllNodes, type RealNode } from './support/node.js';
import type { TestImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { runProxyUnderTest, type ProxyProcessUnderTest } from './support/proxy.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const [USER, PASSWORD] = Object.entries(DEFAULT_USERS)[0] as [string, string];
const NAMESPACE = 'shop';
// A first Pod can wait ~15 s on the Node-authorizer race for its pull secret (real-node.md).
const POD_TIMEOUT_MS = 120_000;

interface AuditRecord {
  readonly images?: Array<{ readonly image: string | null; readonly rewritten: string | null; readonly reason: string; readonly upstream?: { readonly probe?: { readonly outcome: string }; readonly digest?: { readonly digest?: string; readonly pinned?: boolean }; readonly signature?: { readonly verified: boolean } } }>;
}

describe('admission that knows the upstream, on a real node: private-only, pinDigest and verify, one Pod each', function () {
  this.timeout(300_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-admission-node-'));
  const nonce = randomBytes(4).toString('hex');
  // One image per repository (its own message, so its own digest): CRI reports a container's imageID
  // by one of the names its content was pulled under, which must name this Pod's pull.
  const messageOf = (repository: string) => `hello from ${repository} ${nonce}`;
  const images = new Map<string, TestImage>();
  const digestOf = (repository: string) => images.get(repository)?.index.digest ?? '';
  const key = Buffer.from(randomBytes(32).toString('hex'));
  let cp: ControlPlane;
  /** Token auth, one repository public: the private-only rule's upstream. */
  let tokenRegistry: RegistryHandle;
  /** No auth (cosign pushes its signatures there): the pinDigest and verify rules' upstream. */
  let plainRegistry: RegistryHandle;
  let proxy: ProxyProcessUnderTest;
  let webhook: WebhookProcess;
  let node: RealNode | undefined;
  let core: CoreV1Api;
  let cosignKey: CosignKeyPair;
  let proxyPort = 0;
  const logs = memoryLogger();
  const failure = (error: unknown) => new Error(`${(error as Error).message}\n--- node ---\n${node?.logs().slice(-6000) ?? ''}`);
  const pod = (name: string, image: string): V1Pod => {
    if (!node) throw new Error('the node is not running');
    return nodePod(node, name, image);
  };
  const running = (name: string) =>
    waitForPod(core, NAMESPACE, name, isRunning, POD_TIMEOUT_MS, 'Running').catch((error: unknown) => {
      throw failure(error);
    });
  const kubectlLogs = async (name: string) => (await runAsync(cachedBinary('kubectl'), ['--kubeconfig', cp.kubeconfig, 'logs', '-n', NAMESPACE, name])).trim();
  /** The webhook's audit record of a container image, once written. */
  const audited = async (original: string) => {
    for (let i = 0; i < 100; i++) {
      const record = (logs.records as AuditRecord[]).flatMap((r) => r.images ?? []).find((c) => c.image === original);
      if (record) return record;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.fail(`no audit record for ${original}`);
  };

  before(async function () {
    this.timeout(300_000);
    [cp, tokenRegistry, plainRegistry, cosignKey] = await Promise.all([startControlPlane(), startRegistry({ auth: 'token', anonymousPull: ['public/app'] }), startRegistry(), generateKeyPair()]);
    for (const repository of ['public/app', 'private/app', 'pinned/app', 'signed/app', 'unsigned/app']) images.set(repository, buildWorkloadImage(dir, messageOf(repository)));
    for (const repository of ['public/app', 'private/app']) await tokenRegistry.push(images.get(repository) as TestImage, repository, '1.0');
    for (const repository of ['pinned/app', 'signed/app', 'unsigned/app']) await plainRegistry.push(images.get(repository) as TestImage, repository, '1.0');
    await sign(`127.0.0.1:${plainRegistry.port}/signed/app@${digestOf('signed/app')}`, cosignKey);

    writeFileSync(join(dir, 'password'), PASSWORD);
    const credentials = { username: USER, passwordFile: join(dir, 'password') };
    // The images are written as the node reaches the registries: localhost (plain HTTP for containerd).
    const rules = [
      { name: 'corp', match: [`localhost:${tokenRegistry.port}`], upstream: tokenRegistry.url, credentials, auth: { mode: 'broker' as const, tokenRealms: [new URL(tokenRegistry.issuer?.realm ?? '').origin] }, rewrite: 'private-only' as const },
      { name: 'pinned', match: [`localhost:${plainRegistry.port}`], upstream: plainRegistry.url, repositories: { include: ['pinned/*'], exclude: [] }, pinDigest: true },
      { name: 'signed', match: [`localhost:${plainRegistry.port}`], upstream: plainRegistry.url, repositories: { include: ['signed/*', 'unsigned/*'], exclude: [] }, verify: { cosign: { publicKeyFiles: [cosignKey.publicKeyFile] }, onFailure: 'deny' as const } },
    ];
    proxy = await runProxyUnderTest({ cache: { path: join(dir, 'cache') }, registries: rules }, key);
    proxyPort = Number(new URL(proxy.url).port);
    writeFileSync(join(dir, 'broker.key'), `${key.toString()}\n`);
    const parsed = parseConfig(JSON.stringify({ proxy: { host: 'localhost', port: proxyPort }, webhook: { namespace: 'pullbridge' }, broker: { keyFiles: [join(dir, 'broker.key')] }, registries: rules }));
    if (!parsed.ok) throw new Error(JSON.stringify(parsed.errors));

    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);
    for (const name of ['pullbridge', NAMESPACE]) await core.createNamespace({ body: { metadata: { name } } });
    const certs = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1'] });
    webhook = await runWebhook({ config: parsed.config, host: '127.0.0.1', port: 0, tls: { cert: certs.cert, key: certs.key }, kubeconfig: cp.kubeconfig, reconcileIntervalMs: 3_600_000, logger: logs.logger, resolver: { urls: [proxy.opsUrl] } });
    await registerWebhook(kc, `${webhook.running.url}/mutate`, certs.caCert, `localhost:${tokenRegistry.port}/private/app:1.0`);

    node = await startNode({ controlPlane: cp, token: cp.nodeToken });
    // kubelet reaches the proxy, the token registry and its token server, and the plain registry.
    for (const port of [proxyPort, tokenRegistry.port, Number(new URL(tokenRegistry.issuer?.realm ?? '').port), plainRegistry.port]) await node.reach(port);
    await waitForNode(core, node.name, 60_000).catch((error: unknown) => {
      throw failure(error);
    });
  });

  after(async () => {
    await node?.stop();
    await stopAllNodes(); // one whose start outlived a timed-out setup
    await webhook?.shutdown();
    await proxy?.close();
    await tokenRegistry?.stop();
    await plainRegistry?.stop();
    await cp?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('private-only: the public repository stays as written and kubelet pulls it from the registry; the private one is rewritten and pulled through the proxy', async () => {
    const publicImage = `localhost:${tokenRegistry.port}/public/app:1.0`;
    const privateImage = `localhost:${tokenRegistry.port}/private/app:1.0`;
    await core.createNamespacedPod({ namespace: NAMESPACE, body: pod('public', publicImage) });
    await core.createNamespacedPod({ namespace: NAMESPACE, body: pod('private', privateImage) });
    const stored = await core.readNamespacedPod({ namespace: NAMESPACE, name: 'public' });
    assert.equal(stored.spec?.containers[0]?.image, publicImage);
    assert.equal((await audited(publicImage)).reason, 'public-image');
    assert.equal((await audited(privateImage)).upstream?.probe?.outcome, 'private');

    const publicPod = await running('public');
    assert.equal(publicPod.status?.containerStatuses?.[0]?.imageID, `localhost:${tokenRegistry.port}/public/app@${digestOf('public/app')}`, 'kubelet pulled the public image from the registry itself');
    const privatePod = await running('private');
    assert.equal(privatePod.status?.containerStatuses?.[0]?.imageID, `localhost:${proxyPort}/corp/private/app@${digestOf('private/app')}`, 'kubelet pulled the private image through the proxy');
    assert.equal(await kubectlLogs('public'), messageOf('public/app'));
    assert.equal(await kubectlLogs('private'), messageOf('private/app'));
    // The token server saw the node's anonymous token request for the public repository.
    assert.ok(tokenRegistry.issuer?.requests.some((r) => r.user === null && r.scope === 'repository:public/app:pull'));
  });

  it('pinDigest: the Pod runs the digest its tag named at admission, written as tag@sha256', async () => {
    const original = `localhost:${plainRegistry.port}/pinned/app:1.0`;
    await core.createNamespacedPod({ namespace: NAMESPACE, body: pod('pinned', original) });
    const stored = await core.readNamespacedPod({ namespace: NAMESPACE, name: 'pinned' });
    assert.equal(stored.spec?.containers[0]?.image, `localhost:${proxyPort}/pinned/pinned/app:1.0@${digestOf('pinned/app')}`);
    assert.equal(JSON.parse(stored.metadata?.annotations?.['pullbridge.io/original-images'] ?? '{}')['containers/app'], original);
    const record = await audited(original);
    assert.deepEqual([record.upstream?.digest?.digest, record.upstream?.digest?.pinned], [digestOf('pinned/app'), true]);
    const ran = await running('pinned');
    assert.equal(ran.status?.containerStatuses?.[0]?.imageID, `localhost:${proxyPort}/pinned/pinned/app@${digestOf('pinned/app')}`);
    assert.equal(await kubectlLogs('pinned'), messageOf('pinned/app'));
  });

  it('verify: the image signed with the rule\'s key runs, pinned to the digest verified; the unsigned one is refused at creation with the reason', async () => {
    const signed = `localhost:${plainRegistry.port}/signed/app:1.0`;
    await core.createNamespacedPod({ namespace: NAMESPACE, body: pod('signed', signed) });
    const stored = await core.readNamespacedPod({ namespace: NAMESPACE, name: 'signed' });
    assert.equal(stored.spec?.containers[0]?.image, `localhost:${proxyPort}/signed/signed/app:1.0@${digestOf('signed/app')}`);
    assert.equal((await audited(signed)).upstream?.signature?.verified, true);
    const ran = await running('signed');
    assert.equal(ran.status?.containerStatuses?.[0]?.imageID, `localhost:${proxyPort}/signed/signed/app@${digestOf('signed/app')}`);
    assert.equal(await kubectlLogs('signed'), messageOf('signed/app'));

    const unsigned = `localhost:${plainRegistry.port}/unsigned/app:1.0`;
    await assert.rejects(core.createNamespacedPod({ namespace: NAMESPACE, body: pod('unsigned', unsigned) }), (error: Error & { code?: number; body?: string }) => {
      assert.equal(error.code, 403);
      assert.match(String(error.body ?? error.message), /containers\/app image localhost:\d+\/unsigned\/app:1\.0: signature not verified: unsigned/);
      return true;
    });
    await assert.rejects(core.readNamespacedPod({ namespace: NAMESPACE, name: 'unsigned' }), (error: Error & { code?: number }) => error.code === 404);
  });
});
