// The webhook against a real kube-apiserver where the apiserver's own limits and the pull secret's
// life cycle matter: Pods near the annotation size limit, pull secrets deleted while webhook
// replicas keep admitting Pods, and a pull secret the apiserver refuses to let the webhook create
// (RBAC), in both failure modes.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CoreV1Api, KubeConfig, KubernetesObjectApi, type KubernetesObject, type V1Pod } from '@kubernetes/client-node';
import { parseAllDocuments } from 'yaml';
import { generateCertificates } from '../src/certs/certs.js';
import { runWebhook, type WebhookProcess } from '../src/webhook/run.js';
import { readSecretOrNull, registerWebhook } from './support/cluster.js';
import { configFrom } from './support/config.js';
import { cachedBinary, KUBE_VERSION, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { memoryLogger } from './support/logs.js';
import { runAsync } from './support/procs.js';

const CHART = fileURLToPath(new URL('../../charts/pullbridge', import.meta.url));

const CORP = 'registry.corp.example:5000';
const ANNOTATION_LIMIT = 256 * 1024;
/** How long a pull secret is kept without Pods (both replicas run with it, as one Deployment would). */
const GRACE_MS = 2000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls `done` until it holds or `timeoutMs` passes; resolves with its last answer. */
async function eventually(done: () => boolean | Promise<boolean>, timeoutMs: number): Promise<boolean> {
  for (const deadline = Date.now() + timeoutMs; Date.now() < deadline; await sleep(100)) if (await done()) return true;
  return done();
}

describe('the webhook against a real kube-apiserver: limits and pull secret upkeep', function () {
  this.timeout(180_000);
  let cp: ControlPlane;
  let core: CoreV1Api;
  /** The replica the apiserver calls. */
  let webhook: WebhookProcess;
  /** A second replica of the same Deployment: not called here, but it runs its own reconciler. */
  let other: WebhookProcess;
  const logs = memoryLogger();
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-cluster-'));
  const keyFile = join(dir, 'broker.key');
  const configYaml = () => `proxy: {host: 127.0.0.1, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [${keyFile}]}
registries:
  - {name: corp, match: ["${CORP}"], upstream: "https://127.0.0.1:5000"}
`;

  /** Creates a Pod as kubectl would, returning the status, the stored Pod and the warnings shown to the user. */
  function createPod(namespace: string, pod: V1Pod): Promise<{ status: number; pod: V1Pod; warnings: string[]; body: string }> {
    const body = JSON.stringify(pod);
    return new Promise((resolve, reject) => {
      const req = https.request(`${cp.url}/api/v1/namespaces/${namespace}/pods`, { method: 'POST', ca: cp.caCert, headers: { authorization: `Bearer ${cp.token}`, 'content-type': 'application/json' } }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        res.on('end', () => {
          const header = res.headers.warning;
          const warnings = (Array.isArray(header) ? header : header ? [header] : []).map((w) => /^\d{3} \S+ "(.*)"$/.exec(w)?.[1] ?? w);
          resolve({ status: res.statusCode ?? 0, pod: JSON.parse(text) as V1Pod, warnings, body: text.slice(0, 2000) });
        });
      });
      req.on('error', reject);
      req.end(body);
    });
  }

  const podOf = (name: string, images: string[], annotations?: Record<string, string>): V1Pod => ({
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name, ...(annotations ? { annotations } : {}) },
    spec: { containers: images.map((image, i) => ({ name: `c${i}`, image })) },
  });

  before(async () => {
    writeFileSync(keyFile, randomBytes(32).toString('hex'));
    cp = await startControlPlane();
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);
    await core.createNamespace({ body: { metadata: { name: 'pullbridge' } } });
    // The replicas act as the chart's service account, with exactly the rights the chart grants it.
    const rbac = await runAsync(cachedBinary('helm'), ['template', 'pullbridge', CHART, '-n', 'pullbridge', '--kube-version', KUBE_VERSION.slice(1), '--show-only', 'templates/rbac.yaml']);
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
    const replica = (logger = memoryLogger().logger) =>
      runWebhook({ config: configFrom(configYaml()), host: '127.0.0.1', port: 0, tls: { cert: certs.cert, key: certs.key }, kubeconfig: asWebhook, reconcileIntervalMs: 3_600_000, reconcileGraceMs: GRACE_MS, logger });
    [webhook, other] = await Promise.all([replica(logs.logger), replica()]);
    await registerWebhook(kc, `${webhook.running.url}/mutate`, certs.caCert, `${CORP}/team/app:1`);
  });

  after(async () => {
    await other?.shutdown();
    await webhook?.shutdown();
    await cp?.stop();
  });

  describe('the original-images annotation and the 256 KiB annotation limit', () => {
    // Long names, each rewritten to a name that is still valid.
    const longImage = (i: number) => `${CORP}/team/${'a'.repeat(200)}${String(i).padStart(4, '0')}:1`;

    it('creates a Pod whose images alone would overflow the annotations: rewritten, without the annotation, with a warning', async () => {
      await core.createNamespace({ body: { metadata: { name: 'many-images' } } });
      const images = Array.from({ length: 1100 }, (_, i) => longImage(i));
      const created = await createPod('many-images', podOf('many', images));
      assert.equal(created.status, 201, created.body);
      const stored = created.pod;
      assert.deepEqual(stored.spec?.containers.map((c) => c.image), images.map((image) => image.replace(`${CORP}/`, '127.0.0.1:30500/corp/')));
      assert.deepEqual(stored.spec?.imagePullSecrets, [{ name: 'pullbridge-pull' }]);
      assert.equal(stored.metadata?.labels?.['pullbridge.io/rewritten'], 'true');
      assert.equal(stored.metadata?.annotations?.['pullbridge.io/original-images'], undefined);
      assert.ok(created.warnings.some((w) => /pullbridge\.io\/original-images.*not added/.test(w)), created.warnings.join('\n'));
      const record = logs.records.find((r) => r.audit === 'admission' && r.namespace === 'many-images');
      assert.match(String(record?.originalImagesOmitted ?? ''), /262144/);
    });

    it('counts the Pod\'s own annotations: a Pod near the limit keeps them and is rewritten', async () => {
      await core.createNamespace({ body: { metadata: { name: 'annotated' } } });
      const own = { 'example.com/notes': 'n'.repeat(ANNOTATION_LIMIT - 20_000) };
      const images = Array.from({ length: 100 }, (_, i) => longImage(i));
      const created = await createPod('annotated', podOf('near-limit', images, own));
      assert.equal(created.status, 201, created.body);
      assert.equal(created.pod.spec?.containers[0]?.image, images[0]?.replace(`${CORP}/`, '127.0.0.1:30500/corp/'));
      assert.deepEqual(created.pod.metadata?.annotations, own);
      assert.ok(created.warnings.some((w) => /original-images/.test(w)), created.warnings.join('\n'));
      // The same Pod with fewer images fits: the annotation is added.
      const fits = await createPod('annotated', podOf('fits', images.slice(0, 10), own));
      assert.equal(fits.status, 201, fits.body);
      assert.equal(Object.keys(JSON.parse(fits.pod.metadata?.annotations?.['pullbridge.io/original-images'] ?? '{}') as object).length, 10);
      assert.deepEqual(fits.warnings, []);
    });
  });

  describe('the pull secret, deleted while Pods are admitted', () => {
    const image = `${CORP}/team/app:1`;

    const secretOrNull = (namespace: string) => readSecretOrNull(core, namespace);

    async function admitted(namespace: string, name: string): Promise<void> {
      const created = await createPod(namespace, podOf(name, [image]));
      assert.equal(created.status, 201, created.body);
      assert.equal(created.pod.spec?.containers[0]?.image, '127.0.0.1:30500/corp/team/app:1');
    }

    const noticed = (namespace: string, since = 0) => logs.records.slice(since).some((r) => r.namespace === namespace && r.msg === 'pull secret deleted; the next admission in its namespace re-creates it');

    /** Deletes the Secret as a user or the other replica would; resolves with whether the webhook said it noticed. */
    async function deleteSecret(namespace: string): Promise<boolean> {
      const seen = logs.records.length;
      await core.deleteNamespacedSecret({ namespace, name: 'pullbridge-pull' });
      return eventually(() => noticed(namespace, seen), 5000);
    }

    it('is restored by the next admission in its namespace', async () => {
      await core.createNamespace({ body: { metadata: { name: 'restore' } } });
      await admitted('restore', 'first');
      assert.ok(await secretOrNull('restore'));
      // Operators see it in the log (the watch runs with the chart's rights).
      assert.ok(await deleteSecret('restore'), 'the webhook logged that the pull secret was deleted');
      await admitted('restore', 'second');
      assert.ok(await secretOrNull('restore'), 'the next admission re-created the deleted pull secret');
    });

    it('is re-created by the reconciler where rewritten Pods still need it', async () => {
      await core.createNamespace({ body: { metadata: { name: 'recreate' } } });
      await admitted('recreate', 'web');
      await deleteSecret('recreate');
      await other.reconcile?.();
      const secret = await secretOrNull('recreate');
      assert.ok(secret, 'the reconciler re-created the missing pull secret');
      assert.equal(secret.metadata?.labels?.['app.kubernetes.io/managed-by'], 'pullbridge');
    });

    it('is kept for the grace period after the last admission, not after its creation, across replicas', async () => {
      await core.createNamespace({ body: { metadata: { name: 'grace' } } });
      // A Pod admitted and gone again (a Job's, or one refused after admission): only the Secret remains.
      await admitted('grace', 'early');
      await core.deleteNamespacedPod({ namespace: 'grace', name: 'early' });
      await sleep(GRACE_MS + 1000);
      // The Secret is now older than the grace. A new admission in the namespace, through this
      // replica, and the Pod is gone before the other replica's reconciler looks.
      await admitted('grace', 'late');
      await core.deleteNamespacedPod({ namespace: 'grace', name: 'late' });
      await other.reconcile?.();
      assert.ok(await secretOrNull('grace'), 'a pull secret used by an admission within the grace period is kept');

      // No admission for longer than the grace: the other replica deletes it, and the next
      // admission through this replica brings it back.
      await sleep(GRACE_MS + 1000);
      await other.reconcile?.();
      assert.equal(await secretOrNull('grace'), null, 'deleted once the grace has passed without admissions');
      await eventually(() => noticed('grace'), 5000);
      await admitted('grace', 'again');
      assert.ok(await secretOrNull('grace'), 'the next admission re-created the pull secret the other replica deleted');
    });
  });
});

