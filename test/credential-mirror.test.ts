// Rules whose upstream credentials come from a Secret the user manages (credentialsSecret): the
// webhook, with the chart's RBAC alone, copies them into the one Secret the proxies mount, follows
// changes of the source, and drops the keys of rules that are gone. Real apiserver.

import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CoreV1Api, KubeConfig, KubernetesObjectApi, type KubernetesObject } from '@kubernetes/client-node';
import { parseAllDocuments, stringify as stringifyYaml } from 'yaml';
import { parseConfig } from '../src/rules/config.js';
import { planMirror, type SourceData } from '../src/rules/credentialmirror.js';
import { runWebhook, type WebhookProcess } from '../src/webhook/run.js';
import { cachedBinary, KUBE_VERSION, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { memoryLogger } from './support/logs.js';
import { runAsync } from './support/procs.js';

const CHART = fileURLToPath(new URL('../../charts/pullbridge', import.meta.url));
const NAMESPACE = 'pullbridge';
const b64 = (s: string) => Buffer.from(s).toString('base64');

describe('upstream credentials mirror (pure plan)', () => {
  it('copies complete sources, leaves out missing or incomplete ones, keeps an unreadable one as it was', () => {
    const sources = new Map([
      ['corp', 'corp-robot'],
      ['gone', 'no-such-secret'],
      ['half', 'half-robot'],
      ['flaky', 'flaky-robot'],
    ]);
    const plan = planMirror(
      sources,
      new Map<string, SourceData>([
        ['corp-robot', { username: b64('robot'), password: b64('s3cret'), extra: b64('x') }],
        ['no-such-secret', 'missing'],
        ['half-robot', { username: b64('robot') }],
        ['flaky-robot', 'unreadable'],
      ]),
      { 'flaky.username': b64('old'), 'flaky.password': b64('old-pw'), 'removed.username': b64('x'), 'removed.password': b64('y') },
    );
    assert.deepEqual(plan.data, { 'corp.username': b64('robot'), 'corp.password': b64('s3cret'), 'flaky.username': b64('old'), 'flaky.password': b64('old-pw') });
    assert.deepEqual(
      plan.problems.map((p) => [p.rule, p.message]),
      [
        ['flaky', 'Secret flaky-robot could not be read; the mirror keeps what it had'],
        ['gone', 'Secret no-such-secret does not exist'],
        ['half', 'Secret half-robot has no password key'],
      ],
    );
  });
});

describe('upstream credentials mirror (webhook, real apiserver, the chart\'s RBAC)', function () {
  this.timeout(120_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-mirror-'));
  let cp: ControlPlane;
  let core: CoreV1Api;
  let webhook: WebhookProcess | undefined;
  const logs = memoryLogger();

  before(async () => {
    cp = await startControlPlane();
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);
    await core.createNamespace({ body: { metadata: { name: NAMESPACE } } });
  });
  after(async () => {
    await webhook?.shutdown();
    await cp?.stop();
  });

  const mirrorData = async () => (await core.readNamespacedSecret({ namespace: NAMESPACE, name: 'pullbridge-upstream-credentials-mirror' })).data ?? {};
  /** Polls the mirror (bounded) until it equals `expected`. */
  const mirrorBecomes = async (expected: Record<string, string>, what: string) => {
    let data: Record<string, string> = {};
    for (let i = 0; i < 150; i++) {
      data = await mirrorData();
      if (JSON.stringify(Object.entries(data).sort()) === JSON.stringify(Object.entries(expected).sort())) return;
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.deepEqual(data, expected, what);
  };
  const source = (name: string, username: string, password: string) => ({ metadata: { name, namespace: NAMESPACE }, stringData: { username, password } });

  it('mirrors each credentialsSecret, follows a changed password, takes a rule added and drops a rule removed', async () => {
    const values = {
      registries: [
        { name: 'corp', match: ['corp.example'], upstream: 'https://corp.example', credentialsSecret: 'corp-robot' },
        { name: 'other', match: ['other.example'], upstream: 'https://other.example', credentialsSecret: 'other-robot' },
      ],
    };
    const valuesFile = join(dir, 'values.yaml');
    writeFileSync(valuesFile, stringifyYaml(values));
    const rendered = parseAllDocuments(await runAsync(cachedBinary('helm'), ['template', 'pullbridge', CHART, '-n', NAMESPACE, '--kube-version', KUBE_VERSION.slice(1), '-f', valuesFile]))
      .map((d) => d.toJS() as KubernetesObject)
      .filter((o) => o && o.kind);
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    const objects = KubernetesObjectApi.makeApiClient(kc);
    // The chart's service account, its RBAC and the (empty) mirror Secret, as helm installs them.
    const needed = rendered.filter((o) => (['ServiceAccount', 'Role', 'RoleBinding'].includes(o.kind ?? '') && o.metadata?.name === 'pullbridge-webhook') || (o.kind === 'Secret' && o.metadata?.name === 'pullbridge-upstream-credentials-mirror'));
    assert.equal(needed.length, 4);
    for (const object of needed) await objects.create(object);
    const deployment = rendered.find((o) => o.kind === 'Deployment') as unknown as { spec: { template: { spec: { containers: Array<{ args: string[] }> } } } };
    const arg = (name: string) => deployment.spec.template.spec.containers[0]?.args.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3) ?? '';
    const sourcesFile = join(dir, 'credential-sources.json');
    const configMap = rendered.find((o) => o.kind === 'ConfigMap') as KubernetesObject & { data: Record<string, string> };
    assert.equal(configMap.data['credential-sources.json'], '{"corp":"corp-robot","other":"other-robot"}');
    assert.equal(arg('credential-sources'), '/etc/pullbridge/config/credential-sources.json');
    // At first only corp (the ConfigMap volume not updated yet).
    writeFileSync(sourcesFile, '{"corp":"corp-robot"}');

    const token = await core.createNamespacedServiceAccountToken({ namespace: NAMESPACE, name: 'pullbridge-webhook', body: { spec: { audiences: [], expirationSeconds: 3600 } } });
    const saKubeconfig = join(dir, 'webhook-sa.kubeconfig');
    writeFileSync(saKubeconfig, JSON.stringify({
      apiVersion: 'v1', kind: 'Config', 'current-context': 'sa',
      clusters: [{ name: 'test', cluster: { server: cp.url, 'certificate-authority-data': Buffer.from(cp.caCert).toString('base64') } }],
      users: [{ name: 'sa', user: { token: token.status?.token } }],
      contexts: [{ name: 'sa', context: { cluster: 'test', user: 'sa' } }],
    }));
    await core.createNamespacedSecret({ namespace: NAMESPACE, body: source('corp-robot', 'robot', 's3cret') });
    const parsed = parseConfig(`webhook: {namespace: ${NAMESPACE}}\nregistries: []\n`);
    assert.ok(parsed.ok);
    webhook = await runWebhook({ config: parsed.config, host: '127.0.0.1', port: 0, kubeconfig: saKubeconfig, logger: logs.logger, credentialMirror: { secret: arg('credential-mirror'), sourcesPath: sourcesFile, namespace: NAMESPACE } });

    await mirrorBecomes({ 'corp.username': b64('robot'), 'corp.password': b64('s3cret') }, 'the source copied');
    // The user rotates the password: the watch brings it (the periodic resync is a minute away).
    await core.replaceNamespacedSecret({ namespace: NAMESPACE, name: 'corp-robot', body: source('corp-robot', 'robot', 'r0tated') });
    await mirrorBecomes({ 'corp.username': b64('robot'), 'corp.password': b64('r0tated') }, 'the rotated password');
    // A rule added whose Secret does not exist yet: said so, nothing invented.
    writeFileSync(sourcesFile, '{"corp":"corp-robot","other":"other-robot"}');
    for (let i = 0; i < 150 && !logs.raw.some((l) => l.includes('Secret other-robot does not exist')); i++) await new Promise((r) => setTimeout(r, 200));
    assert.ok(logs.raw.some((l) => l.includes('Secret other-robot does not exist')));
    await core.createNamespacedSecret({ namespace: NAMESPACE, body: source('other-robot', 'bot', 'pw') });
    await mirrorBecomes({ 'corp.username': b64('robot'), 'corp.password': b64('r0tated'), 'other.username': b64('bot'), 'other.password': b64('pw') }, 'the added rule');
    // corp removed from the rules: its keys go.
    writeFileSync(sourcesFile, '{"other":"other-robot"}');
    await mirrorBecomes({ 'other.username': b64('bot'), 'other.password': b64('pw') }, 'the removed rule dropped');
    assert.ok(!logs.raw.some((l) => /credential source watch|mirror failed/.test(l)), 'the chart\'s Role allows the watches and the update');
    // Never a credential in the logs.
    for (const secret of ['s3cret', 'r0tated', b64('s3cret'), b64('r0tated')]) assert.ok(!logs.raw.some((l) => l.includes(secret)), 'no secret logged');
  });
});
