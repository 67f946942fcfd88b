import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { completeExtent, fileBody, type FileBodyOptions } from '../src/cache/filebody.js';

/**
 * Reads bytes [start, end) of `file` through a fileBody whose sink pauses now and then and holds
 * some chunks (as a client write in progress would) for a while; returns what it received.
 */
function readThrough(file: FileHandle, size: number, range: { start: number; end: number }, options: FileBodyOptions): Promise<{ bytes: Buffer; closes: number }> {
  return new Promise((resolve, reject) => {
    let closes = 0;
    const body = fileBody(file, completeExtent(size), range, () => closes++, options);
    const parts: Buffer[] = [];
    let n = 0;
    body.attach({
      data(chunk) {
        parts.push(Buffer.from(chunk));
        n++;
        if (n % 3 === 0) {
          // Held like a socket write: the buffer must not be read into again until released.
          const release = body.hold(chunk);
          const copy = Buffer.from(chunk);
          setTimeout(() => {
            assert.deepEqual(chunk, copy, 'a held buffer was read into');
            release();
          }, 2);
        }
        if (n % 4 === 0) {
          setImmediate(() => body.resume());
          return false;
        }
        return true;
      },
      end: () => resolve({ bytes: Buffer.concat(parts), closes }),
      error: reject,
    });
  });
}

describe('a body read from a stored file (fileBody)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-filebody-'));
  const content = randomBytes(3 * 1024 * 1024 + 12_345);
  const path = join(dir, 'blob');
  writeFileSync(path, content);
  after(() => rmSync(dir, { recursive: true, force: true }));

  for (const [name, options] of [
    ['on the thread pool', {}],
    ['on the event loop', { syncReads: true }],
    ['on the event loop while reads are quick', { syncReads: 'while-cached' }],
    // Every read counts as slow: the body moves to the thread pool after the second, mid-range.
    ['switching to the thread pool after two slow reads', { syncReads: 'while-cached', cachedReadMs: -1 }],
  ] as const) {
    it(`delivers exactly the range asked for, in order, ${name}`, async () => {
      const file = await open(path, 'r');
      // Counts the thread-pool reads, to know which way the bytes came.
      const threadPoolRead = file.read.bind(file);
      let threadPoolReads = 0;
      file.read = ((...args: Parameters<FileHandle['read']>) => {
        threadPoolReads++;
        return threadPoolRead(...args);
      }) as FileHandle['read'];
      const range = { start: 1001, end: content.length - 7 };
      const { bytes, closes } = await readThrough(file, content.length, range, options);
      assert.equal(bytes.length, range.end - range.start);
      assert.ok(bytes.equals(content.subarray(range.start, range.end)), 'the bytes differ from the file');
      assert.equal(closes, 1);
      if (!('syncReads' in options)) assert.ok(threadPoolReads > 0);
      else if (options.syncReads === true) assert.equal(threadPoolReads, 0);
      else if ('cachedReadMs' in options) {
        // Two reads on the event loop (256 KiB each), the rest of the 3 MiB on the thread pool.
        assert.ok(threadPoolReads >= 8, `${threadPoolReads} thread-pool reads`);
      }
      // (Quick reads: how many count as slow depends on the machine; the bytes are what matters.)
    });
  }
});
