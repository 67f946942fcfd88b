// The webhook's RegistryView: every question goes to a proxy's admission endpoints on its operations
// port (src/proxy/server.ts serves them), which answer through the rule's transport, credentials and
// the node cache. The webhook holds neither: it presents the resolver token (derived from the broker
// key) and the namespace's own pull credential (derived likewise), as a Pod's pull would.
//
// Which proxy: rendezvous hashing of rule/repository over the endpoints known now, so that one
// repository's answers come from one node's cache; the next in that order when a proxy does not
// answer. Every question is bounded by one deadline, failover included.

import { createHash } from 'node:crypto';
import { Agent, request, type Dispatcher } from 'undici';
import type { BlobAnswer, ManifestAnswer, ProbeAnswer, ReferrersAnswer, RegistryTarget, RegistryView } from '../rules/registryview.js';
import { MANIFEST_ACCEPT } from '../content/passthrough.js';

/** Connections one webhook process keeps to one proxy. Fits the per-source limit of the proxy's
 * operations port (8) and of its collector listener (COLLECTOR_MAX_CONNECTIONS_PER_SOURCE). */
export const RESOLVER_CONNECTIONS_PER_PROXY = 8;
/**
 * One question's deadline, failover included, unless the caller's signal ends it sooner. The
 * apiserver waits webhook.timeoutSeconds (the chart's default 5 s) for the whole admission, which may
 * ask several questions (probe, manifest, signature) and provision a Secret: the chart passes 40% of
 * that timeout, and the admission's own signal bounds the sum.
 */
export const DEFAULT_RESOLVER_DEADLINE_MS = 2_000;
/** A proxy that does not accept the connection this soon is skipped for the next. */
const CONNECT_TIMEOUT_MS = 1_000;
/** Manifests are at most 4 MiB (distribution's limit); the JSON answers are far smaller. */
const MANIFEST_LIMIT_BYTES = 4 * 1024 * 1024;
/** A referrers answer: a 1 MiB index, base64 in JSON. */
const REFERRERS_ANSWER_LIMIT_BYTES = 2 * 1024 * 1024;
const SMALL_ANSWER_LIMIT_BYTES = 64 * 1024;

/**
 * `endpoints` in the order a repository asks them: highest rendezvous score of `key` and the
 * endpoint first. Pure. Adding or removing a proxy moves only the keys it wins or held.
 */
export function rendezvousOrder(key: string, endpoints: readonly string[]): string[] {
  const score = (endpoint: string) => createHash('sha256').update(`${key}\u0000${endpoint}`).digest().readBigUInt64BE(0);
  return [...new Set(endpoints)].map((endpoint) => ({ endpoint, score: score(endpoint) })).sort((a, b) => (a.score === b.score ? 0 : a.score > b.score ? -1 : 1)).map((e) => e.endpoint);
}

/** How long a proxy that stalled or refused the connection is asked only after the others. */
export const PROXY_COOLDOWN_MS = 30_000;

/**
 * `order` with the proxies still cooling down (until a time after `now`) moved last, each group in
 * its own order. Pure. A stalled proxy would otherwise keep taking the first share of every
 * question's deadline for the repositories it wins.
 */
export function orderAfterCooldown(order: readonly string[], coolingUntil: ReadonlyMap<string, number>, now: number): string[] {
  const cooling = (endpoint: string) => (coolingUntil.get(endpoint) ?? 0) > now;
  return [...order.filter((e) => !cooling(e)), ...order.filter(cooling)];
}

/**
 * How long one attempt may take, of `leftMs`, when `remaining` proxies (this one included) are
 * still to ask. Pure. The last takes all that is left; a proxy in good standing half, so that a
 * stall leaves the next one time to answer; one cooling down (all of them are, then) an equal share.
 */
export function attemptShareMs(leftMs: number, remaining: number, cooling: boolean): number {
  if (remaining <= 1) return Math.max(1, leftMs);
  return Math.max(1, Math.floor(cooling ? leftMs / remaining : leftMs / 2));
}

/** Connection failures that say the proxy is not there (as opposed to an answer, or the admission giving up). */
const UNREACHABLE_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'ETIMEDOUT', 'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_SOCKET']);

