// Cache warm-up: fetches images through a content source (the node cache of a runtime) so that their
// manifests and blobs are stored before a rollout pulls them. The manifest by tag or digest (its tag
// record written as for a pull), the child manifests of an index (every platform, or those named),
// then each config and layer, a few at a time, their bodies read to the end so that the fills
// complete. What to fetch is decided in warmplan.ts; this is the I/O.

import { MANIFEST_LIMIT_BYTES } from '../content/passthrough.js';
import { ContentError, type CacheOutcome, type ContentBody, type ContentSource, type DetachedBufferAllowance } from '../content/source.js';
import type { Config } from '../rules/config.js';
import type { UpstreamCredentials } from '../upstream/authorizer.js';
import type { RuleUpstream } from '../upstream/rule.js';
import { formatPlatform, parseManifestDocument, selectManifests, warmTarget, type Descriptor, type Platform, type WarmSkipReason } from './warmplan.js';

/** Blobs fetched at once (per warm-up). */
export const WARM_BLOB_CONCURRENCY = 4;
/** Index → index → image manifest is the deepest nesting followed. */
const INDEX_DEPTH_MAX = 2;

export interface WarmOptions {
  /** The runtime's content source: the node cache over its upstreams. */
  readonly content: ContentSource;
  /** The runtime's rules: each one's own upstream credentials. */
  readonly rules: ReadonlyMap<string, RuleUpstream>;
  readonly config: Config;
  /** References as written in manifests, e.g. `registry.corp.example:5000/team/app:1.0`. */
  readonly images: readonly string[];
  /** Only these platforms of an index; every platform when empty. */
  readonly platforms?: readonly Platform[];
  readonly signal?: AbortSignal;
  readonly concurrency?: number;
}

export interface Tally {
  count: number;
  /** Already in the store. */
  cached: number;
  /** Fetched from upstream into the store now. */
  filled: number;
}

export interface ImageReport {
  readonly image: string;
  /** failed: something could not be stored (see errors), or the reference is invalid. */
  readonly status: 'warmed' | 'skipped' | 'failed';
  readonly rule: string | null;
  readonly repository: string | null;
  /** The tag or digest asked for. */
  readonly reference: string | null;
  readonly reason?: WarmSkipReason;
  readonly detail?: string;
  /** The digest of the manifest (or index) the reference names. */
  readonly digest: string | null;
  /** The platforms of an index that were warmed; empty for a single manifest. */
  readonly platforms: readonly string[];
  readonly manifests: Tally;
  /** Configs and layers; bytes as the manifests give their sizes. */
  readonly blobs: Tally & { bytes: number };
  readonly errors: readonly string[];
}

export interface WarmReport {
  /** No image failed (skipped ones do not count). */
  readonly ok: boolean;
  readonly images: readonly ImageReport[];
}

/** Warms every image in turn; never throws for one image's failure (it is in the report). */
export async function warmImages(options: WarmOptions): Promise<WarmReport> {
  const signal = options.signal ?? new AbortController().signal;
  const images: ImageReport[] = [];
  for (const image of options.images) images.push(await warmImage(options, image, signal));
  return { ok: images.every((i) => i.status !== 'failed'), images };
}

interface ImageWork {
  readonly content: ContentSource;
  readonly rule: string;
  readonly repository: string;
  readonly credentials: UpstreamCredentials | undefined;
  readonly signal: AbortSignal;
  readonly platforms: readonly Platform[];
  readonly warmedPlatforms: string[];
  readonly manifests: Tally;
  /** Every config and layer of the warmed manifests, once each. */
  readonly blobs: Map<string, Descriptor>;
  readonly errors: string[];
}

