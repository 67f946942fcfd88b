// What every object-storage adapter needs the same way: credentials read from mounted files, a
// deadline per request joined with the caller's abort, and network failures told apart from answers.

import { open, readFile, type FileHandle } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import { LocalFileError, RANGE_UPLOAD_MAX_BYTES, RefusedObject, SharedStoreError, type FileRange } from './store.js';

/** A Secret-mounted value: files written by hand or by `kubectl create secret --from-file` often
 * end in a newline that is not part of the credential. */
export async function readSecretFile(path: string): Promise<string> {
  return (await readFile(path, 'utf8')).replace(/\r?\n$/, '');
}

/**
 * The most of one answer's body an SDK may read into memory to parse it: an error document, a
 * listing page (1,000 keys, a few hundred KiB), a multipart upload's answers. The SDKs collect such
 * a body whole before they parse it, however long the store makes it; past this the answer fails
 * (the store is failing) instead of the node's memory. A download's body is streamed to the caller,
 * which bounds it itself (records) or verifies it (blobs, segments), and is not counted here.
 */
export const PARSED_ANSWER_MAX_BYTES = 4 * 1024 * 1024;

/** The error of an answer longer than PARSED_ANSWER_MAX_BYTES: a plain Error, a failure of the store. */
export function answerTooLong(): Error {
  return new Error(`the store's answer is longer than the ${PARSED_ANSWER_MAX_BYTES} bytes an answer to parse may have`);
}

/** An answer's body read whole for an SDK to parse, failing (answerTooLong) once it announces or
 * passes PARSED_ANSWER_MAX_BYTES; the download is destroyed then, so that the store stops sending. */
export async function readAnswer(body: Readable, contentLength: string | undefined): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let length = 0;
  try {
    if (Number(contentLength) > PARSED_ANSWER_MAX_BYTES) throw answerTooLong();
    for await (const chunk of body) {
      const bytes = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk as Uint8Array);
      length += bytes.length;
      if (length > PARSED_ANSWER_MAX_BYTES) throw answerTooLong();
      chunks.push(bytes);
    }
  } finally {
    body.destroy();
  }
  return Buffer.concat(chunks, length);
}

/** Pages in a row that bring no object before a listing is given up (a store may page past
 * objects it filters; not this many). */
export const EMPTY_PAGES_MAX = 100;

/**
 * The next page's token of a listing, checked: a store that hands back a token it gave before, or
 * keeps paging without objects, would keep a listing going for good (the tier's bound counts
 * objects, and such pages bring none). Throws a SharedStoreError ('error').
 */
export class PageTokens {
  private readonly seen = new Set<string>();
  private emptyPages = 0;

  /** `what`: the listing, as its failures name it (`list <prefix>`). */
  constructor(private readonly what: string) {}

  next(token: string | undefined, objects: number): string | undefined {
    if (token === undefined || token === '') return undefined;
    if (this.seen.has(token)) throw new SharedStoreError('error', `${this.what}: the store listed a page it had listed before (its next-page token repeats)`);
    this.seen.add(token);
    this.emptyPages = objects === 0 ? this.emptyPages + 1 : 0;
    if (this.emptyPages >= EMPTY_PAGES_MAX) throw new SharedStoreError('error', `${this.what}: the store listed ${EMPTY_PAGES_MAX} pages in a row without an object`);
    return token;
  }
}

/** A per-request deadline joined with the caller's abort signal; `timedOut` tells afterwards which
 * of the two fired, since both surface from the SDKs as the same abort error. `disarm` ends both
 * once the answer is in (a read's body is tied to the caller's signal on its own: the deadline
 * covers the answer, not the whole body). A timeout of 0 is no deadline. */
export interface Deadline {
  readonly signal: AbortSignal;
  timedOut(): boolean;
  /** Progress: the deadline starts over (an upload of many parts is bounded per step, not in all). */
  touch(): void;
  disarm(): void;
}

export function deadline(timeoutMs: number, caller?: AbortSignal): Deadline {
  const controller = new AbortController();
  let expired = false;
  const expire = () => {
    expired = true;
    controller.abort(new DOMException(`no answer within ${timeoutMs} ms`, 'TimeoutError'));
  };
  let timer = timeoutMs > 0 ? setTimeout(expire, timeoutMs) : undefined;
  const forward = () => controller.abort(caller?.reason);
  if (caller?.aborted) forward();
  else caller?.addEventListener('abort', forward, { once: true });
  return {
    signal: controller.signal,
    timedOut: () => expired,
    touch: () => {
      if (timer === undefined || controller.signal.aborted) return;
      clearTimeout(timer);
      timer = setTimeout(expire, timeoutMs);
    },
    disarm: () => {
      clearTimeout(timer);
      caller?.removeEventListener('abort', forward);
    },
  };
}

/** Error codes of a socket that could not reach the store at all (as opposed to an answer). */
const UNREACHABLE = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE', 'ERR_SSL_WRONG_VERSION_NUMBER', 'UND_ERR_SOCKET']);
const TIMED_OUT = new Set(['ETIMEDOUT', 'ESOCKETTIMEDOUT', 'TimeoutError', 'RequestTimeout', 'UND_ERR_CONNECT_TIMEOUT']);

