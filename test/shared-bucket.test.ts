// The shared tier when a writer of the bucket is hostile: every node holds the store's credential, so
// one compromised node (or a leaked credential) writes whatever it likes at any key. Real parts: a
// docker-registry upstream (killed for an outage), proxies in-process, a filesystem shared store (a
// directory, as a ReadWriteMany volume, which lets a test plant FIFOs and symbolic links) and
// versitygw (the S3 API) for records too large to read.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, constants, createReadStream, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, renameSync, rmSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { sealRecord } from '../src/cache/shared/records.js';
import { sharedKeys } from '../src/cache/shared/tier.js';
import type { ConfigInput } from '../src/rules/config.js';
import { startVersitygw, type S3Server } from './support/objectstores.js';
import { buildImage, type TestImage } from './support/oci.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { rawRequest, type RawResponse } from './support/http.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

type SharedInput = NonNullable<NonNullable<ConfigInput['cache']>['shared']>;

const MiB = 1024 * 1024;
const ACCEPT = 'application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json';
const sha = (bytes: Buffer) => `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
const small = () => buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [4096 + Math.floor(Math.random() * 4096)] });
/** Peak resident memory of this process (the proxies under test run in it), in bytes. */
const peakRss = () => process.resourceUsage().maxRSS * 1024;

/** Fails with `what` rather than hang when `promise` never settles: the hang is the bug shown. */
function settlesWithin<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const hung = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms / 1000} s`)), ms)));
  return Promise.race([promise, hung]).finally(() => clearTimeout(timer));
}

