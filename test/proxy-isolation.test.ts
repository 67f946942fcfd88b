// Tenant isolation and hostile neighbours at the proxy, against real registries: a rule's repository
// filter holds for every auth mode; the rule's credentials go only to token realms it trusts;
// client-chosen names cannot grow the proxy's memory. (Hostile upstream answers — redirects into
// the node, partial bodies — are in proxy-faults.test.ts.)

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import http from 'node:http';
import { readFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { listen, type RunningServer } from '../src/shell/serve.js';
import { startCli } from './support/cli.js';
import { leavingRequest, rawRequest, mostAtOnce, slowUpstream, type RawResponse } from './support/http.js';
import { buildImage, type TestImage } from './support/oci.js';
import { freePort } from './support/procs.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const [USER, PASSWORD] = Object.entries(DEFAULT_USERS)[0] as [string, string];
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const errorOf = (r: RawResponse): { code?: string; message?: string } => (JSON.parse(r.body.toString()) as { errors: Array<{ code: string; message: string }> }).errors[0] ?? {};

describe('proxy isolation against real registries', function () {
  this.timeout(120_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-isolation-'));
  const passwordFile = join(dir, 'password');
  let basic: RegistryHandle;
  let token: RegistryHandle;
  let image: TestImage;
  let proxy: ProxyUnderTest;

  before(async () => {
    writeFileSync(passwordFile, PASSWORD);
    [basic, token] = await Promise.all([startRegistry({ auth: 'basic' }), startRegistry({ auth: 'token' })]);
    image = buildImage();
    await Promise.all([basic.push(image, 'team/app', '1'), basic.push(image, 'secret/db', '1'), basic.push(image, 'team/internal', '1'), token.push(image, 'team/app', '1'), token.push(image, 'team/fresh', '1')]);
    const credentials = { username: USER, passwordFile };
    proxy = await startProxy({
      registries: [
        { name: 'corp', match: ['corp.example'], upstream: basic.url, credentials, repositories: { include: ['team/*'], exclude: ['team/internal'] } },
        { name: 'public', match: ['public.example'], upstream: basic.url, credentials, auth: { mode: 'anonymous' }, repositories: { include: ['team/app'] } },
        // The token issuer listens on another port of the registry's host: not trusted unless listed.
        { name: 'tok', match: ['tok.example'], upstream: token.url, credentials },
        { name: 'toklisted', match: ['tl.example'], upstream: token.url, credentials, auth: { tokenRealms: [new URL(token.issuer!.realm).origin] } },
      ],
    });
  });
  after(async () => {
    await proxy?.close();
    await basic?.stop();
    await token?.stop();
  });

  const get = (path: string, headers: Record<string, string> = {}) => rawRequest(proxy.url, path, { headers: { accept: OCI_INDEX, ...headers } });
  const asShop = () => ({ authorization: proxy.authorization('shop') });

  describe("a rule's repository filter, at the proxy", () => {
    it('serves an included repository to a namespace credential', async () => {
      assert.equal((await get('/v2/corp/team/app/manifests/1', asShop())).status, 200);
    });

    it('refuses a repository outside the include list with 403 DENIED, for manifests, blobs and tags alike', async () => {
      for (const path of ['/v2/corp/secret/db/manifests/1', `/v2/corp/secret/db/blobs/${image.layers[0]?.digest}`, '/v2/corp/secret/db/tags/list']) {
        const res = await get(path, asShop());
        assert.equal(res.status, 403, path);
        assert.equal(errorOf(res).code, 'DENIED');
        assert.match(errorOf(res).message ?? '', /repository "secret\/db" is not included in rule "corp"/);
      }
    });

    it('refuses an excluded repository even when the include list matches it', async () => {
      const res = await get('/v2/corp/team/internal/manifests/1', asShop());
      assert.equal(res.status, 403);
      assert.match(errorOf(res).message ?? '', /excluded from rule "corp"/);
    });

    it('holds on an anonymous rule with credentials: only the listed repository, no credential needed for it', async () => {
      assert.equal((await get('/v2/public/team/app/manifests/1')).status, 200);
      const other = await get('/v2/public/secret/db/manifests/1');
      assert.equal(other.status, 403);
      assert.equal(errorOf(other).code, 'DENIED');
    });

    it('logs the refusal with the namespace and repository', () => {
      const record = proxy.logs.records.find((r) => r.access === 'pull' && r.repository === 'secret/db' && r.rule === 'corp');
      assert.equal(record?.status, 403);
      assert.equal(record?.namespace, 'shop');
    });
  });

  describe('token realms', () => {
    it('never asks a realm the rule does not list on the node itself: no credentials, no request at all', async () => {
      // The issuer is on another port of the upstream's host, here loopback: as a hostile upstream
      // could name 127.0.0.1:10255 or 169.254.169.254 to make the proxy fetch them.
      const issuer = token.issuer!;
      const seen = issuer.requests.length;
      const res = await get('/v2/tok/team/app/manifests/1', asShop());
      assert.equal(res.status, 502);
      assert.match(errorOf(res).message ?? '', /token realm http:\/\/127\.0\.0\.1:\d+ refused: 127\.0\.0\.1 is a loopback, link-local or reserved address \(not listed in auth\.tokenRealms\)/);
      assert.deepEqual(issuer.requests.slice(seen), [], 'the realm was never contacted');
    });

    it('sends them to a realm the rule lists in auth.tokenRealms', async () => {
      const issuer = token.issuer!;
      const seen = issuer.requests.length;
      assert.equal((await get('/v2/toklisted/team/app/manifests/1', asShop())).status, 200);
      assert.deepEqual(issuer.requests.slice(seen).map((r) => r.user), [USER]);
    });

    it('keeps only tokens the upstream honoured: unknown repositories leave nothing cached', async () => {
      const authorizer = proxy.runtime.rules.get('toklisted')!.client.authorizer;
      const before = authorizer.cachedTokens;
      for (let i = 0; i < 20; i++) assert.equal((await get(`/v2/toklisted/nothing/here-${i}/manifests/1`, asShop())).status, 404);
      assert.equal(authorizer.cachedTokens, before, 'no token cached for a name the upstream does not serve');
      assert.equal((await get('/v2/toklisted/team/fresh/manifests/1', asShop())).status, 200);
      assert.equal(authorizer.cachedTokens, before + 1, 'a token the upstream honoured is kept');
    });
  });

  describe('client-chosen names', () => {
    it('refuses a repository name over 255 characters with 400 NAME_INVALID, before any upstream request', async () => {
      const issuer = token.issuer!;
      const seen = issuer.requests.length;
      const long = `team/${'a'.repeat(250)}`;
      const res = await get(`/v2/toklisted/${long}/manifests/1`, asShop());
      assert.equal(res.status, 400);
      assert.equal(errorOf(res).code, 'NAME_INVALID');
      assert.equal(issuer.requests.length, seen, 'no token was asked for');
      // At the limit it is a name like any other (the upstream says it does not know it).
      const atLimit = `team/${'a'.repeat(255 - 'toklisted/team/'.length)}`;
      assert.equal((await get(`/v2/toklisted/${atLimit}/manifests/1`, asShop())).status, 404);
    });
  });
});

const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
/** A valid manifest made large by an annotation. */
const paddedManifest = (padding: number) => Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: {}, layers: [], annotations: { padding: 'p'.repeat(padding) } }));

