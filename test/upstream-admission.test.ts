// Admission decisions that ask the upstream: the pure decision over an AnswerBook (every branch of
// rewrite: private-only, pinDigest and verify, and a ReplicaSet's pins), then the orchestrator
// against a real registry (docker-registry through test/support/directview.ts) and a real server
// that never answers. The signature check is a stub here (the cosign verifier is another module):
// these tests are about what admission does with its answer.

import assert from 'node:assert/strict';
import net from 'node:net';
import { parsePins } from '../src/k8s/replicasets.js';
import { PINNED_DIGESTS_ANNOTATION, ORIGINAL_IMAGES_ANNOTATION, REWRITTEN_LABEL } from '../src/rules/marks.js';
import { admitPod, admitReplicaSet, admitReplicaSetUpdate, NO_UPSTREAM, parseAdmissionReview, type AdmissionOutcome, type AdmissionRequest } from '../src/webhook/admission.js';
import supertest from 'supertest';
import { createMetricsRegistry } from '../src/metrics.js';
import { createWebhookApp } from '../src/webhook/server.js';
import { MAX_QUESTIONS_PER_REVIEW, budgetFor, decideWithUpstream, type SignatureCheck } from '../src/webhook/upstream.js';
import { AnswerBook, digestKey, probeKey, replicaSetKey, signatureKey, type UpstreamQuestion } from '../src/webhook/upstreamplan.js';
import { configFrom } from './support/config.js';
import { directRegistryView } from './support/directview.js';
import { ProxyTierView } from '../src/webhook/proxytier.js';
import { memoryLogger } from './support/logs.js';
import { buildImage } from './support/oci.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';
import { applyPatch, podWith, reviewFor, type PodShape } from './support/review.js';

const D1 = `sha256:${'1'.repeat(64)}`;
const D2 = `sha256:${'2'.repeat(64)}`;

const config = configFrom(`
proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [/nonexistent/broker.key]}
registries:
  - {name: priv, match: [priv.example], upstream: "https://127.0.0.1:5000", rewrite: private-only}
  - {name: privleave, match: [privleave.example], upstream: "https://127.0.0.1:5000", rewrite: private-only, onProbeFailure: leave}
  - {name: pin, match: [pin.example], upstream: "https://127.0.0.1:5000", pinDigest: true}
  - {name: pinleave, match: [pinleave.example], upstream: "https://127.0.0.1:5000", pinDigest: true, onProbeFailure: leave}
  - {name: pubpin, match: [pubpin.example], upstream: "https://127.0.0.1:5000", rewrite: private-only, pinDigest: true}
  - {name: signed, match: [signed.example], upstream: "https://127.0.0.1:5001", verify: {cosign: {publicKeyFiles: [/keys/a.pub]}}}
  - {name: signedwarn, match: [signedwarn.example], upstream: "https://127.0.0.1:5002", verify: {cosign: {publicKeyFiles: [/keys/a.pub]}, onFailure: warn}}
  - {name: plain, match: [plain.example], upstream: "https://127.0.0.1:5000"}
  # Same upstream as signed, no verify of its own: what signed verifies, it serves under signed's verify.
  - {name: corp, match: [corp.example], upstream: "https://127.0.0.1:5001"}
`);

function requestOf(review: Record<string, unknown>): AdmissionRequest {
  const parsed = parseAdmissionReview(review);
  assert.ok(parsed.ok, parsed.ok ? '' : parsed.error);
  return parsed.request;
}

const podOf = (images: string[], metadata: Record<string, unknown> = { name: 'web', namespace: 'team' }) => podWith({ containers: images.map((image, i) => ({ name: `c${i}`, image })) }, metadata);
const podRequest = (images: string[], metadata?: Record<string, unknown>) => requestOf(reviewFor(podOf(images, metadata), { namespace: 'team' }));

/** Decides with the answers `fill` puts in the book, returning the questions of the first pass too. */
function decide(images: string[], fill: (book: AnswerBook) => void = () => {}, metadata?: Record<string, unknown>): { first: readonly UpstreamQuestion[]; outcome: AdmissionOutcome; pod: PodShape } {
  const request = podRequest(images, metadata);
  const first = admitPod(config, request, { answers: new AnswerBook() }).questions;
  const book = new AnswerBook();
  fill(book);
  const outcome = admitPod(config, request, { answers: book });
  return { first, outcome, pod: applyPatch(podOf(images, metadata), outcome.patch) as unknown as PodShape };
}

const probe = (rule: string, repository: string, reference: string) => probeKey({ rule, repository, reference });
const digestOf = (rule: string, repository: string, reference: string) => digestKey({ rule, repository, reference, namespace: 'team' });
const signatureOf = (rule: string, repository: string, digest: string) => signatureKey({ rule, repository, digest, namespace: 'team' });

