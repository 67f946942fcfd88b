// A RegistryView in front of another: answers kept in a bounded LRU (entries and bytes) for as long
// as the pure policy below says, and identical questions asked at once share one call.
//
// Keys name everything an answer depends on: the namespace for reads made with its authorization (a
// rule's namespace filter may refuse one and admit another), never for the anonymous probe.

import type { BlobAnswer, ManifestAnswer, ProbeAnswer, ReferrersAnswer, RegistryView } from '../rules/registryview.js';

export interface ViewCachePolicy {
  /** A probe answered 200 (public) or 401/403 (private), per (rule, repository). */
  readonly visibilityMs: number;
  /** A probe that failed or answered otherwise (404, 5xx …), per reference: briefly, so that a stalled
   * upstream does not hold every admission for the whole deadline. 0: not kept. */
  readonly probeFailureMs: number;
  /** A manifest found by tag, and a referrers list (a tag can move, a signature can be added). */
  readonly tagMs: number;
  /** A manifest found by digest, and a blob: content-addressed, only authorization can change. */
  readonly digestMs: number;
  /** A refusal (401, 403, 404 of a manifest or blob). */
  readonly refusalMs: number;
  readonly maxEntries: number;
  readonly maxBytes: number;
}

export const DEFAULT_VIEW_CACHE_POLICY: ViewCachePolicy = {
  visibilityMs: 5 * 60_000,
  probeFailureMs: 5_000,
  tagMs: 30_000,
  digestMs: 60 * 60_000,
  refusalMs: 10_000,
  maxEntries: 10_000,
  maxBytes: 32 * 1024 * 1024,
};

const isDigest = (reference: string) => reference.includes(':');

/** How long an answer is kept (0: not at all). Pure. */
export function keepFor(question: { readonly kind: 'probe' } | { readonly kind: 'manifest'; readonly reference: string } | { readonly kind: 'blob' } | { readonly kind: 'referrers' }, answer: ProbeAnswer | ManifestAnswer | BlobAnswer | ReferrersAnswer, policy: ViewCachePolicy): number {
  if (answer.kind === 'failed') return question.kind === 'probe' ? policy.probeFailureMs : 0;
  switch (question.kind) {
    case 'probe':
      return answer.kind === 'answered' && [200, 401, 403].includes(answer.status) ? policy.visibilityMs : policy.probeFailureMs;
    case 'manifest':
      return answer.kind === 'found' ? (isDigest(question.reference) ? policy.digestMs : policy.tagMs) : policy.refusalMs;
    case 'blob':
      return answer.kind === 'found' ? policy.digestMs : policy.refusalMs;
    case 'referrers':
      return answer.kind === 'refused' ? policy.refusalMs : policy.tagMs;
  }
}

/** What an answer costs in memory: its bytes and a fixed overhead for the entry. */
function cost(key: string, answer: ProbeAnswer | ManifestAnswer | BlobAnswer | ReferrersAnswer): number {
  const bytes = 'body' in answer && answer.body ? answer.body.length : 'index' in answer ? answer.index.length : 0;
  return key.length * 2 + bytes + 256;
}

interface Entry<T> {
  readonly answer: T;
  readonly expiresAt: number;
  readonly cost: number;
}

/** A Map kept in use order, bounded by entries and bytes; expired entries are dropped when met. */
export class BoundedLru<T> {
  private readonly entries = new Map<string, Entry<T>>();
  private bytes = 0;

  constructor(
    private readonly maxEntries: number,
    private readonly maxBytes: number,
    private readonly now: () => number = Date.now,
  ) {}

  get size(): number {
    return this.entries.size;
  }

  get totalBytes(): number {
    return this.bytes;
  }

  get(key: string): T | undefined {
    const entry = this.entries.get(key);
    if (!entry) return undefined;
    this.entries.delete(key);
    if (entry.expiresAt <= this.now()) {
      this.bytes -= entry.cost;
      return undefined;
    }
    this.entries.set(key, entry);
    return entry.answer;
  }

  set(key: string, answer: T, ttlMs: number, bytes: number): void {
    this.delete(key);
    if (ttlMs <= 0 || bytes > this.maxBytes) return;
    this.entries.set(key, { answer, expiresAt: this.now() + ttlMs, cost: bytes });
    this.bytes += bytes;
    for (const [oldest, entry] of this.entries) {
      if (this.entries.size <= this.maxEntries && this.bytes <= this.maxBytes) break;
      this.entries.delete(oldest);
      this.bytes -= entry.cost;
    }
  }

  delete(key: string): void {
    const entry = this.entries.get(key);
    if (!entry) return;
    this.entries.delete(key);
    this.bytes -= entry.cost;
  }
}

type Answer = ProbeAnswer | ManifestAnswer | BlobAnswer | ReferrersAnswer;

interface Flight {
  readonly promise: Promise<Answer>;
  readonly controller: AbortController;
  waiters: number;
}

export class CachedRegistryView implements RegistryView {
  private readonly cache: BoundedLru<Answer>;
  private readonly flights = new Map<string, Flight>();

  constructor(
    private readonly inner: RegistryView,
    private readonly policy: ViewCachePolicy = DEFAULT_VIEW_CACHE_POLICY,
    now: () => number = Date.now,
  ) {
    this.cache = new BoundedLru(policy.maxEntries, policy.maxBytes, now);
  }