/** VmRSS of a process, in bytes, read from outside it. */
function rssOf(pid: number): number {
  const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(match?.[1] ?? 0) * 1024;
}

describe('proxy memory under hostile names (the pullbridge proxy process)', function () {
  this.timeout(180_000);

  it('stays flat while a client sends thousands of requests with long unique names', async () => {
    const registry = await startRegistry({ auth: 'token' });
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-names-'));
    writeFileSync(join(dir, 'password'), PASSWORD);
    writeFileSync(join(dir, 'broker.key'), 'k'.repeat(64));
    const port = await freePort();
    writeFileSync(
      join(dir, 'config.json'),
      JSON.stringify({
        broker: { keyFiles: [join(dir, 'broker.key')] },
        registries: [{ name: 'corp', match: ['corp.example'], upstream: registry.url, credentials: { username: USER, passwordFile: join(dir, 'password') }, auth: { tokenRealms: [new URL(registry.issuer!.realm).origin] } }],
      }),
    );
    const proc = await startCli(['proxy', '--config', join(dir, 'config.json'), '--port', String(port), '--host', '127.0.0.1'], /listening/);
    const pid = proc.child.pid ?? 0;
    try {
      const url = `http://127.0.0.1:${port}`;
      const { namespaceToken } = await import('../src/rules/credentials.js');
      const authorization = `Basic ${Buffer.from(`shop:${namespaceToken(Buffer.from('k'.repeat(64)), 'shop')}`).toString('base64')}`;
      const send = async (from: number, count: number, length: number) => {
        for (let i = from; i < from + count; i += 8) {
          await Promise.all(
            Array.from({ length: 8 }, (_, j) => rawRequest(url, `/v2/corp/team/${`${i + j}-`.padEnd(length, 'x')}/manifests/1`, { headers: { authorization } })),
          );
        }
      };
      // Warm up (JIT, pools, the heap's working size) with the same work, then measure what two
      // more batches add: a cache keyed by names grows with every batch (~45 MiB each), bounded
      // state does not. One batch alone can grow by GC timing (a heap not yet collected: seen at
      // 25 MiB once, on Node 26 in a loaded suite); it does not grow in both.
      const batch = (from: number) => send(from, 2400, 8000).then(() => send(from + 2400, 1600, 240));
      await send(0, 400, 240);
      await batch(400);
      const growth: number[] = [];
      for (const from of [4400, 8400]) {
        const before = rssOf(pid);
        await batch(from);
        growth.push(rssOf(pid) - before);
      }
      const mib = growth.map((g) => `${(g / 1048576).toFixed(1)} MiB`).join(', then ');
      assert.ok(Math.min(...growth) < 20 * 1024 * 1024, `RSS grew by ${mib} over two more batches of 4000 requests with unique names`);
      assert.equal((await rawRequest(url, '/healthz')).status, 200);
    } finally {
      proc.child.kill('SIGTERM');
      await registry.stop();
    }
  });
});