describe('upstream-aware admission (pure decision over an AnswerBook)', () => {
  it('asks nothing for rules without upstream keys: the decision is the image string\'s', () => {
    const outcome = admitPod(config, podRequest(['plain.example/app:1']), { answers: new AnswerBook() });
    assert.deepEqual(outcome.questions, []);
    assert.equal(outcome.decision, 'mutated');
    assert.equal(outcome.containers[0]?.rewritten, 'localhost:30500/plain/app:1');
    assert.equal(outcome.containers[0]?.upstream, undefined);
  });

  describe('rewrite: private-only', () => {
    it('asks one anonymous probe per repository and reference, however many containers name it', () => {
      const { first } = decide(['priv.example/app:1', 'priv.example/app:1', 'priv.example/other@' + D1]);
      assert.deepEqual(first.map((q) => q.kind === 'probe' && `${q.target.repository}:${q.target.reference}`), ['app:1', `other:${D1}`]);
    });

    for (const status of [401, 403]) {
      it(`rewrites an image whose anonymous HEAD is refused (${status}), saying it is private`, () => {
        const { outcome, pod } = decide(['priv.example/app:1'], (b) => b.probes.set(probe('priv', 'app', '1'), { kind: 'answered', status }));
        assert.equal(pod.spec.containers[0]?.image, 'localhost:30500/priv/app:1');
        assert.equal(outcome.containers[0]?.reason, 'rewritten');
        assert.match(outcome.containers[0]?.detail ?? '', new RegExp(`private.*${status}`));
        assert.deepEqual(outcome.containers[0]?.upstream?.probe, { outcome: 'private', status });
        assert.equal(outcome.pullSecret, 'pullbridge-pull');
      });
    }

    it('leaves a public image (200) for the node to pull directly: reason public-image, no patch, no pull secret', () => {
      const { outcome } = decide(['priv.example/app:1'], (b) => b.probes.set(probe('priv', 'app', '1'), { kind: 'answered', status: 200 }));
      assert.equal(outcome.decision, 'unchanged');
      assert.deepEqual(outcome.patch, []);
      assert.equal(outcome.containers[0]?.reason, 'public-image');
      assert.equal(outcome.containers[0]?.rewritten, null);
      assert.deepEqual(outcome.containers[0]?.upstream?.probe, { outcome: 'public', status: 200 });
      assert.deepEqual(outcome.warnings, []);
    });

    it('onProbeFailure: rewrite (default) rewrites on any other answer or none, saying the probe failed', () => {
      for (const answer of [{ kind: 'answered' as const, status: 500 }, { kind: 'answered' as const, status: 404 }, { kind: 'failed' as const, error: 'connect ECONNREFUSED' }]) {
        const { outcome, pod } = decide(['priv.example/app:1'], (b) => b.probes.set(probe('priv', 'app', '1'), answer));
        assert.equal(pod.spec.containers[0]?.image, 'localhost:30500/priv/app:1');
        assert.equal(outcome.containers[0]?.reason, 'rewritten');
        assert.match(outcome.containers[0]?.detail ?? '', /probe failed.*onProbeFailure: rewrite/);
        assert.equal(outcome.containers[0]?.upstream?.probe?.outcome, 'failed');
      }
    });

    it('onProbeFailure: leave leaves the image, with reason probe-failed and a warning', () => {
      const { outcome } = decide(['privleave.example/app:1'], (b) => b.probes.set(probe('privleave', 'app', '1'), { kind: 'failed', error: 'timeout' }));
      assert.equal(outcome.decision, 'unchanged');
      assert.equal(outcome.containers[0]?.reason, 'probe-failed');
      assert.match(outcome.warnings.join('\n'), /containers\/c0 image privleave\.example\/app:1 left unchanged: the anonymous probe failed \(timeout\); onProbeFailure: leave/);
    });

    it('without anyone to ask (no proxy tier), a missing answer is a failed probe', () => {
      const outcome = admitPod(config, podRequest(['priv.example/app:1', 'privleave.example/app:1']));
      assert.deepEqual(outcome.questions, []);
      assert.equal(outcome.containers[0]?.reason, 'rewritten');
      assert.match(outcome.containers[0]?.upstream?.probe?.error ?? '', /no access to the proxy tier/);
      assert.equal(outcome.containers[1]?.reason, 'probe-failed');
    });
  });

  describe('pinDigest', () => {
    it('resolves the tag in the Pod\'s namespace and writes tag@digest; the annotation keeps what was asked', () => {
      const { first, outcome, pod } = decide(['pin.example/team/app:1'], (b) => b.digests.set(digestOf('pin', 'team/app', '1'), { kind: 'found', digest: D1, mediaType: 'application/vnd.oci.image.index.v1+json' }));
      assert.deepEqual(first, [{ kind: 'digest', key: digestOf('pin', 'team/app', '1'), target: { rule: 'pin', repository: 'team/app', reference: '1', namespace: 'team' } }]);
      assert.equal(pod.spec.containers[0]?.image, `localhost:30500/pin/team/app:1@${D1}`);
      assert.deepEqual(JSON.parse(pod.metadata.annotations?.[ORIGINAL_IMAGES_ANNOTATION] ?? '{}'), { 'containers/c0': 'pin.example/team/app:1' });
      assert.deepEqual(outcome.containers[0]?.upstream?.digest, { digest: D1, source: 'resolved', pinned: true });
      assert.equal(outcome.containers[0]?.image, 'pin.example/team/app:1');
    });

    it('never re-resolves an image that has a digest already', () => {
      const { first, pod } = decide([`pin.example/team/app:1@${D2}`]);
      assert.deepEqual(first, []);
      assert.equal(pod.spec.containers[0]?.image, `localhost:30500/pin/team/app:1@${D2}`);
    });

    it('a failed resolution with onProbeFailure: rewrite rewrites without a pin, and warns', () => {
      const { outcome, pod } = decide(['pin.example/team/app:1'], (b) => b.digests.set(digestOf('pin', 'team/app', '1'), { kind: 'refused', status: 404, error: 'upstream answered 404' }));
      assert.equal(pod.spec.containers[0]?.image, 'localhost:30500/pin/team/app:1');
      assert.match(outcome.warnings.join('\n'), /containers\/c0 image pin\.example\/team\/app:1 not pinned: .*404/);
      assert.deepEqual(outcome.containers[0]?.upstream?.digest, { error: 'upstream answered 404' });
    });

    it('a failed resolution with onProbeFailure: leave leaves the image unchanged, reason pin-failed, and warns', () => {
      const { outcome } = decide(['pinleave.example/team/app:1'], (b) => b.digests.set(digestOf('pinleave', 'team/app', '1'), { kind: 'failed', error: 'no answer' }));
      assert.equal(outcome.decision, 'unchanged');
      assert.equal(outcome.containers[0]?.reason, 'pin-failed');
      assert.match(outcome.warnings.join('\n'), /left unchanged: the tag could not be resolved/);
    });

    it('pins a public image left unrewritten by private-only too, and gives it no pull secret', () => {
      const { outcome, pod } = decide(['pubpin.example/lib/app:2'], (b) => {
        b.probes.set(probe('pubpin', 'lib/app', '2'), { kind: 'answered', status: 200 });
        b.digests.set(digestOf('pubpin', 'lib/app', '2'), { kind: 'found', digest: D2, mediaType: 'x' });
      });
      assert.equal(pod.spec.containers[0]?.image, `pubpin.example/lib/app:2@${D2}`);
      assert.equal(outcome.containers[0]?.reason, 'public-image');
      assert.equal(outcome.pullSecret, null);
      assert.equal(pod.spec.imagePullSecrets, undefined);
      // Pinned, not pulled through the proxy: not labelled rewritten (trial 22).
      assert.equal(pod.metadata?.labels?.[REWRITTEN_LABEL], undefined);
    });

    describe('a Pod of a ReplicaSet', () => {
      const owned = { name: 'web-abc', namespace: 'team', ownerReferences: [{ apiVersion: 'apps/v1', kind: 'ReplicaSet', name: 'web-7d9', uid: 'rs-uid-1', controller: true }] };
      const rsKey = replicaSetKey('team', 'rs-uid-1');

      it('asks the ReplicaSet first, and takes its pin without resolving', () => {
        const request = podRequest(['pin.example/team/app:1'], owned);
        const book = new AnswerBook();
        const first = admitPod(config, request, { answers: book });
        assert.deepEqual(first.questions, [{ kind: 'replicaset', key: rsKey, namespace: 'team', name: 'web-7d9', uid: 'rs-uid-1' }]);
        book.replicaSets.set(rsKey, { kind: 'found', pins: { 'pin.example/team/app:1': D2 } });
        const outcome = admitPod(config, request, { answers: book });
        assert.deepEqual(outcome.questions, []);
        assert.equal(outcome.containers[0]?.rewritten, `localhost:30500/pin/team/app:1@${D2}`);
        assert.deepEqual(outcome.containers[0]?.upstream?.digest, { digest: D2, source: 'replicaset', pinned: true });
      });

      it('resolves itself (audited as resolved) when the ReplicaSet has no pin for the image', () => {
        const { outcome } = decide(['pin.example/team/app:1'], (b) => {
          b.replicaSets.set(rsKey, { kind: 'none', detail: 'created before pullbridge' });
          b.digests.set(digestOf('pin', 'team/app', '1'), { kind: 'found', digest: D1, mediaType: 'x' });
        }, owned);
        assert.deepEqual(outcome.containers[0]?.upstream?.digest, { digest: D1, source: 'resolved', pinned: true });
      });

      it('records why the ReplicaSet\'s pins were not used when they were unusable (too large, unreadable), and resolves', () => {
        const ignored = 'ReplicaSet web-7d9 could not be read: its pullbridge.io/pinned-digests annotation is 20000 bytes, more than the 16384 pullbridge writes: ignored';
        const { outcome } = decide(['pin.example/team/app:1'], (b) => {
          b.replicaSets.set(rsKey, { kind: 'none', detail: ignored, unusable: true });
          b.digests.set(digestOf('pin', 'team/app', '1'), { kind: 'found', digest: D1, mediaType: 'x' });
        }, owned);
        assert.deepEqual(outcome.containers[0]?.upstream, { replicaSetPins: { ignored }, digest: { digest: D1, source: 'resolved', pinned: true } });
      });

      it('ignores an owner that is not a controlling apps/v1 ReplicaSet', () => {
        const { first } = decide(['pin.example/team/app:1'], () => {}, { ...owned, ownerReferences: [{ apiVersion: 'apps/v1', kind: 'ReplicaSet', name: 'x', uid: 'u', controller: false }] });
        assert.deepEqual(first.map((q) => q.kind), ['digest']);
      });
    });
  });

  describe('verify (with a stub signature answer)', () => {
    const found = (b: AnswerBook, rule: string) => b.digests.set(digestOf(rule, 'app', '1'), { kind: 'found', digest: D1, mediaType: 'x' });

    it('asks for the signature of the resolved digest, and pins the verified digest', () => {
      const request = podRequest(['signed.example/app:1']);
      const book = new AnswerBook();
      assert.deepEqual(admitPod(config, request, { answers: book }).questions.map((q) => q.kind), ['digest']);
      found(book, 'signed');
      assert.deepEqual(admitPod(config, request, { answers: book }).questions, [{ kind: 'signature', key: signatureOf('signed', 'app', D1), target: { rule: 'signed', repository: 'app', digest: D1, namespace: 'team' } }]);
      book.signatures.set(signatureOf('signed', 'app', D1), { verified: true });
      const outcome = admitPod(config, request, { answers: book });
      assert.equal(outcome.containers[0]?.rewritten, `localhost:30500/signed/app:1@${D1}`);
      assert.deepEqual(outcome.containers[0]?.upstream?.signature, { verified: true });
    });

    it('onFailure: deny refuses the Pod, naming the container, the image and the reason', () => {
      const { outcome } = decide(['plain.example/ok:1', 'signed.example/app:1'], (b) => {
        found(b, 'signed');
        b.signatures.set(signatureOf('signed', 'app', D1), { verified: false, reason: 'no signature by a trusted key' });
      });
      assert.equal(outcome.decision, 'denied');
      assert.deepEqual(outcome.patch, []);
      assert.equal(outcome.denial, 'pullbridge: containers/c1 image signed.example/app:1: signature not verified: no signature by a trusted key');
      assert.equal(outcome.containers[1]?.reason, 'signature-unverified');
    });

    it('onFailure: deny also refuses when the tag cannot be resolved (nothing to verify)', () => {
      const { outcome } = decide(['signed.example/app:1'], (b) => b.digests.set(digestOf('signed', 'app', '1'), { kind: 'failed', error: 'timeout' }));
      assert.equal(outcome.decision, 'denied');
      assert.match(outcome.denial ?? '', /could not be resolved to a digest \(timeout\)/);
    });

    it('onFailure: warn admits with a warning and the audit facts, unpinned (the digest was not verified)', () => {
      const { outcome, pod } = decide(['signedwarn.example/app:1'], (b) => {
        found(b, 'signedwarn');
        b.signatures.set(signatureOf('signedwarn', 'app', D1), { verified: false, reason: 'signed by another key' });
      });
      assert.equal(outcome.decision, 'mutated');
      assert.equal(pod.spec.containers[0]?.image, 'localhost:30500/signedwarn/app:1');
      assert.match(outcome.warnings.join('\n'), /containers\/c0 image signedwarn\.example\/app:1: signature not verified: signed by another key \(onFailure: warn\)/);
      assert.deepEqual(outcome.containers[0]?.upstream?.signature, { verified: false, reason: 'signed by another key', onFailure: 'warn' });
      // Admitted, but the audit says why it was not verified, not plain "rewritten" (trial 22).
      assert.equal(outcome.containers[0]?.reason, 'signature-unverified');
    });

    it('audits which key verified and where the signature was found (trial 22)', () => {
      const { outcome } = decide(['signed.example/app:1'], (b) => {
        found(b, 'signed');
        b.signatures.set(signatureOf('signed', 'app', D1), { verified: true, keyIndex: 1, source: 'sha256-1111.sig' });
      });
      assert.deepEqual(outcome.containers[0]?.upstream?.signature, { verified: true, keyIndex: 1, source: 'sha256-1111.sig' });
      assert.equal(outcome.containers[0]?.reason, 'rewritten');
    });

    it('checks an image written on the proxy already: no bypass by writing the proxy reference', () => {
      const { first, outcome } = decide(['localhost:30500/signed/app:1'], (b) => {
        found(b, 'signed');
        b.signatures.set(signatureOf('signed', 'app', D1), { verified: false, reason: 'unsigned' });
      });
      assert.deepEqual(first.map((q) => q.kind === 'digest' && q.target.repository), ['app']);
      assert.equal(outcome.decision, 'denied');
      assert.match(outcome.denial ?? '', /containers\/c0 image localhost:30500\/signed\/app:1: signature not verified: unsigned/);
      const verified = decide(['localhost:30500/signed/app:1'], (b) => {
        found(b, 'signed');
        b.signatures.set(signatureOf('signed', 'app', D1), { verified: true });
      });
      assert.equal(verified.pod.spec.containers[0]?.image, `localhost:30500/signed/app:1@${D1}`);
      assert.equal(verified.outcome.containers[0]?.reason, 'already-proxied');
      // Rules without verify ask nothing for their proxied images (a reinvocation stays free).
      assert.deepEqual(decide(['localhost:30500/pin/team/app:1', 'localhost:30500/priv/app:1']).first, []);
    });

    it('checks an image of a rule without verify on the verify rule\'s upstream: another rule\'s path is no way around it', () => {
      for (const image of ['localhost:30500/corp/app:1', 'corp.example/app:1']) {
        const { first, outcome } = decide([image], (b) => {
          found(b, 'corp');
          b.signatures.set(signatureOf('corp', 'app', D1), { verified: false, reason: 'unsigned' });
        });
        assert.deepEqual(first.map((q) => q.kind === 'digest' && `${q.target.rule} ${q.target.repository}`), ['corp app'], image);
        assert.equal(outcome.decision, 'denied', image);
        assert.match(outcome.denial ?? '', /signature not verified: unsigned/, image);
      }
      const verified = decide(['corp.example/app:1'], (b) => {
        found(b, 'corp');
        b.signatures.set(signatureOf('corp', 'app', D1), { verified: true });
      });
      assert.equal(verified.pod.spec.containers[0]?.image, `localhost:30500/corp/app:1@${D1}`);
    });

    it('checks an image written on any loopback spelling of the proxy\'s address as the proxy\'s (its rule from the path)', () => {
      for (const host of ['127.0.0.1:30500', '[::1]:30500', 'localhost:030500', '2130706433:30500']) {
        const image = `${host}/signed/app:1`;
        const { first, outcome } = decide([image], (b) => {
          found(b, 'signed');
          b.signatures.set(signatureOf('signed', 'app', D1), { verified: false, reason: 'unsigned' });
        });
        assert.deepEqual(first.map((q) => q.kind === 'digest' && `${q.target.rule}/${q.target.repository}`), ['signed/app'], image);
        assert.equal(outcome.decision, 'denied', image);
        assert.equal(outcome.containers[0]?.reason, 'signature-unverified', image);
        assert.match(outcome.denial ?? '', /signature not verified: unsigned/, image);
      }
    });

    it('the Pod\'s opt-out label does not exempt an image on the proxy under a verify rule; everything else is left alone', () => {
      const labelled = { name: 'web', namespace: 'team', labels: { 'pullbridge.io/ignore': 'true' } };
      const { first, outcome } = decide(['127.0.0.1:30500/signed/app:1', 'plain.example/app:1', 'localhost:30500/plain/app:1'], (b) => {
        found(b, 'signed');
        b.signatures.set(signatureOf('signed', 'app', D1), { verified: false, reason: 'unsigned' });
      }, labelled);
      assert.deepEqual(first.map((q) => q.kind), ['digest']);
      assert.equal(outcome.decision, 'denied');
      assert.match(outcome.denial ?? '', /containers\/c0 image 127\.0\.0\.1:30500\/signed\/app:1: signature not verified: unsigned/);
      assert.deepEqual(outcome.containers.map((c) => c.reason), ['signature-unverified', 'pod-opted-out', 'pod-opted-out']);
      const clean = decide(['plain.example/app:1', 'signed.example/app:1'], () => {}, labelled);
      assert.deepEqual([clean.first, clean.outcome.decision, clean.outcome.skipReason, clean.outcome.patch], [[], 'skipped', 'pod-opted-out', []]);
    });

    it('checks the digest an image names, without resolving', () => {
      const { first } = decide([`signed.example/app@${D2}`]);
      assert.deepEqual(first.map((q) => q.kind), ['signature']);
    });
  });

  describe('a ReplicaSet\'s creation', () => {
    const rsOf = (images: string[], annotations?: Record<string, string>) => ({
      apiVersion: 'apps/v1',
      kind: 'ReplicaSet',
      metadata: { name: 'web-7d9', ...(annotations ? { annotations } : {}) },
      spec: { template: { metadata: { labels: { app: 'web' } }, spec: { containers: images.map((image, i) => ({ name: `c${i}`, image })) } } },
    });
    const rsRequest = (object: unknown) => requestOf(reviewFor(object, { namespace: 'team', kind: 'ReplicaSet', resource: 'replicasets', group: 'apps' }));

    it('costs nothing when no rule pins or verifies', () => {
      const plainConfig = configFrom(`
proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [/nonexistent/broker.key]}
registries: [{name: plain, match: [plain.example], upstream: "https://127.0.0.1:5000", auth: {mode: anonymous}, rewrite: private-only}]
`);
      const outcome = admitReplicaSet(plainConfig, rsRequest(rsOf(['plain.example/app:1'])), { answers: new AnswerBook() });
      assert.equal(outcome.skipReason, 'no-pinning-rule');
      assert.deepEqual(outcome.questions, []);
    });

    it('records the resolved digests in a metadata annotation and leaves the template alone', () => {
      const object = rsOf(['pin.example/team/app:1', 'plain.example/x:1', `pin.example/team/app:2@${D2}`]);
      const request = rsRequest(object);
      const book = new AnswerBook();
      assert.deepEqual(admitReplicaSet(config, request, { answers: book }).questions.map((q) => q.key), [digestOf('pin', 'team/app', '1')]);
      book.digests.set(digestOf('pin', 'team/app', '1'), { kind: 'found', digest: D1, mediaType: 'x' });
      const outcome = admitReplicaSet(config, request, { answers: book });
      assert.ok(outcome.patch.every((op) => op.path.startsWith('/metadata')), JSON.stringify(outcome.patch));
      const patched = applyPatch(object, outcome.patch);
      assert.deepEqual(JSON.parse(patched.metadata.annotations?.[PINNED_DIGESTS_ANNOTATION] ?? '{}'), { 'pin.example/team/app:1': D1 });
      assert.deepEqual(patched.spec, object.spec);
    });

    it('records a verify-only image only once its signature is verified, and replaces a pin the creator wrote', () => {
      const forged = { [PINNED_DIGESTS_ANNOTATION]: JSON.stringify({ 'signed.example/app:1': D2 }) };
      const object = rsOf(['signed.example/app:1'], forged);
      const unverified = new AnswerBook();
      unverified.digests.set(digestOf('signed', 'app', '1'), { kind: 'found', digest: D1, mediaType: 'x' });
      unverified.signatures.set(signatureOf('signed', 'app', D1), { verified: false, reason: 'unsigned' });
      const refused = admitReplicaSet(config, rsRequest(object), { answers: unverified });
      assert.equal(applyPatch(object, refused.patch).metadata.annotations?.[PINNED_DIGESTS_ANNOTATION], undefined);
      assert.equal(refused.denial, undefined, 'the Pods\' admission decides onFailure, not the ReplicaSet\'s');
      const verified = new AnswerBook();
      verified.digests.set(digestOf('signed', 'app', '1'), { kind: 'found', digest: D1, mediaType: 'x' });
      verified.signatures.set(signatureOf('signed', 'app', D1), { verified: true });
      const pinned = applyPatch(object, admitReplicaSet(config, rsRequest(object), { answers: verified }).patch);
      assert.deepEqual(JSON.parse(pinned.metadata.annotations?.[PINNED_DIGESTS_ANNOTATION] ?? '{}'), { 'signed.example/app:1': D1 });
    });

    it('with pinDigest and verify, records no pin for an image that fails verify, and warns: signature-unverified (its Pods are refused; trial 22)', () => {
      const both = configFrom(`
proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [/nonexistent/broker.key]}
registries:
  - {name: signed, match: [signed.example], upstream: "https://127.0.0.1:5000", pinDigest: true, verify: {cosign: {publicKeyFiles: [/keys/a.pub]}}}
`);
      const object = rsOf(['signed.example/app:1']);
      const book = new AnswerBook();
      book.digests.set(digestOf('signed', 'app', '1'), { kind: 'found', digest: D1, mediaType: 'x' });
      book.signatures.set(signatureOf('signed', 'app', D1), { verified: false, reason: 'unsigned' });
      const outcome = admitReplicaSet(both, rsRequest(object), { answers: book });
      assert.equal(outcome.denial, undefined, 'the ReplicaSet is admitted: its Pods are checked at their admission');
      assert.equal(applyPatch(object, outcome.patch).metadata.annotations?.[PINNED_DIGESTS_ANNOTATION], undefined);
      assert.equal(outcome.containers[0]?.reason, 'signature-unverified');
      assert.deepEqual(outcome.containers[0]?.upstream?.signature, { verified: false, reason: 'unsigned', onFailure: 'deny' });
      assert.deepEqual(outcome.warnings, ['pullbridge: containers/c0 image signed.example/app:1: signature not verified (unsigned); no digest recorded, and its Pods will be refused']);
    });
  });
});

