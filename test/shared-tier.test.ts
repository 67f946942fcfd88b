// The shared cache tier with real parts: four proxies ("nodes"), each with its own node store, one
// shared store, one docker-registry upstream whose access log counts what it sent. Four containerd
// instances pull the same multi-layer image at once, one through each node: every blob and manifest
// crosses from the upstream once for the cluster. The upstream is then killed and a fifth, new node
// pulls the image by tag from the shared tier alone. A corrupt shared copy costs one pull and is
// replaced from the upstream. Then the shared store goes down: pulls of a new
// image go to the upstream and succeed; /status and the metric say the tier is down. Run for each
// backend: S3 API (versitygw), Azure Blob API (Azurite), GCS API (fake-gcs-server), filesystem (a
// directory, as a ReadWriteMany volume).

import assert from 'node:assert/strict';
import http from 'node:http';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSharedStore } from '../src/cache/shared/open.js';
import { sharedKeys } from '../src/cache/shared/tier.js';
import { validateConfig, type ConfigInput } from '../src/rules/config.js';
import { startContainerd, type Containerd } from './support/containerd.js';
import { BlobServiceClient, StorageSharedKeyCredential } from '@azure/storage-blob';
import { startAzurite, startFakeGcs, startVersitygw, type S3Server } from './support/objectstores.js';
import { buildImage, type TestImage } from './support/oci.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { rawRequest, slowUpstream } from './support/http.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

type SharedInput = NonNullable<NonNullable<ConfigInput['cache']>['shared']>;

interface Backend {
  readonly name: string;
  /** Starts the store; the config naming it, and how to take it down. */
  start(): Promise<{ shared: SharedInput; down(): Promise<void>; stop(): Promise<void> }>;
}

const MiB = 1024 * 1024;

const backends: readonly Backend[] = [
  {
    name: 'S3 API (versitygw)',
    async start() {
      const s3: S3Server = await startVersitygw();
      return {
        shared: { s3: { bucket: s3.bucket, endpoint: s3.endpoint, forcePathStyle: true, accessKeyFile: s3.accessKeyFile, secretKeyFile: s3.secretKeyFile, prefix: 'cluster-a/' }, fillWaitSeconds: 60, timeoutSeconds: 5 },
        down: () => s3.stop(),
        stop: () => s3.stop(),
      };
    },
  },
  {
    name: 'Azure Blob API (Azurite)',
    async start() {
      const azure = await startAzurite();
      const container = 'pullbridge-test';
      const accountKey = readFileSync(azure.accountKeyFile, 'utf8');
      const credential = new StorageSharedKeyCredential(azure.accountName, accountKey.trim());
      await new BlobServiceClient(azure.endpoint, credential).getContainerClient(container).create();
      // The key file outlives the server: a store that is down still has its credentials mounted
      // (stopping Azurite removes its directory, and a key file gone reads as 'denied').
      const secrets = mkdtempSync(join(tmpdir(), 'pullbridge-shared-azure-key-'));
      const accountKeyFile = join(secrets, 'account-key');
      writeFileSync(accountKeyFile, accountKey);
      return {
        shared: { azure: { container, accountName: azure.accountName, accountKeyFile, endpoint: azure.endpoint, prefix: 'cluster-a/' }, fillWaitSeconds: 60, timeoutSeconds: 5 },
        down: () => azure.stop(),
        stop: async () => {
          await azure.stop();
          rmSync(secrets, { recursive: true, force: true });
        },
      };
    },
  },
  {
    name: 'GCS API (fake-gcs-server)',
    async start() {
      const gcs = await startFakeGcs();
      return {
        shared: { gcs: { bucket: gcs.bucket, endpoint: gcs.endpoint, prefix: 'cluster-a/' }, fillWaitSeconds: 60, timeoutSeconds: 5 },
        down: () => gcs.stop(),
        stop: () => gcs.stop(),
      };
    },
  },
  {
    name: 'filesystem',
    async start() {
      const dir = mkdtempSync(join(tmpdir(), 'pullbridge-shared-fs-'));
      return {
        shared: { filesystem: { path: dir }, fillWaitSeconds: 60, timeoutSeconds: 5 },
        // A volume that went away: the directory is gone.
        down: async () => rmSync(dir, { recursive: true, force: true }),
        stop: async () => rmSync(dir, { recursive: true, force: true }),
      };
    },
  },
];

