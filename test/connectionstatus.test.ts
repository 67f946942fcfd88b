// The RegistryConnection aggregation (pure): proxies' /status documents in, each rule's status and
// the condition changes (Events) out; the table `pullbridge status` prints; and who may read the
// proxies' operations endpoints (the collector's token).

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { aggregateConnections, allReady, formatConnectionTable, parseProxyStatus, planObjects, type ProxyReport, type ProxyStatusDocument, type RegistryConnectionStatus } from '../src/k8s/connectionstatus.js';
import { collectorToken } from '../src/proxy/credentials.js';
import { opsRefusal, type OpsRequestFacts } from '../src/proxy/ops.js';
import type { UpstreamStatus } from '../src/upstream/probe.js';

const T0 = '2026-12-06T10:00:00.000Z';
const T1 = '2026-12-06T10:00:30.000Z';
const RULES = [
  { name: 'corp', upstream: 'https://registry.corp.example:5000' },
  { name: 'onprem', upstream: 'http://onprem.example:443' },
];

const up = (rule: string, over: Partial<UpstreamStatus> = {}): UpstreamStatus => ({ rule, upstream: '', via: 'direct', reachable: true, authOk: true, latencyMs: 4.2, lastError: null, lastSuccess: T0, lastCheck: T0, ...over });
const doc = (upstreams: UpstreamStatus[], cache: ProxyStatusDocument['cache'] = null): ProxyStatusDocument => ({ upstreams, cache });
const condition = (s: RegistryConnectionStatus | undefined, type: string) => s?.conditions.find((c) => c.type === type);