async function warmImage(options: WarmOptions, image: string, signal: AbortSignal): Promise<ImageReport> {
  const target = warmTarget(options.config, image);
  const empty = { platforms: [], manifests: { count: 0, cached: 0, filled: 0 }, blobs: { count: 0, bytes: 0, cached: 0, filled: 0 } };
  if (target.kind === 'skip') {
    const status = target.invalid ? 'failed' : 'skipped';
    return { image, status, rule: target.rule, repository: null, reference: null, reason: target.reason, detail: target.detail, digest: null, ...empty, errors: target.invalid ? [target.detail] : [] };
  }
  const report = (digest: string | null, work: Pick<ImageWork, 'warmedPlatforms' | 'manifests' | 'errors'>, blobs: ImageReport['blobs']): ImageReport => ({
    image,
    status: work.errors.length > 0 ? 'failed' : 'warmed',
    rule: target.rule,
    repository: target.repository,
    reference: target.reference,
    digest,
    platforms: work.warmedPlatforms,
    manifests: work.manifests,
    blobs,
    errors: work.errors,
  });
  let credentials: UpstreamCredentials | undefined;
  try {
    const upstream = options.rules.get(target.rule);
    if (!upstream) throw new Error(`no rule "${target.rule}" in the running configuration`);
    credentials = upstream.upstreamCredentials();
  } catch (error) {
    return report(null, { warmedPlatforms: [], manifests: empty.manifests, errors: [`cannot read the upstream credentials of rule "${target.rule}": ${(error as Error).message}`] }, empty.blobs);
  }
  const work: ImageWork = {
    content: options.content,
    rule: target.rule,
    repository: target.repository,
    credentials,
    signal,
    platforms: options.platforms ?? [],
    warmedPlatforms: [],
    manifests: { count: 0, cached: 0, filled: 0 },
    blobs: new Map(),
    errors: [],
  };
  const digest = await warmManifest(work, target.reference, target.byDigest, 0);
  const blobs = { count: work.blobs.size, bytes: 0, cached: 0, filled: 0 };
  for (const blob of work.blobs.values()) blobs.bytes += blob.size;
  await eachAtMost([...work.blobs.values()], options.concurrency ?? WARM_BLOB_CONCURRENCY, async (blob) => {
    try {
      const outcome = await warmBlob(work, blob.digest);
      blobs[outcome]++;
    } catch (error) {
      work.errors.push(`blob ${blob.digest}: ${messageOf(error)}`);
    }
  });
  return report(digest, work, blobs);
}

/** Memory for one manifest: whatever a manifest may take (the source refuses larger ones itself),
 * and so for a fetch it starts. A warm-up serves no client: there is no client's share to count. */
const manifestAllowance: DetachedBufferAllowance = {
  reserve(bytes) {
    if (bytes > MANIFEST_LIMIT_BYTES) throw new ContentError('invalid', `manifest is larger than ${MANIFEST_LIMIT_BYTES} bytes`, { status: 502 });
  },
  resize(bytes) {
    manifestAllowance.reserve(bytes);
  },
  detached: () => manifestAllowance,
  release() {},
};

/**
 * Fetches a manifest (stored as it passes), then the child manifests of an index for the platforms
 * asked for, collecting the blobs of every image manifest. The manifest's digest, or null when it
 * could not be fetched (the error is in `work.errors`).
 */
