// Which signature requirement holds for a repository pulled through a rule. A rule's own verify
// holds for its images; a rule without verify must not serve what another rule verifies from the same
// upstream, else its proxy path (or a rewrite: never rule's) is a way around verify. Pure: the
// webhook (admission) and the proxy (every pull) both ask it.

import type { Rule } from './config.js';

export type VerifyRequirement = NonNullable<Rule['verify']>;

export interface VerifyPolicy {
  /** The verify block in force, with the rule it comes from; undefined: no signature is required. */
  readonly verify: VerifyRequirement;
  readonly from: string;
}

function origin(url: string): string {
  try {
    return new URL(url).origin;
  } catch {
    return url;
  }
}

/**
 * The signature requirement for `repository` (as on the upstream, without the rule's prefix) pulled
 * through `rule`: the rule's own verify, else that of the first rule with verify whose upstream has
 * the same origin and whose repository filter admits the repository; undefined when none.
 */
export function verifyRequirement(registries: readonly Rule[], rule: Pick<Rule, 'name' | 'upstream' | 'verify'>, repository: string): VerifyPolicy | undefined {
  if (rule.verify !== undefined) return { verify: rule.verify, from: rule.name };
  const upstream = origin(rule.upstream);
  const other = registries.find((r) => r.verify !== undefined && origin(r.upstream) === upstream && r.repositoryFilter.refuse(repository) === null);
  return other?.verify === undefined ? undefined : { verify: other.verify, from: other.name };
}
