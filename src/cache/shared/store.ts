// The shared tier's storage: one interface over object storage (S3 API, Azure Blob, GCS) and a
// ReadWriteMany filesystem, each a thin adapter over its SDK. Keys are relative ("blobs/sha256/…",
// "records/…"); an adapter puts its configured prefix in front. What the tier stores under them,
// and why, is ./tier.ts's business.

import type { FileHandle } from 'node:fs/promises';
import type { Readable } from 'node:stream';

/** Why a shared-store call failed, as the cache reports it (status, metrics, one log line per change). */
export type SharedFailure =
  /** Connection refused or reset, DNS failure, TLS failure: the store is not there. */
  | 'unreachable'
  /** The store answered 401/403 (bad or expired credentials, missing permission). */
  | 'denied'
  /** No answer within the configured timeout. */
  | 'timeout'
  /** Anything else: 5xx, a malformed answer, a missing bucket or container. */
  | 'error';

export class SharedStoreError extends Error {
  constructor(
    readonly failure: SharedFailure,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'SharedStoreError';
  }
}

/** An object the store does not read as what it was asked for, though it is there: a record larger
 * than the bound, or (filesystem) anything but a regular file under the store's own directory (a
 * symbolic link, a FIFO, a device). Written by whoever can write the bucket: refused, not followed,
 * and not a failure of the store (the tier stays up; the object counts as absent). */
/** The local file an upload reads from failed (not the store): the upload's caller stops, the tier
 * stays up. */
export class LocalFileError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'LocalFileError';
  }
}

export class RefusedObject extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RefusedObject';
  }
}

/** The most a record (a tag record, a link, a claim) may weigh: a few hundred bytes are written, and
 * every read stops at this bound, whatever size the object claims or turns out to have. */
export const RECORD_MAX_BYTES = 4096;

/** Bytes [start, end) of an open local file (end exclusive). */
export interface FileRange {
  readonly handle: FileHandle;
  readonly start: number;
  readonly end: number;
  /** Memory the range may be read into (at least end - start bytes), the caller's to reuse once the
   * call has settled: a publisher's segments reuse a few buffers instead of allocating 8 MiB each. */
  readonly scratch?: Buffer;
}

/** The most createFromRange uploads in one object (a segment is at most 8 MiB): one request's body,
 * held in memory while it goes out. */
export const RANGE_UPLOAD_MAX_BYTES = 16 * 1024 * 1024;

export interface SharedObject {
  readonly size: number;
  readonly modified: Date;
}

export interface SharedListing extends SharedObject {
  readonly key: string;
}

/** Inclusive byte range, as HTTP's Range. */
export interface ByteSpan {
  readonly start: number;
  readonly end: number;
}

/** When a record write happens: `ifAbsent`, only where no object is; `ifMatch`, only over that
 * version of the object (readVersioned's). Not both. */
export type WriteCondition = { readonly ifAbsent?: boolean; readonly ifMatch?: undefined } | { readonly ifAbsent?: undefined; readonly ifMatch?: string };

export interface VersionedRecord {
  readonly body: Buffer;
  /** Opaque; meaningful only to the store that gave it, for the same key. */
  readonly version: string;
}

export interface SharedStore {
  readonly kind: 's3' | 'azure' | 'gcs' | 'filesystem';
  /** Where the store is, for logs and /status: bucket/container and endpoint, never a credential. */
  readonly location: string;
  /** The object's size and modification time, or undefined when there is none. */
  stat(key: string): Promise<SharedObject | undefined>;
  /** The object's bytes (or a span of them); undefined when there is none; RefusedObject (thrown)
   * for a filesystem object that is not a regular file of the store. */
  read(key: string, span?: ByteSpan, signal?: AbortSignal): Promise<Readable | undefined>;
  /** Uploads a local file of `size` bytes as `key` unless an object is there already: 'created', or
   * 'exists' (nothing written). Readers never see a part: multipart uploads are completed only at
   * the end, a filesystem object appears by rename. The caller verified the file's digest. */
  createFromFile(key: string, file: string, size: number, signal?: AbortSignal): Promise<'created' | 'exists'>;
  /** Uploads bytes [start, end) of an open file as `key` in ONE request, unless an object is there
   * already: 'created', or 'exists' (nothing written). Create-if-absent with the store's own
   * condition (S3 PutObject `If-None-Match: *`, Azure single Put Blob `If-None-Match: *`, GCS
   * non-resumable upload with `ifGenerationMatch=0`, filesystem: copy into tmp/ then link(2)).
   * The handle, not a path: the fill file may be renamed meanwhile; an open descriptor survives.
   * Never closes the handle. A range over RANGE_UPLOAD_MAX_BYTES or end < start throws RangeError;
   * a file that ends before `end` (or cannot be read) fails with a plain Error, not a
   * SharedStoreError (the store is not at fault), before anything is sent. An abort of `signal`
   * rejects with the abort's error, as the other uploads do. */
  createFromRange(key: string, range: FileRange, signal?: AbortSignal): Promise<'created' | 'exists'>;
  /** Writes a small record. With `ifAbsent`, only when no object has the key (the store's own
   * conditional write: S3 `If-None-Match: *`, Azure `If-None-Match: *`, GCS `ifGenerationMatch=0`,
   * an exclusive create on a filesystem); with `ifMatch`, only when the object at the key is still
   * the version readVersioned gave (S3 and Azure `If-Match` on its ETag, GCS `ifGenerationMatch` on
   * its generation, a check and rename(2) under a per-key lock on a filesystem): true when written, false when the
   * condition did not hold (nothing written). */
  writeRecord(key: string, body: Buffer, options?: WriteCondition): Promise<boolean>;
  /** A small record's bytes, or undefined when there is none. An object larger than `maxBytes`
   * (RECORD_MAX_BYTES when not given) is refused (RefusedObject) from its size before its bytes are
   * read, and the read itself stops past `maxBytes` (an object that grows, or a size that lied). */
  readRecord(key: string, maxBytes?: number): Promise<Buffer | undefined>;
  /** readRecord, with the version of the object read: the store's own (an ETag, a GCS generation; on
   * a filesystem the file's inode, modification time and a hash of its bytes), for a write or
   * remove conditional on nobody having replaced it since (`ifMatch`). */
  readVersioned(key: string, maxBytes?: number): Promise<VersionedRecord | undefined>;
  /** Deletes the object; one that is not there is not an error (true). With `ifMatch`, only while it
   * is still that version: true when removed, false when another version is there (nothing removed);
   * for one that is gone, either (S3 answers a conditional DeleteObject of a missing key with 204). */
  remove(key: string, options?: { readonly ifMatch?: string }): Promise<boolean>;
  /** Every object whose key starts with `prefix` (relative, like every key), in pages. */
  list(prefix: string): AsyncIterable<SharedListing>;
  /** Releases connections (agents, clients). */
  close(): Promise<void>;
}