describe('the webhook server with upstream-aware rules', () => {
  const rsReview = reviewFor({ apiVersion: 'apps/v1', kind: 'ReplicaSet', metadata: { name: 'web-1' }, spec: { template: { spec: { containers: [{ name: 'app', image: 'plain.example/app:1' }] } } } }, { namespace: 'team', kind: 'ReplicaSet', resource: 'replicasets', group: 'apps' });

  it('answers a ReplicaSet at once, reading nothing, when no rule pins or verifies', async () => {
    const plainConfig = configFrom(`
proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
registries: [{name: plain, match: [plain.example], upstream: "https://127.0.0.1:5000", auth: {mode: anonymous}}]
`);
    const audit = memoryLogger();
    const labelReads: string[] = [];
    const app = createWebhookApp({ config: () => plainConfig, logger: memoryLogger().logger, audit: audit.logger, metrics: createMetricsRegistry(false), sideEffects: { namespaceLabels: (ns) => Promise.resolve(void labelReads.push(ns)) } });
    const res = await supertest(app).post('/mutate').set('content-type', 'application/json').send(rsReview);
    assert.equal(res.status, 200);
    assert.deepEqual((res.body as { response: Record<string, unknown> }).response, { uid: (rsReview.request as { uid: string }).uid, allowed: true });
    assert.deepEqual(labelReads, []);
    assert.deepEqual([audit.records[0]?.kind, audit.records[0]?.result, audit.records[0]?.skipReason], ['ReplicaSet', 'skipped', 'no-pinning-rule']);
  });

  it('refuses a Pod with verify onFailure: deny as a 403 AdmissionResponse naming container, image and reason (no view: no answer)', async () => {
    const audit = memoryLogger();
    const app = createWebhookApp({ config: () => config, logger: memoryLogger().logger, audit: audit.logger, metrics: createMetricsRegistry(false) });
    const res = await supertest(app).post('/mutate').set('content-type', 'application/json').send(reviewFor(podOf(['signed.example/app:1']), { namespace: 'team' }));
    const response = (res.body as { response: { allowed: boolean; status?: { code: number; message: string } } }).response;
    assert.equal(response.allowed, false);
    assert.deepEqual(response.status, { code: 403, message: `pullbridge: containers/c0 image signed.example/app:1: signature not verified: the tag could not be resolved to a digest (${NO_UPSTREAM})` });
    assert.equal(audit.records[0]?.result, 'denied');
  });
});

