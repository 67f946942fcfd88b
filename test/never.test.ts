// rewrite: never (the pull secret without rewriting): the pure parts. The decision, the admission
// patch, the Secret's name and dockerconfigjson payload, the config's cross-key checks, the files
// the webhook reads. The cluster half is in never-cluster.test.ts.
import assert from 'node:assert/strict';
import { filesReadBy, parseConfig } from '../src/rules/config.js';
import { decideImage } from '../src/rules/decide.js';
import { ORIGINAL_IMAGES_ANNOTATION, REWRITTEN_LABEL, UPSTREAM_PULL_SECRET_LABEL } from '../src/rules/marks.js';
import { DOCKER_HUB_AUTH_KEY, dockerConfigKey, upstreamDockerConfigJson, upstreamPullSecretName } from '../src/rules/upstreamsecret.js';
import { desiredSecret, desiredUpstreamPullSecret, KEY_ID_ANNOTATION } from '../src/k8s/pullsecret.js';
import { managedSecrets, reconcileAction } from '../src/k8s/reconciler.js';
import { admitPod, leftUnchanged, parseAdmissionReview, type AdmissionRequest } from '../src/webhook/admission.js';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runCli } from './support/cli.js';
import { configFrom } from './support/config.js';
import { applyPatch, podWith, reviewFor, type PodShape } from './support/review.js';

const NEVER_YAML = `
proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull}
broker: {keyFiles: [/nonexistent/pullbridge/broker-key]}
registries:
  - name: vendor
    match: [vendor.example:5000, docker.io]
    upstream: https://vendor.example:5000
    rewrite: never
    shareUpstreamCredentials: true
    namespaces: {include: ["team-*"]}
    repositories: {exclude: ["internal/**"]}
    credentials: {username: robot, passwordFile: /etc/pullbridge/shared-credentials/vendor.password}
  - name: corp
    match: [registry.corp.example:5000]
    upstream: https://127.0.0.1:5000
    credentials: {usernameFile: /etc/pullbridge/credentials/corp.username, passwordFile: /etc/pullbridge/credentials/corp.password}
`;
const config = configFrom(NEVER_YAML);

function requestOf(review: Record<string, unknown>): AdmissionRequest {
  const parsed = parseAdmissionReview(review);
  assert.ok(parsed.ok, parsed.ok ? '' : parsed.error);
  return parsed.request;
}

const rule = (yaml: string) => `registries:\n  - {name: v, match: [v.example], upstream: "https://127.0.0.1:1"${yaml}}\n`;
const errorsOf = (yaml: string) => {
  const result = parseConfig(yaml);
  return result.ok ? [] : result.errors.map((e) => `${e.key}: ${e.message}`);
};