describe('proxy memory under many buffered manifests at once (the pullbridge proxy process)', function () {
  this.timeout(180_000);

  it('bounds the memory held by manifests being buffered: 60 requests for a 3.5 MiB manifest from a slow registry', async () => {
    // A registry that takes about two seconds to send each manifest (docker-registry cannot be made
    // slow), so that all 60 are held by the proxy at the same time.
    const manifest = paddedManifest(3.5 * 1024 * 1024);
    const whole: Array<{ from: number; to: number }> = [];
    const slow = await slowUpstream(manifest, { chunkBytes: 256 * 1024, intervalMs: 150, announceLength: true, contentType: OCI_MANIFEST, whole });
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-buffered-'));
    const port = await freePort();
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ registries: [{ name: 'corp', match: ['corp.example'], upstream: slow.url, auth: { mode: 'anonymous' } }] }));
    const proc = await startCli(['proxy', '--config', join(dir, 'config.json'), '--port', String(port), '--host', '127.0.0.1'], /listening/);
    const pid = proc.child.pid ?? 0;
    try {
      const url = `http://127.0.0.1:${port}`;
      assert.equal((await rawRequest(url, '/v2/corp/team/big/manifests/1')).status, 200, 'a manifest on its own is served');
      const baseline = rssOf(pid);
      let peak = baseline;
      const sampler = setInterval(() => (peak = Math.max(peak, rssOf(pid))), 50);
      // Three "Pods" (source addresses), twenty requests each, all at once.
      const statuses = await Promise.all(
        Array.from({ length: 60 }, (_, i) => rawRequest(url, '/v2/corp/team/big/manifests/1', { localAddress: `127.0.2.${(i % 3) + 1}` }).then((r) => r.status)),
      );
      clearInterval(sampler);
      const grown = peak - baseline;
      // 16 MiB per client: at most 4 of these per source at once; the others are told to come back.
      // Counted at the registry, as manifests sent whole at the same moment (a fetch refused for
      // the budget is cut at its start): a request that reaches the proxy after the first ones were
      // served (a loaded machine) is rightly served too, and is not "at once".
      const atOnce = mostAtOnce(whole);
      assert.ok(atOnce >= 3 && atOnce <= 12, `${atOnce} manifests fetched whole at once: ${statuses.join(',')}`);
      assert.ok(statuses.filter((s) => s === 200).length >= 3, statuses.join(','));
      assert.ok(statuses.every((s) => s === 200 || s === 429), statuses.join(','));
      // (Without the budget: +288 MiB.)
      assert.ok(grown < 150 * 1024 * 1024, `peak RSS grew by ${(grown / 1048576).toFixed(1)} MiB with 60 manifests of 3.5 MiB asked at once`);
      assert.equal((await rawRequest(url, '/v2/corp/team/big/manifests/1')).status, 200, 'served again afterwards');
    } finally {
      proc.child.kill('SIGTERM');
      await slow.close(0);
    }
  });
});

