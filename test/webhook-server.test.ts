import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, type PeerCertificate } from 'node:tls';
import request from 'supertest';
import { generateCertificates, generateClientCertificate, type CertificateBundle } from '../src/certs/certs.js';
import { createMetricsRegistry } from '../src/metrics.js';
import { listen, type RunningServer } from '../src/shell/serve.js';
import { ORIGINAL_IMAGES_ANNOTATION } from '../src/rules/marks.js';
import { decideCaller, dnsNamesOf } from '../src/webhook/clientauth.js';
import { runWebhook } from '../src/webhook/run.js';
import { createWebhookApp, type WebhookAppOptions } from '../src/webhook/server.js';
import { SHA, testConfig } from './support/config.js';
import { memoryLogger } from './support/logs.js';
import { applyPatch, decodePatch, podWith, reviewFor, type PodShape } from './support/review.js';

describe('webhook server over HTTPS', () => {
  let certs: CertificateBundle;
  before(() => {
    certs = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1'] });
  });

  async function start(overrides: Partial<WebhookAppOptions> = {}, clientCa?: string) {
    const logs = memoryLogger();
    const audit = memoryLogger();
    const metrics = createMetricsRegistry(false);
    const config = testConfig();
    const app = createWebhookApp({ config: () => config, logger: logs.logger, audit: audit.logger, metrics, ...overrides });
    const server: RunningServer = await listen(app, { host: '127.0.0.1', port: 0, tls: { cert: certs.cert, key: certs.key, ...(clientCa ? { clientCa } : {}) } });
    const client = () => request(server.url);
    return { server, client, logs, audit, metrics };
  }

  let running: Array<RunningServer> = [];
  afterEach(async () => {
    await Promise.all(running.map((s) => s.close(100)));
    running = [];
  });
  async function started(overrides: Partial<WebhookAppOptions> = {}, clientCa?: string) {
    const s = await start(overrides, clientCa);
    running.push(s.server);
    return s;
  }

  const pod = () =>
    podWith(
      {
        initContainers: [{ name: 'init', image: 'registry.corp.example:5000/team/init:1' }],
        containers: [
          { name: 'app', image: `registry.corp.example:5000/team/app:1.2@${SHA}` },
          { name: 'side', image: 'quay.io/x/y:1' },
        ],
      },
      { generateName: 'web-', namespace: 'shop', labels: { app: 'web' } },
    );

  it('serves only HTTPS with the generated certificate, and health endpoints', async () => {
    const { client } = await started();
    await client().get('/healthz').ca(certs.caCert).expect(200, 'ok');
    await client().get('/readyz').ca(certs.caCert).expect(200, 'ready');
    await assert.rejects(client().get('/healthz'), /self-signed|unable to verify|certificate/i);
  });

  it('answers an AdmissionReview with a patch that produces the rewritten Pod, and audits it', async () => {
    const { client, audit, metrics } = await started();
    const review = reviewFor(pod(), { namespace: 'shop', uid: 'uid-123' });
    const res = await client().post('/mutate').ca(certs.caCert).set('Authorization', 'Bearer apiserver-secret-token').send(review).expect(200).expect('content-type', /json/);
    assert.equal(res.body.apiVersion, 'admission.k8s.io/v1');
    assert.equal(res.body.kind, 'AdmissionReview');
    assert.equal(res.body.response.uid, 'uid-123');
    assert.equal(res.body.response.allowed, true);
    assert.equal(res.body.response.patchType, 'JSONPatch');
    const patched = applyPatch(pod(), decodePatch(res.body.response.patch)) as unknown as PodShape;
    assert.equal(patched.spec.initContainers?.[0]?.image, 'localhost:30500/corp/team/init:1');
    assert.equal(patched.spec.containers[0]?.image, `localhost:30500/corp/team/app:1.2@${SHA}`);
    assert.equal(patched.spec.containers[1]?.image, 'quay.io/x/y:1');
    assert.deepEqual(patched.spec.imagePullSecrets, [{ name: 'pullbridge-pull' }]);
    assert.ok(patched.metadata.annotations?.[ORIGINAL_IMAGES_ANNOTATION]);

    assert.equal(audit.records.length, 1);
    const record = audit.records[0] ?? {};
    assert.equal(record.audit, 'admission');
    assert.equal(record.uid, 'uid-123');
    assert.equal(record.namespace, 'shop');
    assert.equal(record.pod, 'web-');
    assert.equal(record.user, 'jane@example.com');
    assert.equal(record.operation, 'CREATE');
    assert.equal(record.dryRun, false);
    assert.equal(record.result, 'mutated');
    assert.equal(record.pullSecret, 'pullbridge-pull');
    assert.deepEqual(record.images, [
      { container: 'initContainers/init', image: 'registry.corp.example:5000/team/init:1', rewritten: 'localhost:30500/corp/team/init:1', rule: 'corp', reason: 'rewritten' },
      { container: 'containers/app', image: `registry.corp.example:5000/team/app:1.2@${SHA}`, rewritten: `localhost:30500/corp/team/app:1.2@${SHA}`, rule: 'corp', reason: 'rewritten' },
      { container: 'containers/side', image: 'quay.io/x/y:1', rewritten: null, rule: null, reason: 'no-matching-rule' },
    ]);
    assert.equal(typeof record.durationMs, 'number');
    assert.ok(!audit.raw.join('').includes('apiserver-secret-token'));

    const text = await metrics.metrics();
    assert.match(text, /pullbridge_admissions_total\{result="mutated"\} 1/);
    assert.match(text, /pullbridge_image_rewrites_total\{rule="corp"\} 2/);
    assert.match(text, /pullbridge_admission_duration_seconds_count\{result="mutated"\} 1/);
  });

  it('serves the metrics over HTTP', async () => {
    const { client } = await started();
    await client().post('/mutate').ca(certs.caCert).send(reviewFor(pod())).expect(200);
    const res = await client().get('/metrics').ca(certs.caCert).expect(200);
    assert.match(res.text, /pullbridge_admissions_total\{result="mutated"\} 1/);
  });

  it('answers without a patch when nothing changes', async () => {
    const { client, audit } = await started();
    const review = reviewFor(podWith({ containers: [{ name: 'a', image: 'quay.io/x/y:1' }] }));
    const res = await client().post('/mutate').ca(certs.caCert).send(review).expect(200);
    assert.deepEqual(res.body.response, { uid: 'f0b5c1a2-1111-4222-8333-444455556666', allowed: true });
    assert.equal(audit.records[0]?.result, 'unchanged');
  });

  it('provisions the pull secret on a real admission, not on dryRun', async () => {
    const ensured: string[] = [];
    const { client, audit } = await started({ sideEffects: { ensurePullSecret: async (ns, name) => void ensured.push(`${ns}/${name}`) } });
    const dry = await client().post('/mutate').ca(certs.caCert).send(reviewFor(pod(), { namespace: 'shop', dryRun: true })).expect(200);
    assert.ok(dry.body.response.patch, 'dry run still shows the mutation');
    assert.deepEqual(ensured, []);
    assert.equal(audit.records[0]?.dryRun, true);
    await client().post('/mutate').ca(certs.caCert).send(reviewFor(pod(), { namespace: 'shop' })).expect(200);
    assert.deepEqual(ensured, ['shop/pullbridge-pull']);
  });

  it('honours a namespace opt-out label it looks up', async () => {
    const { client, audit } = await started({ sideEffects: { namespaceLabels: async (ns): Promise<Record<string, string>> => (ns === 'quiet' ? { 'pullbridge.io/ignore': 'true' } : {}) } });
    const res = await client().post('/mutate').ca(certs.caCert).send(reviewFor(pod(), { namespace: 'quiet' })).expect(200);
    assert.equal(res.body.response.patch, undefined);
    assert.equal(audit.records[0]?.skipReason, 'namespace-opted-out');
  });

  it('admits unchanged, and logs, when the decision itself throws', async () => {
    const { client, audit, logs } = await started({
      config: () => {
        throw new Error('boom');
      },
    });
    const res = await client().post('/mutate').ca(certs.caCert).send(reviewFor(pod())).expect(200);
    assert.deepEqual(res.body.response, { uid: 'f0b5c1a2-1111-4222-8333-444455556666', allowed: true });
    assert.equal(audit.records[0]?.result, 'error');
    assert.ok(logs.records.some((r) => r.msg === 'admission decision failed; admitting unchanged'));
  });

  describe('bad input', () => {
    const cases: Array<[string, (c: () => request.Agent) => request.Test, number, RegExp]> = [
      ['malformed JSON', (c) => c().post('/mutate').ca(certs.caCert).set('Content-Type', 'application/json').send('{"apiVersion":'), 400, /body is not valid JSON/],
      ['a JSON array', (c) => c().post('/mutate').ca(certs.caCert).send([1]), 400, /must be a JSON AdmissionReview object/],
      ['a JSON string', (c) => c().post('/mutate').ca(certs.caCert).set('Content-Type', 'application/json').send('"x"'), 400, /not valid JSON|must be a JSON AdmissionReview/],
      ['a non-JSON content type', (c) => c().post('/mutate').ca(certs.caCert).set('Content-Type', 'text/plain').send('hello'), 415, /application\/json/],
      ['no body', (c) => c().post('/mutate').ca(certs.caCert), 415, /application\/json/],
      ['a missing request', (c) => c().post('/mutate').ca(certs.caCert).send({ apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview' }), 400, /request/],
      ['the v1beta1 API', (c) => c().post('/mutate').ca(certs.caCert).send({ ...reviewFor({}), apiVersion: 'admission.k8s.io/v1beta1' }), 400, /apiVersion/],
      ['a huge body', (c) => c().post('/mutate').ca(certs.caCert).set('Content-Type', 'application/json').send(JSON.stringify({ pad: 'x'.repeat(8 * 1024 * 1024) })), 413, /larger than the limit/],
      ['an unknown path', (c) => c().get('/mutate').ca(certs.caCert), 404, /not found/],
    ];
    for (const [name, send, status, pattern] of cases) {
      it(`answers ${name} with ${status} and a clear message, and stays up`, async () => {
        const { client, metrics } = await started();
        const res = await send(client as unknown as () => request.Agent).expect(status);
        assert.match(res.body.error, pattern);
        await client().get('/healthz').ca(certs.caCert).expect(200);
        if (status === 400 || status === 413) assert.match(await metrics.metrics(), /pullbridge_admissions_total\{result="invalid"\} 1/);
      });
    }

    it('admits a non-Pod object unchanged and audits why', async () => {
      const { client, audit } = await started();
      const res = await client().post('/mutate').ca(certs.caCert).send(reviewFor({ kind: 'ConfigMap' }, { kind: 'ConfigMap', resource: 'configmaps' })).expect(200);
      assert.equal(res.body.response.allowed, true);
      assert.equal(res.body.response.patch, undefined);
      assert.equal(audit.records[0]?.skipReason, 'not-a-pod');
    });

    it('admits a Pod with invalid image references unchanged, with a warning and an audit record', async () => {
      const { client, audit } = await started();
      const review = reviewFor(podWith({ containers: [{ name: 'a', image: 'registry.corp.example:5000/UPPER/case' }, { name: 'b', image: '' }] }));
      const res = await client().post('/mutate').ca(certs.caCert).send(review).expect(200);
      assert.equal(res.body.response.patch, undefined);
      assert.equal(res.body.response.warnings.length, 2);
      const images = audit.records[0]?.images as Array<{ reason: string }>;
      assert.deepEqual(images.map((i) => i.reason), ['invalid-reference', 'invalid-reference']);
    });
  });

  it('reports not ready while draining', async () => {
    let draining = false;
    const { client } = await started({ ready: () => !draining });
    await client().get('/readyz').ca(certs.caCert).expect(200);
    draining = true;
    await client().get('/readyz').ca(certs.caCert).expect(503);
  });

  describe('client certificates (--client-ca)', () => {
    let apiserver: CertificateBundle;
    let otherCa: CertificateBundle;
    before(() => {
      apiserver = generateClientCertificate({ commonName: 'kube-apiserver-admission' });
      otherCa = generateClientCertificate({ commonName: 'kube-apiserver-admission' });
    });
    const signedBy = (ca: CertificateBundle, commonName: string, dnsNames: string[] = []) => generateClientCertificate({ commonName, dnsNames, ca: { cert: ca.caCert, key: ca.caKey } });

    it('refuses /mutate without a certificate with 401 before reading the body, audits and counts it', async () => {
      const ensured: string[] = [];
      const { client, audit, metrics } = await started({ clientAuth: {}, sideEffects: { ensurePullSecret: async (ns) => void ensured.push(ns) } }, apiserver.caCert);
      const res = await client().post('/mutate').ca(certs.caCert).send(reviewFor(pod(), { namespace: 'shop' })).expect(401);
      assert.match(res.body.error, /client certificate signed by the webhook's client CA is required \(no client certificate\)/);
      assert.deepEqual(ensured, []);
      assert.equal(audit.records.length, 1);
      assert.deepEqual({ ...audit.records[0], time: undefined, level: undefined }, { time: undefined, level: undefined, audit: 'refused', method: 'POST', path: '/mutate', status: 401, reason: 'no client certificate', remoteAddress: '127.0.0.1', certificate: null, msg: 'request refused' });
      assert.match(await metrics.metrics(), /pullbridge_admissions_total\{result="refused"\} 1/);
      // Malformed input is refused the same way: nothing is parsed for an unauthenticated caller.
      await client().post('/mutate').ca(certs.caCert).set('Content-Type', 'application/json').send('{"apiVersion":').expect(401);
    });

    it('refuses a certificate from another CA with 401, saying why', async () => {
      const { client, audit } = await started({ clientAuth: {} }, apiserver.caCert);
      await client().post('/mutate').ca(certs.caCert).cert(otherCa.cert).key(otherCa.key).send(reviewFor(pod())).expect(401);
      assert.match(String(audit.records[0]?.reason), /not verified against the client CA: UNABLE_TO_VERIFY_LEAF_SIGNATURE/);
      assert.deepEqual(audit.records[0]?.certificate, { commonName: 'kube-apiserver-admission', dnsNames: [] });
    });

    it('admits any certificate of the CA without allowed names, and only allowed CNs or DNS SANs with them (403 otherwise)', async () => {
      const any = await started({ clientAuth: {} }, apiserver.caCert);
      const res = await any.client().post('/mutate').ca(certs.caCert).cert(apiserver.cert).key(apiserver.key).send(reviewFor(pod(), { uid: 'u-1' })).expect(200);
      assert.equal(res.body.response.uid, 'u-1');
      assert.equal(any.audit.records[0]?.result, 'mutated');

      const named = await started({ clientAuth: { allowedNames: ['kube-apiserver-admission', 'apiserver.example'] } }, apiserver.caCert);
      await named.client().post('/mutate').ca(certs.caCert).cert(apiserver.cert).key(apiserver.key).send(reviewFor(pod())).expect(200);
      const bySan = signedBy(apiserver, 'something-else', ['apiserver.example']);
      await named.client().post('/mutate').ca(certs.caCert).cert(bySan.cert).key(bySan.key).send(reviewFor(pod())).expect(200);
      const stranger = signedBy(apiserver, 'some-pod');
      const refused = await named.client().post('/mutate').ca(certs.caCert).cert(stranger.cert).key(stranger.key).send(reviewFor(pod())).expect(403);
      assert.match(refused.body.error, /client certificate names \[some-pod\] are not among the allowed names/);
      assert.equal(named.audit.records.at(-1)?.status, 403);
    });

    it('keeps health and metrics reachable without a certificate (kubelet probes, Prometheus)', async () => {
      const { client } = await started({ clientAuth: {} }, apiserver.caCert);
      await client().get('/healthz').ca(certs.caCert).expect(200, 'ok');
      await client().get('/readyz').ca(certs.caCert).expect(200);
      await client().get('/metrics').ca(certs.caCert).expect(200);
    });

    it('refuses everything over plain HTTP when client certificates are required', async () => {
      const config = testConfig();
      const app = createWebhookApp({ config: () => config, logger: memoryLogger().logger, audit: memoryLogger().logger, metrics: createMetricsRegistry(false), clientAuth: {} });
      const server = await listen(app, { host: '127.0.0.1', port: 0 });
      running.push(server);
      await request(server.url).post('/mutate').send(reviewFor(pod())).expect(401);
    });

    it('keeps verifying client certificates after the serving certificate and the client CA are rotated', async () => {
      const dir = mkdtempSync(join(tmpdir(), 'pullbridge-clientca-'));
      const files = { cert: join(dir, 'tls.crt'), key: join(dir, 'tls.key'), clientCa: join(dir, 'client-ca.crt') };
      writeFileSync(files.cert, certs.cert);
      writeFileSync(files.key, certs.key);
      writeFileSync(files.clientCa, apiserver.caCert);
      const webhook = await runWebhook({ config: testConfig(), host: '127.0.0.1', port: 0, tlsFiles: { cert: files.cert, key: files.key }, clientAuth: { caFile: files.clientCa }, tlsRefreshMs: 20, logger: memoryLogger().logger });
      try {
        const url = webhook.running.url;
        await request(url).post('/mutate').ca(certs.caCert).cert(apiserver.cert).key(apiserver.key).send(reviewFor(pod())).expect(200);
        const rotated = generateCertificates({ service: 'pullbridge-webhook', namespace: 'pullbridge', extraNames: ['127.0.0.1'] });
        // The CA first: a refresh that sees the new serving certificate then reads the new CA too.
        writeFileSync(files.clientCa, otherCa.caCert);
        writeFileSync(files.key, rotated.key);
        writeFileSync(files.cert, rotated.cert);
        const servedCert = () =>
          new Promise<PeerCertificate>((resolve, reject) => {
            const socket = connect({ host: '127.0.0.1', port: webhook.running.port, rejectUnauthorized: false }, () => {
              resolve(socket.getPeerCertificate());
              socket.end();
            });
            socket.on('error', reject);
          });
        const rotatedSerial = new X509Certificate(rotated.cert).serialNumber;
        while ((await servedCert()).serialNumber !== rotatedSerial) await new Promise((r) => setTimeout(r, 20));
        await request(url).post('/mutate').ca(rotated.caCert).cert(otherCa.cert).key(otherCa.key).send(reviewFor(pod())).expect(200);
        await request(url).post('/mutate').ca(rotated.caCert).cert(apiserver.cert).key(apiserver.key).send(reviewFor(pod())).expect(401);
      } finally {
        await webhook.shutdown();
      }
    });

    it('decides from the certificate alone, and reads DNS SANs as Node reports them', () => {
      assert.deepEqual(decideCaller({ presented: false, verified: false, dnsNames: [] }, undefined), { allowed: false, status: 401, reason: 'no client certificate' });
      assert.deepEqual(decideCaller({ presented: true, verified: true, commonName: 'a', dnsNames: [] }, []), { allowed: true });
      assert.equal(decideCaller({ presented: true, verified: false, verifyError: 'CERT_HAS_EXPIRED', commonName: 'a', dnsNames: [] }, ['a']).allowed, false);
      assert.deepEqual(dnsNamesOf('DNS:a.example, IP Address:10.0.0.1, DNS:"b,c", URI:spiffe://x'), ['a.example', 'b,c']);
      assert.deepEqual(dnsNamesOf(undefined), []);
    });
  });
});
