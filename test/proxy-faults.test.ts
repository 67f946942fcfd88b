// Faults a real registry cannot be made to produce on demand, from a scripted upstream on loopback,
// and storage redirects from a real one.
//
// Storage redirects a registry makes in earnest come from docker-registry on its s3 driver over
// versitygw: it answers a blob GET or HEAD with 307 to a URL on the object store presigned for that
// method. The proxy's following them (another origin, no upstream credentials, Range kept, a HEAD
// answered) is tested there, with a relay in front of versitygw that records what the storage was
// sent (versitygw logs no request headers).
//
// Scripted, because docker-registry never answers so: a redirect to a relative Location on the
// registry's own origin, and to storage that refuses HEAD (a URL presigned for GET whatever the
// method asked); the hostile answers (a redirect into the node, to a name that resolves to
// loopback, a redirect for a manifest, a 206 part passed off as a whole blob); a body cut or
// corrupted mid-stream; a slow or silent upstream; 429/5xx; absolute pagination links; a manifest
// HEAD without a digest. Everything else is tested against docker-registry.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import http from 'node:http';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { listen, type RunningServer } from '../src/shell/serve.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { rawRequest } from './support/http.js';
import { startVersitygw, type S3Server } from './support/objectstores.js';
import { buildImage, sha256, type TestImage } from './support/oci.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const BLOB = randomBytes(512 * 1024);
const BLOB_DIGEST = `sha256:${createHash('sha256').update(BLOB).digest('hex')}`;
const MANIFEST = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config: {}, layers: [] }));
const MANIFEST_DIGEST = `sha256:${createHash('sha256').update(MANIFEST).digest('hex')}`;
const UPSTREAM_AUTH = `Basic ${Buffer.from('robot:s3cret').toString('base64')}`;

interface Seen {
  path: string;
  method: string;
  authorization: string | undefined;
  range: string | undefined;
  closedEarly: boolean;
}

/** A scripted registry, a separate "object storage" origin it redirects blob reads to, and a
 * "node-local service" that a hostile redirect points at (it must never be reached). */
