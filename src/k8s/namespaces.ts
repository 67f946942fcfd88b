// Namespace labels for opt-out, read through the API with a short cache.

import type { CoreV1Api } from '@kubernetes/client-node';
import type { Logger } from '../log.js';
import { apiMessage } from './client.js';

export class NamespaceLabels {
  private readonly cache = new Map<string, { labels: Record<string, string>; until: number }>();

  constructor(
    private readonly core: CoreV1Api,
    private readonly logger: Logger,
    private readonly ttlMs = 30_000,
    private readonly now: () => number = Date.now,
  ) {}

  /** The namespace's labels; undefined when they cannot be read (the Pod is then judged on its own). */
  async get(namespace: string): Promise<Readonly<Record<string, string>> | undefined> {
    const hit = this.cache.get(namespace);
    if (hit && hit.until > this.now()) return hit.labels;
    try {
      const ns = await this.core.readNamespace({ name: namespace });
      const labels = ns.metadata?.labels ?? {};
      if (this.cache.size > 10_000) this.cache.clear();
      this.cache.set(namespace, { labels, until: this.now() + this.ttlMs });
      return labels;
    } catch (error) {
      this.logger.warn({ namespace, error: apiMessage(error) }, 'cannot read namespace labels');
      return undefined;
    }
  }
}
