// What the proxy serves with, for as long as one config is in force: each rule's upstream, the
// content source on top of them, the broker keys. A new config gets a new runtime; the old one drains.

import type { Config } from '../rules/config.js';
import { BrokerKeys, type SkippedBrokerKey } from '../shell/secretfiles.js';
import { CachedContent } from '../cache/content.js';
import type { NodeCache } from '../cache/nodecache.js';
import { UpstreamContent } from '../content/passthrough.js';
import type { ContentSource } from '../content/source.js';
import { createRuleUpstreams, type RuleUpstream } from '../upstream/rule.js';
import type { TransportOptions } from '../upstream/transport.js';
import { VerifyGate } from './verifygate.js';

export interface ProxyRuntime {
  readonly config: Config;
  readonly rules: ReadonlyMap<string, RuleUpstream>;
  readonly brokerKeys: BrokerKeys | undefined;
  /** Where manifests, blobs and tag lists come from, once the shell has authorized a request. */
  readonly content: ContentSource;
  /** The node cache the content goes through, when the config has one. */
  readonly cache: NodeCache | undefined;
  /** The signature check before a manifest of a verify requirement is served (verifygate.ts). */
  readonly verifyGate?: VerifyGate;
  close(): Promise<void>;
}

/**
 * `onVerifyKeys`: which verify-only broker key files were skipped, at each use (see BrokerKeys).
 * `cache`: the process's node cache (it outlives runtimes), used when the config has `cache`.
 */
export function createProxyRuntime(config: Config, transport: TransportOptions = {}, onVerifyKeys?: (skipped: readonly SkippedBrokerKey[]) => void, cache?: NodeCache): ProxyRuntime {
  const rules = createRuleUpstreams(config.registries, transport);
  const upstream = new UpstreamContent(rules);
  const cached = config.cache && cache;
  if (cached) cache.configure(config.cache);
  const content = cached ? new CachedContent(cache, upstream, rules) : upstream;
  return {
    config,
    rules,
    brokerKeys: config.broker ? new BrokerKeys(config.broker.keyFiles, onVerifyKeys) : undefined,
    content,
    verifyGate: new VerifyGate(config, content),
    cache: cached ? cache : undefined,
    async close() {
      await Promise.all([...rules.values()].map((r) => r.transport.close()));
    },
  };
}
