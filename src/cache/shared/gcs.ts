// The shared tier on Google Cloud Storage, over its JSON API. Creates are conditional on there being
// no live object (`ifGenerationMatch=0`); every upload is one request, which GCS stores whole or not
// at all, so an object is never visible in part and of several nodes one wins. A record is
// replaced or removed on condition of its generation (`ifGenerationMatch`).
//
// The requests are the adapter's own (undici), with google-auth-library for the credentials only:
// the client library reads every answer it parses whole, however long the store makes it, and
// takes no bound; here an answer to parse is read up to PARSED_ANSWER_MAX_BYTES (common.ts), and a
// download is streamed to the caller.

import { Readable, Transform } from 'node:stream';
import type { JWTInput } from 'google-auth-library';
import { Agent, request, type Dispatcher } from 'undici';
import type { SharedConfig } from '../../rules/config.js';
import { checkRecordSize, deadline, errorChain, isCallerAbort, messageOf, networkFailure, openLocal, PageTokens, readAnswer, readBounded, readRange, readSecretFile } from './common.js';
import { LocalFileError, RECORD_MAX_BYTES, RefusedObject, SharedStoreError, type ByteSpan, type FileRange, type SharedFailure, type SharedListing, type SharedObject, type SharedStore, type VersionedRecord, type WriteCondition } from './store.js';

type GcsConfig = NonNullable<SharedConfig['gcs']>;

const DEFAULT_ENDPOINT = 'https://storage.googleapis.com';
const SCOPE = 'https://www.googleapis.com/auth/devstorage.read_write';

/** What an upload of a buffer hands the connection at a time. */
const PROGRESS_SLICE = 64 * 1024;

/** Views of `buffer`, `size` bytes each (the last one shorter): no copy. */
function* slices(buffer: Buffer, size: number): Generator<Buffer> {
  for (let at = 0; at < buffer.length; at += size) yield buffer.subarray(at, at + size);
}

/**
 * A service account key file's text: the JSON key as Google issues it, or base64 of it, as an SAP
 * BTP Object Store binding carries it (`base64EncodedPrivateKeyData`). Returns the parsed key.
 */
export function parseGcsKey(text: string): JWTInput {
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
  return key as JWTInput;
}

/** The Authorization header of a request to `url`, or none (an emulator). */
type Authorize = (url: string) => Promise<Record<string, string>>;

export async function openGcsStore(config: GcsConfig, timeoutSeconds: number): Promise<SharedStore> {
  // Read once at open, as the other stores' credential files are: a missing or unreadable file is
  // reported here, not at the first request.
  let credentials: JWTInput | undefined;
  if (config.keyFile) {
    const keyFile = config.keyFile;
    const text = await readSecretFile(keyFile).catch((error: unknown) => {
      throw new SharedStoreError('denied', `reading the GCS key file: ${messageOf(error)}`, { cause: error });
    });
    try {
      credentials = parseGcsKey(text);
    } catch (error) {
      throw new SharedStoreError('denied', `the GCS key file ${keyFile} ${messageOf(error)}`, { cause: error });
    }
  }
  // A custom endpoint without a key file is an emulator: no credentials. Otherwise the key file's,
  // or the node's (Workload Identity, the metadata server).
  let authorize: Authorize = async () => ({});
  if (credentials || config.endpoint === undefined) {
    // Loaded only when used: an emulator needs none of it.
    const { GoogleAuth } = await import('google-auth-library');
    const auth = new GoogleAuth({ ...(credentials ? { credentials } : {}), scopes: [SCOPE] });
    authorize = async (url) => {
      const headers: Record<string, string> = {};
      (await auth.getRequestHeaders(url)).forEach((value, name) => (headers[name] = value));
      return headers;
    };
  }
  return new GcsStore(config, authorize, timeoutSeconds * 1000);
}

/** An answer other than the one asked for: its status, and the store's message when it sent one. */
class GcsAnswer extends Error {
  constructor(
    readonly status: number,
    /** The store's own message (its error document's), or ''. */
    readonly storeMessage: string,
    message: string,
  ) {
    super(message);
    this.name = 'GcsAnswer';
  }
}

