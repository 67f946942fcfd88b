// The shared cache tier's stores, one conformance suite per backend: a filesystem directory, the S3
// API on versitygw, Azure Blob on Azurite, GCS on fake-gcs-server, all on loopback.
//
// What each emulator could and could not show:
//   filesystem       link(2) publishing: exactly one of concurrent creates wins, nothing partial is
//                    ever visible; conditional replace under a link(2) lock: of concurrent
//                    conditional writes and removes of one version, exactly one succeeds, across
//                    processes no rewrite is lost and a reader never finds the record missing.
//                    Shown on the local filesystem, not on NFS (no .nfsXXXX silly renames, no
//                    ESTALE); no 'denied' or 'unreachable' case (the tests may run as root; no mount).
//   s3 (versitygw)   If-None-Match: * honoured on PutObject and on CompleteMultipartUpload (8
//                    racing multipart uploads: one created, seven 412); If-Match honoured on
//                    PutObject and on DeleteObject (412 for another ETag; a conditional
//                    DeleteObject of a missing key answers 204), but a conditional DeleteObject is
//                    not atomic with a conditional PutObject of the same version (both may
//                    succeed), so only writes are raced there. Checks SigV4 signatures (wrong
//                    secret => 403 SignatureDoesNotMatch => 'denied'). Quirk: a conditional PUT of
//                    a taken key may be answered before its body is read and the connection
//                    closed, so the client sees ECONNRESET, not 412; the adapter then looks the key
//                    up. Not shown: 409 ConditionalRequestConflict (AWS only), server-side abort
//                    of parts left by a crashed client (lifecycle rule on real buckets).
//   azure (Azurite) If-None-Match: * honoured on Put Blob and on Put Block List (8 racing block
//                    uploads: one created, seven refused); If-Match honoured on Put Blob and on
//                    Delete Blob. Checks Shared Key signatures (wrong key => 403 => 'denied');
//                    account SAS tokens accepted. Not shown: Entra ID, the service's own clean-up
//                    of uncommitted blocks (Azure drops them after a week).
//   gcs (fake-gcs-server)  ifGenerationMatch=0 honoured on single-request uploads, the only kind
//                    the adapter makes (8 racing uploads of a file: one created, seven 412);
//                    ifGenerationMatch=N honoured on uploads but NOT on a delete (v1.56.1
//                    deletes any generation): the adapter's conditional remove is a conditional
//                    overwrite with an empty object, then a delete. Checks no credentials at all:
//                    no 'denied' case. Answers a missing bucket like a missing object (404 "Not
//                    Found"), so only writes show a missing bucket as 'error'; real GCS names the
//                    bucket in its message, which the adapter uses. Not shown: authentication
//                    (service account key, workload identity).
//   All: 'unreachable' is a stopped server's refused connection, 'timeout' a listener that never
//   answers, each within seconds (the S3 and Azure SDKs retry once; the GCS adapter does not). TLS endpoints are not exercised. createFromRange (a
//   segment) is one create-if-absent request on each: single PutObject, single Put Blob, GCS
//   single-request upload (each refused when the key is taken, 8 racing: one created); its abort
//   once bytes flow leaves no object on any of them (single requests are all or nothing).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, symlinkSync, utimesSync, watch, writeFileSync } from 'node:fs';
import { open as openFile, type FileHandle } from 'node:fs/promises';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { AccountSASPermissions, AccountSASResourceTypes, AccountSASServices, BlobServiceClient, generateAccountSASQueryParameters, StorageSharedKeyCredential } from '@azure/storage-blob';
import { ListMultipartUploadsCommand, S3Client } from '@aws-sdk/client-s3';
import { Registry } from 'prom-client';
import { parseClaim } from '../src/cache/policy.js';
import { openSharedStore } from '../src/cache/shared/open.js';
import { LocalFileError, RANGE_UPLOAD_MAX_BYTES, RefusedObject, SharedStoreError, type ByteSpan, type FileRange, type SharedFailure, type SharedListing, type SharedStore, type WriteCondition } from '../src/cache/shared/store.js';
import { SharedTier, sharedKeys } from '../src/cache/shared/tier.js';
import { createLogger } from '../src/log.js';
import type { SharedConfig } from '../src/rules/config.js';
import { startAzurite, startFakeGcs, startVersitygw, type AzureServer, type GcsServer, type S3Server } from './support/objectstores.js';

const MiB = 1024 * 1024;
const sha256 = (data: Buffer) => createHash('sha256').update(data).digest('hex');

/** A segment's key as the tier names it: the blob's digest, then the offset as 16 hex digits. */
const segmentKey = (blob: string, offset: number) => `segments/sha256/${blob}/${offset.toString(16).padStart(16, '0')}`;

/** The handle is still open and reads its file (createFromRange never closes it). */
async function assertOpen(handle: FileHandle, data: Buffer): Promise<void> {
  const probe = Buffer.alloc(16);
  const { bytesRead } = await handle.read(probe, 0, probe.length, 0);
  assert.deepEqual(probe.subarray(0, bytesRead), data.subarray(0, 16), 'the handle still reads its file');
}

