// verify enforced where every pull passes: before the proxy serves a manifest of a rule and
// repository with a signature requirement (src/rules/verifypolicy.ts), the manifest's digest must
// carry a cosign signature one of the requirement's keys verifies. Admission can be skipped (an
// UPDATE, another spelling of the proxy host, the opt-out label, failurePolicy Ignore, another rule's
// path); this cannot. The signatures are read through the proxy's own content source (node cache,
// shared tier, the rule's transport and credentials), as the webhook reads them through the
// admission endpoints, and checked by the same code (src/content/signatures.ts).
//
// Multi-arch: cosign signs the index; a child manifest fetched by digest is served when a verified
// index of the same rule and repository lists it. Blobs are not gated: content-addressed, a runtime
// needs a served manifest to name them.

import { parseManifestDocument } from '../cache/warmplan.js';
import { MANIFEST_ACCEPT } from '../content/passthrough.js';
import { cosignKeyReader, verifyCosignSignature, type SignatureVerdict, type SignatureView } from '../content/signatures.js';
import { ContentError, type ContentSource, type DetachedBufferAllowance, type ManifestResult } from '../content/source.js';
import type { Config } from '../rules/config.js';
import type { BlobAnswer, ManifestAnswer, ReferrersAnswer } from '../rules/registryview.js';
import { verifyRequirement } from '../rules/verifypolicy.js';
import { isSignatureOnlyManifest } from '../signature/cosign.js';
import type { UpstreamCredentials } from '../upstream/authorizer.js';
import type { RuleUpstream } from '../upstream/rule.js';

/** A verified digest is served without another check this long. */
export const VERIFIED_TTL_MS = 10 * 60_000;
/** An unsigned or rejected digest is refused without another check this long: a signature pushed
 * later is taken up soon after. Fetch failures are never remembered. */
export const REFUSED_TTL_MS = 30_000;
/** Verdicts remembered, and children of verified indexes: the oldest are forgotten first. */
export const VERDICTS_MAX = 4096;
export const CHILDREN_MAX = 16_384;
/** One check (every signature fetch of it) may take this long; clients waiting share it. */
const CHECK_TIMEOUT_MS = 30_000;
/** The largest referrers index read (as the admission endpoint reads it). */
const REFERRERS_LIMIT_BYTES = 1024 * 1024;
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';

export type GateVerdict = { readonly allowed: true; readonly via?: 'signature' | 'index' | 'signature-manifest' } | { readonly allowed: false; readonly kind: 'unsigned' | 'rejected' | 'unavailable'; readonly reason: string };

export interface GateOptions {
  readonly now?: () => number;
  readonly verifiedTtlMs?: number;
  readonly refusedTtlMs?: number;
}

interface ManifestCheck {
  readonly rr: RuleUpstream;
  readonly repository: string;
  readonly manifest: Pick<ManifestResult, 'digest' | 'mediaType' | 'body'>;
  /** What the content source is asked with: the rule's upstream credentials (the client's in passthrough). */
  readonly credentials: UpstreamCredentials | undefined;
  /** Memory for the signature reads, held until the check is done (it may outlive the client). */
  readonly buffers: () => DetachedBufferAllowance;
}

/** A map that forgets its oldest entries past `max`, and each entry after its time. */
class Expiring<T> {
  private readonly entries = new Map<string, { readonly value: T; readonly until: number }>();
  constructor(
    private readonly max: number,
    private readonly now: () => number,
  ) {}
  get(key: string): T | undefined {
    const entry = this.entries.get(key);
    if (entry === undefined) return undefined;
    if (entry.until > this.now()) return entry.value;
    this.entries.delete(key);
    return undefined;
  }
  set(key: string, value: T, ttlMs: number): void {
    this.entries.delete(key);
    this.entries.set(key, { value, until: this.now() + ttlMs });
    while (this.entries.size > this.max) {
      const oldest = this.entries.keys().next();
      if (oldest.done === true) break;
      this.entries.delete(oldest.value);
    }
  }
}

