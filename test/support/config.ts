import { parseConfig, type Config } from '../../src/rules/config.js';

export const SHA = 'sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';

/** The rules most tests share: a corp registry with filters, Docker Hub, and a namespace-restricted rule. */
export const TEST_CONFIG_YAML = `
proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge, excludedNamespaces: [infra]}
broker: {keyFiles: [/nonexistent/pullbridge/broker-key]}
registries:
  - name: corp
    match: [registry.corp.example:5000, REGISTRY-ALIAS.corp.example:5000]
    upstream: https://127.0.0.1:5000
    repositories: {exclude: ["legacy/**"]}
  - name: corp-legacy
    match: [registry.corp.example:5000]
    upstream: https://127.0.0.1:5001
    auth: {mode: passthrough}
  - name: hub
    match: [docker.io]
    upstream: http://127.0.0.1:5002
    auth: {mode: anonymous}
  - name: team
    match: [team.example]
    upstream: http://127.0.0.1:5003
    namespaces: {include: ["team-*"]}
    repositories: {include: ["apps/*"]}
`;

export function configFrom(yaml: string): Config {
  const result = parseConfig(yaml);
  if (!result.ok) throw new Error(result.errors.map((e) => `${e.key}: ${e.message}`).join('\n'));
  return result.config;
}

export const testConfig = (): Config => configFrom(TEST_CONFIG_YAML);
