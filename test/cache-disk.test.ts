// The node cache's disk bounds on a real small filesystem: a size-limited tmpfs mounted for each
// test (the test runs as root; unmounted after each test) holds `cache.path`, and what is under
// tmp/ and blobs/ and the free space are sampled while fills run. Concurrent fills from
// docker-registry (each reserves its Content-Length), a chunked fill that outgrows the limits (it
// turns into a relay: its clients still get every byte, verified), and metadata (tag records and
// links) on a filesystem with few inodes.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, rmdirSync, rmSync, statfsSync, statSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run } from './support/procs.js';
import { slowUpstream } from './support/http.js';
import { rawRequest } from './support/http.js';
import { buildImage } from './support/oci.js';
import { createMetricsRegistry } from '../src/metrics.js';
import { NodeCache } from '../src/cache/nodecache.js';
import { memoryLogger } from './support/logs.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const MiB = 1024 * 1024;

interface Pulled {
  status: number;
  digest: string;
  bytes: number;
  complete: boolean;
}

/** GETs a blob through the proxy; resolves with the sha256 of the body and its length. */
function pullBlob(p: ProxyUnderTest, path: string): Promise<Pulled> {
  return new Promise((resolve, reject) => {
    const req = http.get(`${p.url}${path}`, { headers: { authorization: p.authorization('shop') }, agent: false }, (res) => {
      const hash = createHash('sha256');
      let bytes = 0;
      res.on('data', (chunk: Buffer) => {
        hash.update(chunk);
        bytes += chunk.length;
      });
      const done = (complete: boolean) => resolve({ status: res.statusCode ?? 0, digest: `sha256:${hash.digest('hex')}`, bytes, complete });
      res.on('end', () => done(res.complete));
      res.on('error', () => done(false));
    });
    req.on('error', reject);
  });
}

/** Bytes in files under `dir` (recursively; a directory gone meanwhile counts 0). */
function bytesUnder(dir: string): number {
  let total = 0;
  let entries;
  try {
    entries = readdirSync(dir, { recursive: true, withFileTypes: true });
  } catch {
    return 0;
  }
  for (const e of entries) {
    if (!e.isFile()) continue;
    try {
      total += statSync(join(e.parentPath, e.name)).size;
    } catch {
      // renamed or removed between the listing and the stat
    }
  }
  return total;
}

/** Samples, until stopped, the most that tmp/ + blobs/ held and the least free space (bytes, as an unprivileged user sees it). */
function sampleDisk(root: string): { stop(): { maxStored: number; minFree: number; samples: number } } {
  let maxStored = 0;
  let minFree = Number.MAX_SAFE_INTEGER;
  let samples = 0;
  const sample = () => {
    maxStored = Math.max(maxStored, bytesUnder(join(root, 'tmp')) + bytesUnder(join(root, 'blobs')));
    const fs = statfsSync(root);
    minFree = Math.min(minFree, fs.bavail * fs.bsize);
    samples++;
  };
  const timer = setInterval(sample, 5);
  sample();
  return {
    stop() {
      clearInterval(timer);
      sample();
      return { maxStored, minFree, samples };
    },
  };
}

/** Polls `condition` every `everyMs`, at most `tries` times. */
async function until(condition: () => boolean, everyMs = 20, tries = 15_000): Promise<void> {
  for (let i = 0; i < tries && !condition(); i++) await new Promise((r) => setTimeout(r, everyMs));
  assert.ok(condition(), 'condition never held');
}

/** No fill in flight (their outcome, stored or discarded, is then on disk). */
const fillsSettled = (p: ProxyUnderTest) => until(() => p.cache!.flights.size === 0 && p.cache!.status().fillsInFlight === 0);

