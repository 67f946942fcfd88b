// The Azure and GCS adapters against a store whose answers are longer than any answer they parse (a
// listing page, an error document, an object's metadata): Azurite and fake-gcs-server behind a
// front on loopback that passes every request on and answers the chosen ones itself, with a body of
// 256 MiB. The Azure SDK reads such a body whole into one string before parsing it (the GCS client
// library did too; the adapter now makes its own requests); each adapter must fail the call early
// instead of taking all of it into memory. Downloads are not answers to parse: a blob longer than
// the bound still reads whole. (The S3 adapter's are in shared-s3-answers.test.ts.)

import assert from 'node:assert/strict';
import http from 'node:http';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlobServiceClient, StorageSharedKeyCredential } from '@azure/storage-blob';
import { openAzureStore } from '../src/cache/shared/azure.js';
import { openGcsStore } from '../src/cache/shared/gcs.js';
import { PARSED_ANSWER_MAX_BYTES } from '../src/cache/shared/common.js';
import { SharedStoreError, type SharedStore } from '../src/cache/shared/store.js';
import { startAzurite, startFakeGcs, type AzureServer, type GcsServer } from './support/objectstores.js';
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

/** The store's own answers pass the front: conditional record writes, a record read, a listing,
 * and an upload, stat and download of a blob longer than an answer to parse. */
async function passesOwnAnswers(store: SharedStore, dir: string): Promise<void> {
  assert.equal(await store.writeRecord('segments/a', Buffer.from('{"a":1}'), { ifAbsent: true }), true);
  assert.equal(await store.writeRecord('segments/a', Buffer.from('{"a":2}'), { ifAbsent: true }), false);
  assert.deepEqual(await store.readRecord('segments/a'), Buffer.from('{"a":1}'));
  const keys: string[] = [];
  for await (const object of store.list('segments/')) keys.push(object.key);
  assert.deepEqual(keys, ['segments/a']);
  const blob = Buffer.alloc(PARSED_ANSWER_MAX_BYTES + 3 * MiB, 7);
  writeFileSync(join(dir, 'blob'), blob);
  assert.equal(await store.createFromFile('blobs/b', join(dir, 'blob'), blob.length), 'created');
  assert.equal((await store.stat('blobs/b'))?.size, blob.length);
  const body = await store.read('blobs/b');
  assert.ok(body, 'no download');
  const chunks: Buffer[] = [];
  for await (const chunk of body) chunks.push(chunk as Buffer);
  assert.ok(Buffer.concat(chunks).equals(blob), 'the download differs from the blob');
}

/** A backend behind the front: its server, the adapter on the front, and what its requests look like. */
interface Backend {
  readonly name: string;
  /** The store's server, started; `open` opens the adapter at the front's port. */
  start(): Promise<{ readonly port: number; open(frontPort: number): Promise<SharedStore>; stop(): Promise<void> }>;
  readonly isListing: (req: http.IncomingMessage) => boolean;
  /** The start of a listing page, before the filler. */
  readonly listingHead: string;
  /** A record read of `claims/…` (for GCS, the object's metadata asked first). */
  readonly isRecordRead: (req: http.IncomingMessage) => boolean;
  readonly recordReadAnswer: { readonly status: number; readonly head?: string };
  readonly writeMethod: string;
}

const urlPath = (req: http.IncomingMessage) => new URL(req.url ?? '/', 'http://front').pathname;

