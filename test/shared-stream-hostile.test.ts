// Streaming fills against a hostile writer of the shared store or a hostile upstream (issue 24's
// review): a chain of another upstream is never streamed to a rule's client, objects planted at a
// segment or blob key neither spin a filler or a follower nor take the tier down, and a forged
// size-0 claim is not followed. Real proxies, shared directories and S3 store (versitygw); scripted
// upstreams where a real registry cannot lie (HEAD 200 for a blob it lacks), and a stand-in fill
// (a real file behind the flight's follow()) where a publisher is driven alone.

import assert from 'node:assert/strict';
import http from 'node:http';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { Registry } from 'prom-client';
import { openSharedStore } from '../src/cache/shared/open.js';
import { FollowBody } from '../src/cache/shared/follow.js';
import { SegmentPublisher } from '../src/cache/shared/publish.js';
import { SEGMENT_UPLOADS_MAX, SharedTier, sharedKeys } from '../src/cache/shared/tier.js';
import type { SharedConfig } from '../src/rules/config.js';
import { createLogger } from '../src/log.js';
import { upstreamOrigin } from '../src/upstream/rule.js';
import { startVersitygw, type S3Server } from './support/objectstores.js';
import { getAsShop, startProxy, type ProxyUnderTest } from './support/proxy.js';

