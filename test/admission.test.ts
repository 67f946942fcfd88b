import assert from 'node:assert/strict';
import { ORIGINAL_IMAGES_ANNOTATION, REWRITTEN_LABEL } from '../src/rules/marks.js';
import { ADMISSION_BODY_LIMIT_BYTES, MAX_CONTAINERS, TOTAL_ANNOTATION_SIZE_LIMIT_BYTES, admitPod, annotationBytes, parseAdmissionReview, type AdmissionRequest } from '../src/webhook/admission.js';
import { SHA, testConfig } from './support/config.js';
import { applyPatch, podWith, reviewFor, type PodShape } from './support/review.js';

const config = testConfig();

function requestOf(review: Record<string, unknown>): AdmissionRequest {
  const parsed = parseAdmissionReview(review);
  assert.ok(parsed.ok, parsed.ok ? '' : parsed.error);
  return parsed.request;
}

function admit(pod: Record<string, unknown>, options: Parameters<typeof reviewFor>[1] = {}, namespaceLabels?: Record<string, string>) {
  return admitPod(config, requestOf(reviewFor(pod, options)), namespaceLabels ? { namespaceLabels } : {});
}

const mixedPod = () =>
  podWith({
    initContainers: [{ name: 'init', image: 'registry.corp.example:5000/team/migrate:2' }],
    containers: [
      { name: 'app', image: `registry.corp.example:5000/team/app:1.2@${SHA}` },
      { name: 'web', image: 'nginx:1.27' },
      { name: 'other', image: 'quay.io/x/y:1' },
      { name: 'bad', image: 'registry.corp.example:5000/Bad' },
    ],
    imagePullSecrets: [{ name: 'existing' }],
  });

