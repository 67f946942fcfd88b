// The shared tier on Google Cloud Storage. Creates are conditional on there being no live object
// (`ifGenerationMatch=0`); large files go up as resumable uploads, which GCS finalizes only with the
// last chunk, so an object is never visible in part and of several nodes one wins. A record is
// replaced or removed on condition of its generation (`ifGenerationMatch`).

import { createReadStream } from 'node:fs';
import { addAbortSignal, Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ApiError, Storage, type Bucket, type StorageOptions } from '@google-cloud/storage';
import type { SharedConfig } from '../../rules/config.js';
import { checkRecordSize, deadline, isCallerAbort, messageOf, networkFailure, readBounded, readRange, readSecretFile } from './common.js';
import { RECORD_MAX_BYTES, RefusedObject, SharedStoreError, type ByteSpan, type FileRange, type SharedFailure, type SharedListing, type SharedObject, type SharedStore, type VersionedRecord, type WriteCondition } from './store.js';

type GcsConfig = NonNullable<SharedConfig['gcs']>;

/** Files above this go up in resumable chunks (a multiple of 256 KiB, as GCS requires); smaller ones
 * in one request, which GCS stores whole or not at all. */
const CHUNK_SIZE = 8 * 1024 * 1024;

/** What a range upload hands the library at a time (a read stream's chunk size). */
const PROGRESS_SLICE = 64 * 1024;

/** Views of `buffer`, `size` bytes each (the last one shorter): no copy. */
function* slices(buffer: Buffer, size: number): Generator<Buffer> {
  for (let at = 0; at < buffer.length; at += size) yield buffer.subarray(at, at + size);
}

/**
 * A service account key file's text: the JSON key as Google issues it, or base64 of it, as an SAP
 * BTP Object Store binding carries it (`base64EncodedPrivateKeyData`). Returns the parsed key.
 */
export function parseGcsKey(text: string): NonNullable<StorageOptions['credentials']> {
  let json = text.trim();
  if (!json.startsWith('{')) {
    const compact = json.replace(/\s+/g, '');
    const decoded = /^[A-Za-z0-9+/]+={0,2}$/.test(compact) ? Buffer.from(compact, 'base64').toString('utf8').trim() : '';
    if (!decoded.startsWith('{')) throw new Error('holds neither a JSON service account key nor base64 of one');
    json = decoded;
  }
  let key: unknown;
  try {
    key = JSON.parse(json);
  } catch (error) {
    throw new Error(`holds no valid JSON: ${messageOf(error)}`, { cause: error });
  }
  if (typeof key !== 'object' || key === null || Array.isArray(key)) throw new Error('holds JSON that is not a key object');
  return key as NonNullable<StorageOptions['credentials']>;
}

export async function openGcsStore(config: GcsConfig, timeoutSeconds: number): Promise<SharedStore> {
  // Read once at open, as the other stores' credential files are: a missing or unreadable file is
  // reported here, not at the first request.
  let credentials: StorageOptions['credentials'];
  if (config.keyFile) {
    const text = await readSecretFile(config.keyFile).catch((error: unknown) => {
      throw new SharedStoreError('denied', `reading the GCS key file: ${messageOf(error)}`, { cause: error });
    });
    try {
      credentials = parseGcsKey(text);
    } catch (error) {
      throw new SharedStoreError('denied', `the GCS key file ${config.keyFile} ${messageOf(error)}`, { cause: error });
    }
  }
  const options: StorageOptions = {
    ...(credentials ? { credentials } : {}),
    apiEndpoint: config.endpoint,
    // A custom endpoint is an emulator unless a key file is given (a private endpoint of the real
    // service): the library skips authentication at custom endpoints unless told otherwise.
    useAuthWithCustomEndpoint: config.endpoint !== undefined && config.keyFile !== undefined,
    // One retry, soon: a store that is down should fail the request quickly. Conditional creates
    // count as idempotent, so they are retried too (a lost answer then reads as 'exists').
    retryOptions: { autoRetry: true, maxRetries: 1, retryDelayMultiplier: 2, maxRetryDelay: 2, totalTimeout: Math.max(timeoutSeconds, 1) },
  };
  return new GcsStore(new Storage(options).bucket(config.bucket), config, timeoutSeconds * 1000);
}

class GcsStore implements SharedStore {
  readonly kind = 'gcs';
  readonly location: string;

  constructor(
    private readonly bucket: Bucket,
    private readonly config: GcsConfig,
    private readonly timeoutMs: number,
  ) {
    this.location = `gs://${config.bucket}/${config.prefix}${config.endpoint ? ` at ${config.endpoint}` : ''}`;
  }