const MiB = 1024 * 1024;
const sha = (bytes: Buffer) => `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
const silent = createLogger({ level: 'silent' });
const OTHER_ORIGIN = 'c'.repeat(64);

/** Calls to the shared tier counted by `operation/result`. */
async function calls(registry: Registry): Promise<Record<string, number>> {
  const metric = registry.getSingleMetric('pullbridge_cache_shared_requests_total');
  const counts: Record<string, number> = {};
  for (const value of (await metric?.get())?.values ?? []) counts[`${String(value.labels.operation)}/${String(value.labels.result)}`] = value.value;
  return counts;
}
const total = (counts: Record<string, number>, operation: string) => Object.entries(counts).filter(([key]) => key.startsWith(`${operation}/`)).reduce((sum, [, n]) => sum + n, 0);

/** Polls `check` until it answers, at most `rounds` times 20 ms apart (bounded by rounds, not time). */
/**
 * A fill as the segment publisher reads it (flight.follow()): `file`, said to be complete at `size`
 * bytes (what the file really holds is the test's), with the handles opened and closed counted.
 */
function completeFill(file: string, size: number) {
  const handles = { opened: 0, closed: 0 };
  const flight = {
    relaying: false,
    async follow() {
      handles.opened++;
      const handle = await open(file, 'r');
      return { handle, extent: { readable: () => size, outcome: () => ({ size }), watch: () => () => undefined }, release: () => void handle.close().then(() => handles.closed++) };
    },
  };
  return { flight, handles };
}

async function until<T>(check: () => Promise<T | undefined>, rounds = 1000): Promise<T | undefined> {
  for (let i = 0; i < rounds; i++) {
    const value = await check();
    if (value !== undefined) return value;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return undefined;
}


describe('streaming fills against a hostile store writer or upstream', function () {
  this.timeout(60_000);
  const dirs: string[] = [];
  const servers: http.Server[] = [];
  const proxies: ProxyUnderTest[] = [];
  const tempDir = (prefix: string) => {
    const dir = mkdtempSync(join(tmpdir(), prefix));
    dirs.push(dir);
    return dir;
  };
  const serve = async (handler: http.RequestListener): Promise<string> => {
    const server = http.createServer(handler);
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  };
  after(async () => {
    for (const proxy of proxies) await proxy.close();
    for (const server of servers) await new Promise((resolve) => server.close(resolve));
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  it('does not stream a chain another upstream\'s filler left to a client of a rule whose upstream answers HEAD 200 for any digest', async () => {
    const secret = randomBytes(3 * MiB); // a private layer of another rule's upstream
    const digest = sha(secret);
    const shared = tempDir('hostile-shared-');
    // What that upstream's filler left when it died at 2 MiB.
    const segment = join(shared, sharedKeys.segment(digest, OTHER_ORIGIN, 0));
    mkdirSync(dirname(segment), { recursive: true });
    writeFileSync(segment, secret.subarray(0, 2 * MiB));
    const asked: string[] = [];
    const url = await serve((req, res) => {
      asked.push(`${req.method} ${req.url} ${req.headers.range ?? ''}`);
      if (req.method === 'HEAD' && req.url?.includes('/blobs/')) {
        res.writeHead(200, { 'content-length': String(secret.length), 'docker-content-digest': digest, 'content-type': 'application/octet-stream' });
        res.end();
        return;
      }
      res.writeHead(req.url === '/v2/' ? 200 : 404, { 'content-type': 'application/json' });
      res.end(req.url === '/v2/' ? '{}' : '{"errors":[{"code":"BLOB_UNKNOWN"}]}');
    });
    const node = await startProxy(
      { cache: { path: tempDir('hostile-node-'), shared: { filesystem: { path: shared }, fillWaitSeconds: 30 } }, registries: [{ name: 'evil', match: ['evil.corp.example:5000'], upstream: url, auth: { mode: 'broker' } }] },
      {}, {}, {}, { nodeName: 'node-x' },
    );
    proxies.push(node);
    const received = (await getAsShop(node, `/v2/evil/team/app/blobs/${digest}`)).body;
    const leaked = received.length > 0 && received.equals(secret.subarray(0, received.length));
    assert.equal(leaked, false, `the client of the hostile upstream's rule received ${received.length} bytes of the other upstream's layer (upstream asked: ${asked.join(' | ')})`);
  });

  it('does not follow a claim announcing size 0 for a blob that is not empty: the client gets the blob from the upstream', async () => {
    const blob = randomBytes(256 * 1024);
    const digest = sha(blob);
    const url = await serve((req, res) => {
      if (req.url?.endsWith(`/blobs/${digest}`)) {
        res.writeHead(200, { 'content-length': String(blob.length), 'docker-content-digest': digest, 'content-type': 'application/octet-stream' });
        res.end(req.method === 'HEAD' ? undefined : blob);
        return;
      }
      res.writeHead(req.url === '/v2/' ? 200 : 404, { 'content-type': 'application/json' });
      res.end('{}');
    });
    const shared = tempDir('hostile-shared-');
    const claim = join(shared, sharedKeys.claim(digest));
    mkdirSync(dirname(claim), { recursive: true });
    writeFileSync(claim, JSON.stringify({ node: 'ghost', at: Date.now(), size: 0, origin: upstreamOrigin({ upstream: url, forwardProxy: undefined }), stream: 1 }));
    const node = await startProxy(
      { cache: { path: tempDir('hostile-node-'), shared: { filesystem: { path: shared }, fillWaitSeconds: 30 } }, registries: [{ name: 'corp', match: ['registry.corp.example:5000'], upstream: url, auth: { mode: 'broker' } }] },
      {}, {}, {}, { nodeName: 'node-f' },
    );
    proxies.push(node);
    const got = await getAsShop(node, `/v2/corp/team/app/blobs/${digest}`);
    assert.deepEqual({ status: got.status, complete: got.complete, digest: sha(got.body) }, { status: 200, complete: true, digest });
  });

  it('stops publishing when a segment key holds what cannot be a segment (a directory), instead of creating it again and again', async () => {
    const root = tempDir('hostile-shared-');
    const config = { fillWaitSeconds: 120, timeoutSeconds: 30, streamFills: true, filesystem: { path: root } } as unknown as SharedConfig;
    const registry = new Registry();
    const tier = new SharedTier(() => openSharedStore(config), config, 'node-a', registry, silent, Date.now);
    const digest = `sha256:${'cd'.repeat(32)}`;
    mkdirSync(join(root, sharedKeys.segment(digest, OTHER_ORIGIN, 0)), { recursive: true });
    const file = join(tempDir('hostile-fill-'), 'fill');
    writeFileSync(file, Buffer.alloc(100, 7));
    // The fill, as the publisher reads it: a complete file of 100 bytes.
    const { flight } = completeFill(file, 100);
    const publisher = new SegmentPublisher(flight, tier, digest, OTHER_ORIGIN, 0, 100, Date.now, silent);
    let stop: string | undefined;
    void publisher.done.then((why) => (stop = why));
    const rounds = await until(async () => (stop !== undefined || total(await calls(registry), 'segment') > 50 ? total(await calls(registry), 'segment') : undefined));
    publisher.stop();
    assert.equal(stop, 'store', `the publisher did not stop (${rounds ?? '?'} segment uploads)`);
    assert.ok((rounds ?? Infinity) <= 3, `${rounds} segment uploads before it stopped`);
  });

  it('leaves a shared blob shorter than the followed claim\'s size for the upstream, instead of reading it again and again', async () => {
    const root = tempDir('hostile-shared-');
    const config = { fillWaitSeconds: 120, timeoutSeconds: 30, streamFills: true, filesystem: { path: root } } as unknown as SharedConfig;
    const registry = new Registry();
    const tier = new SharedTier(() => openSharedStore(config), config, 'node-b', registry, silent, Date.now);
    const digest = `sha256:${'ab'.repeat(32)}`;
    const key = join(root, sharedKeys.blob(digest));
    mkdirSync(dirname(key), { recursive: true });
    writeFileSync(key, Buffer.alloc(50, 1)); // 50 bytes; the claim says 100
    let resumedAt: number | undefined;
    const body = new FollowBody({
      tier, digest, size: 100, origin: OTHER_ORIGIN, now: Date.now, logger: silent,
      resume: async (offset) => {
        resumedAt = offset;
        throw new Error('the upstream is asked (this test ends here)');
      },
      onTakeover: () => undefined,
    });
    let ended: string | undefined;
    body.attach({ data: () => true, end: () => (ended = 'end'), error: (error) => (ended = error.message) });
    const reads = await until(async () => (resumedAt !== undefined || tier.status().blobsRead > 50 ? tier.status().blobsRead : undefined));
    body.destroy();
    // From where it was: the blob's size was seen to differ before it was read.
    assert.equal(resumedAt, 0, `the follower did not go to the upstream (${reads ?? '?'} reads of the shared blob; ended: ${ended ?? 'no'})`);
    assert.ok((reads ?? Infinity) <= 3, `${reads} reads of the shared blob before it went to the upstream`);
  });

  it('stops a publisher whose local fill file fails, without taking the tier down for the other fills', async () => {
    const root = tempDir('hostile-shared-');
    const config = { fillWaitSeconds: 120, timeoutSeconds: 30, streamFills: true, filesystem: { path: root } } as unknown as SharedConfig;
    const tier = new SharedTier(() => openSharedStore(config), config, 'node-c', new Registry(), silent, Date.now);
    const digest = `sha256:${'9a'.repeat(32)}`;
    const file = join(tempDir('hostile-fill-'), 'fill');
    writeFileSync(file, Buffer.alloc(10, 3));
    // The fill says 100 bytes are readable; its file has 10 (a disk error would do the same).
    const { flight } = completeFill(file, 100);
    const stop = await new SegmentPublisher(flight, tier, digest, OTHER_ORIGIN, 0, 100, Date.now, silent).done;
    assert.deepEqual({ stop, up: tier.up }, { stop: 'failed', up: true });
    await tier.close();
  });

  it('publishes through the fill reader its caller took, and closes it once: the fill\'s file is opened once, and the blob\'s segments are the file\'s bytes', async () => {
    const root = tempDir('hostile-shared-');
    const config = { fillWaitSeconds: 120, timeoutSeconds: 30, streamFills: true, filesystem: { path: root } } as unknown as SharedConfig;
    const tier = new SharedTier(() => openSharedStore(config), config, 'node-e', new Registry(), silent, Date.now);
    const digest = `sha256:${'5e'.repeat(32)}`;
    const file = join(tempDir('hostile-fill-'), 'fill');
    const bytes = randomBytes(100);
    writeFileSync(file, bytes);
    const { flight, handles } = completeFill(file, 100);
    // The caller takes the reader before it announces the fill (blobs.ts), and hands it over.
    const reading = flight.follow();
    const stop = await new SegmentPublisher(flight, tier, digest, OTHER_ORIGIN, 0, 100, Date.now, silent, reading).done;
    assert.equal(stop, 'complete');
    await until(async () => (handles.closed > 0 ? handles.closed : undefined));
    assert.deepEqual(handles, { opened: 1, closed: 1 }, 'a reader opened and never closed is left to the garbage collector, a fatal error on Node.js 26');
    const store = await openSharedStore(config);
    const segment = await store.readRecord(sharedKeys.segment(digest, OTHER_ORIGIN, 0));
    assert.ok(segment && Buffer.compare(segment, bytes) === 0, 'the segment holds the fill\'s bytes');
    await store.close();
    await tier.close();
  });

  it('runs at most SEGMENT_UPLOADS_MAX segment uploads at once on a node, however many fills publish', async () => {
    const root = tempDir('hostile-shared-');
    const config = { fillWaitSeconds: 120, timeoutSeconds: 30, streamFills: true, filesystem: { path: root } } as unknown as SharedConfig;
    let running = 0;
    let most = 0;
    // The real store, its createFromRange counted while it runs.
    const counted = async () => {
      const store = await openSharedStore(config);
      const create = store.createFromRange.bind(store);
      store.createFromRange = async (...args) => {
        most = Math.max(most, ++running);
        try {
          return await create(...args);
        } finally {
          running--;
        }
      };
      return store;
    };
    const tier = new SharedTier(counted, config, 'node-d', new Registry(), silent, Date.now);
    const file = join(tempDir('hostile-fill-'), 'fill');
    writeFileSync(file, randomBytes(MiB));
    const handle = await open(file, 'r');
    try {
      const fills = Array.from({ length: 12 }, (_, i) => `sha256:${i.toString(16).padStart(2, '0').repeat(32)}`);
      const outcomes = await Promise.all(fills.map((digest) => tier.publishSegment(digest, OTHER_ORIGIN, { handle, start: 0, end: MiB })));
      assert.deepEqual(new Set(outcomes), new Set(['created']));
      assert.ok(most >= 1 && most <= SEGMENT_UPLOADS_MAX, `${most} segment uploads at once`);
    } finally {
      await handle.close();
      await tier.close();
    }
  });

  describe('on an S3 store (versitygw)', () => {
    let s3: S3Server | undefined;
    after(async () => s3?.stop());
    it('refuses an empty object at a segment key without taking the tier down', async () => {
      s3 = await startVersitygw();
      const config = { fillWaitSeconds: 60, timeoutSeconds: 5, streamFills: true, s3: { bucket: s3.bucket, endpoint: s3.endpoint, forcePathStyle: true, region: 'us-east-1', accessKeyFile: s3.accessKeyFile, secretKeyFile: s3.secretKeyFile, prefix: 'c/' } } as unknown as SharedConfig;
      const store = await openSharedStore(config);
      const digest = `sha256:${'ef'.repeat(32)}`;
      await store.writeRecord(sharedKeys.segment(digest, OTHER_ORIGIN, 0), Buffer.alloc(0), { ifAbsent: true });
      const tier = new SharedTier(() => openSharedStore(config), config, 'node-f', new Registry(), silent, Date.now);
      assert.equal(await tier.segmentSize(digest, OTHER_ORIGIN, 0), 0, 'the planted empty segment is there');
      const stream = await tier.readSegment(digest, OTHER_ORIGIN, 0);
      let bytes = 0;
      if (stream) for await (const chunk of stream) bytes += (chunk as Buffer).length;
      assert.deepEqual({ up: tier.up, bytes }, { up: true, bytes: 0 }, 'reading an empty segment took the whole tier down');
      await store.close();
      await tier.close();
    });
  });
});
