// The namespace pull secret, the way vendor platforms provision an imagePullSecret: created or
// updated idempotently when the webhook rewrites a Pod, cached so that steady-state admissions make
// no API call, and reconciled in the background after key rotation. A confirmation is trusted for a
// bounded time only, and a watch drops it at once when the Secret is deleted or changed, so a
// deleted Secret is re-created by the next admission. Admissions record when they last needed the
// Secret on the Secret itself (at most once per interval), so every replica's reconciler counts the
// deletion grace from the last admission, not from the Secret's creation.

import { createHash } from 'node:crypto';
import type { CoreV1Api, KubeConfig, V1Secret } from '@kubernetes/client-node';
import type { Logger } from '../log.js';
import type { Config, Rule } from '../rules/config.js';
import { neverRuleBySecretName, upstreamDockerConfigJson, type UpstreamCredential } from '../rules/upstreamsecret.js';
import { dockerConfigJson } from '../rules/credentials.js';
import { apiMessage, apiStatus, restartingWatch } from './client.js';

export const MANAGED_BY_LABEL = 'app.kubernetes.io/managed-by';
export const MANAGED_BY = 'pullbridge';
/** Which key (broker secret) or which credential (a never rule's secret) the content was made from. */
export const KEY_ID_ANNOTATION = 'pullbridge.io/key-id';
/** On a never rule's pull secret: the rule whose upstream credential it holds. */
export const RULE_ANNOTATION = 'pullbridge.io/rule';
/** When an admission last needed the Secret (RFC 3339), refreshed at most once per recheck interval. */
export const LAST_ADMISSION_ANNOTATION = 'pullbridge.io/last-admission';
/** How long a confirmed Secret is trusted without reading it again, at most. */
export const MAX_RECHECK_MS = 60_000;

/** A short, non-reversible identity of a key, so a rotation is visible without the key. */
export const keyId = (key: Uint8Array): string => createHash('sha256').update(key).digest('hex').slice(0, 16);

/** A managed `kubernetes.io/dockerconfigjson` Secret holding `payload`. Pure. */
function dockerConfigSecret(name: string, namespace: string, annotations: Record<string, string>, payload: string): V1Secret {
  return {
    apiVersion: 'v1',
    kind: 'Secret',
    type: 'kubernetes.io/dockerconfigjson',
    metadata: { name, namespace, labels: { [MANAGED_BY_LABEL]: MANAGED_BY }, annotations },
    data: { '.dockerconfigjson': Buffer.from(payload).toString('base64') },
  };
}

/** The Secret a namespace should hold. Pure. */
export function desiredPullSecret(config: Config, namespace: string, name: string, key: Uint8Array): V1Secret {
  return dockerConfigSecret(name, namespace, { [KEY_ID_ANNOTATION]: keyId(key) }, dockerConfigJson(config.proxyAuthority, namespace, key));
}

/**
 * The Secret a rewrite: never rule provisions in a namespace: its upstream credential for its
 * registry hosts. The key id is a hash of the payload, so that a changed credential is seen as a
 * change by the reconciler (the Secret holds the credential itself; the hash adds nothing to it). Pure.
 */
export function desiredUpstreamPullSecret(rule: Pick<Rule, 'name' | 'match'>, namespace: string, name: string, credential: UpstreamCredential): V1Secret {
  const payload = upstreamDockerConfigJson(rule, credential);
  return dockerConfigSecret(name, namespace, { [KEY_ID_ANNOTATION]: keyId(Buffer.from(payload)), [RULE_ANNOTATION]: rule.name }, payload);
}

/**
 * The Secret named `name` should be in `namespace`: a never rule's, or else the broker's. Refuses a
 * never rule's credential for a namespace the rule does not admit, whoever asks. Pure but for the
 * readers given.
 */
export function desiredSecret(config: Config, namespace: string, name: string, signingKey: () => Uint8Array, upstreamCredential: ((rule: Rule) => UpstreamCredential) | undefined): V1Secret {
  const rule = neverRuleBySecretName(config, name);
  if (rule === undefined) return desiredPullSecret(config, namespace, name, signingKey());
  if (rule.namespaceFilter.refuse(namespace) !== null) throw new Error(`rule "${rule.name}" does not admit namespace "${namespace}": its credential is not written there`);
  if (upstreamCredential === undefined) throw new Error(`no reader of rule "${rule.name}"'s upstream credential`);
  return desiredUpstreamPullSecret(rule, namespace, name, upstreamCredential(rule));
}