/** The signature gate of one proxy runtime (one config): a new config starts with no verdicts. */
export class VerifyGate {
  private readonly now: () => number;
  private readonly verifiedTtlMs: number;
  private readonly refusedTtlMs: number;
  private readonly verdicts: Expiring<GateVerdict>;
  private readonly children: Expiring<true>;
  private readonly inflight = new Map<string, Promise<GateVerdict>>();
  private readonly keysFor: ReturnType<typeof cosignKeyReader>;

  constructor(
    private readonly config: Config,
    private readonly content: ContentSource,
    options: GateOptions = {},
  ) {
    this.now = options.now ?? Date.now;
    this.verifiedTtlMs = options.verifiedTtlMs ?? VERIFIED_TTL_MS;
    this.refusedTtlMs = options.refusedTtlMs ?? REFUSED_TTL_MS;
    this.verdicts = new Expiring(VERDICTS_MAX, this.now);
    this.children = new Expiring(CHILDREN_MAX, this.now);
    this.keysFor = cosignKeyReader(this.now);
  }

  /** Whether any rule asks for signatures: else the gate is never consulted. */
  get active(): boolean {
    return this.config.registries.some((r) => r.verify !== undefined);
  }

  /** Whether the manifest may be served: allowed when no signature is required of it. */
  async check(request: ManifestCheck): Promise<GateVerdict> {
    const requirement = verifyRequirement(this.config.registries, request.rr.rule, request.repository);
    if (requirement === undefined) return { allowed: true };
    // A signature is not signed itself, and runs nowhere: served, so that `cosign verify` works
    // through the proxy. (Only with its body: a HEAD of it is checked like any manifest.)
    if (request.manifest.body !== undefined && isSignatureOnlyManifest(request.manifest.body)) return { allowed: true, via: 'signature-manifest' };
    const key = `${request.rr.rule.name}\n${request.repository}\n${request.manifest.digest}`;
    const known = this.verdicts.get(key);
    if (known !== undefined) return known;
    if (this.children.get(key) !== undefined) return { allowed: true, via: 'index' };
    const running = this.inflight.get(key);
    if (running !== undefined) return running;
    const work = this.verify(request, requirement.verify.cosign.publicKeyFiles, key).finally(() => this.inflight.delete(key));
    this.inflight.set(key, work);
    return work;
  }

  private async verify(request: ManifestCheck, keyFiles: readonly string[], key: string): Promise<GateVerdict> {
    const keys = this.keysFor(keyFiles);
    if (keys instanceof Error) return { allowed: false, kind: 'unavailable', reason: `the public keys cannot be read: ${keys.message}` };
    const buffers = request.buffers();
    const signal = AbortSignal.timeout(CHECK_TIMEOUT_MS);
    try {
      const view = this.view(request.rr, request.credentials, buffers);
      const target = { rule: request.rr.rule.name, repository: request.repository };
      let verdict: SignatureVerdict;
      try {
        verdict = await verifyCosignSignature(view, target, request.manifest.digest, '', keys, signal);
      } catch (error) {
        verdict = { verified: false, kind: 'unavailable', reason: `signature fetch failed: ${(error as Error).message}` };
      }
      if (!verdict.verified) {
        const refused: GateVerdict = { allowed: false, kind: verdict.kind, reason: verdict.reason };
        if (verdict.kind !== 'unavailable') this.verdicts.set(key, refused, this.refusedTtlMs);
        return refused;
      }
      await this.rememberChildren(request, view, signal);
      const allowed: GateVerdict = { allowed: true, via: 'signature' };
      this.verdicts.set(key, allowed, this.verifiedTtlMs);
      return allowed;
    } finally {
      buffers.release();
    }
  }

  /** A verified index: its children (by digest) are served for as long as it is. */
  private async rememberChildren(request: ManifestCheck, view: SignatureView, signal: AbortSignal): Promise<void> {
    const { manifest } = request;
    let body = manifest.body;
    if (body === undefined) {
      if (manifest.mediaType !== undefined && !/index|manifest\.list/.test(manifest.mediaType)) return;
      const answer = await view.manifest({ rule: request.rr.rule.name, repository: request.repository, reference: manifest.digest, namespace: '', method: 'GET' }, signal);
      if (answer.kind !== 'found' || answer.body === undefined) return; // a child then needs its own signature
      body = answer.body;
    }
    const document = parseManifestDocument(body, manifest.mediaType);
    if (document.kind !== 'index') return;
    for (const child of document.manifests) this.children.set(`${request.rr.rule.name}\n${request.repository}\n${child.digest}`, true, this.verifiedTtlMs);
  }

