// The namespace pull secret, the way vendor platforms provision an imagePullSecret: created or
// updated idempotently when the webhook rewrites a Pod, cached so that steady-state admissions make
// no API call, and reconciled in the background after key rotation.

import { createHash } from 'node:crypto';
import type { CoreV1Api, V1Secret } from '@kubernetes/client-node';
import type { Config } from '../rules/config.js';
import { dockerConfigJson } from '../proxy/credentials.js';
import { apiMessage, apiStatus } from './client.js';

export const MANAGED_BY_LABEL = 'app.kubernetes.io/managed-by';
export const MANAGED_BY = 'pullbridge';
export const KEY_ID_ANNOTATION = 'pullbridge.io/key-id';

/** A short, non-reversible identity of a key, so a rotation is visible without the key. */
export const keyId = (key: Uint8Array): string => createHash('sha256').update(key).digest('hex').slice(0, 16);

/** The Secret a namespace should hold. Pure. */
export function desiredPullSecret(config: Config, namespace: string, name: string, key: Uint8Array): V1Secret {
  return {
    apiVersion: 'v1',
    kind: 'Secret',
    type: 'kubernetes.io/dockerconfigjson',
    metadata: {
      name,
      namespace,
      labels: { [MANAGED_BY_LABEL]: MANAGED_BY },
      annotations: { [KEY_ID_ANNOTATION]: keyId(key) },
    },
    data: { '.dockerconfigjson': Buffer.from(dockerConfigJson(config.proxyAuthority, namespace, key)).toString('base64') },
  };
}

const isManaged = (s: V1Secret): boolean => s.metadata?.labels?.[MANAGED_BY_LABEL] === MANAGED_BY;
const sameContent = (a: V1Secret, b: V1Secret): boolean => a.type === b.type && a.data?.['.dockerconfigjson'] === b.data?.['.dockerconfigjson'];

export class PullSecretProvisioner {
  /** namespace/name → the desired content last confirmed in the cluster. */
  private readonly confirmed = new Map<string, string>();
  private readonly inflight = new Map<string, Promise<void>>();

  constructor(
    private readonly core: CoreV1Api,
    private readonly config: () => Config,
    private readonly signingKey: () => Uint8Array,
  ) {}

  /**
   * Makes sure the secret exists with the current content. Concurrent calls for one namespace share
   * one round of API calls; a create that loses a race (409) is checked, not reported.
   */
  ensure(namespace: string, name: string): Promise<void> {
    const desired = desiredPullSecret(this.config(), namespace, name, this.signingKey());
    const id = `${namespace}/${name}`;
    const content = desired.data?.['.dockerconfigjson'] ?? '';
    if (this.confirmed.get(id) === content) return Promise.resolve();
    const running = this.inflight.get(id);
    if (running) return running;
    const work = this.apply(desired)
      .then(() => {
        this.confirmed.set(id, content);
      })
      .finally(() => this.inflight.delete(id));
    this.inflight.set(id, work);
    return work;
  }

  /** Forgets what is cached, e.g. after the reconciler deleted a secret. */
  forget(namespace: string, name: string): void {
    this.confirmed.delete(`${namespace}/${name}`);
  }

  private async apply(desired: V1Secret): Promise<void> {
    const namespace = desired.metadata?.namespace ?? '';
    const name = desired.metadata?.name ?? '';
    for (let attempt = 0; attempt < 3; attempt++) {
      const existing = await this.read(namespace, name);
      if (!existing) {
        try {
          await this.core.createNamespacedSecret({ namespace, body: desired });
          return;
        } catch (error) {
          if (apiStatus(error) === 409) continue; // created meanwhile: compare on the next round
          throw new Error(`create secret ${namespace}/${name}: ${apiMessage(error)}`);
        }
      }
      if (!isManaged(existing)) throw new Error(`secret ${namespace}/${name} exists and is not managed by pullbridge; not overwriting it`);
      if (sameContent(existing, desired)) return;
      try {
        await this.core.replaceNamespacedSecret({ namespace, name, body: { ...desired, metadata: { ...desired.metadata, resourceVersion: existing.metadata?.resourceVersion } } });
        return;
      } catch (error) {
        if (apiStatus(error) === 409) continue; // changed meanwhile: read again
        throw new Error(`update secret ${namespace}/${name}: ${apiMessage(error)}`);
      }
    }
    throw new Error(`secret ${namespace}/${name} kept changing; gave up after 3 attempts`);
  }

  private async read(namespace: string, name: string): Promise<V1Secret | undefined> {
    try {
      return await this.core.readNamespacedSecret({ namespace, name });
    } catch (error) {
      if (apiStatus(error) === 404) return undefined;
      throw new Error(`read secret ${namespace}/${name}: ${apiMessage(error)}`);
    }
  }
}