describe('buffered bodies of unknown length', function () {
  this.timeout(60_000);

  it('are accounted as they grow: one client cannot hold more than its share with chunked manifests', async () => {
    // 3 MiB manifests sent chunked (no Content-Length) and slowly, so that all ten overlap.
    const manifest = paddedManifest(3 * 1024 * 1024);
    const chunked = await slowUpstream(manifest, { chunkBytes: 256 * 1024, intervalMs: 100, announceLength: false, contentType: OCI_MANIFEST });
    const proxy = await startProxy({ registries: [{ name: 'corp', match: ['corp.example'], upstream: chunked.url, auth: { mode: 'anonymous' } }] });
    try {
      const statuses = await Promise.all(Array.from({ length: 10 }, () => rawRequest(proxy.url, '/v2/corp/team/big/manifests/1', { localAddress: '127.0.7.1' }).then((r) => r.status)));
      // 16 MiB per client: at most five 3 MiB manifests at once.
      const served = statuses.filter((s) => s === 200).length;
      assert.ok(served >= 1 && served <= 5, `${served} served: ${statuses.join(',')}`);
      assert.ok(statuses.every((s) => s === 200 || s === 429), statuses.join(','));
    } finally {
      await proxy.close();
      await chunked.close(0);
    }
  });
});

