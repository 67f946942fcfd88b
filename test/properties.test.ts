// Property-based tests (fast-check): random and mutated inputs never throw out of the pure core,
// never yield an invalid reference, and never yield a patch that fails to apply. Runs are bounded.

import assert from 'node:assert/strict';
import fc from 'fast-check';
import { parseRoute } from '../src/proxy/route.js';
import { formatReference, parseReference } from '../src/reference/reference.js';
import { decideImage } from '../src/rules/decide.js';
import { admitPod, parseAdmissionReview } from '../src/webhook/admission.js';
import { testConfig } from './support/config.js';
import { applyPatch, podWith, reviewFor } from './support/review.js';

const RUNS = { numRuns: Number(process.env.PROPERTY_RUNS ?? 300) };
const config = testConfig();

const component = fc.stringMatching(/^[a-z0-9]{1,8}([._-][a-z0-9]{1,6}){0,2}$/);
const host = fc.constantFrom('registry.corp.example:5000', 'REGISTRY-ALIAS.corp.example:5000', 'docker.io', 'index.docker.io', 'team.example', 'quay.io', 'localhost:5000', '[::1]:5000', '');
const tag = fc.option(fc.stringMatching(/^[A-Za-z0-9_][A-Za-z0-9._-]{0,20}$/), { nil: undefined });
const digest = fc.option(fc.stringMatching(/^[a-f0-9]{64}$/).map((h) => `sha256:${h}`), { nil: undefined });
/** References built from the grammar, some valid, with every host shape the rules care about. */
const reference = fc.tuple(host, fc.array(component, { minLength: 1, maxLength: 4 }), tag, digest).map(([h, path, t, d]) => `${h ? `${h}/` : ''}${path.join('/')}${t ? `:${t}` : ''}${d ? `@${d}` : ''}`);
/** Valid references with random damage: a character inserted, removed or replaced. */
const mutated = fc.tuple(reference, fc.nat(), fc.constantFrom('', 'A', '/', ':', '@', '..', ' ', '%2F', '\u0000', 'é')).map(([ref, at, insert]) => {
  const i = at % (ref.length + 1);
  return ref.slice(0, i) + insert + ref.slice(i + (insert === '' ? 1 : 0));
});
const anyImage = fc.oneof(reference, mutated, fc.string(), fc.string({ unit: 'grapheme', maxLength: 40 }));

describe('properties (fast-check)', () => {
  it('the reference parser never throws, and what it accepts round-trips', () => {
    fc.assert(
      fc.property(anyImage, (input) => {
        const result = parseReference(input);
        if (!result.ok) return typeof result.error === 'string' && result.error.length > 0;
        const again = parseReference(formatReference(result.reference));
        return again.ok && JSON.stringify(again.reference) === JSON.stringify(result.reference);
      }),
      RUNS,
    );
  });

  it('a rewrite is always a valid reference on the proxy that keeps tag and digest', () => {
    fc.assert(
      fc.property(anyImage, fc.constantFrom(undefined, 'default', 'team-a', 'kube-system'), (image, namespace) => {
        const decision = decideImage(config, image, namespace);
        if (decision.rewritten === null) return true;
        const before = parseReference(image);
        const after = parseReference(decision.rewritten);
        assert.ok(before.ok && after.ok, decision.rewritten);
        assert.equal(after.reference.domain, config.proxyAuthority);
        assert.equal(after.reference.tag, before.reference.tag);
        assert.equal(after.reference.digest, before.reference.digest);
        assert.ok(`${after.reference.domain}/${after.reference.path}`.length <= 255);
        assert.equal(decideImage(config, decision.rewritten, namespace).reason, 'already-proxied');
        return true;
      }),
      RUNS,
    );
  });

  it('admission never throws, its patch always applies, and a second pass changes nothing', () => {
    const container = fc.record({ name: component, image: anyImage });
    const pod = fc.record({
      containers: fc.uniqueArray(container, { minLength: 1, maxLength: 5, selector: (c) => c.name }),
      initContainers: fc.option(fc.uniqueArray(container, { maxLength: 2, selector: (c) => c.name }), { nil: undefined }),
      imagePullSecrets: fc.option(fc.array(fc.record({ name: fc.constantFrom('pullbridge-pull', 'other') }), { maxLength: 2 }), { nil: undefined }),
      labels: fc.option(fc.dictionary(fc.constantFrom('app', 'pullbridge.io/rewritten', 'x/y~z'), fc.constantFrom('true', 'web')), { nil: undefined }),
      annotations: fc.option(fc.dictionary(fc.constantFrom('a', 'pullbridge.io/original-images'), fc.constantFrom('{}', 'not json', '{"containers/x":"y"}')), { nil: undefined }),
    });
    fc.assert(
      fc.property(pod, fc.constantFrom('default', 'team-a'), (p, namespace) => {
        const object = podWith(
          { containers: p.containers, ...(p.initContainers ? { initContainers: p.initContainers } : {}), ...(p.imagePullSecrets ? { imagePullSecrets: p.imagePullSecrets } : {}) },
          { name: 'p', ...(p.labels ? { labels: p.labels } : {}), ...(p.annotations ? { annotations: p.annotations } : {}) },
        );
        const parsed = parseAdmissionReview(reviewFor(object, { namespace }));
        assert.ok(parsed.ok);
        const first = admitPod(config, parsed.request);
        const patched = applyPatch(object, first.patch);
        for (const c of (patched as { spec: { containers: Array<{ image: string }> } }).spec.containers) {
          const original = p.containers.find((o) => o.image === c.image);
          assert.ok(original || parseReference(c.image).ok, `invalid rewritten image ${c.image}`);
        }
        const second = parseAdmissionReview(reviewFor(patched, { namespace }));
        assert.ok(second.ok);
        assert.deepEqual(admitPod(config, second.request).patch, []);
        return true;
      }),
      RUNS,
    );
  });

  it('the AdmissionReview parser answers any JSON with a result, never an exception', () => {
    fc.assert(
      fc.property(fc.oneof(fc.jsonValue(), fc.record({ apiVersion: fc.constant('admission.k8s.io/v1'), kind: fc.constant('AdmissionReview'), request: fc.jsonValue() })), (body) => {
        const parsed = parseAdmissionReview(body);
        if (parsed.ok) admitPod(config, parsed.request);
        return true;
      }),
      RUNS,
    );
  });

  it('proxy routing never throws and never routes dot segments or percent-encoding', () => {
    const path = fc.oneof(
      fc.string(),
      fc.array(fc.oneof(component, fc.constantFrom('..', '.', '%2e%2e', '%2F', 'manifests', 'blobs', 'tags', 'list', '', 'sha256:abc')), { maxLength: 8 }).map((parts) => `/v2/${parts.join('/')}`),
    );
    fc.assert(
      fc.property(fc.constantFrom('GET', 'HEAD', 'PUT', 'CONNECT'), path, (method, target) => {
        const routed = parseRoute(method, target);
        if (routed.ok && routed.route.kind !== 'base') {
          const pathOnly = target.split('?')[0] ?? '';
          assert.ok(!pathOnly.includes('%') && !/\/\.\.?(\/|$)/.test(pathOnly), target);
          assert.ok(method === 'GET' || method === 'HEAD');
        }
        return true;
      }),
      RUNS,
    );
  });
});
