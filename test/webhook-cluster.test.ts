// The webhook against a real kube-apiserver where the apiserver's own limits and the pull secret's
// life cycle matter: Pods near the annotation size limit, and pull secrets deleted while webhook
// replicas keep admitting Pods.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import https from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoreV1Api, KubeConfig, type V1Pod } from '@kubernetes/client-node';
import { generateCertificates } from '../src/certs/certs.js';
import { runWebhook, type WebhookProcess } from '../src/webhook/run.js';
import { registerWebhook } from './support/cluster.js';
import { configFrom } from './support/config.js';
import { startControlPlane, type ControlPlane } from './support/controlplane.js';
import { memoryLogger } from './support/logs.js';

const CORP = 'registry.corp.example:5000';
const ANNOTATION_LIMIT = 256 * 1024;

describe('the webhook against a real kube-apiserver: limits and pull secret upkeep', function () {
  this.timeout(180_000);
  let cp: ControlPlane;
  let core: CoreV1Api;
  let webhook: WebhookProcess;
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
    const certs = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1'] });
    webhook = await runWebhook({ config: configFrom(configYaml()), host: '127.0.0.1', port: 0, tls: { cert: certs.cert, key: certs.key }, kubeconfig: cp.kubeconfig, reconcileIntervalMs: 3_600_000, logger: logs.logger });
    await registerWebhook(kc, `${webhook.running.url}/mutate`, certs.caCert, `${CORP}/team/app:1`);
  });

  after(async () => {
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
});
