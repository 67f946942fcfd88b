// The node store: blobs by digest on the node's disk (a hostPath that outlives the proxy Pod),
// links that say which (rule, repository) fetched a blob, and what each tag pointed at.
//
//   <root>/blobs/<algorithm>/<hex>                          content, only ever digest-verified
//   <root>/origins/<algorithm>/<hex>                        the upstreams (upstreamOrigin) it came from, one a line
//   <root>/tmp/<random>                                     fills in progress; removed on open
//   <root>/repositories/<rule>/<repository>/_links/<algorithm>/<hex>    a link (its mtime: last confirmed)
//   <root>/repositories/<rule>/<repository>/_tags/<tag>                 JSON TagRecord
//
// (`_links` and `_tags` cannot collide with a repository path component: those start with a letter
// or digit.) A blob is written to tmp/ while it streams, hashed as it goes, flushed to disk and
// renamed into place only when its digest matches, so a crash or a cut leaves nothing servable.
// Every digest, rule, repository and tag is checked against its grammar before it names a path
// (policy.ts's digestKey, repositoryKey, tagKey: a CacheKeyError otherwise), so that nothing
// outside the root is ever stat-ed, written or removed, whoever made the name up.
// A thin adapter: what to keep and what to evict is decided in policy.ts.
//
// Links and tag records (metadata) are indexed by the digest they name: when a blob is removed,
// its links and the tag records naming it go too, with directories left empty. A metadata write
// asks `metadataGate` first (the cache refuses it when the disk is short of inodes).

