// What the node cache answers for a tag or a digest it holds when the upstream refuses, fails, or
// enforces a policy on GET only; and that one client's Accept header never decides what a tag
// resolves to for the others.
//
// Refusals other than 401/403/404 (400, 410, 412, 451), a policy that blocks a GET while its HEAD
// passes (Harbor's "prevent vulnerable images" and content trust), 429 and a silent upstream come
// from a scripted upstream on loopback: docker-registry cannot be made to answer them on demand.
// Multi-arch tags and Accept are tested against docker-registry.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync } from 'node:fs';
import type http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { listen, type RunningServer } from '../src/shell/serve.js';
import { rawRequest, type RawResponse } from './support/http.js';
import { buildImage } from './support/oci.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';
const DOCKER_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json';
/** What containerd sends when it resolves a tag. */
const CONTAINERD_ACCEPT = `${DOCKER_MANIFEST}, ${DOCKER_LIST}, ${OCI_MANIFEST}, application/vnd.oci.image.index.v1+json, */*`;
const STALE = 'pullbridge_cache_requests_total{kind="manifest",result="stale"}';

const MANIFEST = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: `sha256:${'a'.repeat(64)}`, size: 2 }, layers: [] }));
const MANIFEST_DIGEST = `sha256:${createHash('sha256').update(MANIFEST).digest('hex')}`;

/** How the scripted upstream answers a manifest request: as a registry, a refusal with a registry
 * error document, or not at all. */
type Answer = 'ok' | 'silent' | number;

interface ScriptedUpstream {
  readonly server: RunningServer;
  /** What HEAD and GET of the manifest (by tag `v1` or by its digest) are answered with. */
  head: Answer;
  get: Answer;
  /** Manifest requests seen: method and If-None-Match. */
  readonly seen: Array<{ method: string; path: string; ifNoneMatch: string | undefined; status: number }>;
  errorBody(status: number): string;
}

/** A registry holding one manifest (tag `v1` of `team/app`) whose answers the test sets; it answers a
 * GET whose If-None-Match names the manifest's digest with 304, as distribution does. */
async function scriptedUpstream(): Promise<ScriptedUpstream> {
  const errorBody = (status: number) => JSON.stringify({ errors: [{ code: 'DENIED', message: `policy refused it (${status})`, detail: { status } }] });
  const state: Omit<ScriptedUpstream, 'server'> = { head: 'ok', get: 'ok', seen: [], errorBody };
  const server = await listen(
    (req: http.IncomingMessage, res: http.ServerResponse) => {
      const path = req.url ?? '';
      if (path === '/v2/') return void res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
      if (path !== '/v2/team/app/manifests/v1' && path !== `/v2/team/app/manifests/${MANIFEST_DIGEST}`) {
        return void res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}');
      }
      const answer = req.method === 'HEAD' ? state.head : state.get;
      const ifNoneMatch = req.headers['if-none-match'];
      const seen = { method: req.method ?? '', path, ifNoneMatch, status: 0 };
      state.seen.push(seen);
      if (answer === 'silent') return;
      if (typeof answer === 'number') {
        seen.status = answer;
        const body = errorBody(answer);
        return void res.writeHead(answer, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...(answer === 429 ? { 'retry-after': '7' } : {}) }).end(req.method === 'HEAD' ? undefined : body);
      }
      const headers = { 'content-type': OCI_MANIFEST, 'docker-content-digest': MANIFEST_DIGEST, etag: `"${MANIFEST_DIGEST}"` };
      if (req.method === 'GET' && (ifNoneMatch === `"${MANIFEST_DIGEST}"` || ifNoneMatch === MANIFEST_DIGEST)) {
        seen.status = 304;
        return void res.writeHead(304, headers).end();
      }
      seen.status = 200;
      res.writeHead(200, { ...headers, 'content-length': MANIFEST.length });
      res.end(req.method === 'HEAD' ? undefined : MANIFEST);
    },
    { host: '127.0.0.1', port: 0 },
  );
  return Object.assign(state, { server });
}

/** A sample's value in the proxy's /metrics text (0 when absent). */
async function metric(p: ProxyUnderTest, sample: string): Promise<number> {
  const line = (await p.metrics.metrics()).split('\n').find((l) => l.startsWith(`${sample} `));
  return line ? Number(line.slice(sample.length + 1)) : 0;
}

