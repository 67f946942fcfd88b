// rewrite: never against a real kube-apiserver and a real registry with htpasswd auth: a Pod in a
// namespace the rule admits keeps its image and gets the rule's pull secret, which holds a
// dockerconfigjson that skopeo (containers/image, the CRI-O puller) authenticates with; a namespace
// outside the filter gets nothing; the Secret follows a credential change (the file rewritten, as
// kubelet rewrites a Secret mount); and it is removed once no Pod needs it. The webhook runs with the
// rights the chart's RBAC gives it, rendered with the same rule.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CoreV1Api, KubeConfig, KubernetesObjectApi, type KubernetesObject, type V1Pod, type V1Secret } from '@kubernetes/client-node';
import { parseAllDocuments } from 'yaml';
import { generateCertificates } from '../src/certs/certs.js';
import { UPSTREAM_PULL_SECRET_LABEL } from '../src/rules/marks.js';
import { runWebhook, type WebhookProcess } from '../src/webhook/run.js';
import { readSecretOrNull, registerWebhook } from './support/cluster.js';
import { configFrom } from './support/config.js';
import { cachedBinary, KUBE_VERSION, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { memoryLogger } from './support/logs.js';
import { buildImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const CHART = fileURLToPath(new URL('../../charts/pullbridge', import.meta.url));
const CORP = 'registry.corp.example:5000';
const SECRET = 'pullbridge-pull-vendor';
/** How long a pull secret is kept without Pods after the last admission that needed it. */
const GRACE_MS = 2000;
/** Two robot accounts of the vendor registry: the rule's credential before and after a rotation. */
const USERS = { 'robot-one': `one-${randomBytes(8).toString('hex')}`, 'robot-two': `two-${randomBytes(8).toString('hex')}` } as const;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('rewrite: never against a real kube-apiserver and registry', function () {
  this.timeout(180_000);
  let cp: ControlPlane;
  let core: CoreV1Api;
  let registry: RegistryHandle;
  let webhook: WebhookProcess;
  const logs = memoryLogger();
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-never-'));
  const keyFile = join(dir, 'broker.key');
  const usernameFile = join(dir, 'vendor.username');
  const passwordFile = join(dir, 'vendor.password');
  const image = buildImage({ layerSizes: [512] });
  let IMAGE = '';

  /** Creates a Pod as kubectl would: the status and the stored Pod. */
  function createPod(namespace: string, pod: V1Pod): Promise<{ status: number; pod: V1Pod; body: string }> {
    return new Promise((resolve, reject) => {
      const req = https.request(`${cp.url}/api/v1/namespaces/${namespace}/pods`, { method: 'POST', ca: cp.caCert, headers: { authorization: `Bearer ${cp.token}`, 'content-type': 'application/json' } }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, pod: JSON.parse(text) as V1Pod, body: text.slice(0, 2000) }));
      });
      req.on('error', reject);
      req.end(JSON.stringify(pod));
    });
  }
  const podOf = (name: string, images: string[]): V1Pod => ({ apiVersion: 'v1', kind: 'Pod', metadata: { name }, spec: { containers: images.map((img, i) => ({ name: `c${i}`, image: img })) } });

  /** The Secret's dockerconfigjson, written as an authfile for skopeo. */
  function authFileOf(secret: V1Secret, name: string): { file: string; auths: Record<string, { username: string; password: string; auth: string }> } {
    const json = Buffer.from(secret.data?.['.dockerconfigjson'] ?? '', 'base64').toString();
    const file = join(dir, name);
    writeFileSync(file, json);
    return { file, auths: (JSON.parse(json) as { auths: Record<string, { username: string; password: string; auth: string }> }).auths };
  }

  /** The image's index as the registry serves it to skopeo with this authfile (or none). */
  const inspectRaw = (authFile?: string) => runAsync('skopeo', ['inspect', '--raw', '--tls-verify=false', ...(authFile ? ['--authfile', authFile] : ['--no-creds']), `docker://${IMAGE}`]);

  /** Polls until `read` gives a value `done` accepts, or fails after `timeoutMs` with the last one. */
  async function until<T>(read: () => Promise<T>, done: (value: T) => boolean, timeoutMs: number, what: string): Promise<T> {
    let last: T | undefined;
    for (const deadline = Date.now() + timeoutMs; Date.now() < deadline; await sleep(250)) {
      last = await read();
      if (done(last)) return last;
    }
    throw new Error(`${what}: last seen ${JSON.stringify(last)}`);
  }

  before(async () => {
    registry = await startRegistry({ auth: 'basic', users: USERS });
    await registry.push(image, 'team/app', '1');
    IMAGE = `${registry.host}/team/app:1`;
    writeFileSync(keyFile, randomBytes(32).toString('hex'));
    writeFileSync(usernameFile, 'robot-one\n');
    writeFileSync(passwordFile, `${USERS['robot-one']}\n`);
    const configYaml = `proxy: {host: 127.0.0.1, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [${keyFile}]}
registries:
  - {name: corp, match: ["${CORP}"], upstream: "https://127.0.0.1:5000"}
  - name: vendor
    match: ["${registry.host}"]
    upstream: ${registry.url}
    rewrite: never
    shareUpstreamCredentials: true
    namespaces: {include: ["team-*"]}
    credentials: {usernameFile: ${usernameFile}, passwordFile: ${passwordFile}}
`;
    cp = await startControlPlane();
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);
    await core.createNamespace({ body: { metadata: { name: 'pullbridge' } } });
    for (const name of ['team-a', 'other']) await core.createNamespace({ body: { metadata: { name } } });
    // The webhook acts as the chart's service account, with the rights the chart grants for this rule.
    const values = join(dir, 'values.yaml');
    writeFileSync(values, `registries:\n  - {name: vendor, match: ["${registry.host}"], upstream: "${registry.url}", rewrite: never, shareUpstreamCredentials: true, namespaces: {include: ["team-*"]}, credentials: {username: u, password: p}}\n`);
    const rbac = await runAsync(cachedBinary('helm'), ['template', 'pullbridge', CHART, '-n', 'pullbridge', '--kube-version', KUBE_VERSION.slice(1), '-f', values, '--show-only', 'templates/rbac.yaml']);
    const objects = KubernetesObjectApi.makeApiClient(kc);
    for (const doc of parseAllDocuments(rbac)) {
      const object = doc.toJS() as KubernetesObject | null;
      if (object?.kind) await objects.create(object);
    }
    const asWebhook = join(dir, 'kubeconfig');
    const admin = JSON.parse(readFileSync(cp.kubeconfig, 'utf8')) as { users: Array<{ user: Record<string, string> }> };
    for (const u of admin.users) u.user.as = 'system:serviceaccount:pullbridge:pullbridge-webhook';
    writeFileSync(asWebhook, JSON.stringify(admin));
    const certs = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1'] });
    webhook = await runWebhook({ config: configFrom(configYaml), host: '127.0.0.1', port: 0, tls: { cert: certs.cert, key: certs.key }, kubeconfig: asWebhook, reconcileIntervalMs: 3_600_000, reconcileGraceMs: GRACE_MS, logger: logs.logger });
    await registerWebhook(kc, `${webhook.running.url}/mutate`, certs.caCert, `${CORP}/team/app:1`);
  });

  after(async () => {
    await webhook?.shutdown();
    await cp?.stop();
    await registry?.stop();
  });

  it('a Pod in an admitted namespace keeps its image and gets the rule\'s pull secret, which skopeo authenticates with at the registry', async () => {
    await assert.rejects(inspectRaw(), /unauthorized|authentication required|401/i, 'the registry refuses anonymous pulls');
    const created = await createPod('team-a', podOf('app', [IMAGE, 'busybox:1']));
    assert.equal(created.status, 201, created.body);
    assert.deepEqual(created.pod.spec?.containers.map((c) => c.image), [IMAGE, 'busybox:1']);
    assert.deepEqual(created.pod.spec?.imagePullSecrets, [{ name: SECRET }]);
    assert.equal(created.pod.metadata?.labels?.[UPSTREAM_PULL_SECRET_LABEL], 'true');
    assert.equal(created.pod.metadata?.labels?.['pullbridge.io/rewritten'], undefined, 'nothing was rewritten');
    assert.equal(created.pod.metadata?.annotations?.['pullbridge.io/original-images'], undefined);
    const secret = await core.readNamespacedSecret({ namespace: 'team-a', name: SECRET });
    assert.equal(secret.type, 'kubernetes.io/dockerconfigjson');
    const { file, auths } = authFileOf(secret, 'auth-one.json');
    assert.deepEqual(Object.keys(auths), [registry.host]);
    assert.equal(auths[registry.host]?.username, 'robot-one');
    const raw = await inspectRaw(file);
    assert.equal(`sha256:${createHash('sha256').update(raw).digest('hex')}`, image.index.digest, 'the registry served the image to the Secret\'s credential');
    assert.equal(await readSecretOrNull(core, 'team-a', 'pullbridge-pull'), null, 'no broker secret: no image went through the proxy');
    const record = logs.records.find((r) => r.audit === 'admission' && r.namespace === 'team-a');
    assert.deepEqual((record?.images as Array<{ reason: string; rule: string | null }>).map((i) => [i.reason, i.rule]), [['pull-secret-only', 'vendor'], ['no-matching-rule', null]]);
    assert.deepEqual(record?.upstreamPullSecrets, [SECRET]);
    assert.ok(!logs.raw.some((line) => line.includes(USERS['robot-one'])), 'the credential is never logged');
  });

  it('a namespace outside the rule\'s filter gets nothing: the image, no pull secret, no Secret', async () => {
    const created = await createPod('other', podOf('app', [IMAGE]));
    assert.equal(created.status, 201, created.body);
    assert.deepEqual(created.pod.spec?.containers.map((c) => c.image), [IMAGE]);
    assert.equal(created.pod.spec?.imagePullSecrets, undefined);
    assert.equal(created.pod.metadata?.labels?.[UPSTREAM_PULL_SECRET_LABEL], undefined);
    assert.equal(await readSecretOrNull(core, 'other', SECRET), null);
    const record = logs.records.find((r) => r.audit === 'admission' && r.namespace === 'other');
    assert.equal((record?.images as Array<{ reason: string }>)[0]?.reason, 'namespace-not-allowed');
    await webhook.reconcile?.();
    assert.equal(await readSecretOrNull(core, 'other', SECRET), null, 'nor does the reconciler put it there');
  });

  it('follows a credential change: the file rewritten, the reconciler rewrites the Secret, which authenticates as the new robot', async () => {
    // As kubelet updates a Secret mount: the files change in place.
    writeFileSync(usernameFile, 'robot-two\n');
    writeFileSync(passwordFile, `${USERS['robot-two']}\n`);
    const secret = await until(
      async () => {
        await webhook.reconcile?.();
        return core.readNamespacedSecret({ namespace: 'team-a', name: SECRET });
      },
      (s) => authFileOf(s, 'auth-probe.json').auths[registry.host]?.username === 'robot-two',
      30_000,
      'the Secret never took the new credential',
    );
    const { file, auths } = authFileOf(secret, 'auth-two.json');
    assert.equal(auths[registry.host]?.password, USERS['robot-two']);
    assert.equal(`sha256:${createHash('sha256').update(await inspectRaw(file)).digest('hex')}`, image.index.digest);
  });

  it('deleted by hand: the webhook\'s watch on its name sees it, and the next admission in the namespace re-creates it', async () => {
    await core.deleteNamespacedSecret({ namespace: 'team-a', name: SECRET });
    await until(async () => logs.records.some((r) => r.msg === 'pull secret deleted; the next admission in its namespace re-creates it' && r.secret === SECRET && r.namespace === 'team-a'), (seen) => seen, 30_000, 'the watch never reported the deletion');
    const created = await createPod('team-a', podOf('app2', [IMAGE]));
    assert.equal(created.status, 201, created.body);
    const secret = await core.readNamespacedSecret({ namespace: 'team-a', name: SECRET });
    assert.equal(authFileOf(secret, 'auth-again.json').auths[registry.host]?.username, 'robot-two', 'with the credential in force');
  });

  it('is removed once no Pod needs it (after the grace since the last admission), and only then', async () => {
    await webhook.reconcile?.();
    assert.notEqual(await readSecretOrNull(core, 'team-a', SECRET), null, 'kept while the Pod lists it');
    for (const name of ['app', 'app2']) await core.deleteNamespacedPod({ namespace: 'team-a', name, gracePeriodSeconds: 0 });
    await until(async () => (await core.listNamespacedPod({ namespace: 'team-a' })).items.length, (n) => n === 0, 30_000, 'the Pod was never deleted');
    await until(
      async () => {
        await webhook.reconcile?.();
        return readSecretOrNull(core, 'team-a', SECRET);
      },
      (s) => s === null,
      30_000,
      'the Secret was never removed',
    );
    const deleted = logs.records.find((r) => Array.isArray(r.deleted) && (r.deleted as string[]).includes(`team-a/${SECRET}`));
    assert.ok(deleted, 'the reconciler says it deleted it');
  });
});
