// One blob on its way from the upstream into the node store, with every client that wants it
// reading the growing file (single flight: one upstream transfer however many clients ask).
//
// The upstream body is written to the store's temporary file as fast as the upstream sends it;
// readers follow the file at their own pace, and a reader that caught up takes the chunks still on
// their way into the file from memory (no read-back). The last byte is held back from readers
// until the whole blob hashed to its digest, so a cut or corrupt transfer never reaches a client
// as a complete body. The fill goes on while anyone reads; when the last reader leaves before the end,
// the upstream transfer is stopped and nothing is stored.
//
// A fill writes within the room it reserved on the cache disk (its Content-Length, or in steps as
// a chunked body grows). When it needs more and the disk limits refuse, it stops storing and turns
// into a relay: what is in the file stays readable, the rest goes from the upstream through memory
// to every reader of the fill (relaytail.ts), verified as before, and nothing is kept.

import { open, type FileHandle } from 'node:fs/promises';
import type { ContentBody } from '../content/source.js';
import type { BodySink } from '../upstream/body.js';
import { fileBody, type FileExtent } from './filebody.js';
import { RelayTail, type TailCursor } from './relaytail.js';
import type { BlobFill, BlobLease, DiskReservation, FillOutcome, NodeStore } from './store.js';
import { once } from '../once.js';

/** Bytes received from the upstream and not yet written to the file before the upstream is paused. */
const WRITE_QUEUE_BYTES = 1024 * 1024;
/**
 * Chunks received and not yet written before the upstream is paused, whatever their size: a body in
 * tiny chunks (a chunked encoding of 1-byte chunks) would otherwise queue a view and a hold per byte,
 * a million of them within WRITE_QUEUE_BYTES. Reads of a socket (up to 128 KiB) never come near it.
 */
const WRITE_QUEUE_CHUNKS = 1024;
/**
 * The least a reader takes from memory in one piece. Smaller chunks (a capped tunnel's socket reads,
 * a store download's) wait for the file, where one read takes what accumulated: delivered one by
 * one they cost a client write each (measured: 8 nodes behind a 500 Mbit/s cap spent more CPU,
 * their clients too).
 */
const LIVE_MIN_BYTES = 64 * 1024;

/** Room without bounds, for a store used without limits. */
const UNBOUNDED: DiskReservation = { bytes: Number.MAX_SAFE_INTEGER, wrote: () => undefined, grow: () => Promise.resolve(true), release: () => undefined };

export interface FlightOrigin {
  readonly rule: string;
  readonly repository: string;
}

export class BlobFlight implements FileExtent {
  private readers = 0;
  /** The whole blob is written and hashed right: readers may have its last byte. */
  private verified = false;
  private result: FillOutcome | undefined;
  private failure: Error | undefined;
  private lease: BlobLease | null = null;
  private readonly listeners = new Set<() => void>();
  /** Readers, told of each chunk received (the publisher is not: it reads only the file). */
  private readonly liveListeners = new Set<() => void>();
  /** The blob's size, from the upstream's Content-Length; undefined when it sent none. */
  private size: number | undefined;
  /** Chunks received and not yet written (held until written), in order: what a caught-up reader takes. */
  private unwritten: Array<{ readonly start: number; readonly chunk: Buffer }> = [];
  /** Bytes received from the upstream. */
  private received = 0;
  private fill: BlobFill | undefined;
  private upstream: ContentBody | undefined;
  /** Set once the fill stopped storing for lack of room: the rest of the blob, relayed. */
  private tail: RelayTail | undefined;
  /** Where each reader is, for the relayed tail. */
  private readonly cursors = new Set<TailCursor>();
  /** Settles when the fill stored the blob or gave up. */
  readonly done: Promise<FillOutcome>;
  /** Settles once `done` did and `afterDone` ran (the filler's bookkeeping: link, eviction): true
   * when the blob is stored. Readers may have had the last byte before, as soon as it was verified. */
  readonly stored: Promise<boolean>;
  private settle!: (outcome: FillOutcome) => void;
  /** Resolves once the upstream answered and the fill started; rejects if it never does. */
  private readonly started: Promise<void>;
  private markStarted!: () => void;
  private markNotStarted!: (error: Error) => void;

  constructor(
    readonly digest: string,
    readonly origin: FlightOrigin,
    /** Aborts the upstream request; not any client's signal (a client leaving must not stop the others). */
    readonly controller: AbortController,
    private readonly store: NodeStore,
    afterDone: (outcome: FillOutcome) => Promise<void> = () => Promise.resolve(),
    /** Hears of a failure before any reader does (a reader's retry must find its consequences in place). */
    private readonly beforeFailing: (failure: { readonly reason: string; readonly corrupt?: true }) => void = () => undefined,
  ) {
    this.done = new Promise((resolve) => (this.settle = resolve));
    this.stored = this.done.then(async (outcome) => {
      await afterDone(outcome).catch(() => undefined);
      return outcome.stored;
    });
    this.started = new Promise<void>((resolve, reject) => {
      this.markStarted = resolve;
      this.markNotStarted = reject;
    });
    this.started.catch(() => undefined);
  }