async function startScriptedUpstream(): Promise<{ registry: RunningServer; storage: RunningServer; nodeLocal: RunningServer; seen: Seen[]; close(): Promise<void> }> {
  const seen: Seen[] = [];
  const record = (req: http.IncomingMessage, res: http.ServerResponse): Seen => {
    const s: Seen = { path: req.url ?? '', method: req.method ?? '', authorization: req.headers.authorization, range: req.headers.range, closedEarly: false };
    res.on('close', () => {
      if (!res.writableFinished) s.closedEarly = true;
    });
    seen.push(s);
    return s;
  };
  const serveBlob = (req: http.IncomingMessage, res: http.ServerResponse, data: Buffer) => {
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    if (m) {
      const start = Number(m[1]);
      res.writeHead(206, { 'content-type': 'application/octet-stream', 'content-length': data.length - start, 'content-range': `bytes ${start}-${data.length - 1}/${data.length}` });
      res.end(data.subarray(start));
    } else {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': data.length });
      res.end(data);
    }
  };
  const storage = await listen(
    (req, res) => {
      record(req, res);
      // Presigned for GET only, as object stores are.
      if (req.method !== 'GET') return void res.writeHead(403).end();
      serveBlob(req, res, BLOB);
    },
    { host: '127.0.0.1', port: 0 },
  );
  const nodeLocal = await listen(
    (req, res) => {
      record(req, res);
      res.writeHead(200, { 'content-type': 'application/octet-stream' }).end('node-local secret');
    },
    { host: '127.0.0.1', port: 0 },
  );
  const registry = await listen(
    (req, res) => {
      record(req, res);
      if (req.headers.authorization !== UPSTREAM_AUTH) {
        res.writeHead(401, { 'www-authenticate': 'Basic realm="scripted"', 'content-type': 'application/json' }).end('{"errors":[{"code":"UNAUTHORIZED","message":"auth"}]}');
        return;
      }
      const path = req.url ?? '';
      if (path === '/v2/') return void res.writeHead(200).end('{}');
      if (path.endsWith(`/redirect-absolute/blobs/${BLOB_DIGEST}`)) return void res.writeHead(307, { location: `${storage.url}/bucket/${BLOB_DIGEST}?X-Amz-Signature=abc` }).end();
      if (path.endsWith(`/redirect-relative/blobs/${BLOB_DIGEST}`)) return void res.writeHead(302, { location: `/local-storage/${BLOB_DIGEST}` }).end();
      if (path.startsWith('/local-storage/')) return void serveBlob(req, res, BLOB);
      // Hostile answers: redirects into the node, and a part passed off as a whole blob.
      if (path.endsWith(`/to-node/blobs/${BLOB_DIGEST}`)) return void res.writeHead(307, { location: `${nodeLocal.url}/latest/meta-data?blob=${BLOB_DIGEST}` }).end();
      if (path.endsWith(`/to-named-node/blobs/${BLOB_DIGEST}`)) return void res.writeHead(307, { location: `http://storage.internal.test:${nodeLocal.port}/b/${BLOB_DIGEST}` }).end();
      if (path.endsWith('/redirected/manifests/1')) return void res.writeHead(307, { location: `${storage.url}/bucket/manifest` }).end();
      if (path.endsWith(`/partial/blobs/${BLOB_DIGEST}`)) {
        res.writeHead(206, { 'content-type': 'application/octet-stream', 'content-length': 1000, 'content-range': `bytes 0-999/${BLOB.length}` });
        return void res.end(BLOB.subarray(0, 1000));
      }
      if (path.endsWith(`/truncated/blobs/${BLOB_DIGEST}`)) {
        res.writeHead(200, { 'content-length': BLOB.length });
        res.write(BLOB.subarray(0, BLOB.length / 2), () => res.destroy());
        return;
      }
      if (path.endsWith(`/corrupt/blobs/${BLOB_DIGEST}`)) {
        const bad = Buffer.from(BLOB);
        bad[bad.length - 10] = (bad[bad.length - 10] ?? 0) ^ 0xff;
        return void serveBlob(req, res, bad);
      }
      if (path.endsWith(`/chunked-corrupt/blobs/${BLOB_DIGEST}`)) {
        res.writeHead(200, { 'content-type': 'application/octet-stream' });
        res.write(BLOB.subarray(0, 1000));
        res.end(randomBytes(1000));
        return;
      }
      if (path.endsWith(`/slow/blobs/${BLOB_DIGEST}`)) {
        res.writeHead(200, { 'content-length': BLOB.length * 100 });
        const timer = setInterval(() => res.write(BLOB.subarray(0, 16 * 1024)), 20);
        res.on('close', () => clearInterval(timer));
        return;
      }
      if (path.endsWith('/silent/manifests/1')) return; // never answers
      if (path.endsWith('/ratelimited/manifests/1')) return void res.writeHead(429, { 'retry-after': '7', 'content-type': 'application/json' }).end('{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}');
      if (path.endsWith('/broken/manifests/1')) return void res.writeHead(500, { 'content-type': 'text/plain' }).end('stack trace');
      if (path.endsWith('/nodigest/manifests/1')) {
        if (req.method === 'HEAD') return void res.writeHead(200, { 'content-type': 'application/vnd.oci.image.manifest.v1+json' }).end();
        res.writeHead(200, { 'content-type': 'application/vnd.oci.image.manifest.v1+json' });
        res.write(MANIFEST.subarray(0, 10));
        return void res.end(MANIFEST.subarray(10));
      }
      if (path.endsWith(`/nodigest/manifests/${MANIFEST_DIGEST}`)) return void res.writeHead(200, { 'content-type': 'application/vnd.oci.image.manifest.v1+json' }).end(MANIFEST);
      if (path.endsWith(`/liar/manifests/${MANIFEST_DIGEST}`)) return void res.writeHead(200, { 'content-type': 'application/vnd.oci.image.manifest.v1+json' }).end(Buffer.concat([MANIFEST, Buffer.from(' ')]));
      if (path.startsWith('/v2/team/app/tags/list')) {
        res.writeHead(200, { 'content-type': 'application/json', link: `<${registry.url}/v2/team/app/tags/list?last=b&n=2>; rel="next"` });
        return void res.end(JSON.stringify({ name: 'team/app', tags: ['a', 'b'] }));
      }
      res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"NAME_UNKNOWN","message":"unknown"}]}');
    },
    { host: '127.0.0.1', port: 0 },
  );
  return {
    registry,
    storage,
    nodeLocal,
    seen,
    async close() {
      await registry.close(100);
      await storage.close(100);
      await nodeLocal.close(100);
    },
  };
}

