// Admission decisions that depend on the upstream's answers (rewrite: private-only, pinDigest,
// verify). Pure: the decision for one image is a function of the image-string decision, the rule and
// an AnswerBook; a missing answer is recorded as a question, and the I/O shell (upstream.ts) answers
// the questions and decides again, until nothing is missing or the review's budget is spent (then
// every missing answer counts as failed: `final`).

import type { Config, Rule } from '../rules/config.js';
import { proxiedReference, ruleByName, type ImageDecision } from '../rules/decide.js';
import type { ManifestAnswer, ProbeAnswer, RegistryTarget } from '../rules/registryview.js';
import { formatReference, parseReference } from '../reference/reference.js';
import { verifyRequirement } from '../rules/verifypolicy.js';

/** What a signature check concluded (the cosign implementation is injected; see upstream.ts). */
/** The text of a missing answer when no one was asked: what the user sees, naming how to give access. */
export const NO_UPSTREAM = 'the webhook has no access to the proxy tier (start it with --resolver-url or --resolver-ops-port; in the chart, webhook.resolver.enabled)';

export type SignatureAnswer = { readonly verified: true; /** Which of publicKeyFiles verified it. */ readonly keyIndex?: number; /** Where the signature was found: the `.sig` tag, or a referrer's digest. */ readonly source?: string } | { readonly verified: false; readonly reason: string };

/** The pins a Pod's controlling ReplicaSet carries: original image → digest. */
export type PinsAnswer = { readonly kind: 'found'; readonly pins: Readonly<Record<string, string>> } | { readonly kind: 'none'; readonly detail?: string; /** The ReplicaSet could not be read or its pins were refused (too large): audited. */ readonly unusable?: boolean };

export type UpstreamQuestion =
  | { readonly kind: 'probe'; readonly key: string; readonly target: RegistryTarget & { readonly reference: string } }
  | { readonly kind: 'digest'; readonly key: string; readonly target: RegistryTarget & { readonly reference: string; readonly namespace: string } }
  | { readonly kind: 'signature'; readonly key: string; readonly target: RegistryTarget & { readonly digest: string; readonly namespace: string } }
  | { readonly kind: 'replicaset'; readonly key: string; readonly namespace: string; readonly name: string; readonly uid: string };

/** The upstream-aware facts of one image, for the audit record. */
export interface UpstreamFacts {
  /** rewrite: private-only: how the anonymous manifest HEAD went. */
  probe?: { readonly outcome: 'private' | 'public' | 'failed'; readonly status?: number; readonly error?: string };
  /** The digest written (or that would have been), and where it came from; or why there is none. */
  digest?: { readonly digest: string; readonly source: 'reference' | 'replicaset' | 'resolved'; readonly pinned: boolean } | { readonly error: string };
  /** Why the controlling ReplicaSet's pins were not used (unreadable, or an annotation too large). */
  replicaSetPins?: { readonly ignored: string };
  /** verify: the signature check's result for the digest. */
  signature?: { readonly verified: boolean; readonly keyIndex?: number; readonly source?: string; readonly reason?: string; readonly onFailure?: 'deny' | 'warn' };
}

/** The audit's view of a signature answer: which key and where, or why not and what onFailure did. */
export function signatureFacts(answer: SignatureAnswer, onFailure: 'deny' | 'warn'): NonNullable<UpstreamFacts['signature']> {
  if (!answer.verified) return { verified: false, reason: answer.reason, onFailure };
  return { verified: true, ...(answer.keyIndex !== undefined ? { keyIndex: answer.keyIndex } : {}), ...(answer.source !== undefined ? { source: answer.source } : {}) };
}

/**
 * Answers known so far within one review, and the questions a decision found missing. `final` says
 * no more answers will come (the budget is spent, or there is no one to ask): a missing answer is
 * then a failure with that text.
 */
