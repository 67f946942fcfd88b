// The status collector: one webhook replica (holding a Lease) reads each proxy Pod's /status on its
// operations port and writes the RegistryConnection objects and their Events. The webhook writes,
// not the proxies: they hold no API token, and every Pod on a node can reach them. Thin adapter;
// the aggregation is src/k8s/connectionstatus.ts.

import { V1MicroTime, type CoordinationV1Api, type CoreV1Api, type CustomObjectsApi, type V1Lease, type V1Pod } from '@kubernetes/client-node';
import { Gauge, type Registry } from 'prom-client';
import type { Logger } from '../log.js';
import { PeriodicTask } from '../periodic.js';
import type { Config } from '../rules/config.js';
import { apiMessage, apiStatus } from './client.js';
import {
  aggregateConnections,
  CONNECTION_GROUP,
  CONNECTION_KIND,
  CONNECTION_PLURAL,
  CONNECTION_VERSION,
  MANAGED_BY,
  MANAGED_BY_LABEL,
  parseProxyStatus,
  planObjects,
  type ConditionChange,
  type ProxyReport,
  type RegistryConnectionStatus,
} from './connectionstatus.js';

/** A Lease held by one replica at a time: taken when free or expired, renewed by its holder;
 * every write is conditional on the resourceVersion read, so two replicas never both win. */
export class LeaseElector {
  constructor(
    private readonly coordination: CoordinationV1Api,
    private readonly namespace: string,
    private readonly name: string,
    private readonly identity: string,
    private readonly durationSeconds: number,
    private readonly now: () => number = Date.now,
  ) {}

  /** Takes or renews the Lease; whether this replica holds it now. */
  async acquire(): Promise<boolean> {
    let lease: V1Lease | undefined;
    try {
      lease = await this.coordination.readNamespacedLease({ name: this.name, namespace: this.namespace });
    } catch (error) {
      if (apiStatus(error) !== 404) throw error;
    }
    const now = new V1MicroTime(this.now());
    const spec = { holderIdentity: this.identity, leaseDurationSeconds: this.durationSeconds, renewTime: now };
    try {
      if (!lease) {
        await this.coordination.createNamespacedLease({ namespace: this.namespace, body: { metadata: { name: this.name, namespace: this.namespace }, spec: { ...spec, acquireTime: now, leaseTransitions: 0 } } });
        return true;
      }
      const held = lease.spec?.holderIdentity;
      const renewed = lease.spec?.renewTime ? new Date(lease.spec.renewTime).getTime() : 0;
      const expired = renewed + (lease.spec?.leaseDurationSeconds ?? this.durationSeconds) * 1000 < this.now();
      if (held && held !== this.identity && !expired) return false;
      const taken = held !== this.identity;
      await this.coordination.replaceNamespacedLease({
        name: this.name,
        namespace: this.namespace,
        body: { ...lease, spec: { ...lease.spec, ...spec, ...(taken ? { acquireTime: now, leaseTransitions: (lease.spec?.leaseTransitions ?? 0) + 1 } : {}) } },
      });
      return true;
    } catch (error) {
      if (apiStatus(error) === 409) return false; // another replica wrote first
      throw error;
    }
  }

  /** Lets another replica take over at once (shutdown). */
  async release(): Promise<void> {
    try {
      const lease = await this.coordination.readNamespacedLease({ name: this.name, namespace: this.namespace });
      if (lease.spec?.holderIdentity !== this.identity) return;
      await this.coordination.replaceNamespacedLease({ name: this.name, namespace: this.namespace, body: { ...lease, spec: { ...lease.spec, holderIdentity: undefined, renewTime: undefined } } });
    } catch {
      // It expires by itself.
    }
  }
}

