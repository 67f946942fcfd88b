// The shared tier on a ReadWriteMany directory (NFS, CephFS, a cloud file share) mounted on every
// node. Objects are files at `<path>/<key>`; every write goes to `<path>/tmp/` first and is
// published with link(2), which fails with EEXIST instead of replacing: the filesystem's own
// create-if-absent, atomic on NFS too, so readers never see a partly written object and of two
// nodes publishing the same key exactly one wins. A record is replaced or removed on condition of
// its version (swap) under a lock file of the key (an exclusive create): checked, then replaced by
// rename(2) over it, so that the key never goes without an object while it is replaced.
//
// Every node can write the directory, so what is found at a key is not trusted to be a file: an
// object is opened without following a symbolic link and without blocking (O_NOFOLLOW|O_NONBLOCK: a
// FIFO would hold one of Node's four file-system threads forever), and read only when it is a
// regular file that really lies under the store's directory (the opened file's path, from
// /proc/self/fd, is checked: a symbolic link in a directory above the key is caught there too).

import { createHash, randomUUID } from 'node:crypto';
import { constants, createReadStream, createWriteStream, type BigIntStats } from 'node:fs';
import { link, lstat, mkdir, open, readdir, readlink, realpath, rename, rmdir, stat, unlink, writeFile, type FileHandle } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { addAbortSignal, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { checkRecordSize, isCallerAbort, messageOf, readRange } from './common.js';
import { RECORD_MAX_BYTES, RefusedObject, SharedStoreError, type ByteSpan, type FileRange, type SharedFailure, type SharedListing, type SharedObject, type SharedStore, type VersionedRecord, type WriteCondition } from './store.js';

/** Where writes are staged; on the same filesystem as the objects so that link(2) can publish them. */
const TMP = 'tmp';

/** A temp file this old is left by a writer that died (no copy of a blob takes a day). */
const STALE_TEMP_MS = 24 * 3_600_000;

/** How long a swap waits for another node's swap of the same key, and when a lock counts as left
 * by a node that died in the middle of one (a swap is a few file operations). */
const SWAP_LOCK_WAIT_MS = 2_000;
const SWAP_LOCK_STALE_MS = 30_000;

/** Where a fill publishes the blob's segments while it runs (tier.ts sharedKeys.segment); the fill
 * removes them once the blob is shared, a filler that died leaves them. */
const SEGMENTS = 'segments';

/** A segment this old is left by a filler that died (no fill takes a day): removed at open, as a
 * bucket's lifecycle rule expires them on object storage. */
const STALE_SEGMENT_MS = 24 * 3_600_000;

export async function openFilesystemStore(path: string, now = Date.now()): Promise<SharedStore> {
  await guard(`preparing ${path}`, () => mkdir(join(path, TMP), { recursive: true }));
  await removeStaleTemps(join(path, TMP), now);
  await removeStaleSegments(join(path, SEGMENTS), now);
  // Where the directory really is (the configured path may itself be a link, as a mount often is).
  return new FilesystemStore(await guard(`resolving ${path}`, () => realpath(path)));
}

/** Opened for reading without following a final symbolic link, and without blocking on a FIFO. */
const OPEN_FLAGS = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK;

/** Every node sweeps at open; two sweeping at once both tolerate the other's removals. */
async function removeStaleTemps(dir: string, now: number): Promise<void> {
  const names = await guard(`listing ${dir}`, () => readdir(dir));
  for (const name of names) {
    const info = await missingAsUndefined(lstat(join(dir, name))).catch(() => undefined);
    if (info && now - info.mtimeMs > STALE_TEMP_MS) await unlink(join(dir, name)).catch(() => undefined);
  }
}

/**
 * Removes segment files (segments/<alg>/<hex>/<origin>/<offset>) not modified for STALE_SEGMENT_MS, and the
 * directories left empty and as old (a fill's directory stays when its segments are removed one by
 * one). Only regular files and directories are touched, and a symbolic link is not followed. Two
 * nodes sweeping at once tolerate each other's removals; a directory a fill is writing into again
 * is not empty (rmdir fails, nothing lost) or new (publish makes it again).
 */
async function removeStaleSegments(dir: string, now: number): Promise<void> {
  const entries = await missingAsUndefined(readdir(dir, { withFileTypes: true })).catch(() => undefined);
  for (const entry of entries ?? []) {
    const path = join(dir, entry.name);
    // Judged before its contents are swept (which sets a directory's modification time to now): a
    // directory nothing was added to or removed from for a day.
    const info = await missingAsUndefined(lstat(path)).catch(() => undefined);
    const stale = info !== undefined && now - info.mtimeMs > STALE_SEGMENT_MS;
    if (info?.isDirectory()) {
      await removeStaleSegments(path, now);
      if (stale) await rmdir(path).catch(() => undefined);
    } else if (info?.isFile() && stale) {
      await unlink(path).catch(() => undefined);
    }
  }
}

class FilesystemStore implements SharedStore {
  readonly kind = 'filesystem';
  readonly location: string;

  constructor(private readonly root: string) {
    this.location = root;
  }

  async stat(key: string): Promise<SharedObject | undefined> {
    // lstat: a symbolic link at a key is not an object (read() would refuse it).
    const info = await guard(`stat ${key}`, () => missingAsUndefined(lstat(this.path(key))));
    return info?.isFile() ? { size: info.size, modified: info.mtime } : undefined;
  }

  async read(key: string, span?: ByteSpan, signal?: AbortSignal): Promise<Readable | undefined> {
    // Opened here rather than by the stream so that a missing file is an answer, not a stream error.
    const opened = await this.openObject(key);
    if (!opened) return undefined;
    const stream = opened.handle.createReadStream({ start: span?.start, end: span?.end, autoClose: true });
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

  async createFromRange(key: string, range: FileRange, signal?: AbortSignal): Promise<'created' | 'exists'> {
    // Read before the staged file is made: a bad range or an unreadable local file is not the store's failure.
    const body = await readRange(key, range, signal);
    const temp = this.tempPath();
    try {
      await guard(`copying a range for ${key}`, () => writeFile(temp, body, { flag: 'wx', flush: true, signal }), signal);
      signal?.throwIfAborted();
      return (await this.publish(key, temp)) ? 'created' : 'exists';
    } finally {
      await unlink(temp).catch(() => undefined);
    }
  }

  async writeRecord(key: string, body: Buffer, options?: WriteCondition): Promise<boolean> {
    const temp = this.tempPath();
    try {
      // Written whole (and synced) before anyone can see it under its key.
      await guard(`writing ${key}`, () => writeFile(temp, body, { flag: 'wx', flush: true }));
      if (options?.ifAbsent) return await this.publish(key, temp);
      if (options?.ifMatch !== undefined) return await this.swap(key, options.ifMatch, temp);
      await guard(`writing ${key}`, async () => {
        await mkdir(dirname(this.path(key)), { recursive: true });
        await this.checkDirectory(key, dirname(this.path(key)));
        await rename(temp, this.path(key));
      });
      return true;
    } finally {
      await unlink(temp).catch(() => undefined);
    }
  }

  async readRecord(key: string, maxBytes = RECORD_MAX_BYTES): Promise<Buffer | undefined> {
    return (await this.readVersioned(key, maxBytes))?.body;
  }

  async readVersioned(key: string, maxBytes = RECORD_MAX_BYTES): Promise<VersionedRecord | undefined> {
    const opened = await this.openObject(key);
    if (!opened) return undefined;
    const { handle, size, identity } = opened;
    try {
      checkRecordSize(`read ${key}`, size, maxBytes);
      const body = await readWhole(`read ${key}`, handle, size, maxBytes);
      return { body, version: versionOf(identity, body) };
    } finally {
      await handle.close().catch(() => undefined);
    }
  }

  async remove(key: string, options?: { readonly ifMatch?: string }): Promise<boolean> {
    if (options?.ifMatch !== undefined) return this.swap(key, options.ifMatch);
    await guard(`remove ${key}`, async () => {
      const path = this.path(key);
      // Not through a directory that leads elsewhere: nothing outside the store is removed.
      if ((await missingAsUndefined(realpath(dirname(path)))) !== dirname(path)) return;
      await missingAsUndefined(unlink(path));
    });
    return true;
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
        const info = await guard(`stat ${key}`, () => missingAsUndefined(lstat(join(this.root, key))));
        if (info) yield { key, size: info.size, modified: info.mtime };
      }
    }
  }

  /**
   * The object at a key, opened for reading with its size; undefined when there is none. Anything but
   * a regular file lying under the store's directory is refused (RefusedObject): a symbolic link (at
   * the key, or a directory above it), a FIFO, a device, a directory.
   */
  private async openObject(key: string): Promise<{ handle: FileHandle; size: number; identity: string } | undefined> {
    const path = this.path(key);
    let handle: FileHandle | undefined;
    try {
      handle = await open(path, OPEN_FLAGS);
    } catch (error) {
      const code = codeOf(error);
      if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
      if (code === 'ELOOP' || code === 'EISDIR' || code === 'ENXIO') throw new RefusedObject(`read ${key}: not a regular file (${code})`);
      throw new SharedStoreError(failureOf(error), `read ${key}: ${messageOf(error)}`, { cause: error });
    }
    try {
      const info = await guard(`read ${key}`, () => handle.stat({ bigint: true }));
      if (!info.isFile()) throw new RefusedObject(`read ${key}: not a regular file`);
      const opened = await openedPath(handle).catch(() => undefined);
      // Where /proc is not there to say: the path as resolved now (a race a writer could win, still
      // refused unless it lands inside the store).
      const actual = opened ?? (await guard(`read ${key}`, () => realpath(path)));
      if (actual !== path) throw new RefusedObject(`read ${key}: resolves outside the store's directory`);
      return { handle, size: Number(info.size), identity: identityOf(info) };
    } catch (error) {
      await handle.close().catch(() => undefined);
      throw error;
    }
  }

  /** Refuses to write through a directory that leads outside the store (a symbolic link planted in
   * the key's path): checked after the directories are made, before the object is published. */
  private async checkDirectory(key: string, dir: string): Promise<void> {
    if ((await realpath(dir)) !== dir) throw new SharedStoreError('error', `write ${key}: a directory on its path leads outside the store`);
  }

  /** link(2) the finished temp file to its key: false when the key is taken (nothing replaced). */
  private async publish(key: string, temp: string): Promise<boolean> {
    const target = this.path(key);
    return guard(`publishing ${key}`, async () => {
      for (let attempt = 1; ; attempt++) {
        await mkdir(dirname(target), { recursive: true });
        await this.checkDirectory(key, dirname(target));
        try {
          await link(temp, target);
          return true;
        } catch (error) {
          // The directory was removed between mkdir and link (an empty segments directory, swept
          // by a node starting up): made again, once.
          if (codeOf(error) === 'ENOENT' && attempt === 1) continue;
          if (codeOf(error) !== 'EEXIST') throw error;
          // NFS may retransmit a LINK whose first answer was lost and report EEXIST for its own
          // success (open(2)'s advice): a second link to the temp file means the key is ours.
          return (await stat(temp)).nlink === 2;
        }
      }
    });
  }

  /**
   * Compare-and-swap under a lock: of several nodes swapping `key`, one at a time holds its lock
   * file (an exclusive create in tmp/), checks that the object at the key is still `version`, and
   * only then replaces it by rename(2) over it, or removes it (without `temp`); false when it is
   * another version (nothing changed). The key is never without an object while a record is
   * replaced: a create-if-absent by another node in that moment would otherwise win a claim being
   * rewritten (a fill's announcement), and a reader would find it gone.
   */
  private async swap(key: string, version: string, temp?: string): Promise<boolean> {
    const path = this.path(key);
    return guard(`replacing ${key}`, async () => {
      // Not through a directory that leads elsewhere.
      if ((await missingAsUndefined(realpath(dirname(path)))) !== dirname(path)) return false;
      const info = await missingAsUndefined(lstat(path, { bigint: true }));
      if (!info?.isFile() || !version.startsWith(`${identityOf(info)}:`)) return false;
      const unlock = await this.lock(key);
      if (!unlock) return false;
      try {
        if ((await this.versionAt(path)) !== version) return false;
        if (temp === undefined) await unlink(path);
        else await rename(temp, path);
        return true;
      } finally {
        await unlock();
      }
    });
  }

  /**
   * The lock of a key's swap: an exclusive create of `tmp/swap-<hash of the key>` (atomic on NFS
   * too), waited for up to SWAP_LOCK_WAIT_MS; a lock older than SWAP_LOCK_STALE_MS was left by a
   * node that died mid-swap and is broken. Undefined when it could not be had in time.
   */
  private async lock(key: string): Promise<(() => Promise<void>) | undefined> {
    const lockPath = join(this.root, TMP, `swap-${createHash('sha256').update(key).digest('hex')}`);
    const deadline = Date.now() + SWAP_LOCK_WAIT_MS;
    for (;;) {
      try {
        await writeFile(lockPath, '', { flag: 'wx' });
        return () => unlink(lockPath).catch(() => undefined);
      } catch (error) {
        if (codeOf(error) !== 'EEXIST') throw error;
      }
      const held = await missingAsUndefined(lstat(lockPath));
      if (held && Date.now() - held.mtimeMs > SWAP_LOCK_STALE_MS) {
        await unlink(lockPath).catch(() => undefined);
        continue;
      }
      if (Date.now() >= deadline) return undefined;
      await new Promise((resolve) => setTimeout(resolve, 10 + Math.random() * 20));
    }
  }

  /** The version of the record file at `path` (in the staging area), as readVersioned gives it. */
  private async versionAt(path: string): Promise<string | undefined> {
    // Not a regular file (a symbolic link, a FIFO): not a version anyone read.
    const handle = await open(path, OPEN_FLAGS).catch(() => undefined);
    if (!handle) return undefined;
    try {
      const info = await handle.stat({ bigint: true });
      if (!info.isFile() || info.size > BigInt(RECORD_MAX_BYTES)) return undefined;
      return versionOf(identityOf(info), await readWhole(`read ${path}`, handle, Number(info.size), RECORD_MAX_BYTES));
    } finally {
      await handle.close().catch(() => undefined);
    }
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

/** The path of the file an open handle is (Linux: /proc/self/fd); a file replaced since it was
 * opened (a claim rewritten by rename) is still the one at that path. */
async function openedPath(handle: FileHandle): Promise<string> {
  return (await readlink(`/proc/self/fd/${handle.fd}`)).replace(/ \(deleted\)$/, '');
}

/** A file's identity for a version: its inode and modification time (a record is replaced by
 * rename, so a new version is a new inode; an inode number reused later differs in its time). */
function identityOf(info: BigIntStats): string {
  return `${info.ino}:${info.mtimeNs}`;
}

/** A record's version: its file's identity and a hash of its bytes (readVersioned's token). */
function versionOf(identity: string, body: Buffer): string {
  return `${identity}:${createHash('sha256').update(body).digest('hex')}`;
}

/** A record file's bytes, `size` of them as fstat said and at most `maxBytes`: one byte more is
 * asked for, so that a file that grew since is refused, not read on. */
async function readWhole(what: string, handle: FileHandle, size: number, maxBytes: number): Promise<Buffer> {
  const buffer = Buffer.alloc(Math.min(size, maxBytes) + 1);
  let length = 0;
  while (length < buffer.length) {
    const { bytesRead } = await guard(what, () => handle.read(buffer, length, buffer.length - length, length));
    if (bytesRead === 0) break;
    length += bytesRead;
  }
  if (length > maxBytes) throw new RefusedObject(`${what}: more than a record's ${maxBytes} bytes`);
  return buffer.subarray(0, length);
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
