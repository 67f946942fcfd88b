// The shared tier on a ReadWriteMany directory (NFS, CephFS, a cloud file share) mounted on every
// node. Objects are files at `<path>/<key>`; every write goes to `<path>/tmp/` first and is
// published with link(2), which fails with EEXIST instead of replacing: the filesystem's own
// create-if-absent, atomic on NFS too, so readers never see a partly written object and of two
// nodes publishing the same key exactly one wins.

import { randomUUID } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { link, mkdir, open, readdir, readFile, rename, stat, unlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { addAbortSignal, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { isCallerAbort, messageOf } from './common.js';
import { SharedStoreError, type ByteSpan, type SharedFailure, type SharedListing, type SharedObject, type SharedStore } from './store.js';

/** Where writes are staged; on the same filesystem as the objects so that link(2) can publish them. */
const TMP = 'tmp';

/** A temp file this old is left by a writer that died (no copy of a blob takes a day). */
const STALE_TEMP_MS = 24 * 3_600_000;

export async function openFilesystemStore(path: string, now = Date.now()): Promise<SharedStore> {
  await guard(`preparing ${path}`, () => mkdir(join(path, TMP), { recursive: true }));
  await removeStaleTemps(join(path, TMP), now);
  return new FilesystemStore(path);
}

/** Every node sweeps at open; two sweeping at once both tolerate the other's removals. */
async function removeStaleTemps(dir: string, now: number): Promise<void> {
  const names = await guard(`listing ${dir}`, () => readdir(dir));
  for (const name of names) {
    const info = await missingAsUndefined(stat(join(dir, name))).catch(() => undefined);
    if (info && now - info.mtimeMs > STALE_TEMP_MS) await unlink(join(dir, name)).catch(() => undefined);
  }
}

class FilesystemStore implements SharedStore {
  readonly kind = 'filesystem';
  readonly location: string;

  constructor(private readonly root: string) {
    this.location = root;
  }

  async stat(key: string): Promise<SharedObject | undefined> {
    const info = await guard(`stat ${key}`, () => missingAsUndefined(stat(this.path(key))));
    return info?.isFile() ? { size: info.size, modified: info.mtime } : undefined;
  }

  async read(key: string, span?: ByteSpan, signal?: AbortSignal): Promise<Readable | undefined> {
    // Opened here rather than by the stream so that a missing file is an answer, not a stream error.
    const handle = await guard(`read ${key}`, () => missingAsUndefined(open(this.path(key), 'r')));
    if (!handle) return undefined;
    const isFile = await guard(`read ${key}`, async () => (await handle.stat()).isFile()).catch(async (error: unknown) => {
      await handle.close();
      throw error;
    });
    if (!isFile) {
      await handle.close();
      return undefined;
    }
    const stream = handle.createReadStream({ start: span?.start, end: span?.end, autoClose: true });
    return signal ? addAbortSignal(signal, stream) : stream;
  }

  async createFromFile(key: string, file: string, size: number, signal?: AbortSignal): Promise<'created' | 'exists'> {
    const temp = this.tempPath();
    try {
      await guard(`copying ${file} for ${key}`, async () => {
        await pipeline(createReadStream(file), createWriteStream(temp, { flags: 'wx', flush: true }), { signal });
        const copied = (await stat(temp)).size;
        if (copied !== size) throw new SharedStoreError('error', `${file} has ${copied} bytes, expected ${size}`);
      }, signal);
      return (await this.publish(key, temp)) ? 'created' : 'exists';
    } finally {
      await unlink(temp).catch(() => undefined);
    }
  }

  async writeRecord(key: string, body: Buffer, options?: { readonly ifAbsent?: boolean }): Promise<boolean> {
    const temp = this.tempPath();
    try {
      // Written whole (and synced) before anyone can see it under its key.
      await guard(`writing ${key}`, () => writeFile(temp, body, { flag: 'wx', flush: true }));
      if (options?.ifAbsent) return await this.publish(key, temp);
      await guard(`writing ${key}`, async () => {
        await mkdir(dirname(this.path(key)), { recursive: true });
        await rename(temp, this.path(key));
      });
      return true;
    } finally {
      await unlink(temp).catch(() => undefined);
    }
  }

  async readRecord(key: string): Promise<Buffer | undefined> {
    return guard(`read ${key}`, () => missingAsUndefined(readFile(this.path(key))));
  }

  async remove(key: string): Promise<void> {
    await guard(`remove ${key}`, () => missingAsUndefined(unlink(this.path(key))));
  }

  async *list(prefix: string): AsyncIterable<SharedListing> {
    // Walk only the deepest directory the prefix names; the rest of the prefix filters names in it.
    const base = prefix.slice(0, prefix.lastIndexOf('/') + 1);
    yield* this.walk(base, prefix);
  }

  async close(): Promise<void> {}

  private async *walk(dir: string, prefix: string): AsyncGenerator<SharedListing> {
    const entries = await guard(`list ${dir}`, () => missingAsUndefined(readdir(join(this.root, dir), { withFileTypes: true })));
    for (const entry of (entries ?? []).sort((a, b) => a.name.localeCompare(b.name))) {
      const key = dir + entry.name;
      if (dir === '' && entry.name === TMP) continue;
      if (entry.isDirectory()) {
        if ((key + '/').startsWith(prefix) || prefix.startsWith(key + '/')) yield* this.walk(key + '/', prefix);
      } else if (entry.isFile() && key.startsWith(prefix)) {
        // Removed between readdir and stat: not listed.
        const info = await guard(`stat ${key}`, () => missingAsUndefined(stat(join(this.root, key))));
        if (info) yield { key, size: info.size, modified: info.mtime };
      }
    }
  }

  /** link(2) the finished temp file to its key: false when the key is taken (nothing replaced). */
  private async publish(key: string, temp: string): Promise<boolean> {
    const target = this.path(key);
    return guard(`publishing ${key}`, async () => {
      await mkdir(dirname(target), { recursive: true });
      try {
        await link(temp, target);
        return true;
      } catch (error) {
        if (codeOf(error) !== 'EEXIST') throw error;
        // NFS may retransmit a LINK whose first answer was lost and report EEXIST for its own
        // success (open(2)'s advice): a second link to the temp file means the key is ours.
        return (await stat(temp)).nlink === 2;
      }
    });
  }

  private tempPath(): string {
    return join(this.root, TMP, randomUUID());
  }

  private path(key: string): string {
    // Keys come from the tier, but a key must never reach outside the store or into its staging area.
    const parts = key.split('/');
    if (key === '' || key.startsWith('/') || parts.some((p) => p === '..' || p === '.' || p === '') || parts[0] === TMP || key.includes('\0')) {
      throw new SharedStoreError('error', `invalid key ${JSON.stringify(key)}`);
    }
    return join(this.root, ...parts);
  }
}

function codeOf(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}

async function missingAsUndefined<T>(operation: Promise<T>): Promise<T | undefined> {
  try {
    return await operation;
  } catch (error) {
    if (codeOf(error) === 'ENOENT' || codeOf(error) === 'ENOTDIR') return undefined;
    throw error;
  }
}

/** How a filesystem error counts: permissions are 'denied', a gone or hung mount 'unreachable' or 'timeout'. */
function failureOf(error: unknown): SharedFailure {
  switch (codeOf(error)) {
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return 'denied';
    case 'ESTALE':
    case 'ENOTCONN':
    case 'EHOSTDOWN':
    case 'EHOSTUNREACH':
    case 'EIO':
      return 'unreachable';
    case 'ETIMEDOUT':
      return 'timeout';
    default:
      return 'error';
  }
}

async function guard<T>(what: string, operation: () => Promise<T>, signal?: AbortSignal): Promise<T> {
  try {
    return await operation();
  } catch (error) {
    if (error instanceof SharedStoreError || isCallerAbort(error, signal)) throw error;
    throw new SharedStoreError(failureOf(error), `${what}: ${messageOf(error)}`, { cause: error });
  }
}
