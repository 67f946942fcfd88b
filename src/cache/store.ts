// The node store: blobs by digest on the node's disk (a hostPath that outlives the proxy Pod),
// links that say which (rule, repository) fetched a blob, and what each tag pointed at.
//
//   <root>/blobs/<algorithm>/<hex>                          content, only ever digest-verified
//   <root>/tmp/<random>                                     fills in progress; removed on open
//   <root>/repositories/<rule>/<repository>/_links/<algorithm>/<hex>    empty file: a link
//   <root>/repositories/<rule>/<repository>/_tags/<tag>                 JSON TagRecord
//
// (`_links` and `_tags` cannot collide with a repository path component: those start with a letter
// or digit.) A blob is written to tmp/ while it streams, hashed as it goes, flushed to disk and
// renamed into place only when its digest matches, so a crash or a cut leaves nothing servable.
// A thin adapter: what to keep and what to evict is decided in policy.ts.
//
// Links and tag records (metadata) are indexed by the digest they name: when a blob is removed,
// its links and the tag records naming it go too, with directories left empty. A metadata write
// asks `metadataGate` first (the cache refuses it when the disk is short of inodes).

import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { mkdir, open, readdir, readFile, rename, rm, rmdir, stat, statfs, utimes, writeFile, type FileHandle } from 'node:fs/promises';
import { dirname, join, relative, sep } from 'node:path';
import { inlineHash, type FillHash, type HashFactory } from './hasher.js';
import { parseTagRecord, type StoredBlob, type TagRecord } from './policy.js';

interface Entry {
  size: number;
  lastUsed: number;
  readers: number;
}

/** A reader's hold on a stored blob: it is not evicted until released. */
export interface BlobLease {
  readonly path: string;
  readonly size: number;
  release(): void;
}

/** A failed fill's `corrupt`: the whole body arrived and hashed to another digest (not a cut transfer). */
export type FillOutcome = { readonly stored: true } | { readonly stored: false; readonly reason: string; readonly corrupt?: true };

/**
 * One blob being written. Readers that join while it fills can read `path` up to `written`
 * (an open descriptor keeps reading the same file after the rename); 'progress' is emitted after
 * each append, 'verified' as soon as the bytes hashed right (before they are flushed and renamed:
 * readers need not wait for the disk), 'done' with the outcome.
 */
export class BlobFill extends EventEmitter {
  written = 0;
  private settled = false;

  constructor(
    readonly digest: string,
    readonly path: string,
    private readonly file: FileHandle,
    private readonly hash: FillHash,
    private readonly finishInto: (fill: BlobFill, ok: boolean) => Promise<FillOutcome>,
  ) {
    super();
  }

  /** Writes a chunk at the end; the caller keeps `chunk` unchanged until this resolves. */
  append(chunk: Uint8Array): Promise<void> {
    return this.appendv([Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length)]);
  }

  /** Writes chunks at the end in one call; the caller keeps them unchanged until this resolves. */
  async appendv(chunks: readonly Buffer[]): Promise<void> {
    if (this.settled) throw new Error('fill already finished');
    let total = 0;
    for (const chunk of chunks) total += chunk.length;
    let done = (await this.file.writev(chunks, this.written)).bytesWritten;
    // A short writev (rare: a signal, a full disk) continues with plain writes of what is left.
    let offset = 0;
    for (const chunk of chunks) {
      const end = offset + chunk.length;
      if (done < end) {
        const from = Math.max(0, done - offset);
        for (let written = from; written < chunk.length; ) {
          const n = (await this.file.write(chunk, written, chunk.length - written, this.written + offset + written)).bytesWritten;
          if (n === 0) throw new Error('the cache disk accepted no more bytes');
          written += n;
        }
        done = end;
      }
      offset = end;
    }
    const before = this.written;
    this.written += total;
    offset = before;
    for (const chunk of chunks) {
      offset += chunk.length;
      this.hash.update(chunk, offset);
    }
    this.emit('progress', this.written);
  }

  /** Verifies the digest; stores the blob when it matches, discards it otherwise. */
  async finish(): Promise<FillOutcome> {
    if (this.settled) throw new Error('fill already finished');
    this.settled = true;
    let actual: string;
    try {
      actual = `${this.digest.slice(0, this.digest.indexOf(':'))}:${await this.hash.digest(this.written)}`;
    } catch (error) {
      await this.finishInto(this, false);
      const outcome: FillOutcome = { stored: false, reason: (error as Error).message };
      this.emit('done', outcome);
      return outcome;
    }
    const ok = actual === this.digest;
    if (ok) this.emit('verified');
    const stored = await this.finishInto(this, ok);
    const outcome: FillOutcome = ok ? stored : { stored: false, reason: `content hashes to ${actual}, not ${this.digest}`, corrupt: true };
    this.emit('done', outcome);
    return outcome;
  }

  /** Discards what was written (the upstream failed, or nobody wants it any more). */
  async abort(reason: string): Promise<void> {
    if (this.settled) return;
    this.settled = true;
    this.hash.dispose();
    await this.finishInto(this, false);
    this.emit('done', { stored: false, reason });
  }

  /** @internal */
  close(): Promise<void> {
    return this.file.close();
  }
}