export const isManaged = (s: V1Secret): boolean => s.metadata?.labels?.[MANAGED_BY_LABEL] === MANAGED_BY;
const secretContent = (s: V1Secret): string => s.data?.['.dockerconfigjson'] ?? '';
const sameContent = (a: V1Secret, b: V1Secret): boolean => a.type === b.type && secretContent(a) === secretContent(b);

/** When the Secret was last needed: its last recorded admission, or its creation. Pure. */
export function lastUse(secret: V1Secret): number {
  const created = secret.metadata?.creationTimestamp ? new Date(secret.metadata.creationTimestamp).getTime() : 0;
  const admitted = Date.parse(secret.metadata?.annotations?.[LAST_ADMISSION_ANNOTATION] ?? '');
  return Number.isNaN(admitted) ? created : Math.max(created, admitted);
}

export type PullSecretAction = 'create' | 'replace' | 'keep' | 'foreign';

/**
 * What to do with the Secret found in the namespace (undefined: none). `admissionAt` is the time of
 * the admission that needs it, or undefined for background upkeep, which records no admission. Pure.
 */
export function pullSecretAction(existing: V1Secret | undefined, desired: V1Secret, admissionAt: number | undefined, recheckMs: number): PullSecretAction {
  if (existing === undefined) return 'create';
  if (!isManaged(existing)) return 'foreign';
  if (!sameContent(existing, desired)) return 'replace';
  if (admissionAt !== undefined && admissionAt - lastUse(existing) >= recheckMs) return 'replace';
  return 'keep';
}

/** `desired` as written: with the admission time, or the one the existing Secret recorded. Pure. */
function withLastAdmission(desired: V1Secret, lastAdmission: string | undefined, resourceVersion?: string): V1Secret {
  const annotations = { ...desired.metadata?.annotations, ...(lastAdmission !== undefined ? { [LAST_ADMISSION_ANNOTATION]: lastAdmission } : {}) };
  return { ...desired, metadata: { ...desired.metadata, annotations, ...(resourceVersion !== undefined ? { resourceVersion } : {}) } };
}

export interface ProvisionerOptions {
  /** How long a confirmed Secret is trusted without reading it again, and how often admissions
   * refresh its last-admission time. Keep it well below the reconciler's grace. */
  readonly recheckMs?: number;
  readonly now?: () => number;
  /** The upstream credential of a rewrite: never rule (from its credential files). */
  readonly upstreamCredential?: (rule: Rule) => UpstreamCredential;
}

export class PullSecretProvisioner {
  /** namespace/name → the content last confirmed in the cluster, and until when to trust that. */
  private readonly confirmed = new Map<string, { readonly content: string; readonly until: number }>();
  private readonly inflight = new Map<string, Promise<void>>();
  private readonly recheckMs: number;
  private readonly now: () => number;
  private readonly upstreamCredential: ((rule: Rule) => UpstreamCredential) | undefined;

  constructor(
    private readonly core: CoreV1Api,
    private readonly config: () => Config,
    private readonly signingKey: () => Uint8Array,
    options: ProvisionerOptions = {},
  ) {
    this.recheckMs = options.recheckMs ?? MAX_RECHECK_MS;
    this.now = options.now ?? Date.now;
    this.upstreamCredential = options.upstreamCredential;
  }

  /** The Secret `name` should be in `namespace` now (the broker's, or a never rule's). */
  desired(namespace: string, name: string): V1Secret {
    return desiredSecret(this.config(), namespace, name, this.signingKey, this.upstreamCredential);
  }

  /**
   * Makes sure the secret exists with the current content, for an admission (recorded on the Secret
   * at most once per recheck interval) or, with `admission: false`, for background upkeep.
   * Concurrent calls for one namespace share one round of API calls; a create that loses a race
   * (409) is checked, not reported.
   */
  ensure(namespace: string, name: string, { admission = true }: { readonly admission?: boolean } = {}): Promise<void> {
    let desired: V1Secret;
    try {
      desired = this.desired(namespace, name);
    } catch (error) {
      return Promise.reject(error instanceof Error ? error : new Error(String(error)));
    }
    const id = `${namespace}/${name}`;
    const content = secretContent(desired);
    const known = this.confirmed.get(id);
    if (known !== undefined && known.content === content && known.until > this.now()) return Promise.resolve();
    const running = this.inflight.get(id);
    if (running) return running;
    const work = this.apply(desired, admission ? this.now() : undefined)
      .then((lastUsed) => {
        this.confirmed.set(id, { content, until: lastUsed + this.recheckMs });
      })
      .finally(() => this.inflight.delete(id));
    this.inflight.set(id, work);
    return work;
  }

