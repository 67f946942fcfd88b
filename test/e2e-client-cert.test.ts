// The webhook behind client certificates, against a real kube-apiserver configured as a cluster
// operator would (an AdmissionConfiguration whose kubeconfig gives the apiserver a client
// certificate for the webhook's host): Pods created through the apiserver are still rewritten,
// while an AdmissionReview forged by anyone else — as a Pod that reaches the webhook would send
// it — is refused, audited, and provisions no Secret.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoreV1Api, KubeConfig, type V1Pod } from '@kubernetes/client-node';
import request from 'supertest';
import { generateCertificates, generateClientCertificate } from '../src/certs/certs.js';
import { parseConfig } from '../src/rules/config.js';
import { runWebhook, type WebhookProcess } from '../src/webhook/run.js';
import { readSecretOrNull, registerWebhook } from './support/cluster.js';
import { startControlPlane, type ControlPlane } from './support/controlplane.js';
import { memoryLogger } from './support/logs.js';
import { freePort } from './support/procs.js';
import { podWith, reviewFor } from './support/review.js';

const CORP_IMAGE = 'registry.corp.example:5000/team/app:1.0';
const APISERVER_NAME = 'kube-apiserver-admission';

describe('webhook client certificates against a real kube-apiserver', function () {
  this.timeout(180_000);
  let cp: ControlPlane;
  let core: CoreV1Api;
  let webhook: WebhookProcess;
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-clientcert-'));
  const logs = memoryLogger();
  const serving = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1'] });
  const apiserverClient = generateClientCertificate({ commonName: APISERVER_NAME });

  const pod = (name: string): V1Pod => ({ apiVersion: 'v1', kind: 'Pod', metadata: { name }, spec: { containers: [{ name: 'c0', image: CORP_IMAGE }] } });

  const secretOrNull = (namespace: string) => readSecretOrNull(core, namespace);

  before(async () => {
    const keyFile = join(dir, 'broker.key');
    writeFileSync(keyFile, randomBytes(32).toString('hex'));
    const caFile = join(dir, 'client-ca.crt');
    writeFileSync(caFile, apiserverClient.caCert);
    const parsed = parseConfig(`proxy: {host: 127.0.0.1, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [${keyFile}]}
registries:
  - name: corp
    match: [registry.corp.example:5000]
    upstream: https://registry.corp.example:5000
`);
    assert.ok(parsed.ok);

    // The apiserver names a URL webhook by its host:port, so the port is chosen first.
    const port = await freePort();
    cp = await startControlPlane({ webhookClientCertificates: [{ host: `127.0.0.1:${port}`, cert: apiserverClient.cert, key: apiserverClient.key }] });
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);
    await core.createNamespace({ body: { metadata: { name: 'pullbridge' } } });
    webhook = await runWebhook({
      config: parsed.config,
      host: '127.0.0.1',
      port,
      tls: { cert: serving.cert, key: serving.key },
      clientAuth: { caFile, allowedNames: [APISERVER_NAME] },
      kubeconfig: cp.kubeconfig,
      reconcileIntervalMs: 3_600_000,
      logger: logs.logger,
    });
    // Returns once a dry-run Pod comes back rewritten: the apiserver got through with its certificate.
    await registerWebhook(kc, `${webhook.running.url}/mutate`, serving.caCert, CORP_IMAGE);
  });

  after(async () => {
    await webhook?.shutdown();
    await cp?.stop();
  });

  it('rewrites a Pod created through the apiserver, which presents its client certificate, and provisions the pull secret', async () => {
    await core.createNamespace({ body: { metadata: { name: 'shop' } } });
    await core.createNamespacedPod({ namespace: 'shop', body: pod('web') });
    const stored = await core.readNamespacedPod({ namespace: 'shop', name: 'web' });
    assert.equal(stored.spec?.containers[0]?.image, '127.0.0.1:30500/corp/team/app:1.0');
    assert.ok(await secretOrNull('shop'), 'the pull secret exists');
    assert.ok(logs.records.some((r) => r.audit === 'admission' && r.namespace === 'shop' && r.result === 'mutated' && r.user === 'admin'));
  });

  it('refuses a forged AdmissionReview without the certificate (401), audits it, and creates no Secret', async () => {
    await core.createNamespace({ body: { metadata: { name: 'victim' } } });
    const forged = reviewFor(podWith({ containers: [{ name: 'c0', image: CORP_IMAGE }] }, { name: 'x', namespace: 'victim' }), { namespace: 'victim', uid: 'forged-1' });
    const res = await request(webhook.running.url).post('/mutate').ca(serving.caCert).send(forged).expect(401);
    assert.match(String(res.body.error), /client certificate/);
    assert.equal(res.body.response, undefined, 'no admission answer');
    assert.equal(await secretOrNull('victim'), null, 'no Secret provisioned');
    const refusal = logs.records.find((r) => r.audit === 'refused');
    assert.ok(refusal, 'the refusal is audited');
    assert.equal(refusal.status, 401);
    assert.equal(refusal.remoteAddress, '127.0.0.1');
    assert.ok(!logs.records.some((r) => r.audit === 'admission' && r.uid === 'forged-1'), 'no admission decision was made');
  });

  it('refuses a certificate from another CA (401) and creates no Secret', async () => {
    const other = generateClientCertificate({ commonName: APISERVER_NAME });
    const forged = reviewFor(podWith({ containers: [{ name: 'c0', image: CORP_IMAGE }] }, { name: 'x', namespace: 'victim' }), { namespace: 'victim', uid: 'forged-2' });
    await request(webhook.running.url).post('/mutate').ca(serving.caCert).cert(other.cert).key(other.key).send(forged).expect(401);
    assert.equal(await secretOrNull('victim'), null);
  });

  it('still answers kubelet-style health probes without a certificate', async () => {
    await request(webhook.running.url).get('/healthz').ca(serving.caCert).expect(200, 'ok');
    await request(webhook.running.url).get('/readyz').ca(serving.caCert).expect(200);
  });
});
