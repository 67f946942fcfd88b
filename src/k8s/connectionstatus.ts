// RegistryConnection status: what the proxies' /status documents say about each rule, aggregated
// over the nodes, with the condition transitions that become Events. Pure: data in, data out.
//
// One object per rule (named after it). The node cache's state is per node, not per rule; it is
// carried in each rule's `nodes[].cache` rather than in a second kind: one kind to install, grant and
// read, and `kubectl get regconn X -o yaml` then answers "is my pull served, and is the cache on my
// node filling" in one place. The price is a copy per rule, small (a few numbers per node).

import { formatBytes } from '../rules/quantity.js';
import type { UpstreamStatus } from '../upstream/probe.js';

export const CONNECTION_GROUP = 'pullbridge.io';
export const CONNECTION_VERSION = 'v1alpha1';
export const CONNECTION_PLURAL = 'registryconnections';
export const CONNECTION_KIND = 'RegistryConnection';
export const MANAGED_BY_LABEL = 'app.kubernetes.io/managed-by';
export const MANAGED_BY = 'pullbridge-webhook';

export type ConditionType = 'Reachable' | 'Authenticated' | 'Ready';
export const CONDITION_TYPES: readonly ConditionType[] = ['Reachable', 'Authenticated', 'Ready'];

/** metav1.Condition. */
export interface Condition {
  readonly type: ConditionType;
  readonly status: 'True' | 'False' | 'Unknown';
  readonly reason: string;
  readonly message: string;
  readonly lastTransitionTime: string;
}

/** A node cache's state, from the proxy's /status `cache`. */
export interface NodeCacheState {
  readonly bytes: number;
  readonly entries: number;
  /** Hits over every cacheable request (hit, miss, shared); null before the first. */
  readonly hitRatio: number | null;
  readonly fillFailures: number;
  readonly fillsEnabled: boolean;
  /** The shared tier, when configured. */
  readonly shared: { readonly up: boolean; readonly writable: boolean } | null;
}

export interface NodeConnection {
  readonly node: string;
  /** null: not probed yet, or the proxy's status could not be read. */
  readonly reachable: boolean | null;
  /** null: not checkable (passthrough rule) or not known. */
  readonly authenticated: boolean | null;
  readonly latencyMs: number | null;
  readonly lastError: string | null;
  readonly lastSuccess: string | null;
  readonly lastProbe: string | null;
  readonly cache: NodeCacheState | null;
}

export interface RegistryConnectionStatus {
  readonly upstream: string;
  readonly conditions: readonly Condition[];
  readonly nodes: readonly NodeConnection[];
  readonly summary: { readonly nodesReady: number; readonly nodesTotal: number };
  /** `ready/total`, for the NODES column. */
  readonly nodesReady: string;
  /** The slowest node's last probe, e.g. `12ms`, for the LATENCY column. */
  readonly latency: string;
  /** The first failing node's error (`node: error`), for the LAST ERROR column. */
  readonly lastError: string;
  /** The newest success on any node. */
  readonly lastSuccess: string | null;
  readonly lastCollected: string;
}

/** A proxy's /status document, as far as the collector reads it. */
export interface ProxyStatusDocument {
  readonly upstreams: readonly UpstreamStatus[];
  readonly cache: NodeCacheState | null;
}

/** What the collector got from one proxy Pod: its document, or why there is none. */
/** A proxy's /status, or why it could not be read; `starting`: its Pod is not Ready yet and was
 * started moments ago (a fresh install, a rollout): not a fault yet. */
export type ProxyReport = { readonly node: string; readonly document: ProxyStatusDocument } | { readonly node: string; readonly error: string; readonly starting?: boolean };

export interface ConditionChange {
  readonly rule: string;
  readonly type: ConditionType;
  readonly from: Condition['status'] | null;
  readonly to: Condition['status'];
  readonly reason: string;
  readonly message: string;
  /** Warning when it went down, Normal when it recovered. */
  readonly eventType: 'Warning' | 'Normal';
}

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
/** What a status field may hold: every string from a proxy is cut here (the API server refuses large objects). */
const MESSAGE_LIMIT = 1024;
const str = (v: unknown): string | null => (typeof v === 'string' ? v.slice(0, MESSAGE_LIMIT) : null);
const num = (v: unknown): number | null => (typeof v === 'number' && Number.isFinite(v) ? v : null);
/** A count or size: a non-negative number no larger than a safe integer (else none). */
const count = (v: unknown): number | null => {
  const n = num(v);
  return n !== null && n >= 0 && n <= Number.MAX_SAFE_INTEGER ? n : null;
};
const bool = (v: unknown): boolean | null => (typeof v === 'boolean' ? v : null);
const ISO_DATE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$/;
/** An RFC 3339 date-time (the CRD's format: date-time), else null: anything else would sort wrongly
 * into lastSuccess and make the API server refuse the whole status. */
