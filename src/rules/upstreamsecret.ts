// The pull secret of a `rewrite: never` rule: the image stays on its registry and the Pod gets a
// Secret holding the rule's upstream credential for that registry's hosts. Pure: names and payloads.

import { createHash } from 'node:crypto';
import { DOCKER_HUB, canonicalRegistryHost } from '../reference/reference.js';
import type { Config, Rule } from './config.js';

/** The key Docker Hub's credential has in a dockerconfigjson, as `docker login` writes it and kubelet looks it up. */
export const DOCKER_HUB_AUTH_KEY = 'https://index.docker.io/v1/';

/** A Secret name's limit (a DNS subdomain). */
const SECRET_NAME_MAX = 253;

/** The dockerconfigjson key of a registry host as written in a rule's `match`. */
export function dockerConfigKey(host: string): string {
  const canonical = canonicalRegistryHost(host);
  return canonical === DOCKER_HUB ? DOCKER_HUB_AUTH_KEY : canonical;
}

/**
 * The Secret a never rule provisions: `<webhook.pullSecretName>-<rule>`. A name over the limit keeps
 * the rule's name whole and shortens the prefix, with a hash of the whole so that names stay distinct.
 */
export function upstreamPullSecretName(config: Pick<Config, 'webhook'>, rule: Pick<Rule, 'name'>): string {
  const name = `${config.webhook.pullSecretName}-${rule.name}`;
  if (name.length <= SECRET_NAME_MAX) return name;
  const hash = createHash('sha256').update(name).digest('hex').slice(0, 8);
  const room = SECRET_NAME_MAX - rule.name.length - hash.length - 2;
  // A DNS subdomain's labels end with a letter or digit: no "-" or "." before the joining "-".
  const prefix = config.webhook.pullSecretName.slice(0, room).replace(/[-.]+$/, '');
  return `${prefix}-${hash}-${rule.name}`;
}

/** The never rule whose pull secret has this name, if any. */
export function neverRuleBySecretName(config: Config, name: string): Rule | undefined {
  return config.registries.find((rule) => rule.rewrite === 'never' && upstreamPullSecretName(config, rule) === name);
}

export interface UpstreamCredential {
  readonly username: string;
  readonly password: string;
}

/** The `.dockerconfigjson` of a never rule's pull secret: its credential under each of its `match` hosts. */
export function upstreamDockerConfigJson(rule: Pick<Rule, 'match'>, credential: UpstreamCredential): string {
  const entry = { username: credential.username, password: credential.password, auth: Buffer.from(`${credential.username}:${credential.password}`).toString('base64') };
  const auths: Record<string, typeof entry> = {};
  for (const host of rule.match) auths[dockerConfigKey(host)] = entry;
  return JSON.stringify({ auths });
}
