// The node cache's rules, as data in and data out (no clock, no files): sizes written as Kubernetes
// quantities, when a cached tag may answer without asking upstream, when the last known digest may
// stand in for an upstream that fails, and which blobs to evict.

import { digestError } from '../reference/reference.js';

const BINARY_SUFFIXES: Readonly<Record<string, number>> = { Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40, Pi: 2 ** 50, Ei: 2 ** 60 };
const DECIMAL_SUFFIXES: Readonly<Record<string, number>> = { k: 1e3, M: 1e6, G: 1e9, T: 1e12, P: 1e15, E: 1e18 };

/**
 * Bytes from an integer or a Kubernetes quantity (`20Gi`, `500M`, `1.5Gi`), as `maxBytes` is
 * written in values files; null when it is neither, or not a whole, safe, non-negative number.
 */
export function parseByteQuantity(value: number | string): number | null {
  if (typeof value === 'number') return Number.isSafeInteger(value) && value >= 0 ? value : null;
  const match = /^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$/.exec(value.trim());
  if (!match) return null;
  const unit = match[2] ? (BINARY_SUFFIXES[match[2]] ?? DECIMAL_SUFFIXES[match[2]] ?? 1) : 1;
  const bytes = Math.floor(Number(match[1]) * unit);
  return Number.isSafeInteger(bytes) ? bytes : null;
}

/** What a tag pointed at when it was last asked upstream. */
export interface TagRecord {
  readonly digest: string;
  readonly mediaType: string;
  readonly size: number;
  /** When the upstream last confirmed it (ms since the epoch). */
  readonly confirmedAt: number;
}

/** A tag record as stored (node store or shared tier), or undefined when it is not one. */
export function parseTagRecord(text: string): TagRecord | undefined {
  try {
    const record = JSON.parse(text) as Partial<TagRecord>;
    // Also written by other nodes (the shared tier): a digest is checked before it names a key or a hash.
    const valid = typeof record.digest === 'string' && digestError(record.digest) === null && typeof record.mediaType === 'string' && typeof record.size === 'number' && typeof record.confirmedAt === 'number';
    return valid ? (record as TagRecord) : undefined;
  } catch {
    return undefined;
  }
}

/** Of this node's record of a tag and the shared tier's, the one confirmed last. */
export function newerTag(own: TagRecord | undefined, shared: TagRecord | undefined): TagRecord | undefined {
  if (own === undefined || shared === undefined) return own ?? shared;
  return shared.confirmedAt > own.confirmedAt ? shared : own;
}

/** A node's claim to fetch a blob from the upstream for the whole cluster (shared tier). */
export interface SharedClaim {
  readonly node: string;
  /** When it was made (ms since the epoch). */
  readonly at: number;
}

export function parseClaim(text: string): SharedClaim | undefined {
  try {
    const claim = JSON.parse(text) as Partial<SharedClaim>;
    return typeof claim.node === 'string' && typeof claim.at === 'number' ? (claim as SharedClaim) : undefined;
  } catch {
    return undefined;
  }
}

/** A claim stands while its filler may still be at work: made or renewed (the filler renews it
 * while its fill moves on) within fillWaitSeconds. A claim from the future (clock skew) stands too,
 * up to that bound. */
export function claimIsFresh(claim: SharedClaim, now: number, fillWaitSeconds: number): boolean {
  return Math.abs(now - claim.at) < fillWaitSeconds * 1000;
}

/** Whether a node that just had a tag confirmed upstream should write it to the shared tier: when
 * the tier's record is missing, names another digest, or is older than `refreshSeconds` (so that a
 * new node finds it fresh enough to serve while the upstream is down, without every node writing on
 * every confirmation). */
export function shouldShareTag(shared: TagRecord | undefined, confirmed: TagRecord, refreshSeconds: number): boolean {
  return shared === undefined || shared.digest !== confirmed.digest || confirmed.confirmedAt - shared.confirmedAt >= refreshSeconds * 1000;
}

export interface TagTimes {
  readonly tagTTLSeconds: number;
  readonly staleIfErrorSeconds: number;
}

/** Answer from the record without asking upstream, or ask upstream first. */
export function tagIsFresh(record: TagRecord | undefined, now: number, times: TagTimes): record is TagRecord {
  return record !== undefined && now - record.confirmedAt < times.tagTTLSeconds * 1000;
}

/** How asking the upstream about a tag failed. */
export type TagFailure = 'unreachable' | 'timeout' | 'server-error' | 'unauthorized' | 'denied' | 'not-found';

export type TagFallback = { readonly serve: 'stale'; readonly record: TagRecord; readonly ageSeconds: number } | { readonly serve: 'error' };

/**
 * Whether the last known digest may answer for an upstream that failed: only when the upstream
 * could not answer (down, slow, 5xx), never when it answered no (401/403/404 are passed on: a
 * cache must not keep serving what the registry now refuses), and only within staleIfErrorSeconds.
 */
export function tagFallback(record: TagRecord | undefined, failure: TagFailure, now: number, times: TagTimes): TagFallback {
  if (!record || failure === 'unauthorized' || failure === 'denied' || failure === 'not-found') return { serve: 'error' };
  const age = now - record.confirmedAt;
  if (age > times.staleIfErrorSeconds * 1000) return { serve: 'error' };
  return { serve: 'stale', record, ageSeconds: Math.floor(age / 1000) };
}

/**
 * cache.minFreeInodes as written: a whole number of inodes, or a percentage of the filesystem's
 * (`10%`); null when it is neither.
 */
