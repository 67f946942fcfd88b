// Background upkeep of the managed pull secrets: refresh them after a broker key rotation, re-create
// those deleted while rewritten Pods still reference them, and remove those whose namespace no
// longer needs one (after a grace period counted from the last admission there).

import type { CoreV1Api, V1Namespace, V1Secret } from '@kubernetes/client-node';
import type { Logger } from '../log.js';
import { ALWAYS_EXCLUDED_NAMESPACES, type Config } from '../rules/config.js';
import { REWRITTEN_LABEL } from '../rules/marks.js';
import { apiMessage, apiStatus } from './client.js';
import { KEY_ID_ANNOTATION, isManaged, keyId, lastUse, type PullSecretProvisioner } from './pullsecret.js';

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
  readonly now: number;
  readonly graceMs: number;
  /** The key id the secret should carry. */
  readonly currentKey: string;
}

export type ReconcileAction = 'recreate' | 'delete' | 'refresh' | 'keep';

/** What the reconciler does with one namespace's pull secret. Pure. */
export function reconcileAction(facts: NamespaceFacts): ReconcileAction {
  const { secret, served } = facts;
  const needed = served && facts.referenced;
  // Deleted (by hand, or by another replica) while Pods still list it: they could not pull.
  if (secret === undefined) return needed ? 'recreate' : 'keep';
  if (!isManaged(secret)) return 'keep';
  if (!needed && facts.now - lastUse(secret) > facts.graceMs) return 'delete';
  return secret.metadata?.annotations?.[KEY_ID_ANNOTATION] !== facts.currentKey ? 'refresh' : 'keep';
}

export class PullSecretReconciler {
  private timer: NodeJS.Timeout | undefined;
  private readonly graceMs: number;
  private readonly now: () => number;

  constructor(
    private readonly core: CoreV1Api,
    private readonly config: () => Config,
    private readonly signingKey: () => Uint8Array,
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

  /** The namespaces where a rewritten Pod lists the pull secret: one paged list of rewritten Pods. */
  private async namespacesReferencing(name: string): Promise<Set<string>> {
    const namespaces = new Set<string>();
    let page: string | undefined;
    do {
      const pods = await this.core.listPodForAllNamespaces({ labelSelector: `${REWRITTEN_LABEL}=true`, limit: 500, ...(page ? { _continue: page } : {}) });
      for (const pod of pods.items) if (pod.spec?.imagePullSecrets?.some((s) => s.name === name)) namespaces.add(pod.metadata?.namespace ?? '');
      page = pods.metadata?._continue || undefined;
    } while (page !== undefined);
    return namespaces;
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
    const currentKey = keyId(this.signingKey());
    const result: ReconcileResult = { refreshed: [], recreated: [], deleted: [], errors: [] };
    // Secrets are read by name in each namespace rather than listed: RBAC can then limit the
    // webhook to the one Secret name it manages instead of every Secret in the cluster.
    const name = config.webhook.pullSecretName;
    const [namespaces, referencing] = await Promise.all([this.core.listNamespace(), this.namespacesReferencing(name)]);
    for (const ns of namespaces.items) {
      const namespace = ns.metadata?.name ?? '';
      const id = `${namespace}/${name}`;
      try {
        const secret = await this.read(namespace, name);
        const action = reconcileAction({ secret, served: namespaceServed(config, ns), referenced: referencing.has(namespace), now: this.now(), graceMs: this.graceMs, currentKey });
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
    if (result.refreshed.length + result.recreated.length + result.deleted.length + result.errors.length > 0) this.logger.info({ ...result }, 'pull secrets reconciled');
    return result;
  }
}
