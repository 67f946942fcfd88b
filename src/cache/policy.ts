// The node cache's rules, as data in and data out (no clock, no files): which names may become
// paths and keys, when a cached tag may answer without asking upstream, when the last known digest
// may stand in for an upstream that fails, what the shared tier's records may claim, and which
// blobs to evict.

import type { ContentFailure } from '../content/source.js';
import { digestError, isValidRepositoryPath, isValidTag } from '../reference/reference.js';
import { parseInodeFloor } from '../rules/quantity.js';

/**
 * A name the node store or the shared tier was asked to make a path or a key of, and refused: a
 * digest, rule, repository or tag that is not one by the grammar (a digest a hostile upstream or a
 * bucket writer made up, `sha256:../../elsewhere`). Callers check what they are given before it
 * gets here; this is the store's own guard that nothing names a file outside it.
 */
export class CacheKeyError extends Error {
  constructor(message: string) {
    // What was refused may come from outside and be long: the message quotes its start only.
    super(message.length > 200 ? `${message.slice(0, 200)}…` : message);
    this.name = 'CacheKeyError';
  }
}

/** A digest as the two parts of a store path or key (`<algorithm>/<hex>`), once it is a digest by
 * the grammar (known algorithm, exact hex length, lower case); else a CacheKeyError. */
export function digestKey(digest: string): { readonly algorithm: string; readonly hex: string } {
  const reason = digestError(digest);
  if (reason !== null) throw new CacheKeyError(`cache key refused: ${reason}`);
  const colon = digest.indexOf(':');
  return { algorithm: digest.slice(0, colon), hex: digest.slice(colon + 1) };
}

/** A (rule, repository) as path components (`<rule>/<repository…>`): the rule one component and the
 * repository a path by the repository grammar (neither can be empty, `.` or `..`); else a CacheKeyError. */
export function repositoryKey(rule: string, repository: string): readonly string[] {
  if (rule.includes('/') || !isValidRepositoryPath(rule)) throw new CacheKeyError(`cache key refused: invalid rule name ${JSON.stringify(rule)}`);
  if (!isValidRepositoryPath(repository)) throw new CacheKeyError(`cache key refused: invalid repository name ${JSON.stringify(repository)}`);
  return [rule, ...repository.split('/')];
}