describe('RegistryConnection aggregation', () => {
  it('all nodes reach and authenticate: Ready, 2/2, the slowest latency, no event for a rule first seen up', () => {
    const reports: ProxyReport[] = [
      { node: 'node-b', document: doc([up('corp', { latencyMs: 12.6 }), up('onprem', { authOk: null })]) },
      { node: 'node-a', document: doc([up('corp'), up('onprem', { authOk: null })]) },
    ];
    const { statuses, changes } = aggregateConnections({ rules: RULES, reports, previous: new Map(), now: T1 });
    const corp = statuses.get('corp');
    assert.equal(corp?.upstream, 'https://registry.corp.example:5000');
    assert.deepEqual(corp?.conditions.map((c) => [c.type, c.status, c.reason, c.lastTransitionTime]), [
      ['Reachable', 'True', 'UpstreamReachable', T1],
      ['Authenticated', 'True', 'Authenticated', T1],
      ['Ready', 'True', 'Ready', T1],
    ]);
    assert.equal(corp?.nodesReady, '2/2');
    assert.deepEqual(corp?.summary, { nodesReady: 2, nodesTotal: 2 });
    assert.equal(corp?.latency, '13ms');
    assert.equal(corp?.lastError, '');
    assert.deepEqual(corp?.nodes.map((n) => n.node), ['node-a', 'node-b'], 'nodes in name order');
    // A passthrough rule has no credentials to check: Unknown, and still Ready.
    const onprem = statuses.get('onprem');
    assert.equal(condition(onprem, 'Authenticated')?.status, 'Unknown');
    assert.equal(condition(onprem, 'Authenticated')?.reason, 'NotCheckable');
    assert.equal(condition(onprem, 'Ready')?.status, 'True');
    assert.deepEqual(changes, []);
  });

  it('one node cannot reach the upstream: Reachable=False with that node\'s error, a Warning per condition that went down; recovery: Normal events, transition times move', () => {
    const upState = aggregateConnections({ rules: RULES.slice(0, 1), reports: [{ node: 'node-a', document: doc([up('corp')]) }, { node: 'node-b', document: doc([up('corp')]) }], previous: new Map(), now: T0 });
    const down = aggregateConnections({
      rules: RULES.slice(0, 1),
      reports: [
        { node: 'node-a', document: doc([up('corp')]) },
        { node: 'node-b', document: doc([up('corp', { reachable: false, authOk: null, lastError: 'ECONNREFUSED: connect ECONNREFUSED 127.0.0.1:5000', lastCheck: T1 })]) },
      ],
      previous: upState.statuses,
      now: T1,
    });
    const corp = down.statuses.get('corp');
    assert.equal(condition(corp, 'Reachable')?.status, 'False');
    assert.equal(condition(corp, 'Reachable')?.reason, 'UpstreamUnreachable');
    assert.equal(condition(corp, 'Reachable')?.message, '1/2 node(s) cannot reach https://registry.corp.example:5000: node-b: ECONNREFUSED: connect ECONNREFUSED 127.0.0.1:5000');
    assert.equal(condition(corp, 'Reachable')?.lastTransitionTime, T1);
    // node-a still authenticates: Authenticated stays True, its transition time kept.
    assert.equal(condition(corp, 'Authenticated')?.status, 'True');
    assert.equal(condition(corp, 'Authenticated')?.lastTransitionTime, T0);
    assert.equal(condition(corp, 'Ready')?.status, 'False');
    assert.equal(corp?.nodesReady, '1/2');
    assert.equal(corp?.lastError, 'node-b: ECONNREFUSED: connect ECONNREFUSED 127.0.0.1:5000');
    assert.deepEqual(
      down.changes.map((c) => [c.type, c.from, c.to, c.eventType, c.reason]),
      [
        ['Reachable', 'True', 'False', 'Warning', 'UpstreamUnreachable'],
        ['Ready', 'True', 'False', 'Warning', 'NodesNotReady'],
      ],
    );
    const recovered = aggregateConnections({ rules: RULES.slice(0, 1), reports: [{ node: 'node-a', document: doc([up('corp')]) }, { node: 'node-b', document: doc([up('corp')]) }], previous: down.statuses, now: '2026-12-06T10:01:00.000Z' });
    assert.deepEqual(
      recovered.changes.map((c) => [c.type, c.to, c.eventType]),
      [
        ['Reachable', 'True', 'Normal'],
        ['Ready', 'True', 'Normal'],
      ],
    );
    assert.equal(condition(recovered.statuses.get('corp'), 'Reachable')?.lastTransitionTime, '2026-12-06T10:01:00.000Z');
    // The same state again: no events.
    assert.deepEqual(aggregateConnections({ rules: RULES.slice(0, 1), reports: [{ node: 'node-a', document: doc([up('corp')]) }, { node: 'node-b', document: doc([up('corp')]) }], previous: recovered.statuses, now: T1 }).changes, []);
  });

  it('rejected credentials: Authenticated=False (reachable), a Warning even when first seen', () => {
    const { statuses, changes } = aggregateConnections({ rules: RULES.slice(0, 1), reports: [{ node: 'n', document: doc([up('corp', { authOk: false, lastError: 'upstream rejected the configured credentials' })]) }], previous: new Map(), now: T0 });
    const corp = statuses.get('corp');
    assert.equal(condition(corp, 'Reachable')?.status, 'True');
    assert.equal(condition(corp, 'Authenticated')?.status, 'False');
    assert.match(condition(corp, 'Authenticated')?.message ?? '', /n: upstream rejected the configured credentials/);
    assert.deepEqual(changes.map((c) => [c.type, c.from, c.eventType]), [
      ['Authenticated', null, 'Warning'],
      ['Ready', null, 'Warning'],
    ]);
  });

  it('a proxy whose status cannot be read, one without the rule yet, one not probed yet: not ready, each saying why; only the last two: pending (Unknown, no event); no proxies: Unknown', () => {
    const { statuses } = aggregateConnections({
      rules: RULES.slice(0, 1),
      reports: [
        { node: 'a', error: '10.0.0.1:9090: ECONNREFUSED' },
        { node: 'b', document: doc([]) },
        { node: 'c', document: doc([up('corp', { reachable: null, authOk: null, lastCheck: null, lastSuccess: null, latencyMs: null })]) },
      ],
      previous: new Map(),
      now: T0,
    });
    const corp = statuses.get('corp');
    assert.deepEqual(corp?.nodes.map((n) => n.lastError), ['proxy status not collected: 10.0.0.1:9090: ECONNREFUSED', 'the proxy on this node does not have this rule yet (config not reloaded)', 'not probed yet']);
    assert.equal(condition(corp, 'Reachable')?.status, 'Unknown');
    assert.equal(condition(corp, 'Ready')?.status, 'False');
    assert.equal(corp?.nodesReady, '0/3');
    // Without the node whose status could not be read: a rule on its way to the proxies (the
    // webhook sees a new rule before kubelet syncs the proxies' ConfigMap volume) is Unknown, and
    // raises no Warning Event; Ready when it arrives, with no Normal Event either (it never failed).
    const pending = aggregateConnections({ rules: RULES.slice(0, 1), reports: [{ node: 'b', document: doc([]) }, { node: 'c', document: doc([up('corp', { reachable: null, authOk: null, lastCheck: null, lastSuccess: null, latencyMs: null })]) }], previous: new Map(), now: T0 });
    assert.deepEqual(pending.statuses.get('corp')?.conditions.map((c) => [c.type, c.status, c.reason]), [
      ['Reachable', 'Unknown', 'NotProbed'],
      ['Authenticated', 'Unknown', 'NotProbed'],
      ['Ready', 'Unknown', 'Pending'],
    ]);
    assert.deepEqual(pending.changes, []);
    const arrived = aggregateConnections({ rules: RULES.slice(0, 1), reports: [{ node: 'b', document: doc([up('corp')]) }, { node: 'c', document: doc([up('corp')]) }], previous: pending.statuses, now: T0 });
    assert.equal(condition(arrived.statuses.get('corp'), 'Ready')?.status, 'True');
    assert.deepEqual(arrived.changes, []);
    const none = aggregateConnections({ rules: RULES.slice(0, 1), reports: [], previous: new Map(), now: T0 }).statuses.get('corp');
    assert.deepEqual(none?.conditions.map((c) => [c.type, c.status, c.reason]), [
      ['Reachable', 'Unknown', 'NoProxies'],
      ['Authenticated', 'Unknown', 'NotProbed'],
      ['Ready', 'False', 'NoProxies'],
    ]);
  });

  it('reads a proxy /status document: upstreams, cache counts as a hit ratio, the shared tier; refuses what is not one', () => {
    const parsed = parseProxyStatus({
      configLoaded: true,
      upstreams: [up('corp')],
      cache: { bytes: 2048, entries: 3, hits: 6, misses: 1, fromShared: 1, fillFailures: 2, fillsEnabled: true, shared: { kind: 's3', up: false, writable: true } },
    });
    assert.ok(parsed.ok);
    assert.deepEqual(parsed.document.cache, { bytes: 2048, entries: 3, hitRatio: 0.75, fillFailures: 2, fillsEnabled: true, shared: { up: false, writable: true } });
    assert.deepEqual(parsed.document.upstreams, [up('corp')]);
    const noCache = parseProxyStatus({ upstreams: [], cache: null });
    assert.ok(noCache.ok && noCache.document.cache === null);
    const fresh = parseProxyStatus({ upstreams: [], cache: { bytes: 0, entries: 0, hits: 0, misses: 0, fromShared: 0, shared: null } });
    assert.ok(fresh.ok && fresh.document.cache?.hitRatio === null, 'no ratio before the first request');
    assert.deepEqual(parseProxyStatus('<html>'), { ok: false, error: 'not a pullbridge proxy /status document (no "upstreams")' });
    assert.deepEqual(parseProxyStatus({ upstreams: [{ upstream: 'x' }] }), { ok: false, error: 'an "upstreams" entry has no rule' });
  });

  it('plans objects: created for new rules, deleted for rules gone', () => {
    assert.deepEqual(planObjects(['corp', 'hub'], ['corp', 'old']), { create: ['hub'], remove: ['old'] });
    assert.deepEqual(planObjects([], []), { create: [], remove: [] });
  });

  it('prints the table: a line per rule, then each node\'s cache; all ready only when every rule is', () => {
    const cache = { bytes: 3 * 1024 * 1024, entries: 12, hitRatio: 0.875, fillFailures: 0, fillsEnabled: true, shared: { up: true, writable: false } };
    const { statuses } = aggregateConnections({
      rules: RULES,
      reports: [
        { node: 'node-a', document: doc([up('corp'), up('onprem', { reachable: false, authOk: null, lastError: 'ETIMEDOUT: connect', lastSuccess: null })], cache) },
        { node: 'node-b', document: doc([up('corp'), up('onprem', { authOk: null })], null) },
      ],
      previous: new Map(),
      now: T1,
    });
    const objects = [...statuses].map(([name, status]) => ({ name, status }));
    assert.equal(
      formatConnectionTable(objects),
      [
        'RULE    UPSTREAM                            READY  REACHABLE  AUTHENTICATED  NODES  LATENCY  LAST SUCCESS              LAST ERROR',
        'corp    https://registry.corp.example:5000  True   True       True           2/2    4ms      2026-12-06T10:00:00.000Z  -',
        'onprem  http://onprem.example:443           False  False      Unknown        1/2    4ms      2026-12-06T10:00:00.000Z  node-a: ETIMEDOUT: connect',
        '',
        'NODE    CACHE    ENTRIES  HIT RATIO  FILL FAILURES  SHARED TIER',
        'node-a  3.0 MiB  12       87.5%      0              up, READ-ONLY',
        'node-b  off      -        -          -              -',
        '',
      ].join('\n'),
    );
    assert.equal(allReady(objects), false);
    assert.equal(allReady(objects.slice(0, 1)), true);
    assert.equal(allReady([]), false, 'no objects: nothing says the rules are ready');
    assert.equal(allReady([{ name: 'new' }]), false, 'no status yet');
  });

  it('prints objects written by an older collector, or by hand: a node without cache, a cache without shared, as off', () => {
    // What the apiserver returns as JSON: the CRD does not require cache, nor cache.shared.
    const listed = JSON.parse(`[{"name": "corp", "status": {"upstream": "https://registry.corp.example:5000", "nodesReady": "2/2", "conditions": [],
      "nodes": [{"node": "node-a", "cache": {"bytes": 1024, "entries": 1, "hitRatio": null, "fillFailures": 0, "fillsEnabled": true}}, {"node": "node-b"}]}}]`) as Parameters<typeof formatConnectionTable>[0];
    const lines = formatConnectionTable(listed).split('\n');
    assert.match(lines.find((l) => l.startsWith('node-a')) ?? '', /^node-a +1\.0 KiB +1 +- +0 +off$/);
    assert.match(lines.find((l) => l.startsWith('node-b')) ?? '', /^node-b +off +- +- +- +-$/);
  });
});