  /** Representation headers the upstream answered with, for every reader; set by start(). */
  headers: Readonly<Record<string, string>> = {};

  /** Whether another client may join (not once it relays: the bytes before the tail are gone). */
  get joinable(): boolean {
    return this.tail === undefined;
  }

  /** Whether the fill stopped storing for lack of room and relays the rest. */
  get relaying(): boolean {
    return this.tail !== undefined;
  }

  /**
   * Writes `body` into `fill` in order, each chunk held (it may be a view into a reused socket
   * buffer) until its write is done; the upstream is paused while more than WRITE_QUEUE_BYTES wait.
   * Writes stay within `reservation` (grown as needed; released when the fill ends), else the fill
   * turns into a relay.
   */
  start(fill: BlobFill, body: ContentBody, headers: Readonly<Record<string, string>>, reservation: DiskReservation = UNBOUNDED): void {
    this.fill = fill;
    this.upstream = body;
    this.headers = headers;
    const length = Number(headers['content-length']);
    this.size = Number.isSafeInteger(length) && length > 0 ? length : undefined;
    void this.done.then(() => reservation.release());
    this.markStarted();
    fill.once('verified', () => {
      this.verified = true;
      this.notify();
    });
    // Chunks wait here (held) while a write is in progress; each write takes all that waits, in
    // one writev: a write per socket read cost a thread-pool round trip per 128 KiB.
    let waiting: Buffer[] = [];
    let waitingBytes = 0;
    let writing: Promise<void> | undefined;
    let ended = false;
    let paused = false;
    const releases: Array<() => void> = [];
    const writeWaiting = (): void => {
      if (writing || waiting.length === 0) return;
      const batch = waiting;
      const held = releases.splice(0, batch.length);
      let batchBytes = 0;
      for (const chunk of batch) batchBytes += chunk.length;
      waiting = [];
      waitingBytes = 0;
      const needed = fill.written + batchBytes;
      const room = this.failure || needed <= reservation.bytes ? undefined : reservation.grow(needed);
      const write = async (): Promise<void> => {
        if (this.failure) return;
        if (room && !(await room)) return relay(batch);
        await fill.appendv(batch);
        reservation.wrote(fill.written);
      };
      writing = write().then(
        () => {
          // Written: readers take these from the file now (before the holds go).
          while (this.unwritten.length > 0 && this.unwritten[0]!.start + this.unwritten[0]!.chunk.length <= fill.written) this.unwritten.shift();
          for (const release of held) release();
          writing = undefined;
          if (this.tail) return;
          this.notify();
          if (waiting.length > 0) writeWaiting();
          else if (ended) return finish();
          // Last: resuming may deliver more data, and the end, at once.
          if (paused && waitingBytes <= WRITE_QUEUE_BYTES / 2 && waiting.length <= WRITE_QUEUE_CHUNKS / 2) {
            paused = false;
            body.resume();
          }
        },
        (error: Error) => {
          this.fail(error);
          for (const release of held) release();
          // Nothing more is written: the chunks waiting for this write are let go too (else their
          // buffers, the upstream's pooled reads, stay held for good).
          for (const release of releases.splice(0)) release();
          waiting = [];
          waitingBytes = 0;
        },
      );
    };
    /** No room for `batch`: the file stays as it is, and it and what follows go through memory
     * (copied there: the batch's holds are released by the write's caller). */
    const relay = (batch: readonly Buffer[]): void => {
      const tail = new RelayTail(fill.written, fill.path, this.digest, this.cursors, () => body.resume());
      this.tail = tail;
      this.unwritten = [];
      let more = true;
      for (const chunk of [...batch, ...waiting]) more = tail.push(chunk);
      for (const release of releases.splice(0)) release();
      waiting = [];
      waitingBytes = 0;
      if (ended) tail.upstreamEnd();
      else if (paused && more) {
        paused = false;
        body.resume();
      }
      tail.watch(() => {
        if (tail.complete && this.readers === 0) this.relayed();
      });
      this.notify();
    };
    const finish = (): void => {
      if (this.result || this.failure) return;
      fill.finish().then(
        (outcome) => {
          if (outcome.stored) this.complete(outcome);
          else this.fail(new Error(outcome.reason), outcome.corrupt);
        },
        (error: Error) => this.fail(error),
      );
    };
    body.attach({
      data: (chunk) => {
        if (chunk.length === 0 || this.failure) return true;
        // A body longer than its Content-Length fails here, whatever its hash: the hold-back of the
        // last byte rests on that length.
        if (this.size !== undefined && this.received + chunk.length > this.size) {
          this.fail(new Error(`the upstream sent more than its Content-Length of ${this.size} bytes`));
          return false;
        }
        const start = this.received;
        this.received += chunk.length;
        if (this.tail) return this.tail.push(chunk);
        releases.push(body.hold(chunk));
        waiting.push(chunk);
        waitingBytes += chunk.length;
        // Only a chunk a reader may take from memory is kept for it, and wakes the readers.
        const live = this.size !== undefined && chunk.length >= LIVE_MIN_BYTES;
        if (live) this.unwritten.push({ start, chunk });
        writeWaiting();
        if (waitingBytes > WRITE_QUEUE_BYTES || waiting.length > WRITE_QUEUE_CHUNKS) paused = true;
        if (live) for (const listener of [...this.liveListeners]) listener();
        return !paused;
      },
      end: () => {
        if (this.size !== undefined && this.received !== this.size) return this.fail(new Error(`the upstream's body ended at ${this.received} of its Content-Length of ${this.size} bytes`));
        ended = true;
        if (this.tail) this.tail.upstreamEnd();
        else if (!writing) finish();
      },
      error: (error) => this.fail(error),
    });
  }