// The pull secret's failure modes with the apiserver refusing for real: the webhook acts as the
// chart's service account with the chart's rights but for `create` on secrets.
describe('the webhook against a real kube-apiserver: a pull secret it may not create', function () {
  this.timeout(180_000);
  let cp: ControlPlane;
  let core: CoreV1Api;
  const webhooks: WebhookProcess[] = [];
  const logs = { deny: memoryLogger(), admit: memoryLogger() };
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-cluster-'));
  const keyFile = join(dir, 'broker.key');
  const image = `${CORP}/team/app:1`;
  const user = 'system:serviceaccount:pullbridge:pullbridge-webhook';

  function createPod(namespace: string, name: string): Promise<{ status: number; body: string; warnings: string[] }> {
    const pod: V1Pod = { apiVersion: 'v1', kind: 'Pod', metadata: { name }, spec: { containers: [{ name: 'app', image }] } };
    return new Promise((resolve, reject) => {
      const req = https.request(`${cp.url}/api/v1/namespaces/${namespace}/pods`, { method: 'POST', ca: cp.caCert, headers: { authorization: `Bearer ${cp.token}`, 'content-type': 'application/json' } }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        res.on('end', () => {
          const header = res.headers.warning;
          // RFC 7234 warn-text: a quoted-string, in which the apiserver escapes `"` and `\`.
          const warnings = (Array.isArray(header) ? header : header ? [header] : []).map((w) => (/^\d{3} \S+ "(.*)"$/.exec(w)?.[1] ?? w).replace(/\\(.)/g, '$1'));
          resolve({ status: res.statusCode ?? 0, body: text, warnings });
        });
      });
      req.on('error', reject);
      req.end(JSON.stringify(pod));
    });
  }

  before(async () => {
    writeFileSync(keyFile, randomBytes(32).toString('hex'));
    cp = await startControlPlane();
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);
    await core.createNamespace({ body: { metadata: { name: 'pullbridge' } } });
    // The chart's RBAC, less the rule that lets the webhook create secrets.
    const rbac = await runAsync(cachedBinary('helm'), ['template', 'pullbridge', CHART, '-n', 'pullbridge', '--kube-version', KUBE_VERSION.slice(1), '--show-only', 'templates/rbac.yaml']);
    const objects = KubernetesObjectApi.makeApiClient(kc);
    let removed = 0;
    for (const doc of parseAllDocuments(rbac)) {
      const object = doc.toJS() as (KubernetesObject & { rules?: Array<{ resources?: string[]; verbs?: string[]; resourceNames?: string[] }> }) | null;
      if (!object?.kind) continue;
      if (object.kind === 'ClusterRole' && object.rules) {
        const before = object.rules.length;
        object.rules = object.rules.filter((r) => !(r.resources?.includes('secrets') && r.verbs?.includes('create')));
        removed += before - object.rules.length;
      }
      await objects.create(object);
    }
    assert.equal(removed, 1, 'the chart grants create on secrets in one rule');
    const asWebhook = join(dir, 'kubeconfig');
    const admin = JSON.parse(readFileSync(cp.kubeconfig, 'utf8')) as { users: Array<{ user: Record<string, string> }> };
    for (const u of admin.users) u.user.as = user;
    writeFileSync(asWebhook, JSON.stringify(admin));
    const certs = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1'] });
    const configYaml = `proxy: {host: 127.0.0.1, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [${keyFile}]}
registries:
  - {name: corp, match: ["${CORP}"], upstream: "https://127.0.0.1:5000"}
`;
    // One webhook per failure mode, each registered for a namespace of its own.
    for (const [mode, namespace] of [['deny', 'denied'], ['admit-unchanged', 'admitted']] as const) {
      const webhook = await runWebhook({ config: configFrom(configYaml), host: '127.0.0.1', port: 0, tls: { cert: certs.cert, key: certs.key }, kubeconfig: asWebhook, reconcileIntervalMs: 3_600_000, pullSecretFailure: mode, logger: logs[mode === 'deny' ? 'deny' : 'admit'].logger });
      webhooks.push(webhook);
      await registerWebhook(kc, `${webhook.running.url}/mutate`, certs.caCert, image, namespace, { name: `pullbridge-${mode}` });
    }
  });

  after(async () => {
    for (const webhook of webhooks) await webhook.shutdown();
    await cp?.stop();
  });

  const forbidden = (namespace: string) => new RegExp(`could not provision pull secret "pullbridge-pull" in namespace "${namespace}": create secret ${namespace}/pullbridge-pull: HTTP 403: secrets is forbidden: User "${user}" cannot create resource "secrets" in API group "" in the namespace "${namespace}"`);

  it('deny: the Pod is refused with a message naming the Secret, the namespace and the missing right, and is not stored', async () => {
    const created = await createPod('denied', 'web');
    const status = JSON.parse(created.body) as { kind?: string; code?: number; message?: string };
    assert.equal(status.kind, 'Status', created.body);
    // 500, the code the webhook denies with: the cluster failed the Pod, not the Pod the cluster (a controller retries).
    assert.equal(created.status, 500, created.body);
    assert.equal(status.code, 500);
    assert.match(status.message ?? '', /^admission webhook "pods\.pullbridge\.io" denied the request: pullbridge: /);
    assert.match(status.message ?? '', forbidden('denied'));
    assert.equal(await readSecretOrNull(core, 'denied'), null);
    await assert.rejects(core.readNamespacedPod({ namespace: 'denied', name: 'web' }), (error: { code?: number }) => error.code === 404);
    const record = logs.deny.records.find((r) => r.audit === 'admission' && r.namespace === 'denied' && r.dryRun === false);
    assert.equal(record?.result, 'denied');
    assert.match(String(record?.error), forbidden('denied'));
  });

  it('admit-unchanged: the Pod is admitted with its images as they were, a warning, and an audit record that says why', async () => {
    const created = await createPod('admitted', 'web');
    assert.equal(created.status, 201, created.body);
    const stored = await core.readNamespacedPod({ namespace: 'admitted', name: 'web' });
    assert.deepEqual(stored.spec?.containers.map((c) => c.image), [image]);
    assert.equal(stored.spec?.imagePullSecrets, undefined);
    assert.equal(stored.metadata?.labels?.['pullbridge.io/rewritten'], undefined);
    assert.equal(stored.metadata?.annotations?.['pullbridge.io/original-images'], undefined);
    assert.ok(created.warnings.some((w) => /images left unchanged/.test(w) && forbidden('admitted').test(w)), created.warnings.join('\n'));
    assert.equal(await readSecretOrNull(core, 'admitted'), null);
    const record = logs.admit.records.find((r) => r.audit === 'admission' && r.namespace === 'admitted' && r.dryRun === false);
    assert.equal(record?.result, 'unchanged-after-error');
    assert.match(String(record?.error), forbidden('admitted'));
    // The record shows the Pod as admitted: no image rewritten, no pull secret, and why.
    assert.deepEqual((record?.images as Array<{ image: string; rewritten: string | null; reason: string }>).map((i) => [i.image, i.rewritten, i.reason]), [[image, null, 'pull-secret-not-provisioned']]);
    assert.equal(record?.pullSecret, null);
  });
});
