// Background upkeep of the managed pull secrets: refresh them after a broker key rotation, and
// remove those whose namespace no longer needs one (after a grace period).

import type { CoreV1Api, V1Secret } from '@kubernetes/client-node';
import type { Logger } from '../log.js';
import { ALWAYS_EXCLUDED_NAMESPACES, type Config } from '../rules/config.js';
import { REWRITTEN_LABEL } from '../webhook/admission.js';
import { apiMessage, apiStatus } from './client.js';
import { KEY_ID_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL, keyId, type PullSecretProvisioner } from './pullsecret.js';

export interface ReconcileResult {
  readonly refreshed: string[];
  readonly deleted: string[];
  readonly errors: string[];
}

export interface ReconcilerOptions {
  /** A secret younger than this is kept even without Pods: the webhook creates it before the Pod exists. */
  readonly graceMs?: number;
  readonly now?: () => number;
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
    this.graceMs = options.graceMs ?? 10 * 60_000;
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

  private async namespaceNeedsSecret(namespace: string, config: Config): Promise<boolean> {
    if (ALWAYS_EXCLUDED_NAMESPACES.includes(namespace) || namespace === config.webhook.namespace || config.webhook.excludedNamespaces.includes(namespace)) return false;
    const ns = await this.core.readNamespace({ name: namespace });
    if (ns.metadata?.labels?.[config.webhook.optOutLabel] === 'true') return false;
    const pods = await this.core.listNamespacedPod({ namespace, labelSelector: `${REWRITTEN_LABEL}=true`, limit: 1 });
    return pods.items.length > 0;
  }

  private async readManaged(namespace: string, name: string): Promise<V1Secret | undefined> {
    try {
      const secret = await this.core.readNamespacedSecret({ namespace, name });
      return secret.metadata?.labels?.[MANAGED_BY_LABEL] === MANAGED_BY ? secret : undefined;
    } catch (error) {
      if (apiStatus(error) === 404) return undefined;
      throw error;
    }
  }

  async reconcile(): Promise<ReconcileResult> {
    const config = this.config();
    const currentKey = keyId(this.signingKey());
    const result: ReconcileResult = { refreshed: [], deleted: [], errors: [] };
    // Secrets are read by name in each namespace rather than listed: RBAC can then limit the
    // webhook to the one Secret name it manages instead of every Secret in the cluster.
    const name = config.webhook.pullSecretName;
    const namespaces = await this.core.listNamespace();
    for (const ns of namespaces.items) {
      const namespace = ns.metadata?.name ?? '';
      const id = `${namespace}/${name}`;
      try {
        const secret = await this.readManaged(namespace, name);
        if (!secret) continue;
        const created = secret.metadata?.creationTimestamp ? new Date(secret.metadata.creationTimestamp).getTime() : 0;
        if (!(await this.namespaceNeedsSecret(namespace, config)) && this.now() - created > this.graceMs) {
          await this.core.deleteNamespacedSecret({ namespace, name });
          this.provisioner.forget(namespace, name);
          result.deleted.push(id);
        } else if (secret.metadata?.annotations?.[KEY_ID_ANNOTATION] !== currentKey) {
          this.provisioner.forget(namespace, name);
          await this.provisioner.ensure(namespace, name);
          result.refreshed.push(id);
        }
      } catch (error) {
        result.errors.push(`${id}: ${error instanceof Error ? error.message : apiMessage(error)}`);
      }
    }
    if (result.refreshed.length + result.deleted.length + result.errors.length > 0) this.logger.info({ ...result }, 'pull secrets reconciled');
    return result;
  }
}
