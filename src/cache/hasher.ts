// How a fill's digest is computed. Inline: on the event loop, chunk by chunk as it passes. Off the
// event loop: a hashing thread reads back what was written (hashworker.ts), so that a fill costs
// the streaming thread writes and reads only; on two cores this is what lets a verified fill keep
// up with a plain relay.

import { createHash } from 'node:crypto';
import { Worker } from 'node:worker_threads';
import type { HashAnswer, HashMessage } from './hashworker.js';

/** The digest of one fill's bytes, told about each chunk once it is in the file. */
export interface FillHash {
  /** `chunk` (valid during the call) is now in the file, which holds `written` bytes. */
  update(chunk: Uint8Array, written: number): void;
  /** Hex digest of the file's first `size` bytes (all of it, once every write is done). */
  digest(size: number): Promise<string>;
  /** Nothing more is wanted of it. */
  dispose(): void;
}

export type HashFactory = (path: string, algorithm: string) => FillHash;

export const inlineHash: HashFactory = (_path, algorithm) => {
  const hash = createHash(algorithm);
  return {
    update: (chunk) => void hash.update(chunk),
    digest: () => Promise.resolve(hash.digest('hex')),
    dispose: () => undefined,
  };
};

/** Bytes written before the hashing thread is told about them (fewer messages, bigger reads). */
const ADVANCE_BYTES = 1024 * 1024;

/** One hashing thread for the process, started when first needed; it does not keep the process alive. */
export class HashThread {
  private worker: Worker | undefined;
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (hex: string) => void; reject: (error: Error) => void }>();

  readonly factory: HashFactory = (path, algorithm) => {
    const id = this.nextId++;
    this.post({ type: 'open', id, path, algorithm });
    let posted = 0;
    let done = false;
    return {
      update: (_chunk, written) => {
        if (written - posted < ADVANCE_BYTES) return;
        posted = written;
        this.post({ type: 'advance', id, upTo: written });
      },
      digest: (size) => {
        done = true;
        return new Promise<string>((resolve, reject) => {
          this.waiting.set(id, { resolve, reject });
          this.post({ type: 'end', id, size });
        });
      },
      dispose: () => {
        if (done) return;
        done = true;
        this.post({ type: 'cancel', id });
      },
    };
  };

  private post(message: HashMessage): void {
    this.started().postMessage(message);
  }

  private started(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(new URL('./hashworker.js', import.meta.url));
    worker.unref();
    worker.on('message', (answer: HashAnswer) => {
      const waiter = this.waiting.get(answer.id);
      if (!waiter) return;
      this.waiting.delete(answer.id);
      if ('digest' in answer) waiter.resolve(answer.digest);
      else waiter.reject(new Error(`hashing failed: ${answer.error}`));
    });
    // A thread that dies fails the fills waiting on it (nothing is stored); the next fill starts a new one.
    const fail = (error: Error) => {
      if (this.worker === worker) this.worker = undefined;
      for (const [id, waiter] of this.waiting) {
        this.waiting.delete(id);
        waiter.reject(error);
      }
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`hashing thread exited (${code})`)));
    this.worker = worker;
    return worker;
  }

  async close(): Promise<void> {
    const worker = this.worker;
    this.worker = undefined;
    await worker?.terminate();
  }
}