describe('one deadline from the request\'s arrival', () => {
  // A namespace read and a Secret write that never finish: a fault the real apiserver gives only
  // under load, so these side effects are stand-ins that never settle, and the test says so.
  const never = <T>() => new Promise<T>(() => {});
  const plainConfig = configFrom(`
proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [/nonexistent/broker.key]}
registries:
  - {name: plain, match: [plain.example], upstream: "https://127.0.0.1:5000"}
  # Another upstream: a verify rule covers every rule on its own upstream (rules/verifypolicy.ts).
  - {name: signed, match: [signed.example], upstream: "https://127.0.0.1:5001", verify: {cosign: {publicKeyFiles: [/keys/a.pub]}}}
`);

  it('a namespace-labels read that never answers does not hold the review: decided without labels within the budget', async () => {
    const audit = memoryLogger();
    const reads: string[] = [];
    const app = createWebhookApp({ config: () => plainConfig, logger: memoryLogger().logger, audit: audit.logger, metrics: createMetricsRegistry(false), upstream: { budgetMs: 400 }, sideEffects: { namespaceLabels: (ns) => (reads.push(ns), never()), ensurePullSecret: () => Promise.resolve() } });
    const res = await supertest(app).post('/mutate').set('content-type', 'application/json').send(reviewFor(podOf(['signed.example/app:1']), { namespace: 'team' }));
    const response = (res.body as { response: { allowed: boolean; status?: { message: string } } }).response;
    assert.deepEqual(reads, ['team']);
    assert.equal(response.allowed, false);
    assert.match(response.status?.message ?? '', /signature not verified/);
    assert.equal(audit.records[0]?.result, 'denied');
  });

  it('pull-secret provisioning that never finishes ends at the budget: pullSecretFailure decides, and the audit says why', async () => {
    const audit = memoryLogger();
    const app = createWebhookApp({ config: () => plainConfig, logger: memoryLogger().logger, audit: audit.logger, metrics: createMetricsRegistry(false), upstream: { budgetMs: 400 }, sideEffects: { ensurePullSecret: () => never() } });
    const res = await supertest(app).post('/mutate').set('content-type', 'application/json').send(reviewFor(podOf(['plain.example/app:1']), { namespace: 'team' }));
    const response = (res.body as { response: { allowed: boolean; status?: { code: number; message: string } } }).response;
    assert.equal(response.allowed, false);
    assert.equal(response.status?.message, 'pullbridge: could not provision pull secret "pullbridge-pull" in namespace "team": not done within the review\'s budget of 400 ms');
    assert.equal(audit.records[0]?.result, 'denied');
  });
});