const isoDate = (v: unknown): string | null => (typeof v === 'string' && ISO_DATE.test(v) && !Number.isNaN(Date.parse(v)) ? v : null);

/** Reads a proxy's /status JSON; an error message when it is not one (a proxy of another version,
 * another server). Only the entries of `rules` (the collector's config) are kept, each at most once:
 * a proxy cannot add rules, nor make the document larger than the rules it is asked about. */
export function parseProxyStatus(json: unknown, rules: ReadonlySet<string>): { ok: true; document: ProxyStatusDocument } | { ok: false; error: string } {
  if (!isRecord(json) || !Array.isArray(json.upstreams)) return { ok: false, error: 'not a pullbridge proxy /status document (no "upstreams")' };
  const upstreams: UpstreamStatus[] = [];
  for (const u of json.upstreams as unknown[]) {
    if (!isRecord(u) || typeof u.rule !== 'string') return { ok: false, error: 'an "upstreams" entry has no rule' };
    if (!rules.has(u.rule) || upstreams.some((known) => known.rule === u.rule)) continue;
    upstreams.push({ rule: u.rule, upstream: str(u.upstream) ?? '', via: str(u.via) ?? '', reachable: bool(u.reachable), authOk: bool(u.authOk), latencyMs: count(u.latencyMs), lastError: str(u.lastError), lastSuccess: isoDate(u.lastSuccess), lastCheck: isoDate(u.lastCheck) });
  }
  let cache: NodeCacheState | null = null;
  if (isRecord(json.cache)) {
    const c = json.cache;
    const hits = count(c.hits) ?? 0;
    const looked = hits + (count(c.misses) ?? 0) + (count(c.fromShared) ?? 0);
    const shared = isRecord(c.shared) ? { up: c.shared.up === true, writable: c.shared.writable === true } : null;
    cache = { bytes: count(c.bytes) ?? 0, entries: count(c.entries) ?? 0, hitRatio: looked > 0 ? Math.round((hits / looked) * 1000) / 1000 : null, fillFailures: count(c.fillFailures) ?? 0, fillsEnabled: c.fillsEnabled !== false, shared };
  }
  return { ok: true, document: { upstreams, cache } };
}

const nodeReady = (n: NodeConnection) => n.reachable === true && n.authenticated !== false && n.lastError === null;
const NOT_COLLECTED = 'proxy status not collected: ';
const PROXY_STARTING = 'proxy starting (its Pod is not Ready yet): ';
/** A node whose proxy is starting, or reported but has not loaded or not yet probed the rule. */
const nodePending = (n: NodeConnection) => n.reachable === null && n.lastError !== null && !n.lastError.startsWith(NOT_COLLECTED);

function nodeOf(rule: string, report: ProxyReport): NodeConnection {
  if ('error' in report) return { node: report.node, reachable: null, authenticated: null, latencyMs: null, lastError: `${report.starting ? PROXY_STARTING : NOT_COLLECTED}${report.error}`, lastSuccess: null, lastProbe: null, cache: null };
  const u = report.document.upstreams.find((s) => s.rule === rule);
  const cache = report.document.cache;
  // The proxy does not know the rule yet (its config has not reloaded): not an upstream fault.
  if (!u) return { node: report.node, reachable: null, authenticated: null, latencyMs: null, lastError: 'the proxy on this node does not have this rule yet (config not reloaded)', lastSuccess: null, lastProbe: null, cache };
  const probed = u.lastCheck !== null;
  return { node: report.node, reachable: u.reachable, authenticated: u.authOk, latencyMs: u.latencyMs, lastError: probed ? u.lastError : 'not probed yet', lastSuccess: u.lastSuccess, lastProbe: u.lastCheck, cache };
}

const describe = (nodes: readonly NodeConnection[]) => nodes.map((n) => `${n.node}: ${n.lastError ?? 'failed'}`).join('; ');