describe('the node cache and what the upstream refuses', function () {
  this.timeout(60_000);
  let upstream: ScriptedUpstream;
  const cleanups: Array<() => Promise<void>> = [];
  beforeEach(async () => {
    upstream = await scriptedUpstream();
    cleanups.push(() => upstream.server.close(100));
  });
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });
  /** A proxy whose every tag is asked upstream again at once (tagTTLSeconds 0), and may be served
   * stale for an hour: rule `corp` for the scripted upstream, with more keys as given. */
  async function cachedProxy(corp: Record<string, unknown> = {}): Promise<ProxyUnderTest> {
    const p = await startProxy(
      {
        cache: { path: mkdtempSync(join(tmpdir(), 'pullbridge-cache-')), tagTTLSeconds: 0, staleIfErrorSeconds: 3600 },
        registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.server.url, ...corp }],
      },
      { timeouts: { connectMs: 1000, headersMs: 500, bodyIdleMs: 500 } },
    );
    cleanups.push(() => p.close());
    return p;
  }
  const ask = (p: ProxyUnderTest, path: string, method = 'GET'): Promise<RawResponse> => rawRequest(p.url, path, { method, headers: { authorization: p.authorization('shop'), accept: CONTAINERD_ACCEPT } });
  /** Pulls tag v1 and the manifest by digest while the upstream serves them: both stored. */
  async function cached(p: ProxyUnderTest): Promise<void> {
    for (const reference of ['v1', MANIFEST_DIGEST]) {
      const res = await ask(p, `/v2/corp/team/app/manifests/${reference}`);
      assert.equal(res.status, 200, res.body.toString());
      assert.ok(res.body.equals(MANIFEST));
    }
  }

  for (const status of [400, 410, 412, 451]) {
    it(`passes on a ${status} for a tag it holds, with the upstream's error document, never the last digest`, async () => {
      const p = await cachedProxy();
      await cached(p);
      upstream.head = upstream.get = status;
      for (const method of ['GET', 'HEAD']) {
        const res = await ask(p, '/v2/corp/team/app/manifests/v1', method);
        assert.equal(res.status, status, `${method}: ${res.status} ${res.body.toString()}`);
        assert.equal(res.headers.warning, undefined, 'not served stale');
        if (method === 'GET') assert.equal(res.body.toString(), upstream.errorBody(status));
      }
      assert.equal(await metric(p, STALE), 0);
    });
  }

  for (const failure of [503, 429, 'silent'] as const) {
    it(`bridges ${failure === 'silent' ? 'an upstream that times out' : `a ${failure}`} with the last digest of the tag, with a 110 Warning`, async () => {
      const p = await cachedProxy();
      await cached(p);
      upstream.head = upstream.get = failure;
      const res = await ask(p, '/v2/corp/team/app/manifests/v1');
      assert.equal(res.status, 200, res.body.toString());
      assert.ok(res.body.equals(MANIFEST));
      assert.match(String(res.headers.warning), /^110 pullbridge "Response is Stale/);
      assert.equal(await metric(p, STALE), 1);
      // By digest the stored manifest stands in for the upstream as well.
      const byDigest = await ask(p, `/v2/corp/team/app/manifests/${MANIFEST_DIGEST}`);
      assert.equal(byDigest.status, 200, byDigest.body.toString());
      assert.ok(byDigest.body.equals(MANIFEST));
    });
  }

  it('honours a policy that refuses the GET while the HEAD passes: the blocked image is served neither by tag nor by digest once tagTTLSeconds passed', async () => {
    const p = await cachedProxy();
    await cached(p);
    upstream.seen.length = 0;
    // Harbor's "prevent vulnerable images" or content trust, switched on after the image was cached.
    upstream.get = 412;
    for (const reference of ['v1', MANIFEST_DIGEST]) {
      for (const method of ['GET', 'HEAD']) {
        const res = await ask(p, `/v2/corp/team/app/manifests/${reference}`, method);
        assert.equal(res.status, 412, `${method} ${reference}: ${res.status} ${res.body.toString()}`);
        assert.equal(res.headers.warning, undefined);
        if (method === 'GET') assert.equal(res.body.toString(), upstream.errorBody(412));
      }
    }
    // Asked with a GET conditional on the digest the cache holds (a 304 carries no body).
    assert.ok(upstream.seen.length > 0);
    assert.deepEqual(new Set(upstream.seen.map((s) => `${s.method} ${s.ifNoneMatch ?? ''}`)), new Set([`GET "${MANIFEST_DIGEST}"`]));
    // The policy lifted: the revalidation is a 304 and the stored manifest is served again.
    upstream.get = 'ok';
    upstream.seen.length = 0;
    const again = await ask(p, '/v2/corp/team/app/manifests/v1');
    assert.equal(again.status, 200);
    assert.ok(again.body.equals(MANIFEST));
    assert.deepEqual(upstream.seen.map((s) => [s.method, s.status]), [['GET', 304]]);
    assert.equal(await metric(p, STALE), 0);
  });

  it('with revalidate: head asks only HEADs, so a GET-only policy is not seen (the documented trade-off)', async () => {
    const p = await cachedProxy({ revalidate: 'head' });
    await cached(p);
    upstream.seen.length = 0;
    upstream.get = 412;
    for (const reference of ['v1', MANIFEST_DIGEST]) {
      const res = await ask(p, `/v2/corp/team/app/manifests/${reference}`);
      assert.equal(res.status, 200, res.body.toString());
      assert.ok(res.body.equals(MANIFEST));
    }
    assert.deepEqual(upstream.seen.map((s) => s.method), ['HEAD'], 'one HEAD of the tag');
  });
});