/** An error and its causes, five deep at most (SDKs and HTTP clients wrap the socket's error, some twice). */
export function* errorChain(error: unknown): Generator<Error> {
  for (let e: unknown = error, depth = 0; e instanceof Error && depth < 5; e = e.cause, depth++) yield e;
}

/** The network-level failure in an error or its causes. */
export function networkFailure(error: unknown): 'unreachable' | 'timeout' | undefined {
  for (const e of errorChain(error)) {
    const code = (e as { code?: unknown }).code;
    const names = [typeof code === 'string' ? code : '', e.name];
    // AggregateError: a dual-stack connect that failed on every address.
    if (e instanceof AggregateError) for (const inner of e.errors) if (inner instanceof Error) names.push(String((inner as { code?: unknown }).code ?? ''));
    if (names.some((n) => UNREACHABLE.has(n))) return 'unreachable';
    if (names.some((n) => TIMED_OUT.has(n))) return 'timeout';
  }
  return undefined;
}

export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message || error.name : String(error);
}

/** Whether an error is the caller's own abort, which is passed on as is rather than counted as a
 * store failure. */
export function isCallerAbort(error: unknown, caller?: AbortSignal): boolean {
  return caller?.aborted === true && !(error instanceof SharedStoreError);
}

/** Refuses a record whose announced size is over the bound, before any of its bytes are read. */
export function checkRecordSize(what: string, size: number | undefined, maxBytes: number): void {
  if (size !== undefined && size > maxBytes) throw new RefusedObject(`${what}: ${size} bytes, more than a record's ${maxBytes}`);
}

/** A record's bytes from a download, at most `maxBytes` of them: past that the download is destroyed
 * and the record refused (a store's announced length is not relied on alone). */
export async function readBounded(what: string, stream: Readable, maxBytes: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let length = 0;
  try {
    for await (const chunk of stream) {
      const bytes = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk as Uint8Array);
      length += bytes.length;
      if (length > maxBytes) throw new RefusedObject(`${what}: more than a record's ${maxBytes} bytes`);
      chunks.push(bytes);
    }
  } finally {
    stream.destroy();
  }
  return Buffer.concat(chunks, length);
}

/** A local file to upload, opened for reading; failing to open it is not the store's failure (LocalFileError). */
export async function openLocal(key: string, file: string): Promise<FileHandle> {
  try {
    return await open(file, 'r');
  } catch (error) {
    throw new LocalFileError(`upload ${key}: opening ${file}: ${messageOf(error)}`, { cause: error });
  }
}

/** Refuses a range createFromRange must not upload (thrown before any I/O): reversed, not whole
 * numbers, or over RANGE_UPLOAD_MAX_BYTES. */
export function checkRange(key: string, range: FileRange): void {
  const { start, end } = range;
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end < start) throw new RangeError(`upload ${key}: the range [${start}, ${end}) is not a byte range`);
  if (end - start > RANGE_UPLOAD_MAX_BYTES) throw new RangeError(`upload ${key}: the range [${start}, ${end}) has ${end - start} bytes, more than the ${RANGE_UPLOAD_MAX_BYTES} one upload takes`);
}

/**
 * The bytes of a range, read from the open handle into one buffer (the handle stays open: it is
 * the caller's). A local file that cannot be read, or ends before the range does, is a plain Error:
 * not a failure of the store. One buffer rather than a stream on the descriptor, because
 * - the body's length is then known to be there before a request starts: a file that ends early
 *   fails here, never as a request whose declared Content-Length the store waits for until its
 *   timeout, and never as a short object;
 * - the SDKs' one retry can send a buffer again (a stream is spent after the first try);
 * - a segment is at most 8 MiB and a fill uploads one at a time, the size of the parts an S3
 *   multipart upload already holds in memory; one large read costs less CPU than many small ones.
 * Reads with pread (positional): the handle's own position is neither used nor moved.
 */
export async function readRange(key: string, range: FileRange, signal?: AbortSignal): Promise<Buffer> {
  checkRange(key, range);
  return readFileRange(key, range, signal);
}

/** readRange without its size bound: for a caller that bounds the range itself (an upload's parts). */
export async function readFileRange(key: string, range: FileRange, signal?: AbortSignal): Promise<Buffer> {
  signal?.throwIfAborted();
  const length = range.end - range.start;
  // allocUnsafe: every byte is overwritten by the read, or the buffer is dropped.
  const buffer = range.scratch !== undefined && range.scratch.length >= length ? range.scratch.subarray(0, length) : Buffer.allocUnsafe(length);
  let filled = 0;
  while (filled < length) {
    let bytesRead: number;
    try {
      ({ bytesRead } = await range.handle.read(buffer, filled, length - filled, range.start + filled));
    } catch (error) {
      throw new LocalFileError(`upload ${key}: reading the local file: ${messageOf(error)}`, { cause: error });
    }
    if (bytesRead === 0) throw new LocalFileError(`upload ${key}: the local file ends at ${range.start + filled}, before the range's end ${range.end}`);
    filled += bytesRead;
    signal?.throwIfAborted();
  }
  return buffer;
}