describe('rewrite: never (pure)', () => {
  describe('config', () => {
    const complete = ', rewrite: never, shareUpstreamCredentials: true, namespaces: {include: [team-a]}, credentials: {username: u, passwordFile: /p}';
    it('accepts a never rule with the opt-in, a namespace list and credentials, without broker keys', () => {
      assert.deepEqual(errorsOf(rule(complete)), []);
    });
    it('requires the opt-in, the namespace list and the credentials, each naming its key', () => {
      assert.deepEqual(errorsOf(rule(', rewrite: never')), [
        'registries[0].shareUpstreamCredentials: rewrite: never writes this rule\'s upstream credential itself into a pull secret in each namespace it admits; set shareUpstreamCredentials: true to accept that (docs/security.md)',
        'registries[0].namespaces.include: rewrite: never hands the upstream credential to namespaces: list the namespaces that may have it',
        'registries[0].credentials: rewrite: never provisions a pull secret from the rule\'s credentials: give credentials',
      ]);
      assert.deepEqual(errorsOf(rule(complete.replace('include: [team-a]', 'exclude: [team-a]'))), ['registries[0].namespaces.include: rewrite: never hands the upstream credential to namespaces: list the namespaces that may have it']);
    });
    it('refuses the opt-in on a rule that rewrites', () => {
      assert.deepEqual(errorsOf(`broker: {keyFiles: [/k]}\n${rule(', shareUpstreamCredentials: true')}`), ['registries[0].shareUpstreamCredentials: only with rewrite: never (other modes never hand the upstream credential to a namespace)']);
    });
    it('has the webhook read the never rules\' credential files and no other rule\'s', () => {
      assert.deepEqual(filesReadBy(config, 'webhook').map((f) => `${f.key} ${f.path}`), [
        'broker.keyFiles[0] /nonexistent/pullbridge/broker-key',
        'registries[0].credentials.passwordFile /etc/pullbridge/shared-credentials/vendor.password',
      ]);
      assert.ok(filesReadBy(config, 'proxy').some((f) => f.path === '/etc/pullbridge/credentials/corp.password'));
    });
  });

  describe('decision', () => {
    it('keeps the image and names the rule and its secret', () => {
      assert.deepEqual(decideImage(config, 'vendor.example:5000/app/web:1', 'team-a'), {
        image: 'vendor.example:5000/app/web:1',
        rewritten: null,
        rule: 'vendor',
        reason: 'pull-secret-only',
        detail: 'image stays; the Pod gets pull secret "pullbridge-pull-vendor"',
      });
      assert.equal(decideImage(config, 'nginx', 'team-a').reason, 'pull-secret-only', 'Docker Hub short names match docker.io');
    });
    it('applies the namespace and repository filters', () => {
      assert.equal(decideImage(config, 'vendor.example:5000/app/web:1', 'default').reason, 'namespace-not-allowed');
      assert.equal(decideImage(config, 'vendor.example:5000/internal/x:1', 'team-a').reason, 'repository-excluded');
    });
  });

  describe('admission', () => {
    const pod = () => podWith({ containers: [{ name: 'web', image: 'vendor.example:5000/app/web:1' }, { name: 'side', image: 'registry.corp.example:5000/t/s:2' }] }, { name: 'p', namespace: 'team-a' });
    it('adds the rule\'s secret and the broker\'s, rewrites only the rewrite rule\'s image, and labels the Pod for the reconciler', () => {
      const outcome = admitPod(config, requestOf(reviewFor(pod(), { namespace: 'team-a' })));
      assert.equal(outcome.decision, 'mutated');
      assert.equal(outcome.pullSecret, 'pullbridge-pull');
      assert.deepEqual(outcome.upstreamPullSecrets, ['pullbridge-pull-vendor']);
      const patched = applyPatch(pod(), outcome.patch) as unknown as PodShape;
      assert.deepEqual(patched.spec.containers.map((c) => c.image), ['vendor.example:5000/app/web:1', 'localhost:30500/corp/t/s:2']);
      assert.deepEqual(patched.spec.imagePullSecrets, [{ name: 'pullbridge-pull' }, { name: 'pullbridge-pull-vendor' }]);
      assert.deepEqual(patched.metadata.labels, { [UPSTREAM_PULL_SECRET_LABEL]: 'true', [REWRITTEN_LABEL]: 'true' });
      assert.deepEqual(JSON.parse(patched.metadata.annotations?.[ORIGINAL_IMAGES_ANNOTATION] ?? '{}'), { 'containers/side': 'registry.corp.example:5000/t/s:2' });
      assert.deepEqual(outcome.containers.map((c) => c.reason), ['pull-secret-only', 'rewritten']);
    });
    it('with only never images: the secret and the label, no rewritten label, no original-images annotation', () => {
      const only = podWith({ containers: [{ name: 'a', image: 'vendor.example:5000/app/a:1' }, { name: 'b', image: 'nginx:1' }], imagePullSecrets: [{ name: 'mine' }] }, { name: 'p', namespace: 'team-a', labels: { app: 'x' } });
      const outcome = admitPod(config, requestOf(reviewFor(only, { namespace: 'team-a' })));
      assert.equal(outcome.decision, 'mutated');
      assert.equal(outcome.pullSecret, null);
      const patched = applyPatch(only, outcome.patch) as unknown as PodShape;
      assert.deepEqual(patched.spec.imagePullSecrets, [{ name: 'mine' }, { name: 'pullbridge-pull-vendor' }], 'one secret per rule, however many images');
      assert.deepEqual(patched.metadata.labels, { app: 'x', [UPSTREAM_PULL_SECRET_LABEL]: 'true' });
      assert.equal(patched.metadata.annotations, undefined);
    });
    it('is idempotent: a Pod that lists the secret and has the label is left as it is', () => {
      const first = admitPod(config, requestOf(reviewFor(podWith({ containers: [{ name: 'a', image: 'vendor.example:5000/app/a:1' }] }, { name: 'p', namespace: 'team-a' }), { namespace: 'team-a' })));
      const again = applyPatch(podWith({ containers: [{ name: 'a', image: 'vendor.example:5000/app/a:1' }] }, { name: 'p', namespace: 'team-a' }), first.patch);
      const second = admitPod(config, requestOf(reviewFor(again, { namespace: 'team-a' })));
      assert.equal(second.decision, 'unchanged');
      assert.deepEqual(second.upstreamPullSecrets, ['pullbridge-pull-vendor'], 'the namespace still needs it');
    });
    it('outside the namespace filter: nothing added', () => {
      const outcome = admitPod(config, requestOf(reviewFor(podWith({ containers: [{ name: 'a', image: 'vendor.example:5000/app/a:1' }] }, { name: 'p', namespace: 'default' }), { namespace: 'default' })));
      assert.equal(outcome.decision, 'unchanged');
      assert.deepEqual(outcome.upstreamPullSecrets, []);
      assert.equal(outcome.containers[0]?.reason, 'namespace-not-allowed');
    });
    it('an ephemeral container on a Pod without the secret: left alone, with a warning (pull secrets cannot change)', () => {
      const old = podWith({ containers: [{ name: 'app', image: 'busybox' }] }, { name: 'p', namespace: 'team-a' });
      const updated = podWith({ containers: [{ name: 'app', image: 'busybox' }], ephemeralContainers: [{ name: 'dbg', image: 'vendor.example:5000/tools/dbg:1' }] }, { name: 'p', namespace: 'team-a' });
      const outcome = admitPod(config, requestOf(reviewFor(updated, { namespace: 'team-a', operation: 'UPDATE', subResource: 'ephemeralcontainers', oldObject: old })));
      assert.equal(outcome.decision, 'unchanged');
      assert.equal(outcome.containers[0]?.reason, 'pull-secret-missing-on-pod');
      assert.match(outcome.warnings[0] ?? '', /ephemeralContainers\/dbg image vendor\.example:5000\/tools\/dbg:1: pod does not list pull secret "pullbridge-pull-vendor"/);
      const listing = podWith({ containers: [{ name: 'app', image: 'busybox' }], ephemeralContainers: [{ name: 'dbg', image: 'vendor.example:5000/tools/dbg:1' }], imagePullSecrets: [{ name: 'pullbridge-pull-vendor' }] }, { name: 'p', namespace: 'team-a' });
      const ok = admitPod(config, requestOf(reviewFor(listing, { namespace: 'team-a', operation: 'UPDATE', subResource: 'ephemeralcontainers', oldObject: old })));
      assert.deepEqual([ok.decision, ok.containers[0]?.reason, ok.patch.length, ok.warnings.length], ['unchanged', 'pull-secret-only', 0, 0]);
    });
    it('when the secret cannot be provisioned and the Pod is admitted unchanged, the audit says so', () => {
      const outcome = admitPod(config, requestOf(reviewFor(pod(), { namespace: 'team-a' })));
      const left = leftUnchanged(outcome, 'boom');
      assert.deepEqual(left.containers.map((c) => c.reason), ['pull-secret-not-provisioned', 'pull-secret-not-provisioned']);
      assert.deepEqual(left.upstreamPullSecrets, []);
    });
  });

  describe('the Secret', () => {
    it('is named <pullSecretName>-<rule>, a DNS subdomain even from the longest names', () => {
      assert.equal(upstreamPullSecretName(config, { name: 'vendor' }), 'pullbridge-pull-vendor');
      const long = { webhook: { ...config.webhook, pullSecretName: `${'a'.repeat(60)}.${'b'.repeat(60)}.${'c'.repeat(60)}.${'d'.repeat(60)}` } };
      const name = upstreamPullSecretName(long, { name: 'r'.repeat(63) });
      assert.ok(name.length <= 253, `${name.length}`);
      assert.match(name, /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/);
      assert.ok(name.endsWith(`-${'r'.repeat(63)}`));
      assert.notEqual(upstreamPullSecretName(long, { name: 's'.repeat(63) }).slice(0, -63), name.slice(0, -63), 'the hash keeps names apart');
    });
    it('holds the credential under each match host, Docker Hub under its docker login key', () => {
      assert.equal(DOCKER_HUB_AUTH_KEY, 'https://index.docker.io/v1/');
      assert.deepEqual(['docker.io', 'registry-1.docker.io', 'Vendor.Example:5000'].map(dockerConfigKey), [DOCKER_HUB_AUTH_KEY, DOCKER_HUB_AUTH_KEY, 'vendor.example:5000']);
      const payload = JSON.parse(upstreamDockerConfigJson({ match: ['vendor.example:5000', 'docker.io'] }, { username: 'robot', password: 'p:w' })) as { auths: Record<string, { username: string; password: string; auth: string }> };
      assert.deepEqual(Object.keys(payload.auths), ['vendor.example:5000', DOCKER_HUB_AUTH_KEY]);
      assert.deepEqual(payload.auths['vendor.example:5000'], { username: 'robot', password: 'p:w', auth: Buffer.from('robot:p:w').toString('base64') });
    });
    it('is a dockerconfigjson Secret whose key id follows the credential', () => {
      const a = desiredUpstreamPullSecret({ name: 'vendor', match: ['vendor.example:5000'] }, 'team-a', 'pullbridge-pull-vendor', { username: 'robot', password: 'one' });
      const b = desiredUpstreamPullSecret({ name: 'vendor', match: ['vendor.example:5000'] }, 'team-a', 'pullbridge-pull-vendor', { username: 'robot', password: 'two' });
      assert.equal(a.type, 'kubernetes.io/dockerconfigjson');
      assert.notEqual(a.metadata?.annotations?.[KEY_ID_ANNOTATION], b.metadata?.annotations?.[KEY_ID_ANNOTATION]);
      assert.equal(reconcileAction({ secret: { ...a, metadata: { ...a.metadata, creationTimestamp: new Date(0) } }, served: true, referenced: true, now: 1, graceMs: 10, currentKey: b.metadata?.annotations?.[KEY_ID_ANNOTATION] }), 'refresh');
    });
    it('is deleted at once from a namespace the rule\'s filter no longer admits: no grace, though Pods list it', () => {
      const a = desiredUpstreamPullSecret({ name: 'vendor', match: ['vendor.example:5000'] }, 'team-a', 'pullbridge-pull-vendor', { username: 'robot', password: 'one' });
      const fresh = { ...a, metadata: { ...a.metadata, creationTimestamp: new Date(1_000) } };
      const facts = { secret: fresh, served: false, referenced: true, now: 1_001, graceMs: 600_000, currentKey: undefined };
      assert.equal(reconcileAction({ ...facts, refusedByRule: true }), 'delete');
      assert.equal(reconcileAction(facts), 'keep', 'otherwise (an opted-out namespace) the grace still holds');
    });
    it('is never written for a namespace the rule does not admit, whoever asks', () => {
      const credential = () => ({ username: 'robot', password: 'pw' });
      assert.throws(() => desiredSecret(config, 'default', 'pullbridge-pull-vendor', () => Buffer.alloc(32), credential), /rule "vendor" does not admit namespace "default"/);
      assert.equal(desiredSecret(config, 'team-a', 'pullbridge-pull-vendor', () => Buffer.alloc(32), credential).type, 'kubernetes.io/dockerconfigjson');
    });
    it('is kept by the reconciler beside the broker\'s', () => {
      assert.deepEqual(managedSecrets(config).map((s) => `${s.name} ${s.podLabel} ${s.rule?.name ?? '-'}`), ['pullbridge-pull pullbridge.io/rewritten -', 'pullbridge-pull-vendor pullbridge.io/upstream-pull-secret vendor']);
    });
  });

  describe('the command line', function () {
    this.timeout(60_000);
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-never-cli-'));
    const file = join(dir, 'config.yaml');
    writeFileSync(join(dir, 'broker.key'), 'a-broker-key-of-at-least-16-bytes\n');
    writeFileSync(join(dir, 'vendor.password'), 'vendor-s3cret\n');
    writeFileSync(file, NEVER_YAML.replace('/nonexistent/pullbridge/broker-key', join(dir, 'broker.key')).replace('/etc/pullbridge/shared-credentials/vendor.password', join(dir, 'vendor.password')));

    it('rewrite --json: rewritten null, the rule, reason pull-secret-only', () => {
      const result = runCli(['rewrite', '--config', file, '--namespace', 'team-a', '--json', 'vendor.example:5000/app/web:1']);
      assert.equal(result.status, 0, result.stderr);
      const [decision] = JSON.parse(result.stdout) as Array<Record<string, unknown>>;
      assert.deepEqual([decision?.image, decision?.rewritten, decision?.rule, decision?.reason], ['vendor.example:5000/app/web:1', null, 'vendor', 'pull-secret-only']);
    });

    it('pull-secret --rule prints the rule\'s dockerconfigjson; without --rule, the broker\'s as before', () => {
      const result = runCli(['pull-secret', '--config', file, '--namespace', 'team-a', '--rule', 'vendor']);
      assert.equal(result.status, 0, result.stderr);
      assert.deepEqual(JSON.parse(result.stdout), JSON.parse(upstreamDockerConfigJson({ match: ['vendor.example:5000', 'docker.io'] }, { username: 'robot', password: 'vendor-s3cret' })));
      const broker = runCli(['pull-secret', '--config', file, '--namespace', 'team-a']);
      assert.deepEqual(Object.keys((JSON.parse(broker.stdout) as { auths: object }).auths), ['localhost:30500']);
    });

    it('pull-secret --rule refuses a namespace the rule does not admit, a rule that rewrites, an unknown rule, each saying so', () => {
      const outside = runCli(['pull-secret', '--config', file, '--namespace', 'default', '--rule', 'vendor']);
      assert.deepEqual([outside.status, outside.stdout, outside.stderr.trim()], [1, '', 'rule "vendor" does not admit namespace "default": the webhook provisions no pull secret of it there']);
      const rewrites = runCli(['pull-secret', '--config', file, '--namespace', 'team-a', '--rule', 'corp']);
      assert.equal(rewrites.status, 2);
      assert.match(rewrites.stderr, /--rule: rule "corp" has rewrite: always; only a rewrite: never rule has a pull secret of its own/);
      const unknown = runCli(['pull-secret', '--config', file, '--namespace', 'team-a', '--rule', 'nope']);
      assert.equal(unknown.status, 2);
      assert.match(unknown.stderr, /--rule: no rule "nope" in /);
    });
  });
});