export class AnswerBook {
  readonly probes = new Map<string, ProbeAnswer>();
  readonly digests = new Map<string, ManifestAnswer>();
  readonly signatures = new Map<string, SignatureAnswer>();
  readonly replicaSets = new Map<string, PinsAnswer>();
  final: string | undefined;
  /**
   * The review asked more distinct questions than MAX_QUESTIONS_PER_REVIEW allows (upstream.ts):
   * verify then fails closed whatever its onFailure, since an attacker chose the size of the Pod.
   */
  overQuestionCap = false;
  private readonly missing = new Map<string, UpstreamQuestion>();

  constructor(final?: string) {
    this.final = final;
  }

  /** The questions the last decision could not answer, each once. */
  takeQuestions(): UpstreamQuestion[] {
    const questions = [...this.missing.values()];
    this.missing.clear();
    return questions;
  }

  ask(question: UpstreamQuestion): void {
    if (this.final === undefined) this.missing.set(question.key, question);
  }
}

export const probeKey = (t: RegistryTarget & { reference: string }) => `probe\u0000${t.rule}\u0000${t.repository}\u0000${t.reference}`;
export const digestKey = (t: RegistryTarget & { reference: string; namespace: string }) => `digest\u0000${t.rule}\u0000${t.repository}\u0000${t.reference}\u0000${t.namespace}`;
export const signatureKey = (t: RegistryTarget & { digest: string; namespace: string }) => `signature\u0000${t.rule}\u0000${t.repository}\u0000${t.digest}\u0000${t.namespace}`;
export const replicaSetKey = (namespace: string, uid: string) => `replicaset\u0000${namespace}\u0000${uid}`;

/** Whether a rule's decisions need the upstream at all; a rule without these keys stays synchronous. */
export function isUpstreamAware(rule: Pick<Rule, 'rewrite' | 'pinDigest' | 'verify'>): boolean {
  return rule.rewrite === 'private-only' || rule.pinDigest || rule.verify !== undefined;
}

/** The names of the rules whose decisions ask the upstream (through the proxy tier) at admission. */
export function rulesAskingUpstream(config: Pick<Config, 'registries'>): string[] {
  return config.registries.filter(isUpstreamAware).map((rule) => rule.name);
}

/** Whether a rule needs the digest behind a tag (recorded on a ReplicaSet once). */
export function needsDigest(rule: Pick<Rule, 'pinDigest' | 'verify'>): boolean {
  return rule.pinDigest || rule.verify !== undefined;
}

/** The controlling ReplicaSet of a Pod, when it has one (apps/v1). */
export interface ReplicaSetOwner {
  readonly name: string;
  readonly uid: string;
}

export type ImageSettlement =
  | { readonly pending: true }
  | {
      readonly pending: false;
      /** The final image when it differs from the one asked for, else null. */
      readonly rewritten: string | null;
      readonly reason: ImageDecision['reason'] | 'probe-failed' | 'pin-failed' | 'signature-unverified';
      readonly detail?: string;
      /** Whether the image now points at the proxy (and so may need the pull secret). */
      readonly proxied: boolean;
      readonly upstream?: UpstreamFacts;
      readonly warning?: string;
      /** onFailure: deny: the review is refused with this message. */
      readonly denial?: string;
    };

const failure = (answer: ProbeAnswer | ManifestAnswer): string =>
  answer.kind === 'failed' ? answer.error : answer.kind === 'answered' ? `upstream answered ${answer.status}` : answer.kind === 'refused' ? answer.error : 'unexpected answer';

/**
 * The final decision for one image, given the image-string decision and the answers so far; pending
 * when an answer is missing (the question is then in the book). `container` names the container for
 * warnings and denials; `owner` is the Pod's controlling ReplicaSet, whose pins replace a resolution.
 */