  /** Entries and bytes held (for metrics and tests). */
  stats(): { entries: number; bytes: number } {
    return { entries: this.cache.size, bytes: this.cache.totalBytes };
  }

  async probeAnonymous(target: Parameters<RegistryView['probeAnonymous']>[0], signal: AbortSignal): Promise<ProbeAnswer> {
    // The decisive answers (public, private) hold for the repository; the others for the reference asked.
    const repositoryKey = `probe\u0000${target.rule}\u0000${target.repository}`;
    const referenceKey = `${repositoryKey}\u0000${target.reference}`;
    const known = (this.cache.get(repositoryKey) ?? this.cache.get(referenceKey)) as ProbeAnswer | undefined;
    if (known) return known;
    return this.shared(referenceKey, signal, (s) => this.inner.probeAnonymous(target, s), (answer) => {
      const decisive = answer.kind === 'answered' && [200, 401, 403].includes(answer.status);
      this.store(decisive ? repositoryKey : referenceKey, answer, keepFor({ kind: 'probe' }, answer, this.policy));
    }) as Promise<ProbeAnswer>;
  }

  async manifest(target: Parameters<RegistryView['manifest']>[0], signal: AbortSignal): Promise<ManifestAnswer> {
    const base = `manifest\u0000${target.namespace}\u0000${target.rule}\u0000${target.repository}\u0000${target.reference}`;
    const got = this.cache.get(`${base}\u0000GET`) as ManifestAnswer | undefined;
    if (got) return target.method === 'HEAD' && got.kind === 'found' ? { kind: 'found', digest: got.digest, mediaType: got.mediaType } : got;
    if (target.method === 'HEAD') {
      const head = this.cache.get(`${base}\u0000HEAD`) as ManifestAnswer | undefined;
      if (head) return head;
    }
    const key = `${base}\u0000${target.method}`;
    return this.shared(key, signal, (s) => this.inner.manifest(target, s), (answer) => this.store(key, answer, keepFor({ kind: 'manifest', reference: target.reference }, answer, this.policy))) as Promise<ManifestAnswer>;
  }

  async blob(target: Parameters<RegistryView['blob']>[0], signal: AbortSignal): Promise<BlobAnswer> {
    const key = `blob\u0000${target.namespace}\u0000${target.rule}\u0000${target.repository}\u0000${target.digest}`;
    const known = this.cache.get(key) as BlobAnswer | undefined;
    // A found blob answers any later limit it fits; a refusal was for its own limit only.
    if (known?.kind === 'found' && known.body.length <= target.maxBytes) return known;
    if (known?.kind === 'found') return { kind: 'refused', status: 413, error: `the blob is larger than ${target.maxBytes} bytes` };
    const flightKey = `${key}\u0000${target.maxBytes}`;
    return this.shared(flightKey, signal, (s) => this.inner.blob(target, s), (answer) => {
      if (answer.kind === 'found') this.store(key, answer, keepFor({ kind: 'blob' }, answer, this.policy));
    }) as Promise<BlobAnswer>;
  }

  async referrers(target: Parameters<RegistryView['referrers']>[0], signal: AbortSignal): Promise<ReferrersAnswer> {
    const key = `referrers\u0000${target.namespace}\u0000${target.rule}\u0000${target.repository}\u0000${target.digest}\u0000${target.artifactType ?? ''}`;
    const known = this.cache.get(key) as ReferrersAnswer | undefined;
    if (known) return known;
    return this.shared(key, signal, (s) => this.inner.referrers(target, s), (answer) => this.store(key, answer, keepFor({ kind: 'referrers' }, answer, this.policy))) as Promise<ReferrersAnswer>;
  }

  private store(key: string, answer: Answer, ttlMs: number): void {
    this.cache.set(key, answer, ttlMs, cost(key, answer));
  }

  /**
   * One call for every identical question in flight. Each caller waits on its own signal; the call
   * is aborted only when every caller has given up.
   */
  private shared(key: string, signal: AbortSignal, call: (signal: AbortSignal) => Promise<Answer>, keep: (answer: Answer) => void): Promise<Answer> {
    let flight = this.flights.get(key);
    if (!flight) {
      const controller = new AbortController();
      const promise = call(controller.signal).then((answer) => {
        // An answer to a question everyone gave up on says nothing about the upstream.
        if (!controller.signal.aborted) keep(answer);
        return answer;
      });
      const started: Flight = { promise, controller, waiters: 0 };
      void promise.finally(() => {
        if (this.flights.get(key) === started) this.flights.delete(key);
      }).catch(() => undefined);
      this.flights.set(key, started);
      flight = started;
    }
    const joined = flight;
    joined.waiters++;
    return new Promise<Answer>((resolve, reject) => {
      const leave = () => {
        signal.removeEventListener('abort', onAbort);
        joined.waiters--;
      };
      const onAbort = () => {
        leave();
        if (joined.waiters === 0) {
          // Nobody waits any more: the call stops, and a question asked later gets a call of its own.
          joined.controller.abort();
          if (this.flights.get(key) === joined) this.flights.delete(key);
        }
        resolve({ kind: 'failed', error: 'the admission gave up waiting for the answer' });
      };
      if (signal.aborted) {
        onAbort();
        return;
      }
      signal.addEventListener('abort', onAbort, { once: true });
      joined.promise.then(
        (answer) => {
          leave();
          resolve(answer);
        },
        (error: unknown) => {
          leave();
          reject(error instanceof Error ? error : new Error(String(error)));
        },
      );
    });
  }
}
