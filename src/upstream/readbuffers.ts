// How upstream sockets are read: into buffers from one pool shared by all sockets, reused, instead
// of the fresh 64 KiB allocation Node makes for every read.
//
// Why: a relay's cost on loopback is per read and per allocation. Larger reads into reused buffers
// took a plain Node relay from ~800 MiB/s (64 KiB) to ~1050 (256 KiB), 1 and 16 streams alike, and
// leave no garbage behind, where fresh buffers keep tens of MiB waiting for the collector at 16
// streams. In the proxy 128 KiB measured as fast as 256 KiB at half the memory.
//
// The rule that keeps this safe: a buffer is handed to the next read only when nothing can still
// point into it. Views into a read reach three places: the socket's readable queue (until the HTTP
// parser takes them, or when it pushes back what it could not parse), the parser's callbacks
// (synchronous), and whoever got a body chunk from them. Body chunks from these sockets reach only
// `UpstreamBody` (body.ts), which copies what it keeps, and whoever writes a chunk marks its buffer
// with `holdView` (through `UpstreamBody.hold`) until the write completes. When in doubt the next read gets a fresh buffer that nothing else
// will ever see, which is what Node does anyway.

import type { Readable } from 'node:stream';
import { once } from '../once.js';

export const READ_BUFFER_BYTES = 128 * 1024;
/**
 * Buffers kept for reuse across all sockets (8 MiB). Every open socket keeps one for its next read,
 * idle keep-alive ones included; a stream adds one being written and, when paused, one queued.
 * Beyond the pool, reads get fresh buffers as Node's default does.
 */
export const POOLED_BUFFERS = 64;

interface ReadBuffer {
  readonly bytes: Buffer;
  /** Writes in progress that still point into `bytes`. */
  holds: number;
  /** The socket that reads or last read into `bytes`, and which of its reads that was. */
  reader: Readable | undefined;
  read: number;
  /** Handed to `reader` for its next read, which has not happened yet. */
  pending: boolean;
}

/** Per socket: reads pushed so far, and the last read known to have left the readable queue. */
interface SocketReads {
  pushed: number;
  settled: number;
}

/** Reads into a reused buffer, and into a fresh one (first read of a socket, or nothing free). */
export const readBufferStats = { reused: 0, fresh: 0 };

const managed = new WeakMap<ArrayBufferLike, ReadBuffer>();
const sockets = new WeakMap<Readable, SocketReads>();
const pool: ReadBuffer[] = [];

// The socket that just read: Node asks for its next buffer right after the callback, synchronously.
let lastSocket: Readable | undefined;

/**
 * Marks the buffer under `view` as in use until the returned function is called (once). Views that
 * are not into a pooled read buffer need nothing and get a no-op.
 */
export function holdView(view: Uint8Array): () => void {
  const buffer = managed.get(view.buffer);
  if (!buffer) return noop;
  buffer.holds++;
  return once(() => buffer.holds--);
}

function noop(): void {}

/** Nothing points into a pooled buffer: no write holds it and no socket's queue can contain it. */
function isFree(buffer: ReadBuffer): boolean {
  if (buffer.holds > 0) return false;
  const reader = buffer.reader;
  if (!reader || reader.destroyed) return true;
  if (buffer.pending) return false;
  return reader.readableLength === 0 || buffer.read <= (sockets.get(reader)?.settled ?? 0);
}

function nextBuffer(): Uint8Array {
  const socket = lastSocket;
  lastSocket = undefined;
  if (socket) {
    for (const candidate of pool) {
      if (isFree(candidate)) {
        candidate.reader = socket;
        candidate.pending = true;
        readBufferStats.reused++;
        return candidate.bytes;
      }
    }
  }
  readBufferStats.fresh++;
  const bytes = Buffer.allocUnsafeSlow(READ_BUFFER_BYTES);
  // The first read of a socket: Node asks before there is any socket to key on.
  if (!socket) return bytes;
  if (pool.length < POOLED_BUFFERS) {
    const buffer: ReadBuffer = { bytes, holds: 0, reader: socket, read: 0, pending: true };
    pool.push(buffer);
    managed.set(bytes.buffer, buffer);
  }
  return bytes;
}

export interface SocketReadOptions {
  buffer: () => Uint8Array;
  callback: (this: Readable, bytes: number, buffer: Uint8Array) => boolean;
}

/**
 * `onread` for net.connect/tls.connect (undici passes its connect options through). The data is
 * pushed into the socket's readable side as Node does by default, so the HTTP client sees an
 * ordinary socket; returning push's verdict stops reading when its queue is full.
 */
export function socketReadOptions(): SocketReadOptions {
  return {
    buffer: nextBuffer,
    callback(this: Readable, bytes: number, buffer: Uint8Array): boolean {
      let reads = sockets.get(this);
      if (!reads) {
        reads = { pushed: 0, settled: 0 };
        sockets.set(this, reads);
      }
      const pooled = managed.get(buffer.buffer);
      if (pooled) {
        pooled.pending = false;
        pooled.read = reads.pushed + 1;
      }
      const flowing = this.push(Buffer.from(buffer.buffer, buffer.byteOffset, bytes));
      reads.pushed++;
      // Only this read is queued: every earlier one has been taken by the parser.
      if (this.readableLength <= bytes) reads.settled = reads.pushed - 1;
      lastSocket = this;
      return flowing;
    },
  };
}

/**
 * `onread` for a socket whose body chunks their reader may keep (a shared store's download, kept
 * in a fill's write queue): each read into a fresh buffer, as Node's default does, but of up to
 * `bytes` rather than 64 KiB, so that a large body arrives in fewer, larger chunks.
 */
export function largeReadOptions(bytes: number): SocketReadOptions {
  return {
    buffer: () => Buffer.allocUnsafeSlow(bytes),
    callback(this: Readable, read: number, buffer: Uint8Array): boolean {
      return this.push(Buffer.from(buffer.buffer, buffer.byteOffset, read));
    },
  };
}
