// The shared tier on the S3 API (AWS S3 and S3-compatible stores). Creates are conditional on the
// key being absent (`If-None-Match: *`, on PutObject and on CompleteMultipartUpload), so that of
// several nodes uploading the same blob exactly one writes it and the rest learn it is there; a
// record is replaced or removed on condition of its ETag (`If-Match` on PutObject and DeleteObject).

import type { FileHandle } from 'node:fs/promises';
import { Agent as HttpAgent, type AgentOptions } from 'node:http';
import { addAbortSignal, Readable } from 'node:stream';
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  S3ServiceException,
  UploadPartCommand,
  type CompletedPart,
  type S3ClientConfig,
} from '@aws-sdk/client-s3';
import type { SharedConfig } from '../../rules/config.js';
import { largeReadOptions, type SocketReadOptions } from '../../upstream/readbuffers.js';
import { checkRecordSize, deadline, errorChain, isCallerAbort, messageOf, networkFailure, openLocal, PageTokens, readAnswer, readBounded, readFileRange, readRange, readSecretFile } from './common.js';
import { LocalFileError, RECORD_MAX_BYTES, RefusedObject, SharedStoreError, type ByteSpan, type FileRange, type SharedFailure, type SharedListing, type SharedObject, type SharedStore, type VersionedRecord, type WriteCondition } from './store.js';

type S3Config = NonNullable<SharedConfig['s3']>;

/** Parts of 8 MiB (S3's minimum is 5 MiB), larger for files that would need over 10,000 parts. */
const MIN_PART_SIZE = 8 * 1024 * 1024;
const MAX_PARTS = 10_000;
/** Parts of one blob uploaded at once (each holds its part in memory while it goes out). */
const PART_UPLOADS = 4;
/**
 * Bytes per socket read from a store on plain HTTP (Node's default: 64 KiB). A follower's segment
 * downloads then reach its fill in chunks of up to this size: each chunk costs a fill write and a
 * client write. Over TLS the chunks are TLS records (16 KiB) whatever the read.
 */
const STORE_READ_BYTES = 512 * 1024;
/** Connections kept per store (the SDK's own default). */
const STORE_SOCKETS = 50;

// An Agent hands its options to net.createConnection, onread included (which its type omits).
const storeAgentOptions: AgentOptions & { readonly onread: SocketReadOptions } = { keepAlive: true, maxSockets: STORE_SOCKETS, onread: largeReadOptions(STORE_READ_BYTES) };

