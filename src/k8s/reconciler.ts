// Background upkeep of the managed pull secrets: refresh them after a broker key rotation, re-create
// those deleted while rewritten Pods still reference them, and remove those whose namespace no
// longer needs one (after a grace period counted from the last admission there).

import type { CoreV1Api, V1Namespace, V1Secret } from '@kubernetes/client-node';
import type { Logger } from '../log.js';
import { ALWAYS_EXCLUDED_NAMESPACES, type Config } from '../rules/config.js';
import { REWRITTEN_LABEL } from '../webhook/admission.js';
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
  return namespace.metadata?.labels?.[config.webhook.optOutLabel] !== 'true';
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

  /** Whether a rewritten Pod in the namespace lists the pull secret (pages through them until one does). */
  private async referenced(namespace: string, name: string): Promise<boolean> {
    let page: string | undefined;
    do {
      const pods = await this.core.listNamespacedPod({ namespace, labelSelector: `${REWRITTEN_LABEL}=true`, limit: 100, ...(page ? { _continue: page } : {}) });
      if (pods.items.some((pod) => pod.spec?.imagePullSecrets?.some((s) => s.name === name))) return true;
      page = pods.metadata?._continue || undefined;
    } while (page !== undefined);
    return false;
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
    const namespaces = await this.core.listNamespace();
    for (const ns of namespaces.items) {
      const namespace = ns.metadata?.name ?? '';
      const id = `${namespace}/${name}`;
      try {
        const served = namespaceServed(config, ns);
        const secret = await this.read(namespace, name);
        if (secret === undefined) {
          // Deleted (by hand, or by another replica) while Pods still reference it: they could not pull.
          if (served && ns.status?.phase !== 'Terminating' && (await this.referenced(namespace, name))) {
            await this.provisioner.ensure(namespace, name, { admission: false });
            result.recreated.push(id);
          }
          continue;
        }
        if (!isManaged(secret)) continue;
        if (this.now() - lastUse(secret) > this.graceMs && !(served && (await this.referenced(namespace, name)))) {
          try {
            // Only the version read: an admission through another replica may have just recorded itself.
            await this.core.deleteNamespacedSecret({ namespace, name, body: { preconditions: { resourceVersion: secret.metadata?.resourceVersion } } });
            result.deleted.push(id);
          } catch (error) {
            if (apiStatus(error) !== 409 && apiStatus(error) !== 404) throw error;
          }
          this.provisioner.forget(namespace, name);
        } else if (secret.metadata?.annotations?.[KEY_ID_ANNOTATION] !== currentKey) {
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