export interface StatusCollectorOptions {
  readonly core: CoreV1Api;
  readonly custom: CustomObjectsApi;
  readonly coordination: CoordinationV1Api;
  /** The release namespace: the proxy Pods, the Lease and the RegistryConnection objects. */
  readonly namespace: string;
  /** Label selector of the proxy DaemonSet's Pods. */
  readonly proxySelector: string;
  /** The proxy DaemonSet's name: only Running Pods it controls are read (and get the token); a Pod
   * someone else made with the same labels is not. */
  readonly proxyDaemonSet: string;
  /** The proxies' operations port. */
  readonly opsPort: number;
  readonly intervalMs: number;
  /** This replica's name in the Lease (its Pod name). */
  readonly identity: string;
  readonly config: () => Config;
  /** The collector token the proxies accept (opsToken of the signing key, 'collector'). */
  readonly token: () => string;
  readonly logger: Logger;
  readonly leaseName?: string;
  /** Where the collected conditions are exported too (the webhook's metrics port is scrapable with every exposure). */
  readonly metrics?: Registry;
  /** Events about condition changes. */
  readonly recordEvent: (object: string, change: ConditionChange) => Promise<void>;
}

interface StoredConnection {
  readonly metadata?: { readonly name?: string; readonly resourceVersion?: string; readonly labels?: Record<string, string> };
  readonly status?: RegistryConnectionStatus;
}

/** How long one proxy's /status may take. */
const PROXY_TIMEOUT_MS = 5_000;
/** The largest /status document read (a real one is a few KiB per rule): a larger one is refused
 * unread, or cut off when its size was not declared, so that no proxy can exhaust the webhook's memory. */
export const STATUS_BODY_LIMIT_BYTES = 1 << 20;

/** The body of `res`, at most `limit` bytes; null (and the rest unread) when it is larger. */
async function readBounded(res: Response, limit: number): Promise<Buffer | null> {
  const declared = Number(res.headers.get('content-length') ?? Number.NaN);
  if (Number.isFinite(declared) && declared > limit) {
    await res.body?.cancel().catch(() => undefined);
    return null;
  }
  if (!res.body) return Buffer.alloc(0);
  const reader = res.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return Buffer.concat(chunks, size);
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel().catch(() => undefined);
      return null;
    }
    chunks.push(value);
  }
}

/**
 * What the collector does with a Pod the selector lists: `read` its /status (Running, controlled by
 * the proxy DaemonSet: only those get the token), count it as `pending` (the DaemonSet's, not
 * running yet: a fresh install or a rollout; never sent the token), or `skip` it.
 */
export function proxyPodRole(pod: V1Pod, daemonSet: string): 'read' | 'pending' | 'skip' {
  if (pod.metadata?.deletionTimestamp !== undefined) return 'skip';
  const controller = pod.metadata?.ownerReferences?.find((o) => o.controller === true);
  if (!(controller?.apiVersion === 'apps/v1' && controller.kind === 'DaemonSet' && controller.name === daemonSet)) return 'skip';
  return pod.status?.phase === 'Running' ? 'read' : pod.status?.phase === 'Pending' ? 'pending' : 'skip';
}

/**
 * The proxy DaemonSet's Pods that the webhook may talk to, with their role (proxyPodRole; skipped
 * ones left out): one listing for the status collector and the admission resolver's discovery.
 */
export async function listProxyPods(core: CoreV1Api, namespace: string, selector: string, daemonSet: string): Promise<Array<{ readonly pod: V1Pod; readonly role: 'read' | 'pending' }>> {
  const pods = await core.listNamespacedPod({ namespace, labelSelector: selector });
  return pods.items.flatMap((pod) => {
    const role = proxyPodRole(pod, daemonSet);
    return role === 'skip' ? [] : [{ pod, role }];
  });
}

/** How long after its container started a proxy Pod that is not Ready counts as starting (its
 * cache scan and first probe), not as down. */
const PROXY_START_GRACE_MS = 120_000;

/** Whether `pod` is a proxy just starting: not Ready, its container created or started within the
 * grace period (a crash-looping one is not: its container waits in CrashLoopBackOff). */
