// The shared tier on a ReadWriteMany directory (NFS, CephFS, a cloud file share) mounted on every
// node. Objects are files at `<path>/<key>`; every write goes to `<path>/tmp/` first and is
// published with link(2), which fails with EEXIST instead of replacing: the filesystem's own
// create-if-absent, atomic on NFS too, so readers never see a partly written object and of two
// nodes publishing the same key exactly one wins. A record is replaced or removed on condition of
// its version under a per-key lock (tmp/locks/<sha256 of the key>, taken with link(2) as well: one
// node holds it): the holder checks the version at the key, then replaces it with rename(2), which
// swaps the file atomically (a reader opens the old or the new one, never nothing), or unlinks it.
// A lock left by a holder that died is broken after LOCK_STALE_MS by renaming it aside (one breaker
// moves it). No flock(2): its semantics across NFS clients vary.
//
// Every node can write the directory, so what is found at a key is not trusted to be a file: an
// object is opened without following a symbolic link and without blocking (O_NOFOLLOW|O_NONBLOCK: a
// FIFO would hold one of Node's four file-system threads forever), and read only when it is a
// regular file that really lies under the store's directory (the opened file's path, from
// /proc/self/fd, is checked: a symbolic link in a directory above the key is caught there too).

import { createHash, randomUUID } from 'node:crypto';
import { constants, type BigIntStats } from 'node:fs';
import { link, lstat, mkdir, open, readdir, readlink, realpath, rename, rmdir, stat, unlink, writeFile, type FileHandle } from 'node:fs/promises';
import { hostname } from 'node:os';
import { dirname, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { addAbortSignal, type Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { checkRecordSize, isCallerAbort, messageOf, openLocal, readRange } from './common.js';
import { LocalFileError, RECORD_MAX_BYTES, RefusedObject, SharedStoreError, type ByteSpan, type FileRange, type SharedFailure, type SharedListing, type SharedObject, type SharedStore, type VersionedRecord, type WriteCondition } from './store.js';

/** Where writes are staged; on the same filesystem as the objects so that link(2) can publish them. */
const TMP = 'tmp';

/** A temp file this old is left by a writer that died (no copy of a blob takes a day). */
const STALE_TEMP_MS = 24 * 3_600_000;

/** Where the per-key locks of conditional replaces are (under the staging area: never listed, swept). */
const LOCKS = 'locks';

/** A lock held this long belongs to a holder that died: holding it takes a read of a record of at
 * most 4 KiB and one rename. Its age is judged by the store's own clock (the modification time of a
 * file the waiter just wrote, against the lock's), not the node's: clocks of nodes differ. */
export const LOCK_STALE_MS = 10_000;

/** How long a conditional replace waits for a lock another node keeps renewing (it never does: each
 * holder takes it anew) before failing as 'timeout'. */
const LOCK_WAIT_MS = 3 * LOCK_STALE_MS;

/** How often an object is opened again when it was replaced between open(2) and the check of its
 * path: a record rewritten that moment ("<path> (deleted)"; on NFS the client may keep a replaced
 * file it has open as a hidden .nfsXXXX beside it). */
const OPEN_ATTEMPTS = 3;

/** Where a fill publishes the blob's segments while it runs (tier.ts sharedKeys.segment); the fill
 * removes them once the blob is shared, a filler that died leaves them. */
const SEGMENTS = 'segments';

/** A segment this old is left by a filler that died (no fill takes a day): removed at open, as a
 * bucket's lifecycle rule expires them on object storage. */
const STALE_SEGMENT_MS = 24 * 3_600_000;

export async function openFilesystemStore(path: string, now = Date.now()): Promise<SharedStore> {
  await guard(`preparing ${path}`, () => mkdir(join(path, TMP), { recursive: true }));
  await removeStaleTemps(join(path, TMP), now);
  await removeStaleLocks(join(path, TMP), now);
  await removeStaleSegments(join(path, SEGMENTS), now);
  // Where the directory really is (the configured path may itself be a link, as a mount often is).
  return new FilesystemStore(await guard(`resolving ${path}`, () => realpath(path)));
}

/** Bytes per read and write when a blob is copied into the store (copyInto). */
const COPY_CHUNK_BYTES = 1024 * 1024;
/**
 * Bytes per read of a download (a follower's segment, a blob), not the stream default of 64 KiB:
 * each read is a thread-pool round trip, and each chunk a write into the reader's fill and one to
 * its client.
 */
const READ_CHUNK_BYTES = 512 * 1024;

/** Opened for reading without following a final symbolic link, and without blocking on a FIFO. */
const OPEN_FLAGS = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK;

/** Every node sweeps at open; two sweeping at once both tolerate the other's removals. */
async function removeStaleTemps(dir: string, now: number): Promise<void> {
  const names = await guard(`listing ${dir}`, () => readdir(dir));
  for (const name of names) {
    const info = await missingAsUndefined(lstat(join(dir, name))).catch(() => undefined);
    if (info && !info.isDirectory() && now - info.mtimeMs > STALE_TEMP_MS) await unlink(join(dir, name)).catch(() => undefined);
  }
}

/** Locks as old as a dead writer's temp files: left by holders that died on keys nobody replaced
 * since (a replace breaks a dead holder's lock itself). Broken as a replace breaks them, not unlinked:
 * a lock taken anew meanwhile stays. */
async function removeStaleLocks(tmp: string, now: number): Promise<void> {
  const locks = join(tmp, LOCKS);
  const names = await missingAsUndefined(readdir(locks)).catch(() => undefined);
  for (const name of names ?? []) {
    const info = await missingAsUndefined(lstat(join(locks, name), { bigint: true })).catch(() => undefined);
    if (info && now - Number(info.mtimeMs) > STALE_TEMP_MS) await breakLock(tmp, join(locks, name), info).catch(() => undefined);
  }
}

/**
 * Breaks the lock at `lock` judged stale as `judged`: renamed aside (of several nodes breaking it,
 * one moves it), then removed. When what was moved is not the lock judged (its holder released it
 * and another node took it since), it is linked back, unless a node took the lock meanwhile.
 */
async function breakLock(tmp: string, lock: string, judged: BigIntStats): Promise<void> {
  const aside = join(tmp, randomUUID());
  try {
    await rename(lock, aside);
  } catch (error) {
    if (codeOf(error) === 'ENOENT') return;
    throw error;
  }
  try {
    const moved = await lstat(aside, { bigint: true });
    if (identityOf(moved) !== identityOf(judged)) {
      // EEXIST: a node took the lock meanwhile (the holder moved finds its lock gone before it
      // commits, see FilesystemStore.holds); anything else (a directory cannot be linked): lost.
      await link(aside, lock).catch(() => undefined);
    }
  } finally {
    // A directory planted at a lock's name is moved aside too, and removed when empty.
    await unlink(aside).catch(() => rmdir(aside).catch(() => undefined));
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
    const stream = opened.handle.createReadStream({ start: span?.start, end: span?.end, autoClose: true, highWaterMark: READ_CHUNK_BYTES });
    return signal ? addAbortSignal(signal, stream) : stream;
  }

  async createFromFile(key: string, file: string, size: number, signal?: AbortSignal): Promise<'created' | 'exists'> {
    const temp = this.tempPath();
    try {
      const source = await openLocal(key, file);
      try {
        await guard(`copying ${file} for ${key}`, () => copyInto(key, source, temp, size, signal), signal);
      } finally {
        await source.close().catch(() => undefined);
      }
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
      // Not synced (unlike a blob or a record): a segment lives for one fill, every reader checks the
      // whole blob's digest, and on NFS the close already sends it to the server. Syncing each 8 MiB
      // made the publisher fall behind the fill on a loaded node.
      await guard(`copying a range for ${key}`, () => writeFile(temp, body, { flag: 'wx', signal }), signal);
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
    for (let attempt = 1; ; attempt++) {
      const opened = await this.openObject(key);
      if (!opened) return undefined;
      const { handle, size, identity } = opened;
      try {
        checkRecordSize(`read ${key}`, size, maxBytes);
        const body = await readWhole(`read ${key}`, handle, size, maxBytes);
        return { body, version: versionOf(identity, body) };
      } catch (error) {
        // NFS: a file another node replaced after this one opened it may be gone from the server
        // (ESTALE on read): replaced, look again.
        if (attempt < OPEN_ATTEMPTS && error instanceof SharedStoreError && codeOf(error.cause) === 'ESTALE') continue;
        throw error;
      } finally {
        await handle.close().catch(() => undefined);
      }
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
    for (let attempt = 1; ; attempt++) {
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
        const opened = await readlink(`/proc/self/fd/${handle.fd}`).catch(() => undefined);
        if (opened === undefined) {
          // Where /proc is not there to say: the path as resolved now (a race a writer could win,
          // still refused unless it lands inside the store).
          if ((await guard(`read ${key}`, () => realpath(path))) !== path) throw new RefusedObject(`read ${key}: resolves outside the store's directory`);
        } else if (opened !== path) {
          // Replaced (or removed) since it was opened, or really elsewhere (a symbolic link above
          // the key): look again. A file still replaced on the last look was the key's when opened.
          if (attempt < OPEN_ATTEMPTS) {
            await handle.close().catch(() => undefined);
            continue;
          }
          if (opened !== `${path} (deleted)`) throw new RefusedObject(`read ${key}: resolves outside the store's directory`);
        }
        return { handle, size: Number(info.size), identity: identityOf(info) };
      } catch (error) {
        await handle.close().catch(() => undefined);
        throw error;
      }
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
   * Compare-and-swap under the key's lock: `temp` replaces the object at `key` with rename(2) (a
   * reader opens the old file or the new one, never none), or without `temp` the object is removed,
   * only while it is `version` (false otherwise, nothing changed). Only conditional changes take the
   * lock: an unconditional write or remove of the same key is last-writer-wins against it (the tier
   * changes claims only conditionally).
   */
  private async swap(key: string, version: string, temp?: string): Promise<boolean> {
    const path = this.path(key);
    return guard(`replacing ${key}`, async () => {
      // Not through a directory that leads elsewhere; and a version that is not there any more (by
      // inode and modification time: a new version is a new file) is not worth the lock.
      if ((await missingAsUndefined(realpath(dirname(path)))) !== dirname(path)) return false;
      const info = await missingAsUndefined(lstat(path, { bigint: true }));
      if (!info?.isFile() || !version.startsWith(`${identityOf(info)}:`)) return false;
      const lock = await this.lock(key);
      try {
        if ((await this.versionAt(path)) !== version) return false;
        // Held past LOCK_STALE_MS (a stalled mount) and broken by another node, which may be
        // replacing the key now: not ours to change any more.
        if (!(await this.holds(lock))) throw new SharedStoreError('timeout', `replacing ${key}: held its lock past ${LOCK_STALE_MS / 1000} s, another node broke it`);
        if (temp === undefined) await missingAsUndefined(unlink(path));
        else await rename(temp, path);
        return true;
      } finally {
        await this.unlock(lock);
      }
    });
  }

  /**
   * Takes the key's lock: link(2) of a fresh file to tmp/locks/<sha256 of the key>, which one node
   * alone can do. While another node holds it, waits (polling, up to LOCK_WAIT_MS: 'timeout'); a lock
   * older than LOCK_STALE_MS by the store's clock is a dead holder's and is broken.
   */
  private async lock(key: string): Promise<Lock> {
    const locks = join(this.root, TMP, LOCKS);
    const path = join(locks, createHash('sha256').update(key).digest('hex'));
    const started = performance.now();
    let mine = await this.lockFile();
    let restage = false;
    try {
      for (let delay = 1; ; delay = Math.min(2 * delay, 50)) {
        if (performance.now() - started > LOCK_WAIT_MS) throw new SharedStoreError('timeout', `replacing ${key}: its lock ${path} stayed taken for ${LOCK_WAIT_MS / 1000} s`);
        // A lock's age is its file's: one written before a long wait would look stale once taken.
        if (restage || performance.now() - mine.writtenAt > LOCK_STALE_MS / 10) {
          restage = false;
          await unlink(mine.temp).catch(() => undefined);
          mine = await this.lockFile();
        }
        await mkdir(locks, { recursive: true });
        if ((await realpath(locks)) !== locks) throw new SharedStoreError('error', `replacing ${key}: ${locks} leads outside the store`);
        try {
          await link(mine.temp, path);
          return { path, identity: mine.identity };
        } catch (error) {
          if (codeOf(error) === 'ENOENT') {
            // The lock directory was removed (made again above), or the staged file was.
            restage = true;
            continue;
          }
          if (codeOf(error) !== 'EEXIST') throw error;
          // NFS may answer a retransmitted LINK that succeeded with EEXIST (see publish).
          if ((await stat(mine.temp)).nlink === 2) return { path, identity: mine.identity };
        }
        const held = await missingAsUndefined(lstat(path, { bigint: true }));
        if (held === undefined) continue; // released meanwhile
        // The store's clock now: the lock file's time as the store set it, plus the time since.
        const storeNow = mine.modifiedMs + (performance.now() - mine.writtenAt);
        if (storeNow - Number(held.mtimeNs / 1_000_000n) > LOCK_STALE_MS) {
          await breakLock(join(this.root, TMP), path, held);
          continue;
        }
        await sleep(delay);
      }
    } finally {
      await unlink(mine.temp).catch(() => undefined);
    }
  }

  /** A fresh file to link as a lock, naming its holder (for an operator looking at a lock that stays). */
  private async lockFile(): Promise<{ temp: string; identity: string; modifiedMs: number; writtenAt: number }> {
    const temp = this.tempPath();
    await writeFile(temp, `${hostname()} ${process.pid}\n`, { flag: 'wx' });
    const writtenAt = performance.now();
    const info = await lstat(temp, { bigint: true }).catch(async (error: unknown) => {
      await unlink(temp).catch(() => undefined);
      throw error;
    });
    return { temp, identity: identityOf(info), modifiedMs: Number(info.mtimeNs / 1_000_000n), writtenAt };
  }

  /** Whether the lock is still the one this node took (not broken as stale by another node). */
  private async holds(lock: Lock): Promise<boolean> {
    const info = await missingAsUndefined(lstat(lock.path, { bigint: true }));
    return info !== undefined && identityOf(info) === lock.identity;
  }

  /** Drops the lock, unless another node broke it and holds it now. */
  private async unlock(lock: Lock): Promise<void> {
    if (await this.holds(lock).catch(() => false)) await unlink(lock.path).catch(() => undefined);
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

/** A key's lock as its holder took it: where, and the identity of the file it linked there. */
interface Lock {
  readonly path: string;
  readonly identity: string;
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

/**
 * Copies `size` bytes of `source` into a new file `temp` (exclusive create: never through a link
 * planted at its name) and syncs it. Through one buffer of COPY_CHUNK_BYTES, each read and write a
 * thread-pool job of its own: one copyFile call (the kernel's copy, no byte in this process) would
 * hold one of Node's four file-system threads for the whole blob, minutes for a large one onto NFS,
 * while every other file operation of the proxy waits behind it; it also copies the file's mode,
 * which some mounts refuse. The source is read positionally up to `size` + 1 bytes: a local file
 * shorter or longer than `size` is a LocalFileError, not the store's failure.
 */
async function copyInto(key: string, source: FileHandle, temp: string, size: number, signal?: AbortSignal): Promise<void> {
  const target = await open(temp, 'wx');
  try {
    const buffer = Buffer.allocUnsafe(Math.min(COPY_CHUNK_BYTES, size + 1));
    let position = 0;
    while (position <= size) {
      signal?.throwIfAborted();
      let bytesRead: number;
      try {
        ({ bytesRead } = await source.read(buffer, 0, Math.min(buffer.length, size + 1 - position), position));
      } catch (error) {
        throw new LocalFileError(`upload ${key}: reading the local file: ${messageOf(error)}`, { cause: error });
      }
      if (bytesRead === 0) break;
      if (position + bytesRead > size) throw new LocalFileError(`upload ${key}: the local file has more than the ${size} bytes expected`);
      for (let written = 0; written < bytesRead; ) written += (await target.write(buffer, written, bytesRead - written, position + written)).bytesWritten;
      position += bytesRead;
    }
    if (position !== size) throw new LocalFileError(`upload ${key}: the local file ends at ${position}, before the ${size} bytes expected`);
    await target.sync();
  } finally {
    await target.close();
  }
}

async function guard<T>(what: string, operation: () => Promise<T>, signal?: AbortSignal): Promise<T> {
  try {
    return await operation();
  } catch (error) {
    // A local file's failure is the caller's, not the store's.
    if (error instanceof SharedStoreError || error instanceof LocalFileError || isCallerAbort(error, signal)) throw error;
    throw new SharedStoreError(failureOf(error), `${what}: ${messageOf(error)}`, { cause: error });
  }
}
