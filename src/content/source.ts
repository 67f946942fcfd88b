// What the proxy's HTTP shell asks for, and what it gets back: manifests, blobs and tag lists by
// (rule, repository, reference), as plain results and typed failures. Pass-through (passthrough.ts)
// is the first source; a cache is another, wrapping it. Authorization is not a source's business:
// the shell decides it before any content is looked up.

import type { UpstreamCredentials } from '../upstream/authorizer.js';
import type { BodySink } from '../upstream/body.js';

export interface ContentRequest {
  /** The rule's name: which upstream, and whose content. */
  readonly rule: string;
  /** The repository on the upstream (without the rule's prefix). */
  readonly repository: string;
  /** HEAD: what a GET would answer, without the body (a source may still have to read it). */
  readonly method: 'GET' | 'HEAD';
  /** What the upstream is asked with: the rule's own credentials, or the client's (passthrough). */
  readonly credentials: UpstreamCredentials | undefined;
  /** Aborted when the client goes away. */
  readonly signal: AbortSignal;
  /** Told the seconds until the upstream answered (headers), each time the source asks it. */
  readonly onUpstreamAnswer?: (seconds: number) => void;
}

export interface ManifestRequest extends ContentRequest {
  /** A tag, or a digest (then `byDigest`). */
  readonly reference: string;
  readonly byDigest: boolean;
  /** The client's Accept header, if any. */
  readonly accept: string | undefined;
  /** Memory for the manifest while it is checked and until the client has read it. */
  readonly buffers: BufferAllowance;
  /** GET only: the manifest the caller holds. Asked for with `If-None-Match: "<digest>"`; an
   * upstream answering 304 (not modified) is answered with this, without a body. */
  readonly ifNoneMatch?: Pick<ManifestResult, 'digest' | 'size' | 'mediaType'>;
}

export interface BlobRequest extends ContentRequest {
  readonly digest: string;
  /** The client's Range header, if any. */
  readonly range: string | undefined;
  /** The caller checks the digest itself (a cache fill hashes what it stores): pass the bytes on as they come. */
  readonly unverified?: boolean;
}

/** How a cache answered: from its store, by filling it (from upstream, or from the shared tier), from
 * its store while the upstream failed, or not at all. */
export type CacheOutcome = 'hit' | 'miss' | 'shared' | 'stale' | 'bypass';

export interface TagsRequest extends ContentRequest {
  /** Pagination as the client asked for it (`n` already checked to be a number). */
  readonly n: string | null;
  readonly last: string | null;
  readonly buffers: BufferAllowance;
}

export interface ManifestResult {
  /** `algorithm:hex` of the manifest's bytes. */
  readonly digest: string;
  readonly size: number;
  readonly mediaType: string | undefined;
  /** The manifest's bytes, checked against `digest`; absent when a HEAD was answered without them. */
  readonly body: Buffer | undefined;
  readonly cache?: CacheOutcome;
  /** A `Warning` header for the client (a stale answer). */
  readonly warning?: string;
}

export interface BlobResult {
  /** 200: the whole blob; 206: the range asked for. A HEAD is answered 200. */
  readonly status: number;
  readonly digest: string;
  /** Representation headers for the client: content-type, content-length, content-range,
   * accept-ranges, content-encoding, etag, last-modified, docker-content-digest. */
  readonly headers: Readonly<Record<string, string>>;
  /** The bytes, to be streamed once; absent for a HEAD. A whole blob is verified as it passes
   * (when the rule asks for it): a body that does not match ends in an error, never in `end`. */
  readonly body: ContentBody | undefined;
  readonly cache?: CacheOutcome;
  /** A blob a cache is filling (a miss, or a hit read from a fill in progress): settles once the fill
   * is over, true when the blob is stored for this rule and repository. The body may end before. */
  readonly stored?: Promise<boolean>;
}

export interface TagsResult {
  /** The upstream's tag list document, as parsed (its `name` is the upstream's). */
  readonly list: { readonly name?: unknown; readonly tags?: unknown };
  /** The next page, when the upstream links one on the same path: its query (`?n=…&last=…`)
   * and what followed the link's target (`; rel="next"`). */
  readonly nextPage: { readonly query: string; readonly linkParameters: string } | undefined;
}

export interface ContentSource {
  manifest(request: ManifestRequest): Promise<ManifestResult>;
  blob(request: BlobRequest): Promise<BlobResult>;
  tags(request: TagsRequest): Promise<TagsResult>;
}

/** A body delivered chunk by chunk to one consumer, with backpressure. */
export interface ContentBody {
  /** Hands the body to its one consumer; chunks are valid during the `data` call only. */
  attach(sink: BodySink): void;
  /** Lets a sink that returned false from `data` have more. */
  resume(): void;
  /** Stops the body (and whatever produces it) unless it already finished. */
  destroy(reason?: Error): void;
  /** Keeps the memory under `chunk` from reuse until the returned function is called (a write of
   * it in progress). */
  hold(chunk: Buffer): () => void;
}

/**
 * Memory for a body a source must hold whole (to check or rewrite it), granted from the shell's
 * budget (per client and in total) and held until the response is done; once it is done (the client
 * left), nothing more is taken. Both methods throw a ContentError (too-many-requests or unavailable)
 * when the budget refuses.
 */
export interface BufferAllowance {
  reserve(bytes: number): void;
  /** Adjusts what `reserve` took to the real size, once read. */
  resize(bytes: number): void;
  /**
   * Memory for work this request starts that may outlive it (one manifest fetch for every client
   * asking at once): from the same budget, but not this response's, and held until the work calls
   * `release`, whether or not this client is still there.
   */
  detached(): DetachedBufferAllowance;
}

export interface DetachedBufferAllowance extends BufferAllowance {
  /** Gives back everything reserved through it; nothing more is taken after. Idempotent. */
  release(): void;
}

export type ContentFailure =
  /** No such manifest, blob or repository. */
  | 'not-found'
  /** The upstream refused the credentials it was asked with. */
  | 'unauthorized'
  /** The upstream denied access (403). */
  | 'denied'
  /** The upstream, or the proxy's budget, asks the client to come back later. */
  | 'too-many-requests'
  /** The upstream refused otherwise: any other 4xx (400, 410, a policy's 412, 451…). Passed on as
   * it is; never bridged with content the cache holds. */
  | 'refused'
  /** The upstream failed, timed out, could not be reached, or answered what cannot be used. */
  | 'unavailable'
  /** What the upstream sent is not what was asked for: wrong digest, too large, partial, not JSON. */
  | 'invalid';

export interface ContentErrorDetails {
  /** The HTTP status that tells a client. */
  readonly status: number;
  /** The upstream's (or the budget's) Retry-After, to pass on. */
  readonly retryAfter?: string;
  /** The upstream's Content-Range on a 416 (the complete length, RFC 9110 §15.5.17), to pass on. */
  readonly contentRange?: string;
  /** The upstream's own registry error document (`{"errors":[…]}`), to pass on as it is. */
  readonly registryBody?: string;
  /** For the access log, when the proxy found the fault (not when the upstream said so). */
  readonly note?: string;
  /** The proxy refused on its own account (a memory budget), whatever the upstream would say: never a
   * reason to serve what the cache holds in its place. */
  readonly local?: true;
}

export class ContentError extends Error {
  constructor(
    readonly failure: ContentFailure,
    message: string,
    readonly details: ContentErrorDetails,
  ) {
    super(message);
  }
}
