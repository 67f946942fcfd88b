// The rewrite decision for one image: which rule (first match in file order) and the rewritten
// reference. Pure: config and strings in, a decision out.

import { REFERENCE_LENGTH_MAX, canonicalRegistryHost, formatReference, isSameProxyAuthority, parseReference, type ImageReference } from '../reference/reference.js';
import type { Config, Rule } from './config.js';
import { upstreamPullSecretName } from './upstreamsecret.js';

export type DecisionReason =
  | 'rewritten'
  /** rewrite: private-only, and the upstream answered an anonymous manifest HEAD: the node pulls it directly. */
  | 'public-image'
  /** rewrite: never: the image stays; the Pod gets the rule's upstream pull secret (upstreamsecret.ts). */
  | 'pull-secret-only'
  | 'already-proxied'
  | 'no-matching-rule'
  | 'repository-not-included'
  | 'repository-excluded'
  | 'namespace-not-allowed'
  | 'invalid-reference'
  | 'rewritten-reference-invalid';

export interface ImageDecision {
  readonly image: string;
  /** The new reference, or null when the image stays as it is. */
  readonly rewritten: string | null;
  /** The rule that rewrote the image (or that matched the host but refused it), else null. */
  readonly rule: string | null;
  readonly reason: DecisionReason;
  /** Human-readable explanation, e.g. the parser's error. */
  readonly detail?: string;
}

/** Rewrites a parsed reference onto the proxy: `<host>:<port>/<rule>/<path>[:tag][@digest]`. */
export function proxiedReference(config: Config, rule: Pick<Rule, 'name'>, ref: ImageReference): ImageReference {
  return { ...ref, domain: config.proxyAuthority, path: `${rule.name}/${ref.path}` };
}

// Pods of one workload repeat the same images, so decisions are memoised per config object. The
// decision is a pure function of (config, image, namespace), so this changes no result. The memo is
// bounded by entries and by (estimated) bytes, oldest entries leaving first, and an image longer than
// any valid reference is never memoised: it cannot be rewritten, and a stream of such strings must
// not stay in memory.
export const MEMO_MAX_ENTRIES = 4096;
export const MEMO_MAX_BYTES = 4 * 1024 * 1024;
// A Map entry, the frozen decision object and the key's cons string, beyond the characters.
const MEMO_ENTRY_OVERHEAD_BYTES = 200;

interface Memo {
  readonly decisions: Map<string, { readonly decision: ImageDecision; readonly bytes: number }>;
  bytes: number;
}
const memos = new WeakMap<Config, Memo>();

/** What a memo entry costs, counting two bytes per UTF-16 code unit (V8's worst case). */
function memoBytes(key: string, decision: ImageDecision): number {
  const chars = key.length + decision.image.length + (decision.rewritten?.length ?? 0) + (decision.rule?.length ?? 0) + (decision.detail?.length ?? 0);
  return 2 * chars + MEMO_ENTRY_OVERHEAD_BYTES;
}

function remember(memo: Memo, key: string, decision: ImageDecision): void {
  const bytes = memoBytes(key, decision);
  if (bytes > MEMO_MAX_BYTES) return;
  // Map iteration is insertion order: the first key is the oldest entry.
  for (const [oldest, entry] of memo.decisions) {
    if (memo.decisions.size < MEMO_MAX_ENTRIES && memo.bytes + bytes <= MEMO_MAX_BYTES) break;
    memo.decisions.delete(oldest);
    memo.bytes -= entry.bytes;
  }
  memo.decisions.set(key, { decision, bytes });
  memo.bytes += bytes;
}

/** The memo's current size, for tests and metrics. */
export function memoSize(config: Config): { readonly entries: number; readonly bytes: number } {
  const memo = memos.get(config);
  return { entries: memo?.decisions.size ?? 0, bytes: memo?.bytes ?? 0 };
}

/**
 * Decides what happens to one image in a namespace. `namespace` undefined means "any namespace"
 * (the CLI without --namespace): namespace filters are then not applied.
 */
export function decideImage(config: Config, image: string, namespace?: string): ImageDecision {
  if (image.length > REFERENCE_LENGTH_MAX) return Object.freeze(computeDecision(config, image, namespace));
  let memo = memos.get(config);
  if (memo === undefined) {
    memo = { decisions: new Map(), bytes: 0 };
    memos.set(config, memo);
  }
  const key = namespace === undefined ? `\u0000${image}` : `${namespace}\u0000${image}`;
  const known = memo.decisions.get(key);
  if (known !== undefined) return known.decision;
  const decision = Object.freeze(computeDecision(config, image, namespace));
  remember(memo, key, decision);
  return decision;
}

/** Whether an image reference points at the proxy (its host is proxy.host:proxy.port). Pure. */
export function pointsAtProxy(config: Pick<Config, 'proxyAuthority'>, image: string | null): boolean {
  if (image === null) return false;
  const parsed = parseReference(image);
  return parsed.ok && canonicalRegistryHost(parsed.reference.domain) === canonicalRegistryHost(config.proxyAuthority);
}

function computeDecision(config: Config, image: string, namespace: string | undefined): ImageDecision {
  const parsed = parseReference(image);
  if (!parsed.ok) return { image, rewritten: null, rule: null, reason: 'invalid-reference', detail: parsed.error };
  const ref = parsed.reference;
  const host = canonicalRegistryHost(ref.domain);
  // Any spelling of the proxy's address (127.0.0.1:30500, [::1]:30500, localhost:030500 …) reaches
  // the proxy: such an image is the proxy's, its rule from the path, never "no matching rule".
  if (isSameProxyAuthority(ref.domain, config.proxyAuthority)) {
    return { image, rewritten: null, rule: null, reason: 'already-proxied' };
  }

  // The first refusal by a rule whose host matched explains a miss better than "no rule".
  let refusal: ImageDecision | undefined;
  for (const rule of config.registries) {
    if (!rule.hosts.has(host)) continue;
    const repositoryRefusal = rule.repositoryFilter.refuse(ref.path);
    if (repositoryRefusal !== null) {
      refusal ??= {
        image,
        rewritten: null,
        rule: rule.name,
        reason: repositoryRefusal === 'excluded' ? 'repository-excluded' : 'repository-not-included',
        detail: `repository "${ref.path}" is ${repositoryRefusal === 'excluded' ? 'excluded by' : 'not included in'} rule "${rule.name}"`,
      };
      continue;
    }
    if (namespace !== undefined && rule.namespaceFilter.refuse(namespace) !== null) {
      refusal ??= { image, rewritten: null, rule: rule.name, reason: 'namespace-not-allowed', detail: `namespace "${namespace}" is not allowed by rule "${rule.name}"` };
      continue;
    }
    if (rule.rewrite === 'never') {
      return { image, rewritten: null, rule: rule.name, reason: 'pull-secret-only', detail: `image stays; the Pod gets pull secret "${upstreamPullSecretName(config, rule)}"` };
    }
    const rewritten = formatReference(proxiedReference(config, rule, ref));
    const check = parseReference(rewritten);
    if (!check.ok) {
      return { image, rewritten: null, rule: rule.name, reason: 'rewritten-reference-invalid', detail: check.error };
    }
    return { image, rewritten, rule: rule.name, reason: 'rewritten' };
  }
  return refusal ?? { image, rewritten: null, rule: null, reason: 'no-matching-rule' };
}

/** The rule a proxy path prefix names, if any. */
export function ruleByName(config: Config, name: string): Rule | undefined {
  return config.registries.find((rule) => rule.name === name);
}
