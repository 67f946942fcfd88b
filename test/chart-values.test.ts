// The chart's values: helm itself (its values.schema.json, generated from the proxy's config schema)
// refuses bad values at install, naming the key; every documented option renders a config the proxy
// accepts; and no rule change (credentials included) touches the proxy's or the webhook's Pod template.

import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { KubernetesObject } from '@kubernetes/client-node';
import { parseAllDocuments, stringify as stringifyYaml } from 'yaml';
import fc from 'fast-check';
import { filesReadBy, parseConfig, validateConfig } from '../src/rules/config.js';
import { unloadableFiles } from '../src/shell/configfile.js';
import { parseByteQuantity, parseInodeFloor } from '../src/rules/quantity.js';
import { renderValuesSchema, VALUES_SCHEMA_FILE } from '../scripts/values-schema.js';
import { cachedBinary, KUBE_VERSION } from './support/controlplane.js';
import { runAsync } from './support/procs.js';

const CHART = fileURLToPath(new URL('../../charts/pullbridge', import.meta.url));
const PEM = '-----BEGIN CERTIFICATE-----\nMIIBnotreal\n-----END CERTIFICATE-----\n';
/** A public key of each type cosign signs with, as cosign.pub holds it (SPKI PEM). */
const publicKey = (type: 'ec' | 'rsa' | 'ed25519' = 'ec'): string => {
  const pair = type === 'ec' ? generateKeyPairSync('ec', { namedCurve: 'prime256v1' }) : type === 'rsa' ? generateKeyPairSync('rsa', { modulusLength: 2048 }) : generateKeyPairSync('ed25519');
  return pair.publicKey.export({ type: 'spki', format: 'pem' }).toString();
};
const COSIGN_PUB = publicKey();
const ROTATED_PUB = publicKey();

type WithData = KubernetesObject & { data?: Record<string, string> };
type Workload = KubernetesObject & { spec: { template: unknown } };

