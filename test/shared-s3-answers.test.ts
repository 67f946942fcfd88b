// The S3 adapter against a store whose answers are longer than any answer it parses (a listing page,
// an error document): a scripted S3 endpoint on loopback. The SDK reads such a body whole before
// parsing it; the adapter must fail the call early instead of taking all of it into memory.

import assert from 'node:assert/strict';
import http from 'node:http';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openS3Store } from '../src/cache/shared/s3.js';
import { SharedStoreError, type SharedStore } from '../src/cache/shared/store.js';

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

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pullbridge-s3-answers-'));
    writeFileSync(join(dir, 'access'), 'AKEXAMPLE');
    writeFileSync(join(dir, 'secret'), 'secret-of-the-example');
    server = http.createServer((req, res) => {
      req.resume();
      if (req.method === 'HEAD') {
        // An object of ANSWER_BYTES: its length announced, no body (as a HEAD is answered).
        res.writeHead(200, { 'content-length': String(ANSWER_BYTES), 'last-modified': new Date().toUTCString() });
        return void res.end();
      }
      res.writeHead(status, { 'content-type': 'application/xml', ...(withLength ? { 'content-length': String(ANSWER_BYTES) } : {}) });
      const chunk = Buffer.alloc(MiB, 0x20);
      let written = 0;
      const write = () => {
        while (written < ANSWER_BYTES && !res.destroyed) {
          written += chunk.length;
          sent += chunk.length;
          if (!res.write(chunk)) return void res.once('drain', write);
        }
        if (!res.destroyed) res.end();
      };
      res.on('close', () => undefined);
      write();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
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
});
