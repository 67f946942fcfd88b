// The admission resolver's view of the proxy tier: the operations endpoints of the proxy DaemonSet's
// Ready Pods (Pod IP + operations port), listed as the status collector lists them and refreshed on
// a timer. Every webhook replica runs its own (admission is answered by each replica, not only by
// the status collector's Lease holder). Thin adapter.

import type { CoreV1Api, V1Pod } from '@kubernetes/client-node';
import type { Logger } from '../log.js';
import { PeriodicTask } from '../periodic.js';
import { apiMessage } from './client.js';
import { listProxyPods } from './connections.js';

export interface ProxyEndpointsOptions {
  readonly core: CoreV1Api;
  readonly namespace: string;
  readonly proxySelector: string;
  readonly proxyDaemonSet: string;
  readonly opsPort: number;
  readonly intervalMs: number;
  readonly logger: Logger;
}

/** A Pod's operations URL when it is Running, Ready and has an IP; null otherwise. Pure. */
export function proxyEndpoint(pod: V1Pod, opsPort: number): string | null {
  const ip = pod.status?.podIP;
  const ready = pod.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true;
  if (!ip || !ready || pod.status?.phase !== 'Running') return null;
  return `http://${ip.includes(':') ? `[${ip}]` : ip}:${opsPort}`;
}

export class ProxyEndpoints {
  private current: readonly string[] = [];
  private readonly refreshing: PeriodicTask;

  constructor(private readonly options: ProxyEndpointsOptions) {
    this.refreshing = new PeriodicTask(() => this.refresh(), options.intervalMs);
  }

  /** The endpoints as last listed; the last good list while the API cannot be read. */
  endpoints(): readonly string[] {
    return this.current;
  }

  start(): void {
    this.refreshing.start();
  }

  stop(): Promise<void> {
    return this.refreshing.stop();
  }

  async refresh(): Promise<void> {
    const { core, namespace, proxySelector, proxyDaemonSet, opsPort, logger } = this.options;
    try {
      const pods = await listProxyPods(core, namespace, proxySelector, proxyDaemonSet);
      const next = pods.flatMap(({ pod }) => proxyEndpoint(pod, opsPort) ?? []).sort();
      if (next.join(' ') !== this.current.join(' ')) logger.info({ proxies: next.length }, 'admission resolver: proxy endpoints changed');
      this.current = next;
    } catch (error) {
      logger.warn({ error: apiMessage(error) }, 'admission resolver: listing the proxy Pods failed; the last list stays in use');
    }
  }
}