import { createHash, randomBytes, type Hash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { appendFile, mkdir, open, readdir, readFile, rename, rm, rmdir, stat, statfs, utimes, writeFile, type FileHandle } from 'node:fs/promises';
import { dirname, join, relative, sep } from 'node:path';
import { digestError } from '../reference/reference.js';
import { digestKey, parseTagRecord, repositoryKey, tagKey, type StoredBlob, type TagRecord } from './policy.js';
import { once } from '../once.js';

interface Entry {
  size: number;
  lastUsed: number;
  readers: number;
}

/** Room on the store's disk held by one fill in flight: its announced length, grown as it writes
 * more (a chunked body), released when it is stored or discarded. */
export interface DiskReservation {
  readonly bytes: number;
  /** The fill has `total` bytes on the disk now. */
  wrote(total: number): void;
  /** Room for `total` bytes in all (taken in steps); false when the limits refuse: the fill stops storing. */
  grow(total: number): Promise<boolean>;
  release(): void;
}

/** A reader's hold on a stored blob: it is not evicted until released. */
export interface BlobLease {
  readonly path: string;
  readonly size: number;
  release(): void;
}

/** A link as read: a manifest's media type ('' for a blob), and when the upstream last confirmed it
 * (fetched through the link's rule, or answered a HEAD there; ms since the epoch). */
export interface LinkState {
  readonly mediaType: string;
  readonly confirmedAt: number;
}

/** What a purge removed. */
export interface PurgeOutcome {
  readonly links: number;
  readonly tags: number;
}

/** An upstream origin as recorded (upstreamOrigin: a sha256 in hex). */
const ORIGIN = /^[0-9a-f]{64}$/;

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
    private readonly hash: Hash,
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
    const writing = this.file.writev(chunks, this.written);
    // Hashed on the event loop while the thread pool writes them. (A hashing thread reading the file
    // back cost a copy and a hand-off per MiB, about 0.2 CPU-s per GiB, for no gain on two cores.)
    for (const chunk of chunks) this.hash.update(chunk);
    let done = (await writing).bytesWritten;
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
    this.written += total;
    this.emit('progress', this.written);
  }

  /** Verifies the digest; stores the blob when it matches, discards it otherwise. */
  async finish(): Promise<FillOutcome> {
    if (this.settled) throw new Error('fill already finished');
    this.settled = true;
    const actual = `${this.digest.slice(0, this.digest.indexOf(':'))}:${this.hash.digest('hex')}`;
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
    await this.finishInto(this, false);
    this.emit('done', { stored: false, reason });
  }

  /** @internal */
  close(): Promise<void> {
    return this.file.close();
  }
}

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
  ) {}

  /**
   * Opens (creating) the store: removes fills a crash or restart left behind, indexes the blobs.
   * `removePartialFills: false` leaves tmp/ alone, for a process that shares the store with a running
   * proxy (`pullbridge warm`): what is there may be that proxy's fills in progress.
   */
  static async open(root: string, now: () => number = Date.now, options: { readonly removePartialFills?: boolean } = {}): Promise<NodeStore> {
    const store = new NodeStore(root, now);
    if (options.removePartialFills !== false) await rm(join(root, 'tmp'), { recursive: true, force: true });
    await Promise.all(['tmp', 'blobs', 'origins', 'repositories'].map((dir) => mkdir(join(root, dir), { recursive: true })));
    await store.indexMetadata();
    // Only files named as the store names them (`<algorithm>/<hex>`, a digest by the grammar) are
    // blobs; anything else there is not indexed, and so never served or evicted.
    for (const algorithm of await readdir(join(root, 'blobs'), { withFileTypes: true })) {
      if (!algorithm.isDirectory()) continue;
      for (const hex of await readdir(join(root, 'blobs', algorithm.name), { withFileTypes: true })) {
        const digest = `${algorithm.name}:${hex.name}`;
        if (!hex.isFile() || digestError(digest) !== null) continue;
        const info = await stat(join(root, 'blobs', algorithm.name, hex.name));
        if (info.isFile()) store.entries.set(digest, { size: info.size, lastUsed: info.mtimeMs, readers: 0 });
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

  /** Where a blob is (or would be) stored; a CacheKeyError for what is not a digest. */
  blobPathOf(digest: string): string {
    const { algorithm, hex } = digestKey(digest);
    return join(this.root, 'blobs', algorithm, hex);
  }

  private repositoryPath(rule: string, repository: string): string {
    return join(this.root, 'repositories', ...repositoryKey(rule, repository));
  }

  has(digest: string): boolean {
    return this.entries.has(digest);
  }

  /**
   * Whether `digest` is stored, looking on disk too: another process (`pullbridge warm`) may have
   * stored it since the store was opened; its rename is atomic, so a file there is complete.
   */
  async lookup(digest: string): Promise<boolean> {
    const path = this.blobPathOf(digest);
    if (this.entries.has(digest)) return true;
    try {
      const info = await stat(path);
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
    return {
      path: this.blobPathOf(digest),
      size: entry.size,
      release: once(() => entry.readers--),
    };
  }

  /** Starts writing a blob; finish() stores it only if it hashes to `digest`. */
  async startFill(digest: string): Promise<BlobFill> {
    const { algorithm, hex } = digestKey(digest);
    const path = join(this.root, 'tmp', `${hex.slice(0, 16)}-${randomBytes(6).toString('hex')}`);
    const file = await open(path, 'wx');
    return new BlobFill(digest, path, file, createHash(algorithm), async (fill, ok) => {
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
      try {
        await mkdir(join(this.root, 'blobs', algorithm), { recursive: true });
        await rename(path, target);
      } catch (error) {
        await rm(path, { force: true }); // verified bytes that could not be published are not kept in tmp/
        throw error;
      }
      this.entries.set(digest, { size: fill.written, lastUsed: this.now(), readers: this.entries.get(digest)?.readers ?? 0 });
      return { stored: true };
    });
  }

  /** Deletes a blob that no one is reading; false when it is being read (or not stored). */
  async remove(digest: string): Promise<boolean> {
    const path = this.blobPathOf(digest);
    const entry = this.entries.get(digest);
    if (!entry || entry.readers > 0) return false;
    this.entries.delete(digest);
    await rm(path, { force: true });
    await rm(this.originsPath(digest), { force: true });
    await this.removeMetadata(digest);
    return true;
  }

  private originsPath(digest: string): string {
    const { algorithm, hex } = digestKey(digest);
    return join(this.root, 'origins', algorithm, hex);
  }

  /** Records that `digest`'s bytes came, verified, from the upstream `origin` (upstreamOrigin). */
  async addOrigin(digest: string, origin: string): Promise<void> {
    if (!ORIGIN.test(origin)) throw new Error('an upstream origin is a sha256 in hex');
    const path = this.originsPath(digest);
    if ((await this.origins(path)).includes(origin)) return;
    await mkdir(join(path, '..'), { recursive: true });
    await appendFile(path, `${origin}\n`);
  }

  /** Whether `digest` is stored and its bytes came from the upstream `origin`: only that upstream's
   * HEAD may confirm it for a (rule, repository) without a link. */
  async storedFrom(digest: string, origin: string): Promise<boolean> {
    return (await this.lookup(digest)) && (await this.origins(this.originsPath(digest))).includes(origin);
  }

  private async origins(path: string): Promise<string[]> {
    const text = await readFile(path, 'utf8').catch(() => '');
    return text.split('\n').filter((line) => ORIGIN.test(line));
  }

  private linkPath(rule: string, repository: string, digest: string): string {
    const { algorithm, hex } = digestKey(digest);
    return join(this.repositoryPath(rule, repository), '_links', algorithm, hex);
  }

  /**
   * Records that `digest` was fetched through `rule` for `repository` (or the upstream confirmed it
   * there), confirmed now; a manifest's link holds its media type.
   */
  async link(rule: string, repository: string, digest: string, mediaType = '', confirmed: 'now' | 'not yet' = 'now'): Promise<void> {
    const path = this.linkPath(rule, repository, digest);
    if (!(await this.metadataGate())) return;
    await mkdir(join(path, '..'), { recursive: true });
    await writeFile(path, mediaType);
    this.indexed(digest, path);
    // 'not yet': taken from the shared tier without the upstream's word; the next use asks it.
    await this.confirmLink(rule, repository, digest, confirmed === 'now' ? this.now() : 0);
  }

  /** The upstream confirmed the link again (now, unless `at` says when): its mtime says when. */
  async confirmLink(rule: string, repository: string, digest: string, atMs = this.now()): Promise<void> {
    const at = new Date(atMs);
    await utimes(this.linkPath(rule, repository, digest), at, at).catch(() => undefined);
  }

  /** Removes a link: `(rule, repository)` may no longer read `digest` without asking its upstream. */
  async unlink(rule: string, repository: string, digest: string): Promise<void> {
    await this.removeEntry(this.linkPath(rule, repository, digest));
  }

  /** Removes one link or tag record, and forgets it in the metadata index; whether it was there. */
  private async removeEntry(path: string): Promise<boolean> {
    const digest = this.metadataDigest.get(path);
    if (digest !== undefined) {
      this.metadataDigest.delete(path);
      this.metadata.get(digest)?.delete(path);
    }
    const there = await stat(path).then(() => true, () => false);
    await rm(path, { force: true });
    return there;
  }

  /** Whether `digest` was fetched through `rule` (whose upstream is `origin`) for `repository` (and is still stored). */
  async linked(rule: string, repository: string, digest: string, origin: string): Promise<boolean> {
    return (await this.readLink(rule, repository, digest, origin)) !== null;
  }

  /** A link's content (a manifest's media type, '' for a blob), or null: see readLinkState. */
  async readLink(rule: string, repository: string, digest: string, origin: string): Promise<string | null> {
    return (await this.readLinkState(rule, repository, digest, origin))?.mediaType ?? null;
  }

  /**
   * A link of `rule`, whose upstream is `origin`, and when it was last confirmed; null without a
   * link or blob, or when the blob's bytes did not come from that upstream (another rule's, or the
   * rule pointed elsewhere when it was fetched): then it is fetched again through the rule.
   */
  async readLinkState(rule: string, repository: string, digest: string, origin: string): Promise<LinkState | null> {
    if (!(await this.storedFrom(digest, origin))) return null;
    let file;
    try {
      file = await open(this.linkPath(rule, repository, digest), 'r');
    } catch {
      return null;
    }
    try {
      const info = await file.stat();
      return { mediaType: await file.readFile('utf8'), confirmedAt: info.mtimeMs };
    } catch {
      return null;
    } finally {
      await file.close();
    }
  }

  /**
   * Forgets what `(rule, repository)` may read: its link to `digest` and the tag records naming it,
   * or, without a digest, all its links and tag records. The blobs stay for other links (eviction
   * takes them).
   */
  async purge(rule: string, repository: string, digest?: string): Promise<PurgeOutcome> {
    const base = this.repositoryPath(rule, repository);
    let links = 0;
    let tags = 0;
    if (digest !== undefined) {
      if (await this.removeEntry(this.linkPath(rule, repository, digest))) links++;
    } else {
      for (const algorithm of await readdir(join(base, '_links')).catch(() => [])) {
        for (const hex of await readdir(join(base, '_links', algorithm)).catch(() => [])) {
          if (await this.removeEntry(join(base, '_links', algorithm, hex))) links++;
        }
      }
    }
    for (const tag of await readdir(join(base, '_tags')).catch(() => [])) {
      if (digest !== undefined && (await this.readRecord(join(base, '_tags', tag)))?.digest !== digest) continue;
      if (await this.removeEntry(join(base, '_tags', tag))) tags++;
    }
    return { links, tags };
  }

  async readTag(rule: string, repository: string, tag: string): Promise<TagRecord | undefined> {
    return this.readRecord(join(this.repositoryPath(rule, repository), '_tags', tagKey(tag)));
  }

  private async readRecord(path: string): Promise<TagRecord | undefined> {
    const text = await readFile(path, 'utf8').catch(() => undefined);
    return text === undefined ? undefined : parseTagRecord(text);
  }

  /** Written to a temporary file and renamed, so a reader never sees half a record. */
  async writeTag(rule: string, repository: string, tag: string, record: TagRecord): Promise<void> {
    const dir = join(this.repositoryPath(rule, repository), '_tags');
    const name = tagKey(tag);
    digestKey(record.digest); // a record naming what is not a digest is refused, as it would be read
    if (!(await this.metadataGate())) return;
    await mkdir(dir, { recursive: true });
    const temporary = join(this.root, 'tmp', `tag-${randomBytes(6).toString('hex')}`);
    await writeFile(temporary, JSON.stringify(record));
    await rename(temporary, join(dir, name));
    this.indexed(record.digest, join(dir, name));
  }
}