export function isStartingProxyPod(pod: V1Pod, now: number): boolean {
  if (pod.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True')) return false;
  const states = pod.status?.containerStatuses ?? [];
  if (states.length === 0) {
    const created = pod.metadata?.creationTimestamp;
    return created === undefined || now - new Date(created).getTime() < PROXY_START_GRACE_MS;
  }
  return states.every((c) => {
    const started = c.state?.running?.startedAt;
    if (started !== undefined) return now - new Date(started).getTime() < PROXY_START_GRACE_MS;
    return c.state?.waiting?.reason === 'ContainerCreating' || c.state?.waiting?.reason === 'PodInitializing';
  });
}

export class StatusCollector {
  private readonly elector: LeaseElector;
  /** One collection at a time: a slow one is not stacked on. */
  private readonly collecting: PeriodicTask;
  private leading = false;
  private readonly gauges: { ready: Gauge<'rule'>; reachable: Gauge<'rule'> } | undefined;

  constructor(private readonly options: StatusCollectorOptions) {
    const registers = options.metrics ? [options.metrics] : undefined;
    // Only the collecting replica has values: alerts take the max over replicas.
    this.gauges = registers && {
      ready: new Gauge({ name: 'pullbridge_registry_connection_ready', help: "A rule's Ready condition as the status collector last wrote it: 1 True, 0 False, -1 Unknown (a rule on its way to the proxies; set by the collecting replica only)", labelNames: ['rule'], registers }),
      reachable: new Gauge({ name: 'pullbridge_registry_connection_reachable', help: "A rule's Reachable condition: 1 True, 0 False, -1 Unknown (set by the collecting replica only)", labelNames: ['rule'], registers }),
    };
    // Held across at least three missed collections before another replica takes over.
    const duration = Math.max(15, Math.ceil((options.intervalMs * 3) / 1000));
    this.elector = new LeaseElector(options.coordination, options.namespace, options.leaseName ?? 'pullbridge-status-collector', options.identity, duration);
    this.collecting = new PeriodicTask(() => this.tick(), options.intervalMs);
  }

  start(): void {
    this.collecting.start();
  }

  async stop(): Promise<void> {
    await this.collecting.stop();
    if (this.leading) await this.elector.release();
  }

  private async tick(): Promise<void> {
    try {
      const leading = await this.elector.acquire();
      if (leading !== this.leading) this.options.logger.info({ identity: this.options.identity }, leading ? 'status collector: this replica collects' : 'status collector: another replica collects');
      this.leading = leading;
      if (leading) await this.collect();
      else {
        this.gauges?.ready.reset();
        this.gauges?.reachable.reset();
      }
    } catch (error) {
      this.options.logger.warn({ error: apiMessage(error) }, 'status collection failed');
    }
  }

  /** Reads one proxy's /status on its Pod IP. */
  private async report(node: string, podIP: string, rules: ReadonlySet<string>): Promise<ProxyReport> {
    const host = podIP.includes(':') ? `[${podIP}]` : podIP;
    try {
      // No redirects: the token is for the proxy, and the collector fetches nothing else.
      const res = await fetch(`http://${host}:${this.options.opsPort}/status`, { headers: { authorization: `Bearer ${this.options.token()}` }, redirect: 'error', signal: AbortSignal.timeout(PROXY_TIMEOUT_MS) });
      if (!res.ok) {
        await res.body?.cancel().catch(() => undefined);
        return { node, error: `${host}:${this.options.opsPort}/status answered ${res.status}${res.status === 401 || res.status === 403 ? ' (collector token refused: do the proxy and the webhook hold the same broker key?)' : ''}` };
      }
      const body = await readBounded(res, STATUS_BODY_LIMIT_BYTES);
      if (body === null) return { node, error: `${host}:${this.options.opsPort}/status: the document is larger than ${STATUS_BODY_LIMIT_BYTES} bytes` };
      let json: unknown;
      try {
        json = JSON.parse(body.toString('utf8'));
      } catch {
        return { node, error: `${host}:${this.options.opsPort}/status: not JSON` };
      }
      const parsed = parseProxyStatus(json, rules);
      return parsed.ok ? { node, document: parsed.document } : { node, error: parsed.error };
    } catch (error) {
      const reason = (error as { cause?: { code?: string; message?: string } }).cause;
      const cause = reason?.code ?? reason?.message ?? (error as Error).message;
      return { node, error: `${host}:${this.options.opsPort}: ${cause}` };
    }
  }

  /** One collection: every proxy Pod's /status, then the objects' status, then Events. */
  async collect(): Promise<void> {
    const { core, custom, namespace } = this.options;
    const rules = this.options.config().registries.map((r) => ({ name: r.name, upstream: r.upstream }));
    const ruleNames = new Set(rules.map((r) => r.name));
    const pods = await listProxyPods(core, namespace, this.options.proxySelector, this.options.proxyDaemonSet);
    const reports = await Promise.all(
      pods.map(({ pod: p, role }) => {
          const node = p.spec?.nodeName ?? p.metadata?.name ?? '';
          const ip = p.status?.podIP;
          const waiting = p.status?.containerStatuses?.find((c) => c.state?.waiting?.reason)?.state?.waiting?.reason;
          const report =
            role === 'pending'
              ? Promise.resolve<ProxyReport>({ node, error: `the proxy Pod is Pending${waiting ? ` (${waiting})` : ''}` })
              : ip
                ? this.report(node, ip, ruleNames)
                : Promise.resolve<ProxyReport>({ node, error: 'the proxy Pod has no IP yet' });
          return report.then((r): ProxyReport => ('error' in r && isStartingProxyPod(p, Date.now()) ? { ...r, starting: true } : r));
        }),
    );
    const api = { group: CONNECTION_GROUP, version: CONNECTION_VERSION, namespace, plural: CONNECTION_PLURAL };
    const listed = (await custom.listNamespacedCustomObject(api)) as { items?: StoredConnection[] };
    const existing = new Map((listed.items ?? []).filter((o) => o.metadata?.labels?.[MANAGED_BY_LABEL] === MANAGED_BY).map((o) => [o.metadata?.name ?? '', o]));
    const plan = planObjects(
      rules.map((r) => r.name),
      [...existing.keys()],
    );
    for (const name of plan.remove) {
      try {
        await custom.deleteNamespacedCustomObject({ ...api, name });
      } catch (error) {
        if (apiStatus(error) !== 404) throw error;
      }
      existing.delete(name);
    }
    for (const name of plan.create) {
      try {
        const created = (await custom.createNamespacedCustomObject({ ...api, body: { apiVersion: `${CONNECTION_GROUP}/${CONNECTION_VERSION}`, kind: CONNECTION_KIND, metadata: { name, namespace, labels: { [MANAGED_BY_LABEL]: MANAGED_BY } } } })) as StoredConnection;
        existing.set(name, created);
      } catch (error) {
        // An object of that name not made by pullbridge: left alone.
        if (apiStatus(error) !== 409) throw error;
      }
    }
    const { statuses, changes } = aggregateConnections({ rules, reports, previous: new Map([...existing].map(([name, o]) => [name, o.status])), now: new Date().toISOString() });
    this.gauges?.ready.reset();
    this.gauges?.reachable.reset();
    const value = (status: RegistryConnectionStatus, type: 'Ready' | 'Reachable') => ({ True: 1, False: 0, Unknown: -1 })[status.conditions.find((c) => c.type === type)?.status ?? 'Unknown'];
    for (const [name, status] of statuses) {
      this.gauges?.ready.set({ rule: name }, value(status, 'Ready'));
      this.gauges?.reachable.set({ rule: name }, value(status, 'Reachable'));
      const stored = existing.get(name);
      if (!stored) continue;
      try {
        await custom.replaceNamespacedCustomObjectStatus({ ...api, name, body: { apiVersion: `${CONNECTION_GROUP}/${CONNECTION_VERSION}`, kind: CONNECTION_KIND, metadata: { ...stored.metadata, name, namespace }, status } });
      } catch (error) {
        // Changed meanwhile (another collector, a person): the next collection writes it. Any other
        // refusal is this rule's alone: the other rules' status is still written.
        if (apiStatus(error) !== 409) this.options.logger.warn({ rule: name, error: apiMessage(error) }, 'registry connection status not written');
        continue;
      }
      for (const change of changes.filter((c) => c.rule === name)) {
        if (change.eventType === 'Warning') this.options.logger.warn({ rule: name, condition: change.type, status: change.to, message: change.message }, 'registry connection condition changed');
        else this.options.logger.info({ rule: name, condition: change.type, status: change.to }, 'registry connection condition changed');
        await this.options.recordEvent(name, change);
      }
    }
  }
}
