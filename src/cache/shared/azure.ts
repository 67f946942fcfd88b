// The shared tier on Azure Blob Storage (block blobs). Creates commit only when no blob has the
// name (`If-None-Match: *` on the single-shot Put Blob or on Put Block List, after the blocks are
// staged), so an upload in progress is never visible and of several nodes one wins. A record is
// replaced or removed on condition of its ETag (`If-Match`).

import { addAbortSignal, Readable } from 'node:stream';
import {
  AnonymousCredential,
  BlobServiceClient,
  RestError,
  StorageSharedKeyCredential,
  type ContainerClient,
  type StoragePipelineOptions,
} from '@azure/storage-blob';
import type { SharedConfig } from '../../rules/config.js';
import { checkRecordSize, deadline, isCallerAbort, messageOf, networkFailure, PageTokens, readAnswer, readBounded, readRange, readSecretFile } from './common.js';
import { RECORD_MAX_BYTES, RefusedObject, SharedStoreError, type ByteSpan, type FileRange, type SharedFailure, type SharedListing, type SharedObject, type SharedStore, type VersionedRecord, type WriteCondition } from './store.js';

type AzureConfig = NonNullable<SharedConfig['azure']>;

/** Blocks of 8 MiB, several in flight; files up to one block go in a single Put Blob. */
const BLOCK_SIZE = 8 * 1024 * 1024;
const MAX_BLOCKS = 50_000;

export async function openAzureStore(config: AzureConfig, timeoutSeconds: number): Promise<SharedStore> {
  const credentials = await readCredentials(config).catch((error: unknown) => {
    throw new SharedStoreError('denied', `reading the Azure credential files: ${messageOf(error)}`, { cause: error });
  });
  const endpoint = (config.endpoint ?? `https://${credentials.accountName}.blob.core.windows.net`).replace(/\/+$/, '');
  const timeoutMs = timeoutSeconds * 1000;
  const options: StoragePipelineOptions = {
    // One retry, soon: a store that is down should fail the request quickly, not after the SDK's
    // default four tries with exponential backoff. tryTimeoutInMs runs until a response's headers.
    retryOptions: { maxTries: 2, retryDelayInMs: 200, maxRetryDelayInMs: 1000, tryTimeoutInMs: timeoutMs > 0 ? timeoutMs : undefined },
  };
  const service =
    'sasToken' in credentials
      ? new BoundedBlobServiceClient(`${endpoint}?${credentials.sasToken}`, new AnonymousCredential(), options)
      : new BoundedBlobServiceClient(endpoint, new StorageSharedKeyCredential(credentials.accountName, credentials.accountKey), options);
  return new AzureStore(service.getContainerClient(config.container), config, endpoint, timeoutMs);
}

/**
 * A BlobServiceClient whose answers to parse are bounded (PARSED_ANSWER_MAX_BYTES): the SDK's HTTP
 * client reads the body of every answer it does not stream (an error document, a listing page, an
 * upload's answer) whole into one string before it is parsed, however long the store makes it; a
 * 500 of 512 MiB ends the process (a string that long cannot be made, and it is thrown outside any
 * promise). A policy nearest the HTTP client (after Sign, beneath Retry and the deserializer) has
 * every answer streamed and reads those the SDK would have read itself, within the bound. Downloads
 * (the statuses the operation streams) pass as they were. The container and blob clients made from
 * this one share its pipeline, so the policy is added once.
 */
class BoundedBlobServiceClient extends BlobServiceClient {
  constructor(url: string, credential: AnonymousCredential | StorageSharedKeyCredential, options: StoragePipelineOptions) {
    super(url, credential, options);
    this.storageClientContext.pipeline.addPolicy(
      {
        name: 'pullbridgeBoundedAnswers',
        async sendRequest(request, next) {
          const streamed = request.streamResponseStatusCodes;
          // Infinity: the HTTP client's way of saying "stream the body of any status".
          request.streamResponseStatusCodes = new Set([Number.POSITIVE_INFINITY]);
          let response: Awaited<ReturnType<typeof next>>;
          try {
            response = await next(request);
          } finally {
            // A retry passes here again, and sets it again.
            request.streamResponseStatusCodes = streamed;
          }
          const body = response.readableStreamBody as Readable | undefined;
          if (!body || streamed?.has(response.status) || streamed?.has(Number.POSITIVE_INFINITY)) return response;
          response.readableStreamBody = undefined;
          response.bodyAsText = (await readAnswer(body, response.headers.get('content-length'))).toString('utf8');
          return response;
        },
      },
      { afterPhase: 'Sign' },
    );
  }
}

