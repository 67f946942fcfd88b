// Background upkeep of the managed pull secrets (the broker's, and each rewrite: never rule's):
// refresh them after a broker key rotation or an upstream credential change, re-create those deleted
// while Pods still reference them, and remove those whose namespace no longer needs one (after a
// grace period counted from the last admission there; at once for a never rule's credential in a
// namespace its filter no longer admits).

import type { CoreV1Api, V1Namespace, V1Secret } from '@kubernetes/client-node';
import type { Logger } from '../log.js';
import { ALWAYS_EXCLUDED_NAMESPACES, type Config, type Rule } from '../rules/config.js';
import { REWRITTEN_LABEL, UPSTREAM_PULL_SECRET_LABEL } from '../rules/marks.js';
import { upstreamPullSecretName } from '../rules/upstreamsecret.js';
import { apiMessage, apiStatus } from './client.js';
import { KEY_ID_ANNOTATION, isManaged, lastUse, type PullSecretProvisioner } from './pullsecret.js';

export interface ReconcileResult {
  readonly refreshed: string[];
  readonly recreated: string[];
  readonly deleted: string[];
  readonly errors: string[];
}

/** How long a pull secret is kept after the last admission that needed it, by default. */
export const DEFAULT_GRACE_MS = 10 * 60_000;

export interface ReconcilerOptions {
  /** A secret used by an admission more recently than this is kept even without Pods: the webhook
   * provisions it before the Pod exists, and the Pod may be gone again before it is seen. */
  readonly graceMs?: number;
  readonly now?: () => number;
}

/** Whether pullbridge may keep a pull secret in the namespace at all. Pure. */
export function namespaceServed(config: Config, namespace: V1Namespace): boolean {
  const name = namespace.metadata?.name ?? '';
  if (ALWAYS_EXCLUDED_NAMESPACES.includes(name) || name === config.webhook.namespace || config.webhook.excludedNamespaces.includes(name)) return false;
  return namespace.metadata?.labels?.[config.webhook.optOutLabel] !== 'true' && namespace.status?.phase !== 'Terminating';
}

export interface NamespaceFacts {
  /** The pull secret in the namespace, if any. */
  readonly secret: V1Secret | undefined;
  /** Whether pullbridge serves the namespace (see namespaceServed). */
  readonly served: boolean;
  /** Whether a rewritten Pod there lists the pull secret. */
  readonly referenced: boolean;
  /**
   * A never rule's credential in a namespace its filter no longer admits: deleted at once, not after
   * the grace (an upstream credential must not linger where the config says it does not belong).
   */
  readonly refusedByRule?: boolean;
  readonly now: number;
  readonly graceMs: number;
  /** The key id the secret should carry; undefined when it cannot be known now (no refresh then). */
  readonly currentKey: string | undefined;
}

export type ReconcileAction = 'recreate' | 'delete' | 'refresh' | 'keep';

/** What the reconciler does with one namespace's pull secret. Pure. */
export function reconcileAction(facts: NamespaceFacts): ReconcileAction {
  const { secret, served } = facts;
  const needed = served && facts.referenced;
  // Deleted (by hand, or by another replica) while Pods still list it: they could not pull.
  if (secret === undefined) return needed ? 'recreate' : 'keep';
  if (!isManaged(secret)) return 'keep';
  if (facts.refusedByRule === true) return 'delete';
  if (!needed && facts.now - lastUse(secret) > facts.graceMs) return 'delete';
  return facts.currentKey !== undefined && secret.metadata?.annotations?.[KEY_ID_ANNOTATION] !== facts.currentKey ? 'refresh' : 'keep';
}

/** A pull secret name the webhook keeps, and the never rule it belongs to (none: the broker's). */
export interface ManagedSecret {
  readonly name: string;
  /** The label on the Pods that reference it. */
  readonly podLabel: string;
  readonly rule?: Rule;
}

/** The pull secrets a config has the webhook keep: the broker's (with broker keys) and one per never rule. Pure. */
export function managedSecrets(config: Config): ManagedSecret[] {
  const secrets: ManagedSecret[] = config.broker ? [{ name: config.webhook.pullSecretName, podLabel: REWRITTEN_LABEL }] : [];
  for (const rule of config.registries) if (rule.rewrite === 'never') secrets.push({ name: upstreamPullSecretName(config, rule), podLabel: UPSTREAM_PULL_SECRET_LABEL, rule });
  return secrets;
}