describe('UPDATE: a running Pod\'s image change and a ReplicaSet\'s pins', () => {
  const running = (images: string[], pullSecrets: string[] = ['pullbridge-pull']) => podWith({ containers: images.map((image, i) => ({ name: `c${i}`, image })), imagePullSecrets: pullSecrets.map((name) => ({ name })) }, { name: 'web', namespace: 'team' });
  const update = (before: unknown, after: unknown) => requestOf(reviewFor(after, { namespace: 'team', operation: 'UPDATE', oldObject: before }));

  it('decides a changed image as on CREATE (verify asks and denies, a plain rule rewrites), leaving unchanged containers alone', () => {
    const before = running(['localhost:30500/plain/app:1', 'localhost:30500/signed/app:1']);
    const after = running(['localhost:30500/plain/app:1', 'localhost:30500/signed/app:evil']);
    const first = admitPod(config, update(before, after), { answers: new AnswerBook() });
    assert.deepEqual(first.questions.map((q) => q.kind === 'digest' && `${q.target.rule}/${q.target.repository}:${q.target.reference}`), ['signed/app:evil']);
    const denied = admitPod(config, update(before, after));
    assert.equal(denied.decision, 'denied');
    assert.match(denied.denial ?? '', /containers\/c1 image localhost:30500\/signed\/app:evil: signature not verified/);
    assert.equal(denied.containers[0]?.reason, 'image-unchanged');
    // The same spelled another way on the loopback: still the proxy's, still checked.
    assert.equal(admitPod(config, update(before, running(['localhost:30500/plain/app:1', '127.0.0.1:30500/signed/app:evil']))).decision, 'denied');
    const rewritten = admitPod(config, update(running(['plain.example/app:1']), running(['plain.example/app:2'])));
    assert.equal(rewritten.decision, 'mutated');
    assert.equal((applyPatch(running(['plain.example/app:2']), rewritten.patch) as unknown as PodShape).spec.containers[0]?.image, 'localhost:30500/plain/app:2');
  });

  it('refuses a change that needs a pull secret the Pod does not list (its pull secrets cannot change)', () => {
    const outcome = admitPod(config, update(running(['docker.io/library/busybox:1'], []), running(['plain.example/app:2'], [])));
    assert.equal(outcome.decision, 'denied');
    assert.equal(outcome.denial, 'pullbridge: containers/c0 image plain.example/app:2: pod does not list pull secret "pullbridge-pull", which the new image needs; a Pod\'s pull secrets cannot change after creation: recreate the Pod (or change its Deployment)');
  });

  it('answers a Pod UPDATE that changes no image at once, asking nothing', () => {
    const pod = running(['localhost:30500/signed/app:1']);
    const outcome = admitPod(config, update(pod, { ...pod, metadata: { name: 'web', namespace: 'team', labels: { a: 'b' } } }), { answers: new AnswerBook() });
    assert.deepEqual([outcome.decision, outcome.skipReason, outcome.questions], ['skipped', 'no-image-changed', []]);
  });

  it('reverts a change to a ReplicaSet\'s pins annotation (a forged digest), and passes any other UPDATE', () => {
    const rs = (annotations?: Record<string, string>) => ({ apiVersion: 'apps/v1', kind: 'ReplicaSet', metadata: { name: 'web-1', ...(annotations ? { annotations } : {}) }, spec: { replicas: 1, template: { spec: { containers: [{ name: 'app', image: 'signed.example/app:1' }] } } } });
    const rsUpdate = (before: unknown, after: unknown) => requestOf(reviewFor(after, { namespace: 'team', kind: 'ReplicaSet', resource: 'replicasets', group: 'apps', operation: 'UPDATE', oldObject: before }));
    const genuine = { [PINNED_DIGESTS_ANNOTATION]: JSON.stringify({ 'signed.example/app:1': D1 }) };
    const forged = { [PINNED_DIGESTS_ANNOTATION]: JSON.stringify({ 'signed.example/app:1': D2 }), other: 'x' };
    const restored = admitReplicaSetUpdate(rsUpdate(rs(genuine), rs(forged)));
    assert.equal(restored.decision, 'mutated');
    assert.deepEqual((applyPatch(rs(forged), restored.patch) as { metadata: { annotations: Record<string, string> } }).metadata.annotations, { ...genuine, other: 'x' });
    const added = admitReplicaSetUpdate(rsUpdate(rs(), rs(forged)));
    assert.deepEqual((applyPatch(rs(forged), added.patch) as { metadata: { annotations: Record<string, string> } }).metadata.annotations, { other: 'x' });
    const scaled = { ...rs(genuine), spec: { ...rs(genuine).spec, replicas: 3 } };
    assert.equal(admitReplicaSetUpdate(rsUpdate(rs(genuine), scaled)).skipReason, 'pins-unchanged');
  });
});