export interface ProxyTierOptions {
  /** Base URLs of the proxies' operations ports (`http://10.0.0.7:9090`), as known now. */
  readonly endpoints: () => readonly string[];
  /** The resolver bearer token (opsToken of the signing key, 'resolver'). */
  readonly token: () => string;
  /** The `Basic …` pull credential of a namespace (what the webhook provisions in its pull secret). */
  readonly namespaceAuthorization: (namespace: string) => string;
  readonly deadlineMs?: number;
  /** Tests give their own; one Agent with RESOLVER_CONNECTIONS_PER_PROXY per proxy otherwise. */
  readonly dispatcher?: Dispatcher;
  /** Told of every attempt on one proxy: for the webhook's metrics. */
  readonly onAttempt?: (attempt: ProxyAttempt) => void;
}

/** One question to one proxy: how it ended, and whether another proxy was asked after it. */
export interface ProxyAttempt {
  readonly kind: 'probe' | 'manifest' | 'blob' | 'referrers';
  readonly outcome: 'answered' | 'unavailable' | 'stalled' | 'unreachable' | 'gave-up';
  readonly seconds: number;
}

type Reply = Dispatcher.ResponseData;

/** What one proxy's answer means: an answer to return, or a reason to ask the next proxy. */
type Outcome<T> = { readonly answer: T } | { readonly next: string };

const failed = (error: string) => ({ kind: 'failed' as const, error });

/** The body, at most `limit` bytes; null (and the connection's body dropped) when it is larger. */
async function readBounded(reply: Reply, limit: number): Promise<Buffer | null> {
  const declared = Number(reply.headers['content-length']);
  if (Number.isFinite(declared) && declared > limit) {
    reply.body.destroy();
    return null;
  }
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of reply.body as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) {
      reply.body.destroy();
      return null;
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks, size);
}

/** The message of a registry error document, or of a plain-text answer. */
function errorText(body: Buffer | null, status: number): string {
  if (body === null || body.length === 0) return `the proxy answered ${status}`;
  const text = body.toString('utf8');
  try {
    const parsed = JSON.parse(text) as { errors?: Array<{ message?: unknown }>; error?: unknown };
    const message = parsed.errors?.[0]?.message ?? parsed.error;
    if (typeof message === 'string') return message;
  } catch {
    // not JSON: the text itself
  }
  return text.trim().slice(0, 300);
}

const header = (reply: Reply, name: string): string | undefined => {
  const value = reply.headers[name];
  return Array.isArray(value) ? value[0] : value;
};

const sha256 = (bytes: Buffer) => `sha256:${createHash('sha256').update(bytes).digest('hex')}`;

export class ProxyTierView implements RegistryView {
  private readonly dispatcher: Dispatcher;
  private readonly deadlineMs: number;
  /** Proxies that stalled or refused the connection, until when they are asked last. */
  private readonly coolingUntil = new Map<string, number>();

  constructor(private readonly options: ProxyTierOptions) {
    this.deadlineMs = options.deadlineMs ?? DEFAULT_RESOLVER_DEADLINE_MS;
    this.dispatcher = options.dispatcher ?? new Agent({ connections: RESOLVER_CONNECTIONS_PER_PROXY, connect: { timeout: CONNECT_TIMEOUT_MS }, keepAliveTimeout: 30_000 });
  }

  async close(): Promise<void> {
    if (!this.options.dispatcher) await this.dispatcher.close();
  }

  probeAnonymous(target: RegistryTarget & { readonly reference: string }, signal: AbortSignal): Promise<ProbeAnswer> {
    return this.ask<ProbeAnswer>('probe', target, 'GET', `/admission/probe/v2/${target.rule}/${target.repository}/manifests/${target.reference}`, {}, signal, async (reply) => {
      const body = await readBounded(reply, SMALL_ANSWER_LIMIT_BYTES);
      if (reply.statusCode === 200 && body !== null) {
        const parsed = JSON.parse(body.toString('utf8')) as { status?: unknown };
        if (typeof parsed.status === 'number') return { answer: { kind: 'answered', status: parsed.status } };
      }
      return { answer: failed(errorText(body, reply.statusCode)) };
    });
  }