export function settleImage(config: Config, decision: ImageDecision, container: string, namespace: string, book: AnswerBook, owner: ReplicaSetOwner | undefined): ImageSettlement {
  const plain = { pending: false as const, rewritten: decision.rewritten, reason: decision.reason, ...(decision.detail !== undefined ? { detail: decision.detail } : {}), proxied: decision.rewritten !== null };
  // Cheap checks first: this runs for every container of every Pod, and decisions are memoised.
  // rewrite: never: the image stays on its registry, but may be pinned or verified all the same.
  const secretOnly = decision.reason === 'pull-secret-only';
  if (decision.reason === 'rewritten' || secretOnly) {
    const matched = decision.rule === null ? undefined : ruleByName(config, decision.rule);
    // A rule without upstream keys may still serve what another rule verifies (verifypolicy.ts).
    if (matched === undefined || (!isUpstreamAware(matched) && !config.registries.some((r) => r.verify !== undefined))) return plain;
  } else if (decision.reason !== 'already-proxied' || !config.registries.some((r) => r.verify !== undefined)) return plain;
  const parsed = parseReference(decision.image);
  if (!parsed.ok) return plain;
  const ref = parsed.reference;
  // An image written on the proxy already (by hand, or a reinvocation) names its rule in the path:
  // with verify it is checked all the same, else writing the proxy reference would bypass it.
  const alreadyProxied = decision.reason === 'already-proxied';
  const [prefix = '', ...rest] = ref.path.split('/');
  const rule = alreadyProxied ? ruleByName(config, prefix) : decision.rule === null ? undefined : ruleByName(config, decision.rule);
  if (rule === undefined || (alreadyProxied && rest.length === 0)) return plain;
  const image = decision.image;
  const target = { rule: rule.name, repository: alreadyProxied ? rest.join('/') : ref.path };
  // The rule's own verify, or that of the rule verifying this repository of the same upstream: else
  // another rule's path would be a way around it (the proxy enforces the same on every pull).
  const verify = verifyRequirement(config.registries, rule, target.repository)?.verify;
  if ((!isUpstreamAware(rule) && verify === undefined) || (alreadyProxied && verify === undefined)) return plain;
  const facts: UpstreamFacts = {};
  const leave = (reason: 'probe-failed' | 'pin-failed', detail: string): ImageSettlement => ({ pending: false, rewritten: null, reason, detail, proxied: false, upstream: facts, warning: `pullbridge: ${container} image ${image} left unchanged: ${detail}` });
  const warnings: string[] = [];

  // 1. rewrite: private-only: an anonymous manifest HEAD decides whether the node can pull it directly.
  let proxied = !secretOnly;
  let probeDetail: string | undefined;
  if (rule.rewrite === 'private-only' && !alreadyProxied) {
    const probeTarget = { ...target, reference: ref.digest ?? ref.tag ?? 'latest' };
    const key = probeKey(probeTarget);
    let answer = book.probes.get(key);
    if (answer === undefined) {
      if (book.final === undefined) {
        book.ask({ kind: 'probe', key, target: probeTarget });
        return { pending: true };
      }
      answer = { kind: 'failed', error: book.final };
    }
    if (answer.kind === 'answered' && (answer.status === 401 || answer.status === 403)) {
      facts.probe = { outcome: 'private', status: answer.status };
      probeDetail = `private: an anonymous manifest request was refused (${answer.status})`;
    } else if (answer.kind === 'answered' && answer.status === 200) {
      facts.probe = { outcome: 'public', status: 200 };
      proxied = false;
      probeDetail = 'public: the upstream answered an anonymous manifest request; the node pulls it directly';
    } else {
      const error = failure(answer);
      facts.probe = { outcome: 'failed', ...(answer.kind === 'answered' ? { status: answer.status } : {}), error };
      if (rule.onProbeFailure === 'leave') return leave('probe-failed', `the anonymous probe failed (${error}); onProbeFailure: leave`);
      probeDetail = `the anonymous probe failed (${error}); onProbeFailure: rewrite`;
    }
  }

  // 2. The digest behind the tag: written by the reference itself, pinned on the ReplicaSet, or resolved now.
  let digest: string | undefined;
  let digestError: string | undefined;
  if (alreadyProxied ? verify !== undefined : needsDigest(rule) || verify !== undefined) {
    if (ref.digest !== undefined) {
      digest = ref.digest;
      facts.digest = { digest, source: 'reference', pinned: false };
    } else {
      let pins: PinsAnswer = { kind: 'none' };
      if (owner !== undefined) {
        const key = replicaSetKey(namespace, owner.uid);
        const known = book.replicaSets.get(key);
        if (known === undefined && book.final === undefined) {
          book.ask({ kind: 'replicaset', key, namespace, name: owner.name, uid: owner.uid });
          return { pending: true };
        }
        pins = known ?? { kind: 'none', detail: book.final };
      }
      if (pins.kind === 'none' && pins.unusable === true && pins.detail !== undefined) facts.replicaSetPins = { ignored: pins.detail };
      const pin = pins.kind === 'found' ? pins.pins[image] : undefined;
      if (pin !== undefined) {
        digest = pin;
        facts.digest = { digest, source: 'replicaset', pinned: false };
      } else {
        const digestTarget = { ...target, reference: ref.tag ?? 'latest', namespace };
        const key = digestKey(digestTarget);
        let answer = book.digests.get(key);
        if (answer === undefined) {
          if (book.final === undefined) {
            book.ask({ kind: 'digest', key, target: digestTarget });
            return { pending: true };
          }
          answer = { kind: 'failed', error: book.final };
        }
        if (answer.kind === 'found') {
          digest = answer.digest;
          facts.digest = { digest, source: 'resolved', pinned: false };
        } else {
          digestError = failure(answer);
          facts.digest = { error: digestError };
        }
      }
    }
  }
  if (digestError !== undefined && verify === undefined) {
    // pinDigest alone: the rule's onProbeFailure decides, as for the probe.
    if (rule.onProbeFailure === 'leave') return leave('pin-failed', `the tag could not be resolved to a digest (${digestError}); onProbeFailure: leave`);
    warnings.push(`pullbridge: ${container} image ${image} not pinned: the tag could not be resolved to a digest (${digestError})`);
  }

  // 3. verify: the signature of that digest.
  let verified = false;
  if (verify !== undefined) {
    let answer: SignatureAnswer;
    if (digest === undefined) answer = { verified: false, reason: `the tag could not be resolved to a digest (${digestError ?? 'unknown'})` };
    else {
      const signatureTarget = { ...target, digest, namespace };
      const key = signatureKey(signatureTarget);
      const known = book.signatures.get(key);
      if (known === undefined && book.final === undefined) {
        book.ask({ kind: 'signature', key, target: signatureTarget });
        return { pending: true };
      }
      answer = known ?? { verified: false, reason: `no answer: ${book.final ?? 'unknown'}` };
    }
    // Over the question cap a verify rule denies even with onFailure: warn: warn admits unverified
    // images, and whoever wrote the Pod chose to make it too large to check.
    const onFailure = book.overQuestionCap ? 'deny' : verify.onFailure;
    facts.signature = signatureFacts(answer, onFailure);
    verified = answer.verified;
    if (!answer.verified) {
      const message = `pullbridge: ${container} image ${image}: signature not verified: ${answer.reason}`;
      if (onFailure === 'deny') return { pending: false, rewritten: null, reason: 'signature-unverified', detail: answer.reason, proxied: false, upstream: facts, denial: message };
      warnings.push(`${message} (onFailure: warn)`);
    }
  }

  // 4. The final reference: onto the proxy unless public, pinned when asked for or verified.
  const pin = digest !== undefined && ref.digest === undefined && ((rule.pinDigest && !alreadyProxied) || verified) ? digest : undefined;
  if (pin !== undefined && facts.digest !== undefined && 'digest' in facts.digest) facts.digest = { ...facts.digest, pinned: true };
  const base = proxied && !alreadyProxied ? proxiedReference(config, rule, ref) : ref;
  const final = formatReference(pin !== undefined ? { ...base, digest: pin } : base);
  const finalCheck = parseReference(final);
  if (!finalCheck.ok) return { pending: false, rewritten: null, reason: 'rewritten-reference-invalid', detail: finalCheck.error, proxied: false, upstream: facts };
  const detail = [probeDetail, pin !== undefined ? `pinned to ${pin}` : undefined].filter((d) => d !== undefined).join('; ');
  return {
    pending: false,
    rewritten: final === image ? null : final,
    // Admitted under onFailure: warn, the audit says why it was not verified rather than plain "rewritten".
    reason: rule.verify !== undefined && !verified ? 'signature-unverified' : alreadyProxied ? 'already-proxied' : secretOnly ? 'pull-secret-only' : proxied ? 'rewritten' : 'public-image',
    ...(detail ? { detail } : {}),
    proxied,
    upstream: facts,
    ...(warnings.length > 0 ? { warning: warnings.join('; ') } : {}),
  };
}

