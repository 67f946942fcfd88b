// The rest of a blob whose fill stopped storing (no room left for it on the cache disk): what the
// upstream sends after the file's last byte is kept in memory only until every reader of the fill
// has had it, and the upstream is paused while the slowest reader is more than TAIL_BYTES behind.
// The whole blob is hashed here (what the file holds is read back once, then each chunk as it
// comes), and the last byte is held back until it matches the digest, as a fill holds it back: a
// relayed client never gets a cut or corrupt body as a complete one.

import { createHash, type Hash } from 'node:crypto';
import { open } from 'node:fs/promises';
import type { ContentBody } from '../content/source.js';
import type { BodySink } from '../upstream/body.js';

/** Bytes kept for the slowest reader before the upstream is paused. */
const TAIL_BYTES = 4 * 1024 * 1024;
const READ_BACK_BYTES = 1024 * 1024;

/** Where one reader of a fill is in the blob. */
export interface TailCursor {
  position: number;
}

export class RelayTail {
  private chunks: Buffer[] = [];
  /** Offset in the blob of chunks[0]. */
  private base: number;
  /** Offset after the last byte received. */
  end: number;
  private hash: Hash | undefined;
  /** Offset up to which the blob is hashed (chunks from there are kept until it is). */
  private hashed: number;
  private upstreamEnded = false;
  private verified = false;
  private failure: Error | undefined;
  private paused = false;
  private readonly listeners = new Set<() => void>();

  constructor(
    /** Bytes of the blob in the file: the tail starts there. */
    readonly from: number,
    filePath: string,
    private readonly digest: string,
    /** Readers' positions: a chunk goes once every one is past it. */
    private readonly cursors: ReadonlySet<TailCursor>,
    /** Resumes the upstream body. */
    private readonly resumeUpstream: () => void,
  ) {
    this.base = from;
    this.end = from;
    this.hashed = from;
    const algorithm = digest.slice(0, digest.indexOf(':'));
    readBack(filePath, from, createHash(algorithm)).then(
      (hash) => {
        this.hash = hash;
        this.hashKept();
      },
      (error: Error) => this.fail(error),
    );
  }

  /** A chunk from the upstream (copied: the caller's may be a reused buffer); false to pause it. */
  push(chunk: Uint8Array): boolean {
    if (this.failure) return false;
    const copy = Buffer.from(chunk);
    this.chunks.push(copy);
    this.end += copy.length;
    if (this.hash) {
      this.hash.update(copy);
      this.hashed = this.end;
    }
    this.notify();
    this.paused = this.end - this.keptFrom() > TAIL_BYTES;
    return !this.paused;
  }

  /** The upstream body ended: the blob is complete if it hashes to its digest. */
  upstreamEnd(): void {
    this.upstreamEnded = true;
    this.check();
  }

  fail(error: Error): void {
    if (this.failure || this.verified) return;
    this.failure = error;
    this.chunks = [];
    this.notify();
  }

  /** Verified: every byte came and hashed right. */
  get complete(): boolean {
    return this.verified;
  }

  /** A body of the tail for a reader at `cursor` (at `from`); `onClose` runs once when it is done. */
  body(cursor: TailCursor, onClose: () => void): ContentBody {
    let sink: BodySink | undefined;
    let paused = false;
    let finished = false;
    let unwatch: (() => void) | undefined;
    const finish = (error?: Error) => {
      if (finished) return;
      finished = true;
      unwatch?.();
      onClose();
      this.released();
      if (error) sink?.error(error);
      else sink?.end();
    };
    // Not re-entered: a delivery may resume the upstream, whose next chunk wakes this pump again
    // (it is then delivered after the one in hand, by the loop).
    let pumping = false;
    let again = false;
    const deliver = () => {
      while (sink && !finished && !paused) {
        if (this.failure) return finish(this.failure);
        const limit = this.verified ? this.end : this.end - 1;
        if (cursor.position >= limit) {
          if (this.verified) finish();
          return;
        }
        const chunk = this.slice(cursor.position, limit);
        cursor.position += chunk.length;
        if (!sink.data(chunk)) paused = true;
        this.released();
      }
    };
    const pump = () => {
      if (pumping) {
        again = true;
        return;
      }
      pumping = true;
      try {
        do {
          again = false;
          deliver();
        } while (again);
      } finally {
        pumping = false;
      }
    };
    return {
      attach: (target) => {
        if (sink) throw new Error('relayed body consumed twice');
        sink = target;
        unwatch = this.watch(pump);
        pump();
      },
      resume: () => {
        paused = false;
        pump();
      },
      destroy: (reason) => finish(reason ?? new Error('relayed body discarded')),
      // Chunks here are copies of their own, never reused.
      hold: () => () => undefined,
    };
  }

  watch(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Readers moved on (or left): drops what every one has, and resumes a paused upstream once the slowest caught up. */
  released(): void {
    const keptFrom = this.keptFrom();
    while (this.chunks.length > 0 && this.base + (this.chunks[0]?.length ?? 0) <= keptFrom) this.base += this.chunks.shift()?.length ?? 0;
    if (this.paused && this.end - keptFrom <= TAIL_BYTES / 2) {
      this.paused = false;
      this.resumeUpstream();
    }
  }

  /** Where what must be kept starts: bytes a reader has yet to read or the hash has yet to take. */
  private keptFrom(): number {
    return Math.min(this.floor(), this.hashed);
  }

  /** The least position of a reader (readers still in the file count as at `from`). */
  private floor(): number {
    let floor = this.end;
    for (const c of this.cursors) floor = Math.min(floor, Math.max(c.position, this.from));
    return floor;
  }

  /** Bytes [position, limit) from one chunk. */
  private slice(position: number, limit: number): Buffer {
    let offset = this.base;
    for (const chunk of this.chunks) {
      if (position < offset + chunk.length) return chunk.subarray(position - offset, Math.min(chunk.length, limit - offset));
      offset += chunk.length;
    }
    throw new Error(`relayed bytes at ${position} are gone`);
  }

  /** The file's bytes are hashed: then the chunks kept meanwhile. */
  private hashKept(): void {
    if (!this.hash) return;
    for (const chunk of this.chunks) this.hash.update(chunk);
    this.hashed = this.end;
    this.released();
    this.check();
  }

  private check(): void {
    if (!this.upstreamEnded || !this.hash || this.failure || this.verified) return;
    const colon = this.digest.indexOf(':');
    const actual = this.hash.digest('hex');
    if (actual !== this.digest.slice(colon + 1)) return this.fail(new Error(`upstream blob does not match ${this.digest} (got ${this.digest.slice(0, colon)}:${actual})`));
    this.verified = true;
    this.notify();
  }

  private notify(): void {
    for (const listener of [...this.listeners]) listener();
  }
}

/** `hash` over the first `size` bytes of the file at `path`. */
async function readBack(path: string, size: number, hash: Hash): Promise<Hash> {
  const file = await open(path, 'r');
  try {
    const buffer = Buffer.allocUnsafe(READ_BACK_BYTES);
    for (let position = 0; position < size; ) {
      const { bytesRead } = await file.read(buffer, 0, Math.min(buffer.length, size - position), position);
      if (bytesRead === 0) throw new Error(`cached file ended at ${position} bytes, before ${size}`);
      hash.update(buffer.subarray(0, bytesRead));
      position += bytesRead;
    }
    return hash;
  } finally {
    await file.close();
  }
}