describe('buffered manifests fetched once for many clients (node cache)', function () {
  this.timeout(120_000);
  const MiB = 1024 * 1024;

  /**
   * A registry whose manifest answers wait until `open()`: docker-registry cannot be made to hold an
   * answer until its clients have left. A GET of a manifest by digest gets that manifest (with its
   * Content-Length) once open; with `sentBeforeOpen`, that many of its bytes come at once.
   */
  async function heldUpstream(manifests: ReadonlyMap<string, Buffer>, sentBeforeOpen = 0) {
    const held: Array<() => void> = [];
    let open = false;
    const seen = { asked: 0, answered: 0 };
    const server = await listen(
      (req, res) => {
        const digest = /\/manifests\/(sha256:[0-9a-f]{64})$/.exec(req.url ?? '')?.[1];
        const body = digest === undefined ? undefined : manifests.get(digest);
        if (!body || req.method !== 'GET') return void res.writeHead(req.url === '/v2/' ? 200 : 404, { 'content-type': 'application/json' }).end('{}');
        seen.asked++;
        const headers = () => res.writeHead(200, { 'content-type': OCI_MANIFEST, 'content-length': body.length, 'docker-content-digest': digest ?? '' });
        const rest = (from: number) => () => res.end(body.subarray(from), () => seen.answered++);
        if (open) return void (headers(), rest(0)());
        if (sentBeforeOpen === 0) return void held.push(() => (headers(), rest(0)()));
        headers().write(body.subarray(0, sentBeforeOpen));
        held.push(rest(sentBeforeOpen));
      },
      { host: '127.0.0.1', port: 0 },
    );
    return {
      server,
      seen,
      open() {
        open = true;
        for (const answer of held.splice(0)) answer();
      },
    };
  }

  /** Polls `done` every 20 ms, up to 1500 times (the tests' own timeout bounds it anyway). */
  async function until(done: () => boolean | Promise<boolean>, what: string): Promise<void> {
    for (let i = 0; i < 1500; i++) {
      if (await done()) return;
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.fail(`never: ${what}`);
  }

  /** The value of a sample on the proxy's /metrics (registry port), summed over the samples whose labels include every one of `labels`. */
  async function metricOf(p: ProxyUnderTest, name: string, labels: string[] = []): Promise<number | undefined> {
    const text = (await rawRequest(p.url, '/metrics')).body.toString();
    const samples = text.split('\n').filter((line) => (line.startsWith(`${name} `) || line.startsWith(`${name}{`)) && labels.every((l) => line.includes(l)));
    return samples.length === 0 ? undefined : samples.reduce((sum, line) => sum + Number(line.slice(line.lastIndexOf(' ') + 1)), 0);
  }

  it('gives back the memory of fetches their clients left: the held budget returns to 0 and the same addresses are served', async () => {
    // Ten 3.5 MiB manifests, each asked by two of five "Pods" (source addresses) that leave while the
    // upstream holds its answer; the first asker's request starts the one fetch, the second waits for it.
    const sources = ['127.0.0.2', '127.0.0.3', '127.0.0.4', '127.0.0.5', '127.0.0.6'];
    const manifests = new Map(Array.from({ length: 11 }, (_, i) => paddedManifest(3.5 * MiB + i)).map((body) => [`sha256:${createHash('sha256').update(body).digest('hex')}`, body]));
    const [left, fresh] = [[...manifests.keys()].slice(0, 10), [...manifests.keys()][10]!];
    const upstream = await heldUpstream(manifests);
    const cachePath = mkdtempSync(join(tmpdir(), 'pullbridge-cache-'));
    const p = await startProxy({ cache: { path: cachePath }, registries: [{ name: 'corp', match: ['corp.example'], upstream: upstream.server.url, auth: { mode: 'anonymous' } }] });
    try {
      const clients = left.flatMap((digest, i) => [sources[i % 5]!, sources[(i + 1) % 5]!].map((source) => leavingRequest(p.url, `/v2/corp/team/app/manifests/${digest}`, { localAddress: source })));
      await Promise.all(clients.map((c) => c.sent));
      await until(() => upstream.seen.asked === left.length, 'the upstream is asked for every manifest');
      for (const client of clients) client.leave();
      await until(async () => (await metricOf(p, 'pullbridge_proxy_requests_total', ['kind="manifest"', 'status="0"'])) === clients.length, 'the proxy saw every client leave');
      upstream.open();
      await until(() => upstream.seen.answered === left.length && p.cache!.manifestFlights.size === 0, 'every fetch is over');

      assert.equal(await metricOf(p, 'pullbridge_buffered_bytes'), 0, 'no memory is held for clients that left');
      // A "Pod" that left nothing behind is served, and so is each address again: a manifest stored by a
      // fetch its client left, and one not seen before.
      for (const source of ['127.0.0.7', ...sources]) {
        for (const digest of [left[0]!, fresh]) {
          const res = await rawRequest(p.url, `/v2/corp/team/app/manifests/${digest}`, { localAddress: source });
          assert.equal(res.status, 200, `${source} asking ${digest}: ${res.status} ${res.body.toString().slice(0, 200)}`);
          assert.ok(res.body.equals(manifests.get(digest)!), 'the manifest asked for');
        }
      }
      assert.equal(upstream.seen.asked, left.length + 1, 'the stored manifest is served from the store, the new one fetched once');
      assert.equal(await metricOf(p, 'pullbridge_buffered_bytes'), 0, 'nothing held once the clients have their answers');
    } finally {
      await p.close();
      await upstream.server.close(0);
      rmSync(cachePath, { recursive: true, force: true });
    }
  });

  it('serves a client waiting for a fetch that the client who started it left mid-body', async () => {
    const manifest = paddedManifest(3.5 * MiB);
    const digest = `sha256:${createHash('sha256').update(manifest).digest('hex')}`;
    const upstream = await heldUpstream(new Map([[digest, manifest]]), MiB);
    const cachePath = mkdtempSync(join(tmpdir(), 'pullbridge-cache-'));
    const p = await startProxy({ cache: { path: cachePath }, registries: [{ name: 'corp', match: ['corp.example'], upstream: upstream.server.url, auth: { mode: 'anonymous' } }] });
    try {
      const path = `/v2/corp/team/app/manifests/${digest}`;
      const starter = leavingRequest(p.url, path, { localAddress: '127.0.0.2' });
      await starter.sent;
      await until(() => upstream.seen.asked === 1, 'the upstream is asked, and has sent a part');
      const waiter = rawRequest(p.url, path, { localAddress: '127.0.0.3' });
      starter.leave();
      await until(async () => (await metricOf(p, 'pullbridge_proxy_requests_total', ['kind="manifest"', 'status="0"'])) === 1, 'the proxy saw the starter leave');
      upstream.open();
      const res = await waiter;
      assert.equal(res.status, 200, `${res.status} ${res.body.toString().slice(0, 200)}`);
      assert.ok(res.body.equals(manifest));
      assert.equal(upstream.seen.asked, 1, 'one fetch for both clients');
      assert.equal(await metricOf(p, 'pullbridge_buffered_bytes'), 0);
    } finally {
      await p.close();
      await upstream.server.close(0);
      rmSync(cachePath, { recursive: true, force: true });
    }
  });
});

describe('slow readers and the upstream connection pool', function () {
  this.timeout(120_000);
  let registry: RegistryHandle;
  let image: TestImage;

  before(async () => {
    registry = await startRegistry({ auth: 'none' });
    image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [48 * 1024 * 1024] });
    await registry.push(image, 'team/big', '1');
  });
  after(async () => registry?.stop());

  interface StalledReader {
    readonly status: number;
    /** Reads on to the end: how many bytes arrived, and whether the body was complete. */
    resume(): Promise<{ bytes: number; complete: boolean }>;
    destroy(): void;
  }

  /** Starts a blob download from a source address and stops reading after the first bytes. */
  function stalledReader(url: string, digest: string, source: string): Promise<StalledReader> {
    const u = new URL(url);
    return new Promise((resolve, reject) => {
      const req = http.get({ host: u.hostname, port: u.port, path: `/v2/corp/team/big/blobs/${digest}`, localAddress: source, agent: false }, (res) => {
        let bytes = 0;
        res.on('data', (c: Buffer) => (bytes += c.length));
        res.once('data', () => res.pause());
        const ended = new Promise<{ bytes: number; complete: boolean }>((done) => {
          res.once('end', () => done({ bytes, complete: res.complete }));
          res.once('error', () => done({ bytes, complete: false }));
          res.once('aborted', () => done({ bytes, complete: false }));
        });
        resolve({ status: res.statusCode ?? 0, resume: () => (res.resume(), ended), destroy: () => req.destroy() });
      });
      req.on('error', (error: NodeJS.ErrnoException) => (error.code === 'ECONNRESET' ? undefined : reject(error)));
    });
  }
  const blobRecords = (proxy: ProxyUnderTest) => proxy.logs.records.filter((r) => r.access === 'pull' && r.kind === 'blob');

  it('answers manifests while every blob connection of the rule is held by readers that stopped', async () => {
    const proxy = await startProxy({ registries: [{ name: 'corp', match: ['corp.example'], upstream: registry.url, auth: { mode: 'anonymous' } }] });
    const layer = image.layers[0]!.digest;
    // As many stalled readers as the rule has blob connections (64), each a Pod of its own.
    const readers = await Promise.all(Array.from({ length: 64 }, (_, i) => stalledReader(proxy.url, layer, `127.0.4.${i + 1}`)));
    try {
      assert.deepEqual([...new Set(readers.map((r) => r.status))], [200]);
      const manifest = await rawRequest(proxy.url, `/v2/corp/team/big/manifests/${image.manifests[0]!.digest}`, { headers: { accept: image.manifests[0]!.mediaType } });
      assert.equal(manifest.status, 200);
      // A blob's access record is written when its response ends: none has.
      assert.deepEqual(blobRecords(proxy), [], 'the manifest was answered while all 64 blob streams still held their connections');
    } finally {
      for (const r of readers) r.destroy();
      await proxy.close();
    }
  });

  it('limits the blob downloads one client holds at once (429), leaving the others served', async () => {
    const proxy = await startProxy({ registries: [{ name: 'corp', match: ['corp.example'], upstream: registry.url, auth: { mode: 'anonymous' } }] }, {}, {}, { blobStreamsPerClient: 4 });
    const layer = image.layers[0]!.digest;
    const readers = await Promise.all(Array.from({ length: 6 }, () => stalledReader(proxy.url, layer, '127.0.5.1')));
    try {
      assert.deepEqual(readers.map((r) => r.status).sort(), [200, 200, 200, 200, 429, 429]);
      const other = await stalledReader(proxy.url, layer, '127.0.5.2');
      assert.equal(other.status, 200, 'another client is served');
      other.destroy();
    } finally {
      for (const r of readers) r.destroy();
      await proxy.close();
    }
  });

  it('cuts a reader that holds a stream up below the minimum rate, freeing its upstream connection', async () => {
    const proxy = await startProxy({ registries: [{ name: 'corp', match: ['corp.example'], upstream: registry.url, auth: { mode: 'anonymous' } }] }, {}, {}, { minimumClientRate: { bytesPerSecond: 256 * 1024, windowMs: 1000 } });
    try {
      const reader = await stalledReader(proxy.url, image.layers[0]!.digest, '127.0.6.1');
      assert.equal(reader.status, 200);
      // The proxy cuts it within a few windows (mocha's timeout bounds the wait).
      while (blobRecords(proxy).length === 0) await new Promise((r) => setTimeout(r, 200));
      const record = blobRecords(proxy)[0];
      assert.match(String(record?.error), /below the minimum of 262144 bytes\/s/);
      assert.equal(record?.status, 0, 'logged as cut');
      const rest = await reader.resume();
      assert.equal(rest.complete, false, 'the client sees a cut body, never a complete one');
      assert.ok(rest.bytes < image.layers[0]!.size);
      // A reader that keeps up is never cut, however long the body.
      const whole = await rawRequest(proxy.url, `/v2/corp/team/big/blobs/${image.layers[0]!.digest}`);
      assert.equal(whole.status, 200);
      assert.equal(whole.body.length, image.layers[0]!.size);
    } finally {
      await proxy.close();
    }
  });

  it('never cuts a reader that keeps up with an upstream slower than the minimum rate', async () => {
    // 128 KiB every 400 ms (~320 KiB/s) against a minimum of 1 MiB/s: the upstream is the slow one.
    const blob = randomBytes(10 * 128 * 1024);
    const digest = `sha256:${createHash('sha256').update(blob).digest('hex')}`;
    const trickle = await slowUpstream(blob, { chunkBytes: 128 * 1024, intervalMs: 400, announceLength: true, contentType: 'application/octet-stream' });
    const proxy = await startProxy({ registries: [{ name: 'corp', match: ['corp.example'], upstream: trickle.url, auth: { mode: 'anonymous' } }] }, {}, {}, { minimumClientRate: { bytesPerSecond: 1024 * 1024, windowMs: 1000 } });
    try {
      const res = await rawRequest(proxy.url, `/v2/corp/team/slow/blobs/${digest}`);
      assert.equal(res.status, 200);
      assert.equal(res.body.length, blob.length, 'the whole body');
      assert.equal(blobRecords(proxy)[0]?.error, undefined);
    } finally {
      await proxy.close();
      await trickle.close(0);
    }
  });
});

