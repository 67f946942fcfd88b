// Protocol edges the proxy passes on as the upstream (docker-registry 2.8) answers them: a manifest
// converted on the fly to signed schema1 keeps the upstream's Docker-Content-Digest, and a 416 keeps
// its Content-Range.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { rawRequest } from './support/http.js';
import { buildImage } from './support/oci.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const SCHEMA1 = 'application/vnd.docker.distribution.manifest.v1+prettyjws';
const sha256 = (data: Buffer) => `sha256:${createHash('sha256').update(data).digest('hex')}`;

describe('protocol edges through the proxy', function () {
  this.timeout(120_000);
  let upstream: RegistryHandle;
  let proxy: ProxyUnderTest;
  /** The same, with a node cache. */
  let cached: ProxyUnderTest;
  let cacheDir: string;
  const image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], history: true });

  before(async () => {
    upstream = await startRegistry({ auth: 'none', schema1: true });
    await upstream.push(image, 'team/app', '1', 'docker');
    proxy = await startProxy({ registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.url }] });
    cacheDir = mkdtempSync(join(tmpdir(), 'pullbridge-cache-'));
    cached = await startProxy({ cache: { path: cacheDir }, registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.url }] });
  });

  after(async () => {
    await proxy?.close();
    await cached?.close();
    await upstream?.stop();
    if (cacheDir) rmSync(cacheDir, { recursive: true, force: true });
  });

  it("answers a manifest converted to signed schema1 with the upstream's Docker-Content-Digest, as HEAD does", async () => {
    const headers = { accept: SCHEMA1, authorization: proxy.authorization('shop') };
    const direct = await rawRequest(upstream.url, '/v2/team/app/manifests/1', { headers: { accept: SCHEMA1 } });
    assert.equal(direct.status, 200);
    assert.equal(direct.headers['content-type'], SCHEMA1);
    const upstreamDigest = String(direct.headers['docker-content-digest']);
    const first = await rawRequest(proxy.url, '/v2/corp/team/app/manifests/1', { headers });
    const second = await rawRequest(proxy.url, '/v2/corp/team/app/manifests/1', { headers });
    const head = await rawRequest(proxy.url, '/v2/corp/team/app/manifests/1', { method: 'HEAD', headers });
    // With a node cache: the tag is resolved for runtimes (a list), this client is answered as the upstream answers it.
    const cachedHeaders = { ...headers, authorization: cached.authorization('shop') };
    const throughCache = await rawRequest(cached.url, '/v2/corp/team/app/manifests/1', { headers: cachedHeaders });
    const againThroughCache = await rawRequest(cached.url, '/v2/corp/team/app/manifests/1', { headers: cachedHeaders });
    for (const answer of [first, second, head, throughCache, againThroughCache]) {
      assert.equal(answer.status, 200, answer.body.toString());
      assert.equal(answer.headers['content-type'], SCHEMA1);
      assert.equal(answer.headers['docker-content-digest'], upstreamDigest);
    }
    // The upstream signs each conversion anew: the bytes differ, their hash is not the digest.
    assert.notEqual(sha256(first.body), upstreamDigest);
    assert.equal(Number(first.headers['content-length']), first.body.length);
  });

  it("passes an upstream 416 on with the upstream's Content-Range", async () => {
    // docker-registry answers 416 with `Content-Range: bytes */<length>` (RFC 9110), but announces
    // the blob's length as Content-Length and sends one line: read directly, the answer is cut short.
    const layer = image.layers[0]!;
    const range = `bytes=${layer.data.length + 10}-`;
    const r = await rawRequest(proxy.url, `/v2/corp/team/app/blobs/${layer.digest}`, { headers: { range, authorization: proxy.authorization('shop') } });
    assert.equal(r.status, 416, r.body.toString());
    assert.equal(r.headers['content-range'], `bytes */${layer.data.length}`);
    assert.match(r.body.toString(), /range asked for is not satisfiable/);
    const throughCache = await rawRequest(cached.url, `/v2/corp/team/app/blobs/${layer.digest}`, { headers: { range, authorization: cached.authorization('shop') } });
    assert.equal(throughCache.status, 416, throughCache.body.toString());
    assert.equal(throughCache.headers['content-range'], `bytes */${layer.data.length}`);
    // A satisfiable range still answers 206 with the part.
    const part = await rawRequest(proxy.url, `/v2/corp/team/app/blobs/${layer.digest}`, { headers: { range: 'bytes=0-9', authorization: proxy.authorization('shop') } });
    assert.equal(part.status, 206);
    assert.deepEqual(part.body, layer.data.subarray(0, 10));
  });
});