function conditionsFor(upstream: string, nodes: readonly NodeConnection[]): Array<Omit<Condition, 'lastTransitionTime'>> {
  const total = nodes.length;
  const probed = nodes.filter((n) => n.reachable !== null);
  const unreachable = probed.filter((n) => n.reachable === false);
  const reachable: Omit<Condition, 'lastTransitionTime'> =
    total === 0
      ? { type: 'Reachable', status: 'Unknown', reason: 'NoProxies', message: 'no proxy Pod reported (none running, or none reachable by the collector)' }
      : probed.length === 0
        ? { type: 'Reachable', status: 'Unknown', reason: 'NotProbed', message: describe(nodes) }
        : unreachable.length > 0
          ? { type: 'Reachable', status: 'False', reason: 'UpstreamUnreachable', message: `${unreachable.length}/${probed.length} node(s) cannot reach ${upstream}: ${describe(unreachable)}` }
          : { type: 'Reachable', status: 'True', reason: 'UpstreamReachable', message: `${probed.length}/${total} node(s) reach ${upstream}` };
  const checked = nodes.filter((n) => n.authenticated !== null);
  const refused = checked.filter((n) => n.authenticated === false);
  const authenticated: Omit<Condition, 'lastTransitionTime'> =
    refused.length > 0
      ? { type: 'Authenticated', status: 'False', reason: 'AuthenticationFailed', message: `${refused.length}/${checked.length} node(s) not authenticated by ${upstream}: ${describe(refused)}` }
      : checked.length > 0
        ? { type: 'Authenticated', status: 'True', reason: 'Authenticated', message: `${checked.length}/${total} node(s) authenticated` }
        : probed.length === 0
          ? { type: 'Authenticated', status: 'Unknown', reason: 'NotProbed', message: 'not probed yet' }
          : probed.some((n) => n.reachable === true)
            ? { type: 'Authenticated', status: 'Unknown', reason: 'NotCheckable', message: 'the rule has no credentials of its own to check (passthrough: each pull brings its own)' }
            : { type: 'Authenticated', status: 'Unknown', reason: 'NotReached', message: `${upstream} was not reached: credentials not checked` };
  const ready = nodes.filter(nodeReady);
  const notReady = nodes.filter((n) => !nodeReady(n));
  // A rule just added reaches the webhook's config at once and a proxy's only when kubelet syncs
  // its ConfigMap volume (up to a minute or so): not loaded or not probed yet is not a fault, so it
  // is Unknown (no Warning Event), unless some node already failed.
  const failed = notReady.filter((n) => !nodePending(n));
  const readyCondition: Omit<Condition, 'lastTransitionTime'> =
    total > 0 && notReady.length === 0
      ? { type: 'Ready', status: 'True', reason: 'Ready', message: `${ready.length}/${total} node(s) ready` }
      : total > 0 && failed.length === 0
        ? { type: 'Ready', status: 'Unknown', reason: 'Pending', message: `${ready.length}/${total} node(s) ready; ${describe(notReady)}` }
        : { type: 'Ready', status: 'False', reason: total === 0 ? 'NoProxies' : 'NodesNotReady', message: total === 0 ? reachable.message : `${ready.length}/${total} node(s) ready; ${describe(notReady)}` };
  return [reachable, authenticated, readyCondition];
}


/** Nodes listed in one object's status.nodes (summary counts them all): with each entry under
 * about 1.5 KiB (strings cut to MESSAGE_LIMIT), an object stays well under the API server's 1.5 MiB.
 * Beyond it, the nodes that are not ready are listed first. */
export const NODES_LISTED_LIMIT = 500;

function listed(nodes: readonly NodeConnection[]): NodeConnection[] {
  if (nodes.length <= NODES_LISTED_LIMIT) return [...nodes];
  const kept = new Set([...nodes.filter((n) => !nodeReady(n)), ...nodes.filter(nodeReady)].slice(0, NODES_LISTED_LIMIT));
  return nodes.filter((n) => kept.has(n));
}

export interface AggregateInput {
  /** The rules of the config in force, in order. */
  readonly rules: ReadonlyArray<{ readonly name: string; readonly upstream: string }>;
  readonly reports: readonly ProxyReport[];
  /** The status each rule's object has now (undefined: no object, or no status yet). */
  readonly previous: ReadonlyMap<string, Pick<RegistryConnectionStatus, 'conditions'> | undefined>;
  /** ISO time of this collection. */
  readonly now: string;
}