interface Call {
  readonly method: 'GET' | 'POST' | 'DELETE';
  /** Path and query after the endpoint. */
  readonly path: string;
  readonly headers?: Record<string, string>;
  readonly body?: Buffer | Readable;
  readonly signal?: AbortSignal;
}

class GcsStore implements SharedStore {
  readonly kind = 'gcs';
  readonly location: string;
  private readonly endpoint: string;
  private readonly agent: Agent;

  constructor(
    private readonly config: GcsConfig,
    private readonly authorize: Authorize,
    private readonly timeoutMs: number,
  ) {
    this.location = `gs://${config.bucket}/${config.prefix}${config.endpoint ? ` at ${config.endpoint}` : ''}`;
    this.endpoint = (config.endpoint ?? DEFAULT_ENDPOINT).replace(/\/+$/, '');
    // No idle timeout on a body: a follower's client may hold a download back for as long as it
    // reads slowly; the tier bounds a store that stops sending itself (SharedTier's drip check).
    // No cap on connections either (as Node's own agents): downloads held open by slow clients
    // must not leave a stat or a claim write queued behind them.
    this.agent = new Agent({ bodyTimeout: 0, headersTimeout: 0 });
  }

  async stat(key: string): Promise<SharedObject | undefined> {
    const meta = await this.metadata(key);
    return meta && { size: meta.size, modified: meta.modified };
  }

  async read(key: string, span?: ByteSpan, signal?: AbortSignal): Promise<Readable | undefined> {
    // The metadata first: its generation pins the bytes to those of the object it describes.
    const meta = await this.metadata(key, signal);
    if (!meta) return undefined;
    // A span past the object's end (an empty object read from 0) would fail as a 416: no bytes, as
    // a file read there gives, for the caller to refuse; not a failure of the store.
    if (span && span.start >= meta.size) return Readable.from([]);
    const start = span?.start ?? 0;
    const end = Math.min(span?.end ?? meta.size - 1, meta.size - 1);
    const what = `read ${key}`;
    // The deadline covers the answer; the caller's signal, the body too.
    const answer = await this.guard(what, (limit) => this.download(what, key, meta.generation, { start, end }, span !== undefined, signal ? AbortSignal.any([limit, signal]) : limit), signal);
    // Exactly the bytes asked for: a body longer or shorter than that is the store's failure.
    return answer && exactly(answer.body, end - start + 1, what);
  }

  async createFromFile(key: string, file: string, size: number, signal?: AbortSignal): Promise<'created' | 'exists'> {
    const handle = await openLocal(key, file);
    try {
      return await this.upload(key, localBytes(handle.createReadStream({ autoClose: false }), size, `upload ${key}: ${file}`), size, signal);
    } finally {
      await handle.close().catch(() => undefined);
    }
  }

  async createFromRange(key: string, range: FileRange, signal?: AbortSignal): Promise<'created' | 'exists'> {
    const body = await readRange(key, range, signal);
    return this.upload(key, body, body.length, signal);
  }

