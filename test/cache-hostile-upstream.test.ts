// What an upstream names a digest never becomes a path of its choosing: a digest header that is
// not a digest, or not the one asked for, is refused with 502, and nothing is indexed, linked,
// written or deleted for it, inside the cache or outside it. A real registry cannot send a lying
// Docker-Content-Digest, so the upstream here is scripted (on loopback).

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import type http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { listen, type RunningServer } from '../src/shell/serve.js';
import { rawRequest } from './support/http.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const sha256 = (data: Buffer) => `sha256:${createHash('sha256').update(data).digest('hex')}`;
const MANIFEST = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: {}, layers: [] }));
const OTHER_MANIFEST = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: {}, layers: [], annotations: { other: 'yes' } }));
/** Two blobs that do not both fit in maxBytes (room for one and its link, which counts as 4 KiB):
 * the second fill evicts the first. */
const MAX_BYTES = 12 * 1024;
const BLOBS = [randomBytes(5000), randomBytes(5000)];
const VICTIM_CONTENT = 'do not touch\n';
/** A digest whose bytes the upstream announces and never sends. */
const ANNOUNCED_DIGEST = `sha256:${'ab'.repeat(32)}`;
/** Climbs from <cache.path>/blobs/sha256 to the directory that holds cache.path. */
const TRAVERSAL = 'sha256:../../../victimdir/victim.txt';

/** Files under `dir` (recursively), relative to it. */
const filesUnder = (dir: string) =>
  readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => !e.isDirectory())
    .map((e) => join(e.parentPath, e.name).slice(dir.length + 1))
    .sort();

/** A registry that lies about digests in its headers; everything it is asked is recorded. */
async function startLyingUpstream(): Promise<{ server: RunningServer; seen: string[] }> {
  const seen: string[] = [];
  const server = await listen(
    (req: http.IncomingMessage, res: http.ServerResponse) => {
      const path = req.url ?? '';
      seen.push(`${req.method} ${path}`);
      if (path === '/v2/') return void res.writeHead(200).end('{}');
      // A tag whose HEAD names a "digest" that climbs out of the cache.
      if (path === '/v2/team/app/manifests/v1') return void res.writeHead(200, { 'content-type': OCI_MANIFEST, 'content-length': MANIFEST.length, 'docker-content-digest': TRAVERSAL }).end(req.method === 'HEAD' ? undefined : MANIFEST);
      // A manifest asked by digest whose HEAD names another (valid) digest.
      if (path === `/v2/team/app/manifests/${sha256(MANIFEST)}`) return void res.writeHead(200, { 'content-type': OCI_MANIFEST, 'content-length': MANIFEST.length, 'docker-content-digest': sha256(OTHER_MANIFEST) }).end(req.method === 'HEAD' ? undefined : MANIFEST);
      // Blobs: the right bytes under the right header (team/app), or under a header that is not a digest (team/liar).
      for (const blob of BLOBS) {
        if (path === `/v2/team/app/blobs/${sha256(blob)}`) return void res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': blob.length, 'docker-content-digest': sha256(blob) }).end(blob);
        if (path === `/v2/team/liar/blobs/${sha256(blob)}`) return void res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': blob.length, 'docker-content-digest': TRAVERSAL }).end(blob);
      }
      // A blob announced 1 KiB under 64 MiB (maxBytes below: room only with an eviction) of which 1 KiB is sent before the connection is cut.
      if (path === `/v2/team/app/blobs/${ANNOUNCED_DIGEST}`) {
        res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': 64 * 2 ** 20 - 1024, 'docker-content-digest': ANNOUNCED_DIGEST });
        res.write(Buffer.alloc(1024));
        setTimeout(() => res.destroy(), 50);
        return;
      }
      res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}');
    },
    { host: '127.0.0.1', port: 0 },
  );
  return { server, seen };
}

