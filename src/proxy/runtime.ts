// What the proxy serves with, for as long as one config is in force: each rule's upstream, the
// content source on top of them, the broker keys. A new config gets a new runtime; the old one drains.

import type { Config } from '../rules/config.js';
import { BrokerKeys, type SkippedBrokerKey } from '../shell/secretfiles.js';
import { UpstreamContent } from '../content/passthrough.js';
import type { ContentSource } from '../content/source.js';
import { createRuleUpstreams, type RuleUpstream } from '../upstream/rule.js';
import type { TransportOptions } from '../upstream/transport.js';

export interface ProxyRuntime {
  readonly config: Config;
  readonly rules: ReadonlyMap<string, RuleUpstream>;
  readonly brokerKeys: BrokerKeys | undefined;
  /** Where manifests, blobs and tag lists come from, once the shell has authorized a request. */
  readonly content: ContentSource;
  close(): Promise<void>;
}

/** `onVerifyKeys`: which verify-only broker key files were skipped, at each use (see BrokerKeys). */
export function createProxyRuntime(config: Config, transport: TransportOptions = {}, onVerifyKeys?: (skipped: readonly SkippedBrokerKey[]) => void): ProxyRuntime {
  const rules = createRuleUpstreams(config.registries, transport);
  return {
    config,
    rules,
    brokerKeys: config.broker ? new BrokerKeys(config.broker.keyFiles, onVerifyKeys) : undefined,
    content: new UpstreamContent(rules),
    async close() {
      await Promise.all([...rules.values()].map((r) => r.transport.close()));
    },
  };
}
