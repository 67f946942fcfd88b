// A ContentBody read from a file of the node store: a stored blob (or a range of it), or a blob
// still being filled, followed as it grows. Reads go into a few buffers of this body's own, reused:
// a chunk's buffer is read into again only once nothing holds it (a client write in progress).
// A reader that caught up with a growing file takes what follows from memory (FileExtent.live) as
// it arrives, rather than reading it back once written: the same bytes, without the read's copy.

import { readSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import type { BodySink } from '../upstream/body.js';
import type { ContentBody } from '../content/source.js';
import { once } from '../once.js';

/** What a reader may read of a file, now and in the end. */
export interface FileExtent {
  /** Bytes that may be read now, from the start of the file. */
  readable(): number;
  /** Undefined while the file grows; then its final size, or why it will never be complete. */
  outcome(): { readonly size: number } | { readonly error: Error } | undefined;
  /** Calls `listener` when `readable`, `outcome` or `live` change; returns the unsubscribe. */
  watch(listener: () => void): () => void;
  /**
   * Bytes at `from`, past what the file holds yet, that a reader may have now (a view of a chunk on
   * its way into the file, valid during the call); undefined when there are none. Followed only by
   * reads on the event loop (`syncReads`), as a growing file is.
   */
  live?(from: number): Buffer | undefined;
  /** Keeps the memory under a view `live` gave from reuse until the returned function is called. */
  holdLive?(view: Buffer): () => void;
}

/** A file that no longer changes. */
export function completeExtent(size: number): FileExtent {
  return { readable: () => size, outcome: () => ({ size }), watch: () => () => undefined };
}

const READ_BYTES = 256 * 1024;
const BUFFERS = 4;
/** Thread-pool reads in flight at once: the next read is under way while a chunk is delivered. */
const READS_AHEAD = 2;

interface Slot {
  readonly buffer: Buffer;
  /** Writes of this slot's bytes in progress (the consumer's holds). */
  holds: number;
  /** Read into, or read and not yet delivered. */
  busy: boolean;
}

/** Bytes read synchronously in one turn of the event loop before yielding to others. */
const SYNC_TURN_BYTES = 1024 * 1024;

export interface FileBodyOptions {
  /**
   * true: read on the event loop instead of the thread pool, for bytes known to be in the page
   * cache (a fill being followed), where a thread-pool round trip costs more than the copy.
   * 'while-cached': on the event loop while each read is as quick as a copy from the page cache,
   * on the thread pool from the first one that is not (the disk was involved): a stored blob served
   * again is usually in the page cache, and a read on the event loop written to the client at once
   * costs about a third less CPU than the same read on another thread (no hand-off, and the bytes
   * are still in this core's cache when they are sent).
   */
  readonly syncReads?: boolean | 'while-cached';
  /** With 'while-cached': a read slower than this (ms) was not from the page cache alone (default CACHED_READ_MS). */
  readonly cachedReadMs?: number;
}

/**
 * A read of up to READ_BYTES on the event loop that takes longer than this was probably not served
 * from the page cache alone (that takes tens of microseconds). SLOW_READS of them in a row (one
 * alone may be the machine's scheduling) send the body's later reads to the thread pool, so a blob
 * on a cold disk stalls the event loop for that many reads at most.
 */
const CACHED_READ_MS = 2;
const SLOW_READS = 2;

/**
 * Streams bytes [start, end) of `file` (end: the extent's final size when not given), closing the
 * file when done or destroyed; `onClose` runs once either way.
 */
export function fileBody(file: FileHandle, extent: FileExtent, range: { start: number; end?: number }, onClose: () => void, options: FileBodyOptions = {}): ContentBody {
  const slots: Slot[] = [];
  let position = range.start;
  let sink: BodySink | undefined;
  let paused = false;
  let reading = false;
  let finished = false;
  let unwatch: (() => void) | undefined;
  let onLoop = options.syncReads === true || options.syncReads === 'while-cached';
  const timed = options.syncReads === 'while-cached';
  let slowReads = 0;
  // Thread-pool reads: up to READS_AHEAD in flight, delivered in order; `asked`: where the next starts.
  const reads: Array<{ slot: Slot; bytes: number; result?: number; error?: Error }> = [];
  let asked = range.start;
  // Views `live` gave and not yet dropped by the consumer: their holds are the extent's.
  const liveViews = new WeakSet<Buffer>();

  const finish = (error?: Error) => {
    if (finished) return;
    finished = true;
    unwatch?.();
    void file.close().catch(() => undefined);
    onClose();
    if (error) sink?.error(error);
    else sink?.end();
  };

  const freeSlot = (): Slot | undefined => {
    const free = slots.find((s) => s.holds === 0 && !s.busy);
    if (free) return free;
    if (slots.length < BUFFERS) {
      const slot = { buffer: Buffer.allocUnsafe(READ_BYTES), holds: 0, busy: false };
      slots.push(slot);
      return slot;
    }
    return undefined;
  };

  /** How many bytes may be read from `from` now, or why not: 'wait' (more will come) or 'done'. */
  const readable = (from: number): number | 'wait' | 'done' => {
    const outcome = extent.outcome();
    if (outcome && 'error' in outcome) {
      finish(outcome.error);
      return 'done';
    }
    const end = range.end ?? (outcome ? outcome.size : Number.POSITIVE_INFINITY);
    if (from >= end) return 'done';
    const available = Math.min(end, extent.readable()) - from;
    return available > 0 ? Math.min(READ_BYTES, available) : 'wait'; // a growing file: woken by watch
  };

  const deliver = (slot: Slot, bytesRead: number, asked: number): void => {
    if (bytesRead !== asked) return finish(new Error(`cached file ended at ${position + bytesRead} bytes, before ${position + asked}`));
    position += bytesRead;
    if (!sink?.data(slot.buffer.subarray(0, bytesRead))) paused = true;
  };

  const pumpSync = () => {
    let turn = 0;
    for (;;) {
      if (!sink || finished || paused || reading) return;
      const bytes = readable(position);
      if (bytes === 'done') return finish();
      if (bytes === 'wait') {
        // Caught up with the file: what follows, from memory as it arrives.
        const view = range.end === undefined ? extent.live?.(position) : undefined;
        if (!view || view.length === 0) return;
        liveViews.add(view);
        position += view.length;
        turn += view.length;
        if (!sink.data(view)) paused = true;
        continue;
      }
      const slot = freeSlot();
      if (!slot) return; // every buffer is being written: woken by a release
      if (turn >= SYNC_TURN_BYTES) {
        reading = true;
        setImmediate(() => {
          reading = false;
          pump();
        });
        return;
      }
      let bytesRead: number;
      const began = timed ? performance.now() : 0;
      try {
        bytesRead = readSync(file.fd, slot.buffer, 0, bytes, position);
      } catch (error) {
        return finish(error as Error);
      }
      if (timed) slowReads = performance.now() - began > (options.cachedReadMs ?? CACHED_READ_MS) ? slowReads + 1 : 0;
      if (slowReads >= SLOW_READS) {
        // From the next read on, off the event loop (pumpAsync starts where this one ended).
        onLoop = false;
        asked = position + bytesRead;
      }
      turn += bytesRead;
      deliver(slot, bytesRead, bytes);
      if (!onLoop) return pump();
    }
  };

  const pumpAsync = (): void => {
    while (sink && !finished && !paused && reads[0]?.result !== undefined) {
      const read = reads.shift();
      if (!read) break;
      read.slot.busy = false;
      if (read.error) return finish(read.error);
      deliver(read.slot, read.result ?? 0, read.bytes);
    }
    if (!sink || finished) return;
    while (reads.length < READS_AHEAD) {
      const bytes = readable(asked);
      if (bytes === 'done') {
        if (reads.length === 0) finish();
        return;
      }
      if (bytes === 'wait') return;
      const slot = freeSlot();
      if (!slot) return; // every buffer is being written or read: woken by a release or a read
      slot.busy = true;
      const read: (typeof reads)[number] = { slot, bytes };
      reads.push(read);
      file.read(slot.buffer, 0, bytes, asked).then(
        ({ bytesRead }) => {
          read.result = bytesRead;
          pump();
        },
        (error: Error) => {
          read.result = 0;
          read.error = error;
          pump();
        },
      );
      asked += bytes;
    }
  };

  const pump = (): void => (onLoop ? pumpSync() : pumpAsync());

  return {
    attach(target) {
      if (sink) throw new Error('cached body consumed twice');
      sink = target;
      unwatch = extent.watch(pump);
      pump();
    },
    resume() {
      paused = false;
      pump();
    },
    destroy(reason) {
      finish(reason ?? new Error('cached body discarded'));
    },
    hold(chunk) {
      if (liveViews.has(chunk)) return extent.holdLive?.(chunk) ?? (() => undefined);
      const slot = slots.find((s) => s.buffer.buffer === chunk.buffer && s.buffer.byteOffset === chunk.byteOffset);
      if (!slot) return () => undefined;
      slot.holds++;
      return once(() => {
        slot.holds--;
        pump();
      });
    },
  };
}