describe('the node cache under an upstream that lies about digests (scripted upstream)', function () {
  this.timeout(60_000);
  let upstream: Awaited<ReturnType<typeof startLyingUpstream>>;
  let proxy: ProxyUnderTest;
  let top: string;
  let root: string;
  let victim: string;
  const asShop = () => ({ authorization: proxy.authorization('shop') });

  beforeEach(async () => {
    upstream = await startLyingUpstream();
    // cache.path and, beside it, a file that belongs to someone else.
    top = mkdtempSync(join(tmpdir(), 'pullbridge-hostile-'));
    root = join(top, 'cache');
    mkdirSync(join(top, 'victimdir'));
    victim = join(top, 'victimdir', 'victim.txt');
    writeFileSync(victim, VICTIM_CONTENT);
    proxy = await startProxy({ cache: { path: root, maxBytes: MAX_BYTES }, registries: [{ name: 'hostile', match: ['h.example'], upstream: upstream.server.url }] });
  });
  afterEach(async () => {
    await proxy?.close();
    await upstream?.server.close(100);
  });

  /** The cache's /status document. */
  const status = async () => (JSON.parse((await rawRequest(proxy.url, '/status')).body.toString()) as { cache: { bytes: number; entries: number; evictions: number; shared: { up: boolean } | null } }).cache;
  /** Waits until no fill is in flight (its outcome, stored or discarded, is then on disk). */
  const fillsSettled = async () => {
    for (let i = 0; i < 500 && (proxy.cache!.flights.size > 0 || proxy.cache!.status().fillsInFlight !== 0); i++) await new Promise((r) => setTimeout(r, 20));
  };

  it('answers 502 for a manifest HEAD naming a digest that climbs out of cache.path, and no eviction then touches what is outside', async () => {
    for (const method of ['HEAD', 'GET']) {
      const res = await rawRequest(proxy.url, '/v2/hostile/team/app/manifests/v1', { method, headers: { ...asShop(), accept: OCI_MANIFEST } });
      assert.equal(res.status, 502, `${method} by tag: ${res.body.toString()}`);
    }
    assert.deepEqual(await status().then((s) => [s.entries, s.bytes]), [0, 0], 'nothing indexed');

    // Two fills that do not both fit: the second evicts.
    for (const blob of BLOBS) {
      const res = await rawRequest(proxy.url, `/v2/hostile/team/app/blobs/${sha256(blob)}`, { headers: asShop() });
      assert.equal(res.status, 200);
      assert.ok(res.body.equals(blob));
      await fillsSettled();
    }
    const after = await status();
    assert.ok(after.evictions >= 1, `an eviction ran: ${JSON.stringify(after)}`);
    assert.equal(readFileSync(victim, 'utf8'), VICTIM_CONTENT, 'the file outside cache.path is still there, unchanged');
    assert.deepEqual(filesUnder(top).filter((f) => !f.startsWith('cache/')), ['victimdir/victim.txt'], 'nothing written outside cache.path');
    assert.deepEqual(filesUnder(join(root, 'blobs')), [`sha256/${sha256(BLOBS[1]!).slice('sha256:'.length)}`], 'only the blob that fits');
    assert.deepEqual([after.entries, after.bytes], [1, BLOBS[1]!.length], '/status counts only what is in blobs/');
    assert.deepEqual(filesUnder(join(root, 'repositories')).filter((f) => f.includes('victim') || f.includes('_tags')), [], 'no link or tag record for the lie');
    assert.equal(statSync(victim).size, VICTIM_CONTENT.length);
  });

  it('evicts nothing for a length the upstream announces and does not send: what is cached stays', async () => {
    await proxy.close();
    proxy = await startProxy({ cache: { path: root, maxBytes: '64Mi', minFreeBytes: 0 }, registries: [{ name: 'hostile', match: ['h.example'], upstream: upstream.server.url }] });
    const kept = BLOBS[0]!;
    const res = await rawRequest(proxy.url, `/v2/hostile/team/app/blobs/${sha256(kept)}`, { headers: asShop() });
    assert.ok(res.body.equals(kept));
    await fillsSettled();
    const cut = await rawRequest(proxy.url, `/v2/hostile/team/app/blobs/${ANNOUNCED_DIGEST}`, { headers: asShop() }).catch(() => undefined);
    assert.ok(cut === undefined || cut.body.length < 64 * 2 ** 20 - 1024, 'the cut blob is not served whole');
    await fillsSettled();
    const after = await status();
    assert.equal(after.evictions, 0, JSON.stringify(after));
    assert.deepEqual(filesUnder(join(root, 'blobs')), [`sha256/${sha256(kept).slice('sha256:'.length)}`], 'the blob cached before is still there');
  });

  it('with a filesystem shared tier: answers 502 as well, writes nothing there for the lie, and the tier stays up', async () => {
    const sharedDir = join(top, 'shared');
    mkdirSync(sharedDir);
    await proxy.close();
    proxy = await startProxy({ cache: { path: root, maxBytes: MAX_BYTES, shared: { filesystem: { path: sharedDir }, fillWaitSeconds: 10 } }, registries: [{ name: 'hostile', match: ['h.example'], upstream: upstream.server.url }] });
    const res = await rawRequest(proxy.url, '/v2/hostile/team/app/manifests/v1', { headers: { ...asShop(), accept: OCI_MANIFEST } });
    assert.equal(res.status, 502, res.body.toString());
    await proxy.cache!.sharing();
    const after = await status();
    assert.equal(after.shared?.up, true, JSON.stringify(after));
    assert.deepEqual(filesUnder(sharedDir).filter((f) => !f.startsWith('tmp/')), [], 'nothing shared for the lie');
    assert.equal(readFileSync(victim, 'utf8'), VICTIM_CONTENT);
  });

  it('answers 502 for a manifest by digest whose HEAD names another digest, and for a blob whose digest header is not a digest', async () => {
    const head = await rawRequest(proxy.url, `/v2/hostile/team/app/manifests/${sha256(MANIFEST)}`, { method: 'HEAD', headers: { ...asShop(), accept: OCI_MANIFEST } });
    assert.equal(head.status, 502);
    const blob = await rawRequest(proxy.url, `/v2/hostile/team/liar/blobs/${sha256(BLOBS[0]!)}`, { headers: asShop() });
    assert.equal(blob.status, 502);
    await fillsSettled();
    assert.deepEqual(filesUnder(join(root, 'blobs')), [], 'nothing stored');
    assert.equal((await status()).entries, 0);
    assert.equal(readFileSync(victim, 'utf8'), VICTIM_CONTENT);
  });
});