/** GET through the proxy as a puller does, reporting whether the body arrived complete. */
function pull(url: string, path: string, headers: Record<string, string>): Promise<{ status: number; received: Buffer; complete: boolean; headers: http.IncomingHttpHeaders }> {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const req = http.get({ host: u.hostname, port: u.port, path, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, received: Buffer.concat(chunks), complete: res.complete, headers: res.headers }));
      res.on('error', () => resolve({ status: res.statusCode ?? 0, received: Buffer.concat(chunks), complete: false, headers: res.headers }));
      res.on('aborted', () => undefined);
    });
    // A connection cut before the headers is as good as one cut mid-body: nothing looks complete.
    req.on('error', (error: NodeJS.ErrnoException) => (error.code === 'ECONNRESET' ? resolve({ status: 0, received: Buffer.alloc(0), complete: false, headers: {} }) : reject(error)));
  });
}

/** What the object store was sent, as a relay in front of it saw it. */
interface StorageRequest {
  readonly method: string;
  readonly path: string;
  readonly authorization: string | undefined;
  readonly range: string | undefined;
  status: number;
}

describe('storage redirects from docker-registry on S3 (versitygw)', function () {
  this.timeout(60_000);
  let store: S3Server;
  let relay: RunningServer;
  let registry: RegistryHandle;
  let proxy: ProxyUnderTest;
  let image: TestImage;
  let auth: Record<string, string>;
  /** What the storage was sent since the test began. */
  const storage: StorageRequest[] = [];
  const layer = () => {
    const blob = image.layers[0];
    assert.ok(blob);
    return blob;
  };
  const blobPath = (digest: string) => `/v2/corp/team/app/blobs/${digest}`;
  /** How many requests the registry had answered when the test began. */
  let answeredBefore = 0;
  /** The registry's answers to reads of a blob since the test began, from its access log (settled),
   * but for its 401 challenges of the proxy's first, anonymous, ask. */
  const registryAnswers = async (digest: string) =>
    (await registry.requests())
      .slice(answeredBefore)
      .filter((r) => r.path === `/v2/team/app/blobs/${digest}` && r.status !== 401)
      .map((r) => `${r.method} ${r.status}`);
  const storageReads = () => storage.filter((s) => s.path.includes('/blobs/sha256/'));

  before(async () => {
    store = await startVersitygw('registry-storage');
    // Passes every request on unchanged (Host too: the presigned URLs are signed for the relay's).
    relay = await listen(
      (req, res) => {
        const seen: StorageRequest = { method: req.method ?? '', path: req.url ?? '', authorization: req.headers.authorization, range: req.headers.range, status: 0 };
        storage.push(seen);
        const target = new URL(store.endpoint);
        const onward = http.request({ host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers }, (up) => {
          seen.status = up.statusCode ?? 0;
          res.writeHead(up.statusCode ?? 502, up.headers);
          up.pipe(res);
        });
        onward.on('error', () => res.destroy());
        req.pipe(onward);
      },
      { host: '127.0.0.1', port: 0 },
    );
    registry = await startRegistry({ auth: 'basic', accessLog: true, storage: { s3: store, endpoint: relay.url } });
    image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [512 * 1024, 4096] });
    // A push goes through the registry, which writes to the bucket itself.
    await registry.push(image, 'team/app', '1');
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-s3-redirects-'));
    writeFileSync(join(dir, 'password'), `${DEFAULT_USERS.puller}\n`);
    proxy = await startProxy({
      registries: [
        // The object store listens on loopback, which a rule must allow explicitly.
        { name: 'corp', match: ['r.example'], upstream: registry.url, credentials: { username: 'puller', passwordFile: join(dir, 'password') }, redirects: { allow: ['127.0.0.1'] } },
      ],
    });
    auth = { authorization: proxy.authorization('shop') };
  });
  after(async () => {
    await proxy?.close();
    await registry?.stop();
    await relay?.close(100);
    await store?.stop();
  });
  beforeEach(async () => {
    answeredBefore = (await registry.requests()).length;
    storage.length = 0;
  });

  it('follows the registry\'s 307 to the object store itself, without the upstream\'s credentials: every blob arrives whole and by its digest', async () => {
    for (const blob of [...image.configs, ...image.layers]) {
      const res = await pull(proxy.url, blobPath(blob.digest), auth);
      assert.equal(res.status, 200);
      assert.ok(res.complete);
      assert.equal(sha256(res.received), blob.digest);
      assert.ok(res.received.equals(blob.data));
      assert.deepEqual(await registryAnswers(blob.digest), ['GET 307'], 'the registry redirected the read');
    }
    const reads = storageReads();
    assert.equal(reads.length, image.configs.length + image.layers.length, JSON.stringify(reads));
    for (const read of reads) {
      assert.equal(read.method, 'GET');
      assert.match(read.path, /^\/registry-storage\/registry\/docker\/registry\/v2\/blobs\/sha256\/.*\/data\?.*X-Amz-Signature=/, 'the presigned URL, as the registry gave it');
      assert.equal(read.authorization, undefined, 'the upstream\'s credentials never go to the storage');
      assert.equal(read.status, 200);
    }
  });

  it('passes Range on to the object store and answers 206 with the part', async () => {
    const res = await pull(proxy.url, blobPath(layer().digest), { ...auth, range: 'bytes=1000-' });
    assert.equal(res.status, 206);
    assert.equal(res.headers['content-range'], `bytes 1000-${layer().data.length - 1}/${layer().data.length}`);
    assert.ok(res.received.equals(layer().data.subarray(1000)));
    assert.deepEqual(await registryAnswers(layer().digest), ['GET 307']);
    assert.deepEqual(storageReads().map((s) => [s.method, s.range, s.status]), [['GET', 'bytes=1000-', 206]]);
  });

  it('answers a HEAD on a redirected blob with its length and digest, from the URL the registry presigned for HEAD', async () => {
    const res = await rawRequest(proxy.url, blobPath(layer().digest), { method: 'HEAD', headers: auth });
    assert.equal(res.status, 200);
    assert.equal(res.headers['content-length'], String(layer().data.length));
    assert.equal(res.headers['docker-content-digest'], layer().digest);
    assert.deepEqual(await registryAnswers(layer().digest), ['HEAD 307'], 'the registry redirected the HEAD');
    assert.deepEqual(storageReads().map((s) => [s.method, s.status]), [['HEAD', 200]], 'one HEAD, and no body fetched');
  });
});