describe('Helm chart values', function () {
  this.timeout(120_000);
  const helm = cachedBinary('helm');
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-chart-values-'));
  let files = 0;

  const valuesFile = (values: unknown): string => {
    const file = join(dir, `values-${files++}.yaml`);
    writeFileSync(file, typeof values === 'string' ? values : stringifyYaml(values));
    return file;
  };
  const template = (values: unknown, ...extra: string[]) => runAsync(helm, ['template', 'pullbridge', CHART, '-n', 'pullbridge', '--kube-version', KUBE_VERSION.slice(1), '-f', valuesFile(values), ...extra]);
  const render = async (values: unknown, ...extra: string[]): Promise<KubernetesObject[]> =>
    parseAllDocuments(await template(values, ...extra))
      .map((d) => d.toJS() as KubernetesObject)
      .filter((o) => o && o.kind);
  /** helm's exit status and stderr for values it must refuse. */
  const refusal = async (values: unknown): Promise<string> => {
    const error = await template(values).then(
      () => assert.fail(`helm template accepted ${JSON.stringify(values)}`),
      (e: { code?: number; stderr?: string }) => e,
    );
    assert.notEqual(error.code, 0);
    return error.stderr ?? '';
  };
  const rule = (extra: Record<string, unknown> = {}) => ({ name: 'corp', match: ['registry.corp.example:5000'], upstream: 'https://registry.corp.example:5000', ...extra });

  it('values.schema.json is what scripts/values-schema.ts generates from the config schema (regenerate: node dist/scripts/values-schema.js)', () => {
    assert.equal(readFileSync(VALUES_SCHEMA_FILE, 'utf8'), renderValuesSchema());
  });

  it('the patterns it adds to the config schema are looser than the checks they stand for, never stricter', () => {
    const schema = JSON.parse(readFileSync(VALUES_SCHEMA_FILE, 'utf8')) as { properties: { registries: { items: { properties: { upstream: { pattern: string } } } }; cache: { properties: Record<string, { pattern: string }> } } };
    const upstream = new RegExp(schema.properties.registries.items.properties.upstream.pattern);
    const acceptsUpstream = (url: string) => validateConfig({ registries: [{ name: 'a', match: ['a.example'], upstream: url, auth: { mode: 'anonymous' } }] }).ok;
    fc.assert(fc.property(fc.oneof(fc.webUrl(), fc.string(), fc.constantFrom(' http://a.example', 'HTTPS://A.EXAMPLE:5000', 'http:a.example')), (url) => !acceptsUpstream(url) || upstream.test(url)), { numRuns: 2000 });
    const bytes = new RegExp(schema.properties.cache.properties.maxBytes?.pattern ?? '');
    const inodes = new RegExp(schema.properties.cache.properties.minFreeInodes?.pattern ?? '');
    fc.assert(fc.property(fc.oneof(fc.stringMatching(/^ ?\d{1,12}(\.\d{1,3})?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)? ?$/), fc.string()), (value) => parseByteQuantity(value) === null || bytes.test(value)), { numRuns: 2000 });
    fc.assert(fc.property(fc.oneof(fc.stringMatching(/^ ?\d{1,3}(\.\d{1,3})?% ?$/), fc.string()), (value) => parseInodeFloor(value) === null || inodes.test(value)), { numRuns: 2000 });
  });

  it('refuses each misspelt or malformed value, naming its key, where helm rendered it before', async () => {
    const cases: Array<[unknown, RegExp]> = [
      [{ regsitries: [rule()] }, /\(root\): Additional property regsitries is not allowed/],
      [{ registries: [{ name: 'corp', match: ['registry.corp.example'], url: 'https://registry.corp.example' }] }, /registries\.0: Additional property url is not allowed/],
      [{ registries: [rule({ name: 'Corp_1' })] }, /registries\.0\.name: Does not match pattern/],
      [{ registries: [rule({ credentials: { user: 'robot', password: 's3cret' } })] }, /registries\.0\.credentials: Additional property user is not allowed/],
      [{ registries: [rule({ upstream: 'registry.corp.example:5000' })] }, /registries\.0\.upstream: Does not match pattern/],
      [{ registries: [rule({ match: [] })] }, /registries\.0\.match: Array must have at least 1 items/],
      [{ registries: [rule({ auth: { mode: 'basic' } })] }, /registries\.0\.auth\.mode: registries\.0\.auth\.mode must be one of the following/],
      [{ registries: [rule({ revalidate: 'always' })] }, /registries\.0\.revalidate: registries\.0\.revalidate must be one of the following/],
      [{ registries: [rule({ repositories: { includes: ['team/**'] } })] }, /registries\.0\.repositories: Additional property includes is not allowed/],
      [{ registries: [rule({ credentials: { username: 'robot', password: 's3cret' }, credentialsSecret: 'corp-robot' })] }, /registries\[0\]: set credentials or credentialsSecret, not both \(registries\[0\]\.credentials and registries\[0\]\.credentialsSecret/],
      [{ registries: [rule({ credentialsSecret: 'Corp_Robot' })] }, /registries\.0\.credentialsSecret: Does not match pattern/],
      [{ registries: [rule({ forwardProxy: { url: 'http://proxy.corp.example:3128', credentials: { usernameFile: '/x' } } })] }, /registries\.0\.forwardProxy: Additional property credentials is not allowed/],
      [{ registries: [rule({ cache: 'never' })] }, /registries\.0\.cache: Invalid type\. Expected: boolean, given: string/],
      [{ registries: [rule({ rewrite: 'sometimes' })] }, /registries\.0\.rewrite: registries\.0\.rewrite must be one of the following/],
      // verify takes the keys themselves (the chart writes the files), and at least one.
      [{ registries: [rule({ verify: { cosign: { publicKeyFiles: ['/k.pub'] } } })] }, /registries\.0\.verify\.cosign: Additional property publicKeyFiles is not allowed/],
      [{ registries: [rule({ verify: { cosign: {} } })] }, /registries\.0\.verify\.cosign: publicKeys is required/],
      [{ registries: [rule({ verify: { cosign: { publicKeys: [] } } })] }, /registries\.0\.verify\.cosign\.publicKeys: Array must have at least 1 items/],
      [{ registries: [rule({ verify: { cosign: { publicKeys: ['cosign.pub'] } } })] }, /registries\.0\.verify\.cosign\.publicKeys\.0: Does not match pattern/],
      [{ registries: [rule({ verify: { onFailure: 'deny' } })] }, /registries\.0\.verify: cosign is required/],
      [{ registries: [rule({ verify: { cosign: { publicKeys: [COSIGN_PUB] }, onFailure: 'block' } })] }, /registries\.0\.verify\.onFailure: registries\.0\.verify\.onFailure must be one of the following/],
      [{ webhook: { excludedNamespaces: ['Monitoring'] } }, /webhook\.excludedNamespaces\.0: Does not match pattern/],
      [{ webhook: { failurePolicy: 'Fial' } }, /webhook\.failurePolicy: webhook\.failurePolicy must be one of the following/],
      [{ webhook: { replicas: 'two' } }, /webhook\.replicas: Invalid type/],
      [{ proxy: { port: 70000 } }, /proxy\.port: Must be less than or equal to 65535/],
      [{ proxy: { exposre: 'nodePort' } }, /proxy: Additional property exposre is not allowed/],
      [{ cache: { tagTTLSeconds: -1 } }, /cache\.tagTTLSeconds: Must be greater than or equal to 0/],
      [{ cache: { maxBytes: '20GB' } }, /cache\.maxBytes: Does not match pattern/],
      [{ cache: { minFreeInodes: '10 percent' } }, /cache\.minFreeInodes: Does not match pattern/],
      [{ cache: { minFreeBytes: -1 } }, /cache\.minFreeBytes: Must be greater than or equal to 0/],
      [{ cache: { shared: { s3: { bucket: 'images', prefix: 'no-slash' } } } }, /cache\.shared\.s3\.prefix: Does not match pattern/],
      [{ crio: { registriesDropIn: { enabled: 'on weekdays' } } }, /crio\.registriesDropIn\.enabled: Invalid type/],
    ];
    for (const [values, message] of cases) {
      const stderr = await refusal(values);
      assert.match(stderr, message, `${JSON.stringify(values)}:\n${stderr}`);
      assert.doesNotMatch(stderr, /goroutine|panic/);
    }
  });

  it("refuses what the proxy refuses at start (checks across a rule's keys), as validateConfig does, naming the key", async () => {
    const broker = { keyFiles: ['/k0'] };
    /** The rule as the rendered config.yaml has it: the chart turns credentials of either kind into files. */
    const asConfigRule = (values: Record<string, unknown>) => {
      const { credentials, credentialsSecret, verify, ...rest } = values;
      const withVerify = verify === undefined ? rest : { ...rest, verify: { cosign: { publicKeyFiles: ['/k.pub'] } } };
      return credentials === undefined && credentialsSecret === undefined ? withVerify : { ...withVerify, credentials: { usernameFile: '/u', passwordFile: '/p' } };
    };
    const anonymous = { auth: { mode: 'anonymous' } };
    const cases: Array<[string, Array<Record<string, unknown>>, RegExp | null]> = [
      ['namespace filter on an anonymous rule', [rule({ ...anonymous, namespaces: { exclude: ['sandbox'] } })], /registries\[0\]\.namespaces: auth mode "anonymous" does not identify/],
      ['namespace filter on a passthrough rule', [rule({ auth: { mode: 'passthrough' }, namespaces: { include: ['app-*'] } })], /registries\[0\]\.namespaces: auth mode "passthrough"/],
      ['anonymous rule with credentials, no repositories.include', [rule({ ...anonymous, credentials: { username: 'robot', password: 's3cret' } })], /registries\[0\]\.repositories\.include: an anonymous rule with credentials must list/],
      ['anonymous rule with credentialsSecret, no repositories.include', [rule({ ...anonymous, credentialsSecret: 'robot' })], /registries\[0\]\.repositories\.include/],
      ['two rules named corp', [rule(), rule({ match: ['other.corp.example'] })], /registries\[1\]\.name: duplicate rule name "corp" \(also registries\[0\]\)/],
      ['upstream "http://"', [rule({ upstream: 'http://' })], /registries\[0\]\.upstream must be an absolute http:\/\/ or https:\/\/ URL with a host, got "http:\/\/"/],
      ['a /33 in redirects.allow', [rule({ redirects: { allow: ['10.0.0.0/33'] } })], /registries\[0\]\.redirects\.allow\[0\]: "10\.0\.0\.0\/33" must be an IP address or a CIDR block/],
      ['an IPv6 /129 in redirects.allow', [rule({ redirects: { allow: ['fd00::/129'] } })], /redirects\.allow\[0\]/],
      ['a name in redirects.allow', [rule({ redirects: { allow: ['10.0.0.0/8', 'objects.corp.example'] } })], /redirects\.allow\[1\]/],
      ['verify on a passthrough rule', [rule({ auth: { mode: 'passthrough' }, verify: { cosign: { publicKeys: [COSIGN_PUB] } } })], /registries\[0\]\.verify: auth mode "passthrough" gives the webhook no credential of the namespace/],
      // ...and their good neighbours, which both accept.
      ['namespace filter on a broker rule', [rule({ namespaces: { exclude: ['sandbox'] } })], null],
      ['anonymous rule with credentials and a repository list', [rule({ ...anonymous, credentials: { username: 'robot', password: 's3cret' }, repositories: { include: ['team/**'] } })], null],
      ['anonymous rule without credentials', [rule(anonymous)], null],
      ['two rules with different names', [rule(), rule({ name: 'corp2', match: ['other.corp.example'] })], null],
      ['upstream written loosely', [rule({ upstream: ' HTTPS://Registry.corp.example:5000' })], null],
      ['verify on a broker rule and on an anonymous one', [rule({ verify: { cosign: { publicKeys: [COSIGN_PUB] } } }), rule({ name: 'hub', match: ['docker.io'], ...anonymous, verify: { cosign: { publicKeys: [COSIGN_PUB] }, onFailure: 'warn' } })], null],
      ['addresses and blocks in redirects.allow', [rule({ redirects: { allow: ['10.0.0.0/32', '192.168.1.1', 'fd00::/128', '::1'] } })], null],
    ];
    for (const [what, registries, message] of cases) {
      const proxyVerdict = validateConfig({ broker, registries: registries.map(asConfigRule) });
      const helmVerdict = await template({ broker: { existingSecret: 'keys' }, webhook: { failurePolicy: 'Fail' }, registries }).then(
        () => null,
        (e: { code?: number; stderr?: string }) => e,
      );
      assert.equal(helmVerdict === null, proxyVerdict.ok, `${what}: helm ${helmVerdict === null ? 'accepts' : 'refuses'}, the proxy ${proxyVerdict.ok ? 'accepts' : `refuses (${JSON.stringify(proxyVerdict.ok ? [] : proxyVerdict.errors)})`}`);
      if (message !== null) {
        assert.notEqual(helmVerdict?.code, 0);
        assert.match(helmVerdict?.stderr ?? '', message, what);
        assert.doesNotMatch(helmVerdict?.stderr ?? '', /goroutine|panic/);
      }
    }
  });

  it('accepts and renders every documented option, into a config.yaml the proxy accepts', async () => {
    const everything = {
      image: { repository: 'registry.example/pullbridge', tag: '1.2.3', pullPolicy: 'Always' },
      imagePullSecrets: [{ name: 'pull' }],
      registries: [
        rule({
          auth: { mode: 'broker', tokenRealms: ['https://auth.corp.example'] },
          repositories: { include: ['team/**'], exclude: ['team/secret'] },
          namespaces: { include: ['app-*'], exclude: ['sandbox-*'] },
          credentials: { username: 'robot', password: 's3cret' },
          caBundle: PEM,
          insecureSkipVerify: false,
          forwardProxy: { url: 'http://proxy.corp.example:3128', mode: 'connect', headers: { 'SAP-Connectivity-SCC-Location_ID': 'loc-1' } },
          redirects: { allow: ['10.0.0.0/8', 'fd00::/8'] },
          verifyBlobDigests: false,
          cache: false,
          revalidate: 'head',
          rewrite: 'private-only',
          onProbeFailure: 'leave',
          pinDigest: true,
          verify: { cosign: { publicKeys: [COSIGN_PUB] }, onFailure: 'warn' },
        }),
        { name: 'mirrored', match: ['mirrored.example'], upstream: 'http://mirrored.example', auth: { mode: 'passthrough' }, credentialsSecret: 'mirrored-robot' },
        { name: 'hub', match: ['docker.io'], upstream: 'https://registry-1.docker.io', auth: { mode: 'anonymous' }, repositories: { include: ['library/**'] } },
      ],
      webhook: {
        replicas: 3,
        port: 9443,
        metricsPort: 9091,
        pullSecretName: 'corp-pull',
        optOutLabel: 'corp.example/no-proxy',
        excludedNamespaces: ['monitoring'],
        failurePolicy: 'Fail',
        timeoutSeconds: 10,
        pullSecretFailure: 'admit-unchanged',
        certificates: { mode: 'certManager', validityDays: 90, certManagerIssuer: { kind: 'ClusterIssuer', name: 'corp-ca' } },
        clientAuth: { caBundle: PEM, existingConfigMap: '', allowedNames: ['kube-apiserver'] },
        resources: { requests: { cpu: '100m', memory: '96Mi' }, limits: { memory: '320Mi' } },
        nodeSelector: { 'kubernetes.io/os': 'linux' },
        tolerations: [{ key: 'dedicated', operator: 'Equal', value: 'infra', effect: 'NoSchedule' }],
        podDisruptionBudget: { minAvailable: '50%' },
      },
      proxy: { exposure: 'nodePort', host: 'localhost', port: 30600, containerPort: 5001, opsPort: 9092, probeIntervalSeconds: 15, priorityClassName: '', tolerations: [], resources: { limits: { memory: '200Mi' } }, nodeSelector: { 'kubernetes.io/os': 'linux' } },
      podSecurity: { checkNamespace: false },
      cache: {
        enabled: true,
        hostPath: '/var/cache/pullbridge',
        maxBytes: '50Gi',
        minFreeBytes: 1073741824,
        minFreeInodes: 50_000,
        tagTTLSeconds: 60,
        staleIfErrorSeconds: 86_400,
        credentialTTLSeconds: 120,
        reconfirmSeconds: 7200,
        shared: { backend: 's3', existingSecret: 'store', fillWaitSeconds: 60, timeoutSeconds: 20, recordKey: { existingSecret: 'record-key', secretKey: 'key' }, s3: { bucket: 'images', region: 'eu-central-1', endpoint: 'https://s3.corp.example', forcePathStyle: true, prefix: 'pullbridge/', secretKeys: { accessKey: 'access_key_id', secretKey: 'secret_access_key' } } },
      },
      broker: { existingSecret: 'broker-keys' },
      networkPolicy: { enabled: true, apiserverSources: [{ ipBlock: { cidr: '10.0.0.0/24' } }], metricsSources: [], proxyRegistrySources: [{ namespaceSelector: {} }] },
      metrics: { serviceMonitor: { enabled: true, interval: '1m', labels: { release: 'prometheus' } } },
      crio: { registriesDropIn: { enabled: true, dir: '/etc/containers/registries.conf.d' } },
    };
    const rendered = await render(everything);
    const configMap = rendered.find((o) => o.kind === 'ConfigMap' && o.metadata?.name === 'pullbridge-config') as WithData;
    const result = parseConfig(configMap.data?.['config.yaml'] ?? '');
    assert.ok(result.ok, result.ok ? '' : JSON.stringify(result.errors));
    const [corp, mirrored] = result.config.registries;
    assert.deepEqual(corp?.auth, { mode: 'broker', tokenRealms: ['https://auth.corp.example'] });
    assert.deepEqual(corp?.redirects.allow, ['10.0.0.0/8', 'fd00::/8']);
    assert.equal(corp?.verifyBlobDigests, false);
    assert.equal(corp?.revalidate, 'head');
    assert.equal(corp?.cache, false);
    assert.deepEqual([corp?.rewrite, corp?.onProbeFailure, corp?.pinDigest], ['private-only', 'leave', true]);
    assert.deepEqual([mirrored?.rewrite, mirrored?.onProbeFailure, mirrored?.pinDigest], ['always', 'rewrite', false]);
    assert.deepEqual(corp?.verify, { cosign: { publicKeyFiles: ['/etc/pullbridge/config/cosign-corp-0.pub'] }, onFailure: 'warn' });
    assert.equal(mirrored?.verify, undefined);
    assert.equal(corp?.credentials?.passwordFile, '/etc/pullbridge/credentials/corp.password');
    assert.equal(mirrored?.credentials?.passwordFile, '/etc/pullbridge/credentials-mirror/mirrored.password');
    assert.equal(configMap.data?.['credential-sources.json'], '{"mirrored":"mirrored-robot"}');
    assert.equal(result.config.cache?.shared?.s3?.prefix, 'pullbridge/');
    // And helm lint agrees (it validates against the schema too).
    assert.match(await runAsync(helm, ['lint', CHART, '--strict', '-f', valuesFile(everything)]), /0 chart\(s\) failed/);
    // values.yaml's own commented rule example, uncommented, is accepted as well.
    const example = readFileSync(join(CHART, 'values.yaml'), 'utf8').split('\n');
    const start = example.findIndex((l) => l.startsWith('#  - name: corp'));
    const block = example.slice(start).filter((l, i, all) => all.slice(0, i + 1).every((x) => x.startsWith('#')));
    const uncommented = block
      .map((l) => l.replace(/^# ?/, ''))
      .filter((l) => !/^\s*#/.test(l))
      .join('\n')
      .replace('-----BEGIN CERTIFICATE-----', PEM.trim().split('\n').join('\n      '))
      .replace(/( *)-----BEGIN PUBLIC KEY-----[\s\S]*?-----END PUBLIC KEY-----/, (_, indent: string) => COSIGN_PUB.trim().split('\n').map((l) => `${indent}${l}`).join('\n'))
      .replace(/credentials:\s*# [^\n]*\n/, 'credentials:\n');
    const documented = await render(`broker: {existingSecret: keys}\nwebhook: {failurePolicy: Fail}\nregistries:\n${uncommented}\n`);
    const documentedConfig = parseConfig((documented.find((o) => o.kind === 'ConfigMap' && o.metadata?.name === 'pullbridge-config') as WithData).data?.['config.yaml'] ?? '');
    assert.ok(documentedConfig.ok, documentedConfig.ok ? '' : JSON.stringify(documentedConfig.errors));
    const documentedRule = documentedConfig.config.registries[0];
    assert.equal(documentedRule?.name, 'corp');
    assert.deepEqual(documentedRule?.redirects.allow, ['10.0.0.0/8']);
    assert.equal(documentedRule?.revalidate, 'get');
    assert.equal(documentedRule?.forwardProxy?.url, 'http://proxy.corp.example:3128');
    assert.deepEqual(documentedRule?.verify, { cosign: { publicKeyFiles: ['/etc/pullbridge/config/cosign-corp-0.pub'] }, onFailure: 'deny' });
  });

  describe('verify rules (cosign public keys)', () => {
    const configMapOf = (rendered: KubernetesObject[]) => rendered.find((o) => o.kind === 'ConfigMap' && o.metadata?.name === 'pullbridge-config') as WithData;

    it('writes each key into the config ConfigMap as the file config.yaml names: validateConfig accepts it, and the webhook loads it from the volume (ECDSA, RSA, Ed25519)', async () => {
      const keys = { ec: COSIGN_PUB, rsa: publicKey('rsa'), ed25519: publicKey('ed25519'), other: publicKey() };
      const rendered = await render({
        webhook: { failurePolicy: 'Fail' },
        registries: [rule({ verify: { cosign: { publicKeys: [keys.ec, keys.rsa, keys.ed25519] } } }), rule({ name: 'hub', match: ['docker.io'], auth: { mode: 'anonymous' }, verify: { cosign: { publicKeys: [keys.other] }, onFailure: 'warn' } })],
      });
      const data = configMapOf(rendered).data ?? {};
      const result = parseConfig(data['config.yaml'] ?? '');
      assert.ok(result.ok, result.ok ? '' : JSON.stringify(result.errors));
      const [corp, hub] = result.config.registries;
      assert.deepEqual(corp?.verify, { cosign: { publicKeyFiles: [0, 1, 2].map((i) => `/etc/pullbridge/config/cosign-corp-${i}.pub`) }, onFailure: 'deny' });
      assert.deepEqual(hub?.verify, { cosign: { publicKeyFiles: ['/etc/pullbridge/config/cosign-hub-0.pub'] }, onFailure: 'warn' });
      // The ConfigMap as kubelet writes it into the webhook's volume at /etc/pullbridge/config: every key
      // file the webhook reads for this config is there, with the key given, and loads.
      const webhook = rendered.find((o) => o.kind === 'Deployment') as KubernetesObject & { spec: { template: { spec: { containers: Array<{ volumeMounts: Array<{ name: string; mountPath: string }> }>; volumes: Array<{ name: string; configMap?: { name: string } }> } } } };
      const configVolume = webhook.spec.template.spec.volumes.find((v) => v.configMap?.name === 'pullbridge-config')?.name;
      assert.equal(webhook.spec.template.spec.containers[0]?.volumeMounts.find((m) => m.name === configVolume)?.mountPath, '/etc/pullbridge/config');
      const volume = mkdtempSync(join(dir, 'config-volume-'));
      for (const [name, text] of Object.entries(data)) writeFileSync(join(volume, name), text);
      const keyFiles = filesReadBy(result.config, 'webhook').filter((f) => f.holds === 'public-key');
      assert.equal(keyFiles.length, 4);
      const expected = [keys.ec, keys.rsa, keys.ed25519, keys.other];
      keyFiles.forEach((file, i) => {
        assert.ok(file.path.startsWith('/etc/pullbridge/config/'), file.path);
        assert.equal(readFileSync(join(volume, file.path.slice('/etc/pullbridge/config/'.length)), 'utf8'), expected[i], `${file.key} holds the key given`);
      });
      assert.deepEqual(unloadableFiles(keyFiles.map((f) => ({ ...f, path: join(volume, f.path.slice('/etc/pullbridge/config/'.length)) }))), []);
    });

    it('refuses a key that is not one whole PEM public key, naming it, before anything reaches a ConfigMap; and verify without the resolver', async () => {
      const [header, ...rest] = COSIGN_PUB.trim().split('\n');
      const body = rest.slice(0, -1);
      const footer = rest[rest.length - 1];
      const privateKey = generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey;
      const cases: Array<[string, string, RegExp]> = [
        ['a garbled body', `${header}\nMIIBnotreal\n${footer}\n`, /garbled or truncated/],
        ['a truncated body', `${header}\n${body[0]}\n${footer}\n`, /garbled or truncated/],
        ['a body that is not base64', `${header}\n${body.join('\n').replace(/[A-Z]/, '*')}\n${footer}\n`, /not one PEM public key/],
        ['a PKCS#8 private key', privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(), /a private key; give the public key/],
        ['an EC private key', privateKey.export({ type: 'sec1', format: 'pem' }).toString(), /a private key/],
        ["cosign's encrypted private key", '-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\neyJrZGYiOnt9fQ==\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n', /a private key/],
        ['a certificate', PEM, /not one PEM public key/],
        ['two keys in one value', `${COSIGN_PUB}${publicKey()}`, /not one PEM public key/],
      ];
      for (const [what, pem, message] of cases) {
        const stderr = await refusal({ webhook: { failurePolicy: 'Fail' }, registries: [rule({ verify: { cosign: { publicKeys: [COSIGN_PUB, pem] } } })] });
        assert.match(stderr, /registries\[0\]\.verify\.cosign\.publicKeys\[1\]: /, what);
        assert.match(stderr, message, `${what}:\n${stderr}`);
        assert.doesNotMatch(stderr, /goroutine|panic/);
        if (/PRIVATE/.test(pem)) assert.ok(!stderr.includes(pem.split('\n')[1] ?? ''), `${what}: the key is not echoed`);
      }
      assert.match(await refusal({ webhook: { resolver: { enabled: false } }, registries: [rule({ verify: { cosign: { publicKeys: [COSIGN_PUB] } } })] }), /registries\[0\]\.verify: signatures are fetched through the proxies by the admission resolver: set webhook\.resolver\.enabled=true/);
    });

    it('refuses a verify rule that denies while webhook.failurePolicy is Ignore (the default): the policy would fail open; warn, or Fail, renders', async () => {
      const verifyRule = (onFailure?: string) => rule({ verify: { cosign: { publicKeys: [COSIGN_PUB] }, ...(onFailure ? { onFailure } : {}) } });
      for (const values of [{ registries: [verifyRule()] }, { webhook: { failurePolicy: 'Ignore' }, registries: [verifyRule('deny')] }]) {
        const stderr = await refusal(values);
        assert.match(stderr, /registries\[0\]\.verify\.onFailure: deny, but webhook\.failurePolicy is Ignore: .* set webhook\.failurePolicy=Fail/, JSON.stringify(values));
        assert.doesNotMatch(stderr, /goroutine|panic/);
      }
      const rendered = await render({ webhook: { failurePolicy: 'Fail' }, registries: [verifyRule()] });
      assert.equal((rendered.find((o) => o.kind === 'MutatingWebhookConfiguration') as unknown as { webhooks: Array<{ failurePolicy: string }> }).webhooks[0]?.failurePolicy, 'Fail');
      assert.ok(await render({ registries: [verifyRule('warn')] }), 'warn fails open by its own choice: Ignore is allowed');
    });
  });

  describe('rules that ask the upstream at admission need the resolver (webhook.resolver.enabled)', () => {
    it('refuses rewrite: private-only and pinDigest without it, naming the rule key and the values key; with it they render', async () => {
      const off = { resolver: { enabled: false } };
      assert.match(await refusal({ webhook: off, registries: [rule({ rewrite: 'private-only' })] }), /registries\[0\]\.rewrite: private-only asks the upstream through the proxies by the admission resolver: set webhook\.resolver\.enabled=true/);
      assert.match(await refusal({ webhook: off, registries: [rule(), rule({ name: 'pin', match: ['pin.example'], pinDigest: true })] }), /registries\[1\]\.pinDigest: tags are resolved through the proxies by the admission resolver: set webhook\.resolver\.enabled=true/);
      assert.ok(await render({ webhook: off, registries: [rule({ rewrite: 'always', pinDigest: false })] }), 'a rule that asks nothing renders without the resolver');
      assert.ok(await render({ registries: [rule({ rewrite: 'private-only', pinDigest: true })] }), 'with the resolver (the default) they render');
    });
  });

  describe('rule changes leave the Pod templates as they are (nothing restarts)', () => {
    // failurePolicy Fail throughout: a verify rule that denies refuses Ignore (its own test below).
    const base = { webhook: { failurePolicy: 'Fail' }, registries: [{ name: 'hub', match: ['docker.io'], upstream: 'https://registry-1.docker.io', auth: { mode: 'anonymous' } }] };
    const withRule = (extra: Record<string, unknown>) => ({ ...base, registries: [...base.registries, rule(extra)] });
    const snapshot = async (values: unknown) => {
      const rendered = await render(values);
      const workload = (kind: string) => stringifyYaml((rendered.find((o) => o.kind === kind) as Workload).spec.template);
      const secret = (name: string) => (rendered.find((o) => o.kind === 'Secret' && o.metadata?.name === name) as WithData | undefined)?.data ?? {};
      const configMap = (rendered.find((o) => o.kind === 'ConfigMap' && o.metadata?.name === 'pullbridge-config') as WithData).data ?? {};
      return { proxy: workload('DaemonSet'), webhook: workload('Deployment'), credentials: secret('pullbridge-upstream-credentials'), sources: configMap['credential-sources.json'], configMap, rendered };
    };

    it('adding a rule with inline credentials, one with credentialsSecret, changing a password, removing a rule, adding a verify rule and rotating its keys: byte-identical proxy and webhook Pod templates', async () => {
      const before = await snapshot(base);
      const steps: Array<[string, unknown]> = [
        ['a rule with inline credentials', withRule({ credentials: { username: 'robot', password: 's3cret' } })],
        ['its password changed', withRule({ credentials: { username: 'robot', password: 'n3w-s3cret' } })],
        ['a rule with credentialsSecret', { ...base, registries: [...withRule({ credentials: { username: 'robot', password: 'n3w-s3cret' } }).registries, { name: 'mirrored', match: ['mirrored.example'], upstream: 'https://mirrored.example', credentialsSecret: 'mirrored-robot' }] }],
        ['the credentials moved to a Secret', withRule({ credentialsSecret: 'corp-robot' })],
        ['the rule removed', base],
        ['a verify rule', withRule({ verify: { cosign: { publicKeys: [COSIGN_PUB] } } })],
        ['its key rotated, a second one added', withRule({ verify: { cosign: { publicKeys: [ROTATED_PUB, COSIGN_PUB] }, onFailure: 'warn' } })],
        ['verify removed', withRule({})],
      ];
      const seen: Array<Awaited<ReturnType<typeof snapshot>>> = [];
      for (const [what, values] of steps) {
        const after = await snapshot(values);
        assert.equal(after.proxy, before.proxy, `${what}: the proxy DaemonSet's Pod template`);
        assert.equal(after.webhook, before.webhook, `${what}: the webhook Deployment's Pod template`);
        seen.push(after);
      }
      // ...while what they mount did change (the test would pass vacuously otherwise).
      const b64 = (s: string) => Buffer.from(s).toString('base64');
      assert.deepEqual(before.credentials, {});
      assert.deepEqual(seen[0]?.credentials, { 'corp.username': b64('robot'), 'corp.password': b64('s3cret') });
      assert.equal(seen[1]?.credentials['corp.password'], b64('n3w-s3cret'));
      assert.equal(seen[2]?.sources, '{"mirrored":"mirrored-robot"}');
      assert.deepEqual(seen[3]?.credentials, {});
      assert.equal(seen[3]?.sources, '{"corp":"corp-robot"}');
      assert.deepEqual(seen[4]?.credentials, {});
      const keyFiles = (i: number) => Object.fromEntries(Object.entries(seen[i]?.configMap ?? {}).filter(([name]) => name.startsWith('cosign-')));
      assert.deepEqual(keyFiles(5), { 'cosign-corp-0.pub': COSIGN_PUB });
      assert.deepEqual(keyFiles(6), { 'cosign-corp-0.pub': ROTATED_PUB, 'cosign-corp-1.pub': COSIGN_PUB });
      assert.deepEqual(keyFiles(7), {});
      // The webhook may read exactly the Secrets the rules name, and write only the mirror.
      const role = seen[2]?.rendered.find((o) => o.kind === 'Role' && o.metadata?.name === 'pullbridge-webhook') as KubernetesObject & { rules: Array<{ resourceNames?: string[]; verbs: string[] }> };
      assert.ok(role.rules.some((r) => JSON.stringify(r.resourceNames) === '["mirrored-robot"]' && r.verbs.join() === 'get,list,watch'));
      assert.ok(role.rules.some((r) => JSON.stringify(r.resourceNames) === '["pullbridge-upstream-credentials-mirror"]' && r.verbs.join() === 'get,update'));
      const baseRole = before.rendered.find((o) => o.kind === 'Role' && o.metadata?.name === 'pullbridge-webhook') as KubernetesObject & { rules: Array<{ resources: string[]; resourceNames?: string[] }> };
      assert.ok(baseRole.rules.every((r) => !r.resources.includes('secrets') || (r.resourceNames ?? []).length > 0), 'never every Secret of the namespace');
    });
  });
});