describe('who may read a proxy\'s operations endpoints', () => {
  const key = Buffer.from('k'.repeat(64));
  const previous = Buffer.from('p'.repeat(64));
  const facts = (over: Partial<OpsRequestFacts>): OpsRequestFacts => ({ path: '/status', peer: '10.0.0.7', authorization: undefined, collectorListener: false, keys: () => [key, previous], ...over });
  const bearer = (k: Uint8Array) => `Bearer ${collectorToken(k)}`;

  it('on the operations port: /status, /warm and /purge need the collector token from a non-loopback peer; loopback (port-forward), health and /metrics do not', () => {
    for (const path of ['/status', '/warm', '/purge']) {
      assert.equal(opsRefusal(facts({ path }))?.status, 401, path);
      assert.equal(opsRefusal(facts({ path, peer: '127.0.0.1' })), null, `${path} from loopback`);
      assert.equal(opsRefusal(facts({ path, peer: '::ffff:127.0.0.1' })), null, `${path} from IPv4-mapped loopback`);
      assert.equal(opsRefusal(facts({ path, authorization: bearer(key) })), null, `${path} with the token`);
    }
    for (const path of ['/healthz', '/readyz', '/metrics']) assert.equal(opsRefusal(facts({ path })), null, path);
  });

  it('on the collector listener: everything but health needs it, from any peer', () => {
    for (const path of ['/status', '/metrics', '/purge', '/nothing']) assert.equal(opsRefusal(facts({ path, peer: '127.0.0.1', collectorListener: true }))?.status, 401, path);
    for (const path of ['/healthz', '/readyz']) assert.equal(opsRefusal(facts({ path, collectorListener: true })), null, path);
  });

  it('accepts the token of any broker key (rotation), refuses another key\'s, the key itself, and other schemes', () => {
    assert.equal(opsRefusal(facts({ authorization: bearer(previous) })), null, 'a verify-only key: a rotation in progress');
    assert.equal(opsRefusal(facts({ authorization: bearer(Buffer.from('x'.repeat(64))) }))?.status, 403);
    assert.equal(opsRefusal(facts({ authorization: `Bearer ${key.toString()}` }))?.status, 403);
    assert.equal(opsRefusal(facts({ authorization: `Basic ${Buffer.from(`x:${collectorToken(key)}`).toString('base64')}` }))?.status, 403);
    assert.equal(opsRefusal(facts({ authorization: bearer(key), keys: () => [] }))?.status, 403, 'no usable broker key: no token is right');
    // Derived, fixed: HMAC-SHA256(key, "pullbridge ops collector v1"), hex; never a namespace credential.
    assert.equal(collectorToken(key), createHmac('sha256', key).update('pullbridge ops collector v1').digest('hex'));
  });
});