type Credentials = { accountName: string; accountKey: string } | { accountName: string; sasToken: string };

/** Read once at open: the shared tier looks at the files every 10 s and opens the store again when they change (a rotated Secret). */
async function readCredentials(config: AzureConfig): Promise<Credentials> {
  const accountName = config.accountName ?? (await readSecretFile(config.accountNameFile!));
  if (config.sasTokenFile) return { accountName, sasToken: (await readSecretFile(config.sasTokenFile)).replace(/^\?/, '') };
  return { accountName, accountKey: await readSecretFile(config.accountKeyFile!) };
}

class AzureStore implements SharedStore {
  readonly kind = 'azure';
  readonly location: string;

  constructor(
    private readonly container: ContainerClient,
    private readonly config: AzureConfig,
    endpoint: string,
    private readonly timeoutMs: number,
  ) {
    this.location = `${endpoint}/${config.container}/${config.prefix}`;
  }

  async stat(key: string): Promise<SharedObject | undefined> {
    const props = await this.call(`stat ${key}`, (abortSignal) => this.blob(key).getProperties({ abortSignal }));
    return props && { size: props.contentLength ?? 0, modified: props.lastModified ?? new Date(0) };
  }

  async read(key: string, span?: ByteSpan, signal?: AbortSignal): Promise<Readable | undefined> {
    const offset = span?.start ?? 0;
    const count = span ? span.end - span.start + 1 : undefined;
    const body = await this.call(`read ${key}`, async (abortSignal) => {
      try {
        return (await this.blob(key).download(offset, count, { abortSignal, maxRetryRequests: 1 })).readableStreamBody as Readable | undefined;
      } catch (error) {
        // A span past the blob's end (an empty blob read from 0): no bytes, as a file read there
        // gives, for the caller to refuse; not a failure of the store.
        if (error instanceof RestError && error.statusCode === 416) return Readable.from([]);
        throw error;
      }
    }, signal);
    return body && signal ? addAbortSignal(signal, body) : body;
  }

  async createFromFile(key: string, file: string, size: number, signal?: AbortSignal): Promise<'created' | 'exists'> {
    const blockSize = Math.max(BLOCK_SIZE, Math.ceil(size / MAX_BLOCKS));
    // The SDK's per-try timeout does not bound an upload waiting for its answer: this deadline
    // does, starting over whenever bytes or blocks go out.
    const idle = deadline(this.timeoutMs, signal);
    try {
      await this.blob(key).uploadFile(file, {
        blockSize,
        maxSingleShotSize: blockSize,
        concurrency: 4,
        conditions: { ifNoneMatch: '*' },
        abortSignal: idle.signal,
        onProgress: () => idle.touch(),
      });
      return 'created';
    } catch (error) {
      return createFailed(key, error, signal, idle.timedOut());
    } finally {
      idle.disarm();
    }
  }

  async createFromRange(key: string, range: FileRange, signal?: AbortSignal): Promise<'created' | 'exists'> {
    const body = await readRange(key, range, signal);
    // One Put Blob (Put Block + Put Block List would be two requests), under the same deadline as
    // createFromFile's: it starts over whenever bytes go out.
    const idle = deadline(this.timeoutMs, signal);
    try {
      await this.blob(key).upload(body, body.length, { conditions: { ifNoneMatch: '*' }, abortSignal: idle.signal, onProgress: () => idle.touch() });
      return 'created';
    } catch (error) {
      return createFailed(key, error, signal, idle.timedOut());
    } finally {
      idle.disarm();
    }
  }

  async writeRecord(key: string, body: Buffer, options?: WriteCondition): Promise<boolean> {
    const conditions = options?.ifAbsent ? { ifNoneMatch: '*' } : options?.ifMatch !== undefined ? { ifMatch: options.ifMatch } : undefined;
    try {
      await this.call(`write ${key}`, (abortSignal) => this.blob(key).upload(body, body.length, { conditions, abortSignal }), undefined, true);
      return true;
    } catch (error) {
      if (conditions && error instanceof SharedStoreError && (isConditionFailure(error.cause) || (options?.ifMatch !== undefined && isMissing(error.cause)))) return false;
      throw error;
    }
  }

  async readRecord(key: string, maxBytes = RECORD_MAX_BYTES): Promise<Buffer | undefined> {
    return (await this.readVersioned(key, maxBytes))?.body;
  }