  manifest(target: RegistryTarget & { readonly reference: string; readonly namespace: string; readonly method: 'HEAD' | 'GET' }, signal: AbortSignal): Promise<ManifestAnswer> {
    return this.ask<ManifestAnswer>('manifest', target, target.method, `/admission/v2/${target.rule}/${target.repository}/manifests/${target.reference}`, { accept: MANIFEST_ACCEPT, ...this.namespaceHeader(target.namespace) }, signal, async (reply) => {
      let body: Buffer | null = null;
      if (target.method === 'GET' || reply.statusCode !== 200) body = await readBounded(reply, MANIFEST_LIMIT_BYTES);
      else await reply.body.dump();
      if (reply.statusCode !== 200) return { answer: refusedOrFailed(reply.statusCode, body) };
      const digest = header(reply, 'docker-content-digest') ?? (body ? sha256(body) : '');
      if (target.method === 'GET' && body === null) return { answer: failed(`the manifest is larger than ${MANIFEST_LIMIT_BYTES} bytes`) };
      if (body && digest.startsWith('sha256:') && sha256(body) !== digest) return { answer: failed(`the manifest's bytes do not hash to ${digest}`) };
      if (!/^sha256:[0-9a-f]{64}$/.test(digest)) return { answer: failed('the proxy answered without a manifest digest') };
      return { answer: { kind: 'found', digest, mediaType: header(reply, 'content-type') ?? '', ...(body ? { body } : {}) } };
    });
  }

  blob(target: RegistryTarget & { readonly digest: string; readonly namespace: string; readonly maxBytes: number }, signal: AbortSignal): Promise<BlobAnswer> {
    return this.ask<BlobAnswer>('blob', target, 'GET', `/admission/v2/${target.rule}/${target.repository}/blobs/${target.digest}`, { 'x-pullbridge-max-bytes': String(target.maxBytes), ...this.namespaceHeader(target.namespace) }, signal, async (reply) => {
      if (reply.statusCode !== 200) return { answer: refusedOrFailed(reply.statusCode, await readBounded(reply, SMALL_ANSWER_LIMIT_BYTES)) };
      const body = await readBounded(reply, target.maxBytes);
      if (body === null) return { answer: { kind: 'refused', status: 413, error: `the blob is larger than ${target.maxBytes} bytes` } };
      if (target.digest.startsWith('sha256:') && sha256(body) !== target.digest) return { answer: failed(`the blob's bytes do not hash to ${target.digest}`) };
      return { answer: { kind: 'found', body } };
    });
  }

  referrers(target: RegistryTarget & { readonly digest: string; readonly namespace: string; readonly artifactType?: string }, signal: AbortSignal): Promise<ReferrersAnswer> {
    const query = target.artifactType !== undefined ? `?artifactType=${encodeURIComponent(target.artifactType)}` : '';
    return this.ask<ReferrersAnswer>('referrers', target, 'GET', `/admission/v2/${target.rule}/${target.repository}/referrers/${target.digest}${query}`, this.namespaceHeader(target.namespace), signal, async (reply) => {
      const body = await readBounded(reply, REFERRERS_ANSWER_LIMIT_BYTES);
      if (reply.statusCode !== 200) return { answer: refusedOrFailed(reply.statusCode, body) };
      if (body === null) return { answer: failed('the referrers answer is too large') };
      const parsed = JSON.parse(body.toString('utf8')) as { kind?: unknown; index?: unknown };
      if (parsed.kind === 'unsupported') return { answer: { kind: 'unsupported' } };
      if (parsed.kind === 'found' && typeof parsed.index === 'string') return { answer: { kind: 'found', index: Buffer.from(parsed.index, 'base64') } };
      return { answer: failed('the proxy answered an unknown referrers document') };
    });
  }

  private namespaceHeader(namespace: string): Record<string, string> {
    return { 'x-pullbridge-namespace-authorization': this.options.namespaceAuthorization(namespace) };
  }