describe('the node cache on a small disk', function () {
  this.timeout(300_000);
  const cleanups: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  /** A tmpfs of `options` (`size=…`, `nr_inodes=…`) at a new directory, unmounted and removed after the test. */
  function smallDisk(options: string): string {
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-disk-'));
    run('mount', ['-t', 'tmpfs', '-o', options, 'tmpfs', dir]);
    cleanups.push(async () => {
      run('umount', [dir]);
      rmdirSync(dir);
    });
    return dir;
  }
  async function proxyOn(path: string, cache: Record<string, unknown>, upstream: string): Promise<ProxyUnderTest> {
    const p = await startProxy({ cache: { path, ...cache }, registries: [{ name: 'corp', match: ['r.example'], upstream }] });
    cleanups.push(() => p.close().catch(() => undefined));
    return p;
  }

  describe('fills in flight', () => {
    let upstream: RegistryHandle;
    const image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [45 * MiB, 45 * MiB, 45 * MiB, 45 * MiB] });
    before(async () => {
      upstream = await startRegistry({ accessLog: true });
      await upstream.push(image, 'team/big', '1');
    });
    after(async () => upstream?.stop());

    it('keep tmp/ + blobs/ within maxBytes and the disk above minFreeBytes, four concurrent 45 MiB fills on a 200 MiB disk', async () => {
      const root = smallDisk('size=200m');
      const p = await proxyOn(root, { maxBytes: '50Mi', minFreeBytes: '100Mi' }, upstream.url);
      const sampler = sampleDisk(root);
      const pulls = await Promise.all(image.layers.map((layer) => pullBlob(p, `/v2/corp/team/big/blobs/${layer.digest}`)));
      await fillsSettled(p);
      const { maxStored, minFree, samples } = sampler.stop();
      image.layers.forEach((layer, i) => {
        assert.equal(pulls[i]?.status, 200);
        assert.equal(pulls[i]?.digest, layer.digest, `layer ${i}: every byte, the right ones`);
      });
      assert.ok(samples > 10, `${samples} samples`);
      assert.ok(maxStored <= 50 * MiB, `tmp/ + blobs/ held ${(maxStored / MiB).toFixed(1)} MiB, over maxBytes 50 MiB`);
      assert.ok(minFree >= 100 * MiB, `free space fell to ${(minFree / MiB).toFixed(1)} MiB, under minFreeBytes 100 MiB`);
      assert.ok(p.cache!.status().entries as number >= 1, 'one layer was stored');
    });
  });

  it('bounds a chunked fill (no Content-Length) the same way: it turns into a relay, and its clients still get every byte', async () => {
    // docker-registry always sends Content-Length: only a scripted upstream answers a blob chunked.
    const part = randomBytes(MiB);
    const blob = Buffer.concat(Array.from({ length: 120 }, () => part));
    const digest = `sha256:${createHash('sha256').update(blob).digest('hex')}`;
    const chunked = await slowUpstream(blob, { chunkBytes: MiB, intervalMs: 1, announceLength: false, contentType: 'application/octet-stream' });
    cleanups.push(() => chunked.close(0));
    const root = smallDisk('size=200m');
    const p = await proxyOn(root, { maxBytes: '50Mi', minFreeBytes: '100Mi' }, chunked.url);
    const sampler = sampleDisk(root);
    const path = `/v2/corp/team/chunked/blobs/${digest}`;
    const first = pullBlob(p, path);
    await until(() => p.cache!.flights.size > 0, 1);
    const pulls = await Promise.all([first, pullBlob(p, path)]);
    await fillsSettled(p);
    const { maxStored, minFree } = sampler.stop();
    for (const pull of pulls) {
      assert.equal(pull.status, 200);
      assert.equal(pull.bytes, blob.length);
      assert.equal(pull.digest, digest, 'every byte, the right ones');
      assert.equal(pull.complete, true);
    }
    assert.ok(maxStored <= 50 * MiB, `tmp/ + blobs/ held ${(maxStored / MiB).toFixed(1)} MiB, over maxBytes 50 MiB`);
    assert.ok(minFree >= 100 * MiB, `free space fell to ${(minFree / MiB).toFixed(1)} MiB, under minFreeBytes 100 MiB`);
    assert.equal(bytesUnder(join(root, 'tmp')) + bytesUnder(join(root, 'blobs')), 0, 'nothing kept of the relayed blob');
  });

  describe('metadata', () => {
    const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
    let upstream: RegistryHandle;
    const image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [1024] });
    const TAGS = 1000;
    before(async () => {
      upstream = await startRegistry();
      await upstream.push(image, 'team/app', 't0');
      // The same index under many tag names, as a registry with many releases has.
      for (let i = 1; i < TAGS; i++) {
        const res = await fetch(`${upstream.url}/v2/team/app/manifests/t${i}`, { method: 'PUT', headers: { 'content-type': OCI_INDEX }, body: new Uint8Array(image.index.data) });
        assert.equal(res.status, 201, await res.text());
      }
    });
    after(async () => upstream?.stop());

    it('stops writing tag records and filling above the inode floor (cache.minFreeInodes, 10% by default): no pull fails for want of inodes, and /status says so', async () => {
      const root = smallDisk('size=64m,nr_inodes=1000');
      const p = await proxyOn(root, { maxBytes: '32Mi', minFreeBytes: 0 }, upstream.url);
      let minFreeInodes = Number.MAX_SAFE_INTEGER;
      const failed: string[] = [];
      for (let i = 0; i < TAGS; i++) {
        const res = await rawRequest(p.url, `/v2/corp/team/app/manifests/t${i}`, { headers: { authorization: p.authorization('shop'), accept: OCI_INDEX } });
        if (res.status !== 200 || !res.body.equals(image.index.data)) failed.push(`t${i}: ${res.status} ${res.body.toString().slice(0, 200)}`);
        minFreeInodes = Math.min(minFreeInodes, statfsSync(root).ffree);
      }
      assert.deepEqual(failed.slice(0, 5), [], `${failed.length} of ${TAGS} tags failed`);
      assert.ok(minFreeInodes >= 100, `free inodes fell to ${minFreeInodes}, under the floor of 100 (10% of 1000)`);
      const status = (JSON.parse((await rawRequest(p.url, '/status')).body.toString()) as { cache: Record<string, unknown> }).cache;
      const onDisk = readdirSync(join(root, 'repositories'), { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).length;
      assert.equal(status.metadataEntries, onDisk, 'tag records and links on /status, as on the disk');
      assert.ok(onDisk < TAGS, `${onDisk} tag records and links: capped by the inode floor`);
      // At the floor the cache evicted the least recently used blob, the index, with the tag
      // records naming it (had nothing been evictable, it would have stopped writing them).
      assert.ok((status.evictions as number) >= 1, JSON.stringify(status));
      assert.equal(typeof status.metadataWritable, 'boolean');
      assert.ok((status.freeInodes as number) >= 100, `freeInodes on /status: ${String(status.freeInodes)}`);
    });

    it('with nothing left to evict, stops writing tag records at the inode floor and stops filling: /status and the metric say so', async () => {
      const root = smallDisk('size=16m,nr_inodes=300');
      const settings = { path: root, maxBytes: 2 ** 30, minFreeBytes: 0, minFreeInodes: 50, tagTTLSeconds: 30, staleIfErrorSeconds: 0, credentialTTLSeconds: 0, reconfirmSeconds: 3600 };
      const metrics = createMetricsRegistry(false);
      const logs = memoryLogger();
      const cache = await NodeCache.open(settings, metrics, logs.logger);
      cleanups.push(() => cache.close());
      const record = { digest: image.index.digest, mediaType: OCI_INDEX, size: image.index.size, confirmedAt: Date.now() };
      // Tag records naming a manifest this node never stored (relayed): no blob to evict with them.
      for (let i = 0; i < 400; i++) await cache.store.writeTag('corp', 'team/app', `t${i}`, record);
      assert.ok(statfsSync(root).ffree >= 50, `free inodes: ${statfsSync(root).ffree}`);
      const status = cache.status();
      const onDisk = readdirSync(join(root, 'repositories'), { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).length;
      assert.equal(status.metadataEntries, onDisk);
      assert.ok(onDisk < 400 && onDisk > 150, `${onDisk} tag records`);
      assert.equal(status.metadataWritable, false);
      assert.equal(status.fillsEnabled, false);
      assert.equal(await cache.mayFill(1), false, 'no new blob either');
      assert.ok(logs.records.some((r) => r.msg?.toString().includes('below cache.minFreeInodes')), 'said once in the log');
      assert.match(await metrics.metrics(), /^pullbridge_cache_fills_enabled 0$/m);
    });

    it('lets tag records naming content never stored take at most half of maxBytes, evicting no blob for them', async () => {
      const root = mkdtempSync(join(tmpdir(), 'pullbridge-metadata-cap-'));
      cleanups.push(async () => rmSync(root, { recursive: true, force: true }));
      const settings = { path: root, maxBytes: 256 * 1024, minFreeBytes: 0, minFreeInodes: 0, tagTTLSeconds: 30, staleIfErrorSeconds: 0, credentialTTLSeconds: 0, reconfirmSeconds: 3600 };
      const logs = memoryLogger();
      const cache = await NodeCache.open(settings, createMetricsRegistry(false), logs.logger);
      cleanups.push(() => cache.close());
      // One blob stored (64 KiB), linked.
      const blob = randomBytes(64 * 1024);
      const blobDigest = `sha256:${createHash('sha256').update(blob).digest('hex')}`;
      const fill = await cache.store.startFill(blobDigest);
      await fill.append(blob);
      assert.equal((await fill.finish()).stored, true);
      await cache.store.link('corp', 'team/app', blobDigest);
      // A client asks for many tags the upstream names (a hostile upstream can name any): records of
      // a manifest never stored.
      const record = { digest: image.index.digest, mediaType: OCI_INDEX, size: image.index.size, confirmedAt: Date.now() };
      for (let i = 0; i < 200; i++) await cache.store.writeTag('corp', 'team/app', `t${i}`, record);
      assert.ok(cache.store.metadataEntries() * 4096 <= settings.maxBytes / 2, `${cache.store.metadataEntries()} links and tag records`);
      assert.ok(cache.store.has(blobDigest), 'the stored blob was not evicted for them');
      assert.ok(logs.records.some((r) => String(r.msg).includes('hold half of cache.maxBytes')), 'said in the log');
    });

    it('goes with its blob: an evicted manifest takes its links and the tag records naming it, and the directories left empty', async () => {
      const root = mkdtempSync(join(tmpdir(), 'pullbridge-cache-'));
      cleanups.push(async () => rmSync(root, { recursive: true, force: true }));
      const p = await proxyOn(root, {}, upstream.url);
      for (const tag of ['t1', 't2']) {
        const res = await rawRequest(p.url, `/v2/corp/team/app/manifests/${tag}`, { headers: { authorization: p.authorization('shop'), accept: OCI_INDEX } });
        assert.equal(res.status, 200);
      }
      const repository = join(root, 'repositories', 'corp', 'team', 'app');
      assert.ok(existsSync(join(repository, '_tags', 't1')) && existsSync(join(repository, '_links', 'sha256', image.index.digest.slice(7))));
      const settings = p.cache!.settings;
      await p.close();
      // Opened again (the index of links and tag records is rebuilt from the disk), with room for nothing: everything is evicted.
      const cache = await NodeCache.open({ ...settings, maxBytes: 0 }, createMetricsRegistry(false), memoryLogger().logger);
      cleanups.push(() => cache.close());
      assert.equal(cache.status().entries, 0);
      assert.equal(cache.status().metadataEntries, 0);
      assert.deepEqual(readdirSync(join(root, 'repositories')), [], 'no tag record, link or directory left');
    });
  });
});