describe('proxy under upstream faults (scripted upstream)', function () {
  this.timeout(60_000);
  let upstream: Awaited<ReturnType<typeof startScriptedUpstream>>;
  let proxy: ProxyUnderTest;
  let auth: Record<string, string>;

  before(async () => {
    upstream = await startScriptedUpstream();
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-faults-'));
    writeFileSync(join(dir, 'password'), 's3cret\n');
    const credentials = { username: 'robot', passwordFile: join(dir, 'password') };
    // The scripted storage listens on loopback, which a rule must allow explicitly ("strict" does not).
    const storage = { allow: ['127.0.0.1'] };
    proxy = await startProxy(
      {
        registries: [
          { name: 'corp', match: ['r.example'], upstream: upstream.registry.url, credentials, redirects: storage },
          { name: 'trusting', match: ['t.example'], upstream: upstream.registry.url, credentials, verifyBlobDigests: false, redirects: storage },
          { name: 'strict', match: ['s.example'], upstream: upstream.registry.url, credentials },
        ],
      },
      // A name for the "storage" host that resolves to loopback, as a hostile DNS answer would.
      { lookup: (hostname, _options, callback) => (hostname === 'storage.internal.test' ? callback(null, [{ address: '127.0.0.1', family: 4 }]) : callback(Object.assign(new Error(`no such host ${hostname}`), { code: 'ENOTFOUND' }), [])) },
    );
    auth = { authorization: proxy.authorization('shop') };
  });
  after(async () => {
    await proxy?.close();
    await upstream?.close();
  });
  beforeEach(() => {
    upstream.seen.length = 0;
  });

  describe('storage redirects a real registry does not make', () => {
    // Scripted: docker-registry's redirects are absolute URLs on the object store.
    it('resolves a relative Location on the same origin, keeping the upstream credentials', async () => {
      const res = await pull(proxy.url, `/v2/corp/redirect-relative/blobs/${BLOB_DIGEST}`, auth);
      assert.equal(res.status, 200);
      assert.ok(res.received.equals(BLOB));
      assert.equal(upstream.seen.find((s) => s.path.startsWith('/local-storage/'))?.authorization, UPSTREAM_AUTH);
    });

    // Scripted: docker-registry presigns a HEAD's redirect for HEAD; some registries presign for GET whatever was asked.
    it('asks a storage that refuses a HEAD once more with a GET (a URL presigned for GET only)', async () => {
      const res = await rawRequest(proxy.url, `/v2/corp/redirect-absolute/blobs/${BLOB_DIGEST}`, { method: 'HEAD', headers: auth });
      assert.equal(res.status, 200);
      assert.equal(res.headers['content-length'], String(BLOB.length));
      assert.equal(res.headers['docker-content-digest'], BLOB_DIGEST);
      assert.equal(res.body.length, 0);
      assert.deepEqual(upstream.seen.filter((s) => s.path.startsWith('/bucket/')).map((s) => s.method), ['HEAD', 'GET']);
    });
  });

  describe('hostile upstream answers', () => {
    it('refuses a blob redirect to a loopback address the rule does not allow, and never contacts it', async () => {
      const res = await rawRequest(proxy.url, `/v2/strict/to-node/blobs/${BLOB_DIGEST}`, { headers: auth });
      assert.equal(res.status, 502);
      assert.match(res.body.toString(), /redirect to 127\.0\.0\.1 refused: 127\.0\.0\.1 is a loopback/);
      assert.deepEqual(upstream.seen.filter((s) => s.path.startsWith('/latest/')), [], 'the node-local service saw nothing');
      assert.ok(!res.body.toString().includes('node-local secret'));
    });

    it('checks the address actually connected: a storage name that resolves to loopback is refused too', async () => {
      const res = await rawRequest(proxy.url, `/v2/strict/to-named-node/blobs/${BLOB_DIGEST}`, { headers: auth });
      assert.equal(res.status, 502);
      assert.match(res.body.toString(), /connection to storage\.internal\.test refused: 127\.0\.0\.1 is a loopback/);
      assert.deepEqual(upstream.seen.filter((s) => s.path.startsWith('/b/')), [], 'no request was sent on that connection');
    });

    it('never follows a redirect for a manifest', async () => {
      const res = await rawRequest(proxy.url, '/v2/corp/redirected/manifests/1', { headers: auth });
      assert.equal(res.status, 502);
      assert.match(res.body.toString(), /only blob reads may be redirected/);
      assert.deepEqual(upstream.seen.filter((s) => s.path === '/bucket/manifest'), []);
    });

    it('answers 502 when the upstream passes off a 206 part for a whole-blob request; passes a 206 when Range was asked', async () => {
      const whole = await pull(proxy.url, `/v2/corp/partial/blobs/${BLOB_DIGEST}`, auth);
      assert.equal(whole.status, 502);
      assert.ok(!whole.received.includes(BLOB.subarray(0, 64)), 'none of the part is served');
      const ranged = await pull(proxy.url, `/v2/corp/partial/blobs/${BLOB_DIGEST}`, { ...auth, range: 'bytes=0-999' });
      assert.equal(ranged.status, 206);
      assert.ok(ranged.received.equals(BLOB.subarray(0, 1000)));
    });
  });

  describe('bodies that must never look complete', () => {
    it('cuts the client connection when the upstream dies mid-blob', async () => {
      const res = await pull(proxy.url, `/v2/corp/truncated/blobs/${BLOB_DIGEST}`, auth);
      assert.equal(res.complete, false);
      assert.ok(res.received.length < BLOB.length);
      assert.equal((await rawRequest(proxy.url, '/healthz')).status, 200);
    });

    it('cuts the connection before the last byte when a blob does not match its digest', async () => {
      const res = await pull(proxy.url, `/v2/corp/corrupt/blobs/${BLOB_DIGEST}`, auth);
      assert.equal(res.status, 200);
      assert.equal(res.complete, false);
      assert.ok(res.received.length < BLOB.length, 'the last chunk is held back until the digest is checked');
      const record = proxy.logs.records.find((r) => r.repository === 'corrupt');
      assert.match(String(record?.error), /does not match/);
      assert.equal(record?.status, 0);
    });

    it('serves a corrupted blob as it is only where a rule turned verification off (the runtime then rejects it)', async () => {
      const res = await pull(proxy.url, `/v2/trusting/corrupt/blobs/${BLOB_DIGEST}`, auth);
      assert.equal(res.complete, true);
      assert.equal(res.received.length, BLOB.length);
      assert.ok(!res.received.equals(BLOB));
      // Truncation is still never complete: Content-Length is kept and the connection is cut.
      const cut = await pull(proxy.url, `/v2/trusting/truncated/blobs/${BLOB_DIGEST}`, auth);
      assert.equal(cut.complete, false);
    });

    it('does the same for a chunked upstream body', async () => {
      const res = await pull(proxy.url, `/v2/corp/chunked-corrupt/blobs/${BLOB_DIGEST}`, auth);
      assert.equal(res.complete, false);
    });

    it('refuses a manifest whose bytes do not match the requested digest', async () => {
      const res = await rawRequest(proxy.url, `/v2/corp/liar/manifests/${MANIFEST_DIGEST}`, { headers: auth });
      assert.equal(res.status, 502);
      assert.match(res.body.toString(), /MANIFEST_INVALID/);
    });
  });

  it('computes length and digest for a manifest HEAD the upstream answers without them', async () => {
    const res = await rawRequest(proxy.url, '/v2/corp/nodigest/manifests/1', { method: 'HEAD', headers: auth });
    assert.equal(res.status, 200);
    assert.equal(res.headers['content-length'], String(MANIFEST.length));
    assert.equal(res.headers['docker-content-digest'], MANIFEST_DIGEST);
  });

  it('aborts the upstream request when the client goes away mid-stream', async () => {
    const u = new URL(proxy.url);
    await new Promise<void>((resolve, reject) => {
      const req = http.get({ host: u.hostname, port: u.port, path: `/v2/corp/slow/blobs/${BLOB_DIGEST}`, headers: auth }, (res) => {
        let got = 0;
        res.on('data', (c: Buffer) => {
          got += c.length;
          if (got > 64 * 1024) {
            req.destroy();
            resolve();
          }
        });
      });
      req.on('error', () => undefined);
      setTimeout(() => reject(new Error('no data from the slow upstream')), 10_000).unref();
    });
    const deadline = Date.now() + 5000;
    while (!upstream.seen.find((s) => s.path.includes('/slow/'))?.closedEarly && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    assert.equal(upstream.seen.find((s) => s.path.includes('/slow/'))?.closedEarly, true, 'the upstream stream was closed');
    const gauge = (await proxy.metrics.metrics()).match(/pullbridge_proxy_inflight_streams (\d+)/)?.[1];
    assert.equal(gauge, '0');
  });

  it('passes 429 with Retry-After and upstream 5xx on as registry errors', async () => {
    const limited = await rawRequest(proxy.url, '/v2/corp/ratelimited/manifests/1', { headers: auth });
    assert.equal(limited.status, 429);
    assert.equal(limited.headers['retry-after'], '7');
    assert.match(limited.body.toString(), /TOOMANYREQUESTS/);
    const broken = await rawRequest(proxy.url, '/v2/corp/broken/manifests/1', { headers: auth });
    assert.equal(broken.status, 500);
    assert.doesNotMatch(broken.body.toString(), /stack trace/);
    assert.match(broken.body.toString(), /"errors"/);
  });

  it('answers 504 when the upstream sends no headers within the timeout, and stays healthy', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-timeout-'));
    writeFileSync(join(dir, 'password'), 's3cret');
    const impatient = await startProxy(
      { registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.registry.url, credentials: { username: 'robot', passwordFile: join(dir, 'password') } }] },
      { timeouts: { connectMs: 1000, headersMs: 300, bodyIdleMs: 300 } },
    );
    try {
      const res = await rawRequest(impatient.url, '/v2/corp/silent/manifests/1', { headers: { authorization: impatient.authorization('shop') } });
      assert.equal(res.status, 504);
      assert.match(res.body.toString(), /timed out/);
      assert.equal((await rawRequest(impatient.url, '/healthz')).status, 200);
    } finally {
      await impatient.close();
    }
  });

  it('rewrites an absolute upstream pagination Link to the proxy path', async () => {
    const res = await rawRequest(proxy.url, '/v2/corp/team/app/tags/list?n=2', { headers: auth });
    assert.equal(res.status, 200);
    assert.deepEqual(JSON.parse(res.body.toString()), { name: 'corp/team/app', tags: ['a', 'b'] });
    assert.equal(res.headers.link, '</v2/corp/team/app/tags/list?last=b&n=2>; rel="next"');
    assert.ok(upstream.seen.some((s) => s.path === '/v2/team/app/tags/list?n=2'));
  });
});