  /**
   * Asks the proxies in rendezvous order of rule/repository until one answers, within the deadline.
   * Not answering (no connection, the attempt's time up, 503 not ready, 429 busy) moves to the next;
   * the first of several gets half the time left, so a stalled proxy leaves the next time to answer.
   * A proxy that stalled or refused the connection is asked last for PROXY_COOLDOWN_MS.
   */
  private async ask<T extends { readonly kind: string }>(kind: ProxyAttempt['kind'], target: RegistryTarget, method: 'GET' | 'HEAD', path: string, headers: Record<string, string>, signal: AbortSignal, interpret: (reply: Reply) => Promise<Outcome<T>>): Promise<T | { kind: 'failed'; error: string }> {
    const end = Date.now() + this.deadlineMs;
    const overall = timeoutSignal(this.deadlineMs);
    const deadline = AbortSignal.any([signal, overall.signal]);
    try {
      for (const [endpoint, until] of this.coolingUntil) if (until <= Date.now()) this.coolingUntil.delete(endpoint);
      const order = orderAfterCooldown(rendezvousOrder(`${target.rule}/${target.repository}`, this.options.endpoints()), this.coolingUntil, Date.now());
      if (order.length === 0) return failed('no proxy to ask: none is known yet (discovery) or configured (--resolver-url)');
      const reasons: string[] = [];
      for (let i = 0; i < order.length && !deadline.aborted; i++) {
        const base = order[i] ?? '';
        const started = Date.now();
        const cooling = (this.coolingUntil.get(base) ?? 0) > started;
        const share = attemptShareMs(end - started, order.length - i, cooling);
        const shareTimer = order.length - i > 1 ? timeoutSignal(share) : undefined;
        const attempt = shareTimer ? AbortSignal.any([deadline, shareTimer.signal]) : deadline;
        const report = (outcome: ProxyAttempt['outcome']) => this.options.onAttempt?.({ kind, outcome, seconds: (Date.now() - started) / 1000 });
        try {
          const reply = await request(`${base}${path}`, { method, headers: { ...headers, authorization: `Bearer ${this.options.token()}` }, signal: attempt, dispatcher: this.dispatcher });
          this.coolingUntil.delete(base);
          if (reply.statusCode === 503 || reply.statusCode === 429) {
            reasons.push(`${base}: ${errorText(await readBounded(reply, SMALL_ANSWER_LIMIT_BYTES), reply.statusCode)}`);
            report('unavailable');
            continue;
          }
          if (refusedToken(reply)) {
            // The operations port refused the token itself (a proxy with other broker keys): not an answer about the image.
            reasons.push(`${base}: ${errorText(await readBounded(reply, SMALL_ANSWER_LIMIT_BYTES), reply.statusCode)} (do the proxy and the webhook hold the same broker key?)`);
            report('unavailable');
            continue;
          }
          const outcome = await interpret(reply);
          report('answered');
          if ('answer' in outcome) return outcome.answer;
          reasons.push(`${base}: ${outcome.next}`);
        } catch (error) {
          const cause = (error as { cause?: { code?: string } }).cause?.code ?? (error as { code?: string }).code;
          if (signal.aborted) {
            reasons.push(`${base}: the admission gave up`);
            report('gave-up');
          } else if (attempt.aborted) {
            // Its time share ran out: stalled (or too slow to be asked first for a while).
            this.coolingUntil.set(base, Date.now() + PROXY_COOLDOWN_MS);
            reasons.push(`${base}: no answer in time`);
            report('stalled');
          } else {
            if (cause !== undefined && UNREACHABLE_CODES.has(cause)) this.coolingUntil.set(base, Date.now() + PROXY_COOLDOWN_MS);
            reasons.push(`${base}: ${cause ?? (error as Error).message}`);
            report('unreachable');
          }
        } finally {
          shareTimer?.clear();
        }
      }
      if (deadline.aborted && reasons.length < order.length) reasons.push(`no answer within ${this.deadlineMs} ms`);
      return failed(reasons.join('; '));
    } finally {
      overall.clear();
    }
  }
}

/**
 * Whether the operations port refused the resolver token (its own plain-text 401/403), as opposed
 * to the registry shell refusing the namespace or the upstream refusing the rule (registry errors,
 * JSON): only the former is the proxy's problem, and worth asking another about.
 */
function refusedToken(reply: Reply): boolean {
  const type = header(reply, 'content-type') ?? '';
  return (reply.statusCode === 401 || reply.statusCode === 403) && type.startsWith('text/plain');
}

/** A proxy's answer other than 200: 5xx (and a 502 the proxy made of an upstream failure) is no
 * answer; anything else is a refusal, with the registry error's message. */
function refusedOrFailed(status: number, body: Buffer | null): { kind: 'refused'; status: number; error: string } | { kind: 'failed'; error: string } {
  const error = errorText(body, status);
  return status >= 500 ? failed(error) : { kind: 'refused', status, error };
}

/**
 * A signal that aborts after `ms`, held by its own timer until `clear`. Not AbortSignal.timeout:
 * inside AbortSignal.any() nothing else holds that signal, and Node 20 may collect it before it
 * fires (nodejs/node#57736), leaving a request to a stalled proxy without a deadline.
 */
function timeoutSignal(ms: number): { readonly signal: AbortSignal; readonly clear: () => void } {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(new DOMException(`no answer within ${ms} ms`, 'TimeoutError')), ms);
  timer.unref();
  return { signal: controller.signal, clear: () => clearTimeout(timer) };
}