  /** The RegistryView the signature check reads through: this proxy's content source, in process. */
  private view(rr: RuleUpstream, credentials: UpstreamCredentials | undefined, buffers: DetachedBufferAllowance): SignatureView {
    const content = this.content;
    const rule = rr.rule.name;
    const refusedOrFailed = (error: unknown): { kind: 'refused'; status: number; error: string } | { kind: 'failed'; error: string } => {
      if (error instanceof ContentError && ['not-found', 'unauthorized', 'denied', 'refused'].includes(error.failure)) return { kind: 'refused', status: error.details.status, error: error.message };
      return { kind: 'failed', error: (error as Error).message };
    };
    return {
      async manifest({ repository, reference, method }, signal): Promise<ManifestAnswer> {
        try {
          const found = await content.manifest({ rule, repository, method, credentials, signal, reference, byDigest: reference.includes(':'), accept: MANIFEST_ACCEPT, buffers });
          return { kind: 'found', digest: found.digest, mediaType: found.mediaType ?? '', ...(found.body !== undefined ? { body: found.body } : {}) };
        } catch (error) {
          return refusedOrFailed(error);
        }
      },
      async blob({ repository, digest, maxBytes }, signal): Promise<BlobAnswer> {
        try {
          const found = await content.blob({ rule, repository, method: 'GET', credentials, signal, digest, range: undefined });
          const declared = Number(found.headers['content-length']);
          if (Number.isFinite(declared) && declared > maxBytes) {
            found.body?.destroy(new Error('blob larger than a signature payload'));
            return { kind: 'refused', status: 413, error: `blob of ${declared} bytes, larger than ${maxBytes}` };
          }
          if (found.body === undefined) return { kind: 'failed', error: 'no body' };
          const body = await readWhole(found.body, maxBytes);
          return body === null ? { kind: 'refused', status: 413, error: `blob larger than ${maxBytes} bytes` } : { kind: 'found', body };
        } catch (error) {
          return refusedOrFailed(error);
        }
      },
      async referrers({ repository, digest, artifactType }, signal): Promise<ReferrersAnswer> {
        const query = artifactType !== undefined ? `?artifactType=${encodeURIComponent(artifactType)}` : '';
        try {
          const reply = await rr.client.fetch({ method: 'GET', path: `/v2/${repository}/referrers/${digest}${query}`, headers: { accept: OCI_INDEX }, scope: `repository:${repository}:pull`, credentials, signal, lane: 'metadata' });
          if (reply.statusCode !== 200) {
            await reply.body.dump();
            if (reply.statusCode === 404) return { kind: 'unsupported' };
            if (reply.statusCode >= 400 && reply.statusCode < 500 && reply.statusCode !== 429) return { kind: 'refused', status: reply.statusCode, error: `the upstream registry answered ${reply.statusCode} for the referrers` };
            return { kind: 'failed', error: `the upstream registry answered ${reply.statusCode} for the referrers` };
          }
          const index = await reply.body.readAll(REFERRERS_LIMIT_BYTES);
          return index === null ? { kind: 'failed', error: `the referrers index is larger than ${REFERRERS_LIMIT_BYTES} bytes` } : { kind: 'found', index };
        } catch (error) {
          return { kind: 'failed', error: (error as Error).message };
        }
      },
    };
  }
}

/** A content body read whole, or null past `limit` (the body is then stopped). */
function readWhole(body: NonNullable<Awaited<ReturnType<ContentSource['blob']>>['body']>, limit: number): Promise<Buffer | null> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    body.attach({
      data(chunk) {
        if (done) return true;
        size += chunk.length;
        if (size > limit) {
          done = true;
          body.destroy(new Error('blob larger than a signature payload'));
          resolve(null);
          return true;
        }
        chunks.push(Buffer.from(chunk)); // chunks are valid during this call only
        return true;
      },
      end() {
        if (!done) resolve(Buffer.concat(chunks, size));
      },
      error(error) {
        if (!done) reject(error);
      },
    });
  });
}