export async function openS3Store(config: S3Config, timeoutSeconds: number): Promise<SharedStore> {
  const timeoutMs = timeoutSeconds * 1000;
  const clientConfig: S3ClientConfig = {
    region: config.region,
    endpoint: config.endpoint,
    forcePathStyle: config.forcePathStyle,
    // One retry: a store that is down should fail the request quickly (the node cache carries on
    // without the shared tier) rather than hold a pull through the SDK's backoff.
    maxAttempts: 2,
    // Idle and connect deadlines; a whole request's deadline is the abort signal of each call.
    requestHandler: {
      connectionTimeout: timeoutMs,
      socketTimeout: timeoutMs,
      httpAgent: new HttpAgent(storeAgentOptions),
    },
    // Checksums only where the API requires them: S3-compatible stores differ in which of the
    // newer checksum headers they accept, and the tier verifies digests itself.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  };
  if (config.accessKeyFile && config.secretKeyFile) {
    // Read once at open: the shared tier looks at the files every 10 s and opens the store again when they change (a rotated Secret).
    const [accessKeyId, secretAccessKey] = await Promise.all([readSecretFile(config.accessKeyFile), readSecretFile(config.secretKeyFile)]).catch((error: unknown) => {
      throw new SharedStoreError('denied', `reading the S3 credential files: ${messageOf(error)}`, { cause: error });
    });
    clientConfig.credentials = { accessKeyId, secretAccessKey };
  }
  const client = new S3Client(clientConfig);
  client.middlewareStack.add(
    (next, context) => async (args) => {
      const request = args.request as { headers?: Record<string, string> } | undefined;
      if (request?.headers && UNSIGNED_PAYLOAD_COMMANDS.has(context.commandName ?? '')) request.headers['x-amz-content-sha256'] = 'UNSIGNED-PAYLOAD';
      return next(args);
    },
    { step: 'build', name: 'pullbridgeUnsignedPayload' },
  );
  // Beneath the deserializer (deserialize step, low priority): sees the answer before it is parsed.
  client.middlewareStack.add(
    (next, context) => async (args) => {
      const result = await next(args);
      const response = result.response as { statusCode?: number; headers?: Record<string, string | undefined>; body?: unknown };
      // A HEAD's answer has no body, whatever length it announces (the object's).
      const unparsed = context.commandName === 'HeadObjectCommand' || (context.commandName === 'GetObjectCommand' && (response.statusCode ?? 0) < 300);
      // Read here, up to the bound, and handed to the deserializer whole (it would read it whole).
      if (!unparsed && response.body instanceof Readable) response.body = Readable.from([await readAnswer(response.body, response.headers?.['content-length'])], { objectMode: false });
      return result;
    },
    { step: 'deserialize', priority: 'low', name: 'pullbridgeBoundedAnswers' },
  );
  return new S3Store(client, config, timeoutMs);
}

/**
 * Commands whose bodies are sent unsigned (`x-amz-content-sha256: UNSIGNED-PAYLOAD`, which the
 * signer takes as given): the parts of a blob's multipart upload. Signing a body hashes it (sha256)
 * once more on this node and again on the store, on top of the hash that verifies the blob. The
 * signature still covers the method, key, headers and conditions. A part cut short is never seen:
 * the upload is completed only after every part was answered, and aborted otherwise. A PutObject
 * (a segment, a record) stays signed: a store may keep a body cut short as an object (versitygw does)
 * unless the payload's hash tells it the body is incomplete.
 */
const UNSIGNED_PAYLOAD_COMMANDS = new Set(['UploadPartCommand']);

class S3Store implements SharedStore {
  readonly kind = 's3';
  readonly location: string;

  constructor(
    private readonly client: S3Client,
    private readonly config: S3Config,
    private readonly timeoutMs: number,
  ) {
    this.location = `s3://${config.bucket}/${config.prefix}${config.endpoint ? ` at ${config.endpoint}` : ''}`;
  }

  async stat(key: string): Promise<SharedObject | undefined> {
    const head = await this.call(`stat ${key}`, (abortSignal) => this.client.send(new HeadObjectCommand(this.at(key)), { abortSignal }));
    return head && { size: head.ContentLength ?? 0, modified: head.LastModified ?? new Date(0) };
  }

  async read(key: string, span?: ByteSpan, signal?: AbortSignal): Promise<Readable | undefined> {
    // The deadline covers the answer's headers; the body is bounded by the socket's idle timeout,
    // since a large blob may take longer than one request's deadline to stream.
    const range = span && `bytes=${span.start}-${span.end}`;
    const body = await this.call(`read ${key}`, async (abortSignal) => {
      try {
        return (await this.client.send(new GetObjectCommand({ ...this.at(key), Range: range }), { abortSignal })).Body as Readable | undefined;
      } catch (error) {
        // A span past the object's end (an empty object read from 0): no bytes, as a file read
        // there gives, for the caller to refuse; not a failure of the store.
        if (statusOf(error) === 416) return Readable.from([]);
        throw error;
      }
    }, signal);
    return body && signal ? addAbortSignal(signal, body) : body;
  }

  async createFromFile(key: string, file: string, size: number, signal?: AbortSignal): Promise<'created' | 'exists'> {
    signal?.throwIfAborted();
    const partSize = Math.max(MIN_PART_SIZE, Math.ceil(size / MAX_PARTS));
    const handle = await openLocal(key, file);
    try {
      if (size <= partSize) {
        const body = await readFileRange(key, { handle, start: 0, end: size }, signal);
        return await this.putIfAbsent(key, body, signal);
      }
      return await this.multipartIfAbsent(key, handle, size, partSize, signal);
    } finally {
      await handle.close().catch(() => undefined);
    }
  }

  /** One PutObject of a body in memory, only if no object has the key. */
  private async putIfAbsent(key: string, body: Buffer, signal: AbortSignal | undefined): Promise<'created' | 'exists'> {
    // Bounded by the socket's idle timeout (no progress for timeoutSeconds), not by one deadline for
    // the whole body.
    const put = new PutObjectCommand({ ...this.at(key), Body: body, ContentLength: body.length, IfNoneMatch: '*' });
    try {
      await this.client.send(put, { abortSignal: signal });
      return 'created';
    } catch (error) {
      return this.createFailed(key, error, signal);
    }
  }

  /**
   * A multipart upload of the file's first `size` bytes, completed only if no object has the key
   * (`If-None-Match: *` on the completion), aborted on the store when it fails: no parts left behind.
   * PART_UPLOADS parts go up at once, each read into a buffer of its own that is reused for the next
   * part (a fresh buffer per part, or the SDK's upload helper joining 64 KiB reads into each part,
   * kept the collector busy: ~100 full collections per GiB on a filler).
   */
  private async multipartIfAbsent(key: string, handle: FileHandle, size: number, partSize: number, signal: AbortSignal | undefined): Promise<'created' | 'exists'> {
    let uploadId: string | undefined;
    try {
      ({ UploadId: uploadId } = await this.client.send(new CreateMultipartUploadCommand(this.at(key)), { abortSignal: signal }));
      if (!uploadId) throw new Error('the store answered the multipart upload with no upload id');
      const id = uploadId;
      const count = Math.ceil(size / partSize);
      const parts: CompletedPart[] = new Array<CompletedPart>(count);
      let next = 0;
      let failed = false;
      const uploader = async () => {
        const scratch = Buffer.allocUnsafeSlow(partSize);
        while (next < count && !failed) {
          const index = next++;
          const start = index * partSize;
          const body = await readFileRange(key, { handle, start, end: Math.min(size, start + partSize), scratch }, signal);
          const answer = await this.client.send(new UploadPartCommand({ ...this.at(key), UploadId: id, PartNumber: index + 1, Body: body, ContentLength: body.length }), { abortSignal: signal });
          // Without the part's ETag the completion cannot name it: failed now, not after every part went up.
          if (!answer.ETag) throw new Error(`the store answered part ${index + 1} with no ETag`);
          parts[index] = { PartNumber: index + 1, ETag: answer.ETag };
        }
      };
      // The first failure stops the others from starting parts; all are waited for before the
      // upload is aborted, so that no part lands after the abort.
      const uploads = Array.from({ length: Math.min(PART_UPLOADS, count) }, () =>
        uploader().catch((error: unknown) => {
          failed = true;
          throw error;
        }),
      );
      const settled = await Promise.allSettled(uploads);
      const rejections = settled.flatMap((result) => (result.status === 'rejected' ? [result.reason as unknown] : []));
      // The local file's failure first: it is not the store's (the tier stays up).
      if (rejections.length > 0) throw rejections.find((reason) => reason instanceof LocalFileError) ?? rejections[0];
      await this.client.send(new CompleteMultipartUploadCommand({ ...this.at(key), UploadId: id, MultipartUpload: { Parts: parts }, IfNoneMatch: '*' }), { abortSignal: signal });
      return 'created';
    } catch (error) {
      if (uploadId !== undefined) await this.abortMultipart(key, uploadId);
      if (error instanceof LocalFileError) throw error;
      return this.createFailed(key, error, signal);
    }
  }

  /** Aborts a multipart upload on the store (its parts are removed), best effort, within the store's deadline. */
  private async abortMultipart(key: string, uploadId: string): Promise<void> {
    const limit = deadline(this.timeoutMs);
    try {
      await this.client.send(new AbortMultipartUploadCommand({ ...this.at(key), UploadId: uploadId }), { abortSignal: limit.signal });
    } catch {
      // Left to the bucket's rule for incomplete multipart uploads (docs/cache.md).
    } finally {
      limit.disarm();
    }
  }

  /** Why a create-if-absent did not answer 'created': 'exists' when the key was taken (or a create
   * the store cut off did land), else thrown, the caller's abort as it is. */
  private async createFailed(key: string, error: unknown, signal: AbortSignal | undefined): Promise<'exists'> {
    if (isCallerAbort(error, signal)) throw error;
    if (isConditionFailure(error)) return 'exists';
    if (isCutOff(error) && (await this.stat(key).catch(() => undefined))) return 'exists';
    throw storeError(`upload ${key}`, error, false);
  }

  async createFromRange(key: string, range: FileRange, signal?: AbortSignal): Promise<'created' | 'exists'> {
    // One PutObject (a multipart upload's parts would cost three requests for a segment).
    return this.putIfAbsent(key, await readRange(key, range, signal), signal);
  }

  async writeRecord(key: string, body: Buffer, options?: WriteCondition): Promise<boolean> {
    const put = new PutObjectCommand({ ...this.at(key), Body: body, IfNoneMatch: options?.ifAbsent ? '*' : undefined, IfMatch: options?.ifMatch });
    try {
      await this.call(`write ${key}`, (abortSignal) => this.client.send(put, { abortSignal }), undefined, true);
      return true;
    } catch (error) {
      if ((options?.ifAbsent || options?.ifMatch !== undefined) && error instanceof SharedStoreError && isConditionFailure(error.cause)) return false;
      // If-Match on a key that is gone: 404 NoSuchKey (not NoSuchBucket, a configuration error).
      if (options?.ifMatch !== undefined && error instanceof SharedStoreError && isMissing(error.cause)) return false;
      throw error;
    }
  }

  async readRecord(key: string, maxBytes = RECORD_MAX_BYTES): Promise<Buffer | undefined> {
    return (await this.readVersioned(key, maxBytes))?.body;
  }

  async readVersioned(key: string, maxBytes = RECORD_MAX_BYTES): Promise<VersionedRecord | undefined> {
    return this.call(`read ${key}`, async (abortSignal) => {
      const got = await this.client.send(new GetObjectCommand(this.at(key)), { abortSignal });
      const version = got.ETag ?? '';
      const body = got.Body as Readable | undefined;
      if (!body) return { body: Buffer.alloc(0), version };
      try {
        checkRecordSize(`read ${key}`, got.ContentLength, maxBytes);
      } catch (error) {
        body.destroy();
        throw error;
      }
      return { body: await readBounded(`read ${key}`, body, maxBytes), version };
    });
  }

  async remove(key: string, options?: { readonly ifMatch?: string }): Promise<boolean> {
    // DeleteObject succeeds for a missing key, If-Match or not; with If-Match it answers 412 for
    // another version (versitygw v1.8.0 honours If-Match on DeleteObject as on PutObject).
    const command = new DeleteObjectCommand({ ...this.at(key), IfMatch: options?.ifMatch });
    try {
      await this.call(`remove ${key}`, (abortSignal) => this.client.send(command, { abortSignal }), undefined, options?.ifMatch !== undefined);
      return true;
    } catch (error) {
      if (options?.ifMatch !== undefined && error instanceof SharedStoreError && (isConditionFailure(error.cause) || isMissing(error.cause))) return false;
      throw error;
    }
  }

  async *list(prefix: string): AsyncIterable<SharedListing> {
    let token: string | undefined;
    const tokens = new PageTokens(`list ${prefix}`);
    do {
      const page = await this.call(`list ${prefix}`, (abortSignal) =>
        this.client.send(new ListObjectsV2Command({ Bucket: this.config.bucket, Prefix: this.config.prefix + prefix, ContinuationToken: token }), { abortSignal }),
      );
      for (const object of page?.Contents ?? []) {
        if (object.Key === undefined) continue;
        yield { key: object.Key.slice(this.config.prefix.length), size: object.Size ?? 0, modified: object.LastModified ?? new Date(0) };
      }
      token = tokens.next(page?.IsTruncated ? page.NextContinuationToken : undefined, page?.Contents?.length ?? 0);
    } while (token);
  }

  async close(): Promise<void> {
    this.client.destroy();
  }

  private at(key: string): { Bucket: string; Key: string } {
    return { Bucket: this.config.bucket, Key: this.config.prefix + key };
  }

  /** One request under the store's deadline: a missing key is undefined, every failure a
   * SharedStoreError; a write's failed condition is the error's cause, and for a write a 404 is
   * an error (a missing bucket). The deadline ends when the answer arrives; a body streams on
   * under the socket's idle timeout. */
  private async call<T>(what: string, request: (signal: AbortSignal) => Promise<T>, caller?: AbortSignal, write = false): Promise<T | undefined> {
    const limit = deadline(this.timeoutMs, caller);
    try {
      return await request(limit.signal);
    } catch (error) {
      if (isCallerAbort(error, caller) || error instanceof RefusedObject) throw error;
      if (!write && isMissing(error)) return undefined;
      if (write && isConditionFailure(error)) throw new SharedStoreError('error', `${what}: ${messageOf(error)}`, { cause: error });
      throw storeError(what, error, limit.timedOut());
    } finally {
      limit.disarm();
    }
  }
}

function statusOf(error: unknown): number | undefined {
  return error instanceof S3ServiceException ? error.$metadata.httpStatusCode : undefined;
}

function isMissing(error: unknown): boolean {
  return error instanceof S3ServiceException && (error.name === 'NoSuchKey' || error.name === 'NotFound' || (statusOf(error) === 404 && error.name !== 'NoSuchBucket'));
}

/** The key was taken: 412 PreconditionFailed, or 409 ConditionalRequestConflict when another
 * conditional write to the key was in flight at the same moment. */
function isConditionFailure(error: unknown): boolean {
  return error instanceof S3ServiceException && (statusOf(error) === 412 || error.name === 'PreconditionFailed' || error.name === 'ConditionalRequestConflict');
}

/** A connection reset while the body was still being sent. Some S3-compatible servers (versitygw)
 * answer 412 to a conditional PUT as soon as the key is taken, before reading the body, and close
 * the connection: the client sees the reset, not the 412. An object at the key then means the
 * condition failed (or, rarely, that this very upload landed and its answer was lost: either way the
 * key holds the verified content). */
function isCutOff(error: unknown): boolean {
  for (const e of errorChain(error)) {
    const code = (e as { code?: unknown }).code;
    if (code === 'ECONNRESET' || code === 'EPIPE') return true;
  }
  return false;
}

const DENIED = new Set(['AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'ExpiredToken', 'InvalidToken', 'CredentialsProviderError']);

function failureOf(error: unknown, timedOut: boolean): SharedFailure {
  if (timedOut) return 'timeout';
  const network = networkFailure(error);
  if (network) return network;
  if (error instanceof Error && DENIED.has(error.name)) return 'denied';
  const status = statusOf(error);
  if (status === 401 || status === 403) return 'denied';
  return 'error';
}

function storeError(what: string, error: unknown, timedOut: boolean): SharedStoreError {
  return new SharedStoreError(failureOf(error, timedOut), `${what}: ${messageOf(error)}`, { cause: error });
}