  async readVersioned(key: string, maxBytes = RECORD_MAX_BYTES): Promise<VersionedRecord | undefined> {
    return this.call(`read ${key}`, async (abortSignal) => {
      const got = await this.blob(key).download(0, undefined, { abortSignal, maxRetryRequests: 1 });
      const version = got.etag ?? '';
      const body = got.readableStreamBody as Readable | undefined;
      if (!body) return { body: Buffer.alloc(0), version };
      try {
        checkRecordSize(`read ${key}`, got.contentLength, maxBytes);
      } catch (error) {
        body.destroy();
        throw error;
      }
      return { body: await readBounded(`read ${key}`, body, maxBytes), version };
    });
  }

  async remove(key: string, options?: { readonly ifMatch?: string }): Promise<boolean> {
    if (options?.ifMatch === undefined) {
      await this.call(`remove ${key}`, (abortSignal) => this.blob(key).deleteIfExists({ abortSignal }));
      return true;
    }
    // Another version: 412 ConditionNotMet; none: 404 BlobNotFound (Azurite answers 412).
    const conditions = { ifMatch: options.ifMatch };
    try {
      await this.call(`remove ${key}`, (abortSignal) => this.blob(key).delete({ conditions, abortSignal }), undefined, true);
      return true;
    } catch (error) {
      if (error instanceof SharedStoreError && (isConditionFailure(error.cause) || isMissing(error.cause))) return false;
      throw error;
    }
  }

  async *list(prefix: string): AsyncIterable<SharedListing> {
    let continuationToken: string | undefined;
    const tokens = new PageTokens(`list ${prefix}`);
    do {
      // A pager per page, so that each page's request has its own deadline.
      const token = continuationToken;
      const page = await this.call(`list ${prefix}`, async (abortSignal) => {
        const pages = this.container.listBlobsFlat({ prefix: this.config.prefix + prefix, abortSignal }).byPage({ continuationToken: token, maxPageSize: 1000 });
        return (await pages.next()).value;
      });
      for (const item of page?.segment.blobItems ?? []) {
        yield { key: item.name.slice(this.config.prefix.length), size: item.properties.contentLength ?? 0, modified: item.properties.lastModified };
      }
      continuationToken = tokens.next(page?.continuationToken, page?.segment.blobItems.length ?? 0);
    } while (continuationToken);
  }

  async close(): Promise<void> {
    // The SDK's HTTP agents are shared per process and need no closing.
  }

  private blob(key: string) {
    return this.container.getBlockBlobClient(this.config.prefix + key);
  }

  /** One request under the store's deadline: a missing blob is undefined, every failure a
   * SharedStoreError; a write's failed condition is the error's cause, and for a write a 404 is
   * an error (a missing container). The deadline ends when the answer arrives; a download
   * streams on. */
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

/** A 404 for the blob, not for its container (a missing container is a configuration error). A HEAD
 * answer has no body, so its error code is only in the x-ms-error-code header. */
function isMissing(error: unknown): boolean {
  if (!(error instanceof RestError) || error.statusCode !== 404) return false;
  return (error.code ?? error.response?.headers.get('x-ms-error-code')) !== 'ContainerNotFound';
}

/** The name was taken: 409 BlobAlreadyExists (single-shot Put Blob) or 412 ConditionNotMet. */
function isConditionFailure(error: unknown): boolean {
  return error instanceof RestError && (error.statusCode === 412 || error.code === 'BlobAlreadyExists' || error.code === 'ConditionNotMet');
}

function failureOf(error: unknown, timedOut: boolean): SharedFailure {
  if (timedOut) return 'timeout';
  const network = networkFailure(error);
  if (network) return network;
  // The SDK's per-try timeout surfaces as an abort nobody asked for.
  if (error instanceof Error && error.name === 'AbortError') return 'timeout';
  if (error instanceof RestError && (error.statusCode === 401 || error.statusCode === 403)) return 'denied';
  return 'error';
}

function storeError(what: string, error: unknown, timedOut: boolean): SharedStoreError {
  return new SharedStoreError(failureOf(error, timedOut), `${what}: ${messageOf(error)}`, { cause: error });
}

/** Why a create-if-absent did not answer 'created': 'exists' when the key was taken (409
 * BlobAlreadyExists for a single Put Blob, 412 for a condition that failed), else thrown, the
 * caller's abort as it is. */
function createFailed(key: string, error: unknown, signal: AbortSignal | undefined, timedOut: boolean): 'exists' {
  if (isCallerAbort(error, signal)) throw error;
  if (isConditionFailure(error)) return 'exists';
  throw storeError(`upload ${key}`, error, timedOut);
}