  /** Uploads `body` as `key` unless an object is there (`ifGenerationMatch=0`). */
  private async upload(key: string, body: Readable | Buffer, size: number, signal?: AbortSignal): Promise<'created' | 'exists'> {
    try {
      const written = await this.put(`upload ${key}`, key, body, size, '0', signal);
      return written === false ? 'exists' : 'created';
    } finally {
      if (body instanceof Readable) body.destroy();
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
    checkRecordSize(`read ${key}`, meta.size, maxBytes);
    if (meta.size === 0) return { body: Buffer.alloc(0), version: meta.generation };
    const what = `read ${key}`;
    const body = await this.guard(what, async (signal) => {
      const answer = await this.download(what, key, meta.generation, { start: 0, end: Math.min(maxBytes, meta.size - 1) }, true, signal);
      return answer && readBounded(what, answer.body, maxBytes);
    });
    return body && { body, version: meta.generation };
  }

  async remove(key: string, options?: { readonly ifMatch?: string }): Promise<boolean> {
    if (options?.ifMatch === undefined) {
      await this.guard(`remove ${key}`, (signal) => this.send(`remove ${key}`, { method: 'DELETE', path: this.objectPath(key), signal }, [200, 204], true));
      return true;
    }
    // GCS honours ifGenerationMatch on a delete, fake-gcs-server v1.56 does not (it deletes any
    // generation): the condition is put on an overwrite with an empty object, which it honours, and
    // that object is then deleted on condition of its own generation. Until then a reader finds an
    // empty record where the removed one was; the tier reads an empty claim as none.
    let generation = await this.save(key, Buffer.alloc(0), options);
    if (generation === false) return false;
    if (generation === undefined) {
      // The answer named no generation: the empty object's, read back (another one there now was
      // written since, and is not this removal's).
      const now = await this.metadata(key);
      if (!now || now.size !== 0) return true;
      generation = now.generation;
    }
    try {
      await this.guard(`remove ${key}`, (signal) => this.send(`remove ${key}`, { method: 'DELETE', path: `${this.objectPath(key)}?ifGenerationMatch=${generation}`, signal }, [200, 204], true));
    } catch (error) {
      // Replaced since (a claim taken over): not this removal's to delete.
      if (!(error instanceof SharedStoreError && statusOf(error.cause) === 412)) throw error;
    }
    return true;
  }

  async *list(prefix: string): AsyncIterable<SharedListing> {
    let pageToken: string | undefined;
    const tokens = new PageTokens(`list ${prefix}`);
    do {
      const query = new URLSearchParams({ prefix: this.config.prefix + prefix, maxResults: '1000', fields: 'items(name,size,updated),nextPageToken' });
      if (pageToken) query.set('pageToken', pageToken);
      const what = `list ${prefix}`;
      const page = await this.guard(what, (signal) => this.json(what, { method: 'GET', path: `${this.bucketPath()}/o?${query}`, signal }, [200]));
      const listing = page === undefined ? undefined : pageOf(page);
      for (const item of listing?.items ?? []) {
        if (!item.name.startsWith(this.config.prefix)) continue;
        yield { key: item.name.slice(this.config.prefix.length), size: item.size, modified: item.updated };
      }
      pageToken = tokens.next(listing?.nextPageToken, listing?.items.length ?? 0);
    } while (pageToken);
  }

  async close(): Promise<void> {
    await this.agent.close().catch(() => undefined);
  }

  /** One record written whole, under its condition: the generation written (undefined when the
   * answer named none), or false when the condition did not hold (412; 404 for a generation gone). */
  private async save(key: string, body: Buffer, options?: WriteCondition): Promise<string | undefined | false> {
    const ifGenerationMatch = options?.ifAbsent ? '0' : options?.ifMatch;
    if (ifGenerationMatch !== undefined && !/^\d+$/.test(ifGenerationMatch)) return false;
    return this.put(`write ${key}`, key, body, body.length, ifGenerationMatch);
  }

  /**
   * One upload request (`uploadType=media`), under `ifGenerationMatch` when given: the generation
   * written, or false when the condition did not hold. The deadline starts over whenever the store
   * takes more of the body, so it bounds a stall, not a large upload.
   */
  private async put(what: string, key: string, body: Readable | Buffer, size: number, ifGenerationMatch: string | undefined, signal?: AbortSignal): Promise<string | undefined | false> {
    const query = new URLSearchParams({ uploadType: 'media', name: this.config.prefix + key });
    if (ifGenerationMatch !== undefined) query.set('ifGenerationMatch', ifGenerationMatch);
    const idle = deadline(this.timeoutMs, signal);
    // Handed over in slices, so that the deadline starts over as the store takes them (one 8 MiB
    // segment would be taken at once and leave the whole upload under one deadline).
    const touch = () => idle.touch();
    const source = body instanceof Readable ? withProgress(body, touch) : body.length > PROGRESS_SLICE ? withProgress(Readable.from(slices(body, PROGRESS_SLICE)), touch) : body;
    try {
      const written = await this.json(what, {
        method: 'POST',
        path: `/upload/storage/v1/b/${encodeURIComponent(this.config.bucket)}/o?${query}`,
        headers: { 'content-type': 'application/octet-stream', 'content-length': String(size) },
        body: source,
        signal: idle.signal,
      }, [200]);
      const generation = written && typeof written === 'object' ? (written as { generation?: unknown }).generation : undefined;
      return typeof generation === 'string' && /^\d+$/.test(generation) ? generation : undefined;
    } catch (error) {
      if (isCallerAbort(error, signal)) throw error;
      const local = localFailureIn(error);
      if (local) throw local;
      const status = statusOf(error);
      // A condition that did not hold: 412; on a generation that is gone, 404 (not the bucket's).
      if (ifGenerationMatch !== undefined && (status === 412 || (status === 404 && ifGenerationMatch !== '0' && !isMissingBucket(error)))) return false;
      throw storeError(what, error, idle.timedOut());
    } finally {
      idle.disarm();
      if (source instanceof Readable) source.destroy();
    }
  }

  /**
   * A download of the object's generation, asking for `span` as a Range when `ranged` (else the
   * whole object, which `span` then covers): the answer must be that span, a 206 naming it or a 200
   * for a span from byte 0. Undefined when the object is gone.
   */
  private async download(what: string, key: string, generation: string, span: ByteSpan, ranged: boolean, signal: AbortSignal): Promise<{ body: Readable } | undefined> {
    const answer = await this.send(what, { method: 'GET', path: `${this.objectPath(key)}?alt=media&generation=${generation}`, ...(ranged ? { headers: { range: `bytes=${span.start}-${span.end}` } } : {}), signal }, [200, 206], true);
    if (answer && !answersRange(answer.status, answer.headers['content-range'], span.start, span.end)) {
      discard(answer.body);
      throw new Error(`the store answered ${answer.status}${answer.headers['content-range'] ? ` with ${answer.headers['content-range']}` : ''} to a read of bytes ${span.start}-${span.end}`);
    }
    return answer;
  }

  private async metadata(key: string, caller?: AbortSignal): Promise<{ size: number; modified: Date; generation: string } | undefined> {
    const what = `stat ${key}`;
    const meta = await this.guard(what, (limit) => this.json(what, { method: 'GET', path: `${this.objectPath(key)}?fields=size,updated,generation`, signal: caller ? AbortSignal.any([limit, caller]) : limit }, [200], true), caller);
    if (meta === undefined) return undefined;
    const parsed = objectOf(meta);
    if (!parsed) throw new SharedStoreError('error', `${what}: the store's answer describes no object (size, updated, generation)`);
    return parsed;
  }

  /** A call under the store's deadline, its failures as SharedStoreError (a missing object is the
   * call's undefined, from `send`). */
  private async guard<T>(what: string, call: (signal: AbortSignal) => Promise<T>, caller?: AbortSignal): Promise<T> {
    const limit = deadline(this.timeoutMs);
    try {
      return await call(limit.signal);
    } catch (error) {
      if (error instanceof SharedStoreError || error instanceof RefusedObject || isCallerAbort(error, caller)) throw error;
      throw storeError(what, error, limit.timedOut());
    } finally {
      limit.disarm();
    }
  }

  /** A request whose answer is a JSON document, read up to PARSED_ANSWER_MAX_BYTES. */
  private async json(what: string, call: Call, ok: readonly number[], missingIsUndefined = false): Promise<unknown> {
    const answer = await this.send(what, call, ok, missingIsUndefined);
    if (!answer) return undefined;
    const text = (await readAnswer(answer.body, answer.headers['content-length'])).toString('utf8');
    if (text === '') return {};
    try {
      return JSON.parse(text) as unknown;
    } catch (error) {
      throw new Error(`the store's answer is not JSON: ${messageOf(error)}`, { cause: error });
    }
  }

  /**
   * One request: the answer when its status is one of `ok`; undefined for a missing object when
   * `missingIsUndefined` (a 404 that is not the bucket's); any other answer thrown as GcsAnswer with
   * the store's message (its error document read up to the bound).
   */
  private async send(what: string, call: Call, ok: readonly number[], missingIsUndefined = false): Promise<{ status: number; body: Readable; headers: Record<string, string | undefined> } | undefined> {
    const url = `${this.endpoint}${call.path}`;
    const headers = { ...(await this.authorize(url)), ...call.headers };
    // An abort rejects with the signal's reason (untilAborted), not the HTTP client's error.
    const answer = await untilAborted(request(url, { dispatcher: this.agent, method: call.method, headers, ...(call.body !== undefined ? { body: call.body } : {}), ...(call.signal ? { signal: call.signal } : {}) }), call.signal);
    const answerHeaders = Object.fromEntries(Object.entries(answer.headers).map(([name, value]) => [name, Array.isArray(value) ? value.join(', ') : value]));
    if (ok.includes(answer.statusCode)) return { status: answer.statusCode, body: answer.body, headers: answerHeaders };
    const text = await readAnswer(answer.body, answerHeaders['content-length']).then((bytes) => bytes.toString('utf8'), () => '');
    const message = storeMessage(text);
    const failure = new GcsAnswer(answer.statusCode, message, `${what}: the store answered ${answer.statusCode}${message ? `: ${message}` : ''}`);
    if (missingIsUndefined && answer.statusCode === 404 && !isMissingBucket(failure)) return undefined;
    throw failure;
  }

  private bucketPath(): string {
    return `/storage/v1/b/${encodeURIComponent(this.config.bucket)}`;
  }

  private objectPath(key: string): string {
    return `${this.bucketPath()}/o/${encodeURIComponent(this.config.prefix + key)}`;
  }
}

/**
 * The answer, or the signal's abort as soon as it comes: undici does not end a request still
 * waiting for a connection when its signal aborts, so a deadline would not bound that wait. An
 * answer that comes after the abort is discarded.
 */
function untilAborted(answer: Promise<Dispatcher.ResponseData>, signal: AbortSignal | undefined): Promise<Dispatcher.ResponseData> {
  if (!signal) return answer;
  return new Promise((resolve, reject) => {
    const abort = () => {
      reject(signal.reason instanceof Error ? signal.reason : new Error('aborted'));
      answer.then((late) => discard(late.body), () => undefined);
    };
    if (signal.aborted) return abort();
    signal.addEventListener('abort', abort, { once: true });
    answer.then(
      (got) => {
        signal.removeEventListener('abort', abort);
        if (signal.aborted) discard(got.body);
        else resolve(got);
      },
      (error: unknown) => {
        signal.removeEventListener('abort', abort);
        reject(error);
      },
    );
  });
}

/** An answer's body not to be read: destroyed, and the abort error undici's body then emits ignored. */
function discard(body: Readable): void {
  body.on('error', () => undefined);
  body.destroy();
}

/** Whether an answer is the range [start, end] asked for: a 206 whose Content-Range names it, or a
 * 200 (the whole object) when the range starts at 0 (its length is checked as it streams). */
function answersRange(status: number, contentRange: string | undefined, start: number, end: number): boolean {
  if (status === 200) return start === 0;
  const m = /^bytes (\d+)-(\d+)\/(?:\d+|\*)$/.exec(contentRange ?? '');
  return m !== null && Number(m[1]) === start && Number(m[2]) === end;
}

/** `body`, failing once it brings more than `length` bytes or ends before them. */
function exactly(body: Readable, length: number, what: string): Readable {
  return ofLength(body, length, (count) =>
    new SharedStoreError('error', count > length ? `${what}: the store sent more than the ${length} bytes asked for` : `${what}: the store's answer ended after ${count} of the ${length} bytes asked for`),
  );
}

/** A local file's stream for an upload of `size` bytes: a read that fails, or a file longer or
 * shorter than `size`, fails as a LocalFileError (not the store's failure). */
function localBytes(file: Readable, size: number, what: string): Readable {
  const counted = ofLength(file, size, (count) => new LocalFileError(count > size ? `${what}: the local file is longer than ${size} bytes` : `${what}: the local file ends at ${count}, before ${size} bytes`));
  // Ahead of the listener that passes the error on as it is: a read that fails is the node's failure.
  file.prependListener('error', (error) => counted.destroy(new LocalFileError(`${what}: reading the local file: ${messageOf(error)}`, { cause: error })));
  return counted;
}

/** `source` passed on while it brings at most `length` bytes and then ends; past that, or at an
 * end before it, the stream fails with `failure(bytes seen)`. */
function ofLength(source: Readable, length: number, failure: (count: number) => Error): Transform {
  let count = 0;
  return piped(source, new Transform({
    transform(chunk: Buffer, _encoding, done) {
      count += chunk.length;
      if (count > length) done(failure(count));
      else done(null, chunk);
    },
    flush(done) {
      done(count < length ? failure(count) : null);
    },
  }));
}

/** The LocalFileError an upload failed with, where the HTTP client wrapped it. */
function localFailureIn(error: unknown): LocalFileError | undefined {
  for (const e of errorChain(error)) if (e instanceof LocalFileError) return e;
  return undefined;
}

/** `body`, calling `onChunk` as each chunk is taken (an upload's progress); its errors passed on. */
function withProgress(body: Readable, onChunk: () => void): Readable {
  return piped(body, new Transform({
    transform(chunk: Buffer, _encoding, done) {
      onChunk();
      done(null, chunk);
    },
  }));
}

/** `source` piped into `into`, which fails with the source's error; destroying `into` destroys the source. */
function piped(source: Readable, into: Transform): Transform {
  source.on('error', (error) => into.destroy(error));
  into.once('close', () => source.destroy());
  return source.pipe(into);
}

/** The message of a JSON API error document (`{"error": {"message": …}}`), or ''. */
function storeMessage(text: string): string {
  try {
    const message = (JSON.parse(text) as { error?: { message?: unknown } }).error?.message;
    if (typeof message === 'string') return message.slice(0, 300);
  } catch {
    // Not a JSON error document: the status says it.
  }
  return '';
}

/** An object's metadata as the JSON API gives it (size and generation as decimal strings). */
function objectOf(value: unknown): { size: number; modified: Date; generation: string } | undefined {
  if (typeof value !== 'object' || value === null) return undefined;
  const { size, updated, generation } = value as { size?: unknown; updated?: unknown; generation?: unknown };
  const bytes = Number(size);
  if (typeof size !== 'string' || !Number.isSafeInteger(bytes) || bytes < 0) return undefined;
  if (typeof generation !== 'string' || !/^\d+$/.test(generation)) return undefined;
  const modified = new Date(typeof updated === 'string' ? updated : 0);
  return { size: bytes, modified: Number.isNaN(modified.getTime()) ? new Date(0) : modified, generation };
}

/** A listing page: its objects (those without a usable name or size left out) and the next page's token. */
function pageOf(value: unknown): { items: Array<{ name: string; size: number; updated: Date }>; nextPageToken: string | undefined } {
  const { items, nextPageToken } = (typeof value === 'object' && value !== null ? value : {}) as { items?: unknown; nextPageToken?: unknown };
  const objects: Array<{ name: string; size: number; updated: Date }> = [];
  for (const item of Array.isArray(items) ? items : []) {
    const { name, size, updated } = (typeof item === 'object' && item !== null ? item : {}) as { name?: unknown; size?: unknown; updated?: unknown };
    const bytes = Number(size);
    if (typeof name !== 'string' || !Number.isSafeInteger(bytes) || bytes < 0) continue;
    const modified = new Date(typeof updated === 'string' ? updated : 0);
    objects.push({ name, size: bytes, updated: Number.isNaN(modified.getTime()) ? new Date(0) : modified });
  }
  return { items: objects, nextPageToken: typeof nextPageToken === 'string' && nextPageToken !== '' ? nextPageToken : undefined };
}

function statusOf(error: unknown): number | undefined {
  return error instanceof GcsAnswer ? error.status : undefined;
}

/** GCS answers 404 for a missing bucket too; that is a configuration error, not a missing object. */
function isMissingBucket(error: unknown): boolean {
  return error instanceof GcsAnswer && /bucket/i.test(error.storeMessage) && !/object/i.test(error.storeMessage);
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
  const message = messageOf(error);
  return new SharedStoreError(failureOf(error, timedOut), message.startsWith(what) ? message : `${what}: ${message}`, { cause: error });
}