export function parseInodeFloor(value: number | string): { readonly inodes: number } | { readonly percent: number } | null {
  if (typeof value === 'number') return Number.isSafeInteger(value) && value >= 0 ? { inodes: value } : null;
  const match = /^(\d+(?:\.\d+)?)%$/.exec(value.trim());
  if (!match) return null;
  const percent = Number(match[1]);
  return percent <= 100 ? { percent } : null;
}

/** Free inodes a filesystem of `totalInodes` must keep under that setting (0 when it is not one). */
export function inodeFloor(value: number | string, totalInodes: number): number {
  const floor = parseInodeFloor(value);
  if (!floor) return 0;
  return 'inodes' in floor ? floor.inodes : Math.ceil((totalInodes * floor.percent) / 100);
}

/** Bytes a tag record or link is counted as against maxBytes: a file takes at least a block. */
export const METADATA_ENTRY_BYTES = 4096;

/** The node store's disk as a fill's reservation sees it (bytes). */
export interface DiskRoom {
  /** Blobs stored. */
  readonly storedBytes: number;
  /** Reserved by fills in flight (each at least what it wrote). */
  readonly reservedBytes: number;
  /** Reserved by fills in flight and not yet on the disk: the free space they will still take. */
  readonly unwrittenBytes: number;
  /** Free on the disk now; undefined when it cannot be known (then only maxBytes bounds). */
  readonly freeBytes: number | undefined;
  readonly maxBytes: number;
  readonly minFreeBytes: number;
  /** Free inodes now, and the floor (inodeFloor); undefined when the filesystem does not count them. */
  readonly freeInodes?: number;
  readonly minFreeInodes?: number;
}

/**
 * Whether `bytes` more may be reserved: stored (blobs and metadata) and reserved bytes stay within
 * maxBytes (`size`), and the disk keeps minFreeBytes free once every reservation is written, and
 * the free inodes above their floor (`disk`: a new file takes one).
 */
export function roomFor(room: DiskRoom, bytes: number): { readonly size: boolean; readonly disk: boolean } {
  return {
    size: room.storedBytes + room.reservedBytes + bytes <= room.maxBytes,
    disk: (room.freeBytes === undefined || room.freeBytes - room.unwrittenBytes - bytes >= room.minFreeBytes) && inodesLeft(room),
  };
}

/** Whether one more file (a blob, a tag record, a link) keeps the free inodes at their floor. */
export function inodesLeft(room: Pick<DiskRoom, 'freeInodes' | 'minFreeInodes'>): boolean {
  return room.freeInodes === undefined || room.freeInodes - 1 >= (room.minFreeInodes ?? 0);
}

/** How much a fill that holds `reserved` bytes and needs `needed` asks for: in steps of at least
 * `step` (a chunked fill grows without asking at every write), never more than `maxBytes`;
 * undefined when even `needed` is more. */
export function grownReservation(reserved: number, needed: number, step: number, maxBytes: number): number | undefined {
  if (needed > maxBytes) return undefined;
  return Math.min(maxBytes, Math.max(needed, reserved + step));
}

/** A blob in the node store, as eviction sees it. */
export interface StoredBlob {
  readonly digest: string;
  readonly size: number;
  /** Last served or filled (ms since the epoch). */
  readonly lastUsed: number;
  /** Clients reading it now: never evicted under them. */
  readonly readers: number;
}

export interface EvictionLimits {
  readonly maxBytes: number;
  /** Free space the disk must keep; eviction frees at least what is missing. */
  readonly minFreeBytes: number;
  readonly freeBytes: number;
  /** Blobs to evict at least (the disk is short of this many inodes: each blob frees one, at least). */
  readonly minFreeBlobs?: number;
}

/**
 * The blobs to delete, least recently used first, so that the store fits in maxBytes and the disk
 * keeps minFreeBytes free (and at least minFreeBlobs go); blobs being read are skipped. If that cannot be reached (everything
 * left is being read), it deletes what it can: the caller then stops filling.
 */
export function evictionPlan(blobs: readonly StoredBlob[], limits: EvictionLimits): string[] {
  const stored = blobs.reduce((sum, b) => sum + b.size, 0);
  const overSize = stored - limits.maxBytes;
  const overDisk = limits.minFreeBytes - limits.freeBytes;
  let toFree = Math.max(overSize, overDisk, 0);
  const plan: string[] = [];
  for (const blob of [...blobs].sort((a, b) => a.lastUsed - b.lastUsed || a.digest.localeCompare(b.digest))) {
    if (toFree <= 0 && plan.length >= (limits.minFreeBlobs ?? 0)) break;
    if (blob.readers > 0) continue;
    plan.push(blob.digest);
    toFree -= blob.size;
  }
  return plan;
}

/**
 * The one byte range a `Range` header asks of a blob of `size` bytes, as [start, end); undefined
 * when the header is not a single satisfiable range (the whole blob is served instead, as HTTP
 * allows a server to ignore Range).
 */
export function byteRange(header: string, size: number): { start: number; end: number } | undefined {
  const match = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!match || (match[1] === '' && match[2] === '')) return undefined;
  const first = match[1] === '' ? undefined : Number(match[1]);
  const last = match[2] === '' ? undefined : Number(match[2]);
  if (first === undefined) {
    // bytes=-N: the last N bytes.
    const suffix = Math.min(last ?? 0, size);
    return suffix > 0 ? { start: size - suffix, end: size } : undefined;
  }
  if (first >= size || (last !== undefined && last < first)) return undefined;
  return { start: first, end: last === undefined ? size : Math.min(last + 1, size) };
}
