// The node cache's disk bounds on a real small filesystem: a size-limited tmpfs mounted for each
// test (the test runs as root; unmounted after each test) holds `cache.path`, and what is under
// tmp/ and blobs/ and the free space are sampled while fills run. Concurrent fills from
// docker-registry (each reserves its Content-Length), a chunked fill that outgrows the limits (it
// turns into a relay: its clients still get every byte, verified), and metadata (tag records and
// links) on a filesystem with few inodes.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, rmdirSync, statfsSync, statSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run } from './support/procs.js';
import { slowUpstream } from './support/http.js';
import { buildImage } from './support/oci.js';
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
});
