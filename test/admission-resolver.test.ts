// The proxy tier answers admission's questions: the admission endpoints on the proxies' operations
// port (resolver token), and the webhook's view of them (ProxyTierView behind CachedRegistryView).
// Real parts: two proxies as `pullbridge proxy` runs them, docker-registry behind its token server
// (one repository public to anonymous token requests, one not), tinyproxy as one rule's forwarding
// proxy. One fake: a stalled upstream (a loopback TCP server that accepts and never answers), a
// fault the real registry cannot be made to produce.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { join } from 'node:path';
import { validateConfig } from '../src/rules/config.js';
import { namespaceToken, opsToken } from '../src/rules/credentials.js';
import { runWebhook } from '../src/webhook/run.js';
import { memoryLogger } from './support/logs.js';
import { reviewFor } from './support/review.js';
import type { RegistryView } from '../src/rules/registryview.js';
import { attemptShareMs, orderAfterCooldown, PROXY_COOLDOWN_MS, rendezvousOrder, ProxyTierView, type ProxyAttempt } from '../src/webhook/proxytier.js';
import { CachedRegistryView, DEFAULT_VIEW_CACHE_POLICY, keepFor } from '../src/webhook/viewcache.js';
import { buildImage, type TestImage } from './support/oci.js';
import { freePort } from './support/procs.js';
import { runProxyUnderTest, type ProxyProcessUnderTest } from './support/proxy.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';
import { startTinyproxy, type Tinyproxy } from './support/tinyproxy.js';

const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const sha256 = (bytes: Buffer) => `sha256:${createHash('sha256').update(bytes).digest('hex')}`;

/** Polls `check` until it holds (bounded): logs are written as responses close. */
async function eventually(check: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (check()) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  assert.fail(`never: ${what}`);
}