describe('the pins annotation as read back', () => {
  it('takes sha256 digests only, and nothing from a malformed value', () => {
    assert.deepEqual(parsePins(JSON.stringify({ 'a:1': D1, 'b:1': 'latest', 'c:1': 7 })), { 'a:1': D1 });
    assert.equal(parsePins('{not json'), null);
    assert.equal(parsePins('[]'), null);
    assert.equal(parsePins(undefined), null);
  });
});

describe('the orchestrator: one budget per review, questions answered once', function () {
  this.timeout(60_000);
  let registry: RegistryHandle;
  const one = buildImage({ layerSizes: [64] });

  before(async () => {
    registry = await startRegistry({ accessLog: true });
    await registry.push(one, 'team/app', '1');
  });
  after(() => registry?.stop());

  const pinConfig = () => configFrom(`
proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [/nonexistent/broker.key]}
registries:
  - {name: pin, match: [pin.example], upstream: "${registry.url}", auth: {mode: anonymous}, pinDigest: true, rewrite: private-only}
`);

  it('against a real registry: pins to the digest the registry holds, asking each question once for three containers', async () => {
    const view = directRegistryView({ upstream: registry.url });
    const request = podRequest(['pin.example/team/app:1', 'pin.example/team/app:1', 'pin.example/team/app:1']);
    const { outcome, questionsAsked } = await decideWithUpstream((answers) => admitPod(pinConfig(), request, { answers }), { view, budgetMs: 4000 });
    assert.deepEqual(outcome.containers.map((c) => c.rewritten), Array(3).fill(`pin.example/team/app:1@${one.index.digest}`));
    assert.deepEqual(outcome.containers.map((c) => c.reason), Array(3).fill('public-image'));
    assert.equal(questionsAsked, 2);
    assert.deepEqual(view.requests, ['HEAD /v2/team/app/manifests/1', 'HEAD /v2/team/app/manifests/1']);
  });

  it('an upstream that never answers costs the budget once, then onProbeFailure decides for every question', async () => {
    const sockets: net.Socket[] = [];
    const silent = net.createServer((socket) => sockets.push(socket));
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    try {
      const view = directRegistryView({ upstream: `http://127.0.0.1:${(silent.address() as net.AddressInfo).port}` });
      const request = podRequest(['pin.example/team/app:1', 'pin.example/team/other:1']);
      const { outcome } = await decideWithUpstream((answers) => admitPod(pinConfig(), request, { answers }), { view, budgetMs: 300 });
      assert.deepEqual(outcome.containers.map((c) => c.rewritten), ['localhost:30500/pin/team/app:1', 'localhost:30500/pin/team/other:1']);
      assert.deepEqual(outcome.containers.map((c) => c.upstream?.probe?.error), Array(2).fill('no answer within the review\'s budget of 300 ms'));
      assert.deepEqual(view.requests, ['HEAD /v2/team/app/manifests/1', 'HEAD /v2/team/other/manifests/1']);
    } finally {
      for (const s of sockets) s.destroy();
      silent.close();
    }
  });

  it('a dozen questions at once on one review\'s signal: no MaxListenersExceededWarning (trial 22)', async () => {
    const sockets: net.Socket[] = [];
    const silent = net.createServer((socket) => sockets.push(socket));
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    const warnings: string[] = [];
    const onWarning = (warning: Error) => warnings.push(`${warning.name}: ${warning.message}`);
    process.on('warning', onWarning);
    try {
      // The webhook's own view of the proxy tier (undici's fetch would raise the signal's limit itself), on a proxy that accepts and never answers.
      const view = new ProxyTierView({ endpoints: () => [`http://127.0.0.1:${(silent.address() as net.AddressInfo).port}`], token: () => 'resolver-token', namespaceAuthorization: () => 'Basic eDp5', deadlineMs: 5_000 });
      const questions: UpstreamQuestion[] = Array.from({ length: 12 }, (_, i) => ({ kind: 'probe', key: `probe-${i}`, target: { rule: 'pin', repository: `team/app${i}`, reference: '1' } }));
      const { questionsAsked } = await decideWithUpstream((book) => ({ questions: questions.filter((q) => !book.probes.has(q.key) && book.final === undefined) }), { view, budgetMs: 300 });
      assert.equal(questionsAsked, 12);
      await view.close();
      // Process warnings are emitted on a later tick.
      await new Promise((resolve) => setImmediate(resolve));
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.deepEqual(warnings.filter((w) => w.startsWith('MaxListenersExceededWarning')), []);
    } finally {
      process.off('warning', onWarning);
      for (const s of sockets) s.destroy();
      silent.close();
    }
  });

  it('a review that asks nothing is decided without the view', async () => {
    const view = directRegistryView({ upstream: registry.url });
    const { outcome, questionsAsked } = await decideWithUpstream((answers) => admitPod(config, podRequest(['plain.example/app:1']), { answers }), { view, budgetMs: 4000 });
    assert.equal(outcome.decision, 'mutated');
    assert.equal(questionsAsked, 0);
    assert.deepEqual(view.requests, []);
  });

  it('a stub signature check that throws counts as not verified, with its message', async () => {
    const view = directRegistryView({ upstream: registry.url });
    const throwing: SignatureCheck = () => Promise.reject(new Error('key file unreadable'));
    const cfg = configFrom(`
proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [/nonexistent/broker.key]}
registries:
  - {name: signed, match: [signed.example], upstream: "${registry.url}", auth: {mode: anonymous}, verify: {cosign: {publicKeyFiles: [/k.pub]}}}
`);
    const { outcome } = await decideWithUpstream((answers) => admitPod(cfg, podRequest(['signed.example/team/app:1']), { answers }), { view, signatureCheck: throwing, budgetMs: 4000 });
    assert.equal(outcome.decision, 'denied');
    assert.match(outcome.denial ?? '', /containers\/c0 image signed\.example\/team\/app:1: signature not verified: the signature check failed: key file unreadable/);
  });

  it('a Pod of thousands of distinct tags asks nothing past the cap: verify denies (even onFailure: warn), the others follow onProbeFailure', async () => {
    const view = directRegistryView({ upstream: registry.url });
    const signatures: string[] = [];
    const check: SignatureCheck = (_t, digest) => Promise.resolve(void signatures.push(digest)).then(() => ({ verified: true as const }));
    const cfg = configFrom(`
proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [/nonexistent/broker.key]}
registries:
  # An upstream of its own (never asked here: over the cap): a verify rule covers every rule on its upstream.
  - {name: signed, match: [signed.example], upstream: "https://127.0.0.1:5001", auth: {mode: anonymous}, verify: {cosign: {publicKeyFiles: [/k.pub]}, onFailure: warn}}
  - {name: priv, match: [priv.example], upstream: "${registry.url}", auth: {mode: anonymous}, rewrite: private-only}
  - {name: privleave, match: [privleave.example], upstream: "${registry.url}", auth: {mode: anonymous}, rewrite: private-only, onProbeFailure: leave}
`);
    const tags = Array.from({ length: 3000 }, (_, i) => `t${i}`);
    const signed = await decideWithUpstream((answers) => admitPod(cfg, podRequest(tags.map((t) => `signed.example/team/app:${t}`)), { answers }), { view, signatureCheck: check, budgetMs: 4000 });
    assert.equal(signed.questionsAsked, 0);
    assert.deepEqual([view.requests, signatures], [[], []]);
    assert.equal(signed.outcome.decision, 'denied');
    assert.match(signed.outcome.denial ?? '', new RegExp(`containers/c0 image signed\\.example/team/app:t0: signature not verified: the tag could not be resolved to a digest \\(the review needs 3000 upstream answers, more than the ${MAX_QUESTIONS_PER_REVIEW} one review may ask\\)`));
    const rewrite = await decideWithUpstream((answers) => admitPod(cfg, podRequest(tags.map((t) => `priv.example/team/app:${t}`)), { answers }), { view, budgetMs: 4000 });
    assert.equal(rewrite.questionsAsked, 0);
    assert.equal(rewrite.outcome.containers[2999]?.rewritten, 'localhost:30500/priv/team/app:t2999');
    assert.match(rewrite.outcome.containers[0]?.detail ?? '', /the anonymous probe failed \(the review needs 3000 upstream answers.*\); onProbeFailure: rewrite/);
    const leave = await decideWithUpstream((answers) => admitPod(cfg, podRequest(tags.map((t) => `privleave.example/team/app:${t}`)), { answers }), { view, budgetMs: 4000 });
    assert.equal(leave.outcome.decision, 'unchanged');
    assert.deepEqual(new Set(leave.outcome.containers.map((c) => c.reason)), new Set(['probe-failed']));
    assert.deepEqual(view.requests, []);
    // At the cap exactly, every question is asked and answered by the registry.
    const atCap = await decideWithUpstream((answers) => admitPod(cfg, podRequest(tags.slice(0, MAX_QUESTIONS_PER_REVIEW).map((t) => `priv.example/team/app:${t}`)), { answers }), { view, budgetMs: 4000 });
    assert.equal(atCap.questionsAsked, MAX_QUESTIONS_PER_REVIEW);
    assert.equal(view.requests.length, MAX_QUESTIONS_PER_REVIEW);
  });

  it('a verify Pod over the cap is refused by the webhook server with the cap in its message', async () => {
    const cfg = configFrom(`
proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [/nonexistent/broker.key]}
registries:
  - {name: signed, match: [signed.example], upstream: "${registry.url}", auth: {mode: anonymous}, verify: {cosign: {publicKeyFiles: [/k.pub]}}}
`);
    const view = directRegistryView({ upstream: registry.url });
    const audit = memoryLogger();
    const app = createWebhookApp({ config: () => cfg, logger: memoryLogger().logger, audit: audit.logger, metrics: createMetricsRegistry(false), upstream: { view, budgetMs: 4000 } });
    const images = Array.from({ length: 2000 }, (_, i) => `signed.example/team/app:t${i}`);
    const res = await supertest(app).post('/mutate').set('content-type', 'application/json').send(reviewFor(podOf(images), { namespace: 'team' }));
    const response = (res.body as { response: { allowed: boolean; status?: { code: number; message: string } } }).response;
    assert.equal(response.allowed, false);
    assert.match(response.status?.message ?? '', /more than the 64 one review may ask/);
    assert.deepEqual(view.requests, []);
    assert.equal(audit.records[0]?.result, 'denied');
  });

  it('fits the budget inside the webhook timeout', () => {
    assert.equal(budgetFor(5), 4000);
    assert.equal(budgetFor(1), 500);
    assert.equal(budgetFor(30), 29_000);
  });
});