/**
 * What a rule's upstream keys leave open when no proxy tier is asked (the rewrite CLI): a detail
 * naming them, or undefined for a rule without them. An image written with a digest leaves
 * pinDigest nothing to ask: the digest is the one given.
 */
export function unknownWithoutUpstream(rule: Pick<Rule, 'name' | 'rewrite' | 'pinDigest' | 'verify'>, image?: string): string | undefined {
  const parsed = image === undefined ? undefined : parseReference(image);
  const hasDigest = parsed?.ok === true && parsed.reference.digest !== undefined;
  const keys = [rule.rewrite === 'private-only' ? 'rewrite: private-only (is the image public?)' : undefined, rule.pinDigest && !hasDigest ? 'pinDigest (which digest?)' : undefined, rule.verify ? 'verify (is it signed?)' : undefined].filter((k) => k !== undefined);
  if (keys.length === 0) return undefined;
  return `rule "${rule.name}" asks the upstream at admission through the proxy tier: ${keys.join(', ')}; this shows the decision before those answers, which cannot be known here`;
}

export type PinSettlement =
  | { readonly pending: true }
  | { readonly pending: false; readonly digest: string | null; readonly upstream: UpstreamFacts; readonly detail: string; /** Why the signature was not verified, when it was not. */ readonly unverified?: string };