describe('admission resolver: the proxy tier answers admission through the rules\' transport', function () {
  this.timeout(120_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-resolver-'));
  const key = Buffer.from(randomBytes(32).toString('hex'));
  let registry: RegistryHandle;
  let tinyproxy: Tinyproxy;
  let stalled: net.Server;
  const stalledSockets = new Set<net.Socket>();
  let stalledEnding = false;
  let proxyA: ProxyProcessUnderTest;
  let proxyB: ProxyProcessUnderTest;
  let image: TestImage;
  const views: ProxyTierView[] = [];

  const rules = () => {
    const [user] = Object.keys(DEFAULT_USERS);
    const credentials = { username: user, passwordFile: join(dir, 'password') };
    const auth = { mode: 'broker' as const, tokenRealms: [new URL(registry.issuer?.realm ?? '').origin] };
    return [
      { name: 'corp', match: ['corp.example'], upstream: registry.url, credentials, auth, namespaces: { include: ['team-*'] } },
      { name: 'via', match: ['via.example'], upstream: registry.url, credentials, auth, forwardProxy: { url: tinyproxy.url, mode: 'forward' as const } },
      { name: 'nocache', match: ['nocache.example'], upstream: registry.url, credentials, auth, cache: false },
      // rewrite: never: Pods pull from the registry itself; admission still asks through the proxy tier.
      { name: 'vendor', match: ['vendor.example'], upstream: registry.url, credentials, auth, rewrite: 'never' as const, shareUpstreamCredentials: true, namespaces: { include: ['team-*'] }, pinDigest: true },
      { name: 'stalled', match: ['stalled.example'], upstream: `http://127.0.0.1:${(stalled.address() as net.AddressInfo).port}`, auth: { mode: 'anonymous' as const } },
    ];
  };

  const tier = (endpoints: readonly string[], deadlineMs = 5_000): ProxyTierView => {
    const view = new ProxyTierView({
      endpoints: () => endpoints,
      token: () => opsToken(key, 'resolver'),
      namespaceAuthorization: (namespace) => `Basic ${Buffer.from(`${namespace}:${namespaceToken(key, namespace)}`).toString('base64')}`,
      deadlineMs,
    });
    views.push(view);
    return view;
  };
  /** A view for one test, closed at its end: the operations port admits 8 connections per source
   * (loopback here), and every view's pool keeps its connections alive. */
  const withTier = async (endpoints: readonly string[], use: (view: ProxyTierView) => Promise<void>): Promise<void> => {
    const view = new ProxyTierView({ endpoints: () => endpoints, token: () => opsToken(key, 'resolver'), namespaceAuthorization: (namespace) => `Basic ${Buffer.from(`${namespace}:${namespaceToken(key, namespace)}`).toString('base64')}` });
    try {
      await use(view);
    } finally {
      await view.close();
    }
  };
  const signal = () => new AbortController().signal;
  /** Admission requests the proxy logged for a repository. */
  const admissions = (p: ProxyProcessUnderTest, repository: string) => p.logs.records.filter((r) => r.access === 'admission' && r.repository === repository);

  before(async () => {
    writeFileSync(join(dir, 'password'), DEFAULT_USERS.puller);
    registry = await startRegistry({ auth: 'token', accessLog: true, anonymousPull: ['public/app', 'public/other', 'public/shared', 'public/failover', 'public/via-down'] });
    image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [512] });
    for (const repository of ['public/app', 'private/app', 'public/other', 'public/shared', 'public/failover']) await registry.push(image, repository, '1');
    tinyproxy = await startTinyproxy();
    stalled = net.createServer((socket) => {
      // After the tests, a late connection is cut at once: server.close() waits for every connection.
      if (stalledEnding) {
        socket.destroy();
        return;
      }
      stalledSockets.add(socket);
      socket.on('close', () => stalledSockets.delete(socket));
    });
    await new Promise<void>((resolve) => stalled.listen(0, '127.0.0.1', resolve));
    const config = (cache: string) => ({ cache: { path: join(dir, cache) }, registries: rules() });
    // 127.0.0.2 stands in for the Pod IP: the collector listener of the hostNetwork exposure.
    proxyA = await runProxyUnderTest(config('cache-a'), key, { collectorHost: '127.0.0.2' });
    proxyB = await runProxyUnderTest(config('cache-b'), key);
  });
  after(async () => {
    await Promise.all(views.map((v) => v.close()));
    await proxyA?.close();
    await proxyB?.close();
    stalledEnding = true;
    for (const socket of stalledSockets) socket.destroy();
    await new Promise((resolve) => stalled?.close(resolve));
    await tinyproxy?.stop();
    await registry?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('answers only the resolver token: none 401, the collector\'s or another key\'s 403; on the collector listener too; the registry port has no such path (404)', async () => {
    const path = '/admission/probe/v2/corp/public/app/manifests/1';
    assert.equal((await fetch(`${proxyA.opsUrl}${path}`)).status, 401, 'no token, even from loopback');
    assert.equal((await fetch(`${proxyA.opsUrl}${path}`, { headers: { authorization: `Bearer ${opsToken(key, 'collector')}` } })).status, 403, "the status collector's token");
    assert.equal((await fetch(`${proxyA.opsUrl}${path}`, { headers: { authorization: `Bearer ${opsToken(randomBytes(32), 'resolver')}` } })).status, 403, "another key's resolver token");
    const right = { authorization: `Bearer ${opsToken(key, 'resolver')}` };
    assert.equal((await fetch(`${proxyA.opsUrl}${path}`, { headers: right })).status, 200);
    assert.ok(proxyA.collectorUrl?.includes('127.0.0.2'));
    assert.equal((await fetch(`${proxyA.collectorUrl}${path}`)).status, 401, 'collector listener, no token');
    assert.equal((await fetch(`${proxyA.collectorUrl}${path}`, { headers: right })).status, 200, 'collector listener, the resolver token');
    const registryPort = await fetch(`${proxyA.url}${path}`, { headers: right });
    assert.equal(registryPort.status, 404, 'the registry port never answers admission paths');
    const manifestPath = '/admission/v2/corp/private/app/manifests/1';
    assert.equal((await fetch(`${proxyA.url}${manifestPath}`, { headers: { ...right, 'x-pullbridge-namespace-authorization': `Basic ${Buffer.from(`team-a:${namespaceToken(key, 'team-a')}`).toString('base64')}` } })).status, 404);
  });

  it('probes anonymously through the rule\'s transport: a public repository 200, a private one 401; through tinyproxy too, which it needs', async () => {
    const view = tier([proxyA.opsUrl]);
    assert.deepEqual(await view.probeAnonymous({ rule: 'corp', repository: 'public/app', reference: '1' }, signal()), { kind: 'answered', status: 200 });
    assert.deepEqual(await view.probeAnonymous({ rule: 'corp', repository: 'private/app', reference: '1' }, signal()), { kind: 'answered', status: 401 });
    assert.deepEqual(await view.probeAnonymous({ rule: 'via', repository: 'public/app', reference: '1' }, signal()), { kind: 'answered', status: 200 });
    assert.deepEqual(await view.probeAnonymous({ rule: 'via', repository: 'private/app', reference: '1' }, signal()), { kind: 'answered', status: 401 });
    // The anonymous tokens never serve the credentialed reads, nor the other way round.
    const withCredential = await view.manifest({ rule: 'corp', repository: 'private/app', reference: '1', namespace: 'team-a', method: 'HEAD' }, signal());
    assert.equal(withCredential.kind, 'found');
    assert.deepEqual(await view.probeAnonymous({ rule: 'corp', repository: 'private/app', reference: '1' }, signal()), { kind: 'answered', status: 401 }, 'still private after a credentialed read');
  });

  it('reads manifests and small blobs with the namespace\'s credential, as a pull would: the registry\'s digest; a namespace the rule refuses is refused; the access log marks them', async () => {
    const view = tier([proxyA.opsUrl]);
    const got = await view.manifest({ rule: 'corp', repository: 'private/app', reference: '1', namespace: 'team-a', method: 'GET' }, signal());
    assert.equal(got.kind, 'found');
    if (got.kind !== 'found') return;
    assert.equal(got.digest, image.index.digest, "the registry's digest of the tag");
    assert.equal(got.mediaType, OCI_INDEX);
    assert.equal(got.body && sha256(got.body), image.index.digest);
    const byDigest = await view.manifest({ rule: 'corp', repository: 'private/app', reference: image.index.digest, namespace: 'team-a', method: 'HEAD' }, signal());
    assert.deepEqual(byDigest, { kind: 'found', digest: image.index.digest, mediaType: OCI_INDEX });
    const refused = await view.manifest({ rule: 'corp', repository: 'private/app', reference: '1', namespace: 'shop', method: 'GET' }, signal());
    assert.equal(refused.kind, 'refused');
    if (refused.kind === 'refused') {
      assert.equal(refused.status, 403);
      assert.match(refused.error, /namespace "shop" may not pull through rule "corp"/);
    }
    const config = image.configs[0];
    assert.ok(config);
    const blob = await view.blob({ rule: 'corp', repository: 'private/app', digest: config.digest, namespace: 'team-a', maxBytes: 64 * 1024 }, signal());
    assert.ok(blob.kind === 'found' && blob.body.equals(config.data));
    const tooLarge = await view.blob({ rule: 'corp', repository: 'private/app', digest: config.digest, namespace: 'team-a', maxBytes: config.data.length - 1 }, signal());
    assert.equal(tooLarge.kind, 'refused');
    assert.equal(tooLarge.kind === 'refused' && tooLarge.status, 413);
    await eventually(() => admissions(proxyA, 'private/app').some((r) => r.kind === 'blob' && r.status === 413), 'the refused blob logged');
    const logged = admissions(proxyA, 'private/app');
    assert.ok(logged.some((r) => r.kind === 'manifest' && r.namespace === 'team-a' && r.status === 200 && r.rule === 'corp'));
    assert.ok(logged.some((r) => r.kind === 'manifest' && r.namespace === 'shop' && r.status === 403));
    assert.ok(!JSON.stringify(proxyA.logs.records).includes(namespaceToken(key, 'team-a')), 'no credential in the log');
    assert.ok(!JSON.stringify(proxyA.logs.records).includes(opsToken(key, 'resolver')), 'no token in the log');
  });

  it('records the upstream\'s answer to a probe (the JSON answer is 200, the upstream said 401) and counts admission apart from pulls', async () => {
    await withTier([proxyA.opsUrl], async (view) => {
      assert.deepEqual(await view.probeAnonymous({ rule: 'corp', repository: 'private/app', reference: 'probe-401' }, signal()), { kind: 'answered', status: 401 });
      assert.deepEqual(await view.probeAnonymous({ rule: 'corp', repository: 'public/app', reference: 'probe-404' }, signal()), { kind: 'answered', status: 404 });
    });
    await eventually(() => proxyA.logs.records.some((r) => r.access === 'admission' && r.reference === 'probe-404'), 'both probes logged');
    const refused = proxyA.logs.records.find((r) => r.access === 'admission' && r.reference === 'probe-401');
    assert.equal(refused?.status, 200, 'the proxy answered');
    assert.equal(refused?.upstreamStatus, 401, 'the upstream refused anonymous access');
    const missing = proxyA.logs.records.find((r) => r.access === 'admission' && r.reference === 'probe-404');
    assert.equal(missing?.status, 200);
    assert.equal(missing?.upstreamStatus, 404);
    const pull = await fetch(`${proxyA.url}/v2/corp/private/app/manifests/1`, { headers: { accept: OCI_INDEX, authorization: `Basic ${Buffer.from(`team-a:${namespaceToken(key, 'team-a')}`).toString('base64')}` } });
    assert.equal(pull.status, 200);
    await pull.arrayBuffer();
    // Counted as the response closes: poll (bounded) until the pull is.
    const pulled = /pullbridge_proxy_requests_total\{rule="corp",kind="manifest",status="200",access="pull"\} [1-9]/;
    let text = '';
    for (let i = 0; i < 200 && !pulled.test(text); i++) {
      if (i > 0) await new Promise((r) => setTimeout(r, 25));
      text = await (await fetch(`${proxyA.opsUrl}/metrics`)).text();
    }
    assert.match(text, /pullbridge_proxy_requests_total\{rule="corp",kind="manifest",status="200",access="pull"\} [1-9]/);
    assert.match(text, /pullbridge_proxy_requests_total\{rule="corp",kind="probe",status="200",access="admission"\} [1-9]/);
    assert.doesNotMatch(text, /kind="probe",status="200",access="pull"/, 'no probe is counted as a pull');
  });

  it('a rewrite: never rule: the registry port refuses its pulls (404 NAME_UNKNOWN), the admission endpoints still answer for it', async () => {
    const basic = `Basic ${Buffer.from(`team-a:${namespaceToken(key, 'team-a')}`).toString('base64')}`;
    const seen = (await registry.requests()).filter((r) => r.path.startsWith('/v2/private/app/')).length;
    for (const path of ['/v2/vendor/private/app/manifests/1', `/v2/vendor/private/app/blobs/${image.index.digest}`, '/v2/vendor/private/app/tags/list']) {
      const pull = await fetch(`${proxyA.url}${path}`, { headers: { accept: OCI_INDEX, authorization: basic } });
      assert.equal(pull.status, 404, path);
      const body = (await pull.json()) as { errors: Array<{ code: string; message: string }> };
      assert.equal(body.errors[0]?.code, 'NAME_UNKNOWN');
      assert.match(body.errors[0]?.message ?? '', /rule "vendor" has rewrite: never: its images are pulled from its registry directly/);
    }
    assert.equal((await registry.requests()).filter((r) => r.path.startsWith('/v2/private/app/')).length, seen, 'the upstream was never asked for the refused pulls');
    await withTier([proxyA.opsUrl], async (view) => {
      assert.deepEqual(await view.probeAnonymous({ rule: 'vendor', repository: 'public/app', reference: '1' }, signal()), { kind: 'answered', status: 200 });
      const digest = await view.manifest({ rule: 'vendor', repository: 'private/app', reference: '1', namespace: 'team-a', method: 'HEAD' }, signal());
      assert.deepEqual(digest, { kind: 'found', digest: image.index.digest, mediaType: OCI_INDEX }, 'pinDigest\'s question answered with the namespace credential');
      const refused = await view.manifest({ rule: 'vendor', repository: 'private/app', reference: '1', namespace: 'shop', method: 'HEAD' }, signal());
      assert.equal(refused.kind === 'refused' && refused.status, 403, 'the rule\'s namespace filter holds for admission too');
    });
  });

  it('the collector listener: idle connections from many sources are closed, so they cannot starve the webhook; its concurrent questions are all answered', async () => {
    const collector = new URL(proxyA.collectorUrl ?? '');
    // Sixteen sources (Pods on a hostNetwork node) each open sixteen connections and send nothing:
    // the listener's whole budget (256) at once.
    const sockets: net.Socket[] = [];
    const closed: Array<Promise<void>> = [];
    for (let source = 0; source < 16; source++) {
      for (let i = 0; i < 16; i++) {
        const socket = net.connect({ host: collector.hostname, port: Number(collector.port), localAddress: `127.0.1.${source + 1}` });
        socket.once('error', () => undefined);
        sockets.push(socket);
        closed.push(new Promise((resolve) => socket.once('close', () => resolve())));
      }
    }
    try {
      // The server closes them, none having sent a request (without that, they stay until the idle timeout).
      await Promise.all(closed);
      assert.ok(sockets.every((socket) => socket.bytesRead === 0), 'closed unanswered');
      await withTier([proxyA.collectorUrl ?? ''], async (view) => {
        // More questions at once than the view's pool (8 per proxy): all answered, none refused on arrival.
        const answers = await Promise.all(Array.from({ length: 24 }, (_, i) => view.probeAnonymous({ rule: 'corp', repository: 'public/app', reference: `concurrent-${i}` }, signal())));
        assert.deepEqual(answers, answers.map(() => ({ kind: 'answered', status: 404 })));
      });
    } finally {
      for (const socket of sockets) socket.destroy();
    }
  });

  it('passes the referrers API on: the registry has none (distribution 2.8 answers 404), so the answer says unsupported', async () => {
    const view = tier([proxyA.opsUrl]);
    const answer = await view.referrers({ rule: 'corp', repository: 'private/app', digest: image.index.digest, namespace: 'team-a', artifactType: 'application/vnd.dev.cosign.artifact.sig.v1+json' }, signal());
    assert.deepEqual(answer, { kind: 'unsupported' });
    await eventually(() => admissions(proxyA, 'private/app').some((r) => r.kind === 'referrers'), 'referrers logged');
    const paths = (await registry.requests()).filter((r) => r.path === `/v2/private/app/referrers/${image.index.digest}`);
    assert.ok(paths.length > 0, 'the registry was asked');
  });

  it('the cached view answers a repeated question without asking the proxy or the upstream again; identical questions at once share one call', async () => {
    const view = new CachedRegistryView(tier([proxyA.opsUrl]));
    const upstreamAsks = async (repository: string) => (await registry.requests()).filter((r) => r.path.startsWith(`/v2/${repository}/manifests/`)).length;
    assert.deepEqual(await view.probeAnonymous({ rule: 'nocache', repository: 'public/other', reference: '1' }, signal()), { kind: 'answered', status: 200 });
    const first = await upstreamAsks('public/other');
    assert.ok(first > 0);
    assert.deepEqual(await view.probeAnonymous({ rule: 'nocache', repository: 'public/other', reference: 'other-tag' }, signal()), { kind: 'answered', status: 200 }, 'public holds for the repository');
    const found = await view.manifest({ rule: 'nocache', repository: 'public/other', reference: '1', namespace: 'ns1', method: 'GET' }, signal());
    assert.equal(found.kind === 'found' && found.digest, image.index.digest);
    const afterManifest = await upstreamAsks('public/other');
    assert.ok(afterManifest > first, 'the rule has no node cache: the manifest went upstream');
    assert.equal((await view.manifest({ rule: 'nocache', repository: 'public/other', reference: '1', namespace: 'ns1', method: 'HEAD' }, signal())).kind, 'found');
    assert.equal(await upstreamAsks('public/other'), afterManifest, 'no new upstream request for the repeated questions');
    // Another namespace is another question (a namespace filter may refuse it).
    assert.equal((await view.manifest({ rule: 'nocache', repository: 'public/other', reference: '1', namespace: 'ns2', method: 'HEAD' }, signal())).kind, 'found');
    assert.ok((await upstreamAsks('public/other')) > afterManifest);

    const at = admissions(proxyA, 'public/shared').length;
    const answers = await Promise.all([1, 2, 3].map(() => view.probeAnonymous({ rule: 'nocache', repository: 'public/shared', reference: '1' }, signal())));
    for (const answer of answers) assert.deepEqual(answer, { kind: 'answered', status: 200 });
    // A marker question after them: once it is logged, every request before it is too.
    await tier([proxyA.opsUrl]).probeAnonymous({ rule: 'nocache', repository: 'public/app', reference: 'marker' }, signal());
    await eventually(() => proxyA.logs.records.some((r) => r.access === 'admission' && r.reference === 'marker'), 'the marker logged');
    assert.equal(admissions(proxyA, 'public/shared').length - at, 1, 'one request to the proxy for three questions at once');
  });

  it('a stalled upstream: the question is answered "failed" by its deadline, failover included', async () => {
    const view = tier([proxyA.opsUrl, proxyB.opsUrl], 600);
    const answer = await view.probeAnonymous({ rule: 'stalled', repository: 'team/app', reference: '1' }, signal());
    assert.equal(answer.kind, 'failed');
    assert.match(answer.kind === 'failed' ? answer.error : '', /no answer in time/);
    assert.ok(stalledSockets.size > 0, 'the upstream was reached and held the request');
    const manifest = await view.manifest({ rule: 'stalled', repository: 'team/app', reference: '1', namespace: 'team-a', method: 'HEAD' }, signal());
    assert.equal(manifest.kind, 'failed');
    // The caller's own signal ends it too (the admission's deadline).
    const gaveUp = new AbortController();
    const pending = tier([proxyA.opsUrl], 60_000).probeAnonymous({ rule: 'stalled', repository: 'team/app', reference: '2' }, gaveUp.signal);
    gaveUp.abort();
    assert.equal((await pending).kind, 'failed');
  });

  it('asks the proxies in rendezvous order of rule/repository and fails over to the next when the first is down', async () => {
    // A free port (nothing listens there) that some repository ranks first: the order hashes the
    // endpoint, so a port where none of the four does (1 in 16) is passed over (bounded tries).
    let down = '';
    let repository: string | undefined;
    for (let tries = 0; tries < 50 && repository === undefined; tries++) {
      down = `http://127.0.0.1:${await freePort()}`;
      const endpoints = [down, proxyB.opsUrl];
      repository = ['public/failover', 'public/app', 'public/other', 'public/shared'].find((r) => rendezvousOrder(`corp/${r}`, endpoints)[0] === down);
    }
    assert.ok(repository, 'some repository ranks the down proxy first');
    const endpoints = [down, proxyB.opsUrl];
    const at = admissions(proxyB, repository).length;
    const answer = await tier(endpoints).probeAnonymous({ rule: 'corp', repository, reference: '1' }, signal());
    assert.deepEqual(answer, { kind: 'answered', status: 200 });
    await eventually(() => admissions(proxyB, repository).length > at, 'proxy B answered');
    // Nothing answers: failed, naming each proxy's reason.
    const none = await tier([down]).probeAnonymous({ rule: 'corp', repository, reference: '1' }, signal());
    assert.equal(none.kind, 'failed');
    assert.match(none.kind === 'failed' ? none.error : '', /ECONNREFUSED/);
    assert.equal((await tier([]).probeAnonymous({ rule: 'corp', repository, reference: '1' }, signal())).kind, 'failed');
  });

  it('a stalled proxy (accepts, never answers) costs one question half its deadline, then is asked last for its cool-down: the next question goes straight to a proxy that answers (trial 22)', async () => {
    // The one fake here: a proxy's operations port that accepts and never answers; a real proxy cannot be made to stall.
    const held = new Set<net.Socket>();
    let accepted = 0;
    // Once the test ends, a connection that arrives late is cut at once: server.close() waits for every
    // connection, and the view's close for its requests (a late one held the whole file 120 s in CI).
    let ending = false;
    const candidates = ['public/failover', 'public/app', 'public/other', 'public/shared'];
    // A port on which some repository ranks the stalled proxy first (rendezvous order depends on the URL).
    let stalledProxy: net.Server | undefined;
    let stalledUrl = '';
    let repository: string | undefined;
    for (let tries = 0; tries < 20 && repository === undefined; tries++) {
      if (stalledProxy) await new Promise((resolve) => stalledProxy?.close(resolve));
      const server = net.createServer((socket) => {
        if (ending) {
          socket.destroy();
          return;
        }
        accepted++;
        held.add(socket);
        socket.on('close', () => held.delete(socket));
      });
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      stalledProxy = server;
      stalledUrl = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`;
      repository = candidates.find((r) => rendezvousOrder(`corp/${r}`, [stalledUrl, proxyB.opsUrl])[0] === stalledUrl);
    }
    try {
      assert.ok(repository, 'some repository ranks the stalled proxy first');
      const endpoints = [stalledUrl, proxyB.opsUrl];
      const attempts: ProxyAttempt[] = [];
      const view = new ProxyTierView({
        endpoints: () => endpoints,
        token: () => opsToken(key, 'resolver'),
        namespaceAuthorization: (namespace) => `Basic ${Buffer.from(`${namespace}:${namespaceToken(key, namespace)}`).toString('base64')}`,
        deadlineMs: 4_000,
        onAttempt: (attempt) => attempts.push(attempt),
      });
      views.push(view);
      // First question: the stalled proxy has its half of the deadline, then proxy B answers.
      assert.deepEqual(await view.probeAnonymous({ rule: 'corp', repository, reference: '1' }, signal()), { kind: 'answered', status: 200 });
      assert.deepEqual(attempts.map((a) => `${a.kind}:${a.outcome}`), ['probe:stalled', 'probe:answered']);
      assert.ok(accepted > 0, 'the stalled proxy was asked first');
      const acceptedFirst = accepted;
      // The digest, then the signature's manifest: proxy B first now; the stalled proxy is not even connected to.
      const digest = await view.manifest({ rule: 'corp', repository, reference: '1', namespace: 'team-a', method: 'HEAD' }, signal());
      assert.equal(digest.kind, 'found');
      const again = await view.manifest({ rule: 'corp', repository, reference: '1', namespace: 'team-a', method: 'GET' }, signal());
      assert.equal(again.kind, 'found');
      assert.deepEqual(attempts.slice(2).map((a) => `${a.kind}:${a.outcome}`), ['manifest:answered', 'manifest:answered']);
      assert.equal(accepted, acceptedFirst, 'the stalled proxy was not asked again during its cool-down');
    } finally {
      ending = true;
      for (const socket of held) socket.destroy();
      await new Promise((resolve) => stalledProxy?.close(resolve));
    }
  });

  it('a question to a stalled proxy still ends at its deadline when the garbage collector runs meanwhile (Node 20 collected the deadline\'s timer signal)', async () => {
    // gc() for this test: Node 20 collects an AbortSignal.timeout held only by AbortSignal.any()
    // (nodejs/node#57736), and the question then waited on the stalled proxy for good.
    setFlagsFromString('--expose_gc');
    const collect = runInNewContext('gc') as () => void;
    const stalledUrl = `http://127.0.0.1:${(stalled.address() as net.AddressInfo).port}`;
    const view = new ProxyTierView({ endpoints: () => [stalledUrl], token: () => opsToken(key, 'resolver'), namespaceAuthorization: () => 'Basic eDp4', deadlineMs: 1_000 });
    views.push(view);
    const question = view.probeAnonymous({ rule: 'corp', repository: 'public/app', reference: '1' }, signal());
    let settled = false;
    void question.finally(() => (settled = true));
    // Bounded: 200 collections, 50 ms apart, well past the 1 s deadline.
    for (let i = 0; i < 200 && !settled; i++) {
      collect();
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.ok(settled, 'the question never ended: its deadline did not fire');
    const answer = await question;
    assert.equal(answer.kind, 'failed');
    assert.match((answer as { error: string }).error, /no answer in time/);
  });

  it('the webhook counts its questions to the proxy tier: latency by kind and outcome, and failovers (trial 22)', async () => {
    // A free port (nothing listens there) that some repository ranks first (1 in 16 ports ranks none).
    let down = '';
    let repository: string | undefined;
    for (let tries = 0; tries < 50 && repository === undefined; tries++) {
      down = `http://127.0.0.1:${await freePort()}`;
      repository = ['public/failover', 'public/app', 'public/other', 'public/shared'].find((r) => rendezvousOrder(`corp/${r}`, [down, proxyB.opsUrl])[0] === down);
    }
    assert.ok(repository, 'some repository ranks the down proxy first');
    const endpoints = [down, proxyB.opsUrl];
    const keyFile = join(dir, 'webhook-broker.key');
    writeFileSync(keyFile, key);
    const parsed = validateConfig({
      broker: { keyFiles: [keyFile] },
      registries: [{ name: 'corp', match: ['corp.example'], upstream: registry.url, auth: { mode: 'anonymous' }, repositories: { include: ['public/**'] }, rewrite: 'private-only' }],
    });
    assert.ok(parsed.ok, parsed.ok ? '' : JSON.stringify(parsed.errors));
    const webhook = await runWebhook({ config: parsed.config, host: '127.0.0.1', port: 0, logger: memoryLogger().logger, resolver: { urls: endpoints } });
    try {
      const review = reviewFor({ apiVersion: 'v1', kind: 'Pod', metadata: { name: 'p' }, spec: { containers: [{ name: 'app', image: `corp.example/${repository}:1` }] } }, { namespace: 'team-a' });
      const res = await fetch(`${webhook.running.url}/mutate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(review) });
      assert.equal(res.status, 200);
      const metrics = await webhook.metrics.metrics();
      assert.match(metrics, /^pullbridge_webhook_proxy_failovers_total\{kind="probe"\} 1$/m);
      assert.match(metrics, /^pullbridge_webhook_proxy_question_seconds_count\{kind="probe",outcome="unreachable"\} 1$/m);
      assert.match(metrics, /^pullbridge_webhook_proxy_question_seconds_count\{kind="probe",outcome="answered"\} 1$/m);
    } finally {
      await webhook.shutdown();
    }
  });

  it('a rule whose forwarding proxy is down fails the probe (the rule\'s transport is the only way)', async () => {
    await tinyproxy.stop();
    const answer = await tier([proxyA.opsUrl]).probeAnonymous({ rule: 'via', repository: 'public/via-down', reference: '1' }, signal());
    assert.equal(answer.kind, 'failed');
  });
});

describe('admission resolver: pure parts', () => {
  it('a proxy cooling down is asked last, and only after its cool-down ends is it first again (trial 22)', () => {
    const order = ['http://a', 'http://b', 'http://c'];
    const cooling = new Map([['http://a', 1_000 + PROXY_COOLDOWN_MS]]);
    assert.deepEqual(orderAfterCooldown(order, cooling, 1_000), ['http://b', 'http://c', 'http://a']);
    assert.deepEqual(orderAfterCooldown(order, cooling, 1_000 + PROXY_COOLDOWN_MS), order);
    assert.deepEqual(orderAfterCooldown(order, new Map([['http://a', 5_000], ['http://c', 5_000]]), 1_000), ['http://b', 'http://a', 'http://c']);
  });

  it('an attempt\'s share of the time left: half for a proxy in good standing with others after it, an equal share for one cooling down, all for the last', () => {
    assert.equal(attemptShareMs(4_000, 2, false), 2_000);
    assert.equal(attemptShareMs(4_000, 4, true), 1_000);
    assert.equal(attemptShareMs(4_000, 1, false), 4_000);
    assert.equal(attemptShareMs(4_000, 1, true), 4_000);
    assert.equal(attemptShareMs(0, 3, false), 1);
  });

  it('rendezvous order is stable, and removing a proxy moves only the repositories it was first for', () => {
    const endpoints = ['http://10.0.0.1:9090', 'http://10.0.0.2:9090', 'http://10.0.0.3:9090'];
    const keys = Array.from({ length: 200 }, (_, i) => `corp/team/app-${i}`);
    const first = new Map(keys.map((k) => [k, rendezvousOrder(k, endpoints)[0]]));
    assert.deepEqual(rendezvousOrder('corp/x', endpoints), rendezvousOrder('corp/x', [...endpoints].reverse()), 'independent of the listing order');
    const counts = new Map<string, number>();
    for (const e of first.values()) counts.set(e ?? '', (counts.get(e ?? '') ?? 0) + 1);
    assert.equal(counts.size, 3, 'every proxy is first for some repositories');
    const without = endpoints.slice(0, 2);
    for (const k of keys) {
      const before = first.get(k);
      const after = rendezvousOrder(k, without)[0];
      if (before !== endpoints[2]) assert.equal(after, before, `${k} stays where it was`);
    }
  });

  it('keeps answers as the policy says: visibility for minutes, tags briefly, digests long, failures briefly or not at all', () => {
    const p = DEFAULT_VIEW_CACHE_POLICY;
    assert.equal(keepFor({ kind: 'probe' }, { kind: 'answered', status: 200 }, p), p.visibilityMs);
    assert.equal(keepFor({ kind: 'probe' }, { kind: 'answered', status: 401 }, p), p.visibilityMs);
    assert.equal(keepFor({ kind: 'probe' }, { kind: 'answered', status: 404 }, p), p.probeFailureMs);
    assert.equal(keepFor({ kind: 'probe' }, { kind: 'failed', error: 'x' }, p), p.probeFailureMs);
    const found = { kind: 'found' as const, digest: 'sha256:x', mediaType: OCI_INDEX };
    assert.equal(keepFor({ kind: 'manifest', reference: '1.2' }, found, p), p.tagMs);
    assert.equal(keepFor({ kind: 'manifest', reference: `sha256:${'a'.repeat(64)}` }, found, p), p.digestMs);
    assert.equal(keepFor({ kind: 'manifest', reference: '1.2' }, { kind: 'failed', error: 'x' }, p), 0);
    assert.equal(keepFor({ kind: 'manifest', reference: '1.2' }, { kind: 'refused', status: 403, error: 'x' }, p), p.refusalMs);
    assert.ok(p.tagMs < p.visibilityMs && p.visibilityMs < p.digestMs);
  });

  it('the cache is bounded by entries and bytes, and drops expired answers', async () => {
    let now = 0;
    let calls = 0;
    const inner: RegistryView = {
      probeAnonymous: async () => ({ kind: 'answered', status: 200 }),
      manifest: async ({ reference }) => {
        calls++;
        return { kind: 'found', digest: `sha256:${reference}`, mediaType: OCI_INDEX, body: Buffer.alloc(1000) };
      },
      blob: async () => ({ kind: 'failed', error: 'x' }),
      referrers: async () => ({ kind: 'unsupported' }),
    };
    const view = new CachedRegistryView(inner, { ...DEFAULT_VIEW_CACHE_POLICY, maxEntries: 5, maxBytes: 4 * 1300 }, () => now);
    const ask = (reference: string) => view.manifest({ rule: 'r', repository: 'a', reference, namespace: 'n', method: 'GET' }, new AbortController().signal);
    for (let i = 0; i < 10; i++) await ask(`t${i}`);
    assert.ok(view.stats().entries <= 4 && view.stats().bytes <= 4 * 1300, JSON.stringify(view.stats()));
    calls = 0;
    await ask('t9');
    assert.equal(calls, 0, 'the newest is kept');
    await ask('t0');
    assert.equal(calls, 1, 'the oldest was evicted');
    now += DEFAULT_VIEW_CACHE_POLICY.tagMs + 1;
    await ask('t9');
    assert.equal(calls, 2, 'expired after the tag TTL');
  });

  it('shares one call among identical questions: a caller giving up leaves the others their answer; when all gave up the call stops, and is not remembered', async () => {
    const calls: Array<{ signal: AbortSignal; answer: (status: number) => void }> = [];
    const inner: RegistryView = {
      probeAnonymous: (_target, callSignal) =>
        new Promise((resolve) => {
          calls.push({ signal: callSignal, answer: (status) => resolve({ kind: 'answered', status }) });
          callSignal.addEventListener('abort', () => resolve({ kind: 'failed', error: 'aborted' }));
        }),
      manifest: async () => ({ kind: 'failed', error: 'x' }),
      blob: async () => ({ kind: 'failed', error: 'x' }),
      referrers: async () => ({ kind: 'unsupported' }),
    };
    const view = new CachedRegistryView(inner);
    const question = { rule: 'r', repository: 'a', reference: '1' };
    const [a, b] = [new AbortController(), new AbortController()];
    const [first, second] = [view.probeAnonymous(question, a.signal), view.probeAnonymous(question, b.signal)];
    assert.equal(calls.length, 1, 'one call for both');
    a.abort();
    assert.equal((await first).kind, 'failed', 'the caller that gave up');
    assert.equal(calls[0]?.signal.aborted, false, 'the call goes on for the other');
    calls[0]?.answer(200);
    assert.deepEqual(await second, { kind: 'answered', status: 200 });
    const other = { ...question, repository: 'b' };
    const c = new AbortController();
    const gaveUp = view.probeAnonymous(other, c.signal);
    c.abort();
    assert.equal((await gaveUp).kind, 'failed');
    assert.equal(calls[1]?.signal.aborted, true, 'nobody waits: the call stops');
    const again = view.probeAnonymous(other, new AbortController().signal);
    assert.equal(calls.length, 3, 'a later question gets a call of its own, not the abandoned one or its failure');
    calls[2]?.answer(401);
    assert.deepEqual(await again, { kind: 'answered', status: 401 });
  });
});