const sha = (bytes: Buffer) => `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
/** Blob bytes a node read from the shared tier (its metric). */
const sharedBytesRead = async (node: ProxyUnderTest) => Number(/^pullbridge_cache_shared_bytes_total\{direction="read"\} (\d+)/m.exec(await node.metrics.metrics())?.[1] ?? 0);

for (const backend of backends) {
  describe(`the shared cache tier, ${backend.name}: one upstream transfer per blob per cluster`, function () {
    this.timeout(180_000);
    const dirs: string[] = [];
    const nodes: ProxyUnderTest[] = [];
    const pullers: Containerd[] = [];
    let upstream: RegistryHandle;
    let store: Awaited<ReturnType<Backend['start']>>;
    let image: TestImage;

    const startNode = async (name: string): Promise<ProxyUnderTest> => {
      const path = mkdtempSync(join(tmpdir(), `pullbridge-node-${name}-`));
      dirs.push(path);
      const node = await startProxy(
        { cache: { path, shared: store.shared }, registries: [{ name: 'corp', match: ['registry.corp.example:5000'], upstream: upstream.url, auth: { mode: 'broker' } }] },
        {},
        {},
        {},
        { nodeName: name },
      );
      nodes.push(node);
      return node;
    };
    /** GETs the upstream answered for a manifest or blob digest (any repository). */
    const upstreamGets = async (digest: string) => (await upstream.requests()).filter((r) => r.method === 'GET' && r.status < 300 && (r.path.endsWith(`/blobs/${digest}`) || r.path.endsWith(`/manifests/${digest}`))).length;
    const pulls = (node: ProxyUnderTest) => node.logs.records.filter((r) => r.access === 'pull' && r.status === 200);

    before(async () => {
      upstream = await startRegistry({ accessLog: true });
      store = await backend.start();
      image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [6 * MiB, 3 * MiB, 256 * 1024] });
      await upstream.push(image, 'team/app', '1.0');
      for (let i = 1; i <= 4; i++) await startNode(`node-${i}`);
      for (let i = 0; i < 5; i++) pullers.push(await startContainerd());
    });

    after(async () => {
      await Promise.all(nodes.map((n) => n.close()));
      await Promise.all(pullers.map((c) => c.stop()));
      await upstream?.stop();
      await store?.stop();
      for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
    });

    it('four nodes pull one image at once: each blob came from the upstream once; every node got every byte', async () => {
      const reference = (n: ProxyUnderTest) => `${n.host}/corp/team/app:1.0`;
      await Promise.all(nodes.slice(0, 4).map((n, i) => pullers[i]?.fetch(reference(n), { user: n.credential('shop') })));
      for (const puller of pullers.slice(0, 4)) {
        for (const layer of image.layers) assert.equal(sha(await puller.content(layer.digest)), layer.digest);
      }
      // Blobs (configs, layers): once for the cluster. Manifests (a few hundred bytes) are not claimed:
      // nodes asking for one at the same moment each ask the upstream, as they ask it for the tag.
      for (const digest of [...image.configs.map((c) => c.digest), ...image.layers.map((l) => l.digest)]) {
        assert.equal(await upstreamGets(digest), 1, `${digest} crossed from the upstream ${await upstreamGets(digest)} times: ${JSON.stringify((await upstream.requests()).filter((r) => r.path.includes(digest.slice(7))))}`);
      }
      // One node fetched each layer (miss); the three others read it from the shared tier.
      for (const layer of image.layers) {
        const outcomes = nodes.slice(0, 4).map((n) => pulls(n).find((r) => r.reference === layer.digest)?.cache);
        assert.deepEqual(outcomes.filter((o) => o === 'miss').length, 1, `${layer.digest}: ${JSON.stringify(outcomes)}`);
        assert.deepEqual(outcomes.filter((o) => o === 'shared').length, 3, `${layer.digest}: ${JSON.stringify(outcomes)}`);
      }
    });

    it('with the upstream down, a fifth node that never pulled gets the image by tag from the shared tier', async () => {
      // Uploads finish in the background after the pulls: let them land before the upstream goes.
      await Promise.all(nodes.map((n) => n.cache?.sharing()));
      await upstream.kill();
      const fifth = await startNode('node-5');
      await pullers[4]?.fetch(`${fifth.host}/corp/team/app:1.0`, { user: fifth.credential('shop') });
      for (const layer of image.layers) assert.equal(sha((await pullers[4]?.content(layer.digest)) ?? Buffer.alloc(0)), layer.digest);
      const served = pulls(fifth);
      assert.ok(served.some((r) => r.kind === 'manifest' && r.reference === '1.0' && r.cache === 'stale'), `the tag, from the shared record: ${JSON.stringify(served)}`);
      for (const digest of [...image.layers.map((l) => l.digest), ...image.configs.map((c) => c.digest)]) {
        assert.ok(served.some((r) => r.reference === digest && r.cache === 'shared'), `${digest} from the shared tier: ${JSON.stringify(served)}`);
      }
    });

    it('a corrupt shared copy fails one pull, is removed, and the retry gets the blob from the upstream, which the tier then holds right', async () => {
      await upstream.restart();
      const layer = image.layers[1];
      assert.ok(layer);
      // Bit rot or a writer with access to the bucket (a fault the store cannot be asked for): other
      // bytes of the same size under the blob's key, written through the project's own store adapter.
      const validated = validateConfig({ cache: { path: '/unused', shared: store.shared } });
      assert.ok(validated.ok && validated.config.cache?.shared);
      const adapter = await openSharedStore(validated.config.cache.shared);
      const scratch = mkdtempSync(join(tmpdir(), 'pullbridge-corrupt-'));
      dirs.push(scratch);
      const garbage = join(scratch, 'garbage');
      writeFileSync(garbage, Buffer.alloc(layer.size, 7));
      await adapter.remove(sharedKeys.blob(layer.digest));
      assert.equal(await adapter.createFromFile(sharedKeys.blob(layer.digest), garbage, layer.size), 'created');
      const sixth = await startNode('node-6');
      const puller = await startContainerd();
      pullers.push(puller);
      const fetch = () => puller.fetch(`${sixth.host}/corp/team/app:1.0`, { user: sixth.credential('shop') });
      // Whole-blob GETs: containerd resumes the cut transfer with a Range for the withheld last byte
      // (relayed to the upstream; containerd's digest check then refuses the mixed bytes).
      const wholeGets = async () => (await upstream.requests()).filter((r) => r.method === 'GET' && r.status === 200 && r.path.endsWith(`/blobs/${layer.digest}`)).length;
      const before = await wholeGets();
      await assert.rejects(fetch(), /unexpected commit digest/, 'the bad bytes never complete a blob: containerd stores nothing');
      // containerd resumes an ingest it still has: a fetch right away would commit the bad prefix again.
      // Its garbage collector drops the ingest once the failed pull's lease is gone (kubelet's back-off
      // gives it that time): wait for that, bounded.
      for (let i = 0; i < 60 && (await puller.ingests()).length > 0; i++) await new Promise((resolve) => setTimeout(resolve, 500));
      await fetch();
      assert.equal(sha(await puller.content(layer.digest)), layer.digest);
      assert.equal(await wholeGets(), before + 1, 'the retry went to the upstream');
      assert.ok(sixth.logs.records.some((r) => r.msg === 'the shared cache tier holds a corrupt copy: removed; pulls fetch it from the upstream' && r.digest === layer.digest));
      await sixth.cache?.sharing();
      const repaired = await adapter.read(sharedKeys.blob(layer.digest));
      assert.ok(repaired, 'the upstream fill shared the blob again');
      const chunks: Buffer[] = [];
      for await (const chunk of repaired) chunks.push(chunk as Buffer);
      assert.equal(sha(Buffer.concat(chunks)), layer.digest);
      await adapter.close();
    });

    it('does not read a layer from the tier for a manifest request naming its digest (any Pod can ask)', async () => {
      const node = nodes[1];
      const layer = image.layers[0];
      assert.ok(node && layer);
      const before = await sharedBytesRead(node);
      const answer = await rawRequest(node.url, `/v2/corp/team/app/manifests/${layer.digest}`, { headers: { authorization: node.authorization('shop') } });
      // The upstream's own answer (docker-registry fails to read a layer as a manifest: 500), passed on.
      const direct = await rawRequest(upstream.url, `/v2/team/app/manifests/${layer.digest}`);
      assert.notEqual(direct.status, 200);
      assert.equal(answer.status, direct.status);
      assert.equal(await sharedBytesRead(node), before, 'not a byte of the layer read from the tier');
    });

    it('with the shared store down, pulls of a new image go to the upstream and succeed; /status and the metric say the tier is down', async () => {
      const fresh = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [512 * 1024] });
      await upstream.push(fresh, 'team/app', '2.0');
      await store.down();
      const node = nodes[0];
      assert.ok(node);
      await pullers[0]?.fetch(`${node.host}/corp/team/app:2.0`, { user: node.credential('shop') });
      for (const layer of fresh.layers) assert.equal(sha((await pullers[0]?.content(layer.digest)) ?? Buffer.alloc(0)), layer.digest);
      const status = node.cache?.status() as { shared: { up: boolean; failure?: string } };
      assert.equal(status.shared.up, false);
      assert.ok(['unreachable', 'error'].includes(status.shared.failure ?? ''), JSON.stringify(status.shared));
      assert.match(await node.metrics.metrics(), /^pullbridge_cache_shared_up 0$/m);
      const failing = node.logs.records.filter((r) => r.msg === 'shared cache tier failing: pulls go to the upstream');
      assert.equal(failing.length, 1, 'logged once, not per request');
    });
  });
}

describe('the shared cache tier and its credential files: missing at start, wrong, then rotated (S3 API, versitygw)', function () {
  this.timeout(180_000);
  let upstream: RegistryHandle;
  let s3: S3Server;
  let node: ProxyUnderTest | undefined;
  let puller: Containerd;
  const dirs: string[] = [];

  before(async () => {
    upstream = await startRegistry({ accessLog: true });
    s3 = await startVersitygw();
    puller = await startContainerd();
  });

  after(async () => {
    await node?.close();
    await puller?.stop();
    await upstream?.stop();
    await s3?.stop();
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  it('starts the proxy without them, pulls from the upstream meanwhile, and takes up the rotated files without a restart', async () => {
    const secrets = mkdtempSync(join(tmpdir(), 'pullbridge-shared-secrets-'));
    const path = mkdtempSync(join(tmpdir(), 'pullbridge-node-rotation-'));
    dirs.push(secrets, path);
    const accessKeyFile = join(secrets, 'access-key');
    const secretKeyFile = join(secrets, 'secret-key');
    node = await startProxy(
      { cache: { path, shared: { s3: { bucket: s3.bucket, endpoint: s3.endpoint, forcePathStyle: true, accessKeyFile, secretKeyFile }, timeoutSeconds: 5 } }, registries: [{ name: 'corp', match: ['registry.corp.example:5000'], upstream: upstream.url, auth: { mode: 'broker' } }] },
      {},
      {},
      {},
      { nodeName: 'node-r' },
    );
    const current = node;
    const status = () => (current.cache?.status() as { shared: { up: boolean; failure?: string; location: string | null; blobsWritten: number } }).shared;
    const pullNew = async (tag: string) => {
      const image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [128 * 1024] });
      await upstream.push(image, 'team/app', tag);
      await puller.fetch(`${current.host}/corp/team/app:${tag}`, { user: current.credential('shop') });
      for (const layer of image.layers) assert.equal(sha(await puller.content(layer.digest)), layer.digest);
      await current.cache?.sharing();
    };

    // The Secret not mounted yet: the proxy runs, pulls go to the upstream.
    await pullNew('missing');
    assert.equal(status().up, false);
    assert.equal(status().failure, 'denied');
    assert.equal(status().location, null);

    // A wrong secret: the store opens, and refuses.
    writeFileSync(accessKeyFile, readFileSync(s3.accessKeyFile));
    writeFileSync(secretKeyFile, readFileSync(s3.wrongSecretKeyFile));
    await new Promise((resolve) => setTimeout(resolve, 11_000)); // past the 5 s skip and the 10 s file check
    await pullNew('wrong');
    assert.equal(status().up, false);
    assert.equal(status().failure, 'denied');
    assert.equal(status().blobsWritten, 0);

    // The rotated Secret: taken up at the next look at the files.
    writeFileSync(secretKeyFile, readFileSync(s3.secretKeyFile));
    await new Promise((resolve) => setTimeout(resolve, 11_000));
    await pullNew('rotated');
    assert.equal(status().up, true, JSON.stringify(status()));
    assert.ok(status().blobsWritten >= 1, JSON.stringify(status()));
    assert.ok(node.logs.records.some((r) => r.msg === 'shared cache tier credential files changed: reconnecting with them'));
    assert.ok(node.logs.records.some((r) => r.msg === 'shared cache tier answers again'));
  });
});

describe('the shared cache tier, filesystem: backfill, slow fills, downloads that fail early', function () {
  this.timeout(180_000);
  const dirs: string[] = [];
  const closing: Array<() => Promise<void>> = [];
  const tempDir = (name: string) => {
    const dir = mkdtempSync(join(tmpdir(), `pullbridge-${name}-`));
    dirs.push(dir);
    return dir;
  };
  const node = async (path: string, shared: string | undefined, upstream: string, name: string, fillWaitSeconds = 60) => {
    const proxy = await startProxy(
      { cache: { path, ...(shared ? { shared: { filesystem: { path: shared }, fillWaitSeconds } } : {}) }, registries: [{ name: 'corp', match: ['registry.corp.example:5000'], upstream, auth: { mode: 'broker' } }] },
      {},
      {},
      {},
      { nodeName: name },
    );
    closing.push(() => proxy.close());
    return proxy;
  };

  /** A blob a scripted upstream sends slowly (docker-registry cannot be made slow), 64 KiB every
   * `intervalMs`, and two nodes on one shared directory. */
  const slowFill = async (name: string, options: { chunks: number; intervalMs: number; fillWaitSeconds: number }) => {
    const blob = Buffer.alloc(options.chunks * 64 * 1024, options.chunks);
    const digest = sha(blob);
    const upstream = await slowUpstream(blob, { chunkBytes: 64 * 1024, intervalMs: options.intervalMs, announceLength: true, contentType: 'application/octet-stream' });
    closing.push(() => upstream.close(0));
    const shared = tempDir(`shared-${name}`);
    const nodes = [await node(tempDir(`node-${name}-1`), shared, upstream.url, 'node-1', options.fillWaitSeconds), await node(tempDir(`node-${name}-2`), shared, upstream.url, 'node-2', options.fillWaitSeconds)] as const;
    return { blob, digest, path: `/v2/corp/team/slow/blobs/${digest}`, nodes, shared };
  };
  /** Polls (bounded) until the tier holds a claim for the digest: a node is filling it. */
  const claimed = async (shared: string, digest: string) => {
    const file = join(shared, 'claims', 'sha256', digest.slice('sha256:'.length));
    for (let i = 0; i < 300 && !existsSync(file); i++) await new Promise((resolve) => setTimeout(resolve, 50));
    assert.ok(existsSync(file), `no claim for ${digest} in the tier`);
  };

  after(async () => {
    for (const close of closing.reverse()) await close().catch(() => undefined);
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  it("does not serve a layer the registry deleted from the tier to a node that never confirmed it: the node asks the upstream first, passes on its 404 and removes the tier's link", async () => {
    const upstream = await startRegistry({ accessLog: true, deletes: true });
    closing.push(() => upstream.stop());
    const image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [64 * 1024] });
    await upstream.push(image, 'team/app', '1.0');
    const shared = tempDir('shared-deleted');
    const layer = image.layers[0]!;
    const path = `/v2/corp/team/app/blobs/${layer.digest}`;
    const first = await node(tempDir('node-deleted-1'), shared, upstream.url, 'node-1');
    const filled = await rawRequest(first.url, path, { headers: { authorization: first.authorization('shop') } });
    assert.equal(sha(filled.body), layer.digest);
    await first.cache?.sharing();
    const tierLink = join(shared, 'repositories', 'corp', 'team', 'app', '_links', 'sha256', layer.digest.slice('sha256:'.length));
    assert.ok(existsSync(tierLink), 'shared with its link');
    assert.equal((await fetch(`${upstream.url}/v2/team/app/blobs/${layer.digest}`, { method: 'DELETE' })).status, 202);
    const second = await node(tempDir('node-deleted-2'), shared, upstream.url, 'node-2');
    const answer = await rawRequest(second.url, path, { headers: { authorization: second.authorization('shop') } });
    assert.equal(answer.status, 404, 'the registry no longer has it');
    assert.ok(!existsSync(tierLink), "the tier's link is gone, for every node");
  });

  it('shares what a node had cached before the tier existed when it serves it, so a new node gets it during an outage', async () => {
    const upstream = await startRegistry({ accessLog: true });
    closing.push(() => upstream.stop());
    const puller = await startContainerd();
    closing.push(() => puller.stop());
    const image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [256 * 1024, 64 * 1024] });
    await upstream.push(image, 'team/app', '1.0');
    const path = tempDir('node-before');
    const shared = tempDir('shared-backfill');
    // Cached with no tier configured.
    const before = await node(path, undefined, upstream.url, 'node-a');
    await puller.fetch(`${before.host}/corp/team/app:1.0`, { user: before.credential('shop') });
    // A client has the last byte as soon as it is verified; the file is renamed into place just after.
    for (let i = 0; i < 100 && (before.cache?.status() as { fillsInFlight: number }).fillsInFlight > 0; i++) await new Promise((resolve) => setTimeout(resolve, 100));
    await before.close();
    // The same node with the tier (and a runtime that has nothing yet): served from its own store, and shared.
    const again = await startContainerd();
    closing.push(() => again.stop());
    const after = await node(path, shared, upstream.url, 'node-a');
    await again.fetch(`${after.host}/corp/team/app:1.0`, { user: after.credential('shop') });
    assert.ok(after.logs.records.filter((r) => r.access === 'pull' && r.kind === 'blob').every((r) => r.cache === 'hit'), 'served from its own store');
    await after.cache?.sharing();
    await upstream.kill();
    const newcomer = await startContainerd();
    closing.push(() => newcomer.stop());
    const fresh = await node(tempDir('node-new'), shared, upstream.url, 'node-b');
    await newcomer.fetch(`${fresh.host}/corp/team/app:1.0`, { user: fresh.credential('shop') });
    for (const layer of image.layers) assert.equal(sha(await newcomer.content(layer.digest)), layer.digest);
    const served = fresh.logs.records.filter((r) => r.access === 'pull' && r.status === 200);
    assert.ok(served.some((r) => r.kind === 'manifest' && r.reference === '1.0' && r.cache === 'stale'), JSON.stringify(served));
    for (const layer of image.layers) assert.ok(served.some((r) => r.reference === layer.digest && r.cache === 'shared'), JSON.stringify(served));
  });

  it('keeps a claim fresh while a slow fetch moves on: a node waiting longer than fillWaitSeconds still reads it from the tier', async () => {
    // Sent over ~13 s, past the shortest fillWaitSeconds (10 s) that the config takes.
    const { digest, path, shared, nodes: [first, second] } = await slowFill('slow', { chunks: 26, intervalMs: 500, fillWaitSeconds: 10 });
    const get = (n: ProxyUnderTest) => rawRequest(n.url, path, { headers: { authorization: n.authorization('shop') } });
    const filling = get(first);
    // The second node asks once the first holds the claim (a fixed pause lost that race on a loaded machine).
    await claimed(shared, digest);
    const [a, b] = await Promise.all([filling, get(second)]);
    assert.equal(sha(a.body), digest);
    assert.equal(sha(b.body), digest);
    const outcome = (n: ProxyUnderTest) => n.logs.records.find((r) => r.access === 'pull' && r.reference === digest)?.cache;
    assert.equal(outcome(first), 'miss');
    assert.equal(outcome(second), 'shared', 'waited past fillWaitSeconds (10 s) for the fetch that kept moving');
  });

  it('goes on waiting for another node\'s fill when the first of several clients waiting on a node leaves', async () => {
    const { blob, digest, path, nodes: [filler, waiter] } = await slowFill('leave', { chunks: 8, intervalMs: 400, fillWaitSeconds: 60 });
    const filling = rawRequest(filler.url, path, { headers: { authorization: filler.authorization('shop') } });
    await new Promise((resolve) => setTimeout(resolve, 500));
    // The first client on the waiting node gives up; a second one, there meanwhile, stays.
    const leaving = http.get(`${waiter.url}${path}`, { headers: { authorization: waiter.authorization('shop') } });
    leaving.on('error', () => undefined);
    await new Promise((resolve) => setTimeout(resolve, 300));
    const staying = rawRequest(waiter.url, path, { headers: { authorization: waiter.authorization('shop') } });
    await new Promise((resolve) => setTimeout(resolve, 300));
    leaving.destroy();
    const [filled, stayed] = await Promise.all([filling, staying]);
    assert.equal(sha(filled.body), digest);
    assert.equal(sha(stayed.body), digest);
    assert.equal(await sharedBytesRead(waiter), blob.length, 'the waiting node read the blob from the tier, not from the upstream');
  });
});

describe('a shared download as a proxy body', () => {
  it('keeps an end that comes before the fill attaches (the store failing while the fill is set up)', async () => {
    const { bodyOfReadable } = await import('../src/cache/shared/bodies.js');
    const { Readable } = await import('node:stream');
    const stream = new Readable({ read() {} });
    const failures: string[] = [];
    const body = bodyOfReadable(stream, (error) => failures.push(error.message));
    stream.destroy(new Error('connection reset'));
    await new Promise((resolve) => setImmediate(resolve));
    const heard = await new Promise<string>((resolve) => body.attach({ data: () => true, end: () => resolve('end'), error: (error) => resolve(`error: ${error.message}`) }));
    assert.equal(heard, 'error: connection reset');
    assert.deepEqual(failures, ['connection reset']);
  });
});

describe('the shared cache tier with a read-only credential (Azurite, a SAS that may read and list only)', function () {
  this.timeout(180_000);
  let upstream: RegistryHandle;
  let azure: Awaited<ReturnType<typeof startAzurite>>;
  const closing: Array<() => Promise<void>> = [];
  const dirs: string[] = [];

  before(async () => {
    upstream = await startRegistry({ accessLog: true });
    azure = await startAzurite();
  });

  after(async () => {
    for (const close of closing.reverse()) await close().catch(() => undefined);
    await upstream?.stop();
    await azure?.stop();
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  it('reads what other nodes shared, shares nothing, and says so once; the tier stays up', async () => {
    const { AccountSASPermissions, AccountSASResourceTypes, AccountSASServices, generateAccountSASQueryParameters } = await import('@azure/storage-blob');
    const container = 'pullbridge-test';
    const credential = new StorageSharedKeyCredential(azure.accountName, readFileSync(azure.accountKeyFile, 'utf8').trim());
    await new BlobServiceClient(azure.endpoint, credential).getContainerClient(container).create();
    const secrets = mkdtempSync(join(tmpdir(), 'pullbridge-ro-sas-'));
    dirs.push(secrets);
    const sasTokenFile = join(secrets, 'sas');
    const readOnly = generateAccountSASQueryParameters(
      { expiresOn: new Date(Date.now() + 3_600_000), permissions: AccountSASPermissions.parse('rl'), resourceTypes: AccountSASResourceTypes.parse('sco').toString(), services: AccountSASServices.parse('b').toString() },
      credential,
    );
    writeFileSync(sasTokenFile, `?${readOnly.toString()}\n`);
    const start = async (name: string, auth: { accountKeyFile: string } | { sasTokenFile: string }) => {
      const path = mkdtempSync(join(tmpdir(), `pullbridge-node-${name}-`));
      dirs.push(path);
      const proxy = await startProxy(
        { cache: { path, shared: { azure: { container, accountName: azure.accountName, endpoint: azure.endpoint, ...auth }, timeoutSeconds: 5 } }, registries: [{ name: 'corp', match: ['registry.corp.example:5000'], upstream: upstream.url, auth: { mode: 'broker' } }] },
        {},
        {},
        {},
        { nodeName: name },
      );
      closing.push(() => proxy.close());
      return proxy;
    };
    const writer = await start('writer', { accountKeyFile: azure.accountKeyFile });
    const reader = await start('reader', { sasTokenFile });
    const pullers = [await startContainerd(), await startContainerd()];
    for (const puller of pullers) closing.push(() => puller.stop());
    const shared = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [256 * 1024] });
    const fresh = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [128 * 1024] });
    await upstream.push(shared, 'team/app', 'shared');
    await upstream.push(fresh, 'team/app', 'fresh');
    await pullers[0]?.fetch(`${writer.host}/corp/team/app:shared`, { user: writer.credential('shop') });
    await writer.cache?.sharing();

    // A new image first: its claim and its upload are refused; the pull goes on from the upstream.
    await pullers[1]?.fetch(`${reader.host}/corp/team/app:fresh`, { user: reader.credential('shop') });
    await reader.cache?.sharing();
    // Then the image the writer shared: read from the tier, the refused writes notwithstanding.
    await pullers[1]?.fetch(`${reader.host}/corp/team/app:shared`, { user: reader.credential('shop') });
    for (const layer of [...shared.layers, ...fresh.layers]) assert.equal(sha((await pullers[1]?.content(layer.digest)) ?? Buffer.alloc(0)), layer.digest);
    const outcome = (digest: string) => reader.logs.records.find((r) => r.access === 'pull' && r.reference === digest && r.status === 200)?.cache;
    for (const layer of fresh.layers) assert.equal(outcome(layer.digest), 'miss');
    for (const layer of shared.layers) assert.equal(outcome(layer.digest), 'shared');
    const status = (reader.cache?.status() as { shared: { up: boolean; writable: boolean; blobsWritten: number } }).shared;
    assert.deepEqual([status.up, status.writable, status.blobsWritten], [true, false, 0]);
    assert.match(await reader.metrics.metrics(), /^pullbridge_cache_shared_writable 0$/m);
    assert.equal(reader.logs.records.filter((r) => r.msg === 'shared cache tier refuses writes: this node reads from it but shares nothing').length, 1);
    assert.equal(reader.logs.records.filter((r) => r.msg === 'shared cache tier failing: pulls go to the upstream').length, 0);
  });
});