const hexOf = (digest: string) => digest.slice(digest.indexOf(':') + 1);
const algorithmOf = (digest: string) => digest.slice(0, digest.indexOf(':'));

export class NodeStore {
  private readonly entries = new Map<string, Entry>();
  /** Digest → paths of the links and tag records that name it. */
  private readonly metadata = new Map<string, Set<string>>();
  /** Path of a link or tag record → the digest it names. */
  private readonly metadataDigest = new Map<string, string>();
  /** Asked before a link or tag record is written: false skips the write (set by the cache). */
  metadataGate: () => Promise<boolean> = () => Promise.resolve(true);

  private constructor(
    readonly root: string,
    private readonly now: () => number,
    private readonly hashOf: HashFactory,
  ) {}

  /**
   * Opens (creating) the store: removes fills a crash or restart left behind, indexes the blobs.
   * `hash`: how fills are hashed (inline by default; the proxy hashes on a thread of its own).
   * `removePartialFills: false` leaves tmp/ alone, for a process that shares the store with a running
   * proxy (`pullbridge warm`): what is there may be that proxy's fills in progress.
   */
  static async open(root: string, now: () => number = Date.now, hash: HashFactory = inlineHash, options: { readonly removePartialFills?: boolean } = {}): Promise<NodeStore> {
    const store = new NodeStore(root, now, hash);
    if (options.removePartialFills !== false) await rm(join(root, 'tmp'), { recursive: true, force: true });
    await Promise.all(['tmp', 'blobs', 'repositories'].map((dir) => mkdir(join(root, dir), { recursive: true })));
    await store.indexMetadata();
    for (const algorithm of await readdir(join(root, 'blobs'))) {
      for (const hex of await readdir(join(root, 'blobs', algorithm))) {
        const info = await stat(join(root, 'blobs', algorithm, hex));
        if (info.isFile()) store.entries.set(`${algorithm}:${hex}`, { size: info.size, lastUsed: info.mtimeMs, readers: 0 });
      }
    }
    return store;
  }

  /** Finds the links and tag records left by earlier processes. */
  private async indexMetadata(): Promise<void> {
    const base = join(this.root, 'repositories');
    for (const entry of await readdir(base, { recursive: true, withFileTypes: true })) {
      if (!entry.isFile()) continue;
      const path = join(entry.parentPath, entry.name);
      const parts = relative(base, path).split(sep);
      const kind = parts[parts.length - 3] === '_links' ? 'link' : parts[parts.length - 2] === '_tags' ? 'tag' : undefined;
      if (kind === 'link') this.indexed(`${parts[parts.length - 2]}:${parts[parts.length - 1]}`, path);
      else if (kind === 'tag') this.indexed((await this.readRecord(path))?.digest ?? '', path);
    }
  }

  private indexed(digest: string, path: string): void {
    const before = this.metadataDigest.get(path);
    if (before === digest) return;
    // A tag record rewritten to name another digest moves.
    if (before !== undefined) this.metadata.get(before)?.delete(path);
    this.metadataDigest.set(path, digest);
    let paths = this.metadata.get(digest);
    if (!paths) this.metadata.set(digest, (paths = new Set()));
    paths.add(path);
  }

  /** Links and tag records on disk. */
  metadataEntries(): number {
    return this.metadataDigest.size;
  }

  /** Removes the links and tag records naming `digest`, and the directories that leaves empty. */
  private async removeMetadata(digest: string): Promise<void> {
    const paths = this.metadata.get(digest);
    if (!paths) return;
    this.metadata.delete(digest);
    const base = join(this.root, 'repositories');
    for (const path of paths) {
      this.metadataDigest.delete(path);
      await rm(path, { force: true });
      for (let dir = dirname(path); dir.startsWith(base + sep); dir = dirname(dir)) {
        if (!(await rmdir(dir).then(() => true, () => false))) break; // not empty (or gone): its parents are not either
      }
    }
  }

  blobPathOf(digest: string): string {
    return join(this.root, 'blobs', algorithmOf(digest), hexOf(digest));
  }

  private repositoryPath(rule: string, repository: string): string {
    return join(this.root, 'repositories', rule, ...repository.split('/'));
  }

  has(digest: string): boolean {
    return this.entries.has(digest);
  }

  /**
   * Whether `digest` is stored, looking on disk too: another process (`pullbridge warm`) may have
   * stored it since the store was opened; its rename is atomic, so a file there is complete.
   */
  async lookup(digest: string): Promise<boolean> {
    if (this.entries.has(digest)) return true;
    try {
      const info = await stat(this.blobPathOf(digest));
      if (!info.isFile()) return false;
      if (!this.entries.has(digest)) this.entries.set(digest, { size: info.size, lastUsed: info.mtimeMs, readers: 0 });
      return true;
    } catch {
      return false;
    }
  }

  /** Free bytes on the store's disk, for the unprivileged user. */
  async freeBytes(): Promise<number> {
    return (await this.free()).bytes;
  }

