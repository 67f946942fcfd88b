// The node cache with real parts: containerd pulls through the proxy from docker-registry, the
// registry is killed, and a fresh containerd store pulls the same image by tag from the cache;
// concurrent pulls of one uncached blob make one upstream transfer (counted in the registry's
// access log); a fill cut mid-body, eviction under maxBytes and under a reader, Range, stale tags,
// `cache: false`, a restart on the same store, the free-disk floor and /status. What the cache
// must not serve to whom is in cache-isolation.test.ts.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runCli, startCli } from './support/cli.js';
import { startContainerd, type Containerd } from './support/containerd.js';
import { errorCode, rawRequest, slowUpstream } from './support/http.js';
import { buildImage, sha256, type TestImage } from './support/oci.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { freePort } from './support/procs.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';

interface Pulled {
  status: number;
  digest: string;
  bytes: number;
  complete: boolean;
}

/** GETs a blob through the proxy; resolves with the sha256 of the body and its length (or the error). */
function pullBlob(p: ProxyUnderTest, path: string, authorization: string): Promise<Pulled> {
  return new Promise((resolve, reject) => {
    const req = http.get(`${p.url}${path}`, { headers: { authorization } }, (res) => {
      const hash = createHash('sha256');
      let bytes = 0;
      res.on('data', (chunk: Buffer) => {
        hash.update(chunk);
        bytes += chunk.length;
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, digest: `sha256:${hash.digest('hex')}`, bytes, complete: res.complete }));
      res.on('error', () => resolve({ status: res.statusCode ?? 0, digest: `sha256:${hash.digest('hex')}`, bytes, complete: false }));
    });
    req.on('error', reject);
  });
}

/** A blob download that stops reading after its first bytes, until resumed. */
function pausedBlob(p: ProxyUnderTest, path: string, authorization: string): Promise<{ status: number; resume(): Promise<Pulled> }> {
  return new Promise((resolve, reject) => {
    const req = http.get(`${p.url}${path}`, { headers: { authorization }, agent: false }, (res) => {
      const hash = createHash('sha256');
      let bytes = 0;
      res.on('data', (chunk: Buffer) => {
        hash.update(chunk);
        bytes += chunk.length;
      });
      res.once('data', () => res.pause());
      const ended = new Promise<Pulled>((done) => {
        const result = (complete: boolean) => ({ status: res.statusCode ?? 0, digest: `sha256:${hash.digest('hex')}`, bytes, complete });
        res.once('end', () => done(result(res.complete)));
        res.once('error', () => done(result(false)));
      });
      resolve({ status: res.statusCode ?? 0, resume: () => (res.resume(), ended) });
    });
    req.on('error', reject);
  });
}

/** Files under `<cache.path>/<dir>` (recursively), with their sizes. */
function filesUnder(root: string, dir: string): Array<{ path: string; size: number }> {
  const entries = readdirSync(join(root, dir), { recursive: true, withFileTypes: true });
  return entries.filter((e) => e.isFile()).map((e) => ({ path: join(e.parentPath, e.name), size: statSync(join(e.parentPath, e.name)).size }));
}
const storedBytes = (root: string) => filesUnder(root, 'blobs').reduce((sum, f) => sum + f.size, 0);
const storedDigests = (root: string) => new Set(filesUnder(root, 'blobs').map((f) => `sha256:${f.path.slice(f.path.lastIndexOf('/') + 1)}`));

/** A sample's value in the proxy's /metrics text (0 when absent). */
async function metric(p: ProxyUnderTest, sample: string): Promise<number> {
  const line = (await p.metrics.metrics()).split('\n').find((l) => l.startsWith(`${sample} `));
  return line ? Number(line.slice(sample.length + 1)) : 0;
}

/** Waits until no fill is in flight (their outcome, store or discard, is then on disk). */
async function fillsSettled(p: ProxyUnderTest): Promise<void> {
  while (p.cache!.flights.size > 0 || p.cache!.status().fillsInFlight !== 0) await new Promise((r) => setTimeout(r, 20));
}

const pullRecords = (p: ProxyUnderTest) => p.logs.records.filter((r) => r.access === 'pull');