describe('a token realm that goes away (scripted registry: a real one cannot change its auth live)', function () {
  this.timeout(60_000);

  it('is forgotten and learned again when the registry stops asking for tokens', async () => {
    let requireTokens = true;
    const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config: {}, layers: [] }));
    const tokens: RunningServer = await listen((_req, res) => void res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token: 't0k', expires_in: 300 })), { host: '127.0.0.1', port: 0 });
    const registry: RunningServer = await listen(
      (req, res) => {
        if (requireTokens && req.headers.authorization !== 'Bearer t0k') {
          return void res.writeHead(401, { 'www-authenticate': `Bearer realm="${tokens.url}/token",service="scripted"` }).end();
        }
        if (req.url?.includes('/manifests/')) return void res.writeHead(200, { 'content-type': 'application/vnd.oci.image.manifest.v1+json', 'content-length': manifest.length }).end(manifest);
        res.writeHead(404).end();
      },
      { host: '127.0.0.1', port: 0 },
    );
    // The realm is on loopback here, so the rule lists it (an unlisted one there is never asked).
    const proxy = await startProxy({ registries: [{ name: 'moving', match: ['moving.example'], upstream: registry.url, auth: { mode: 'anonymous', tokenRealms: [tokens.url] } }] });
    try {
      assert.equal((await rawRequest(proxy.url, '/v2/moving/team/a/manifests/1')).status, 200, 'served with a token');
      // The registry drops token auth and its realm goes away.
      await tokens.close(0);
      requireTokens = false;
      const after = await rawRequest(proxy.url, '/v2/moving/team/b/manifests/1');
      assert.equal(after.status, 200, `a new scope is served without the dead realm: ${after.body.toString()}`);
    } finally {
      await proxy.close();
      await registry.close(0);
    }
  });
});
