// Generates charts/pullbridge/values.schema.json, with which helm refuses bad values at install
// (naming the key) instead of rendering a config the proxy refuses at start. The rule part and every
// value that becomes a config.yaml key come from the proxy's own config schema (src/rules/config.ts),
// so the two cannot drift; the chart's own keys are written here. A test regenerates the file and
// fails when the committed one differs: run `node dist/scripts/values-schema.js` after changing either.
//
// helm 3 validates with xeipuuv/gojsonschema, which knows JSON Schema drafts 4, 6 and 7: draft 7.

import { writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { z } from 'zod';
import { configSchema } from '../src/rules/config.js';

export interface JsonSchema {
  [keyword: string]: unknown;
}

export const VALUES_SCHEMA_FILE = fileURLToPath(new URL('../../charts/pullbridge/values.schema.json', import.meta.url));

const DNS_SUBDOMAIN = '^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$';

const string = (extra: JsonSchema = {}): JsonSchema => ({ type: 'string', ...extra });
const boolean: JsonSchema = { type: 'boolean' };
const integer = (minimum: number, maximum?: number): JsonSchema => ({ type: 'integer', minimum, ...(maximum === undefined ? {} : { maximum }) });
const port = integer(1, 65535);
const absolutePath = string({ pattern: '^/' });
/** A Secret or ConfigMap name in the release namespace; "" where the key is optional and off. */
const objectName = (optional: boolean): JsonSchema => string({ maxLength: 253, pattern: optional ? `^$|${DNS_SUBDOMAIN}` : DNS_SUBDOMAIN });
/** Kubernetes objects passed through as written (resources, tolerations, selectors): the apiserver checks them. */
const kubernetesObject: JsonSchema = { type: 'object' };
const kubernetesList: JsonSchema = { type: 'array', items: { type: 'object' } };
const stringMap: JsonSchema = { type: 'object', additionalProperties: { type: 'string' } };
const enumOf = (...values: string[]): JsonSchema => ({ type: 'string', enum: values });

/** An object the chart owns: its keys and no others (a misspelt key is refused, not ignored). */
function strict(properties: Record<string, JsonSchema>, extra: JsonSchema = {}): JsonSchema {
  return { type: 'object', properties, additionalProperties: false, ...extra };
}

function child(schema: JsonSchema, ...path: string[]): JsonSchema {
  let node: JsonSchema = schema;
  for (const key of path) {
    const next = key === '[]' ? node.items : (node.properties as Record<string, JsonSchema> | undefined)?.[key];
    if (next === undefined || next === null || typeof next !== 'object') throw new Error(`the config schema has no ${path.join('.')}`);
    node = next as JsonSchema;
  }
  return structuredClone(node);
}

/** A value the proxy's config takes as is, or "" for "not set" (values.yaml's placeholders). */
const orEmpty = (schema: JsonSchema): JsonSchema => ({ anyOf: [{ type: 'string', maxLength: 0 }, schema] });

/** Drops `default` annotations: the chart's defaults are values.yaml's, not the config's. */
function withoutDefaults(schema: unknown): unknown {
  if (Array.isArray(schema)) return schema.map(withoutDefaults);
  if (schema === null || typeof schema !== 'object') return schema;
  return Object.fromEntries(Object.entries(schema).filter(([key]) => key !== 'default').map(([key, value]) => [key, withoutDefaults(value)]));
}

export function valuesSchema(): JsonSchema {
  const config = withoutDefaults(z.toJSONSchema(configSchema, { target: 'draft-7', io: 'input', unrepresentable: 'any' })) as JsonSchema;

  // A rule as values.yaml writes it: the config's rule, with credentials as values (the chart
  // stores them in a Secret and points the config at its files) and the CA as PEM text.
  const rule = child(config, 'registries', '[]');
  const ruleKeys = rule.properties as Record<string, JsonSchema>;
  delete ruleKeys.credentials;
  delete ruleKeys.tls;
  // The chart mounts no forwarding-proxy credentials: refused rather than ignored.
  const forwardProxy = child(rule, 'forwardProxy');
  delete (forwardProxy.properties as Record<string, JsonSchema>).credentials;
  ruleKeys.forwardProxy = forwardProxy;
  // verify with the cosign public keys as PEM text (not secret): the chart puts them in the config
  // ConfigMap and points publicKeyFiles at them. The pattern only says "a PEM block"; which kind, and
  // whether it decodes, the templates check (pullbridge.checkRules), naming the key and the fault.
  const verify = child(rule, 'verify');
  ruleKeys.verify = strict(
    {
      cosign: strict({ publicKeys: { type: 'array', minItems: 1, items: string({ pattern: '-----BEGIN [A-Z0-9 ]+-----' }) } }, { required: ['publicKeys'] }),
      onFailure: child(verify, 'onFailure'),
    },
    { required: ['cosign'] },
  );
  ruleKeys.credentials = strict({ username: string({ minLength: 1 }), password: string({ minLength: 1 }) }, { required: ['username', 'password'] });
  ruleKeys.credentialsSecret = objectName(false);
  ruleKeys.caBundle = string({ pattern: '-----BEGIN CERTIFICATE-----' });
  ruleKeys.insecureSkipVerify = boolean;
  // credentials together with credentialsSecret, and the checks across keys the proxy makes at start,
  // are the templates' (pullbridge.checkRules): their message names the keys, a schema's `not` could not.

  const configKey = (...path: string[]) => child(config, ...path);
  const shared = (...path: string[]) => configKey('cache', 'shared', ...path);

  return {
    $schema: 'http://json-schema.org/draft-07/schema#',
    title: 'pullbridge chart values (generated by scripts/values-schema.ts from the config schema; do not edit)',
    ...strict({
      // helm sets it for charts used as subcharts.
      global: { type: 'object' },
      image: strict({ repository: string({ minLength: 1 }), tag: string(), pullPolicy: enumOf('Always', 'IfNotPresent', 'Never') }),
      imagePullSecrets: { type: 'array', items: strict({ name: string({ minLength: 1 }) }, { required: ['name'] }) },
      registries: { type: 'array', items: rule },
      webhook: strict({
        replicas: integer(0),
        port,
        metricsPort: port,
        pullSecretName: configKey('webhook', 'pullSecretName'),
        optOutLabel: configKey('webhook', 'optOutLabel'),
        excludedNamespaces: configKey('webhook', 'excludedNamespaces'),
        failurePolicy: enumOf('Ignore', 'Fail'),
        timeoutSeconds: integer(1, 30),
        pullSecretFailure: enumOf('deny', 'admit-unchanged'),
        resolver: strict({ enabled: boolean }),
        certificates: strict({
          mode: enumOf('bootstrap', 'certManager', 'secret'),
          validityDays: integer(1),
          certManagerIssuer: strict({ kind: string({ minLength: 1 }), name: string({ minLength: 1 }), group: string() }),
        }),
        clientAuth: strict({
          caBundle: string(),
          existingConfigMap: objectName(true),
          allowedNames: { type: 'array', items: string({ minLength: 1 }) },
        }),
        resources: kubernetesObject,
        nodeSelector: stringMap,
        tolerations: kubernetesList,
        podDisruptionBudget: strict({ minAvailable: { type: ['integer', 'string'] } }),
      }),
      proxy: strict({
        exposure: enumOf('hostNetwork', 'nodePort', 'hostPort'),
        host: configKey('proxy', 'host'),
        port: configKey('proxy', 'port'),
        containerPort: port,
        opsPort: port,
        probeIntervalSeconds: integer(1),
        priorityClassName: string(),
        tolerations: kubernetesList,
        resources: kubernetesObject,
        nodeSelector: stringMap,
      }),
      podSecurity: strict({ checkNamespace: boolean }),
      cache: strict({
        enabled: boolean,
        hostPath: absolutePath,
        maxBytes: configKey('cache', 'maxBytes'),
        minFreeBytes: configKey('cache', 'minFreeBytes'),
        minFreeInodes: configKey('cache', 'minFreeInodes'),
        tagTTLSeconds: configKey('cache', 'tagTTLSeconds'),
        staleIfErrorSeconds: configKey('cache', 'staleIfErrorSeconds'),
        credentialTTLSeconds: configKey('cache', 'credentialTTLSeconds'),
        reconfirmSeconds: configKey('cache', 'reconfirmSeconds'),
        // Which backend's settings may be set together is checked by the templates (one message).
        shared: strict({
          backend: enumOf('', 's3', 'azure', 'gcs', 'filesystem'),
          existingSecret: objectName(true),
          fillWaitSeconds: shared('fillWaitSeconds'),
          timeoutSeconds: shared('timeoutSeconds'),
          streamFills: shared('streamFills'),
          recordKey: strict({ existingSecret: objectName(true), secretKey: string() }),
          s3: strict({
            bucket: orEmpty(shared('s3', 'bucket')),
            region: shared('s3', 'region'),
            endpoint: orEmpty(shared('s3', 'endpoint')),
            forcePathStyle: shared('s3', 'forcePathStyle'),
            prefix: shared('s3', 'prefix'),
            secretKeys: strict({ accessKey: string(), secretKey: string() }),
          }),
          azure: strict({
            container: orEmpty(shared('azure', 'container')),
            accountName: orEmpty(shared('azure', 'accountName')),
            endpoint: orEmpty(shared('azure', 'endpoint')),
            prefix: shared('azure', 'prefix'),
            secretKeys: strict({ accountName: string(), accountKey: string(), sasToken: string() }),
          }),
          gcs: strict({
            bucket: orEmpty(shared('gcs', 'bucket')),
            endpoint: orEmpty(shared('gcs', 'endpoint')),
            prefix: shared('gcs', 'prefix'),
            secretKeys: strict({ key: string() }),
          }),
          filesystem: strict({ existingClaim: objectName(true) }),
        }),
      }),
      broker: strict({ existingSecret: objectName(true) }),
      networkPolicy: strict({
        enabled: boolean,
        apiserverSources: kubernetesList,
        metricsSources: kubernetesList,
        proxyRegistrySources: kubernetesList,
      }),
      status: strict({ enabled: boolean, intervalSeconds: integer(0), installCRD: boolean }),
      metrics: strict({
        serviceMonitor: strict({ enabled: boolean, interval: string({ pattern: '^([0-9]+(ms|s|m|h))+$' }), labels: stringMap }),
        prometheusRule: strict({ enabled: boolean, labels: stringMap }),
      }),
      crio: strict({ registriesDropIn: strict({ enabled: boolean, dir: absolutePath }) }),
      istio: strict({
        sidecarInjection: strict({ proxy: boolean, webhook: boolean }),
        peerAuthentication: strict({ enabled: boolean }),
      }),
    }),
  };
}

export const renderValuesSchema = (): string => `${JSON.stringify(valuesSchema(), null, 2)}\n`;

if (process.argv[1] !== undefined && fileURLToPath(import.meta.url) === process.argv[1]) {
  writeFileSync(VALUES_SCHEMA_FILE, renderValuesSchema());
  console.log(`wrote ${VALUES_SCHEMA_FILE}`);
}
