// The S3 adapter against a store whose answers are longer than any answer it parses (a listing page,
// an error document): a scripted S3 endpoint on loopback. The SDK reads such a body whole before
// parsing it; the adapter must fail the call early instead of taking all of it into memory. And the
// tier against a store whose downloads drip: they fail instead of holding their fill for as long.

import assert from 'node:assert/strict';
import http from 'node:http';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Registry } from 'prom-client';
import { openS3Store } from '../src/cache/shared/s3.js';
import { openSharedStore } from '../src/cache/shared/open.js';
import { SharedStoreError, type SharedStore } from '../src/cache/shared/store.js';
import { LIST_OBJECTS_MAX, SharedTier } from '../src/cache/shared/tier.js';
import type { SharedConfig } from '../src/rules/config.js';
import { createLogger } from '../src/log.js';
import { writeRepeated } from './support/http.js';

const MiB = 1024 * 1024;
/** What the scripted store sends per answer: far more than an answer to parse may have. */
const ANSWER_BYTES = 256 * MiB;

describe('the S3 adapter against a store sending answers too long to parse (scripted store)', function () {
  this.timeout(60_000);
  let server: http.Server;
  let store: SharedStore;
  let dir: string;
  /** Bytes the store managed to send, over every answer. */
  let sent = 0;
  let status = 200;
  let withLength = false;
  let config: SharedConfig;
  /** Listings answered with a page of 1,000 segment keys and a new continuation token, for ever. */
  let endlessListing = false;
  let pages = 0;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pullbridge-s3-answers-'));
    writeFileSync(join(dir, 'access'), 'AKEXAMPLE');
    writeFileSync(join(dir, 'secret'), 'secret-of-the-example');
    server = http.createServer((req, res) => {
      req.resume();
      if (endlessListing && req.method === 'GET' && req.url?.includes('list-type=2')) {
        pages++;
        const prefix = decodeURIComponent(/prefix=([^&]*)/.exec(req.url)?.[1] ?? '');
        const keys = Array.from({ length: 1000 }, (_, i) => `<Contents><Key>${prefix}${'ab'.repeat(32)}/${(pages * 1000 + i).toString(16).padStart(16, '0')}</Key><Size>1</Size></Contents>`).join('');
        res.writeHead(200, { 'content-type': 'application/xml' });
        return void res.end(`<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>images</Name><Prefix>${prefix}</Prefix><KeyCount>1000</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated><NextContinuationToken>t${pages}</NextContinuationToken>${keys}</ListBucketResult>`);
      }
      if (req.method === 'GET' && req.url?.includes('/blobs/')) {
        // A download that announces 1 MiB and sends a byte every 100 ms: never idle for long.
        res.writeHead(200, { 'content-length': String(MiB), 'content-type': 'application/octet-stream' });
        let dripped = 0;
        const timer = setInterval(() => {
          if (res.destroyed || dripped >= 600) {
            clearInterval(timer);
            res.destroy();
            return;
          }
          dripped++;
          res.write(Buffer.from('x'));
        }, 100);
        res.on('close', () => clearInterval(timer));
        return;
      }
      if (req.method === 'HEAD') {
        // An object of ANSWER_BYTES: its length announced, no body (as a HEAD is answered).
        res.writeHead(200, { 'content-length': String(ANSWER_BYTES), 'last-modified': new Date().toUTCString() });
        return void res.end();
      }
      res.writeHead(status, { 'content-type': 'application/xml', ...(withLength ? { 'content-length': String(ANSWER_BYTES) } : {}) });
      writeRepeated(res, Buffer.alloc(MiB, 0x20), ANSWER_BYTES / MiB, (bytes) => (sent += bytes));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    config = { timeoutSeconds: 2, fillWaitSeconds: 60, streamFills: true, s3: { bucket: 'images', region: 'us-east-1', endpoint, forcePathStyle: true, prefix: '', accessKeyFile: join(dir, 'access'), secretKeyFile: join(dir, 'secret') } };
    store = await openS3Store({ bucket: 'images', region: 'us-east-1', endpoint, forcePathStyle: true, prefix: '', accessKeyFile: join(dir, 'access'), secretKeyFile: join(dir, 'secret') }, 30);
  });
  after(async () => {
    await store?.close();
    server?.closeAllConnections();
    await new Promise((resolve) => server?.close(resolve));
    rmSync(dir, { recursive: true, force: true });
  });
  beforeEach(() => {
    sent = 0;
  });

  const listAll = async () => {
    for await (const object of store.list('segments/')) void object;
  };

  for (const [what, answer, length] of [
    ['a listing page without Content-Length', 200, false],
    ['an error document without Content-Length', 500, false],
    ['an error document announcing its length', 503, true],
  ] as const) {
    it(`fails a call answered with ${what} before reading it all`, async () => {
      status = answer;
      withLength = length;
      await assert.rejects(listAll(), (error: unknown) => error instanceof SharedStoreError && error.failure === 'error');
      // Each of the SDK's two attempts stops at the bound (plus what the sockets buffered), not at 256 MiB.
      assert.ok(sent < 64 * MiB, `the store sent ${sent} bytes`);
    });
  }

  it('still answers a HEAD of an object longer than an answer to parse: its size', async () => {
    assert.equal((await store.stat('blobs/sha256/x'))?.size, ANSWER_BYTES);
  });

  it('fails a record write answered with an endless error document', async () => {
    status = 500;
    withLength = false;
    await assert.rejects(store.writeRecord('claims/x', Buffer.from('{}')), SharedStoreError);
    assert.ok(sent < 64 * MiB, `the store sent ${sent} bytes`);
  });

  it('fails a download that drips (a byte per 100 ms) once it brought too little over timeoutSeconds of its reader waiting', async () => {
    const tier = new SharedTier(() => openSharedStore(config), config, 'node-d', new Registry(), createLogger({ level: 'silent' }), Date.now);
    try {
      const stream = await tier.readBlob(`sha256:${'d'.repeat(64)}`);
      assert.ok(stream, 'the store answered no download');
      const started = Date.now();
      let bytes = 0;
      // Bounded: the server stops after 60 s of dripping; the tier must give up well before.
      const outcome = await (async () => {
        try {
          for await (const chunk of stream.iterator({ destroyOnReturn: true })) {
            bytes += (chunk as Buffer).length;
            if (Date.now() - started > 15_000) return 'still reading';
          }
          return 'ended';
        } catch {
          return 'failed';
        }
      })();
      assert.equal(outcome, 'failed', `after ${Date.now() - started} ms and ${bytes} bytes`);
      assert.ok(Date.now() - started < 10_000, `failed only after ${Date.now() - started} ms`);
    } finally {
      await tier.close();
    }
  });

  it('stops listing a store whose listing pages never end, after LIST_OBJECTS_MAX objects', async () => {
    endlessListing = true;
    const tier = new SharedTier(() => openSharedStore(config), config, 'node-l', new Registry(), createLogger({ level: 'silent' }), Date.now);
    try {
      await tier.removeSegments(`sha256:${'e'.repeat(64)}`);
      // The call answers at its deadline; the listing must stop too, not go on behind it.
      let last = -1;
      for (let round = 0; round < 50 && pages !== last; round++) {
        last = pages;
        await new Promise((resolve) => setTimeout(resolve, 300));
      }
      assert.equal(pages, last, `still listing after ${pages} pages`);
      assert.ok(pages <= LIST_OBJECTS_MAX / 1000 + 1, `${pages} pages listed`);
    } finally {
      endlessListing = false;
      await tier.close();
    }
  });
});
