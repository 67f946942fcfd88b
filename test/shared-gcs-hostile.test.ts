// The GCS adapter against what a store or a node can do to it: downloads held open by slow clients
// (fake-gcs-server; every other call must still get a connection), a local file that cannot be
// uploaded (fake-gcs-server; the node's failure, not the store's), and, from a scripted server on
// loopback because fake-gcs-server honours Range and pages correctly, a store answering another
// range than the one asked for and one whose listing hands back a page token it gave before.

import assert from 'node:assert/strict';
import http from 'node:http';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { openGcsStore } from '../src/cache/shared/gcs.js';
import { LocalFileError, SharedStoreError, type SharedStore } from '../src/cache/shared/store.js';
import { startFakeGcs, type GcsServer } from './support/objectstores.js';

const isStoreError = (error: unknown) => error instanceof SharedStoreError && error.failure === 'error';

describe('the GCS adapter on fake-gcs-server: held downloads and local files', function () {
  this.timeout(120_000);
  let server: GcsServer | undefined;
  let store: SharedStore | undefined;
  let dir = '';

  before(async () => {
    server = await startFakeGcs();
    store = await openGcsStore({ bucket: server.bucket, endpoint: server.endpoint, prefix: 'main/' }, 2);
    dir = mkdtempSync(join(tmpdir(), 'pullbridge-gcs-hostile-'));
  });
  after(async () => {
    await store?.close();
    await server?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('answers a stat, a record write and a segment upload while 64 downloads are held open by slow readers', async () => {
    const blob = Buffer.alloc(8 * 1024 * 1024, 3);
    writeFileSync(join(dir, 'blob'), blob);
    assert.equal(await store!.createFromFile('blobs/held', join(dir, 'blob'), blob.length), 'created');
    const held: Readable[] = [];
    try {
      for (let i = 0; i < 64; i++) {
        const body = await store!.read('blobs/held');
        assert.ok(body);
        held.push(body);
      }
      assert.equal((await store!.stat('blobs/held'))?.size, blob.length);
      assert.equal(await store!.writeRecord('claims/held', Buffer.from('{}'), { ifAbsent: true }), true);
      const handle = await import('node:fs/promises').then((fs) => fs.open(join(dir, 'blob'), 'r'));
      try {
        assert.equal(await store!.createFromRange('segments/held', { handle, start: 0, end: 1024 }), 'created');
      } finally {
        await handle.close();
      }
    } finally {
      for (const body of held) body.destroy();
    }
  });

  it('fails an upload of a local file that is missing, a directory, or shorter than its size as LocalFileError, and stores nothing', async () => {
    writeFileSync(join(dir, 'short'), 'abc');
    for (const [file, size] of [[join(dir, 'missing'), 10], [dir, 10], [join(dir, 'short'), 10]] as const) {
      await assert.rejects(store!.createFromFile('blobs/local', file, size), (error: unknown) => error instanceof LocalFileError, file);
    }
    assert.equal(await store!.stat('blobs/local'), undefined);
  });
});

describe('the GCS adapter against a scripted store: wrong ranges and a listing that repeats', function () {
  this.timeout(60_000);
  const object = Buffer.from('0123456789ABCDEFGHIJ');
  let answer: (req: http.IncomingMessage, res: http.ServerResponse) => void = () => undefined;
  let server: http.Server;
  let store: SharedStore;
  let listings = 0;

  before(async () => {
    server = http.createServer((req, res) => {
      if ((req.url ?? '').includes('fields=size')) {
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ size: String(object.length), generation: '7', updated: new Date().toISOString() }));
        return;
      }
      answer(req, res);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    store = await openGcsStore({ bucket: 'b', prefix: '', endpoint: `http://127.0.0.1:${(server.address() as AddressInfo).port}` }, 2);
  });
  after(async () => {
    await store.close();
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  });

  const readAll = async (span?: { start: number; end: number }) => {
    const body = await store.read('k', span);
    assert.ok(body);
    const chunks: Buffer[] = [];
    for await (const chunk of body) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks).toString();
  };

  it('reads a span answered as asked', async () => {
    answer = (_req, res) => res.writeHead(206, { 'content-range': `bytes 10-14/${object.length}` }).end(object.subarray(10, 15));
    assert.equal(await readAll({ start: 10, end: 14 }), 'ABCDE');
  });

  for (const [what, send] of [
    ['the whole object (Range ignored)', (res: http.ServerResponse) => res.writeHead(200).end(object)],
    ['another range', (res: http.ServerResponse) => res.writeHead(206, { 'content-range': `bytes 0-4/${object.length}` }).end(object.subarray(0, 5))],
  ] as const) {
    it(`fails a span read answered with ${what}, not handing those bytes on`, async () => {
      answer = (_req, res) => send(res);
      await assert.rejects(readAll({ start: 10, end: 14 }), isStoreError);
    });
  }

  it('fails a span read answered with more bytes than the range', async () => {
    answer = (_req, res) => res.writeHead(206, { 'content-range': `bytes 10-14/${object.length}` }).end(object.subarray(10));
    await assert.rejects(readAll({ start: 10, end: 14 }), isStoreError);
  });

  it('stops a listing whose next-page token repeats, after two pages', async () => {
    listings = 0;
    answer = (_req, res) => {
      listings++;
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ nextPageToken: 'again' }));
    };
    await assert.rejects(async () => {
      for await (const item of store.list('x/')) void item;
    }, isStoreError);
    assert.equal(listings, 2);
  });
});
