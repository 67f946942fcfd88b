// Upstream-aware admission against a real kube-apiserver with kube-controller-manager (Deployments
// make ReplicaSets make Pods) and a real docker-registry behind a token server, asked through
// test/support/directview.ts (the proxy tier's RegistryView comes separately). No kubelet: Pods stay
// Pending, and the assertions are on what the apiserver stored.

import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { AppsV1Api, CoreV1Api, KubeConfig, KubernetesObjectApi, type KubernetesObject, type V1Deployment, type V1Pod } from '@kubernetes/client-node';
import { parseAllDocuments } from 'yaml';
import { generateCertificates } from '../src/certs/certs.js';
import { MAX_PINS_ANNOTATION_BYTES, ReplicaSetPins } from '../src/k8s/replicasets.js';
import { PINNED_DIGESTS_ANNOTATION } from '../src/rules/marks.js';
import type { SignatureCheck } from '../src/webhook/upstream.js';
import { runWebhook, type WebhookProcess } from '../src/webhook/run.js';
import { registerWebhook } from './support/cluster.js';
import { configFrom } from './support/config.js';
import { cachedBinary, KUBE_VERSION, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { directRegistryView, type DirectView } from './support/directview.js';
import { memoryLogger } from './support/logs.js';
import { buildImage, type TestImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const CHART = fileURLToPath(new URL('../../charts/pullbridge', import.meta.url));
const PROXY = '127.0.0.1:30500';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls `read` until `done` holds of its result (at most `timeoutMs`), else fails with the last result. */
async function until<T>(read: () => Promise<T>, done: (value: T) => boolean, timeoutMs: number, what: string): Promise<T> {
  let last: T | undefined;
  for (const deadline = Date.now() + timeoutMs; Date.now() < deadline; await sleep(200)) {
    last = await read();
    if (done(last)) return last;
  }
  throw new Error(`${what} never happened; last: ${JSON.stringify(last)?.slice(0, 2000)}`);
}

describe('upstream-aware admission against a real apiserver, controller manager and registry', function () {
  this.timeout(240_000);
  let cp: ControlPlane;
  let core: CoreV1Api;
  let apps: AppsV1Api;
  let registry: RegistryHandle;
  let view: DirectView;
  let webhook: WebhookProcess;
  const logs = memoryLogger();
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-upstream-'));
  const v1 = buildImage({ layerSizes: [64] });
  const v2 = buildImage({ layerSizes: [64] });
  const signedImage = buildImage({ layerSizes: [64] });
  const unsignedImage = buildImage({ layerSizes: [64] });
  /** A stub for the cosign verifier (another module): this test is about what admission does with its answer. */
  const signatureCheck: SignatureCheck = (_target, digest) => Promise.resolve(digest === signedImage.index.digest ? { verified: true } : { verified: false, reason: 'no signature by a trusted key' });

  before(async () => {
    [cp, registry] = await Promise.all([startControlPlane({ controllers: true }), startRegistry({ auth: 'token', anonymousPull: ['public/app'], accessLog: true })]);
    await Promise.all([
      registry.push(v1, 'team/app', '1'),
      registry.push(v1, 'public/app', '1'),
      registry.push(v1, 'team/probed', '1'),
      registry.push(signedImage, 'team/signed', '1'),
      registry.push(unsignedImage, 'team/signed', '2'),
    ]);
    view = directRegistryView({ upstream: registry.url, credentials: { username: 'puller', password: DEFAULT_USERS.puller } });
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);
    apps = kc.makeApiClient(AppsV1Api);
    await core.createNamespace({ body: { metadata: { name: 'pullbridge' } } });
    // The webhook acts as the chart's service account, with exactly the rights the chart grants it.
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
    // Upstream-aware rules need a broker key (the resolver token is derived from it), anonymous or not.
    writeFileSync(join(dir, 'broker.key'), `${'ef'.repeat(32)}\n`);
    const config = configFrom(`proxy: {host: 127.0.0.1, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [${join(dir, 'broker.key')}]}
registries:
  - {name: pins, match: ["pins.corp.example:5000"], upstream: "${registry.url}", auth: {mode: anonymous}, pinDigest: true}
  - {name: corp, match: ["registry.corp.example:5000"], upstream: "${registry.url}", auth: {mode: anonymous}, rewrite: private-only}
  - {name: signed, match: ["signed.corp.example:5000"], upstream: "${registry.url}", auth: {mode: anonymous}, repositories: {include: [team/signed]}, verify: {cosign: {publicKeyFiles: [/keys/cosign.pub]}}}
  - {name: plain, match: ["plain.corp.example:5000"], upstream: "${registry.url}", auth: {mode: anonymous}}
`);
    const certs = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1'] });
    webhook = await runWebhook({ config, host: '127.0.0.1', port: 0, tls: { cert: certs.cert, key: certs.key }, kubeconfig: asWebhook, reconcileIntervalMs: 3_600_000, logger: logs.logger, upstream: { view, signatureCheck } });
    await registerWebhook(kc, `${webhook.running.url}/mutate`, certs.caCert, 'plain.corp.example:5000/team/app:1');
  });

  after(async () => {
    await webhook?.shutdown();
    await Promise.all([cp?.stop(), registry?.stop()]);
    rmSync(dir, { recursive: true, force: true });
  });

  const podsOf = async (namespace: string, selector: string) => (await core.listNamespacedPod({ namespace, labelSelector: selector })).items;
  const imagesOf = (pods: V1Pod[]) => pods.map((p) => p.spec?.containers[0]?.image).sort();

  /** Reads, changes and writes the Deployment back, again on a conflict. */
  async function updateDeployment(namespace: string, name: string, change: (d: V1Deployment) => void): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      const current = await apps.readNamespacedDeployment({ namespace, name });
      change(current);
      try {
        await apps.replaceNamespacedDeployment({ namespace, name, body: current });
        return;
      } catch (error) {
        if ((error as { code?: number }).code !== 409 || attempt > 5) throw error;
      }
    }
  }

  describe('pinDigest: a Deployment\'s ReplicaSet is pinned once', () => {
    const ns = 'pinning';
    const image = 'pins.corp.example:5000/team/app:1';
    const pinned = (img: TestImage) => `${PROXY}/pins/team/app:1@${img.index.digest}`;

    it('pins every replica to the digest of the tag when its ReplicaSet was created, though the tag moves in between', async () => {
      await core.createNamespace({ body: { metadata: { name: ns } } });
      const labels = { app: 'web' };
      await apps.createNamespacedDeployment({ namespace: ns, body: { metadata: { name: 'web' }, spec: { replicas: 1, selector: { matchLabels: labels }, template: { metadata: { labels }, spec: { containers: [{ name: 'app', image }] } } } } });
      const first = await until(() => podsOf(ns, 'app=web'), (pods) => pods.length === 1, 60_000, 'the first Pod');
      assert.deepEqual(imagesOf(first), [pinned(v1)]);
      assert.deepEqual(JSON.parse(first[0]?.metadata?.annotations?.['pullbridge.io/original-images'] ?? '{}'), { 'containers/app': image });
      const [rs] = (await apps.listNamespacedReplicaSet({ namespace: ns })).items;
      assert.deepEqual(JSON.parse(rs?.metadata?.annotations?.[PINNED_DIGESTS_ANNOTATION] ?? '{}'), { [image]: v1.index.digest });
      assert.equal(rs?.spec?.template?.spec?.containers[0]?.image, image, 'the ReplicaSet\'s template is never changed');

      // The tag moves; the second replica comes from the same ReplicaSet and takes its pin.
      await registry.push(v2, 'team/app', '1');
      const moved = await view.manifest({ rule: 'pins', repository: 'team/app', reference: '1', namespace: ns, method: 'HEAD' }, AbortSignal.timeout(10_000));
      assert.equal(moved.kind === 'found' ? moved.digest : moved.kind, v2.index.digest);
      await updateDeployment(ns, 'web', (d) => {
        if (d.spec) d.spec.replicas = 2;
      });
      const both = await until(() => podsOf(ns, 'app=web'), (pods) => pods.length === 2, 60_000, 'the second Pod');
      assert.deepEqual(imagesOf(both), [pinned(v1), pinned(v1)]);
      // Both Pods' admissions took the ReplicaSet's pin; neither resolved the tag.
      const records = await until(async () => logs.records.filter((r) => r.audit === 'admission' && r.namespace === ns && r.kind === undefined), (r) => r.length === 2, 10_000, 'both Pods\' audit records');
      assert.deepEqual(records.map((r) => (r.images as Array<{ upstream?: unknown }>)[0]?.upstream), Array(2).fill({ digest: { digest: v1.index.digest, source: 'replicaset', pinned: true } }));
    });

    it('a template change makes a new ReplicaSet, pinned to the digest the tag has then; no ReplicaSet more', async () => {
      await updateDeployment(ns, 'web', (d) => {
        const c = d.spec?.template.spec?.containers[0];
        if (c) c.env = [{ name: 'CHANGED', value: '1' }];
      });
      const newer = await until(() => podsOf(ns, 'app=web'), (pods) => pods.some((p) => p.spec?.containers[0]?.env?.length === 1), 60_000, 'a Pod of the new ReplicaSet');
      assert.deepEqual(newer.filter((p) => p.spec?.containers[0]?.env?.length === 1).map((p) => p.spec?.containers[0]?.image), [pinned(v2)]);
      const generation = (await apps.readNamespacedDeployment({ namespace: ns, name: 'web' })).metadata?.generation;
      await until(() => apps.readNamespacedDeployment({ namespace: ns, name: 'web' }), (d) => d.status?.observedGeneration === generation, 30_000, 'the Deployment controller catching up');
      const sets = (await apps.listNamespacedReplicaSet({ namespace: ns })).items;
      assert.equal(sets.length, 2, sets.map((s) => s.metadata?.name).join(', '));
      const pins = sets.map((s) => JSON.parse(s.metadata?.annotations?.[PINNED_DIGESTS_ANNOTATION] ?? '{}') as Record<string, string>);
      assert.deepEqual(pins.map((p) => p[image]).sort(), [v1.index.digest, v2.index.digest].sort());
    });
  });

  describe('rewrite: private-only, on a registry behind a token server', () => {
    it('rewrites the repository that refuses anonymous pulls and leaves the public one, audited public-image', async () => {
      const ns = 'probing';
      await core.createNamespace({ body: { metadata: { name: ns } } });
      const privateImage = 'registry.corp.example:5000/team/probed:1';
      const publicImage = 'registry.corp.example:5000/public/app:1';
      const created = await core.createNamespacedPod({ namespace: ns, body: { metadata: { name: 'mixed' }, spec: { containers: [{ name: 'private', image: privateImage }, { name: 'public', image: publicImage }] } } });
      assert.deepEqual(created.spec?.containers.map((c) => c.image), [`${PROXY}/corp/team/probed:1`, publicImage]);
      const record = await until(async () => logs.records.find((r) => r.audit === 'admission' && r.namespace === ns && r.pod === 'mixed'), (r) => r !== undefined, 10_000, 'the audit record');
      const images = record?.images as Array<{ container: string; reason: string; upstream?: { probe?: unknown } }>;
      assert.deepEqual(images.map((i) => [i.container, i.reason, i.upstream?.probe]), [
        ['containers/private', 'rewritten', { outcome: 'private', status: 401 }],
        ['containers/public', 'public-image', { outcome: 'public', status: 200 }],
      ]);
      const metrics = await webhook.metrics.metrics();
      assert.match(metrics, /^pullbridge_upstream_decisions_total\{rule="corp",question="probe",outcome="public"\} 1$/m);
      assert.match(metrics, /^pullbridge_upstream_decisions_total\{rule="corp",question="probe",outcome="private"\} 1$/m);
      // The token server saw both anonymous probes (no user) and granted the public one.
      const anonymous = registry.issuer?.requests.filter((r) => r.user === null).map((r) => r.scope);
      assert.ok(anonymous?.includes('repository:team/probed:pull') && anonymous.includes('repository:public/app:pull'), JSON.stringify(anonymous));
    });
  });

  describe('verify (the signature check is a stub here; the cosign verifier is another module)', () => {
    it('refuses a Pod whose image is not verified, naming container, image and reason; pins a verified one', async () => {
      const ns = 'verifying';
      await core.createNamespace({ body: { metadata: { name: ns } } });
      const refused = await createPodRaw(ns, { apiVersion: 'v1', kind: 'Pod', metadata: { name: 'unsigned' }, spec: { containers: [{ name: 'app', image: 'signed.corp.example:5000/team/signed:2' }] } });
      assert.equal(refused.status, 403, refused.body);
      assert.match(refused.body, /pullbridge: containers\/app image signed\.corp\.example:5000\/team\/signed:2: signature not verified: no signature by a trusted key/);
      const admitted = await core.createNamespacedPod({ namespace: ns, body: { metadata: { name: 'signed' }, spec: { containers: [{ name: 'app', image: 'signed.corp.example:5000/team/signed:1' }] } } });
      assert.equal(admitted.spec?.containers[0]?.image, `${PROXY}/signed/team/signed:1@${signedImage.index.digest}`);
    });
  });

  describe('UPDATE, and the proxy\'s address spelled another way (security review)', () => {
    const ns = 'updating';
    const verifiedImage = `${PROXY}/signed/team/signed:1@${signedImage.index.digest}`;

    it('checks an image written on any loopback spelling of the proxy\'s address as the proxy\'s', async () => {
      await core.createNamespace({ body: { metadata: { name: ns } } });
      for (const host of ['localhost:30500', '[::1]:30500', '127.0.0.1:030500', '127.1:30500']) {
        const refused = await createPodRaw(ns, { apiVersion: 'v1', kind: 'Pod', metadata: { name: 'spelled' }, spec: { containers: [{ name: 'app', image: `${host}/signed/team/signed:2` }] } });
        assert.equal(refused.status, 403, `${host}: ${refused.body}`);
        assert.match(refused.body, /signature not verified: no signature by a trusted key/, host);
      }
      const admitted = await core.createNamespacedPod({ namespace: ns, body: { metadata: { name: 'spelled' }, spec: { containers: [{ name: 'app', image: '[::1]:30500/signed/team/signed:1' }] } } });
      assert.equal(admitted.spec?.containers[0]?.image, `[::1]:30500/signed/team/signed:1@${signedImage.index.digest}`);
    });

    it('a running Pod\'s image change is decided as on CREATE: refused unverified, pinned verified; other updates pass at once', async () => {
      const created = await core.createNamespacedPod({ namespace: ns, body: { metadata: { name: 'running' }, spec: { containers: [{ name: 'app', image: 'signed.corp.example:5000/team/signed:1' }, { name: 'side', image: 'plain.corp.example:5000/team/app:1' }] } } });
      assert.deepEqual(created.spec?.containers.map((c) => c.image), [verifiedImage, `${PROXY}/plain/team/app:1`]);
      // kubectl set image pod/running app=<the proxy's reference of an unsigned image>
      const refused = await patchPodRaw(ns, 'running', { spec: { containers: [{ name: 'app', image: `${PROXY}/signed/team/signed:2` }] } });
      assert.equal(refused.status, 403, refused.body);
      assert.match(refused.body, /pullbridge: containers\/app image 127\.0\.0\.1:30500\/signed\/team\/signed:2: signature not verified: no signature by a trusted key/);
      assert.equal((await core.readNamespacedPod({ namespace: ns, name: 'running' })).spec?.containers[0]?.image, verifiedImage);
      const changed = await patchPodRaw(ns, 'running', { spec: { containers: [{ name: 'side', image: 'plain.corp.example:5000/team/app:2' }] } });
      assert.equal(changed.status, 200, changed.body);
      const stored = await core.readNamespacedPod({ namespace: ns, name: 'running' });
      assert.deepEqual(stored.spec?.containers.map((c) => c.image), [verifiedImage, `${PROXY}/plain/team/app:2`]);
      const labelled = await patchPodRaw(ns, 'running', { metadata: { labels: { tier: 'web' } } });
      assert.equal(labelled.status, 200, labelled.body);
      // The apiserver may call the webhook more than once for one PATCH (it retries on a stale read,
      // and reinvokes): the records are compared as a set.
      const records = await until(async () => logs.records.filter((r) => r.audit === 'admission' && r.namespace === ns && r.pod === 'running' && r.operation === 'UPDATE'), (r) => r.some((x) => x.skipReason === 'no-image-changed'), 10_000, 'the UPDATE audit records');
      assert.deepEqual([...new Set(records.map((r) => `${String(r.result)} ${String(r.skipReason ?? '')}`.trim()))], ['denied', 'mutated', 'skipped no-image-changed']);
      const mutated = records.find((r) => r.result === 'mutated');
      assert.deepEqual((mutated?.images as Array<{ container: string; reason: string }>).map((i) => [i.container, i.reason]), [['containers/app', 'image-unchanged'], ['containers/side', 'rewritten']]);
    });

    it('a ReplicaSet\'s pins annotation changed by an UPDATE is restored to what the webhook wrote', async () => {
      const image = 'pins.corp.example:5000/team/app:1';
      const labels = { app: 'pinned' };
      await apps.createNamespacedReplicaSet({ namespace: ns, body: { metadata: { name: 'pinned' }, spec: { replicas: 0, selector: { matchLabels: labels }, template: { metadata: { labels }, spec: { containers: [{ name: 'app', image }] } } } } });
      const genuine = (await apps.readNamespacedReplicaSet({ namespace: ns, name: 'pinned' })).metadata?.annotations?.[PINNED_DIGESTS_ANNOTATION];
      assert.ok(genuine?.includes('sha256:'), String(genuine));
      const forged = JSON.stringify({ [image]: unsignedImage.index.digest });
      await apps.patchNamespacedReplicaSet({ namespace: ns, name: 'pinned', body: [{ op: 'add', path: `/metadata/annotations/${PINNED_DIGESTS_ANNOTATION.replace('/', '~1')}`, value: forged }] });
      assert.equal((await apps.readNamespacedReplicaSet({ namespace: ns, name: 'pinned' })).metadata?.annotations?.[PINNED_DIGESTS_ANNOTATION], genuine);
    });
  });

  describe('the webhook\'s ReplicaSet pins reader, against the apiserver', () => {
    // In the webhook's own namespace, which it is never asked about: the annotations stay as written.
    const ns = 'pullbridge';
    const createRs = async (name: string, pins: string) => {
      const labels = { app: name };
      const rs = await apps.createNamespacedReplicaSet({ namespace: ns, body: { metadata: { name, annotations: { [PINNED_DIGESTS_ANNOTATION]: pins } }, spec: { replicas: 0, selector: { matchLabels: labels }, template: { metadata: { labels }, spec: { containers: [{ name: 'app', image: 'pins.corp.example:5000/team/app:1' }] } } } } });
      return rs.metadata?.uid ?? '';
    };

    it('ignores an annotation over 16 KiB, saying so, and bounds its cache by bytes', async () => {
      const large = JSON.stringify(Object.fromEntries(Array.from({ length: 200 }, (_, i) => [`pins.corp.example:5000/team/app-${i}:1`, v1.index.digest])));
      assert.ok(Buffer.byteLength(large) > MAX_PINS_ANNOTATION_BYTES);
      const uid = await createRs('large', large);
      const reader = new ReplicaSetPins(apps, 60_000, 4096, Date.now, 2_000);
      await assert.rejects(reader.get(ns, 'large', uid), new RegExp(`annotation is ${Buffer.byteLength(large)} bytes, more than the ${MAX_PINS_ANNOTATION_BYTES} pullbridge writes: ignored`));
      assert.deepEqual(reader.size(), { entries: 0, bytes: 0 });
      const small = JSON.stringify({ 'pins.corp.example:5000/team/app:1': v1.index.digest });
      const uids = await Promise.all(['s1', 's2', 's3', 's4', 's5'].map((name) => createRs(name, small)));
      for (const [i, name] of ['s1', 's2', 's3', 's4', 's5'].entries()) assert.deepEqual(await reader.get(ns, name, uids[i] ?? ''), JSON.parse(small));
      const { entries, bytes } = reader.size();
      assert.ok(bytes <= 2_000 && entries < 5, `${entries} entries, ${bytes} bytes`);
    });
  });

  /** A strategic-merge patch of a Pod as kubectl sends it, returning the status and body. */
  function patchPodRaw(namespace: string, name: string, patch: unknown): Promise<{ status: number; body: string }> {
    return sendRaw('PATCH', `/api/v1/namespaces/${namespace}/pods/${name}`, 'application/strategic-merge-patch+json', patch);
  }

  function sendRaw(method: string, path: string, contentType: string, body: unknown): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const req = https.request(`${cp.url}${path}`, { method, ca: cp.caCert, headers: { authorization: `Bearer ${cp.token}`, 'content-type': contentType } }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      });
      req.on('error', reject);
      req.end(JSON.stringify(body));
    });
  }

  describe('verify on a ReplicaSet (trial 22)', () => {
    it('admits a ReplicaSet whose image fails verify with a warning to its creator, records no pin, and audits signature-unverified', async () => {
      const ns = 'verifying-rs';
      await core.createNamespace({ body: { metadata: { name: ns } } });
      const image = 'signed.corp.example:5000/team/signed:2';
      // replicas: 0, so that the controller makes no Pods: this is about the ReplicaSet's own admission.
      const rs = { apiVersion: 'apps/v1', kind: 'ReplicaSet', metadata: { name: 'unsigned' }, spec: { replicas: 0, selector: { matchLabels: { app: 'unsigned' } }, template: { metadata: { labels: { app: 'unsigned' } }, spec: { containers: [{ name: 'app', image }] } } } };
      const created = await postRaw(`/apis/apps/v1/namespaces/${ns}/replicasets`, rs);
      assert.equal(created.status, 201, created.body);
      assert.match(created.warning, /pullbridge: containers\/app image signed\.corp\.example:5000\/team\/signed:2: signature not verified \(no signature by a trusted key\); no digest recorded, and its Pods will be refused/);
      const stored = await apps.readNamespacedReplicaSet({ namespace: ns, name: 'unsigned' });
      assert.equal(stored.metadata?.annotations?.[PINNED_DIGESTS_ANNOTATION], undefined);
      const record = await until(async () => logs.records.find((r) => r.audit === 'admission' && r.namespace === ns), (r) => r !== undefined, 10_000, 'the audit record');
      const images = record?.images as Array<{ container: string; reason: string }>;
      assert.deepEqual(images.map((i) => [i.container, i.reason]), [['containers/app', 'signature-unverified']]);
    });
  });

  /** POSTs an object as kubectl would: the status, body and admission warnings (a refusal is not thrown). */
  function postRaw(path: string, object: unknown): Promise<{ status: number; body: string; warning: string }> {
    return new Promise((resolve, reject) => {
      const req = https.request(`${cp.url}${path}`, { method: 'POST', ca: cp.caCert, headers: { authorization: `Bearer ${cp.token}`, 'content-type': 'application/json' } }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        const warning = res.headers.warning;
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text, warning: Array.isArray(warning) ? warning.join('\n') : (warning ?? '') }));
      });
      req.on('error', reject);
      req.end(JSON.stringify(object));
    });
  }

  /** Creates a Pod as kubectl would, returning the status and body (a refusal is not thrown). */
  function createPodRaw(namespace: string, pod: V1Pod): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const req = https.request(`${cp.url}/api/v1/namespaces/${namespace}/pods`, { method: 'POST', ca: cp.caCert, headers: { authorization: `Bearer ${cp.token}`, 'content-type': 'application/json' } }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      });
      req.on('error', reject);
      req.end(JSON.stringify(pod));
    });
  }
});
