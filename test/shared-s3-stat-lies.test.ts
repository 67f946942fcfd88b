// A node taking a blob from an S3 tier whose stated size (HEAD) disagrees with the object, or
// following a fill whose claim announces a size the blob does not have: the size is the fill's
// Content-Length, so a size the upstream contradicts must send the pull to the upstream, not cut
// the client at its end or fail it before an answer. Real proxies in-process and versitygw, behind
// a scripted front that rewrites the HEAD answers of blob keys and the claims' sizes.

import assert from 'node:assert/strict';
import http from 'node:http';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSharedStore } from '../src/cache/shared/open.js';
import { sharedKeys } from '../src/cache/shared/tier.js';
import type { SharedConfig } from '../src/rules/config.js';
import { startVersitygw, type S3Server } from './support/objectstores.js';
import { getAsShop, startProxy, type ProxyUnderTest } from './support/proxy.js';

const sha = (bytes: Buffer) => `sha256:${createHash('sha256').update(bytes).digest('hex')}`;

describe('a node reading a shared blob whose stated size lies (versitygw behind a rewriting front)', function () {
  this.timeout(120_000);
  const blob = randomBytes(3 * 1024 * 1024 + 17);
  const digest = sha(blob);
  let s3: S3Server;
  const servers: http.Server[] = [];
  const proxies: ProxyUnderTest[] = [];
  const dirs: string[] = [];
  /** The Content-Length the front states for a blob key's HEAD; undefined: the store's own. */
  let statedSize: number | undefined;
  /** The size the front puts in every announced claim read; undefined: the claim's own. */
  let claimSize: number | undefined;
  /** The upstream sends the blob in 64 KiB steps 50 ms apart (a fill others follow), or at once. */
  let slow = false;
  let upstream = '';
  /** More blobs the upstream serves, by digest. */
  const extra = new Map<string, Buffer>();
  let front = '';

  const serve = async (handler: http.RequestListener): Promise<string> => {
    const server = http.createServer(handler);
    servers.push(server);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  };
  const shared = (endpoint = front): SharedConfig => ({ timeoutSeconds: 5, fillWaitSeconds: 10, streamFills: true, s3: { bucket: s3.bucket, endpoint, forcePathStyle: true, region: 'us-east-1', prefix: '', accessKeyFile: s3.accessKeyFile, secretKeyFile: s3.secretKeyFile } });
  const node = async (nodeName?: string): Promise<ProxyUnderTest> => {
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-stat-lies-'));
    dirs.push(dir);
    const proxy = await startProxy({ cache: { path: join(dir, 'store'), shared: shared() }, registries: [{ name: 'corp', match: ['registry.corp.example'], upstream }] }, {}, {}, {}, nodeName ? { nodeName } : {});
    proxies.push(proxy);
    return proxy;
  };
  const get = (proxy: ProxyUnderTest, of = digest) => getAsShop(proxy, `/v2/corp/team/app/blobs/${of}`);

  before(async () => {
    s3 = await startVersitygw();
    const store = new URL(s3.endpoint);
    front = await serve((req, res) => {
      const forward = http.request({ host: store.hostname, port: store.port, method: req.method, path: req.url, headers: req.headers }, (answer) => {
        const headers = { ...answer.headers };
        if (req.method === 'GET' && req.url?.includes('/claims/') && claimSize !== undefined && answer.statusCode === 200) {
          const chunks: Buffer[] = [];
          answer.on('data', (chunk: Buffer) => chunks.push(chunk));
          answer.on('end', () => {
            const claim = JSON.parse(Buffer.concat(chunks).toString('utf8')) as { size?: number };
            if (claim.size !== undefined) claim.size = claimSize;
            const body = Buffer.from(JSON.stringify(claim));
            res.writeHead(200, { ...headers, 'content-length': String(body.length) });
            res.end(body);
          });
          return;
        }
        if (req.method === 'HEAD' && req.url?.includes('/blobs/') && statedSize !== undefined && answer.statusCode === 200) headers['content-length'] = String(statedSize);
        res.writeHead(answer.statusCode ?? 502, headers);
        answer.pipe(res);
      });
      forward.on('error', () => res.destroy());
      req.pipe(forward);
    });
    upstream = await serve((req, res) => {
      if (req.url === '/v2/') return void res.writeHead(200).end('{}');
      const served = req.url === `/v2/team/app/blobs/${digest}` ? blob : extra.get(req.url?.replace('/v2/team/app/blobs/', '') ?? '');
      if (!served) return void res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"BLOB_UNKNOWN"}]}');
      const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
      const body = range ? served.subarray(Number(range[1])) : served;
      res.writeHead(range ? 206 : 200, { 'content-length': String(body.length), 'docker-content-digest': sha(served), ...(range ? { 'content-range': `bytes ${range[1]}-${served.length - 1}/${served.length}` } : {}) });
      if (req.method === 'HEAD' || !slow) return void res.end(req.method === 'HEAD' ? undefined : body);
      let sent = 0;
      const step = 64 * 1024;
      const timer = setInterval(() => {
        if (res.destroyed || sent >= body.length) {
          clearInterval(timer);
          res.end();
          return;
        }
        res.write(body.subarray(sent, sent + step));
        sent += step;
      }, 50);
      res.on('close', () => clearInterval(timer));
    });
    // One node fills the tier from the upstream.
    const filler = await node();
    const first = await get(filler);
    assert.deepEqual({ status: first.status, complete: first.complete, digest: sha(first.body) }, { status: 200, complete: true, digest });
    const direct = await openSharedStore(shared(s3.endpoint));
    try {
      for (let round = 0; round < 300 && (await direct.stat(sharedKeys.blob(digest))) === undefined; round++) await new Promise((resolve) => setTimeout(resolve, 50));
      assert.equal((await direct.stat(sharedKeys.blob(digest)))?.size, blob.length, 'the filler did not share the blob');
    } finally {
      await direct.close();
    }
  });
  after(async () => {
    for (const proxy of proxies) await proxy.close();
    for (const server of servers) {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    }
    await s3?.stop();
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  it('fetches from the upstream a blob the store states as empty: the client gets it whole', async () => {
    statedSize = 0;
    const answer = await get(await node());
    assert.deepEqual({ status: answer.status, complete: answer.complete, digest: sha(answer.body) }, { status: 200, complete: true, digest });
  });

  it('fetches from the upstream a blob the store states smaller than the upstream does: the client gets it whole', async () => {
    statedSize = 5;
    const answer = await get(await node());
    assert.deepEqual({ status: answer.status, complete: answer.complete, digest: sha(answer.body) }, { status: 200, complete: true, digest });
    statedSize = undefined;
  });

  for (const forged of [1, 2 * blob.length + 1]) {
    it(`does not follow a fill whose claim announces ${forged} bytes for a blob of ${blob.length}: its client gets the blob whole`, async () => {
      statedSize = undefined;
      claimSize = forged;
      slow = true;
      try {
        // Another blob each time, so that neither node has it yet.
        const other = Buffer.concat([blob, Buffer.from(String(forged))]);
        const otherDigest = sha(other);
        extra.set(otherDigest, other);
        const [filler, follower] = [await node(`filler-${forged}`), await node(`follower-${forged}`)];
        const filling = get(filler, otherDigest);
        await new Promise((resolve) => setTimeout(resolve, 300));
        const followed = await get(follower, otherDigest);
        const filled = await filling;
        assert.deepEqual({ status: filled.status, complete: filled.complete, digest: sha(filled.body) }, { status: 200, complete: true, digest: otherDigest });
        assert.deepEqual({ status: followed.status, complete: followed.complete, digest: sha(followed.body) }, { status: 200, complete: true, digest: otherDigest });
      } finally {
        claimSize = undefined;
        slow = false;
      }
    });
  }
});