async function warmManifest(work: ImageWork, reference: string, byDigest: boolean, depth: number): Promise<string | null> {
  let body: Buffer;
  let digest: string;
  let mediaType: string | undefined;
  try {
    if (work.signal.aborted) throw new Error('warm-up aborted');
    const answer = await work.content.manifest({ rule: work.rule, repository: work.repository, method: 'GET', credentials: work.credentials, signal: work.signal, reference, byDigest, accept: undefined, buffers: manifestAllowance });
    work.manifests.count++;
    countOutcome(work.manifests, answer.cache, answer.warning);
    if (!answer.body) throw new Error('the source answered without a body');
    body = answer.body;
    digest = answer.digest;
    mediaType = answer.mediaType;
  } catch (error) {
    work.errors.push(`manifest ${reference}: ${messageOf(error)}`);
    return null;
  }
  const document = parseManifestDocument(body, mediaType);
  if (document.kind === 'invalid') {
    work.errors.push(`manifest ${digest}: ${document.error}`);
  } else if (document.kind === 'image') {
    for (const blob of [document.config, ...document.layers]) work.blobs.set(blob.digest, blob);
  } else if (depth >= INDEX_DEPTH_MAX) {
    work.errors.push(`manifest ${digest}: indexes nested deeper than ${INDEX_DEPTH_MAX} levels are not followed`);
  } else {
    const { selected, missing } = selectManifests(document.manifests, work.platforms);
    for (const platform of missing) work.errors.push(`manifest ${digest}: the index has no ${formatPlatform(platform)} manifest`);
    for (const entry of selected) {
      if ((await warmManifest(work, entry.digest, true, depth + 1)) !== null && entry.platform) {
        const name = formatPlatform(entry.platform);
        if (!work.warmedPlatforms.includes(name)) work.warmedPlatforms.push(name);
      }
    }
  }
  return digest;
}

/**
 * Stores one blob: a HEAD says whether the store has it already (without reading it); otherwise a
 * GET whose body is read to the end, which completes the fill.
 */
async function warmBlob(work: ImageWork, digest: string): Promise<'cached' | 'filled'> {
  if (work.signal.aborted) throw new Error('warm-up aborted');
  const request = { rule: work.rule, repository: work.repository, credentials: work.credentials, signal: work.signal, digest, range: undefined };
  const head = await work.content.blob({ ...request, method: 'HEAD' });
  head.body?.destroy();
  if (head.cache === 'hit') return 'cached';
  const answer = await work.content.blob({ ...request, method: 'GET' });
  if (!answer.body) throw new Error(`the source answered ${answer.status} without a body`);
  await drain(answer.body, work.signal);
  const outcome = outcomeOf(answer.cache);
  // The body ends as soon as the blob is verified; it is stored (flushed, renamed, linked) after.
  if (answer.stored && !(await answer.stored)) throw new Error('not stored: the fill failed after the blob was read (see the log)');
  return outcome;
}

/** What a cache outcome means for a warm-up: stored before, stored now, or not stored at all. */
function outcomeOf(cache: CacheOutcome | undefined, warning?: string): 'cached' | 'filled' {
  if (cache === 'hit') return 'cached';
  if (cache === 'miss') return 'filled';
  if (cache === 'stale') throw new Error(`the upstream could not confirm the tag; the cache holds what it last named (${warning ?? 'stale'})`);
  throw new Error('not stored: the cache takes nothing more now (no room under cache.maxBytes, or its disk is below cache.minFreeBytes)');
}

function countOutcome(tally: Tally, cache: CacheOutcome | undefined, warning: string | undefined): void {
  tally[outcomeOf(cache, warning)]++;
}

/** Reads a body to its end (the bytes are dropped); rejects when it fails or `signal` aborts. */
export function drain(body: ContentBody, signal: AbortSignal): Promise<number> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) {
      body.destroy(new Error('warm-up aborted'));
      reject(new Error('warm-up aborted'));
      return;
    }
    let bytes = 0;
    let settled = false;
    const settle = (error?: Error) => {
      if (settled) return;
      settled = true;
      signal.removeEventListener('abort', onAbort);
      if (error) reject(error);
      else resolve(bytes);
    };
    const onAbort = () => {
      const error = new Error('warm-up aborted');
      body.destroy(error);
      settle(error);
    };
    signal.addEventListener('abort', onAbort, { once: true });
    body.attach({
      data(chunk) {
        bytes += chunk.length;
        return true;
      },
      end: () => settle(),
      error: (error) => settle(error),
    });
  });
}

/** Runs `work` over `items`, at most `limit` at a time; `work` must not reject. */
async function eachAtMost<T>(items: readonly T[], limit: number, work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const item = items[next++] as T;
      await work(item);
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