describe('the node cache and a client that accepts less than the index', function () {
  this.timeout(120_000);
  const cleanups: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  it("resolves a multi-arch tag with the complete Accept list: a narrow client's answer is never what the others get, nor the tag's record, after the TTL or in an outage", async () => {
    const upstream: RegistryHandle = await startRegistry();
    cleanups.push(() => upstream.stop());
    // A Docker manifest list over two platforms: for a client that does not accept a list, the
    // registry converts the tag to its linux/amd64 manifest.
    await upstream.push(buildImage(), 'team/multi', '1', 'docker');
    const direct = async (accept: string) => (await fetch(`${upstream.url}/v2/team/multi/manifests/1`, { headers: { accept } })).headers.get('docker-content-digest');
    const list = await direct(CONTAINERD_ACCEPT);
    const amd64 = await direct(DOCKER_MANIFEST);
    assert.ok(list && amd64 && list !== amd64);

    const path = mkdtempSync(join(tmpdir(), 'pullbridge-cache-'));
    const p = await startProxy({ cache: { path, tagTTLSeconds: 3600 }, registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.url }] });
    cleanups.push(() => p.close());
    const pull = (accept: string) => rawRequest(p.url, '/v2/corp/team/multi/manifests/1', { headers: { authorization: p.authorization('shop'), accept } });
    const record = () => JSON.parse(readFileSync(join(path, 'repositories', 'corp', 'team', 'multi', '_tags', '1'), 'utf8')) as { digest: string; mediaType: string };

    // A neighbour asks for Docker image manifests only: it gets what the registry gives it (amd64).
    const narrow = await pull(DOCKER_MANIFEST);
    assert.equal(narrow.status, 200);
    assert.equal(narrow.headers['docker-content-digest'], amd64);
    const full = await pull(CONTAINERD_ACCEPT);
    assert.equal(full.status, 200);
    assert.equal(full.headers['docker-content-digest'], list, 'containerd gets the list');
    assert.equal(full.headers['content-type'], DOCKER_LIST);
    assert.deepEqual([record().digest, record().mediaType], [list, DOCKER_LIST], 'the tag record names the list');

    // After the TTL (a reload shortening it), the neighbour asks first again.
    p.cache!.configure({ ...p.cache!.settings, tagTTLSeconds: 0 });
    assert.equal((await pull(DOCKER_MANIFEST)).headers['docker-content-digest'], amd64);
    assert.equal((await pull(CONTAINERD_ACCEPT)).headers['docker-content-digest'], list);
    assert.equal((await pull(DOCKER_MANIFEST)).headers['docker-content-digest'], amd64);
    assert.equal(record().digest, list);

    // In an outage the list is what the tag's last known digest names.
    await upstream.kill();
    const stale = await pull(CONTAINERD_ACCEPT);
    assert.equal(stale.status, 200);
    assert.equal(stale.headers['docker-content-digest'], list);
    assert.match(String(stale.headers.warning), /^110 /);
    // The neighbour cannot be given what it accepts (the registry would have converted the list).
    assert.notEqual((await pull(DOCKER_MANIFEST)).status, 200);
  });
});
