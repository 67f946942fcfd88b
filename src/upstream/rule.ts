// One rule's way to its upstream, for as long as a config lives: transport, client (auth and
// redirects) and the rule's own credentials.

import { createHash } from 'node:crypto';
import type { Rule } from '../rules/config.js';
import { SecretFile } from '../shell/secretfiles.js';
import type { UpstreamCredentials } from './authorizer.js';
import { UpstreamClient } from './client.js';
import { createTransport, type TransportOptions, type RuleTransport } from './transport.js';

export class RuleUpstream {
  readonly client: UpstreamClient;
  /** Where this rule's content comes from (upstreamOrigin). */
  readonly origin: string;
  private readonly username: SecretFile | undefined;
  private readonly password: SecretFile | undefined;

  constructor(
    readonly rule: Rule,
    readonly transport: RuleTransport,
  ) {
    this.origin = upstreamOrigin(rule);
    this.client = new UpstreamClient(new URL(rule.upstream), transport, rule.auth.tokenRealms);
    this.username = rule.credentials?.usernameFile ? new SecretFile(rule.credentials.usernameFile) : undefined;
    this.password = rule.credentials?.passwordFile ? new SecretFile(rule.credentials.passwordFile) : undefined;
  }

  /** The rule's own upstream credentials (broker and anonymous modes), if configured. Throws when
   * their files cannot be read. */
  upstreamCredentials(): UpstreamCredentials | undefined {
    if (!this.rule.credentials || !this.password) return undefined;
    return { username: this.rule.credentials.username ?? this.username?.read() ?? '', password: this.password.read() };
  }
}

/**
 * The upstream a rule's content comes from, as one opaque id (a hash: the forwarding proxy's headers
 * may hold more than a route): its URL and the way there (forwarding proxy, mode and headers, which
 * may route one host name to different registries, as a connectivity proxy's location id does).
 * Rules with the same id reach the same registry: one may confirm (HEAD) content the other stored.
 */
export function upstreamOrigin(rule: Pick<Rule, 'upstream' | 'forwardProxy'>): string {
  const via = rule.forwardProxy;
  const route = via ? [new URL(via.url).href, via.mode, Object.entries(via.headers).map(([name, value]) => [name.toLowerCase(), value]).sort()] : null;
  return createHash('sha256').update(JSON.stringify([new URL(rule.upstream).href, route])).digest('hex');
}

/** Every rule's upstream, by rule name, in config order. */
export function createRuleUpstreams(rules: readonly Rule[], transport: TransportOptions = {}): Map<string, RuleUpstream> {
  return new Map(rules.map((rule) => [rule.name, new RuleUpstream(rule, createTransport(rule, transport))]));
}
