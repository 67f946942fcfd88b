// One rule's way to its upstream, for as long as a config lives: transport, client (auth and
// redirects) and the rule's own credentials.

import type { Rule } from '../rules/config.js';
import { SecretFile } from '../shell/secretfiles.js';
import type { UpstreamCredentials } from './authorizer.js';
import { UpstreamClient } from './client.js';
import { createTransport, type TransportOptions, type RuleTransport } from './transport.js';

export class RuleUpstream {
  readonly client: UpstreamClient;
  private readonly username: SecretFile | undefined;
  private readonly password: SecretFile | undefined;

  constructor(
    readonly rule: Rule,
    readonly transport: RuleTransport,
  ) {
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

/** Every rule's upstream, by rule name, in config order. */
export function createRuleUpstreams(rules: readonly Rule[], transport: TransportOptions = {}): Map<string, RuleUpstream> {
  return new Map(rules.map((rule) => [rule.name, new RuleUpstream(rule, createTransport(rule, transport))]));
}