  /** Gives up before the upstream answered (it refused, or failed). */
  abandon(error: Error): void {
    this.fail(error);
  }

  /** Bytes in the file that readers may have (the blob's last byte is held back until verified). */
  readable(): number {
    if (this.tail) return this.tail.end;
    const written = this.fill?.written ?? 0;
    if (this.verified) return written;
    return Math.max(0, Math.min(written, (this.size ?? written) - 1));
  }

  /**
   * Received bytes at `from`, not in the file yet, that readers may have: a view of the chunk being
   * written (valid during the call; `holdLive` for longer), of at least LIVE_MIN_BYTES. Up to the
   * blob's last byte, which comes from the file once verified; none without a Content-Length (the
   * last byte is not known then).
   */
  live(from: number): Buffer | undefined {
    if (this.tail || this.failure || this.size === undefined || from < (this.fill?.written ?? 0)) return undefined;
    const limit = Math.min(this.received, this.size - 1);
    if (from >= limit) return undefined;
    for (const { start, chunk } of this.unwritten) {
      if (from < start || from >= start + chunk.length) continue;
      const end = Math.min(chunk.length, limit - start);
      return end - (from - start) >= LIVE_MIN_BYTES ? chunk.subarray(from - start, end) : undefined;
    }
    return undefined;
  }

  /** Keeps the upstream's buffer under a view `live` gave from reuse until released. */
  holdLive(view: Buffer): () => void {
    return this.upstream?.hold(view) ?? (() => undefined);
  }

  outcome(): { size: number } | { error: Error } | undefined {
    if (this.verified) return { size: this.fill?.written ?? 0 };
    if (this.failure) return { error: this.failure };
    return undefined;
  }