export class PullSecretReconciler {
  private timer: NodeJS.Timeout | undefined;
  private readonly graceMs: number;
  private readonly now: () => number;

  constructor(
    private readonly core: CoreV1Api,
    private readonly config: () => Config,
    /** Derives each Secret's content and key id (the broker's from the signing key, a never rule's from its credential). */
    private readonly provisioner: PullSecretProvisioner,
    private readonly logger: Logger,
    options: ReconcilerOptions = {},
  ) {
    this.graceMs = options.graceMs ?? DEFAULT_GRACE_MS;
    this.now = options.now ?? Date.now;
  }

  start(intervalMs: number): void {
    this.timer = setInterval(() => {
      this.reconcile().catch((error: unknown) => this.logger.error({ error: apiMessage(error) }, 'pull secret reconcile failed'));
    }, intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** Per secret name, the namespaces where a Pod with the secret's label lists it: one paged list of Pods per label. */
  private async namespacesReferencing(secrets: readonly ManagedSecret[]): Promise<Map<string, Set<string>>> {
    const referencing = new Map(secrets.map((s) => [s.name, new Set<string>()]));
    for (const label of new Set(secrets.map((s) => s.podLabel))) {
      const names = new Set(secrets.filter((s) => s.podLabel === label).map((s) => s.name));
      let page: string | undefined;
      do {
        const pods = await this.core.listPodForAllNamespaces({ labelSelector: `${label}=true`, limit: 500, ...(page ? { _continue: page } : {}) });
        for (const pod of pods.items) {
          for (const s of pod.spec?.imagePullSecrets ?? []) if (s.name !== undefined && names.has(s.name)) referencing.get(s.name)?.add(pod.metadata?.namespace ?? '');
        }
        page = pods.metadata?._continue || undefined;
      } while (page !== undefined);
    }
    return referencing;
  }

  private async read(namespace: string, name: string): Promise<V1Secret | undefined> {
    try {
      return await this.core.readNamespacedSecret({ namespace, name });
    } catch (error) {
      if (apiStatus(error) === 404) return undefined;
      throw error;
    }
  }

  async reconcile(): Promise<ReconcileResult> {
    const config = this.config();
    const result: ReconcileResult = { refreshed: [], recreated: [], deleted: [], errors: [] };
    const secrets = managedSecrets(config);
    if (secrets.length === 0) return result;
    // Secrets are read by name in each namespace rather than listed: RBAC can then limit the
    // webhook to the Secret names it manages instead of every Secret in the cluster.
    const [namespaces, referencing] = await Promise.all([this.core.listNamespace(), this.namespacesReferencing(secrets)]);
    for (const ns of namespaces.items) {
      const namespace = ns.metadata?.name ?? '';
      for (const { name, rule } of secrets) {
        const id = `${namespace}/${name}`;
        try {
          const secret = await this.read(namespace, name);
          // A never rule's credential belongs only in the namespaces its filter admits.
          const refusedByRule = rule !== undefined && rule.namespaceFilter.refuse(namespace) !== null;
          const served = namespaceServed(config, ns) && !refusedByRule;
          const currentKey = served && secret !== undefined ? this.provisioner.desired(namespace, name).metadata?.annotations?.[KEY_ID_ANNOTATION] : undefined;
          const action = reconcileAction({ secret, served, referenced: referencing.get(name)?.has(namespace) ?? false, refusedByRule, now: this.now(), graceMs: this.graceMs, currentKey });
          if (action === 'recreate') {
            await this.provisioner.ensure(namespace, name, { admission: false });
            result.recreated.push(id);
          } else if (action === 'delete') {
            try {
              // Only the version read: an admission through another replica may have just recorded itself.
              await this.core.deleteNamespacedSecret({ namespace, name, body: { preconditions: { resourceVersion: secret?.metadata?.resourceVersion } } });
              result.deleted.push(id);
            } catch (error) {
              if (apiStatus(error) !== 409 && apiStatus(error) !== 404) throw error;
            }
            this.provisioner.forget(namespace, name);
          } else if (action === 'refresh') {
            this.provisioner.forget(namespace, name);
            await this.provisioner.ensure(namespace, name, { admission: false });
            result.refreshed.push(id);
          }
        } catch (error) {
          result.errors.push(`${id}: ${error instanceof Error ? error.message : apiMessage(error)}`);
        }
      }
    }
    if (result.refreshed.length + result.recreated.length + result.deleted.length + result.errors.length > 0) this.logger.info({ ...result }, 'pull secrets reconciled');
    return result;
  }
}