  async stat(key: string): Promise<SharedObject | undefined> {
    const meta = await this.metadata(key);
    return meta && { size: meta.size, modified: meta.modified };
  }

  async read(key: string, span?: ByteSpan, signal?: AbortSignal): Promise<Readable | undefined> {
    // The library requests lazily, on the first read, and reports a missing object as a stream
    // error; asking for the metadata first answers "missing" up front, and pinning its generation
    // keeps the bytes those of the object it describes.
    const meta = await this.metadata(key);
    if (!meta) return undefined;
    // A span past the object's end (an empty object read from 0) would fail as a 416: no bytes, as
    // a file read there gives, for the caller to refuse; not a failure of the store.
    if (span && span.start >= meta.size) return Readable.from([]);
    const stream = this.bucket.file(this.config.prefix + key, { generation: meta.generation }).createReadStream({ start: span?.start, end: span?.end });
    return signal ? addAbortSignal(signal, stream) : stream;
  }

  async createFromFile(key: string, file: string, size: number, signal?: AbortSignal): Promise<'created' | 'exists'> {
    return this.upload(key, createReadStream(file), size > CHUNK_SIZE, signal);
  }

  async createFromRange(key: string, range: FileRange, signal?: AbortSignal): Promise<'created' | 'exists'> {
    const body = await readRange(key, range, signal);
    // Handed over in slices, so that the deadline starts over as the library takes them (one
    // 8 MiB chunk would be taken at once and leave the whole upload under one deadline).
    return this.upload(key, Readable.from(slices(body, PROGRESS_SLICE)), false, signal);
  }

  /** Uploads `source` as `key` unless an object is there (`ifGenerationMatch=0`): resumable in
   * chunks, or as one request, which GCS stores whole or not at all. */
  private async upload(key: string, source: Readable, resumable: boolean, signal?: AbortSignal): Promise<'created' | 'exists'> {
    const upload = this.bucket.file(this.config.prefix + key).createWriteStream({
      resumable,
      chunkSize: resumable ? CHUNK_SIZE : undefined,
      preconditionOpts: { ifGenerationMatch: 0 },
      contentType: 'application/octet-stream',
      timeout: this.timeoutMs > 0 ? this.timeoutMs : undefined,
    });
    // The library's request timeout does not bound an upload waiting for its answer: this deadline
    // does, starting over whenever the library takes more of the source.
    const idle = deadline(this.timeoutMs, signal);
    const progress = new Transform({
      transform(chunk: Buffer, _encoding, done) {
        idle.touch();
        done(null, chunk);
      },
    });
    try {
      // Destroying the upload stream on abort leaves the resumable session unfinalized, and a
      // single-request upload without its end: no object either way.
      await pipeline(source, progress, upload, { signal: idle.signal });
      return 'created';
    } catch (error) {
      if (isCallerAbort(error, signal)) throw error;
      if (statusOf(error) === 412) return 'exists';
      throw storeError(`upload ${key}`, error, idle.timedOut());
    } finally {
      idle.disarm();
      source.destroy();
    }
  }

  async writeRecord(key: string, body: Buffer, options?: WriteCondition): Promise<boolean> {
    return (await this.save(key, body, options)) !== false;
  }

  async readRecord(key: string, maxBytes = RECORD_MAX_BYTES): Promise<Buffer | undefined> {
    return (await this.readVersioned(key, maxBytes))?.body;
  }

  async readVersioned(key: string, maxBytes = RECORD_MAX_BYTES): Promise<VersionedRecord | undefined> {
    // Sized from its metadata first; the download, pinned to that generation, asks for one byte
    // more than the bound at most (a larger object that replaced it is refused, not read).
    const meta = await this.metadata(key);
    if (!meta) return undefined;
    const version = String(meta.generation);
    checkRecordSize(`read ${key}`, meta.size, maxBytes);
    if (meta.size === 0) return { body: Buffer.alloc(0), version };
    const body = await this.call(`read ${key}`, () => readBounded(`read ${key}`, this.bucket.file(this.config.prefix + key, { generation: meta.generation }).createReadStream({ start: 0, end: maxBytes, validation: false }), maxBytes));
    return body && { body, version };
  }

  async remove(key: string, options?: { readonly ifMatch?: string }): Promise<boolean> {
    if (options?.ifMatch === undefined) {
      await this.call(`remove ${key}`, () => this.bucket.file(this.config.prefix + key).delete({ ignoreNotFound: true }));
      return true;
    }
    // GCS honours ifGenerationMatch on a delete, fake-gcs-server v1.56 does not (it deletes any
    // generation): the condition is put on an overwrite with an empty object, which it honours, and
    // that object is then deleted on condition of its own generation. Until then a reader finds an
    // empty record where the removed one was; the tier reads an empty claim as none.
    const generation = await this.save(key, Buffer.alloc(0), options);
    if (generation === false) return false;
    await this.call(`remove ${key}`, () => this.bucket.file(this.config.prefix + key).delete({ ifGenerationMatch: generation, ignoreNotFound: true }), true).catch((error: unknown) => {
      // Replaced since (a claim taken over): not this removal's to delete.
      if (!(error instanceof SharedStoreError && statusOf(error.cause) === 412)) throw error;
    });
    return true;
  }