describe('the node cache', function () {
  this.timeout(180_000);
  const cleanups: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });
  async function registry(): Promise<RegistryHandle> {
    const r = await startRegistry({ accessLog: true });
    cleanups.push(() => r.stop());
    return r;
  }
  /** A proxy with a fresh store (unless `cache.path` is given) and rule `corp` for `upstream` (`corp`: more of its keys; `others`: more rules). */
  async function cachedProxy(upstream: RegistryHandle, cache: Record<string, unknown> = {}, corp: Record<string, unknown> = {}, others: Array<{ name: string; match: string[]; upstream: string; auth?: { mode: 'anonymous' } }> = []): Promise<ProxyUnderTest> {
    const p = await startProxy({ cache: { path: mkdtempSync(join(tmpdir(), 'pullbridge-cache-')), ...cache }, registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.url, ...corp }, ...others] });
    cleanups.push(() => p.close().catch(() => undefined));
    return p;
  }
  const asShop = (p: ProxyUnderTest) => ({ authorization: p.authorization('shop') });
  /** GETs `repository:tag` through rule corp as a client would: the index by tag, the manifests by digest, then every blob; each body must match. */
  async function pullImage(p: ProxyUnderTest, repository: string, tag: string, image: TestImage): Promise<void> {
    const index = await rawRequest(p.url, `/v2/corp/${repository}/manifests/${tag}`, { headers: { ...asShop(p), accept: OCI_INDEX } });
    assert.equal(index.status, 200, index.body.toString());
    assert.ok(index.body.equals(image.index.data), 'the index by tag');
    for (const m of image.manifests) {
      const res = await rawRequest(p.url, `/v2/corp/${repository}/manifests/${m.digest}`, { headers: { ...asShop(p), accept: OCI_MANIFEST } });
      assert.equal(res.status, 200);
      assert.ok(res.body.equals(m.data), `manifest ${m.digest}`);
    }
    for (const b of [...image.configs, ...image.layers]) {
      const res = await rawRequest(p.url, `/v2/corp/${repository}/blobs/${b.digest}`, { headers: asShop(p) });
      assert.equal(res.status, 200);
      assert.equal(sha256(res.body), b.digest);
    }
  }
  /** HEADs and GETs of `repository:tag` the registry answered (a push's PUT is not a question). */
  const manifestAsks = async (upstream: RegistryHandle, repository: string, tag: string) => (await upstream.requests()).filter((r) => r.path === `/v2/${repository}/manifests/${tag}` && (r.method === 'HEAD' || r.method === 'GET')).length;
  const AMD64 = [{ os: 'linux', architecture: 'amd64' }];
  const MiB = 1024 * 1024;

  describe('with containerd', () => {
    let containerd: Containerd;
    before(async () => {
      containerd = await startContainerd();
    });
    after(async () => containerd?.stop());

    it('serves an image by tag from the cache to a fresh containerd after the registry is killed', async () => {
      const upstream = await registry();
      const image = buildImage({ layerSizes: [4096, 2 * 1024 * 1024] });
      await upstream.push(image, 'team/app', '1.0');
      // tagTTLSeconds 0: every tag is asked upstream, so the second pull meets the dead registry.
      const p = await cachedProxy(upstream, { tagTTLSeconds: 0 });
      await containerd.fetch(`${p.host}/corp/team/app:1.0`, { user: p.credential('shop'), allPlatforms: true });
      const misses = p.logs.records.filter((r) => r.access === 'pull' && r.cache === 'miss').length;
      assert.ok(misses >= image.blobs.size, `every blob and manifest filled (${misses} misses)`);

      await upstream.kill();
      const since = p.logs.records.length;
      await containerd.clear();
      await containerd.fetch(`${p.host}/corp/team/app:1.0`, { user: p.credential('shop'), allPlatforms: true });
      const have = await containerd.digests();
      for (const [digest, blob] of image.blobs) {
        assert.ok(have.has(digest), `containerd lacks ${digest}`);
        const bytes = await containerd.content(digest);
        assert.equal(sha256(bytes), digest);
        assert.ok(bytes.equals(blob.data));
      }
      const after = p.logs.records.slice(since).filter((r) => r.access === 'pull' && r.status === 200);
      assert.ok(after.some((r) => r.cache === 'stale' && r.kind === 'manifest'), 'the tag was served stale');
      assert.ok(after.filter((r) => r.kind === 'blob').every((r) => r.cache === 'hit'), 'every blob from the store');
      const stale = p.logs.records.find((r) => r.msg?.toString().includes('Response is Stale'));
      assert.ok(stale, 'a log line says the tag was served stale');
    });
  });

  it('makes one upstream transfer for 16 concurrent pulls of an uncached 256 MiB blob', async () => {
    const upstream = await registry();
    const image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [256 * 1024 * 1024] });
    await upstream.push(image, 'team/big', '1');
    const p = await cachedProxy(upstream);
    const layer = image.layers[0]!;
    const pulls = await Promise.all(Array.from({ length: 16 }, () => pullBlob(p, `/v2/corp/team/big/blobs/${layer.digest}`, p.authorization('shop'))));
    for (const pull of pulls) {
      assert.equal(pull.status, 200);
      assert.equal(pull.digest, layer.digest);
    }
    assert.equal(await upstream.blobGets(layer.digest), 1, 'the registry served the blob once');
    const again = await pullBlob(p, `/v2/corp/team/big/blobs/${layer.digest}`, p.authorization('shop'));
    assert.equal(again.digest, layer.digest);
    assert.equal(await upstream.blobGets(layer.digest), 1, 'a later pull is a hit');
  });

  it('lets no client take a body cut mid-fill as complete, keeps nothing of it, and fills cleanly from a healthy upstream next', async () => {
    const upstream = await registry();
    const image = buildImage({ platforms: AMD64, layerSizes: [MiB] });
    await upstream.push(image, 'team/app', '1');
    const layer = image.layers[0]!;
    // docker-registry cannot cut a body it announced whole: a scripted upstream sends the whole
    // layer's Content-Length, then half of it slowly (so that every client joins the fill), then closes.
    const cutting = await slowUpstream(layer.data, { chunkBytes: 64 * 1024, intervalMs: 20, announceLength: true, contentType: 'application/octet-stream', cutAfterBytes: Math.floor(layer.size / 2) });
    cleanups.push(() => cutting.close(0));
    const p = await cachedProxy(upstream, {}, {}, [{ name: 'cut', match: ['cut.example'], upstream: cutting.url }]);
    const root = p.cache!.store.root;

    const cut = await Promise.all(Array.from({ length: 4 }, () => pullBlob(p, `/v2/cut/team/app/blobs/${layer.digest}`, p.authorization('shop'))));
    for (const pull of cut) {
      assert.equal(pull.complete, false, 'the client sees a cut body');
      assert.ok(pull.bytes < layer.size, `${pull.bytes} of ${layer.size} bytes`);
    }
    await fillsSettled(p);
    assert.deepEqual(filesUnder(root, 'blobs'), [], 'nothing stored');
    assert.deepEqual(filesUnder(root, 'tmp'), [], 'nothing left half-written');
    assert.ok((await metric(p, 'pullbridge_cache_fill_failures_total')) >= 1);
    assert.ok(pullRecords(p).every((r) => r.rule === 'cut' && r.error !== undefined), 'every cut pull is logged with its error');

    // The same digest from a healthy upstream: one clean fill, served whole, stored as it hashes.
    const whole = await pullBlob(p, `/v2/corp/team/app/blobs/${layer.digest}`, p.authorization('shop'));
    assert.deepEqual([whole.status, whole.complete, whole.digest], [200, true, layer.digest]);
    assert.equal(await upstream.blobGets(layer.digest), 1);
    await fillsSettled(p);
    const stored = filesUnder(root, 'blobs');
    assert.equal(stored.length, 1);
    assert.equal(sha256(readFileSync(stored[0]!.path)), layer.digest);
    assert.deepEqual(filesUnder(root, 'tmp'), []);
  });

  it('keeps the store within maxBytes while pulling more than fits, evicting the least recently used blobs', async () => {
    const upstream = await registry();
    const image = buildImage({ platforms: AMD64, layerSizes: [MiB, MiB, MiB, MiB, MiB] });
    await upstream.push(image, 'team/app', '1');
    const maxBytes = 3 * MiB;
    const p = await cachedProxy(upstream, { maxBytes });
    const root = p.cache!.store.root;
    for (const layer of image.layers) {
      const pulled = await pullBlob(p, `/v2/corp/team/app/blobs/${layer.digest}`, p.authorization('shop'));
      assert.equal(pulled.digest, layer.digest);
      await fillsSettled(p);
      assert.ok(storedBytes(root) <= maxBytes, `${storedBytes(root)} bytes stored after pulling ${layer.digest}`);
      assert.ok(storedDigests(root).has(layer.digest), 'the blob just pulled is kept');
    }
    const kept = storedDigests(root);
    assert.equal(await metric(p, 'pullbridge_cache_evictions_total'), image.layers.length - kept.size);
    assert.ok(kept.size < image.layers.length);
    const [first] = image.layers;
    assert.ok(!kept.has(first!.digest), 'the least recently used went first');
    // Evicted: from upstream again. Kept: from the store.
    const last = image.layers.at(-1)!;
    assert.equal((await pullBlob(p, `/v2/corp/team/app/blobs/${first!.digest}`, p.authorization('shop'))).digest, first!.digest);
    assert.equal((await pullBlob(p, `/v2/corp/team/app/blobs/${last.digest}`, p.authorization('shop'))).digest, last.digest);
    assert.equal(await upstream.blobGets(first!.digest), 2);
    assert.equal(await upstream.blobGets(last.digest), 1);
  });

  it('never deletes a blob under a reader that paused mid-body; the reader gets it whole', async () => {
    const upstream = await registry();
    // The read blob is far larger than what loopback sockets buffer, so its reader is really mid-body.
    const image = buildImage({ platforms: AMD64, layerSizes: [32 * MiB, 8 * MiB, 8 * MiB, 8 * MiB] });
    await upstream.push(image, 'team/app', '1');
    const maxBytes = 48 * MiB;
    const p = await cachedProxy(upstream, { maxBytes });
    const root = p.cache!.store.root;
    const [read, ...others] = image.layers;
    const path = `/v2/corp/team/app/blobs/${read!.digest}`;
    assert.equal((await pullBlob(p, path, p.authorization('shop'))).digest, read!.digest);
    await fillsSettled(p);
    const reader = await pausedBlob(p, path, p.authorization('shop'));
    assert.equal(reader.status, 200);
    assert.equal(p.cache!.store.blobs().find((b) => b.digest === read!.digest)?.readers, 1, 'the reader holds the blob');
    // Least recently used, it would go first: the others are pulled after it.
    for (const layer of others) {
      assert.equal((await pullBlob(p, `/v2/corp/team/app/blobs/${layer.digest}`, p.authorization('shop'))).digest, layer.digest);
      await fillsSettled(p);
      assert.ok(storedBytes(root) <= maxBytes, `${storedBytes(root)} bytes stored`);
      assert.ok(storedDigests(root).has(read!.digest), 'the blob being read is still stored');
    }
    assert.ok((await metric(p, 'pullbridge_cache_evictions_total')) >= 1, 'others were evicted instead');
    const rest = await reader.resume();
    assert.deepEqual([rest.complete, rest.bytes, rest.digest], [true, read!.size, read!.digest]);
    assert.equal(await upstream.blobGets(read!.digest), 1, 'the reader was served from the store');
  });

  it('answers a Range from a stored blob with 206 and the bytes asked, without the upstream; a Range on a blob not stored goes upstream', async () => {
    const upstream = await registry();
    const image = buildImage({ platforms: AMD64, layerSizes: [256 * 1024, 256 * 1024] });
    await upstream.push(image, 'team/app', '1');
    const p = await cachedProxy(upstream);
    const [stored, away] = image.layers as [typeof image.layers[0], typeof image.layers[0]];
    assert.equal((await pullBlob(p, `/v2/corp/team/app/blobs/${stored.digest}`, p.authorization('shop'))).digest, stored.digest);
    await fillsSettled(p);
    const asked = (await upstream.requests()).filter((r) => r.path.endsWith(`/blobs/${stored.digest}`)).length;
    const ranged = (digest: string, range: string) => rawRequest(p.url, `/v2/corp/team/app/blobs/${digest}`, { headers: { ...asShop(p), range } });

    const part = await ranged(stored.digest, 'bytes=100-4195');
    assert.equal(part.status, 206);
    assert.equal(part.headers['content-range'], `bytes 100-4195/${stored.size}`);
    assert.ok(part.body.equals(stored.data.subarray(100, 4196)));
    const tail = await ranged(stored.digest, 'bytes=-10');
    assert.equal(tail.status, 206);
    assert.equal(tail.headers['content-range'], `bytes ${stored.size - 10}-${stored.size - 1}/${stored.size}`);
    assert.ok(tail.body.equals(stored.data.subarray(stored.size - 10)));
    assert.equal((await upstream.requests()).filter((r) => r.path.endsWith(`/blobs/${stored.digest}`)).length, asked, 'the registry was not asked again');
    assert.deepEqual(pullRecords(p).slice(-2).map((r) => r.cache), ['hit', 'hit']);

    const relayed = await ranged(away.digest, 'bytes=10-19');
    assert.equal(relayed.status, 206);
    assert.ok(relayed.body.equals(away.data.subarray(10, 20)));
    assert.equal(await upstream.blobGets(away.digest), 1, 'asked upstream');
    assert.equal(pullRecords(p).at(-1)?.cache, 'bypass');
    assert.ok(!storedDigests(p.cache!.store.root).has(away.digest), 'a range fills nothing');
  });

  describe('tags', () => {
    it('are asked upstream at most once per tagTTLSeconds (a retag meanwhile is not seen)', async () => {
      const upstream = await registry();
      const [v1, v2] = [buildImage({ platforms: AMD64 }), buildImage({ platforms: AMD64 })];
      await upstream.push(v1, 'team/app', '1');
      const p = await cachedProxy(upstream, { tagTTLSeconds: 3600 });
      for (let i = 0; i < 5; i++) await pullImage(p, 'team/app', '1', v1);
      assert.equal(await manifestAsks(upstream, 'team/app', '1'), 1, 'one HEAD of the tag for five pulls');
      await upstream.push(v2, 'team/app', '1');
      await pullImage(p, 'team/app', '1', v1);
      assert.equal(await manifestAsks(upstream, 'team/app', '1'), 1);
    });

    it('are asked upstream once for eight concurrent first pulls of a tag, and each manifest fetched once by digest (single flight)', async () => {
      const upstream = await registry();
      const image = buildImage({ platforms: AMD64 });
      await upstream.push(image, 'team/app', '1');
      // Not in the store yet (a push only): eight Pods of a rollout start on this node at once.
      const p = await cachedProxy(upstream, { tagTTLSeconds: 3600 });
      await Promise.all(Array.from({ length: 8 }, () => pullImage(p, 'team/app', '1', image)));
      assert.equal(await manifestAsks(upstream, 'team/app', '1'), 1, 'one upstream ask of the tag for eight concurrent pulls');
      for (const m of [image.index, ...image.manifests]) assert.equal(await manifestAsks(upstream, 'team/app', m.digest), m === image.index ? 0 : 1, `manifest ${m.digest}`);
      // HEADs, as containerd resolves a tag, share the ask too.
      const q = await cachedProxy(upstream, { tagTTLSeconds: 3600 });
      const before = await manifestAsks(upstream, 'team/app', '1');
      const heads = await Promise.all(Array.from({ length: 8 }, () => rawRequest(q.url, '/v2/corp/team/app/manifests/1', { method: 'HEAD', headers: { ...asShop(q), accept: OCI_INDEX } })));
      for (const head of heads) assert.equal(head.headers['docker-content-digest'], image.index.digest);
      assert.equal((await manifestAsks(upstream, 'team/app', '1')) - before, 1, 'one upstream ask for eight concurrent HEADs');
    });

    it('fetch a manifest by digest once for eight concurrent requests of it (single flight), every client getting its bytes', async () => {
      const upstream = await registry();
      const image = buildImage();
      await upstream.push(image, 'team/app', '1');
      const p = await cachedProxy(upstream);
      const manifest = image.manifests[0]!;
      const answers = await Promise.all(Array.from({ length: 8 }, () => rawRequest(p.url, `/v2/corp/team/app/manifests/${manifest.digest}`, { headers: { ...asShop(p), accept: OCI_MANIFEST } })));
      for (const answer of answers) {
        assert.equal(answer.status, 200);
        assert.ok(answer.body.equals(manifest.data));
      }
      assert.equal(await manifestAsks(upstream, 'team/app', manifest.digest), 1, 'one upstream GET for eight concurrent requests');
    });

    it("pass on a token endpoint's refusal (400) once tagTTLSeconds passed, never the last digest: only an outage is bridged", async () => {
      const upstream = await startRegistry({ accessLog: true, auth: 'token' });
      cleanups.push(() => upstream.stop());
      const image = buildImage({ platforms: AMD64 });
      await upstream.push(image, 'team/app', '1');
      const issuer = upstream.issuer!;
      // Tokens that the proxy must ask again for at once: the next tag check goes to the endpoint.
      issuer.expiresIn = 1;
      const dir = mkdtempSync(join(tmpdir(), 'pullbridge-token-'));
      writeFileSync(join(dir, 'password'), DEFAULT_USERS.puller);
      const [user] = Object.keys(DEFAULT_USERS);
      const p = await cachedProxy(upstream, { tagTTLSeconds: 1 }, { credentials: { username: user, passwordFile: join(dir, 'password') }, auth: { mode: 'broker', tokenRealms: [new URL(issuer.realm).origin] } });
      await pullImage(p, 'team/app', '1', image);
      issuer.refuseWith = 400;
      await new Promise((r) => setTimeout(r, 1100)); // the TTL and the token pass
      const answer = await rawRequest(p.url, '/v2/corp/team/app/manifests/1', { headers: { ...asShop(p), accept: OCI_INDEX } });
      assert.equal(answer.status, 502, answer.body.toString());
      assert.equal(answer.headers.warning, undefined, 'not served stale');
      assert.equal(errorCode(answer), 'DENIED');
      // An outage of the endpoint is bridged, as before.
      issuer.refuseWith = 503;
      const bridged = await rawRequest(p.url, '/v2/corp/team/app/manifests/1', { headers: { ...asShop(p), accept: OCI_INDEX } });
      assert.equal(bridged.status, 200);
      assert.match(String(bridged.headers.warning), /^110 /);
    });

    it('see a retag once tagTTLSeconds passed', async () => {
      const upstream = await registry();
      const [v1, v2] = [buildImage({ platforms: AMD64 }), buildImage({ platforms: AMD64 })];
      await upstream.push(v1, 'team/app', '1');
      const p = await cachedProxy(upstream, { tagTTLSeconds: 1 });
      await pullImage(p, 'team/app', '1', v1);
      await upstream.push(v2, 'team/app', '1');
      await new Promise((r) => setTimeout(r, 1100)); // the TTL passes
      await pullImage(p, 'team/app', '1', v2);
      assert.equal(await manifestAsks(upstream, 'team/app', '1'), 2);
    });

    it('pass on a 404 for a tag the registry no longer has, however long the last digest may be served stale', async () => {
      const upstream = await startRegistry({ accessLog: true, deletes: true });
      cleanups.push(() => upstream.stop());
      const image = buildImage({ platforms: AMD64 });
      await upstream.push(image, 'team/app', '1');
      const p = await cachedProxy(upstream, { tagTTLSeconds: 0 });
      await pullImage(p, 'team/app', '1', image);
      // Deleting the manifest the tag names untags it (storage.delete.enabled).
      const deleted = await fetch(`${upstream.url}/v2/team/app/manifests/${image.index.digest}`, { method: 'DELETE' });
      assert.equal(deleted.status, 202);
      const res = await rawRequest(p.url, '/v2/corp/team/app/manifests/1', { headers: { ...asShop(p), accept: OCI_INDEX } });
      assert.equal(res.status, 404);
      assert.match(res.body.toString(), /MANIFEST_UNKNOWN/);
      assert.equal(await manifestAsks(upstream, 'team/app', '1'), 2);
      assert.equal(await metric(p, 'pullbridge_cache_requests_total{kind="manifest",result="stale"}'), 0);
    });
  });

  describe('content deleted or revoked upstream', () => {
    /** The registry forgets the image: its manifests and its first layer in team/app (storage.delete.enabled). */
    async function deleteUpstream(upstream: RegistryHandle, image: TestImage): Promise<void> {
      for (const path of [...[image.index, ...image.manifests].map((m) => `manifests/${m.digest}`), `blobs/${image.layers[0]!.digest}`]) {
        const res = await fetch(`${upstream.url}/v2/team/app/${path}`, { method: 'DELETE' });
        assert.equal(res.status, 202, path);
      }
    }
    const byDigest = (p: ProxyUnderTest, image: TestImage) => [
      rawRequest(p.url, `/v2/corp/team/app/manifests/${image.manifests[0]!.digest}`, { headers: { ...asShop(p), accept: OCI_MANIFEST } }),
      rawRequest(p.url, `/v2/corp/team/app/blobs/${image.layers[0]!.digest}`, { headers: asShop(p) }),
    ];
    const linkPath = (root: string, digest: string) => join(root, 'repositories', 'corp', 'team', 'app', '_links', 'sha256', digest.slice('sha256:'.length));

    it("keeps a layer's link when a client asks for the layer's digest as a manifest, which the registry refuses (only a refusal of what the link records removes it)", async () => {
      const upstream = await registry();
      const image = buildImage({ platforms: AMD64 });
      await upstream.push(image, 'team/app', '1');
      const p = await cachedProxy(upstream, { reconfirmSeconds: 0 });
      await pullImage(p, 'team/app', '1', image);
      const root = p.cache!.store.root;
      const layer = image.layers[0]!;
      await p.cache!.sharing(); // the fills in flight have stored and linked what they filled
      assert.ok(existsSync(linkPath(root, layer.digest)), 'the layer is linked');
      for (const method of ['GET', 'HEAD']) {
        // distribution 2.8 answers 500 (it parses the layer as a manifest); others answer 404. Either
        // way the answer is the registry's, never the layer's bytes from the store.
        const asManifest = await rawRequest(p.url, `/v2/corp/team/app/manifests/${layer.digest}`, { method, headers: { ...asShop(p), accept: `${OCI_MANIFEST}, */*` } });
        assert.ok(asManifest.status >= 400, `${method} of the layer's digest as a manifest: ${asManifest.status}`);
        assert.notEqual(pullRecords(p).at(-1)?.cache, 'hit', `${method}: not answered from the store`);
      }
      assert.ok(existsSync(linkPath(root, layer.digest)), "the layer's link is still there");
      const again = await rawRequest(p.url, `/v2/corp/team/app/blobs/${layer.digest}`, { headers: asShop(p) });
      assert.equal(sha256(again.body), layer.digest);
      assert.equal(pullRecords(p).at(-1)?.cache, 'hit');
    });

    it('is not served by digest once reconfirmSeconds passed: the registry deleted manifest and layer, the proxy answers 404 and removes their links', async () => {
      const upstream = await startRegistry({ accessLog: true, deletes: true });
      cleanups.push(() => upstream.stop());
      const image = buildImage({ platforms: AMD64 });
      await upstream.push(image, 'team/app', '1');
      const p = await cachedProxy(upstream, { reconfirmSeconds: 1 });
      await pullImage(p, 'team/app', '1', image);
      const root = p.cache!.store.root;
      for (const res of await Promise.all(byDigest(p, image))) assert.equal(res.status, 200, 'served before the registry deleted it');
      await deleteUpstream(upstream, image);
      // Asked again until the link is older than reconfirmSeconds (1 s): bounded, no timing asserted.
      let answers: number[] = [];
      for (let i = 0; i < 40; i++) {
        answers = (await Promise.all(byDigest(p, image))).map((r) => r.status);
        if (answers.every((status) => status === 404)) break;
        await new Promise((r) => setTimeout(r, 250));
      }
      assert.deepEqual(answers, [404, 404], 'manifest and layer by digest');
      for (const digest of [image.manifests[0]!.digest, image.layers[0]!.digest]) assert.equal(existsSync(linkPath(root, digest)), false, `link to ${digest}`);
      assert.ok((await upstream.requests()).some((r) => r.method === 'HEAD' && r.path === `/v2/team/app/blobs/${image.layers[0]!.digest}` && r.status === 404), 'the registry was asked and said no');
      // What the registry still holds (the config) is still served from the store.
      const config = await rawRequest(p.url, `/v2/corp/team/app/blobs/${image.configs[0]!.digest}`, { headers: asShop(p) });
      assert.equal(sha256(config.body), image.configs[0]!.digest);
    });

    it('is still served by digest when the registry cannot answer after reconfirmSeconds (killed), as a tag is', async () => {
      const upstream = await registry();
      const image = buildImage({ platforms: AMD64 });
      await upstream.push(image, 'team/app', '1');
      const p = await cachedProxy(upstream, { reconfirmSeconds: 1 });
      await pullImage(p, 'team/app', '1', image);
      await upstream.kill();
      await new Promise((r) => setTimeout(r, 1100)); // the links are older than reconfirmSeconds
      const [manifest, layer] = await Promise.all(byDigest(p, image));
      assert.equal(manifest!.status, 200);
      assert.ok(manifest!.body.equals(image.manifests[0]!.data));
      assert.equal(sha256(layer!.body), image.layers[0]!.digest);
      assert.equal(existsSync(linkPath(p.cache!.store.root, image.layers[0]!.digest)), true, 'the link is kept');
    });

    it('`pullbridge purge` forgets a repository at once through the operations port; the registry port does not serve it; bad input is an error naming it', async () => {
      const upstream = await startRegistry({ accessLog: true, deletes: true });
      cleanups.push(() => upstream.stop());
      const image = buildImage({ platforms: AMD64 });
      await upstream.push(image, 'team/app', '1');
      const dir = mkdtempSync(join(tmpdir(), 'pullbridge-purge-'));
      writeFileSync(join(dir, 'broker.key'), 'a-broker-key-of-at-least-16-bytes\n');
      const [port, opsPort] = [await freePort(), await freePort()];
      writeFileSync(join(dir, 'config.yaml'), [`proxy: {host: 127.0.0.1, port: ${port}}`, `broker: {keyFiles: [${join(dir, 'broker.key')}]}`, `cache: {path: ${join(dir, 'cache')}}`, 'registries:', `  - {name: corp, match: [r.example], upstream: "${upstream.url}", auth: {mode: anonymous}}`, ''].join('\n'));
      const proxy = await startCli(['proxy', '--config', join(dir, 'config.yaml'), '--port', String(port), '--host', '127.0.0.1', '--ops-port', String(opsPort), '--probe-interval', '3600'], /operations endpoints listening/);
      cleanups.push(async () => void proxy.child.kill('SIGKILL'));
      const url = `http://127.0.0.1:${port}`;
      const index = await rawRequest(url, '/v2/corp/team/app/manifests/1', { headers: { accept: OCI_INDEX } });
      assert.equal(index.status, 200);
      const pulled = await Promise.all([rawRequest(url, `/v2/corp/team/app/manifests/${image.manifests[0]!.digest}`, { headers: { accept: OCI_MANIFEST } }), rawRequest(url, `/v2/corp/team/app/blobs/${image.layers[0]!.digest}`)]);
      assert.deepEqual(pulled.map((r) => r.status), [200, 200]);
      await deleteUpstream(upstream, image);
      const cached = await rawRequest(url, `/v2/corp/team/app/blobs/${image.layers[0]!.digest}`);
      assert.equal(cached.status, 200, 'within reconfirmSeconds (1 h by default) the store still serves it');

      const seen = (await upstream.requests()).length;
      const onRegistryPort = await rawRequest(url, '/purge?rule=corp&repository=team/app', { method: 'POST' });
      assert.notEqual(onRegistryPort.status, 200, 'the registry port does not purge');
      assert.equal((await rawRequest(url, `/v2/corp/team/app/blobs/${image.layers[0]!.digest}`)).status, 200, 'nothing was purged');
      assert.equal((await upstream.requests()).length, seen, 'and nothing asked upstream');

      const purge = (...args: string[]) => runCli(['purge', '--ops-port', String(opsPort), ...args]);
      const badDigest = purge('--rule', 'corp', '--repository', 'team/app', '--digest', 'sha256:abc');
      assert.equal(badDigest.status, 1);
      assert.match(badDigest.stderr, /^pullbridge purge: digest: invalid digest format "sha256:abc"/);
      const badRule = purge('--rule', 'nope', '--repository', 'team/app');
      assert.equal(badRule.status, 1);
      assert.match(badRule.stderr, /rule "nope" is not in the config/);
      assert.equal(purge('--repository', 'team/app').status, 2, 'no --rule: a usage error');
      const unreachable = runCli(['purge', '--ops-port', String(await freePort()), '--rule', 'corp', '--repository', 'team/app']);
      assert.equal(unreachable.status, 1);
      assert.match(unreachable.stderr, /cannot reach the proxy's operations port/);

      const done = purge('--rule', 'corp', '--repository', 'team/app');
      assert.equal(done.status, 0, done.stderr);
      assert.match(done.stdout, /^rule corp, team\/app: [1-9]\d* link\(s\) and 1 tag record\(s\) removed/);
      assert.equal(existsSync(join(dir, 'cache', 'repositories', 'corp', 'team', 'app', '_links', 'sha256', image.layers[0]!.digest.slice(7))), false);
      const after = await Promise.all([rawRequest(url, `/v2/corp/team/app/manifests/${image.manifests[0]!.digest}`, { headers: { accept: OCI_MANIFEST } }), rawRequest(url, `/v2/corp/team/app/blobs/${image.layers[0]!.digest}`), rawRequest(url, '/v2/corp/team/app/manifests/1', { headers: { accept: OCI_INDEX } })]);
      assert.deepEqual(after.map((r) => r.status), [404, 404, 404], 'manifest, layer and tag: asked upstream, which says no');
    });
  });

  describe('stale tags', () => {
    const STALE = 'pullbridge_cache_requests_total{kind="manifest",result="stale"}';

    it('serve the last known digest with a 110 Warning (and count it) when the registry is down', async () => {
      const upstream = await registry();
      const image = buildImage({ platforms: AMD64 });
      await upstream.push(image, 'team/app', '1');
      const p = await cachedProxy(upstream, { tagTTLSeconds: 0 });
      await pullImage(p, 'team/app', '1', image);
      await upstream.kill();
      const before = await metric(p, STALE);
      const res = await rawRequest(p.url, '/v2/corp/team/app/manifests/1', { headers: { ...asShop(p), accept: OCI_INDEX } });
      assert.equal(res.status, 200);
      assert.ok(res.body.equals(image.index.data));
      assert.match(String(res.headers.warning), /^110 /);
      assert.equal(await metric(p, STALE), before + 1);
      assert.equal(pullRecords(p).at(-1)?.cache, 'stale');
    });

    it('are an error when the registry is down and staleIfErrorSeconds is 0', async () => {
      const upstream = await registry();
      const image = buildImage({ platforms: AMD64 });
      await upstream.push(image, 'team/app', '1');
      const p = await cachedProxy(upstream, { tagTTLSeconds: 0, staleIfErrorSeconds: 0 });
      await pullImage(p, 'team/app', '1', image);
      await upstream.kill();
      const res = await rawRequest(p.url, '/v2/corp/team/app/manifests/1', { headers: { ...asShop(p), accept: OCI_INDEX } });
      assert.ok([502, 503, 504].includes(res.status), `status ${res.status}`);
      assert.equal(res.headers.warning, undefined);
      assert.equal(await metric(p, STALE), 0);
    });
  });

  it('writes nothing for a rule with cache: false, and logs its pulls as bypass', async () => {
    const upstream = await registry();
    const image = buildImage({ platforms: AMD64 });
    await upstream.push(image, 'team/app', '1');
    const p = await cachedProxy(upstream, {}, { cache: false });
    await pullImage(p, 'team/app', '1', image);
    await pullImage(p, 'team/app', '1', image);
    assert.deepEqual(filesUnder(p.cache!.store.root, 'blobs'), []);
    assert.deepEqual(filesUnder(p.cache!.store.root, 'repositories'), [], 'no links, no tag records');
    const records = pullRecords(p);
    assert.equal(records.length, 2 * (1 + image.manifests.length + image.configs.length + image.layers.length));
    assert.deepEqual([...new Set(records.map((r) => r.cache))], ['bypass']);
    assert.equal(await upstream.blobGets(image.layers[0]!.digest), 2, 'each pull from upstream');
  });

  it('serves a store written by one proxy from a new proxy on the same path with the registry gone, and removes leftover fills on open', async () => {
    const upstream = await registry();
    const image = buildImage({ platforms: AMD64 });
    await upstream.push(image, 'team/app', '1');
    const path = mkdtempSync(join(tmpdir(), 'pullbridge-cache-'));
    const first = await cachedProxy(upstream, { path });
    await pullImage(first, 'team/app', '1', image);
    await fillsSettled(first);
    await first.close();
    writeFileSync(join(path, 'tmp', 'ab12cd34-leftover'), 'half a blob a crash left behind');
    await upstream.kill();

    const second = await cachedProxy(upstream, { path });
    assert.deepEqual(filesUnder(path, 'tmp'), [], 'the leftover fill is gone');
    for (const m of image.manifests) {
      const res = await rawRequest(second.url, `/v2/corp/team/app/manifests/${m.digest}`, { headers: { ...asShop(second), accept: OCI_MANIFEST } });
      assert.equal(res.status, 200);
      assert.ok(res.body.equals(m.data));
    }
    for (const b of [...image.configs, ...image.layers]) {
      const res = await rawRequest(second.url, `/v2/corp/team/app/blobs/${b.digest}`, { headers: asShop(second) });
      assert.equal(res.status, 200);
      assert.equal(sha256(res.body), b.digest);
    }
    assert.deepEqual([...new Set(pullRecords(second).map((r) => r.cache))], ['hit']);
  });

  it('relays without storing anything while the disk is below minFreeBytes', async () => {
    const upstream = await registry();
    const image = buildImage({ platforms: AMD64 });
    await upstream.push(image, 'team/app', '1');
    const p = await cachedProxy(upstream, { minFreeBytes: '1Pi' });
    await pullImage(p, 'team/app', '1', image);
    await pullImage(p, 'team/app', '1', image);
    assert.deepEqual(filesUnder(p.cache!.store.root, 'blobs'), []);
    assert.deepEqual([...new Set(pullRecords(p).map((r) => r.cache))], ['bypass']);
    assert.equal(await metric(p, 'pullbridge_cache_fills_enabled'), 0);
    assert.equal(await upstream.blobGets(image.layers[0]!.digest), 2);
  });

  it('reports bytes, entries, hits and misses on /status', async () => {
    const upstream = await registry();
    const image = buildImage({ platforms: AMD64 });
    await upstream.push(image, 'team/app', '1');
    const p = await cachedProxy(upstream);
    await pullImage(p, 'team/app', '1', image);
    await fillsSettled(p);
    await pullImage(p, 'team/app', '1', image);
    const res = await rawRequest(p.url, '/status');
    assert.equal(res.status, 200);
    const status = (JSON.parse(res.body.toString()) as { cache: Record<string, number> }).cache;
    const root = p.cache!.store.root;
    assert.equal(status.bytes, storedBytes(root));
    assert.equal(status.entries, filesUnder(root, 'blobs').length);
    assert.equal(status.entries, image.blobs.size, 'the index, manifests, configs and layers');
    const records = pullRecords(p);
    assert.equal(status.misses, records.filter((r) => r.cache === 'miss').length);
    assert.equal(status.hits, records.filter((r) => r.cache === 'hit').length);
    assert.ok(status.misses! > 0 && status.hits! >= records.length / 2, JSON.stringify(status));
    assert.ok(status.upstreamBytesSaved! >= image.layers.reduce((sum, l) => sum + l.size, 0));
  });
});