const backends: readonly Backend[] = [
  {
    name: 'the Azure adapter (Azurite behind a rewriting front)',
    async start() {
      const container = 'pullbridge-test';
      const server: AzureServer = await startAzurite();
      const credential = new StorageSharedKeyCredential(server.accountName, readFileSync(server.accountKeyFile, 'utf8').trim());
      await new BlobServiceClient(server.endpoint, credential).getContainerClient(container).create();
      return {
        port: Number(new URL(server.endpoint).port),
        open: (frontPort) => openAzureStore({ container, accountName: server.accountName, accountKeyFile: server.accountKeyFile, endpoint: `http://127.0.0.1:${frontPort}/${server.accountName}`, prefix: 'main/' }, 30),
        stop: () => server.stop(),
      };
    },
    isListing: (req) => req.method === 'GET' && (req.url ?? '').includes('comp=list'),
    listingHead: '<?xml version="1.0" encoding="utf-8"?><EnumerationResults><Blobs>',
    isRecordRead: (req) => req.method === 'GET' && (req.url ?? '').includes('/main/claims/'),
    recordReadAnswer: { status: 503 },
    writeMethod: 'PUT',
  },
  {
    // The client library read every answer whole; the adapter now makes its own requests.
    name: 'the GCS adapter (fake-gcs-server behind a rewriting front)',
    async start() {
      const server: GcsServer = await startFakeGcs();
      return {
        port: Number(new URL(server.endpoint).port),
        open: (frontPort) => openGcsStore({ bucket: server.bucket, endpoint: `http://127.0.0.1:${frontPort}`, prefix: 'main/' }, 30),
        stop: () => server.stop(),
      };
    },
    isListing: (req) => req.method === 'GET' && urlPath(req).endsWith('/o'),
    listingHead: '{"kind":"storage#objects","items":[',
    // The metadata a stat, a read and a record read ask for first, endless.
    isRecordRead: (req) => req.method === 'GET' && urlPath(req).includes('/o/') && !(req.url ?? '').includes('alt=media'),
    recordReadAnswer: { status: 200, head: '{"size":"1","generation":"1","updated":"' },
    writeMethod: 'POST',
  },
];

for (const backend of backends) {
  describe(`${backend.name}: answers too long to parse`, function () {
    this.timeout(120_000);
    let server: Awaited<ReturnType<Backend['start']>> | undefined;
    let front: Awaited<ReturnType<typeof startFront>> | undefined;
    let store: SharedStore | undefined;
    let dir = '';
    let rewrite: Rewrite | undefined;
    const failsEarly = (error: unknown) => error instanceof SharedStoreError && error.failure === 'error';
    /** Each of an SDK's tries stops at the bound (plus what the sockets buffered), not at 256 MiB. */
    const sentLittle = () => assert.ok(front!.sent() < 64 * MiB, `the store sent ${front!.sent()} bytes`);

    before(async () => {
      server = await backend.start();
      front = await startFront(server.port, () => rewrite);
      store = await server.open(front.port);
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

    it("passes the store's own answers: records, listings, and a download longer than an answer to parse", async () => {
      await passesOwnAnswers(store!, dir);
      assert.equal(front!.sent(), 0);
    });

    for (const [what, status, withLength, head] of [
      ['a listing page without Content-Length', 200, false, backend.listingHead],
      ['an error document without Content-Length', 500, false, undefined],
      ['an error document announcing its length', 503, true, undefined],
    ] as const) {
      it(`fails a listing answered with ${what} before reading it all`, async () => {
        rewrite = { matches: backend.isListing, status, withLength, head };
        await assert.rejects(async () => {
          for await (const object of store!.list('segments/')) void object;
        }, failsEarly);
        sentLittle();
      });
    }

    it('fails a record read answered with an endless document', async () => {
      rewrite = { matches: backend.isRecordRead, withLength: false, ...backend.recordReadAnswer };
      await assert.rejects(store!.readRecord('claims/x'), failsEarly);
      sentLittle();
    });

    it('fails a record write and an upload answered with an endless error document', async () => {
      rewrite = { matches: (req) => req.method === backend.writeMethod, status: 500, withLength: false };
      await assert.rejects(store!.writeRecord('claims/x', Buffer.from('{}')), failsEarly);
      writeFileSync(join(dir, 'small'), 'small');
      await assert.rejects(store!.createFromFile('blobs/c', join(dir, 'small'), 5), failsEarly);
      sentLittle();
    });
  });
}

describe('the GCS adapter (fake-gcs-server behind a rewriting front): an endless object description', function () {
  this.timeout(120_000);
  it('fails a stat and a read as well as a record read', async () => {
    const gcs = backends[1]!;
    const server = await gcs.start();
    let rewrite: Rewrite | undefined;
    const front = await startFront(server.port, () => rewrite);
    const store = await server.open(front.port);
    try {
      rewrite = { matches: gcs.isRecordRead, withLength: false, ...gcs.recordReadAnswer };
      for (const call of [() => store.stat('blobs/b'), () => store.read('blobs/b')]) {
        await assert.rejects(call(), (error: unknown) => error instanceof SharedStoreError && error.failure === 'error');
      }
      assert.ok(front.sent() < 64 * MiB, `the store sent ${front.sent()} bytes`);
    } finally {
      await store.close();
      await front.close();
      await server.stop();
    }
  });
});