  /** Free bytes (for the unprivileged user) and inodes on the store's disk; inodes undefined when the filesystem does not count them. */
  async free(): Promise<{ bytes: number; inodes: number | undefined; totalInodes: number | undefined }> {
    const info = await statfs(this.root);
    const counted = info.files > 0;
    return { bytes: info.bavail * info.bsize, inodes: counted ? info.ffree : undefined, totalInodes: counted ? info.files : undefined };
  }

  /** Every stored blob, for eviction and status. */
  blobs(): StoredBlob[] {
    return [...this.entries].map(([digest, e]) => ({ digest, size: e.size, lastUsed: e.lastUsed, readers: e.readers }));
  }

  /** Bytes and blobs stored. */
  usage(): { bytes: number; blobs: number } {
    let bytes = 0;
    for (const e of this.entries.values()) bytes += e.size;
    return { bytes, blobs: this.entries.size };
  }

  /** Holds a stored blob for a reader (and marks it used), or null when it is not stored. */
  lease(digest: string): BlobLease | null {
    const entry = this.entries.get(digest);
    if (!entry) return null;
    entry.readers++;
    entry.lastUsed = this.now();
    // Persisted lazily as the mtime, so that LRU order survives a restart.
    void utimes(this.blobPathOf(digest), new Date(), new Date(entry.lastUsed)).catch(() => undefined);
    let released = false;
    return {
      path: this.blobPathOf(digest),
      size: entry.size,
      release: () => {
        if (released) return;
        released = true;
        entry.readers--;
      },
    };
  }

  /** Starts writing a blob; finish() stores it only if it hashes to `digest`. */
  async startFill(digest: string): Promise<BlobFill> {
    const path = join(this.root, 'tmp', `${hexOf(digest).slice(0, 16)}-${randomBytes(6).toString('hex')}`);
    const file = await open(path, 'wx');
    return new BlobFill(digest, path, file, this.hashOf(path, algorithmOf(digest)), async (fill, ok) => {
      try {
        if (ok) await file.sync(); // durable before it becomes visible: never a renamed empty file after a power loss
      } finally {
        await fill.close();
      }
      if (!ok) {
        await rm(path, { force: true });
        return { stored: false, reason: 'discarded' };
      }
      const target = this.blobPathOf(digest);
      await mkdir(join(this.root, 'blobs', algorithmOf(digest)), { recursive: true });
      await rename(path, target);
      this.entries.set(digest, { size: fill.written, lastUsed: this.now(), readers: this.entries.get(digest)?.readers ?? 0 });
      return { stored: true };
    });
  }

  /** Deletes a blob that no one is reading; false when it is being read (or not stored). */
  async remove(digest: string): Promise<boolean> {
    const entry = this.entries.get(digest);
    if (!entry || entry.readers > 0) return false;
    this.entries.delete(digest);
    await rm(this.blobPathOf(digest), { force: true });
    await this.removeMetadata(digest);
    return true;
  }

  private linkPath(rule: string, repository: string, digest: string): string {
    return join(this.repositoryPath(rule, repository), '_links', algorithmOf(digest), hexOf(digest));
  }

  /**
   * Records that `digest` was fetched through `rule` for `repository` (or the upstream confirmed it
   * there); a manifest's link holds its media type.
   */
  async link(rule: string, repository: string, digest: string, mediaType = ''): Promise<void> {
    const path = this.linkPath(rule, repository, digest);
    if (!(await this.metadataGate())) return;
    await mkdir(join(path, '..'), { recursive: true });
    await writeFile(path, mediaType);
    this.indexed(digest, path);
  }

  /** Whether `digest` was fetched through `rule` for `repository` (and is still stored). */
  async linked(rule: string, repository: string, digest: string): Promise<boolean> {
    return (await this.readLink(rule, repository, digest)) !== null;
  }

  /** A link's content (a manifest's media type, '' for a blob), or null without a link or blob. */
  async readLink(rule: string, repository: string, digest: string): Promise<string | null> {
    if (!(await this.lookup(digest))) return null;
    try {
      return await readFile(this.linkPath(rule, repository, digest), 'utf8');
    } catch {
      return null;
    }
  }

  async readTag(rule: string, repository: string, tag: string): Promise<TagRecord | undefined> {
    return this.readRecord(join(this.repositoryPath(rule, repository), '_tags', tag));
  }

  private async readRecord(path: string): Promise<TagRecord | undefined> {
    const text = await readFile(path, 'utf8').catch(() => undefined);
    return text === undefined ? undefined : parseTagRecord(text);
  }

  /** Written to a temporary file and renamed, so a reader never sees half a record. */
  async writeTag(rule: string, repository: string, tag: string, record: TagRecord): Promise<void> {
    const dir = join(this.repositoryPath(rule, repository), '_tags');
    if (!(await this.metadataGate())) return;
    await mkdir(dir, { recursive: true });
    const temporary = join(this.root, 'tmp', `tag-${randomBytes(6).toString('hex')}`);
    await writeFile(temporary, JSON.stringify(record));
    await rename(temporary, join(dir, tag));
    this.indexed(record.digest, join(dir, tag));
  }
}