  async *list(prefix: string): AsyncIterable<SharedListing> {
    let pageToken: string | undefined;
    do {
      const token = pageToken;
      const page = await this.call(`list ${prefix}`, () => this.bucket.getFiles({ prefix: this.config.prefix + prefix, autoPaginate: false, maxResults: 1000, pageToken: token }));
      for (const file of page?.[0] ?? []) {
        yield { key: file.name.slice(this.config.prefix.length), size: Number(file.metadata.size ?? 0), modified: new Date(file.metadata.updated ?? 0) };
      }
      pageToken = page?.[1]?.pageToken;
    } while (pageToken);
  }

  async close(): Promise<void> {
    // The library keeps no connections of its own beyond the process's shared agents.
  }

  /** One record written whole, under its condition: the generation written (undefined when the
   * answer named none), or false when the condition did not hold (412; 404 for a generation gone). */
  private async save(key: string, body: Buffer, options?: WriteCondition): Promise<number | undefined | false> {
    const ifGenerationMatch = options?.ifAbsent ? 0 : options?.ifMatch !== undefined ? Number(options.ifMatch) : undefined;
    if (ifGenerationMatch !== undefined && !Number.isSafeInteger(ifGenerationMatch)) return false;
    const file = this.bucket.file(this.config.prefix + key);
    const preconditionOpts = ifGenerationMatch === undefined ? undefined : { ifGenerationMatch };
    try {
      await this.call(`write ${key}`, () => file.save(body, { resumable: false, preconditionOpts, contentType: 'application/octet-stream' }), true);
    } catch (error) {
      const status = error instanceof SharedStoreError ? statusOf(error.cause) : undefined;
      if (ifGenerationMatch !== undefined && (status === 412 || (status === 404 && options?.ifMatch !== undefined && !isMissingBucket(error)))) return false;
      throw error;
    }
    const generation = Number(file.metadata.generation);
    return Number.isSafeInteger(generation) ? generation : undefined;
  }

  private async metadata(key: string): Promise<{ size: number; modified: Date; generation: number } | undefined> {
    const got = await this.call(`stat ${key}`, () => this.bucket.file(this.config.prefix + key).getMetadata());
    if (!got) return undefined;
    const [meta] = got;
    return { size: Number(meta.size ?? 0), modified: new Date(meta.updated ?? 0), generation: Number(meta.generation) };
  }

  /** One request under the store's deadline: a missing object is undefined, every failure a
   * SharedStoreError (for a write, a 404 too: a missing bucket). The library's calls take no
   * abort signal, so the deadline stops the wait for the answer (the request ends with its socket). */
  private async call<T>(what: string, request: () => Promise<T>, write = false): Promise<T | undefined> {
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<never>((_, reject) => {
      if (this.timeoutMs > 0) timer = setTimeout(() => reject(new SharedStoreError('timeout', `${what}: no answer within ${this.timeoutMs} ms`)), this.timeoutMs);
    });
    try {
      return await Promise.race([request(), expired]);
    } catch (error) {
      if ((error instanceof SharedStoreError && error.failure === 'timeout') || error instanceof RefusedObject) throw error;
      if (!write && statusOf(error) === 404 && !isMissingBucket(error)) return undefined;
      throw storeError(what, error, false);
    } finally {
      clearTimeout(timer);
    }
  }
}

function statusOf(error: unknown): number | undefined {
  const code = error instanceof ApiError ? error.code : (error as { code?: unknown } | undefined)?.code;
  return typeof code === 'number' ? code : undefined;
}

/** GCS answers 404 for a missing bucket too; that is a configuration error, not a missing object. */
function isMissingBucket(error: unknown): boolean {
  return error instanceof Error && /bucket/i.test(error.message) && !/object/i.test(error.message);
}

function failureOf(error: unknown, timedOut: boolean): SharedFailure {
  if (timedOut) return 'timeout';
  const network = networkFailure(error);
  if (network) return network;
  const status = statusOf(error);
  if (status === 401 || status === 403) return 'denied';
  return 'error';
}

function storeError(what: string, error: unknown, timedOut: boolean): SharedStoreError {
  return new SharedStoreError(failureOf(error, timedOut), `${what}: ${messageOf(error)}`, { cause: error });
}