async function bytesOf(stream: Readable | undefined): Promise<Buffer | undefined> {
  if (!stream) return undefined;
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

async function listAll(store: SharedStore, prefix: string): Promise<SharedListing[]> {
  const all: SharedListing[] = [];
  for await (const entry of store.list(prefix)) all.push(entry);
  return all.sort((a, b) => a.key.localeCompare(b.key));
}

async function rejectsWith(operation: Promise<unknown>, failure: SharedFailure, what = ''): Promise<void> {
  await assert.rejects(operation, (error: unknown) => {
    assert.ok(error instanceof SharedStoreError, `${what} a SharedStoreError, not ${String(error)}`);
    assert.equal(error.failure, failure, `${what} ${error.message}`);
    return true;
  });
}

/** A TCP server that accepts connections and never answers: a store that hangs. */
async function blackHole(): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  return {
    port,
    close: () =>
      new Promise((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

/** A TCP relay to a loopback port that counts the bytes sent towards it: `reached` settles once
 * `threshold` bytes have gone through. */
async function countingRelay(targetPort: number, threshold: number): Promise<{ port: number; reached: Promise<void>; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  let sent = 0;
  let reachedNow: () => void = () => undefined;
  const reached = new Promise<void>((resolve) => (reachedNow = resolve));
  const server: Server = createServer((client) => {
    const target = connect(targetPort, '127.0.0.1');
    for (const socket of [client, target]) {
      sockets.add(socket);
      socket.on('error', () => {
        client.destroy();
        target.destroy();
      });
    }
    client.on('data', (chunk: Buffer) => {
      sent += chunk.length;
      if (sent >= threshold) reachedNow();
    });
    client.pipe(target).pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  return {
    port: typeof address === 'object' && address ? address.port : 0,
    reached,
    close: () =>
      new Promise((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

const base = { fillWaitSeconds: 120, timeoutSeconds: 30, streamFills: true } as const;

/** A node's shared tier on a store (its own connection to it), on its own clock. */
function tier(config: SharedConfig, node: string, now: () => number = Date.now, wrap: (store: SharedStore) => SharedStore = (s) => s): SharedTier {
  return new SharedTier(async () => wrap(await openSharedStore(config)), config, node, new Registry(), createLogger({ level: 'silent' }), now);
}

/** The node a claim record (unsealed: no record key) names. */
function claimOwner(body: Buffer | undefined): string | undefined {
  return body === undefined ? undefined : parseClaim(body.toString('utf8'))?.node;
}

/** A real store with hooks that order its calls against another node's: removes wait until
 * `removeAfter` settles; `afterRead` is called once a versioned read's answer has been acted on (the
 * caller's next step has begun: its own microtasks ran); `writes` are the writes made. */
class Ordered implements SharedStore {
  readonly kind: SharedStore['kind'];
  readonly location: string;
  readonly writes: Promise<boolean>[] = [];
  constructor(
    private readonly store: SharedStore,
    private readonly hooks: { readonly removeAfter?: Promise<void>; readonly afterRead?: () => void },
  ) {
    this.kind = store.kind;
    this.location = store.location;
  }
  stat(key: string) {
    return this.store.stat(key);
  }
  read(key: string, span?: ByteSpan, signal?: AbortSignal) {
    return this.store.read(key, span, signal);
  }
  createFromFile(key: string, file: string, size: number, signal?: AbortSignal) {
    return this.store.createFromFile(key, file, size, signal);
  }
  createFromRange(key: string, range: FileRange, signal?: AbortSignal) {
    return this.store.createFromRange(key, range, signal);
  }
  writeRecord(key: string, body: Buffer, options?: WriteCondition) {
    const written = this.store.writeRecord(key, body, options);
    this.writes.push(written);
    return written;
  }
  readRecord(key: string, maxBytes?: number) {
    return this.store.readRecord(key, maxBytes);
  }
  async readVersioned(key: string, maxBytes?: number) {
    const found = await this.store.readVersioned(key, maxBytes);
    if (this.hooks.afterRead) setImmediate(this.hooks.afterRead);
    return found;
  }
  async remove(key: string, options?: { readonly ifMatch?: string }) {
    await this.hooks.removeAfter;
    return this.store.remove(key, options);
  }
  list(prefix: string) {
    return this.store.list(prefix);
  }
  close() {
    return this.store.close();
  }
}

/** One backend under test: its server (started in `before`), configs for it, its failure cases. */
interface Backend {
  readonly name: string;
  start(): Promise<void>;
  /** A store under `prefix` (for the filesystem, a subdirectory). */
  config(prefix: string): SharedConfig;
  /** The same store with a credential the server refuses; undefined when it checks none. */
  deniedConfig?(): SharedConfig;
  /** Other ways to reach the same store (other credential kinds), each shown to write and read. */
  readonly alternatives?: ReadonlyArray<readonly [string, () => SharedConfig]>;
  /** A credential file that is not there (a Secret not mounted). */
  missingCredentialFileConfig?(): SharedConfig;
  /** The same server with a bucket or container that does not exist. */
  missingBucketConfig?(): SharedConfig;
  /** The server answers a read in a missing bucket as it answers a missing object. */
  readsMissingBucketAsMissingKey?: boolean;
  /** The server's conditional delete is not atomic with its conditional writes (a removal and a
   * write, each on condition of one version, may both succeed): the race asserted is the writes'. */
  deleteRacesWrites?: boolean;
  /** The same store at a loopback port with nothing behind it, or a server that never answers. */
  elsewhere?(port: number, timeoutSeconds: number): SharedConfig;
  stop(): Promise<void>;
}

function conformance(backend: Backend): void {
  describe(`shared store: ${backend.name}`, function () {
    this.timeout(180_000);
    let dir: string;
    let store: SharedStore;
    const opened: SharedStore[] = [];
    const open = async (config: SharedConfig) => {
      const s = await openSharedStore(config);
      opened.push(s);
      return s;
    };
    const file = (name: string, data: Buffer) => {
      const path = join(dir, name);
      writeFileSync(path, data);
      return path;
    };

    /** A file whose ranges createFromRange uploads, open for the whole suite (it must stay open). */
    let rangeData: Buffer;
    let rangeHandle: FileHandle;

    before(async () => {
      dir = mkdtempSync(join(tmpdir(), 'pullbridge-shared-test-'));
      await backend.start();
      store = await open(backend.config('main/'));
      rangeData = randomBytes(5 * MiB + 333);
      rangeHandle = await openFile(file('range-source', rangeData), 'r');
    });
    after(async () => {
      await rangeHandle.close();
      for (const s of opened) await s.close();
      await backend.stop();
      rmSync(dir, { recursive: true, force: true });
    });

    it('uploads a multi-part-sized file byte-exact, stat gives its size', async () => {
      const data = randomBytes(12 * MiB + 123);
      assert.equal(await store.createFromFile('blobs/sha256/big', file('big', data), data.length), 'created');
      assert.equal((await store.stat('blobs/sha256/big'))?.size, data.length);
      assert.equal(sha256((await bytesOf(await store.read('blobs/sha256/big')))!), sha256(data));
      assert.equal(await store.createFromFile('blobs/sha256/big', file('big', data), data.length), 'exists', 'a second create finds it');
    });

    it('of 8 concurrent creates of one key exactly one is created, and its bytes are stored', async () => {
      const contents = Array.from({ length: 8 }, () => randomBytes(12 * MiB + 7));
      const paths = contents.map((data, i) => file(`racer-${i}`, data));
      const outcomes = await Promise.all(paths.map((path, i) => store.createFromFile('blobs/sha256/race', path, contents[i]!.length)));
      assert.equal(outcomes.filter((o) => o === 'created').length, 1, outcomes.join(' '));
      assert.equal(outcomes.filter((o) => o === 'exists').length, 7);
      const winner = contents[outcomes.indexOf('created')]!;
      assert.equal(sha256((await bytesOf(await store.read('blobs/sha256/race')))!), sha256(winner));
    });

    it('of 8 concurrent conditional record writes exactly one is written, and its bytes are stored', async () => {
      const bodies = Array.from({ length: 8 }, (_, i) => Buffer.from(`record from writer ${i} ${randomBytes(8).toString('hex')}`));
      const written = await Promise.all(bodies.map((body) => store.writeRecord('records/race', body, { ifAbsent: true })));
      assert.equal(written.filter(Boolean).length, 1, written.join(' '));
      assert.deepEqual(await store.readRecord('records/race'), bodies[written.indexOf(true)]);
      assert.equal(await store.writeRecord('records/race', Buffer.from('replaced')), true, 'an unconditional write replaces');
      assert.deepEqual(await store.readRecord('records/race'), Buffer.from('replaced'));
    });

    it('reads a record up to its bound and refuses a larger one (RefusedObject, not a store failure); an empty one reads empty', async () => {
      await store.writeRecord('records/bounded', Buffer.alloc(64, 'x'));
      assert.deepEqual(await store.readRecord('records/bounded', 64), Buffer.alloc(64, 'x'));
      await assert.rejects(store.readRecord('records/bounded', 63), RefusedObject);
      await store.writeRecord('records/empty', Buffer.alloc(0));
      assert.deepEqual(await store.readRecord('records/empty'), Buffer.alloc(0));
    });

    it('createFromRange: creates a range in the middle of a file once, with exactly its bytes; a second create answers exists and changes nothing', async () => {
      const key = segmentKey('middle', MiB + 5);
      const range = { handle: rangeHandle, start: MiB + 5, end: 3 * MiB + 1000 };
      assert.equal(await store.createFromRange(key, range), 'created');
      const expected = rangeData.subarray(range.start, range.end);
      assert.equal((await store.stat(key))?.size, expected.length);
      assert.equal(sha256((await bytesOf(await store.read(key)))!), sha256(expected));
      // Other bytes of the same length under the same key: refused, the object keeps the first.
      assert.equal(await store.createFromRange(key, { handle: rangeHandle, start: 0, end: expected.length }), 'exists');
      assert.equal(sha256((await bytesOf(await store.read(key)))!), sha256(expected), 'the object is unchanged');
      assert.deepEqual((await listAll(store, 'segments/sha256/middle/')).map((l) => [l.key, l.size]), [[key, expected.length]]);
      await assertOpen(rangeHandle, rangeData);
    });

    it('createFromRange: creates the range at the end of a file, and a 0-byte range as an empty object', async () => {
      const tail = segmentKey('tail', 4 * MiB);
      assert.equal(await store.createFromRange(tail, { handle: rangeHandle, start: 4 * MiB, end: rangeData.length }), 'created');
      assert.deepEqual(await bytesOf(await store.read(tail)), rangeData.subarray(4 * MiB));
      const empty = segmentKey('empty', 7);
      assert.equal(await store.createFromRange(empty, { handle: rangeHandle, start: 7, end: 7 }), 'created');
      assert.equal((await store.stat(empty))?.size, 0);
      assert.equal(await store.createFromRange(empty, { handle: rangeHandle, start: 9, end: 9 }), 'exists');
      await assertOpen(rangeHandle, rangeData);
    });

    it('createFromRange: refuses a range over the bound or reversed with RangeError, before anything is written', async () => {
      const key = segmentKey('refused', 0);
      // The file is shorter than the bound: the refusal comes from the range, not from the file.
      await assert.rejects(store.createFromRange(key, { handle: rangeHandle, start: 0, end: RANGE_UPLOAD_MAX_BYTES + 1 }), RangeError);
      await assert.rejects(store.createFromRange(key, { handle: rangeHandle, start: 10, end: 9 }), RangeError);
      await assert.rejects(store.createFromRange(key, { handle: rangeHandle, start: -1, end: 9 }), RangeError);
      assert.equal(await store.stat(key), undefined);
      await assertOpen(rangeHandle, rangeData);
    });

    it('createFromRange: fails a range past the end of the file without writing anything, and not as a store failure', async () => {
      const key = segmentKey('short', rangeData.length - 10);
      await assert.rejects(store.createFromRange(key, { handle: rangeHandle, start: rangeData.length - 10, end: rangeData.length + 10 }), (error: unknown) => {
        assert.ok(!(error instanceof SharedStoreError), String(error));
        assert.match((error as Error).message, /ends at \d+, before the range's end/);
        return true;
      });
      assert.equal(await store.stat(key), undefined);
      await assertOpen(rangeHandle, rangeData);
    });

    it('createFromRange: uploads by the handle a file renamed after it was opened', async () => {
      const own = randomBytes(300_000);
      const path = file('range-renamed', own);
      const renamed = await openFile(path, 'r');
      try {
        renameSync(path, `${path}.moved`);
        const key = segmentKey('renamed', 1000);
        assert.equal(await store.createFromRange(key, { handle: renamed, start: 1000, end: own.length }), 'created');
        assert.deepEqual(await bytesOf(await store.read(key)), own.subarray(1000));
        await assertOpen(renamed, own);
      } finally {
        await renamed.close();
      }
    });

    it('createFromRange: of 8 concurrent creates of one key exactly one is created, and its bytes are stored', async () => {
      const key = segmentKey('race', 0);
      const ranges = Array.from({ length: 8 }, (_, i) => ({ handle: rangeHandle, start: i * 256 * 1024, end: i * 256 * 1024 + 2 * MiB }));
      const outcomes = await Promise.all(ranges.map((range) => store.createFromRange(key, range)));
      assert.equal(outcomes.filter((o) => o === 'created').length, 1, outcomes.join(' '));
      const winner = ranges[outcomes.indexOf('created')]!;
      assert.equal(sha256((await bytesOf(await store.read(key)))!), sha256(rangeData.subarray(winner.start, winner.end)));
    });

    it('createFromRange: rejects with the abort when its signal was aborted, and creates nothing', async () => {
      const key = segmentKey('aborted-before', 0);
      const controller = new AbortController();
      controller.abort();
      await assert.rejects(store.createFromRange(key, { handle: rangeHandle, start: 0, end: MiB }, controller.signal), (error: unknown) => {
        assert.ok(!(error instanceof SharedStoreError), `the abort, not a store failure: ${String(error)}`);
        return true;
      });
      assert.equal(await store.stat(key), undefined);
      await assertOpen(rangeHandle, rangeData);
    });

    if (backend.elsewhere) {
      it('createFromRange: leaves nothing visible when aborted once its bytes are flowing', async () => {
        const big = randomBytes(RANGE_UPLOAD_MAX_BYTES);
        const bigHandle = await openFile(file('range-aborted', big), 'r');
        // Aborted once 1 MiB of the request went through a relay to the server, not after a guessed time.
        const relay = await countingRelay(Number(new URL(storeEndpoint(backend.config('main/'))).port), MiB);
        const uploader = await open(backend.elsewhere!(relay.port, 30));
        const key = segmentKey('aborted', 0);
        const controller = new AbortController();
        try {
          const upload = uploader.createFromRange(key, { handle: bigHandle, start: 0, end: big.length }, controller.signal);
          upload.catch(() => undefined);
          await relay.reached;
          controller.abort();
          await assert.rejects(upload, (error: unknown) => {
            assert.ok(!(error instanceof SharedStoreError), `the abort, not a store failure: ${String(error)}`);
            return true;
          });
          await assertOpen(bigHandle, big);
        } finally {
          await bigHandle.close();
          await relay.close();
        }
        assert.equal(await store.stat(key), undefined);
        assert.deepEqual((await listAll(store, 'segments/sha256/aborted/')).map((l) => l.key), []);
      });
    }

    it('reads a span', async () => {
      const data = randomBytes(100_000);
      await store.createFromFile('blobs/sha256/span', file('span', data), data.length);
      assert.deepEqual(await bytesOf(await store.read('blobs/sha256/span', { start: 1000, end: 70_999 })), data.subarray(1000, 71_000));
      assert.deepEqual(await bytesOf(await store.read('blobs/sha256/span', { start: 99_999, end: 99_999 })), data.subarray(99_999));
    });

    it('stops a read when its signal aborts', async () => {
      const controller = new AbortController();
      const stream = await store.read('blobs/sha256/big', undefined, controller.signal);
      assert.ok(stream);
      await assert.rejects(async () => {
        for await (const chunk of stream) {
          assert.ok((chunk as Buffer).length > 0);
          controller.abort();
        }
      });
      assert.ok(stream.destroyed);
    });

    it('answers undefined for a missing key: stat, read, readRecord', async () => {
      assert.equal(await store.stat('blobs/sha256/missing'), undefined);
      assert.equal(await store.read('blobs/sha256/missing'), undefined);
      assert.equal(await store.readRecord('records/missing'), undefined);
    });

    it('lists exactly the keys under a prefix, with sizes', async () => {
      await store.writeRecord('list/a/one', Buffer.from('1'));
      await store.writeRecord('list/a/two', Buffer.from('22'));
      await store.writeRecord('list/a/deeper/three', Buffer.from('333'));
      await store.writeRecord('list/ab/not-this', Buffer.from('4444'));
      await store.writeRecord('list/b/nor-this', Buffer.from('55555'));
      const listed = await listAll(store, 'list/a/');
      assert.deepEqual(listed.map((l) => [l.key, l.size]), [['list/a/deeper/three', 3], ['list/a/one', 1], ['list/a/two', 2]]);
      assert.ok(listed.every((l) => l.modified instanceof Date && !Number.isNaN(l.modified.getTime())));
      assert.deepEqual((await listAll(store, 'list/a')).map((l) => l.key), ['list/a/deeper/three', 'list/a/one', 'list/a/two', 'list/ab/not-this']);
      assert.deepEqual(await listAll(store, 'list/none/'), []);
    });

    it('removes idempotently', async () => {
      await store.writeRecord('records/gone', Buffer.from('x'));
      await store.remove('records/gone');
      assert.equal(await store.stat('records/gone'), undefined);
      await store.remove('records/gone');
      await store.remove('records/never-was');
    });

    it('keeps stores with different prefixes apart', async () => {
      const other = await open(backend.config('other/'));
      await store.writeRecord('records/shared-name', Buffer.from('main'));
      await other.writeRecord('records/shared-name', Buffer.from('other'));
      assert.deepEqual(await store.readRecord('records/shared-name'), Buffer.from('main'));
      assert.deepEqual(await other.readRecord('records/shared-name'), Buffer.from('other'));
      assert.deepEqual((await listAll(other, '')).map((l) => l.key), ['records/shared-name']);
      assert.ok(!(await listAll(store, '')).some((l) => l.key.startsWith('other/') || l.key.startsWith('main/')), 'keys are relative to the prefix');
      await other.remove('records/shared-name');
      assert.deepEqual(await store.readRecord('records/shared-name'), Buffer.from('main'));
    });

    it('leaves nothing visible when an upload is aborted once its bytes are flowing', async () => {
      const data = randomBytes(64 * MiB);
      const path = file('aborted', data);
      const controller = new AbortController();
      // Aborted when the upload is under way, not after a guessed time: once 1 MiB went through a
      // relay to the server, or, on a filesystem, once the staged file exists.
      const config = backend.config('main/');
      const relay = backend.elsewhere ? await countingRelay(Number(new URL(storeEndpoint(config)).port), MiB) : undefined;
      const uploader = relay ? await open(backend.elsewhere!(relay.port, 30)) : store;
      const staging = config.filesystem ? watch(join(config.filesystem.path, 'tmp')) : undefined;
      const started = relay ? relay.reached : new Promise<void>((resolve) => staging?.once('change', () => resolve()));
      try {
        const upload = uploader.createFromFile('blobs/sha256/aborted', path, data.length, controller.signal);
        upload.catch(() => undefined);
        await started;
        controller.abort();
        await assert.rejects(upload);
      } finally {
        staging?.close();
        await relay?.close();
      }
      // The rejection is the end of the upload: nothing it sent may become visible after it.
      assert.equal(await store.stat('blobs/sha256/aborted'), undefined);
      assert.deepEqual((await listAll(store, 'blobs/sha256/aborted')).map((l) => l.key), []);
    });

    it('writes and removes a record on condition of the version read: the version read succeeds, a replaced one changes nothing', async () => {
      const key = 'records/versioned';
      await store.writeRecord(key, Buffer.from('first'));
      const first = await store.readVersioned(key);
      assert.deepEqual(first?.body, Buffer.from('first'));
      assert.equal(await store.writeRecord(key, Buffer.from('second'), { ifMatch: first!.version }), true);
      const second = await store.readVersioned(key);
      assert.deepEqual(second?.body, Buffer.from('second'));
      assert.notEqual(second!.version, first!.version);
      assert.equal(await store.writeRecord(key, Buffer.from('third'), { ifMatch: first!.version }), false, 'a write over a replaced version');
      assert.equal(await store.remove(key, { ifMatch: first!.version }), false, 'a removal of a replaced version');
      assert.deepEqual(await store.readVersioned(key), second, 'both left the record as it was');
      assert.equal(await store.remove(key, { ifMatch: second!.version }), true);
      assert.equal(await store.readRecord(key), undefined);
      assert.deepEqual(await listAll(store, key), []);
      assert.equal(await store.writeRecord(key, Buffer.from('again'), { ifMatch: second!.version }), false, 'a write over a removed version');
      // A removal of a removed version removes nothing; what it answers differs (S3 DeleteObject
      // answers 204 for a missing key, If-Match or not).
      await store.remove(key, { ifMatch: second!.version });
      assert.equal(await store.readRecord(key), undefined);
    });

    it(`of 8 concurrent writes${backend.deleteRacesWrites ? '' : ' and a removal'} on condition of one version exactly one succeeds`, async () => {
      for (let round = 0; round < 5; round++) {
        const key = `records/swap-${round}`;
        await store.writeRecord(key, Buffer.from(`base ${round}`));
        const { version } = (await store.readVersioned(key))!;
        const bodies = Array.from({ length: 8 }, (_, i) => Buffer.from(`writer ${i} of round ${round}`));
        const removal = backend.deleteRacesWrites ? [] : [store.remove(key, { ifMatch: version })];
        const outcomes = await Promise.all([...bodies.map((body) => store.writeRecord(key, body, { ifMatch: version })), ...removal]);
        assert.equal(outcomes.filter(Boolean).length, 1, `round ${round}: ${outcomes.join(' ')}`);
        const winner = outcomes.indexOf(true);
        assert.deepEqual(await store.readRecord(key), winner < 8 ? bodies[winner] : undefined, `round ${round}`);
      }
    });

    it('two nodes racing for one stale claim: exactly one takes it over, in each of 20 rounds', async () => {
      const config = backend.config('tier/');
      const view = await open(config);
      const dead = tier(config, 'node-dead', () => Date.now() - 2 * config.fillWaitSeconds * 1000);
      const [a, b] = [tier(config, 'node-a'), tier(config, 'node-b')];
      try {
        for (let round = 0; round < 20; round++) {
          const digest = `sha256:${randomBytes(32).toString('hex')}`;
          // A claim made 2 × fillWaitSeconds ago by a node that died: both nodes find it stale.
          assert.equal(await dead.claim(digest), 'ours');
          const outcomes = await Promise.all([a.claim(digest), b.claim(digest)]);
          assert.deepEqual([...outcomes].sort(), ['ours', 'theirs'], `round ${round}: ${outcomes.join(' ')}`);
          const owner = outcomes[0] === 'ours' ? 'node-a' : 'node-b';
          assert.equal(claimOwner(await view.readRecord(sharedKeys.claim(digest))), owner);
        }
      } finally {
        for (const t of [dead, a, b]) await t.close();
      }
    });

    it('a release by a node whose stale claim was taken over meanwhile leaves the new owner its claim', async () => {
      const config = backend.config('tier/');
      // The old owner's release reads its claim, then removes it only after the new owner took it
      // over: the order of a release racing a takeover, made certain.
      let takenOver: () => void = () => undefined;
      const tookOver = new Promise<void>((resolve) => (takenOver = resolve));
      const old = tier(config, 'node-old', () => Date.now() - 2 * config.fillWaitSeconds * 1000, (s) => new Ordered(s, { removeAfter: tookOver }));
      const [b, c] = [tier(config, 'node-b'), tier(config, 'node-c')];
      const view = await open(config);
      try {
        const digest = `sha256:${randomBytes(32).toString('hex')}`;
        assert.equal(await old.claim(digest), 'ours');
        const [, outcome] = await Promise.all([old.release(digest), b.claim(digest).finally(takenOver)]);
        assert.equal(outcome, 'ours');
        assert.equal(claimOwner(await view.readRecord(sharedKeys.claim(digest))), 'node-b', 'the new owner\'s claim is there');
        assert.equal(await c.claim(digest), 'theirs', 'a third node waits for the new owner');
      } finally {
        for (const t of [old, b, c]) await t.close();
      }
    });

    it('a node whose stale claim was taken over does not renew it: the new owner keeps its claim', async () => {
      // fillWaitSeconds at its least (10): a renewal every 3.3 s.
      const config = { ...backend.config('tier/'), fillWaitSeconds: 10 };
      let renewed: () => void = () => undefined;
      const renewal = new Promise<void>((resolve) => (renewed = resolve));
      let watching = false;
      let store: Ordered | undefined;
      const old = tier(config, 'node-old', () => Date.now() - 2 * config.fillWaitSeconds * 1000, (s) => (store = new Ordered(s, { afterRead: () => watching && renewed() })));
      const b = tier(config, 'node-b');
      const view = await open(config);
      const digest = `sha256:${randomBytes(32).toString('hex')}`;
      try {
        assert.equal(await old.claim(digest), 'ours');
        assert.equal(await b.claim(digest), 'ours', 'the old claim is stale to node-b: taken over');
        const writesBefore = store!.writes.length;
        watching = true;
        const stop = old.keepClaim(digest, () => true);
        await renewal;
        stop();
        await Promise.all(store!.writes);
        assert.equal(store!.writes.length, writesBefore, 'node-old wrote nothing');
        assert.equal(claimOwner(await view.readRecord(sharedKeys.claim(digest))), 'node-b');
      } finally {
        for (const t of [old, b]) await t.close();
      }
    });

    for (const [how, config] of backend.alternatives ?? []) {
      it(`works ${how}`, async () => {
        const alternative = await open(config());
        const data = randomBytes(200_000);
        assert.equal(await alternative.createFromFile(`alternative/${how}`, file('alternative', data), data.length), 'created');
        assert.deepEqual(await bytesOf(await store.read(`alternative/${how}`)), data, 'the same store');
        assert.equal(await alternative.writeRecord(`alternative/${how}.record`, Buffer.from(how), { ifAbsent: true }), true);
        assert.deepEqual(await alternative.readRecord(`alternative/${how}.record`), Buffer.from(how));
        assert.deepEqual((await listAll(alternative, `alternative/${how}`)).map((l) => l.key), [`alternative/${how}`, `alternative/${how}.record`]);
        await alternative.remove(`alternative/${how}`);
        assert.equal(await store.stat(`alternative/${how}`), undefined);
      });
    }

    if (backend.deniedConfig) {
      it("answers 'denied' for wrong credentials", async () => {
        const denied = await open(backend.deniedConfig!());
        await rejectsWith(denied.stat('records/anything'), 'denied');
        await rejectsWith(denied.writeRecord('records/anything', Buffer.from('x'), { ifAbsent: true }), 'denied');
      });
    }

    if (backend.missingCredentialFileConfig) {
      it("answers 'denied' at open for a credential file that is not there", async () => {
        await rejectsWith(openSharedStore(backend.missingCredentialFileConfig!()), 'denied');
      });
    }

    if (backend.missingBucketConfig) {
      it("answers 'error' for a missing bucket or container, not 'missing key'", async () => {
        const nowhere = await open(backend.missingBucketConfig!());
        if (!backend.readsMissingBucketAsMissingKey) await rejectsWith(nowhere.readRecord('records/anything'), 'error');
        await rejectsWith(nowhere.writeRecord('records/anything', Buffer.from('x')), 'error');
      });
    }

    if (backend.elsewhere) {
      it("answers 'timeout' when the store accepts connections and never answers", async () => {
        const hole = await blackHole();
        const hungHandle = await openFile(file('hung-range', Buffer.alloc(1000)), 'r');
        try {
          const hung = await open(backend.elsewhere!(hole.port, 1));
          for (const [what, operation] of [
            ['stat', () => hung.stat('records/anything')],
            ['read', () => hung.read('blobs/sha256/anything', { start: 0, end: 9 })],
            ['readRecord', () => hung.readRecord('records/anything')],
            ['list', () => listAll(hung, 'records/')],
            ['writeRecord', () => hung.writeRecord('records/anything', Buffer.from('x'), { ifAbsent: true })],
            ['createFromFile', () => hung.createFromFile('blobs/sha256/anything', file('hung', Buffer.alloc(1000)), 1000)],
            ['createFromRange', () => hung.createFromRange(segmentKey('anything', 0), { handle: hungHandle, start: 0, end: 1000 })],
          ] as const) {
            // 'timeout', not a hang (the test's own timeout would end that) nor another failure:
            // timeoutSeconds ended the call.
            await rejectsWith(operation(), 'timeout', what);
          }
        } finally {
          await hole.close();
          await hungHandle.close();
        }
      });

      it("answers 'unreachable' once the server is stopped, not 'timeout' after timeoutSeconds", async () => {
        const port = Number(new URL(storeEndpoint(backend.config('main/'))).port);
        // Opened first: the credential files go with the server's directory. A refused connection
        // must end the call as 'unreachable' at once: a call that waited out its timeoutSeconds
        // would end as 'timeout', which fails here.
        const gone = await open(backend.elsewhere!(port, 30));
        await backend.stop();
        await rejectsWith(gone.stat('records/anything'), 'unreachable');
        await rejectsWith(gone.readRecord('records/anything'), 'unreachable');
      });
    }
  });
}

function storeEndpoint(config: SharedConfig): string {
  const endpoint = config.s3?.endpoint ?? config.azure?.endpoint ?? config.gcs?.endpoint;
  if (!endpoint) throw new Error('no endpoint');
  return endpoint;
}

// The filesystem backend: a temp directory standing in for the ReadWriteMany volume.
{
  let root = '';
  conformance({
    name: 'filesystem',
    start: async () => {
      root = mkdtempSync(join(tmpdir(), 'pullbridge-shared-fs-'));
    },
    config: (prefix) => ({ ...base, filesystem: { path: join(root, prefix) } }),
    stop: async () => rmSync(root, { recursive: true, force: true }),
  });
}

describe('shared store: filesystem staging', () => {
  it('removes temp files and locks a dead writer left a day ago at open, and keeps recent ones', async () => {
    const root = mkdtempSync(join(tmpdir(), 'pullbridge-shared-fs-'));
    try {
      await openSharedStore({ ...base, filesystem: { path: root } });
      writeFileSync(join(root, 'tmp', 'old'), 'partial');
      writeFileSync(join(root, 'tmp', 'recent'), 'partial');
      utimesSync(join(root, 'tmp', 'old'), new Date(Date.now() - 25 * 3_600_000), new Date(Date.now() - 25 * 3_600_000));
      // Locks of conditional replaces: one a writer that died left a day ago, one just taken.
      mkdirSync(join(root, 'tmp', 'locks'));
      writeFileSync(join(root, 'tmp', 'locks', 'old'), 'dead-node 1\n');
      writeFileSync(join(root, 'tmp', 'locks', 'recent'), 'live-node 2\n');
      utimesSync(join(root, 'tmp', 'locks', 'old'), new Date(Date.now() - 25 * 3_600_000), new Date(Date.now() - 25 * 3_600_000));
      const store = await openSharedStore({ ...base, filesystem: { path: root } });
      assert.deepEqual(readdirSync(join(root, 'tmp')).sort(), ['locks', 'recent']);
      assert.deepEqual(readdirSync(join(root, 'tmp', 'locks')), ['recent']);
      assert.deepEqual(await listAll(store, ''), [], 'staging is not listed');
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});

describe('shared store: filesystem conditional replace', function () {
  this.timeout(180_000);
  let root: string;
  beforeEach(() => {
    root = mkdtempSync(join(tmpdir(), 'pullbridge-shared-fs-'));
  });
  afterEach(() => rmSync(root, { recursive: true, force: true }));
  const lockOf = (key: string) => join(root, 'tmp', 'locks', sha256(Buffer.from(key)));

  it('a reader sees the record on every read, never an older one, while 3 processes make 240 conditional rewrites of it, and no rewrite is lost', async () => {
    const store = await openSharedStore({ ...base, filesystem: { path: root } });
    const key = 'claims/sha256/counted';
    await store.writeRecord(key, Buffer.from('0'));
    // Each writer process increments the counter on condition of the version it read, until it
    // made its share: a lost update (two winners over one version) leaves the counter short.
    const module = new URL('../src/cache/shared/filesystem.js', import.meta.url).href;
    const script = `
      const { openFilesystemStore } = await import(process.argv[1]);
      const store = await openFilesystemStore(process.argv[2]);
      const key = process.argv[3];
      for (let left = Number(process.argv[4]); left > 0; ) {
        const found = await store.readVersioned(key);
        if (!found) throw new Error('writer saw no record');
        const next = String(Number(found.body.toString()) + 1);
        if (await store.writeRecord(key, Buffer.from(next), { ifMatch: found.version })) left--;
      }`;
    const [writers, share] = [3, 80];
    const exits = Array.from({ length: writers }, () => {
      const child = spawn(process.execPath, ['--input-type=module', '-e', script, module, root, key, String(share)], { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
      return new Promise<string>((resolve) => child.on('exit', (code) => resolve(code === 0 ? '' : `writer exited ${code}: ${stderr}`)));
    });
    let running = writers;
    const done = Promise.all(exits.map((exit) => exit.finally(() => running--)));
    const problems: string[] = [];
    const seen = new Set<number>();
    let [reads, last] = [0, 0];
    while (running > 0) {
      reads++;
      try {
        const found = await store.readVersioned(key);
        if (!found) {
          problems.push(`read ${reads}: no record`);
          continue;
        }
        const value = Number(found.body.toString());
        if (value < last) problems.push(`read ${reads}: ${value} after ${last}`);
        last = value;
        seen.add(value);
      } catch (error) {
        problems.push(`read ${reads}: ${String(error)}`);
      }
    }
    assert.deepEqual((await done).filter(Boolean), [], 'every writer finished');
    assert.deepEqual(problems.slice(0, 10), [], `${problems.length} of ${reads} reads`);
    assert.equal(Number((await store.readRecord(key))!.toString()), writers * share, 'every rewrite counted once');
    assert.ok([...seen].some((value) => value > 0 && value < writers * share), `the reads overlapped the rewrites: saw ${[...seen].sort((a, b) => a - b).join(' ')}`);
    assert.deepEqual(readdirSync(join(root, 'tmp', 'locks')), [], 'every lock dropped');
  });

  it('breaks a lock a dead writer left, and takes and drops its own', async () => {
    const store = await openSharedStore({ ...base, filesystem: { path: root } });
    const key = 'claims/sha256/dead-lock';
    await store.writeRecord(key, Buffer.from('first'));
    const { version } = (await store.readVersioned(key))!;
    mkdirSync(join(root, 'tmp', 'locks'), { recursive: true });
    writeFileSync(lockOf(key), 'dead-node 4242\n');
    const minuteAgo = new Date(Date.now() - 60_000);
    utimesSync(lockOf(key), minuteAgo, minuteAgo);
    assert.equal(await store.writeRecord(key, Buffer.from('second'), { ifMatch: version }), true);
    assert.deepEqual(await store.readRecord(key), Buffer.from('second'));
    assert.deepEqual(readdirSync(join(root, 'tmp', 'locks')), [], 'the dead lock broken, ours dropped');
    assert.deepEqual(readdirSync(join(root, 'tmp')), ['locks'], 'nothing left in staging');
  });

  it('waits for a lock another writer holds, without breaking it, and replaces once it is dropped', async () => {
    const store = await openSharedStore({ ...base, filesystem: { path: root } });
    const key = 'claims/sha256/held-lock';
    await store.writeRecord(key, Buffer.from('first'));
    const { version } = (await store.readVersioned(key))!;
    mkdirSync(join(root, 'tmp', 'locks'), { recursive: true });
    writeFileSync(lockOf(key), 'live-node 4242\n');
    const replaced = store.writeRecord(key, Buffer.from('second'), { ifMatch: version });
    // The waiting writer's lock file (beside its staged record) is written anew while it waits:
    // seen twice, the writer has looked at the held lock for a while.
    const staged = () => readdirSync(join(root, 'tmp')).filter((name) => name !== 'locks');
    const names = new Set<string>();
    for (let polls = 0; names.size < 3; polls++) {
      assert.ok(polls < 3000, `the writer never waited: staged ${[...names].join(' ')}`);
      for (const name of staged()) names.add(name);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    assert.deepEqual(await store.readRecord(key), Buffer.from('first'), 'nothing replaced while the lock is held');
    assert.equal(readFileSync(lockOf(key), 'utf8'), 'live-node 4242\n', 'the held lock stands');
    rmSync(lockOf(key));
    assert.equal(await replaced, true);
    assert.deepEqual(await store.readRecord(key), Buffer.from('second'));
  });

  it('takes no lock through a symbolic link planted as the lock directory: the replace fails, nothing is written outside the store', async () => {
    const outside = mkdtempSync(join(tmpdir(), 'pullbridge-shared-outside-'));
    try {
      const store = await openSharedStore({ ...base, filesystem: { path: root } });
      const key = 'claims/sha256/planted-locks';
      await store.writeRecord(key, Buffer.from('first'));
      const { version } = (await store.readVersioned(key))!;
      symlinkSync(outside, join(root, 'tmp', 'locks'));
      await rejectsWith(store.writeRecord(key, Buffer.from('second'), { ifMatch: version }), 'error');
      assert.deepEqual(readdirSync(outside), [], 'nothing linked outside the store');
      assert.deepEqual(await store.readRecord(key), Buffer.from('first'));
    } finally {
      rmSync(outside, { recursive: true, force: true });
    }
  });
});

describe('shared store: filesystem segments', () => {
  it('removes segments a dead filler left a day ago at open (and their emptied directories), keeps recent ones, follows no link', async () => {
    const root = mkdtempSync(join(tmpdir(), 'pullbridge-shared-fs-'));
    const outside = mkdtempSync(join(tmpdir(), 'pullbridge-shared-outside-'));
    const dayAgo = new Date(Date.now() - 25 * 3_600_000);
    const old = (path: string) => utimesSync(path, dayAgo, dayAgo);
    try {
      const first = await openSharedStore({ ...base, filesystem: { path: root } });
      const source = join(outside, 'source');
      writeFileSync(source, randomBytes(4096));
      const fileHandle = await openFile(source, 'r');
      try {
        // A dead filler's chain (old segments in a directory untouched since), a running fill's
        // chain (recent), and a directory with one of each.
        for (const [blob, offset] of [['dead', 0], ['dead', 1024], ['live', 0], ['mixed', 0], ['mixed', 1024]] as const) {
          assert.equal(await first.createFromRange(segmentKey(blob, offset), { handle: fileHandle, start: offset, end: offset + 1024 }), 'created');
        }
      } finally {
        await fileHandle.close();
      }
      const segments = join(root, 'segments', 'sha256');
      for (const name of readdirSync(join(segments, 'dead'))) old(join(segments, 'dead', name));
      old(join(segments, 'dead'));
      old(join(segments, 'mixed', '0000000000000000'));
      // An old file outside the store, behind a symbolic link planted under segments/: not followed.
      writeFileSync(join(outside, 'victim'), 'not the store\'s');
      old(join(outside, 'victim'));
      symlinkSync(outside, join(segments, 'planted'));
      mkdirSync(join(root, 'segments', 'sha512'));

      const store = await openSharedStore({ ...base, filesystem: { path: root } });
      assert.deepEqual((await listAll(store, 'segments/')).map((l) => l.key), [segmentKey('live', 0), segmentKey('mixed', 1024)]);
      assert.deepEqual(readdirSync(segments).sort(), ['live', 'mixed', 'planted'], 'the dead chain\'s directory went with its segments');
      assert.deepEqual(readdirSync(outside).sort(), ['source', 'victim'], 'nothing outside the store removed');
      assert.ok(readdirSync(join(root, 'segments')).includes('sha512'), 'a recent empty directory stays');
    } finally {
      rmSync(root, { recursive: true, force: true });
      rmSync(outside, { recursive: true, force: true });
    }
  });
});

// S3 on versitygw, path-style (no per-bucket hostnames, which would need DNS).
{
  let server: S3Server | undefined;
  const s3 = (prefix: string, endpoint: string, secretKeyFile: string) => ({
    bucket: server!.bucket,
    region: 'us-east-1',
    endpoint,
    forcePathStyle: true,
    prefix,
    accessKeyFile: server!.accessKeyFile,
    secretKeyFile,
  });
  conformance({
    name: 's3 (versitygw)',
    start: async () => {
      server = await startVersitygw();
    },
    // Its DeleteObject evaluates If-Match on the file it stats, then removes it, holding nothing a
    // concurrent PutObject waits on (backend/posix/posix.go, v1.8.0): a removal and a write of one
    // version both succeeded in 2 of 15 runs. Amazon S3 evaluates the condition atomically.
    deleteRacesWrites: true,
    config: (prefix) => ({ ...base, s3: s3(prefix, server!.endpoint, server!.secretKeyFile) }),
    deniedConfig: () => ({ ...base, s3: s3('main/', server!.endpoint, server!.wrongSecretKeyFile) }),
    missingCredentialFileConfig: () => ({ ...base, s3: s3('main/', server!.endpoint, '/nonexistent/secret') }),
    missingBucketConfig: () => ({ ...base, s3: { ...s3('main/', server!.endpoint, server!.secretKeyFile), bucket: 'no-such-bucket' } }),
    elsewhere: (port, timeoutSeconds) => ({ ...base, timeoutSeconds, s3: s3('main/', `http://127.0.0.1:${port}`, server!.secretKeyFile) }),
    stop: async () => server?.stop(),
  });
}

// Azure Blob on Azurite, path-style account URL; the container is made with the SDK, and an account
// SAS token (with a leading "?", as the portal copies it) is made from the account key.
{
  let server: AzureServer | undefined;
  let files = '';
  const container = 'pullbridge-test';
  const azure = (prefix: string, endpoint: string, accountKeyFile: string) => ({ container, accountName: server!.accountName, accountKeyFile, endpoint, prefix });
  conformance({
    name: 'azure (Azurite)',
    start: async () => {
      server = await startAzurite();
      const credential = new StorageSharedKeyCredential(server.accountName, readFileSync(server.accountKeyFile, 'utf8').trim());
      await new BlobServiceClient(server.endpoint, credential).getContainerClient(container).create();
      files = mkdtempSync(join(tmpdir(), 'pullbridge-azure-files-'));
      const sas = generateAccountSASQueryParameters(
        { expiresOn: new Date(Date.now() + 3_600_000), permissions: AccountSASPermissions.parse('rwdlc'), resourceTypes: AccountSASResourceTypes.parse('sco').toString(), services: AccountSASServices.parse('b').toString() },
        credential,
      );
      writeFileSync(join(files, 'sas'), `?${sas.toString()}\n`);
      writeFileSync(join(files, 'account'), `${server.accountName}\n`);
    },
    alternatives: [
      ['with a SAS token file', () => ({ ...base, azure: { container, accountName: server!.accountName, sasTokenFile: join(files, 'sas'), endpoint: server!.endpoint, prefix: 'main/' } })],
      ['with the account name from a file', () => ({ ...base, azure: { container, accountNameFile: join(files, 'account'), accountKeyFile: server!.accountKeyFile, endpoint: server!.endpoint, prefix: 'main/' } })],
    ],
    config: (prefix) => ({ ...base, azure: azure(prefix, server!.endpoint, server!.accountKeyFile) }),
    deniedConfig: () => ({ ...base, azure: azure('main/', server!.endpoint, server!.wrongAccountKeyFile) }),
    missingCredentialFileConfig: () => ({ ...base, azure: azure('main/', server!.endpoint, '/nonexistent/account-key') }),
    missingBucketConfig: () => ({ ...base, azure: { ...azure('main/', server!.endpoint, server!.accountKeyFile), container: 'no-such-container' } }),
    elsewhere: (port, timeoutSeconds) => ({ ...base, timeoutSeconds, azure: azure('main/', `http://127.0.0.1:${port}/${server!.accountName}`, server!.accountKeyFile) }),
    stop: async () => {
      await server?.stop();
      if (files) rmSync(files, { recursive: true, force: true });
    },
  });
}

// GCS on fake-gcs-server. It checks no credentials at all, so there is no 'denied' case.
{
  let server: GcsServer | undefined;
  const gcs = (prefix: string, endpoint: string) => ({ bucket: server!.bucket, endpoint, prefix });
  conformance({
    name: 'gcs (fake-gcs-server)',
    start: async () => {
      server = await startFakeGcs();
    },
    config: (prefix) => ({ ...base, gcs: gcs(prefix, server!.endpoint) }),
    readsMissingBucketAsMissingKey: true,
    missingCredentialFileConfig: () => ({ ...base, gcs: { ...gcs('main/', server!.endpoint), keyFile: '/nonexistent/key.json' } }),
    missingBucketConfig: () => ({ ...base, gcs: { ...gcs('main/', server!.endpoint), bucket: 'no-such-bucket' } }),
    elsewhere: (port, timeoutSeconds) => ({ ...base, timeoutSeconds, gcs: gcs('main/', `http://127.0.0.1:${port}`) }),
    stop: async () => server?.stop(),
  });
}

// The S3 store's own multipart upload (parts read into reused buffers): what a failed or refused one
// leaves on the store, seen with the store's own ListMultipartUploads.
describe('shared store: s3 (versitygw) multipart uploads leave no parts behind', function () {
  let server: S3Server;
  let store: SharedStore;
  let client: S3Client;
  let dir: string;
  before(async () => {
    server = await startVersitygw();
    dir = mkdtempSync(join(tmpdir(), 'pullbridge-s3-multipart-'));
    const config = { bucket: server.bucket, region: 'us-east-1', endpoint: server.endpoint, forcePathStyle: true, prefix: 'mp/', accessKeyFile: server.accessKeyFile, secretKeyFile: server.secretKeyFile };
    store = await openSharedStore({ ...base, s3: config });
    const credentials = { accessKeyId: readFileSync(server.accessKeyFile, 'utf8').trim(), secretAccessKey: readFileSync(server.secretKeyFile, 'utf8').trim() };
    client = new S3Client({ region: 'us-east-1', endpoint: server.endpoint, forcePathStyle: true, credentials });
  });
  after(async () => {
    client?.destroy();
    await store?.close();
    await server?.stop();
    rmSync(dir, { recursive: true, force: true });
  });
  const uploadsInProgress = async () => (await client.send(new ListMultipartUploadsCommand({ Bucket: server.bucket }))).Uploads ?? [];

  it('a file that ends before the size given: a local file error, no object, no upload left in progress', async () => {
    const path = join(dir, 'short');
    writeFileSync(path, randomBytes(20 * MiB));
    await assert.rejects(store.createFromFile('blobs/sha256/short', path, 30 * MiB), (error: Error) => error instanceof LocalFileError && /ends at/.test(error.message));
    assert.equal(await store.stat('blobs/sha256/short'), undefined);
    assert.deepEqual(await uploadsInProgress(), []);
  });

  it('a create on a key taken meanwhile: exists, the object keeps its bytes, no upload left in progress', async () => {
    const first = randomBytes(17 * MiB + 5);
    const second = randomBytes(17 * MiB + 5);
    writeFileSync(join(dir, 'first'), first);
    writeFileSync(join(dir, 'second'), second);
    assert.equal(await store.createFromFile('blobs/sha256/taken', join(dir, 'first'), first.length), 'created');
    assert.equal(await store.createFromFile('blobs/sha256/taken', join(dir, 'second'), second.length), 'exists');
    assert.equal(sha256((await bytesOf(await store.read('blobs/sha256/taken')))!), sha256(first));
    assert.deepEqual(await uploadsInProgress(), []);
  });
});

// The filesystem store copies a blob through one buffer (its thread-pool jobs stay short): a local
// file that does not have the size it was given is the caller's failure, and nothing is published.
describe('shared store: filesystem, a blob copied from a local file of the wrong size', function () {
  let dir: string;
  let store: SharedStore;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'pullbridge-fs-copy-'));
    mkdirSync(join(dir, 'store'));
    store = await openSharedStore({ ...base, filesystem: { path: join(dir, 'store') } });
  });
  after(async () => {
    await store?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  for (const [how, actual, given] of [
    ['shorter', 3 * MiB + 1, 5 * MiB],
    ['longer', 5 * MiB, 3 * MiB + 1],
  ] as const) {
    it(`a file ${how} than the size given: a local file error, no object, nothing staged`, async () => {
      const path = join(dir, how);
      writeFileSync(path, randomBytes(actual));
      await assert.rejects(store.createFromFile(`blobs/sha256/${how}`, path, given), (error: Error) => error instanceof LocalFileError && error.message.includes(`blobs/sha256/${how}`));
      assert.equal(await store.stat(`blobs/sha256/${how}`), undefined);
      assert.deepEqual(readdirSync(join(dir, 'store', 'tmp')), []);
    });
  }

  it('copies a file of exactly the size given, byte for byte, across several of its buffers', async () => {
    const data = randomBytes(3 * MiB + 12_345);
    writeFileSync(join(dir, 'exact'), data);
    assert.equal(await store.createFromFile('blobs/sha256/exact', join(dir, 'exact'), data.length), 'created');
    assert.equal(sha256((await bytesOf(await store.read('blobs/sha256/exact')))!), sha256(data));
    assert.deepEqual(readdirSync(join(dir, 'store', 'tmp')), []);
  });
});