/** A tag as a file name, once it is a tag by the grammar; else a CacheKeyError. */
export function tagKey(tag: string): string {
  if (!isValidTag(tag)) throw new CacheKeyError(`cache key refused: invalid tag ${JSON.stringify(tag)}`);
  return tag;
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

/** How far ahead of this node's clock another node's clock may be: a shared record confirmed
 * later than now plus this is refused (it was written by a wrong clock, or to outlast the others). */
export const SHARED_CLOCK_SKEW_MS = 60_000;

/**
 * The record that bridges an upstream failure for a tag: this node's own while it may still serve
 * (within staleIfErrorSeconds), whatever the shared tier says; the shared tier's only for a node
 * that has none it may serve, and only when it is not dated in the future beyond clock skew. The
 * bucket is written by every node: what it says never outranks what this node itself was told.
 */
export function bridgingTag(own: TagRecord | undefined, shared: TagRecord | undefined, now: number, times: TagTimes): TagRecord | undefined {
  if (own !== undefined && now - own.confirmedAt <= times.staleIfErrorSeconds * 1000) return own;
  if (shared === undefined || shared.confirmedAt > now + SHARED_CLOCK_SKEW_MS) return own;
  return shared;
}

/** A link's content as stored (a manifest's media type, '' for a blob), or null when it cannot be
 * one: it is served as a Content-Type header, so only printable ASCII, and short. */
export function parseLink(text: string): string | null {
  return /^[\x20-\x7e]{0,255}$/.test(text) ? text : null;
}

/** A node's claim to fetch a blob from the upstream for the whole cluster (shared tier). Version 2
 * adds the fill's announcement (docs/design/streaming-rollout.md): old nodes read `node` and `at`
 * only, and a claim without `stream` is waited for whole, as before. */
export interface SharedClaim {
  readonly node: string;
  /** When it was made (ms since the epoch). */
  readonly at: number;
  /** The blob's size, as the upstream announced it (Content-Length). */
  readonly size?: number;
  /** The filler's upstream (upstreamOrigin, a sha256 in hex): only a rule of that upstream follows. */
  readonly origin?: string;
  /** 1: the filler publishes the blob in segments while it arrives (followers stream from them). */
  readonly stream?: 1;
}

/** A claim as stored, or undefined when it is not one: every field present must parse (a claim
 * with a `size` that is not a safe whole number, an `origin` that is not 64 hex or a `stream` other
 * than 1 is refused whole, not read in part). */
export function parseClaim(text: string): SharedClaim | undefined {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return undefined;
  const claim = value as Record<string, unknown>;
  if (typeof claim.node !== 'string' || typeof claim.at !== 'number' || !Number.isFinite(claim.at)) return undefined;
  if (claim.size !== undefined && !(typeof claim.size === 'number' && Number.isSafeInteger(claim.size) && claim.size >= 0)) return undefined;
  if (claim.origin !== undefined && !(typeof claim.origin === 'string' && /^[0-9a-f]{64}$/.test(claim.origin))) return undefined;
  if (claim.stream !== undefined && claim.stream !== 1) return undefined;
  return {
    node: claim.node,
    at: claim.at,
    ...(claim.size !== undefined ? { size: claim.size as number } : {}),
    ...(claim.origin !== undefined ? { origin: claim.origin as string } : {}),
    ...(claim.stream !== undefined ? { stream: 1 as const } : {}),
  };
}

/** The digest of the empty blob: the only one whose size is 0. */
export const EMPTY_BLOB_DIGEST = 'sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';

/** Whether followers may stream a claim's fill of `digest`: announced with its size and origin,
 * and `stream`. A size of 0 only for the empty blob: a forged size-0 claim would end every
 * follower's fill at once, hashing wrong (which removes the shared copy). */
export function claimStreams(claim: SharedClaim, digest: string): claim is SharedClaim & { readonly size: number; readonly origin: string; readonly stream: 1 } {
  return claim.stream === 1 && claim.size !== undefined && claim.origin !== undefined && (claim.size > 0 || digest === EMPTY_BLOB_DIGEST);
}

/** Whether a claim announces a fill that cannot be followed (a size no blob of the digest has):
 * its followers fetch from the upstream at once rather than wait for it. */
export function claimRefused(claim: SharedClaim, digest: string): boolean {
  return claim.stream === 1 && claim.size !== undefined && claim.origin !== undefined && !claimStreams(claim, digest);
}

/** A claim stands while its filler may still be at work: made or renewed (the filler renews it
 * while its fill moves on) within fillWaitSeconds. A claim from the future (clock skew) stands too,
 * up to that bound. */
export function claimIsFresh(claim: SharedClaim, now: number, fillWaitSeconds: number): boolean {
  return Math.abs(now - claim.at) < fillWaitSeconds * 1000;
}

/** How many times fillWaitSeconds a node waits in all for another node's fill, however often its
 * claim is renewed: a filler that renews forever (or a bucket writer rewriting the claim) holds a
 * waiter this long at most, and the waiter then fetches from the upstream itself. */
export const FILL_WAIT_ROUNDS = 10;

/** Whether a node that began waiting for another node's fill at `since` waits on: by its own clock,
 * never by what the claim says. */
export function mayWaitForFill(since: number, now: number, fillWaitSeconds: number): boolean {
  return now - since < fillWaitSeconds * 1000 * FILL_WAIT_ROUNDS;
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

/**
 * How asking the upstream failed: it could not answer (unreachable, timed out, a 5xx, a 429 asking
 * to come back later), or it answered no (401, 403, 404, or any other 4xx: a policy's 412, a 451,
 * a 410, a 400).
 */
export type TagFailure = 'unreachable' | 'timeout' | 'server-error' | 'throttled' | 'unauthorized' | 'denied' | 'not-found' | 'refused';

/** How asking the upstream failed, from the content layer's failure and the status it answers with
 * (and whether the upstream sent a registry error document: a 5xx of its own, not a way there lost). */
export function upstreamFailureOf(failure: ContentFailure, details: { readonly status: number; readonly registryBody?: string; readonly local?: true }): TagFailure {
  // The proxy's own refusal (a memory budget) says nothing of the upstream: never bridged.
  if (details.local) return 'refused';
  switch (failure) {
    case 'not-found':
      return 'not-found';
    case 'unauthorized':
      return 'unauthorized';
    case 'denied':
      return 'denied';
    case 'refused':
      return 'refused';
    case 'too-many-requests':
      return 'throttled';
    case 'unavailable':
      return details.status === 504 ? 'timeout' : details.status >= 500 && details.registryBody !== undefined ? 'server-error' : 'unreachable';
    case 'invalid':
      return 'server-error';
  }
}

/**
 * Whether what the cache holds may stand in for an upstream that failed this way: only when the
 * upstream could not answer; never when it answered no (a cache must not keep serving what the
 * registry now refuses, whatever the reason it gives).
 */
export function staleEligible(failure: TagFailure): boolean {
  return failure === 'unreachable' || failure === 'timeout' || failure === 'server-error' || failure === 'throttled';
}

export type TagFallback = { readonly serve: 'stale'; readonly record: TagRecord; readonly ageSeconds: number } | { readonly serve: 'error' };

/**
 * Whether the last known digest may answer for an upstream that failed: only when it is
 * staleEligible, and only within staleIfErrorSeconds.
 */
export function tagFallback(record: TagRecord | undefined, failure: TagFailure, now: number, times: TagTimes): TagFallback {
  if (!record || !staleEligible(failure)) return { serve: 'error' };
  // A record from a clock ahead of this node's (within SHARED_CLOCK_SKEW_MS) is as old as one made now.
  const age = Math.max(0, now - record.confirmedAt);
  if (age > times.staleIfErrorSeconds * 1000) return { serve: 'error' };
  return { serve: 'stale', record, ageSeconds: Math.floor(age / 1000) };
}

/**
 * Whether a link (what a (rule, repository) may read from the cache) serves without asking the
 * upstream again: confirmed (fetched, or answered by a HEAD there) within reconfirmSeconds. A time
 * ahead of `now` (a clock set back) does not count as fresh.
 */
export function linkIsFresh(confirmedAt: number, now: number, reconfirmSeconds: number): boolean {
  const age = now - confirmedAt;
  return age >= 0 && age < reconfirmSeconds * 1000;
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