/**
 * The digest a ReplicaSet records for one of its template's images: resolved for pinDigest, and for
 * verify only once its signature is verified (an unverified digest is never recorded for a
 * verify-only rule; the Pod's own admission then decides, with onFailure). Null when nothing is
 * recorded. Only for a decision that needsDigest and an image without a digest.
 */
export function pinForReplicaSet(rule: Rule, decision: ImageDecision, namespace: string, book: AnswerBook): PinSettlement {
  const parsed = parseReference(decision.image);
  if (!parsed.ok) return { pending: false, digest: null, upstream: {}, detail: parsed.error };
  const ref = parsed.reference;
  const digestTarget = { rule: rule.name, repository: ref.path, reference: ref.tag ?? 'latest', namespace };
  const key = digestKey(digestTarget);
  const answer = book.digests.get(key) ?? (book.final !== undefined ? ({ kind: 'failed', error: book.final } as const) : undefined);
  if (answer === undefined) {
    book.ask({ kind: 'digest', key, target: digestTarget });
    return { pending: true };
  }
  if (answer.kind !== 'found') {
    const error = failure(answer);
    return { pending: false, digest: null, upstream: { digest: { error } }, detail: `not pinned: the tag could not be resolved (${error}); each Pod resolves it at its admission` };
  }
  const digest = answer.digest;
  if (rule.verify === undefined) return { pending: false, digest, upstream: { digest: { digest, source: 'resolved', pinned: true } }, detail: `pinned to ${digest}` };
  const signatureTarget = { rule: rule.name, repository: ref.path, digest, namespace };
  const sigKey = signatureKey(signatureTarget);
  const signature = book.signatures.get(sigKey) ?? (book.final !== undefined ? ({ verified: false, reason: `no answer: ${book.final}` } as const) : undefined);
  if (signature === undefined) {
    book.ask({ kind: 'signature', key: sigKey, target: signatureTarget });
    return { pending: true };
  }
  // An unverified digest is never recorded, pinDigest or not: a pin would vouch for an image no key stands behind.
  const upstream: UpstreamFacts = { digest: { digest, source: 'resolved', pinned: signature.verified }, signature: signatureFacts(signature, rule.verify.onFailure) };
  if (signature.verified) return { pending: false, digest, upstream, detail: `pinned to ${digest} (signature verified)` };
  return { pending: false, digest: null, upstream, detail: `not pinned: signature not verified (${signature.reason}); each Pod is checked at its admission`, unverified: signature.reason };
}
