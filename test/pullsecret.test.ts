// The pure decisions about a namespace's pull secret: what an admission or the reconciler does with
// the Secret it finds, and from when the deletion grace counts.

import assert from 'node:assert/strict';
import type { V1Secret } from '@kubernetes/client-node';
import { LAST_ADMISSION_ANNOTATION, desiredPullSecret, keyId, lastUse, pullSecretAction } from '../src/k8s/pullsecret.js';
import { namespaceServed, reconcileAction, type NamespaceFacts } from '../src/k8s/reconciler.js';
import { testConfig } from './support/config.js';

const config = testConfig();
const key = Buffer.alloc(32, 1);
const CREATED = Date.parse('2030-01-01T00:00:00Z');
const MINUTE = 60_000;

/** The Secret as the apiserver returns it: created at CREATED, optionally with a recorded admission. */
function stored(secret: V1Secret, lastAdmission?: number): V1Secret {
  const annotations = { ...secret.metadata?.annotations, ...(lastAdmission !== undefined ? { [LAST_ADMISSION_ANNOTATION]: new Date(lastAdmission).toISOString() } : {}) };
  return { ...secret, metadata: { ...secret.metadata, annotations, creationTimestamp: new Date(CREATED), resourceVersion: '7' } };
}

describe('pull secret decisions (pure)', () => {
  const desired = desiredPullSecret(config, 'shop', 'pullbridge-pull', key);

  it('counts use from the last recorded admission, else from creation', () => {
    assert.equal(lastUse(stored(desired)), CREATED);
    assert.equal(lastUse(stored(desired, CREATED + 5 * MINUTE)), CREATED + 5 * MINUTE);
    // A recorded time before creation (a clock skewed replica) does not move it back.
    assert.equal(lastUse(stored(desired, CREATED - MINUTE)), CREATED);
  });

  it('creates a missing Secret, never overwrites a foreign one, replaces stale content', () => {
    assert.equal(pullSecretAction(undefined, desired, CREATED, MINUTE), 'create');
    const foreign = stored({ ...desired, metadata: { ...desired.metadata, labels: {} } });
    assert.equal(pullSecretAction(foreign, desired, CREATED, MINUTE), 'foreign');
    const rotated = desiredPullSecret(config, 'shop', 'pullbridge-pull', Buffer.alloc(32, 2));
    assert.equal(pullSecretAction(stored(rotated), desired, undefined, MINUTE), 'replace');
  });

  it('records an admission at most once per interval, and background upkeep never', () => {
    const recent = stored(desired, CREATED + 10 * MINUTE);
    assert.equal(pullSecretAction(recent, desired, CREATED + 10 * MINUTE + MINUTE - 1, MINUTE), 'keep');
    assert.equal(pullSecretAction(recent, desired, CREATED + 11 * MINUTE, MINUTE), 'replace');
    assert.equal(pullSecretAction(recent, desired, undefined, MINUTE), 'keep');
  });

  it('serves a namespace unless it is excluded, opted out or terminating', () => {
    assert.equal(namespaceServed(config, { metadata: { name: 'shop' } }), true);
    assert.equal(namespaceServed(config, { metadata: { name: 'shop', labels: { 'pullbridge.io/ignore': 'true' } } }), false);
    assert.equal(namespaceServed(config, { metadata: { name: 'shop' }, status: { phase: 'Terminating' } }), false);
    for (const name of ['kube-system', 'pullbridge', 'infra']) assert.equal(namespaceServed(config, { metadata: { name } }), false, name);
  });

  describe('the reconciler', () => {
    const GRACE = 10 * MINUTE;
    const facts = (over: Partial<NamespaceFacts>): NamespaceFacts => ({ secret: stored(desired), served: true, referenced: false, now: CREATED + 2 * GRACE, graceMs: GRACE, currentKey: keyId(key), ...over });

    it('re-creates a missing Secret only where a rewritten Pod lists it and the namespace is served', () => {
      assert.equal(reconcileAction(facts({ secret: undefined, referenced: true })), 'recreate');
      assert.equal(reconcileAction(facts({ secret: undefined, referenced: false })), 'keep');
      assert.equal(reconcileAction(facts({ secret: undefined, referenced: true, served: false })), 'keep');
    });

    it('deletes an unneeded Secret once the grace has passed since the last admission, not since creation', () => {
      assert.equal(reconcileAction(facts({})), 'delete');
      assert.equal(reconcileAction(facts({ secret: stored(desired, CREATED + GRACE + 1) })), 'keep');
      assert.equal(reconcileAction(facts({ secret: stored(desired, CREATED + GRACE - 1) })), 'delete');
      assert.equal(reconcileAction(facts({ referenced: true })), 'keep');
      assert.equal(reconcileAction(facts({ referenced: true, served: false })), 'delete');
    });

    it('refreshes a needed Secret signed with another key, and never touches a foreign one', () => {
      assert.equal(reconcileAction(facts({ referenced: true, currentKey: 'other' })), 'refresh');
      const foreign = stored({ ...desired, metadata: { ...desired.metadata, labels: {} } });
      assert.equal(reconcileAction(facts({ secret: foreign })), 'keep');
    });
  });
});