  /** Forgets what is cached, e.g. after the secret was deleted; says whether anything was. */
  forget(namespace: string, name: string): boolean {
    return this.confirmed.delete(`${namespace}/${name}`);
  }

  /** A version of the secret seen in the cluster: a confirmation it contradicts is dropped. */
  observe(secret: V1Secret): void {
    const id = `${secret.metadata?.namespace ?? ''}/${secret.metadata?.name ?? ''}`;
    const known = this.confirmed.get(id);
    if (known !== undefined && (!isManaged(secret) || secretContent(secret) !== known.content)) this.confirmed.delete(id);
  }

  /** Applies `desired`; resolves with the time the Secret was last used, as it now records. */
  private async apply(desired: V1Secret, admissionAt: number | undefined): Promise<number> {
    const namespace = desired.metadata?.namespace ?? '';
    const name = desired.metadata?.name ?? '';
    const stamp = admissionAt !== undefined ? new Date(admissionAt).toISOString() : undefined;
    for (let attempt = 0; attempt < 3; attempt++) {
      const existing = await this.read(namespace, name);
      const action = pullSecretAction(existing, desired, admissionAt, this.recheckMs);
      if (action === 'foreign') throw new Error(`secret ${namespace}/${name} exists and is not managed by pullbridge; not overwriting it`);
      if (action === 'keep' && existing !== undefined) return lastUse(existing);
      try {
        if (existing === undefined) {
          await this.core.createNamespacedSecret({ namespace, body: withLastAdmission(desired, stamp) });
          return admissionAt ?? this.now();
        }
        const recorded = stamp ?? existing.metadata?.annotations?.[LAST_ADMISSION_ANNOTATION];
        await this.core.replaceNamespacedSecret({ namespace, name, body: withLastAdmission(desired, recorded, existing.metadata?.resourceVersion) });
        return admissionAt ?? lastUse(existing);
      } catch (error) {
        if (apiStatus(error) === 409) continue; // created or changed meanwhile: look again
        throw new Error(`${existing === undefined ? 'create' : 'update'} secret ${namespace}/${name}: ${apiMessage(error)}`);
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

/**
 * Watches the pull secrets (by name, in every namespace; RBAC can keep that to those names: the
 * broker's and each rewrite: never rule's, one watch per name) and drops the provisioner's
 * confirmation when one is deleted or changed by someone else, so the next admission in that
 * namespace repairs it at once. A watch that ends is started again; deletions missed meanwhile are
 * caught by the confirmations' expiry. `sync()` after a config change starts and stops watches to
 * follow the names.
 */
export function watchPullSecrets(kubeConfig: KubeConfig, names: () => readonly string[], provisioner: PullSecretProvisioner, logger: Logger, retryMs = 5000): { sync(): void; stop(): void } {
  const onEvent = (phase: string, event: unknown) => {
    const object = event as V1Secret;
    const namespace = object.metadata?.namespace ?? '';
    if (phase === 'DELETED') {
      if (provisioner.forget(namespace, object.metadata?.name ?? '')) logger.info({ namespace, secret: object.metadata?.name }, 'pull secret deleted; the next admission in its namespace re-creates it');
    } else if (phase === 'MODIFIED') {
      provisioner.observe(object);
    }
  };
  const watches = new Map<string, { stop(): void }>();
  const sync = () => {
    const wanted = new Set(names());
    for (const [name, watch] of watches) {
      if (wanted.has(name)) continue;
      watch.stop();
      watches.delete(name);
    }
    for (const name of wanted) {
      if (!watches.has(name)) watches.set(name, restartingWatch(kubeConfig, () => '/api/v1/secrets', () => ({ fieldSelector: `metadata.name=${name}` }), onEvent, logger, { msg: 'pull secret', secret: name }, retryMs));
    }
  };
  sync();
  return {
    sync,
    stop() {
      for (const watch of watches.values()) watch.stop();
      watches.clear();
    },
  };
}