describe('admission decision (pure)', () => {
  it('rewrites every matching container and init container, adds the pull secret, annotation and label', () => {
    const pod = mixedPod();
    const outcome = admit(pod);
    assert.equal(outcome.decision, 'mutated');
    assert.equal(outcome.pullSecret, 'pullbridge-pull');
    const patched = applyPatch(pod, outcome.patch) as unknown as PodShape;
    assert.equal(patched.spec.initContainers?.[0]?.image, 'localhost:30500/corp/team/migrate:2');
    assert.deepEqual(patched.spec.containers.map((c) => c.image), [
      `localhost:30500/corp/team/app:1.2@${SHA}`,
      'localhost:30500/hub/library/nginx:1.27',
      'quay.io/x/y:1',
      'registry.corp.example:5000/Bad',
    ]);
    assert.deepEqual(patched.spec.imagePullSecrets, [{ name: 'existing' }, { name: 'pullbridge-pull' }]);
    assert.deepEqual(JSON.parse(patched.metadata.annotations?.[ORIGINAL_IMAGES_ANNOTATION] ?? '{}'), {
      'initContainers/init': 'registry.corp.example:5000/team/migrate:2',
      'containers/app': `registry.corp.example:5000/team/app:1.2@${SHA}`,
      'containers/web': 'nginx:1.27',
    });
    assert.equal(patched.metadata.labels?.[REWRITTEN_LABEL], 'true');
    const reasons = Object.fromEntries(outcome.containers.map((c) => [c.container, c.reason]));
    assert.deepEqual(reasons, {
      'initContainers/init': 'rewritten',
      'containers/app': 'rewritten',
      'containers/web': 'rewritten',
      'containers/other': 'no-matching-rule',
      'containers/bad': 'invalid-reference',
    });
    assert.equal(outcome.warnings.length, 1);
    assert.match(outcome.warnings[0] ?? '', /containers\/bad .* left unchanged: .*lower case/);
  });

  it('is idempotent: a second pass over its own output changes nothing', () => {
    const pod = mixedPod();
    const once = applyPatch(pod, admit(pod).patch);
    const again = admit(once);
    assert.equal(again.decision, 'unchanged');
    assert.deepEqual(again.patch, []);
    assert.equal(again.containers.filter((c) => c.reason === 'already-proxied').length, 3);
  });

  it('does not add a pull secret the Pod already lists', () => {
    const pod = podWith({ containers: [{ name: 'a', image: 'registry.corp.example:5000/t/a:1' }], imagePullSecrets: [{ name: 'pullbridge-pull' }] });
    const patched = applyPatch(pod, admit(pod).patch) as unknown as PodShape;
    assert.deepEqual(patched.spec.imagePullSecrets, [{ name: 'pullbridge-pull' }]);
  });

  it('creates imagePullSecrets, annotations and labels when absent, and escapes their keys', () => {
    const pod = { apiVersion: 'v1', kind: 'Pod', metadata: { name: 'bare' }, spec: { containers: [{ name: 'a', image: 'registry.corp.example:5000/t/a:1' }] } };
    const outcome = admit(pod);
    assert.ok(outcome.patch.some((op) => op.path === '/spec/imagePullSecrets'));
    const patched = applyPatch(pod, outcome.patch) as unknown as PodShape;
    assert.deepEqual(patched.spec.imagePullSecrets, [{ name: 'pullbridge-pull' }]);
    assert.deepEqual(Object.keys(patched.metadata.annotations ?? {}), [ORIGINAL_IMAGES_ANNOTATION]);
    const withAnnotations = { ...pod, metadata: { name: 'x', annotations: { keep: 'me' }, labels: { app: 'a' } } };
    const ops = admit(withAnnotations).patch;
    assert.ok(ops.some((op) => op.path === '/metadata/annotations/pullbridge.io~1original-images'));
    const patched2 = applyPatch(withAnnotations, ops) as unknown as PodShape;
    assert.equal(patched2.metadata.annotations?.keep, 'me');
    assert.deepEqual(patched2.metadata.labels, { app: 'a', [REWRITTEN_LABEL]: 'true' });
  });

  it('needs no pull secret when only anonymous or passthrough rules apply', () => {
    const pod = podWith({ containers: [{ name: 'a', image: 'nginx' }, { name: 'b', image: 'registry.corp.example:5000/legacy/x:1' }] });
    const outcome = admit(pod);
    assert.equal(outcome.decision, 'mutated');
    assert.equal(outcome.pullSecret, null);
    assert.ok(!outcome.patch.some((op) => op.path.startsWith('/spec/imagePullSecrets')));
  });

  it('merges with an earlier original-images annotation on reinvocation', () => {
    const pod = podWith(
      { containers: [{ name: 'a', image: 'localhost:30500/corp/t/a:1' }, { name: 'b', image: 'registry.corp.example:5000/t/b:1' }], imagePullSecrets: [{ name: 'pullbridge-pull' }] },
      { name: 'p', annotations: { [ORIGINAL_IMAGES_ANNOTATION]: JSON.stringify({ 'containers/a': 'registry.corp.example:5000/t/a:1' }) }, labels: { [REWRITTEN_LABEL]: 'true' } },
    );
    const patched = applyPatch(pod, admit(pod).patch) as unknown as PodShape;
    assert.deepEqual(JSON.parse(patched.metadata.annotations?.[ORIGINAL_IMAGES_ANNOTATION] ?? ''), {
      'containers/a': 'registry.corp.example:5000/t/a:1',
      'containers/b': 'registry.corp.example:5000/t/b:1',
    });
  });

  it('honours opt-out labels on the Pod and its namespace', () => {
    const pod = podWith({ containers: [{ name: 'a', image: 'nginx' }] }, { name: 'p', labels: { 'pullbridge.io/ignore': 'true' } });
    assert.equal(admit(pod).skipReason, 'pod-opted-out');
    const plain = podWith({ containers: [{ name: 'a', image: 'nginx' }] });
    assert.equal(admit(plain, {}, { 'pullbridge.io/ignore': 'true' }).skipReason, 'namespace-opted-out');
    assert.equal(admit(plain, {}, { 'pullbridge.io/ignore': 'false' }).decision, 'mutated');
  });

  it('never touches kube-system, its own namespace or excluded namespaces', () => {
    const pod = podWith({ containers: [{ name: 'a', image: 'nginx' }] });
    for (const namespace of ['kube-system', 'pullbridge', 'infra']) {
      const outcome = admit(pod, { namespace });
      assert.equal(outcome.skipReason, 'namespace-excluded', namespace);
      assert.deepEqual(outcome.patch, []);
    }
  });

  it('applies namespace filters of rules', () => {
    const pod = podWith({ containers: [{ name: 'a', image: 'team.example/apps/web:1' }] });
    assert.equal(admit(pod, { namespace: 'other' }).decision, 'unchanged');
    assert.equal(admit(pod, { namespace: 'team-a' }).decision, 'mutated');
  });

  it('ignores other kinds and operations', () => {
    assert.equal(admit({ kind: 'Deployment' }, { kind: 'Deployment', resource: 'deployments' }).skipReason, 'not-a-pod');
    assert.equal(admit(mixedPod(), { operation: 'UPDATE', oldObject: mixedPod() }).skipReason, 'no-image-changed');
    assert.equal(admit(mixedPod(), { operation: 'UPDATE', subResource: 'status', oldObject: mixedPod() }).skipReason, 'operation-not-handled');
    assert.equal(admit(mixedPod(), { operation: 'DELETE' }).skipReason, 'operation-not-handled');
    assert.equal(admit(mixedPod(), { operation: 'CREATE', subResource: 'binding' }).skipReason, 'operation-not-handled');
  });

  it('skips a malformed Pod object unchanged, saying why', () => {
    const outcome = admit({ kind: 'Pod', spec: { containers: 'nope' } });
    assert.equal(outcome.skipReason, 'malformed-pod');
    assert.match(outcome.detail ?? '', /spec\.containers/);
    assert.equal(admit({ kind: 'Pod' }).skipReason, 'malformed-pod');
  });

  it('adds the original-images annotation only while all annotations stay within the apiserver\'s limit', () => {
    const images = ['registry.corp.example:5000/team/app:1', 'registry.corp.example:5000/team/web:2'];
    const value = JSON.stringify({ 'containers/c0': images[0], 'containers/c1': images[1] });
    const own = (bytes: number) => ({ 'example.com/notes': 'n'.repeat(bytes - 'example.com/notes'.length) });
    const podWithAnnotations = (annotations: Record<string, string>) =>
      podWith({ containers: images.map((image, i) => ({ name: `c${i}`, image })) }, { name: 'web', namespace: 'default', annotations });
    const room = TOTAL_ANNOTATION_SIZE_LIMIT_BYTES - ORIGINAL_IMAGES_ANNOTATION.length - value.length;

    // Exactly at the limit: added.
    const atLimit = podWithAnnotations(own(room));
    const fits = admit(atLimit);
    const patched = applyPatch(atLimit, fits.patch) as unknown as PodShape;
    assert.equal(patched.metadata.annotations?.[ORIGINAL_IMAGES_ANNOTATION], value);
    assert.equal(annotationBytes(patched.metadata.annotations ?? {}), TOTAL_ANNOTATION_SIZE_LIMIT_BYTES);
    assert.equal(fits.originalImagesOmitted, undefined);
    assert.deepEqual(fits.warnings, []);

    // One byte over: the images are still rewritten, the annotation is left out, and the user is told.
    const ownOver = own(room + 1);
    const over = podWithAnnotations(ownOver);
    const omitted = admit(over);
    assert.equal(omitted.decision, 'mutated');
    const rewritten = applyPatch(over, omitted.patch) as unknown as PodShape;
    assert.deepEqual(rewritten.spec.containers.map((c) => c.image), ['localhost:30500/corp/team/app:1', 'localhost:30500/corp/team/web:2']);
    assert.deepEqual(rewritten.spec.imagePullSecrets, [{ name: 'pullbridge-pull' }]);
    assert.equal(rewritten.metadata.labels?.[REWRITTEN_LABEL], 'true');
    assert.deepEqual(rewritten.metadata.annotations, ownOver);
    assert.equal(omitted.originalImagesOmitted, `the Pod's annotations would total ${TOTAL_ANNOTATION_SIZE_LIMIT_BYTES + 1} bytes, more than the apiserver's limit of ${TOTAL_ANNOTATION_SIZE_LIMIT_BYTES}`);
    assert.equal(omitted.warnings.length, 1);
    assert.match(omitted.warnings[0] ?? '', /^pullbridge: annotation pullbridge\.io\/original-images not added: .*262145 bytes.*images are rewritten/);

    // Bytes, not characters: a multi-byte annotation value counts as the apiserver counts it.
    const wide = podWithAnnotations({ 'example.com/notes': 'é'.repeat(Math.ceil((room - 'example.com/notes'.length) / 2) + 1) });
    assert.ok(admit(wide).originalImagesOmitted);
  });

  it('processes as many containers as an AdmissionReview within the body limit can hold, and no more', () => {
    // The smallest container the apiserver serialises, repeated up to the body limit.
    const containers = (n: number) => Array.from({ length: n }, (_, i) => ({ name: `c${i}`, image: `registry.corp.example:5000/team/app${i}:1`, resources: {}, terminationMessagePath: '/', terminationMessagePolicy: 'File', imagePullPolicy: 'Never' }));
    const most = admit(podWith({ initContainers: containers(1), containers: containers(MAX_CONTAINERS - 1) }));
    assert.equal(most.decision, 'mutated');
    assert.equal(most.containers.length, MAX_CONTAINERS);
    const tooMany = admit(podWith({ initContainers: containers(1), containers: containers(MAX_CONTAINERS) }));
    assert.equal(tooMany.decision, 'skipped');
    assert.equal(tooMany.skipReason, 'too-many-containers');
    assert.deepEqual(tooMany.patch, []);
    assert.ok(MAX_CONTAINERS * 129 <= ADMISSION_BODY_LIMIT_BYTES && (MAX_CONTAINERS + 1) * 129 > ADMISSION_BODY_LIMIT_BYTES);
  });

  describe('ephemeral containers (UPDATE pods/ephemeralcontainers)', () => {
    const running = (ephemeral: Array<{ name: string; image: string }>, pullSecrets = [{ name: 'pullbridge-pull' }]) =>
      podWith({ containers: [{ name: 'app', image: 'localhost:30500/corp/t/app:1' }], imagePullSecrets: pullSecrets, ephemeralContainers: ephemeral });

    it('rewrites only the newly added ephemeral container and nothing else', () => {
      const old = running([{ name: 'dbg1', image: 'registry.corp.example:5000/t/debug:1' }]);
      const pod = running([{ name: 'dbg1', image: 'registry.corp.example:5000/t/debug:1' }, { name: 'dbg2', image: 'registry.corp.example:5000/t/debug:2' }]);
      const outcome = admit(pod, { operation: 'UPDATE', subResource: 'ephemeralcontainers', oldObject: old });
      assert.equal(outcome.decision, 'mutated');
      assert.deepEqual(outcome.patch, [{ op: 'replace', path: '/spec/ephemeralContainers/1/image', value: 'localhost:30500/corp/t/debug:2' }]);
      assert.equal(outcome.containers.find((c) => c.container === 'ephemeralContainers/dbg1')?.reason, 'existing-ephemeral-container');
    });

    it('leaves a broker image unchanged when the running Pod lacks the pull secret', () => {
      const pod = running([{ name: 'dbg', image: 'registry.corp.example:5000/t/debug:1' }], []);
      const outcome = admit(pod, { operation: 'UPDATE', subResource: 'ephemeralcontainers', oldObject: running([], []) });
      assert.equal(outcome.decision, 'unchanged');
      assert.equal(outcome.containers[0]?.reason, 'pull-secret-missing-on-pod');
      assert.equal(outcome.warnings.length, 1);
      // An anonymous rule needs no secret, so it is still rewritten.
      const hub = admit(running([{ name: 'dbg', image: 'busybox' }], []), { operation: 'UPDATE', subResource: 'ephemeralcontainers', oldObject: running([], []) });
      assert.equal(hub.decision, 'mutated');
    });
  });
});

describe('AdmissionReview envelope', () => {
  const cases: Array<[string, unknown, RegExp]> = [
    ['not an object', [1, 2], /must be a JSON AdmissionReview object/],
    ['null', null, /must be a JSON AdmissionReview object/],
    ['wrong apiVersion', { ...reviewFor({}), apiVersion: 'admission.k8s.io/v1beta1' }, /apiVersion: apiVersion must be "admission.k8s.io\/v1"/],
    ['wrong kind', { ...reviewFor({}), kind: 'Pod' }, /kind: kind must be "AdmissionReview"/],
    ['missing request', { apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview' }, /request: request is required/],
    ['missing uid', { apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview', request: { ...(reviewFor({}).request as object), uid: undefined } }, /request\.uid/],
    ['empty uid', { apiVersion: 'admission.k8s.io/v1', kind: 'AdmissionReview', request: { ...(reviewFor({}).request as object), uid: '' } }, /request\.uid: must not be empty/],
  ];
  for (const [name, body, pattern] of cases) {
    it(`rejects ${name}`, () => {
      const parsed = parseAdmissionReview(body);
      assert.equal(parsed.ok, false);
      if (!parsed.ok) assert.match(parsed.error, pattern);
    });
  }
});