describe('the shared cache tier with a hostile writer of the bucket', function () {
  this.timeout(180_000);
  const dirs: string[] = [];
  const closing: Array<() => Promise<void>> = [];
  const tempDir = (name: string) => {
    const dir = mkdtempSync(join(tmpdir(), `pullbridge-${name}-`));
    dirs.push(dir);
    return dir;
  };
  let upstream: RegistryHandle;

  const node = async (name: string, shared: SharedInput, cache: { tagTTLSeconds?: number } = {}, now?: () => number): Promise<ProxyUnderTest> => {
    const proxy = await startProxy(
      { cache: { path: tempDir(`node-${name}`), ...cache, shared: { timeoutSeconds: 5, ...shared } }, registries: [{ name: 'corp', match: ['registry.corp.example:5000'], upstream: upstream.url, auth: { mode: 'broker' } }] },
      {},
      {},
      {},
      { nodeName: name, ...(now ? { now } : {}) },
    );
    closing.push(() => proxy.close());
    return proxy;
  };
  const manifest = (n: ProxyUnderTest, repository: string, reference: string, accept = ACCEPT) => rawRequest(n.url, `/v2/corp/${repository}/manifests/${reference}`, { headers: { authorization: n.authorization('shop'), accept } });
  const blob = (n: ProxyUnderTest, repository: string, digest: string) => rawRequest(n.url, `/v2/corp/${repository}/blobs/${digest}`, { headers: { authorization: n.authorization('shop') } });
  const outcome = (n: ProxyUnderTest, reference: string) => n.logs.records.find((r) => r.access === 'pull' && r.reference === reference)?.cache;
  /** Writes `body` at a key of a filesystem store, as a writer of the bucket can. */
  const plant = (store: string, key: string, body: string | Buffer) => {
    mkdirSync(dirname(join(store, key)), { recursive: true });
    writeFileSync(join(store, key), body);
  };

  beforeEach(async () => {
    upstream = await startRegistry();
    closing.push(() => upstream.stop());
  });

  afterEach(async () => {
    for (const close of closing.reverse()) await close().catch(() => undefined);
    closing.length = 0;
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
    dirs.length = 0;
  });

  it('serves a node\'s own record of a tag during an outage, not one planted dated a day ahead; a node without one refuses the planted record', async () => {
    const genuine = small();
    const planted = small();
    await upstream.push(genuine, 'team/app', 'v1');
    await upstream.push(planted, 'team/app', 'other');
    const shared = tempDir('shared-future');
    // tagTTLSeconds 0: every request asks the upstream, so the outage below is met at once.
    const own = await node('node-1', { filesystem: { path: shared } }, { tagTTLSeconds: 0 });
    const other = await node('node-2', { filesystem: { path: shared } }, { tagTTLSeconds: 0 });
    assert.equal((await manifest(own, 'team/app', 'v1')).headers['docker-content-digest'], genuine.index.digest);
    // The planted image reached the tier, linked for team/app, through another node.
    assert.equal((await manifest(other, 'team/app', 'other')).status, 200);
    await Promise.all([own.cache?.sharing(), other.cache?.sharing()]);
    plant(shared, sharedKeys.tag('corp', 'team/app', 'v1'), JSON.stringify({ digest: planted.index.digest, mediaType: planted.index.mediaType, size: planted.index.size, confirmedAt: Date.now() + 86_400_000 }));
    await upstream.kill();

    const answer = await manifest(own, 'team/app', 'v1');
    assert.equal(answer.status, 200);
    assert.equal(answer.headers['docker-content-digest'], genuine.index.digest, 'the node\'s own record, not the bucket\'s');
    assert.match(String(answer.headers.warning), /last confirmed \d+ s ago/);
    const newcomer = await node('node-3', { filesystem: { path: shared } }, { tagTTLSeconds: 0 });
    const refused = await manifest(newcomer, 'team/app', 'v1');
    assert.notEqual(refused.headers['docker-content-digest'], planted.index.digest);
    assert.ok(refused.status >= 500, `status ${refused.status}`);
  });

  describe('records too large to be records are refused before they are read: peak RSS stays put', () => {
    const RECORD_BYTES = 256 * MiB;
    const oversized = async (shared: SharedInput, put: (key: string) => Promise<void>) => {
      const image = small();
      await upstream.push(image, 'team/app', 'v1');
      const reader = await node('reader', shared);
      await put(sharedKeys.link('corp', 'team/app', image.index.digest));
      const before = peakRss();
      const answer = await manifest(reader, 'team/app', image.index.digest);
      const grown = peakRss() - before;
      assert.equal(answer.status, 200);
      assert.equal(sha(answer.body), image.index.digest);
      assert.ok(grown < 32 * MiB, `peak RSS grew by ${Math.round(grown / MiB)} MiB reading a ${RECORD_BYTES / MiB} MiB object at a link key`);
    };

    it('filesystem (a sparse file at a link key)', async () => {
      const shared = tempDir('shared-large');
      await oversized({ filesystem: { path: shared } }, async (key) => {
        plant(shared, key, '');
        truncateSync(join(shared, key), RECORD_BYTES);
      });
    });

    it('S3 API (versitygw)', async () => {
      const s3: S3Server = await startVersitygw();
      closing.push(() => s3.stop());
      const prefix = 'cluster-a/';
      const client = new S3Client({ region: 'us-east-1', endpoint: s3.endpoint, forcePathStyle: true, credentials: { accessKeyId: readFileSync(s3.accessKeyFile, 'utf8').trim(), secretAccessKey: readFileSync(s3.secretKeyFile, 'utf8').trim() } });
      closing.push(async () => client.destroy());
      // Uploaded from a sparse file, streamed: this process holds none of it.
      const sparse = join(tempDir('sparse'), 'object');
      writeFileSync(sparse, '');
      truncateSync(sparse, RECORD_BYTES);
      await oversized({ s3: { bucket: s3.bucket, endpoint: s3.endpoint, forcePathStyle: true, accessKeyFile: s3.accessKeyFile, secretKeyFile: s3.secretKeyFile, prefix } }, async (key) => {
        await client.send(new PutObjectCommand({ Bucket: s3.bucket, Key: prefix + key, Body: createReadStream(sparse), ContentLength: RECORD_BYTES }));
      });
    });
  });

  it('does not block on FIFOs at link keys: every thread of the file system stays free, a cache hit is answered', async () => {
    const image = small();
    await upstream.push(image, 'team/app', 'v1');
    const shared = tempDir('shared-fifo');
    const proxy = await node('node-1', { filesystem: { path: shared } });
    // Cached on the node first: the request below is a hit.
    assert.equal((await manifest(proxy, 'team/app', image.index.digest)).status, 200);
    await proxy.cache?.sharing();
    // As many FIFOs as Node has file-system threads (4), at links of digests the node does not hold.
    const digests = Array.from({ length: 4 }, () => sha(randomBytes(32)));
    const fifos = digests.map((digest) => join(shared, sharedKeys.link('corp', 'team/app', digest)));
    for (const fifo of fifos) {
      mkdirSync(dirname(fifo), { recursive: true });
      execFileSync('mkfifo', [fifo]);
    }
    // Whatever happens, the FIFOs are opened for writing and closed at the end: a reader blocked on
    // one (the bug) is let go, so that the suite can end.
    closing.push(async () => {
      for (const fifo of fifos) {
        try {
          closeSync(openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK));
        } catch {
          // no reader: nothing to release
        }
      }
    });
    try {
      const lookups = digests.map((digest) => manifest(proxy, 'team/app', digest));
      const answers = await settlesWithin(Promise.all(lookups), 30_000, 'manifests whose shared link is a FIFO');
      for (const answer of answers) assert.equal(answer.status, 404);
      const hit = await settlesWithin(manifest(proxy, 'team/app', image.index.digest), 30_000, 'a cache hit');
      assert.equal(hit.status, 200);
      assert.equal(sha(hit.body), image.index.digest);
    } finally {
      await closing.at(-1)?.();
    }
  });

  it('does not follow a symbolic link at a link or blob key to a file of the node', async () => {
    const image = small();
    await upstream.push(image, 'team/app', 'v1');
    await upstream.push(image, 'team/other', 'v1');
    const shared = tempDir('shared-symlink');
    const first = await node('node-1', { filesystem: { path: shared } });
    // The manifest in the tier, linked for team/other only.
    assert.equal((await manifest(first, 'team/other', image.index.digest)).status, 200);
    await first.cache?.sharing();
    // Files of the node, outside the shared directory, that the bucket's writer knows the paths of.
    const local = tempDir('node-local');
    writeFileSync(join(local, 'media-type'), 'text/x-node-local-secret');
    const secret = Buffer.alloc(image.layers[0]!.size, 'node-local-secret ');
    writeFileSync(join(local, 'layer'), secret);
    const linkKey = join(shared, sharedKeys.link('corp', 'team/app', image.index.digest));
    mkdirSync(dirname(linkKey), { recursive: true });
    symlinkSync(join(local, 'media-type'), linkKey);
    const layer = image.layers[0]!;
    const blobKey = join(shared, sharedKeys.blob(layer.digest));
    mkdirSync(dirname(blobKey), { recursive: true });
    symlinkSync(join(local, 'layer'), blobKey);
    plant(shared, sharedKeys.link('corp', 'team/app', layer.digest), '');

    const second = await node('node-2', { filesystem: { path: shared } });
    // Accepting anything, as a client may: the link's content would be taken as the media type.
    const got = await manifest(second, 'team/app', image.index.digest, `${ACCEPT}, */*`);
    assert.equal(got.status, 200);
    assert.equal(sha(got.body), image.index.digest);
    assert.notEqual(got.headers['content-type'], 'text/x-node-local-secret');
    assert.equal(got.headers['content-type'], image.index.mediaType);
    const bytes = await blob(second, 'team/app', layer.digest).catch((error: Error) => error);
    assert.ok(!(bytes instanceof Error), `the blob request failed: ${bytes instanceof Error ? bytes.message : ''}`);
    assert.equal((bytes as RawResponse).status, 200);
    assert.equal(sha((bytes as RawResponse).body), layer.digest);
    assert.equal(outcome(second, layer.digest), 'miss', 'from the upstream, not from the file the link points to');
  });

  it('does not hold a waiter past its bound when a writer renews another node\'s claim forever', async () => {
    const image = small();
    await upstream.push(image, 'team/app', 'v1');
    const shared = tempDir('shared-claim');
    // fillWaitSeconds 10 (the least allowed): the waiter's bound is 10 × 10 s from when it began
    // waiting, by a clock that runs ten times as fast here (the writer renews by the same clock, so
    // its claim stays fresh throughout): the bound is reached after 10 s.
    const began = Date.now();
    const fast = () => began + (Date.now() - began) * 10;
    const waiter = await node('node-1', { filesystem: { path: shared }, fillWaitSeconds: 10 }, {}, fast);
    const layer = image.layers[0]!;
    const claim = join(shared, sharedKeys.claim(layer.digest));
    mkdirSync(dirname(claim), { recursive: true });
    let renewing = true;
    // A node that claims the blob and never fills it, renewing its claim every 200 ms (2 s by the fast
    // clock; bounded: 2 min).
    const renewals = (async () => {
      for (let i = 0; renewing && i < 600; i++) {
        writeFileSync(`${claim}.tmp`, JSON.stringify({ node: 'elsewhere', at: fast() }));
        renameSync(`${claim}.tmp`, claim);
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
    })();
    closing.push(async () => {
      renewing = false;
      await renewals;
    });
    const got = await settlesWithin(blob(waiter, 'team/app', layer.digest), 60_000, 'a blob whose claim is renewed forever');
    assert.equal(got.status, 200);
    assert.equal(sha(got.body), layer.digest);
    assert.equal(outcome(waiter, layer.digest), 'miss', 'fetched from the upstream once the wait was over');
    assert.ok(waiter.logs.records.some((r) => r.msg === 'shared cache tier: another node\'s fill claim outlasted the wait for it; fetching from the upstream'));
  });

  it('purges the tier past a record it refuses to read, and says when the tier could not be purged', async () => {
    const image = small();
    await upstream.push(image, 'team/app', 'v1');
    const shared = tempDir('shared-purge');
    const proxy = await node('node-1', { filesystem: { path: shared } });
    assert.equal((await manifest(proxy, 'team/app', 'v1')).status, 200);
    await proxy.cache?.sharing();
    const tag = join(shared, sharedKeys.tag('corp', 'team/app', 'v1'));
    assert.ok(existsSync(tag), 'the tag is shared');
    // A writer of the bucket plants an object too large to be a record before it, in listing order.
    plant(shared, sharedKeys.tag('corp', 'team/app', 'a-planted'), Buffer.alloc(8192, 'x'));
    const purged = await proxy.cache!.purge('corp', 'team/app', image.index.digest);
    assert.equal(purged.shared, 'purged');
    assert.ok(!existsSync(tag), "the tag record naming the digest is gone from the tier");
    // A store that fails on the way (here the link to remove is a directory with a file in it: the
    // removal fails): purged on the node, and the answer says the tier failed.
    const link = join(shared, sharedKeys.link('corp', 'team/app', image.index.digest));
    rmSync(link, { force: true });
    mkdirSync(link, { recursive: true });
    writeFileSync(join(link, 'inside'), 'x');
    assert.equal((await proxy.cache!.purge('corp', 'team/app', image.index.digest)).shared, 'failed');
  });

  describe('records sealed with cache.shared.recordKeyFile', () => {
    const keyFile = (name: string, bytes: number) => {
      const file = join(tempDir(`record-key-${name}`), 'record-key');
      writeFileSync(file, `${randomBytes(bytes).toString('hex').slice(0, bytes)}\n`);
      return file;
    };

    it('believes what key holders wrote and nothing a writer without the key planted or moved', async () => {
      const genuine = small();
      const planted = small();
      await upstream.push(genuine, 'team/app', 'v1');
      await upstream.push(planted, 'team/app', 'other');
      const shared = tempDir('shared-sealed');
      const recordKeyFile = keyFile('cluster', 32);
      const writer = await node('node-1', { filesystem: { path: shared }, recordKeyFile }, { tagTTLSeconds: 0 });
      assert.equal((await manifest(writer, 'team/app', 'v1')).status, 200);
      assert.equal((await manifest(writer, 'team/app', 'other')).status, 200);
      await writer.cache?.sharing();
      const sealedTag = readFileSync(join(shared, sharedKeys.tag('corp', 'team/app', 'v1')));
      assert.match(sealedTag.toString(), /^pullbridge-record-v1 [0-9a-f]{64}\n\{/);
      // Planted: a record without a seal, one moved from another tag's key, one sealed with another key.
      const record = (image: TestImage) => JSON.stringify({ digest: image.index.digest, mediaType: image.index.mediaType, size: image.index.size, confirmedAt: Date.now() - 1000 });
      plant(shared, sharedKeys.tag('corp', 'team/app', 'unsealed'), record(planted));
      plant(shared, sharedKeys.tag('corp', 'team/app', 'moved'), sealedTag);
      const foreignKey = sharedKeys.tag('corp', 'team/app', 'foreign');
      plant(shared, foreignKey, sealRecord(randomBytes(32), foreignKey, Buffer.from(record(genuine))));
      await upstream.kill();

      const newcomer = await node('node-2', { filesystem: { path: shared }, recordKeyFile }, { tagTTLSeconds: 0 });
      const served = await manifest(newcomer, 'team/app', 'v1');
      assert.equal(served.status, 200, 'a record sealed by a key holder bridges the outage');
      assert.equal(served.headers['docker-content-digest'], genuine.index.digest);
      for (const tag of ['unsealed', 'moved', 'foreign']) {
        const answer = await manifest(newcomer, 'team/app', tag);
        assert.ok(answer.status >= 500, `${tag}: status ${answer.status}`);
      }
      assert.match(await newcomer.metrics.metrics(), /^pullbridge_cache_shared_requests_total\{operation="record-read",result="refused"\} [1-9]/m);
    });

    it('keeps the tier down, pulls going upstream, while the key file is missing or too short, and says which key', async () => {
      const image = small();
      await upstream.push(image, 'team/app', 'v1');
      const shared = tempDir('shared-nokey');
      const short = keyFile('short', 16);
      const proxy = await node('node-1', { filesystem: { path: shared }, recordKeyFile: short });
      const got = await manifest(proxy, 'team/app', 'v1');
      assert.equal(got.status, 200);
      await proxy.cache?.sharing(); // the tier is opened by the first write, after the client's answer
      const status = (proxy.cache?.status() as { shared: { up: boolean; failure?: string } }).shared;
      assert.deepEqual([status.up, status.failure], [false, 'denied']);
      const logged = proxy.logs.records.find((r) => r.msg === 'shared cache tier failing: pulls go to the upstream');
      assert.match(String(logged?.error), /cache\.shared\.recordKeyFile .*record-key holds 16 bytes; a record key needs at least 32/);
      assert.ok(!JSON.stringify(proxy.logs.records).includes(readFileSync(short, 'utf8').trim()), 'the key is never logged');
    });
  });
});
