// The node cache with real parts: containerd pulls through the proxy from docker-registry, the
// registry is killed, and a fresh containerd store pulls the same image by tag from the cache;
// concurrent pulls of one uncached blob make one upstream transfer (counted in the registry's
// access log).

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startContainerd, type Containerd } from './support/containerd.js';
import { buildImage, sha256 } from './support/oci.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

/** GETs a blob through the proxy; resolves with the sha256 of the body and its length (or the error). */
function pullBlob(p: ProxyUnderTest, path: string, authorization: string): Promise<{ status: number; digest: string; bytes: number; complete: boolean }> {
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
  async function cachedProxy(upstream: RegistryHandle, extra: Record<string, unknown> = {}): Promise<ProxyUnderTest> {
    const p = await startProxy({ cache: { path: mkdtempSync(join(tmpdir(), 'pullbridge-cache-')), ...extra }, registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.url }] });
    cleanups.push(() => p.close());
    return p;
  }

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
      await containerd.clear();
      await containerd.fetch(`${p.host}/corp/team/app:1.0`, { user: p.credential('shop'), allPlatforms: true });
      const have = await containerd.digests();
      for (const [digest, blob] of image.blobs) {
        assert.ok(have.has(digest), `containerd lacks ${digest}`);
        const bytes = await containerd.content(digest);
        assert.equal(sha256(bytes), digest);
        assert.ok(bytes.equals(blob.data));
      }
      const after = p.logs.records.filter((r) => r.access === 'pull' && r.status === 200).slice(-image.blobs.size);
      assert.ok(after.some((r) => r.cache === 'stale' && r.kind === 'manifest'), 'the tag was served stale');
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
    assert.equal(upstream.blobGets(layer.digest), 1, 'the registry served the blob once');
    const again = await pullBlob(p, `/v2/corp/team/big/blobs/${layer.digest}`, p.authorization('shop'));
    assert.equal(again.digest, layer.digest);
    assert.equal(upstream.blobGets(layer.digest), 1, 'a later pull is a hit');
  });
});