  watch(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * A body for one more reader, from the first byte, once the fill started; throws when it fails
   * first. The reader counts from this call on, so call it as soon as a client wants the blob.
   */
  async reader(): Promise<ContentBody> {
    this.readers++;
    try {
      await this.started;
      const path = this.fill?.path;
      if (!path) throw new Error('fill not started');
      const file = await open(path, 'r').catch(async (error: NodeJS.ErrnoException) => {
        // Renamed into the store (or removed) since: the stored blob, if it was stored.
        if (error.code !== 'ENOENT') throw error;
        const outcome = await this.done;
        if (!outcome.stored) throw this.failure ?? new Error(outcome.reason);
        return open(this.store.blobPathOf(this.digest), 'r');
      });
      if (this.failure) {
        await file.close();
        throw this.failure;
      }
      if (this.result?.stored && !this.lease) this.lease = this.store.lease(this.digest);
      return this.readerBody(file);
    } catch (error) {
      this.leave();
      throw error;
    }
  }

  /**
   * The fill's file for a publisher of its segments (shared/publish.ts): an open handle (the file
   * may be renamed into the store meanwhile; the descriptor survives), what of it may be read now
   * and in the end (up to where a relayed tail starts: the publisher stops there), and the release
   * (closes the handle). Counts as a reader, as a client does: the fill runs to its end while it
   * is published, even when every client left (the other nodes want it).
   */
  async follow(): Promise<{ readonly handle: FileHandle; readonly extent: FileExtent; readonly release: () => void }> {
    this.readers++;
    try {
      await this.started;
      const path = this.fill?.path;
      if (!path) throw new Error('fill not started');
      const handle = await open(path, 'r').catch(async (error: NodeJS.ErrnoException) => {
        if (error.code !== 'ENOENT') throw error;
        const outcome = await this.done;
        if (!outcome.stored) throw this.failure ?? new Error(outcome.reason);
        return open(this.store.blobPathOf(this.digest), 'r');
      });
      const extent: FileExtent = {
        readable: () => (this.tail ? this.tail.from : this.readable()),
        outcome: () => (this.tail ? { error: new Error('the fill relays its tail: not in the file') } : this.outcome()),
        watch: (listener) => this.watch(listener),
      };
      const release = once(() => {
        void handle.close().catch(() => undefined);
        this.leave();
      });
      return { handle, extent, release };
    } catch (error) {
      this.leave();
      throw error;
    }
  }

  /**
   * The blob from the file, then (should the fill turn into a relay) from the relayed tail. What a
   * reader of a fill reads was just written (it is in the page cache): read in place, without a
   * thread-pool round trip per read.
   */
  private readerBody(file: FileHandle): ContentBody {
    const cursor: TailCursor = { position: 0 };
    this.cursors.add(cursor);
    // The file as this reader sees it: while relaying, it ends where the tail starts.
    const inFile: FileExtent = {
      readable: () => (this.tail ? this.tail.from : this.readable()),
      outcome: () => (this.tail ? { size: this.tail.from } : this.outcome()),
      watch: (listener) => {
        const unwatch = this.watch(listener);
        this.liveListeners.add(listener);
        return () => {
          unwatch();
          this.liveListeners.delete(listener);
        };
      },
      live: (from) => this.live(from),
      holdLive: (view) => this.holdLive(view),
    };
    let closed = false;
    const close = () => {
      if (closed) return;
      closed = true;
      this.cursors.delete(cursor);
      this.tail?.released();
      this.leave();
    };
    let current = fileBody(file, inFile, { start: 0 }, () => undefined, { syncReads: true });
    let onTail = false;
    return {
      attach: (sink) => {
        const counted: BodySink = {
          data: (chunk) => {
            if (!onTail) cursor.position += chunk.length; // the tail moves the cursor itself
            return sink.data(chunk);
          },
          end: () => {
            const { tail } = this;
            // A reader may be past the tail's start: it had chunks of the batch that found no room from memory.
            if (tail && !onTail && cursor.position >= tail.from) {
              onTail = true;
              current = tail.body(cursor, close);
              current.attach(counted);
              return;
            }
            close();
            sink.end();
          },
          error: (error) => {
            close();
            sink.error(error);
          },
        };
        current.attach(counted);
      },
      resume: () => current.resume(),
      destroy: (reason) => {
        current.destroy(reason);
        close(); // also when it was never attached (its sink is not told then)
      },
      hold: (chunk) => current.hold(chunk),
    };
  }

  /** A relayed blob went whole to every reader: the file is discarded, nothing stored. */
  private relayed(): void {
    if (this.result || this.failure) return;
    const outcome: FillOutcome = { stored: false, reason: 'relayed: no room on the cache disk' };
    this.result = outcome;
    void (this.fill ? this.fill.abort(outcome.reason) : Promise.resolve()).catch(() => undefined).finally(() => this.settle(outcome));
  }

  private leave(): void {
    this.readers--;
    if (this.readers > 0) return;
    if (this.tail?.complete) return this.relayed();
    // Verified: the blob is whole and being stored; nothing to stop.
    if (!this.result && !this.failure && !this.verified) this.fail(new Error('every client left before the blob was complete'));
    this.lease?.release();
    this.lease = null;
  }

  private complete(outcome: FillOutcome): void {
    this.result = outcome;
    // Readers still reading hold the stored blob against eviction.
    if (this.readers > 0) this.lease = this.store.lease(this.digest);
    this.settle(outcome);
    this.notify();
  }

  /** `corrupt`: the whole body arrived and hashed wrong (FillOutcome). */
  private fail(error: Error, corrupt?: true): void {
    if (this.result || this.failure) return;
    this.failure = error;
    this.unwritten = [];
    const failure = corrupt ? { reason: error.message, corrupt } : { reason: error.message };
    this.beforeFailing(failure);
    if (this.verified) {
      // Every byte reached the file and hashed right: readers finish from it; only storing failed.
      this.settle({ stored: false, reason: error.message });
      return;
    }
    this.markNotStarted(error);
    if (this.upstream) {
      // Before start() the upstream answer belongs to whoever abandoned the fill (it may relay it).
      this.controller.abort(error);
      this.upstream.destroy(error);
    }
    this.tail?.fail(error);
    const outcome: FillOutcome = { stored: false, ...failure };
    void (this.fill ? this.fill.abort(error.message) : Promise.resolve()).catch(() => undefined).finally(() => this.settle(outcome));
    this.notify();
  }

  private notify(): void {
    for (const listener of [...this.listeners]) listener();
  }
}
