// The Azure adapter against a store whose answers are longer than any answer it parses (a listing
// page, an error document): Azurite behind a front on loopback that passes every request on and
// answers the chosen ones itself, with a body of 256 MiB. The SDK reads such a body whole into one
// string before parsing it; the adapter must fail the call early instead of taking all of it into
// memory. Downloads are not answers to parse: a blob longer than the bound still reads whole.

import assert from 'node:assert/strict';
import http from 'node:http';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlobServiceClient, StorageSharedKeyCredential } from '@azure/storage-blob';
import { openAzureStore } from '../src/cache/shared/azure.js';
import { PARSED_ANSWER_MAX_BYTES } from '../src/cache/shared/common.js';
import { SharedStoreError, type SharedStore } from '../src/cache/shared/store.js';
import { startAzurite, type AzureServer } from './support/objectstores.js';
import { writeRepeated } from './support/http.js';

const MiB = 1024 * 1024;
/** What the front sends per rewritten answer: far more than an answer to parse may have. */
const ANSWER_BYTES = 256 * MiB;

/** An answer the front gives instead of the store's: to which requests, with which status. */
interface Rewrite {
  readonly matches: (req: http.IncomingMessage) => boolean;
  readonly status: number;
  /** Whether the answer announces its length (Content-Length) or is chunked. */
  readonly withLength: boolean;
  /** The start of the body, before the filler (a listing's opening tags). */
  readonly head?: string;
}

/** A front on 127.0.0.1 that forwards to the store at `port`, or answers a request `rewrite()`
 * matches with ANSWER_BYTES of body as fast as the reader takes them. `sent()` counts those bytes. */
async function startFront(port: number, rewrite: () => Rewrite | undefined): Promise<{ readonly port: number; sent(): number; reset(): void; close(): Promise<void> }> {
  let sent = 0;
  const server = http.createServer((req, res) => {
    const answer = rewrite();
    if (answer?.matches(req)) {
      req.resume();
      res.writeHead(answer.status, { 'content-type': 'application/xml', ...(answer.withLength ? { 'content-length': String(ANSWER_BYTES) } : {}) });
      const head = Buffer.from(answer.head ?? '');
      res.write(head, (error) => error || (sent += head.length));
      writeRepeated(res, Buffer.alloc(MiB, 0x20), ANSWER_BYTES / MiB, (bytes) => (sent += bytes));
      return;
    }
    const forwarded = http.request({ host: '127.0.0.1', port, method: req.method, path: req.url, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      answer.pipe(res);
    });
    forwarded.on('error', () => res.destroy());
    req.pipe(forwarded);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    sent: () => sent,
    reset: () => {
      sent = 0;
    },
    close: async () => {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

describe('the Azure adapter against a store sending answers too long to parse (Azurite behind a rewriting front)', function () {
  this.timeout(120_000);
  const container = 'pullbridge-test';
  let server: AzureServer | undefined;
  let front: Awaited<ReturnType<typeof startFront>> | undefined;
  let store: SharedStore | undefined;
  let dir = '';
  let rewrite: Rewrite | undefined;

  before(async () => {
    server = await startAzurite();
    const credential = new StorageSharedKeyCredential(server.accountName, readFileSync(server.accountKeyFile, 'utf8').trim());
    await new BlobServiceClient(server.endpoint, credential).getContainerClient(container).create();
    front = await startFront(Number(new URL(server.endpoint).port), () => rewrite);
    store = await openAzureStore({ container, accountName: server.accountName, accountKeyFile: server.accountKeyFile, endpoint: `http://127.0.0.1:${front.port}/${server.accountName}`, prefix: 'main/' }, 30);
    dir = mkdtempSync(join(tmpdir(), 'pullbridge-store-answers-'));
  });
  after(async () => {
    await store?.close();
    await front?.close();
    await server?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });
  beforeEach(() => {
    rewrite = undefined;
    front?.reset();
  });

  const listAll = async () => {
    for await (const object of store!.list('segments/')) void object;
  };
  const isListing = (req: http.IncomingMessage) => req.method === 'GET' && (req.url ?? '').includes('comp=list');

  it('passes the store\'s own answers: records, listings, and a download longer than an answer to parse', async () => {
    assert.equal(await store!.writeRecord('segments/a', Buffer.from('{"a":1}'), { ifAbsent: true }), true);
    assert.equal(await store!.writeRecord('segments/a', Buffer.from('{"a":2}'), { ifAbsent: true }), false);
    assert.deepEqual(await store!.readRecord('segments/a'), Buffer.from('{"a":1}'));
    const keys: string[] = [];
    for await (const object of store!.list('segments/')) keys.push(object.key);
    assert.deepEqual(keys, ['segments/a']);
    const blob = Buffer.alloc(PARSED_ANSWER_MAX_BYTES + 3 * MiB, 7);
    writeFileSync(join(dir, 'blob'), blob);
    assert.equal(await store!.createFromFile('blobs/b', join(dir, 'blob'), blob.length), 'created');
    const body = await store!.read('blobs/b');
    assert.ok(body, 'no download');
    const chunks: Buffer[] = [];
    for await (const chunk of body) chunks.push(chunk as Buffer);
    assert.ok(Buffer.concat(chunks).equals(blob), 'the download differs from the blob');
    assert.equal(front!.sent(), 0);
  });

  for (const [what, status, withLength, head] of [
    ['a listing page without Content-Length', 200, false, '<?xml version="1.0" encoding="utf-8"?><EnumerationResults><Blobs>'],
    ['an error document without Content-Length', 500, false, undefined],
    ['an error document announcing its length', 503, true, undefined],
  ] as const) {
    it(`fails a listing answered with ${what} before reading it all`, async () => {
      rewrite = { matches: isListing, status, withLength, head };
      await assert.rejects(listAll(), (error: unknown) => error instanceof SharedStoreError && error.failure === 'error');
      // Each of the SDK's two tries stops at the bound (plus what the sockets buffered), not at 256 MiB.
      assert.ok(front!.sent() < 64 * MiB, `the store sent ${front!.sent()} bytes`);
    });
  }

  it('fails a record read answered with an endless error document', async () => {
    rewrite = { matches: (req) => req.method === 'GET' && (req.url ?? '').includes('/main/claims/'), status: 503, withLength: false };
    await assert.rejects(store!.readRecord('claims/x'), (error: unknown) => error instanceof SharedStoreError && error.failure === 'error');
    assert.ok(front!.sent() < 64 * MiB, `the store sent ${front!.sent()} bytes`);
  });

  it('fails a record write answered with an endless error document', async () => {
    rewrite = { matches: (req) => req.method === 'PUT', status: 500, withLength: false };
    await assert.rejects(store!.writeRecord('claims/x', Buffer.from('{}')), (error: unknown) => error instanceof SharedStoreError && error.failure === 'error');
    assert.ok(front!.sent() < 64 * MiB, `the store sent ${front!.sent()} bytes`);
  });
});
