// The RegistryConnection aggregation (pure): proxies' /status documents in, each rule's status and
// the condition changes (Events) out; the table `pullbridge status` prints; and who may read the
// proxies' operations endpoints (the collector's token).

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { aggregateConnections, allReady, formatConnectionTable, NODES_LISTED_LIMIT, parseProxyStatus, planObjects, type ProxyReport, type ProxyStatusDocument, type RegistryConnectionStatus } from '../src/k8s/connectionstatus.js';
import { isStartingProxyPod, proxyPodRole } from '../src/k8s/connections.js';
import { opsToken } from '../src/rules/credentials.js';
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
const KNOWN = new Set(['corp', 'onprem']);
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

  it('a proxy Pod just starting (not Ready, started moments ago) is pending, not down: Unknown, no event; down once it has had its time, or crash-loops', () => {
    const now = Date.parse(T0);
    const pod = (ready: boolean, state: object) => ({ status: { conditions: [{ type: 'Ready', status: ready ? 'True' : 'False' }], containerStatuses: [{ name: 'proxy', image: 'i', imageID: '', ready, restartCount: 0, state }] } });
    assert.equal(isStartingProxyPod(pod(false, { running: { startedAt: new Date(now - 5_000) } }), now), true);
    assert.equal(isStartingProxyPod(pod(false, { waiting: { reason: 'ContainerCreating' } }), now), true);
    assert.equal(isStartingProxyPod(pod(false, { running: { startedAt: new Date(now - 600_000) } }), now), false, 'not Ready for ten minutes: down');
    assert.equal(isStartingProxyPod(pod(false, { waiting: { reason: 'CrashLoopBackOff' } }), now), false);
    assert.equal(isStartingProxyPod(pod(true, { running: { startedAt: new Date(now - 5_000) } }), now), false, 'Ready and unreadable: down');
    // A Pod the DaemonSet has just made, no container status yet: starting while young.
    assert.equal(isStartingProxyPod({ metadata: { creationTimestamp: new Date(now - 3_000) }, status: { phase: 'Pending' } }, now), true);
    assert.equal(isStartingProxyPod({ metadata: { creationTimestamp: new Date(now - 600_000) }, status: { phase: 'Pending' } }, now), false, 'Pending for ten minutes (unschedulable, image not pulled): down');
    // Which Pods are read (and get the token), counted as pending (never sent the token), or skipped.
    const owned = (phase: string) => ({ metadata: { ownerReferences: [{ apiVersion: 'apps/v1', kind: 'DaemonSet', name: 'pb-proxy', uid: 'u', controller: true }] }, status: { phase } });
    assert.deepEqual(['Running', 'Pending', 'Failed', 'Succeeded'].map((phase) => proxyPodRole(owned(phase), 'pb-proxy')), ['read', 'pending', 'skip', 'skip']);
    assert.equal(proxyPodRole(owned('Running'), 'other-proxy'), 'skip');
    assert.equal(proxyPodRole({ status: { phase: 'Running' } }, 'pb-proxy'), 'skip', 'no controller');
    const starting = aggregateConnections({ rules: RULES.slice(0, 1), reports: [{ node: 'a', error: '10.0.0.1:9090: ECONNREFUSED', starting: true }], previous: new Map(), now: T0 });
    assert.deepEqual(condition(starting.statuses.get('corp'), 'Ready'), { type: 'Ready', status: 'Unknown', reason: 'Pending', message: '0/1 node(s) ready; a: proxy starting (its Pod is not Ready yet): 10.0.0.1:9090: ECONNREFUSED', lastTransitionTime: T0 });
    assert.deepEqual(starting.changes, []);
    const down = aggregateConnections({ rules: RULES.slice(0, 1), reports: [{ node: 'a', error: '10.0.0.1:9090: ECONNREFUSED' }], previous: starting.statuses, now: T0 });
    assert.equal(condition(down.statuses.get('corp'), 'Ready')?.status, 'False');
    assert.deepEqual(down.changes.map((c) => [c.type, c.eventType]), [['Ready', 'Warning']]);
  });

  it('reads a proxy /status document: upstreams, cache counts as a hit ratio, the shared tier; refuses what is not one', () => {
    const parsed = parseProxyStatus({
      configLoaded: true,
      upstreams: [up('corp')],
      cache: { bytes: 2048, entries: 3, hits: 6, misses: 1, fromShared: 1, fillFailures: 2, fillsEnabled: true, shared: { kind: 's3', up: false, writable: true } },
    }, KNOWN);
    assert.ok(parsed.ok);
    assert.deepEqual(parsed.document.cache, { bytes: 2048, entries: 3, hitRatio: 0.75, fillFailures: 2, fillsEnabled: true, shared: { up: false, writable: true } });
    assert.deepEqual(parsed.document.upstreams, [up('corp')]);
    const noCache = parseProxyStatus({ upstreams: [], cache: null }, KNOWN);
    assert.ok(noCache.ok && noCache.document.cache === null);
    const fresh = parseProxyStatus({ upstreams: [], cache: { bytes: 0, entries: 0, hits: 0, misses: 0, fromShared: 0, shared: null } }, KNOWN);
    assert.ok(fresh.ok && fresh.document.cache?.hitRatio === null, 'no ratio before the first request');
    assert.deepEqual(parseProxyStatus('<html>', KNOWN), { ok: false, error: 'not a pullbridge proxy /status document (no "upstreams")' });
    assert.deepEqual(parseProxyStatus({ upstreams: [{ upstream: 'x' }] }, KNOWN), { ok: false, error: 'an "upstreams" entry has no rule' });
  });

  it('a hostile document cannot break the status: dates only when dates, strings cut, rules the collector knows only, counts bounded', () => {
    const parsed = parseProxyStatus({
      upstreams: [
        up('corp', { lastSuccess: 'zzzz', lastCheck: '2026-13-45T99:00:00Z', lastError: 'E'.repeat(2 << 20), upstream: 'u'.repeat(5000), via: 'v'.repeat(5000), latencyMs: -1 }),
        up('corp', { lastError: 'a second entry for the same rule' }),
        ...Array.from({ length: 1000 }, (_, i) => up(`invented-${i}`)),
        up('onprem', { lastSuccess: '2026-12-06T10:00:00+01:00' }),
      ],
      cache: { bytes: -5, entries: 1e300, hits: Number.MAX_SAFE_INTEGER * 4, misses: 1, fromShared: 0, fillFailures: 'x' },
    }, KNOWN);
    assert.ok(parsed.ok);
    assert.deepEqual(parsed.document.upstreams.map((u) => u.rule), ['corp', 'onprem']);
    const [corp, onprem] = parsed.document.upstreams;
    assert.equal(corp?.lastSuccess, null, 'not a date');
    assert.equal(corp?.lastCheck, null, 'not a real date');
    assert.equal(corp?.lastError?.length, 1024);
    assert.equal(corp?.upstream.length, 1024);
    assert.equal(corp?.via.length, 1024);
    assert.equal(corp?.latencyMs, null);
    assert.equal(onprem?.lastSuccess, '2026-12-06T10:00:00+01:00');
    assert.deepEqual(parsed.document.cache, { bytes: 0, entries: 0, hitRatio: 0, fillFailures: 0, fillsEnabled: true, shared: null });
    // Aggregated, the status has nothing the CRD's date-time format or the API server's size refuses.
    const { statuses } = aggregateConnections({ rules: RULES, reports: [{ node: 'node-x', document: parsed.document }], previous: new Map(), now: T1 });
    assert.equal(statuses.get('corp')?.lastSuccess, null);
    assert.ok(JSON.stringify(statuses.get('corp')).length < 8192);
  });

  it(`lists at most ${NODES_LISTED_LIMIT} nodes per object, the ones not ready first; the summary counts them all`, () => {
    const reports: ProxyReport[] = Array.from({ length: NODES_LISTED_LIMIT + 10 }, (_, i) => ({ node: `node-${String(i).padStart(4, '0')}`, document: doc([up('corp', i % 100 === 99 ? { reachable: false, lastError: 'refused' } : {}), up('onprem')]) }));
    const corp = aggregateConnections({ rules: RULES, reports, previous: new Map(), now: T1 }).statuses.get('corp');
    assert.equal(corp?.nodes.length, NODES_LISTED_LIMIT);
    assert.deepEqual(corp?.summary, { nodesReady: NODES_LISTED_LIMIT + 5, nodesTotal: NODES_LISTED_LIMIT + 10 });
    assert.equal(corp?.nodes.filter((n) => n.reachable === false).length, 5, 'every failing node listed');
    const names = corp?.nodes.map((n) => n.node) ?? [];
    assert.deepEqual(names, [...names].sort(), 'in node order');
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
  const facts = (over: Partial<OpsRequestFacts>): OpsRequestFacts => ({ method: 'GET', path: '/status', peer: '10.0.0.7', authorization: undefined, collectorListener: false, keys: () => [key, previous], ...over });
  const bearer = (k: Uint8Array) => `Bearer ${opsToken(k, 'collector')}`;

  it('on the operations port: /status needs the collector token from a non-loopback peer; /warm and /purge answer loopback peers only, token or not; health and /metrics answer anyone', () => {
    assert.equal(opsRefusal(facts({}))?.status, 401);
    assert.equal(opsRefusal(facts({ peer: '127.0.0.1' })), null, '/status from loopback');
    assert.equal(opsRefusal(facts({ peer: '::ffff:127.0.0.1' })), null, '/status from IPv4-mapped loopback');
    assert.equal(opsRefusal(facts({ authorization: bearer(key) })), null, '/status with the token');
    for (const path of ['/warm', '/purge']) {
      assert.equal(opsRefusal(facts({ method: 'POST', path, peer: '127.0.0.1' })), null, `${path} from loopback`);
      assert.equal(opsRefusal(facts({ method: 'POST', path, peer: '::ffff:127.0.0.1' })), null, `${path} from IPv4-mapped loopback`);
      assert.equal(opsRefusal(facts({ method: 'POST', path }))?.status, 403, `${path} from another address`);
      assert.equal(opsRefusal(facts({ method: 'POST', path, authorization: bearer(key) }))?.status, 403, `${path} with the collector token: still refused`);
    }
    for (const path of ['/healthz', '/readyz', '/metrics']) assert.equal(opsRefusal(facts({ path })), null, path);
  });

  it('on the collector listener: GET /status with the token, health to anyone; nothing else exists there, from any peer', () => {
    assert.equal(opsRefusal(facts({ peer: '127.0.0.1', collectorListener: true }))?.status, 401, '/status without the token, even from loopback');
    assert.equal(opsRefusal(facts({ collectorListener: true, authorization: bearer(key) })), null, '/status with the token');
    for (const path of ['/metrics', '/warm', '/purge', '/nothing']) {
      assert.equal(opsRefusal(facts({ path, peer: '127.0.0.1', collectorListener: true, authorization: bearer(key) }))?.status, 404, path);
      assert.equal(opsRefusal(facts({ method: 'POST', path, peer: '127.0.0.1', collectorListener: true, authorization: bearer(key) }))?.status, 404, `POST ${path}`);
    }
    assert.equal(opsRefusal(facts({ method: 'POST', collectorListener: true, authorization: bearer(key) }))?.status, 404, 'POST /status');
    for (const path of ['/healthz', '/readyz']) assert.equal(opsRefusal(facts({ path, collectorListener: true })), null, path);
  });

  it('the admission endpoints need the resolver token on either listener, from loopback too; it opens nothing else, and the collector\'s opens none of them', () => {
    const resolver = `Bearer ${opsToken(key, 'resolver')}`;
    const path = '/admission/v2/corp/team/app/manifests/1';
    for (const collectorListener of [false, true]) {
      for (const peer of ['127.0.0.1', '10.0.0.7']) {
        assert.equal(opsRefusal(facts({ path, peer, collectorListener }))?.status, 401, `no token, ${peer}`);
        assert.equal(opsRefusal(facts({ path, peer, collectorListener, authorization: bearer(key) }))?.status, 403, `the collector token, ${peer}`);
        assert.equal(opsRefusal(facts({ path, peer, collectorListener, authorization: resolver })), null, `the resolver token, ${peer}`);
        assert.equal(opsRefusal(facts({ method: 'HEAD', path, peer, collectorListener, authorization: `Bearer ${opsToken(previous, 'resolver')}` })), null, 'a verify-only key');
      }
    }
    assert.equal(opsRefusal(facts({ authorization: resolver }))?.status, 403, '/status with the resolver token');
    assert.equal(opsRefusal(facts({ collectorListener: true, path: '/metrics', authorization: resolver }))?.status, 404);
    assert.equal(opsRefusal(facts({ method: 'POST', path: '/warm', authorization: resolver }))?.status, 403);
    // Derived, fixed: HMAC-SHA256(key, "pullbridge admission resolver v1"), hex.
    assert.equal(opsToken(key, 'resolver'), createHmac('sha256', key).update('pullbridge admission resolver v1').digest('hex'));
  });

  it('accepts the token of any broker key (rotation), refuses another key\'s, the key itself, and other schemes', () => {
    assert.equal(opsRefusal(facts({ authorization: bearer(previous) })), null, 'a verify-only key: a rotation in progress');
    assert.equal(opsRefusal(facts({ authorization: bearer(Buffer.from('x'.repeat(64))) }))?.status, 403);
    assert.equal(opsRefusal(facts({ authorization: `Bearer ${key.toString()}` }))?.status, 403);
    assert.equal(opsRefusal(facts({ authorization: `Basic ${Buffer.from(`x:${opsToken(key, 'collector')}`).toString('base64')}` }))?.status, 403);
    assert.equal(opsRefusal(facts({ authorization: bearer(key), keys: () => [] }))?.status, 403, 'no usable broker key: no token is right');
    // Derived, fixed: HMAC-SHA256(key, "pullbridge ops collector v1"), hex; never a namespace credential.
    assert.equal(opsToken(key, 'collector'), createHmac('sha256', key).update('pullbridge ops collector v1').digest('hex'));
  });
});