/** Each rule's new status, and the condition changes since `previous`. */
export function aggregateConnections(input: AggregateInput): { statuses: Map<string, RegistryConnectionStatus>; changes: ConditionChange[] } {
  const statuses = new Map<string, RegistryConnectionStatus>();
  const changes: ConditionChange[] = [];
  const reports = [...input.reports].sort((a, b) => a.node.localeCompare(b.node));
  for (const rule of input.rules) {
    const nodes = reports.map((r) => nodeOf(rule.name, r));
    const before = input.previous.get(rule.name)?.conditions ?? [];
    const conditions = conditionsFor(rule.upstream, nodes).map((c): Condition => {
      const old = before.find((b) => b.type === c.type);
      const message = c.message.slice(0, MESSAGE_LIMIT);
      if (old?.status !== c.status) {
        // Events: a change between True and False, and a rule that is down when first seen.
        const down = c.status === 'False' && (old === undefined || old.status !== 'False');
        const recovered = c.status === 'True' && old?.status === 'False';
        if (down || recovered) changes.push({ rule: rule.name, type: c.type, from: old?.status ?? null, to: c.status, reason: c.reason, message, eventType: down ? 'Warning' : 'Normal' });
      }
      return { ...c, message, lastTransitionTime: old && old.status === c.status ? old.lastTransitionTime : input.now };
    });
    const latencies = nodes.map((n) => n.latencyMs).filter((l): l is number => l !== null);
    const successes = nodes.map((n) => n.lastSuccess).filter((s): s is string => s !== null).sort();
    const failing = nodes.find((n) => n.lastError !== null);
    const ready = nodes.filter(nodeReady).length;
    statuses.set(rule.name, {
      upstream: rule.upstream,
      conditions,
      nodes: listed(nodes),
      summary: { nodesReady: ready, nodesTotal: nodes.length },
      nodesReady: `${ready}/${nodes.length}`,
      latency: latencies.length > 0 ? `${Math.round(Math.max(...latencies))}ms` : '',
      lastError: failing ? `${failing.node}: ${failing.lastError ?? ''}`.slice(0, MESSAGE_LIMIT) : '',
      lastSuccess: successes.at(-1) ?? null,
      lastCollected: input.now,
    });
  }
  return { statuses, changes };
}

/** Which objects to create (rules without one) and delete (objects of rules no longer in the config). */
export function planObjects(rules: readonly string[], existing: readonly string[]): { create: string[]; remove: string[] } {
  return { create: rules.filter((r) => !existing.includes(r)), remove: existing.filter((e) => !rules.includes(e)) };
}

/** A RegistryConnection as read back from the API (status may be absent before the first collection). */
export interface ConnectionObject {
  readonly name: string;
  readonly status?: Partial<RegistryConnectionStatus>;
}

const conditionStatus = (o: ConnectionObject, type: ConditionType) => o.status?.conditions?.find((c) => c.type === type)?.status ?? 'Unknown';

/** Whether every rule's Ready condition is True (and there is at least one rule). */
export function allReady(objects: readonly ConnectionObject[]): boolean {
  return objects.length > 0 && objects.every((o) => conditionStatus(o, 'Ready') === 'True');
}

function table(rows: ReadonlyArray<readonly string[]>): string {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? [];
  return rows.map((r) => r.map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i] ?? 0))).join('  ').trimEnd()).join('\n');
}

/** The table `pullbridge status` prints: one line per rule, then one per node's cache. */
export function formatConnectionTable(objects: readonly ConnectionObject[]): string {
  const rules = [
    ['RULE', 'UPSTREAM', 'READY', 'REACHABLE', 'AUTHENTICATED', 'NODES', 'LATENCY', 'LAST SUCCESS', 'LAST ERROR'],
    ...objects.map((o) => [o.name, o.status?.upstream ?? '', conditionStatus(o, 'Ready'), conditionStatus(o, 'Reachable'), conditionStatus(o, 'Authenticated'), o.status?.nodesReady ?? '0/0', o.status?.latency || '-', o.status?.lastSuccess ?? '-', o.status?.lastError || '-']),
  ];
  const caches = new Map<string, NodeCacheState | null>();
  // The CRD lets a node's cache, or its shared tier, be absent (an older writer): as off.
  for (const o of objects) for (const n of o.status?.nodes ?? []) if (!caches.has(n.node) || caches.get(n.node) === null) caches.set(n.node, n.cache ?? null);
  const nodes = [
    ['NODE', 'CACHE', 'ENTRIES', 'HIT RATIO', 'FILL FAILURES', 'SHARED TIER'],
    ...[...caches.entries()]
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([node, c]) => (c === null ? [node, 'off', '-', '-', '-', '-'] : [node, `${formatBytes(c.bytes)}${c.fillsEnabled ? '' : ' (fills paused: disk)'}`, String(c.entries), c.hitRatio === null ? '-' : `${(c.hitRatio * 100).toFixed(1)}%`, String(c.fillFailures), c.shared == null ? 'off' : `${c.shared.up ? 'up' : 'DOWN'}, ${c.shared.writable ? 'writable' : 'READ-ONLY'}`])),
  ];
  return `${table(rules)}\n${caches.size > 0 ? `\n${table(nodes)}\n` : ''}`;
}
