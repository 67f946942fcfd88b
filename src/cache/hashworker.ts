// The hashing thread of hasher.ts: hashes files of the node store as they are written, reading
// back what the main thread wrote (from the page cache), so that sha256 of a fill does not run on
// the event loop that streams it. Messages in, one answer per finished job out.

import { createHash, type Hash } from 'node:crypto';
import { closeSync, openSync, readSync } from 'node:fs';
import { parentPort } from 'node:worker_threads';

export type HashMessage =
  | { readonly type: 'open'; readonly id: number; readonly path: string; readonly algorithm: string }
  | { readonly type: 'advance'; readonly id: number; readonly upTo: number }
  | { readonly type: 'end'; readonly id: number; readonly size: number }
  | { readonly type: 'cancel'; readonly id: number };

export type HashAnswer = { readonly id: number; readonly digest: string } | { readonly id: number; readonly error: string };

interface Job {
  readonly fd: number;
  readonly hash: Hash;
  hashed: number;
}

const READ_BYTES = 1024 * 1024;
const buffer = Buffer.allocUnsafe(READ_BYTES);
const jobs = new Map<number, Job>();

function hashUpTo(job: Job, upTo: number): void {
  while (job.hashed < upTo) {
    const n = readSync(job.fd, buffer, 0, Math.min(READ_BYTES, upTo - job.hashed), job.hashed);
    if (n === 0) throw new Error(`file ended at ${job.hashed} bytes, before ${upTo}`);
    job.hash.update(buffer.subarray(0, n));
    job.hashed += n;
  }
}

function close(id: number): void {
  const job = jobs.get(id);
  if (!job) return;
  jobs.delete(id);
  closeSync(job.fd);
}

parentPort?.on('message', (message: HashMessage) => {
  try {
    if (message.type === 'open') {
      jobs.set(message.id, { fd: openSync(message.path, 'r'), hash: createHash(message.algorithm), hashed: 0 });
      return;
    }
    const job = jobs.get(message.id);
    if (!job) {
      // Opened in a thread that has died since: its waiter must not wait forever.
      if (message.type === 'end') parentPort?.postMessage({ id: message.id, error: 'unknown hashing job' } satisfies HashAnswer);
      return;
    }
    if (message.type === 'cancel') close(message.id);
    else if (message.type === 'advance') hashUpTo(job, message.upTo);
    else {
      hashUpTo(job, message.size);
      const digest = job.hash.digest('hex');
      close(message.id);
      parentPort?.postMessage({ id: message.id, digest } satisfies HashAnswer);
    }
  } catch (error) {
    close(message.id);
    if (message.type !== 'cancel') parentPort?.postMessage({ id: message.id, error: (error as Error).message } satisfies HashAnswer);
  }
});
