// The configuration (the ConfigMap's config.yaml): schema, validation with an error per offending
// key, and compilation into the form the webhook and proxy use. Pure: text in, data out.

import { parse as parseYaml, YAMLParseError } from 'yaml';
import { isIP } from 'node:net';
import { z } from 'zod';
import { canonicalRegistryHost } from '../reference/reference.js';
import { compileFilter, type CompiledFilter } from './glob.js';
import { BYTE_QUANTITY_PATTERN, INODE_PERCENT_PATTERN, parseByteQuantity, parseInodeFloor } from './quantity.js';

const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

/** Whether a name is a DNS label (namespace and rule names). */
export const isDnsLabel = (name: string): boolean => name.length <= 63 && DNS_LABEL.test(name);
const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
// host[:port], with IPv6 in brackets, as a registry is written in an image reference.
const REGISTRY_HOST = /^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[a-fA-F0-9:]+\])(?::[0-9]{1,5})?$/;
// Label keys: optional DNS-subdomain prefix and a name of up to 63 characters.
const LABEL_KEY = /^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$/;

/** An address block, `10.0.0.0/8` or `fd00::/8`; a bare address is one host. */
const cidr = z.string().refine((value) => {
  const [address = '', prefix, ...rest] = value.split('/');
  const family = isIP(address);
  if (family === 0 || rest.length > 0) return false;
  if (prefix === undefined) return true;
  return /^\d{1,3}$/.test(prefix) && Number(prefix) <= (family === 4 ? 32 : 128);
}, 'must be an IP address or a CIDR block such as 10.0.0.0/8');

/** An http(s) URL without credentials, query or fragment; a path only where `withPath` (an Azure
 * account's path-style URL, as Azurite and Azure Stack serve it). */
const httpUrl = (what: string, withPath = false) =>
  z.string().superRefine((value, ctx) => {
    let url: URL;
    try {
      url = new URL(value);
    } catch {
      ctx.addIssue({ code: 'custom', message: `${what} must be an absolute http:// or https:// URL, got "${value}"` });
      return;
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      ctx.addIssue({ code: 'custom', message: `${what} must use http or https, got "${url.protocol}"` });
    }
    if (url.username || url.password) {
      ctx.addIssue({ code: 'custom', message: `${what} must not carry credentials; use the credentials keys` });
    }
    if (withPath ? url.search || url.hash : (url.pathname !== '/' && url.pathname !== '') || url.search || url.hash) {
      ctx.addIssue({ code: 'custom', message: withPath ? `${what} must be scheme://host[:port][/path] only, without query or fragment` : `${what} must be scheme://host[:port] only, without path, query or fragment` });
    }
  })
  // The shape a JSON Schema can state (values.schema.json): looser than the checks above, never stricter.
  // new URL() skips leading spaces and control characters and takes the scheme in any case.
  .meta({ pattern: '^[\\x00-\\x20]*[Hh][Tt][Tt][Pp][Ss]?:' });

const globList = z.array(z.string().min(1, 'must not be empty')).default([]);
const filterSchema = z.strictObject({ include: globList, exclude: globList });

const credentialsSchema = z
  .strictObject({
    username: z.string().min(1).optional(),
    usernameFile: z.string().min(1).optional(),
    passwordFile: z.string().min(1).optional(),
  })
  .superRefine((value, ctx) => {
    if (value.username !== undefined && value.usernameFile !== undefined) {
      ctx.addIssue({ code: 'custom', path: ['usernameFile'], message: 'give username or usernameFile, not both' });
    }
    if ((value.username ?? value.usernameFile) === undefined) {
      ctx.addIssue({ code: 'custom', path: ['username'], message: 'username or usernameFile is required' });
    }
    if (value.passwordFile === undefined) {
      ctx.addIssue({ code: 'custom', path: ['passwordFile'], message: 'passwordFile is required (passwords are never written in the config)' });
    }
  });

const forwardProxySchema = z.strictObject({
  url: httpUrl('forwardProxy.url'),
  /** connect: HTTP CONNECT tunnel; forward: plain HTTP to the proxy, routed on the Host header. */
  mode: z.enum(['connect', 'forward']).default('connect'),
  headers: z.record(z.string().regex(/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/, 'must be an HTTP header name'), z.string()).default({}),
  credentials: credentialsSchema.optional(),
});

const absolutePath = z.string().min(1).refine((p) => p.startsWith('/'), 'must be an absolute path');

const ruleSchema = z.strictObject({
  name: z.string().regex(DNS_LABEL, 'must be a DNS label (lower-case letters, digits and "-")').max(63),
  match: z.array(z.string().regex(REGISTRY_HOST, 'must be a registry host[:port] as written in image references')).min(1, 'needs at least one registry host'),
  upstream: httpUrl('upstream'),
  repositories: filterSchema.optional(),
  namespaces: filterSchema.optional(),
  auth: z
    .strictObject({
      mode: z.enum(['broker', 'passthrough', 'anonymous']).default('broker'),
      /**
       * Token realms (origins) besides the upstream's own scheme://host:port that may receive the
       * rule's credentials, e.g. https://auth.docker.io for registry-1.docker.io. Never guessed.
       */
      tokenRealms: z.array(httpUrl('auth.tokenRealms')).default([]),
    })
    .default({ mode: 'broker', tokenRealms: [] }),
  credentials: credentialsSchema.optional(),
  tls: z
    .strictObject({
      caFile: z.string().min(1).optional(),
      insecureSkipVerify: z.boolean().default(false),
    })
    .optional(),
  forwardProxy: forwardProxySchema.optional(),
  /**
   * Storage redirects (blobs only) are refused when they lead to loopback, link-local or private
   * addresses, checked on the address connected; these CIDRs are allowed as well (an on-prem
   * object store on 10.0.0.0/8, say). The upstream's own origin is always allowed.
   */
  redirects: z.strictObject({ allow: z.array(cidr).default([]) }).default({ allow: [] }),
  /**
   * Hash every whole-blob response while streaming and cut the connection on a mismatch, so that a
   * corrupted body is never served as complete. Costs CPU (see the proxy benchmark); runtimes
   * verify digests themselves, so a trusted upstream may turn it off.
   */
  verifyBlobDigests: z.boolean().default(true),
  /** false: this rule's content is never written to the node cache (compliance); always relayed. */
  cache: z.boolean().default(true),
  /**
   * How the node cache re-checks what it holds once cache.tagTTLSeconds passed. get: a tag, and a
   * manifest served by digest, with a GET conditional on the digest held (a 304 carries no body),
   * so that a policy the registry enforces on GETs only (Harbor's "prevent vulnerable images",
   * content trust) is honoured. head: a tag with a HEAD, a manifest by digest not at all; for
   * registries that count manifest GETs and not HEADs (Docker Hub's pull rate limit), at the price
   * of such policies.
   */
  revalidate: z.enum(['get', 'head'], { message: 'must be get or head' }).default('get'),
  /**
   * What admission does with a matching image. always: rewrite it onto the proxy. private-only: ask
   * the upstream anonymously (a manifest HEAD through the rule's transport, via the proxy tier);
   * refused (401/403) means private and is rewritten, answered (200) means public and is left for the
   * node to pull directly. never: the image stays; the Pod gets a pull secret holding this rule's
   * upstream credential for the registry host (needs shareUpstreamCredentials and namespaces.include).
   */
  rewrite: z.enum(['always', 'private-only', 'never'], { message: 'must be always, private-only or never' }).default('always'),
  /** When the proxy tier cannot answer a probe or a tag resolution in time: rewrite (or keep the tag unpinned) anyway, or leave the image as it is. */
  onProbeFailure: z.enum(['rewrite', 'leave'], { message: 'must be rewrite or leave' }).default('rewrite'),
  /** Resolve a tag to its manifest digest at admission and write tag@sha256:…, so every replica runs the same bits. */
  pinDigest: z.boolean().default(false),
  /** Signatures checked at admission through the proxy tier; a verified image is pinned to the digest verified. */
  verify: z
    .strictObject({
      cosign: z.strictObject({ publicKeyFiles: z.array(absolutePath).min(1, 'needs at least one public key file') }),
      onFailure: z.enum(['deny', 'warn'], { message: 'must be deny or warn' }).default('deny'),
    })
    .optional(),
  /**
   * The explicit opt-in for rewrite: never: this rule's upstream credential itself is written into a
   * pull secret in every namespace the rule admits (docs/security.md). Only with rewrite: never.
   */
  shareUpstreamCredentials: z.boolean().default(false),
});

/** Bytes as an integer or a Kubernetes quantity string (`20Gi`, `500M`). */
const byteQuantity = z
  .union([z.number(), z.string()])
  // For values.schema.json: the shapes parseByteQuantity takes (a number must also be whole and safe).
  .meta({ pattern: BYTE_QUANTITY_PATTERN, minimum: 0 })
  .transform((value, ctx) => {
  const bytes = parseByteQuantity(value);
  if (bytes === null) {
    ctx.addIssue({ code: 'custom', message: `must be a whole number of bytes or a quantity such as 20Gi or 500M, got ${JSON.stringify(value)}` });
    return z.NEVER;
  }
  return bytes;
});
const inodeFloor = z
  .union([z.number(), z.string()])
  .meta({ pattern: INODE_PERCENT_PATTERN, minimum: 0 })
  .superRefine((value, ctx) => {
  if (parseInodeFloor(value) === null) ctx.addIssue({ code: 'custom', message: `must be a whole number of inodes or a percentage such as 10%, got ${JSON.stringify(value)}` });
});
const seconds = (max: number) => z.number().int('must be a whole number of seconds').min(0).max(max);
/**
 * The shortest cache.shared.fillWaitSeconds. A fill's claim stands while it was written within
 * fillWaitSeconds by the clock of the node reading it, and its filler rewrites it every third of
 * fillWaitSeconds (tier.ts keepClaim): 0 made that a 1 ms loop of store writes, and every claim stale
 * at once (no single flight). At 10 s a claim is rewritten every 3.3 s, one store write per fill in
 * flight, and survives a slow write or two and a few seconds of clock skew between nodes.
 */
const FILL_WAIT_SECONDS_MIN = 10;

/** A key inside the bucket or container under which pullbridge keeps everything ("" for the root). */
const objectPrefix = z
  .string()
  .regex(/^([A-Za-z0-9._-]+\/)*$/, 'must be empty or path segments each ending in "/", such as "pullbridge/"')
  .default('');

/** The shared tier's backends: exactly one of them. Credentials come from files (Secret mounts),
 * never from the config itself; absent files mean the platform's default chain where there is one. */
const sharedSchema = z
  .strictObject({
    s3: z
      .strictObject({
        bucket: z.string().min(3).max(63),
        region: z.string().min(1).default('us-east-1'),
        endpoint: httpUrl('endpoint').optional(),
        forcePathStyle: z.boolean().default(false),
        prefix: objectPrefix,
        accessKeyFile: absolutePath.optional(),
        secretKeyFile: absolutePath.optional(),
      })
      .refine((s3) => (s3.accessKeyFile === undefined) === (s3.secretKeyFile === undefined), 'accessKeyFile and secretKeyFile go together (or neither, for the default credential chain)')
      .optional(),
    azure: z
      .strictObject({
        container: z.string().min(3).max(63),
        accountName: z.string().min(3).max(24).optional(),
        accountNameFile: absolutePath.optional(),
        accountKeyFile: absolutePath.optional(),
        sasTokenFile: absolutePath.optional(),
        endpoint: httpUrl('endpoint', true).optional(),
        prefix: objectPrefix,
      })
      .refine((a) => (a.accountName === undefined) !== (a.accountNameFile === undefined), 'needs accountName or accountNameFile (one of them)')
      .refine((a) => (a.accountKeyFile === undefined) !== (a.sasTokenFile === undefined), 'needs accountKeyFile or sasTokenFile (one of them)')
      .optional(),
    gcs: z
      .strictObject({
        bucket: z.string().min(3).max(222),
        keyFile: absolutePath.optional(),
        endpoint: httpUrl('endpoint').optional(),
        prefix: objectPrefix,
      })
      .optional(),
    filesystem: z.strictObject({ path: absolutePath }).optional(),
    /** When another node is fetching a blob, how long its claim stands without being renewed. */
    fillWaitSeconds: seconds(3_600).min(FILL_WAIT_SECONDS_MIN, `must be at least ${FILL_WAIT_SECONDS_MIN}: a filler renews its claim every third of it, and the claim must outlast clock skew between nodes and a slow store write`).default(120),
    /** One request to the shared store; past it the store counts as down for that request. */
    timeoutSeconds: seconds(600).default(30),
    /** A key every node holds and the store does not (a Secret mount, 32 bytes or more): the tier's
     * records (tags, links, claims) are written with an HMAC under it, and only records that carry
     * one are believed. Absent: records are believed as the store holds them (docs/security.md, threat model). */
    recordKeyFile: absolutePath.optional(),
    /** A node that lost the claim to fetch a blob streams the filler's fill from segment objects it
     * publishes in the store while the bytes arrive (docs/cache.md, "Streaming fills"); false: it
     * waits for the whole blob, as before (a store that bills per request steeply). */
    streamFills: z.boolean().default(true),
  })
  .refine((s) => [s.s3, s.azure, s.gcs, s.filesystem].filter((b) => b !== undefined).length === 1, 'needs exactly one of s3, azure, gcs, filesystem');

const cacheSchema = z.strictObject({
  /** The node store (a hostPath in the chart): blobs by digest, links, tag records. */
  path: z.string().min(1).refine((p) => p.startsWith('/'), 'must be an absolute path'),
  /** Least recently used blobs are evicted above this. */
  maxBytes: byteQuantity.default(20 * 2 ** 30),
  /** Free space the cache never takes from its disk: below it, nothing new is written (pulls are relayed). */
  minFreeBytes: byteQuantity.default(2 ** 30),
  /** Free inodes the cache never takes from its disk (a number, or a percentage of the filesystem's):
   * below it, no blob, tag record or link is written. Above kubelet's 5% inode eviction threshold. */
  minFreeInodes: inodeFloor.default('10%'),
  /** A tag answered upstream within this is not asked again. */
  tagTTLSeconds: seconds(86_400).default(30),
  /** When the upstream fails, a tag's last known digest may be served this long after it was confirmed. */
  staleIfErrorSeconds: seconds(365 * 86_400).default(604_800),
  /** passthrough: a client's credential accepted upstream for a repository serves cached content this long. */
  credentialTTLSeconds: seconds(3_600).default(60),
  /** Content a (rule, repository) has a link to is confirmed upstream again (a HEAD) when its link is older than this. */
  reconfirmSeconds: seconds(30 * 86_400).default(3_600),
  /** The second tier, shared by every node (docs/cache.md, "Sharing the cache across nodes"). */
  shared: sharedSchema.optional(),
});

export const configSchema = z.strictObject({
  proxy: z
    .strictObject({
      host: z.string().regex(REGISTRY_HOST, 'must be a host name or address').refine((h) => !h.includes(':') || h.startsWith('['), 'must not include a port; use proxy.port').default('localhost'),
      port: z.number().int().min(1).max(65535).default(30500),
    })
    .default({ host: 'localhost', port: 30500 }),
  webhook: z
    .strictObject({
      pullSecretName: z.string().regex(DNS_SUBDOMAIN, 'must be a DNS subdomain').max(253).default('pullbridge-pull'),
      optOutLabel: z.string().regex(LABEL_KEY, 'must be a label key').default('pullbridge.io/ignore'),
      namespace: z.string().regex(DNS_LABEL, 'must be a DNS label').default('pullbridge'),
      excludedNamespaces: z.array(z.string().regex(DNS_LABEL, 'must be a namespace name')).default([]),
    })
    .default({ pullSecretName: 'pullbridge-pull', optOutLabel: 'pullbridge.io/ignore', namespace: 'pullbridge', excludedNamespaces: [] }),
  broker: z
    .strictObject({
      /** Files holding the keys for namespace credentials: the first signs, all verify (rotation). */
      keyFiles: z.array(z.string().min(1)).min(1, 'needs at least one key file'),
    })
    .optional(),
  cache: cacheSchema.optional(),
  registries: z.array(ruleSchema).default([]),
});

export type ConfigInput = z.input<typeof configSchema>;
export type RawConfig = z.output<typeof configSchema>;
export type RawRule = RawConfig['registries'][number];
export type AuthMode = RawRule['auth']['mode'];
export type CacheConfig = NonNullable<RawConfig['cache']>;
export type SharedConfig = NonNullable<CacheConfig['shared']>;

export interface Rule extends RawRule {
  /** Canonical hosts (lower case, Docker Hub aliases folded). */
  readonly hosts: ReadonlySet<string>;
  readonly repositoryFilter: CompiledFilter;
  readonly namespaceFilter: CompiledFilter;
}

export interface Config {
  readonly proxy: RawConfig['proxy'];
  readonly webhook: RawConfig['webhook'];
  readonly broker: RawConfig['broker'];
  /** The node cache; absent: every pull streams from upstream. */
  readonly cache: CacheConfig | undefined;
  readonly registries: readonly Rule[];
  /** `host:port` of the proxy as it is written into rewritten references. */
  readonly proxyAuthority: string;
}

export interface ConfigError {
  /** The offending key, e.g. `registries[1].upstream`. */
  readonly key: string;
  readonly message: string;
}

export type ConfigResult = { readonly ok: true; readonly config: Config } | { readonly ok: false; readonly errors: readonly ConfigError[] };

/** Namespaces pullbridge never mutates, whatever the config says. */
export const ALWAYS_EXCLUDED_NAMESPACES: readonly string[] = ['kube-system'];

function formatKey(path: readonly PropertyKey[]): string {
  let key = '';
  for (const part of path) {
    if (typeof part === 'number') key += `[${part}]`;
    else key += key === '' ? String(part) : `.${String(part)}`;
  }
  return key === '' ? '(top level)' : key;
}

function valueAt(document: unknown, path: readonly PropertyKey[]): unknown {
  let value = document;
  for (const part of path) {
    if (value === null || typeof value !== 'object') return undefined;
    value = (value as Record<PropertyKey, unknown>)[part];
  }
  return value;
}

function describeType(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'object') return 'a mapping';
  return `${typeof value} ${JSON.stringify(value)}`;
}

function schemaErrors(document: unknown, error: z.ZodError): ConfigError[] {
  const errors: ConfigError[] = [];
  for (const issue of error.issues) {
    if (issue.code === 'unrecognized_keys') {
      for (const unknown of issue.keys) errors.push({ key: formatKey([...issue.path, unknown]), message: 'unknown key' });
    } else if (issue.code === 'invalid_type') {
      const actual = valueAt(document, issue.path);
      const message = actual === undefined ? `is required (${issue.expected})` : `must be ${issue.expected}, got ${describeType(actual)}`;
      errors.push({ key: formatKey(issue.path), message });
    } else {
      errors.push({ key: formatKey(issue.path), message: issue.message });
    }
  }
  return errors;
}

const hasPatterns = (value: unknown): boolean => Array.isArray(value) && value.length > 0;
const asRecord = (value: unknown): Record<string, unknown> => (value !== null && typeof value === 'object' && !Array.isArray(value) ? (value as Record<string, unknown>) : {});

/**
 * Checks that span several keys, which the schema cannot express. They read the document
 * defensively, so that they are reported together with schema errors elsewhere.
 */
function crossKeyErrors(document: unknown): ConfigError[] {
  const errors: ConfigError[] = [];
  const proxy = asRecord(asRecord(document).proxy);
  const proxyAuthority = canonicalRegistryHost(`${typeof proxy.host === 'string' ? proxy.host : 'localhost'}:${typeof proxy.port === 'number' ? proxy.port : 30500}`);
  const registries = asRecord(document).registries;
  const hasBroker = asRecord(document).broker !== undefined; // its own errors are the schema's
  const names = new Map<string, number>();
  (Array.isArray(registries) ? registries : []).forEach((entry: unknown, index) => {
    const rule = asRecord(entry);
    const mode = asRecord(rule.auth).mode ?? 'broker';
    const rewrite = rule.rewrite ?? 'always';
    // A rewrite: never rule sends no client to the proxy; it needs a namespace credential only to resolve or verify at admission.
    const needsNamespaceCredential = rewrite !== 'never' || rule.pinDigest === true || rule.verify !== undefined;
    if (mode === 'broker' && !hasBroker && needsNamespaceCredential) {
      // Without keys the proxy cannot check a namespace credential and the webhook cannot issue one.
      errors.push({ key: `registries[${index}].auth.mode`, message: 'broker needs broker.keyFiles to check client credentials' });
    }
    if (mode === 'anonymous' && rule.credentials !== undefined && !hasPatterns(asRecord(rule.repositories).include)) {
      // Anonymous clients get the rule's credentials: only an explicit list bounds what they open up.
      errors.push({ key: `registries[${index}].repositories.include`, message: 'an anonymous rule with credentials must list the repositories it serves; without a list, anyone who reaches the proxy pulls every repository of the upstream with these credentials' });
    }
    const namespaces = asRecord(rule.namespaces);
    if ((mode === 'anonymous' || mode === 'passthrough') && (hasPatterns(namespaces.include) || hasPatterns(namespaces.exclude))) {
      // Only a broker credential names a namespace; the webhook's filter alone is bypassed by writing the proxy reference.
      errors.push({ key: `registries[${index}].namespaces`, message: `auth mode "${String(mode)}" does not identify the client's namespace, so the proxy cannot enforce a namespace filter; use auth mode broker` });
    }
    if (typeof rule.name === 'string') {
      const seen = names.get(rule.name);
      if (seen !== undefined) errors.push({ key: `registries[${index}].name`, message: `duplicate rule name "${rule.name}" (also registries[${seen}])` });
      else names.set(rule.name, index);
    }
    (Array.isArray(rule.match) ? rule.match : []).forEach((host: unknown, hostIndex) => {
      if (typeof host === 'string' && canonicalRegistryHost(host) === proxyAuthority) {
        errors.push({ key: `registries[${index}].match[${hostIndex}]`, message: `"${host}" is the proxy itself; rewriting it would loop` });
      }
    });
    if (rewrite === 'never') {
      if (rule.shareUpstreamCredentials !== true) {
        errors.push({ key: `registries[${index}].shareUpstreamCredentials`, message: 'rewrite: never writes this rule\'s upstream credential itself into a pull secret in each namespace it admits; set shareUpstreamCredentials: true to accept that (docs/security.md)' });
      }
      if (!hasPatterns(namespaces.include)) {
        errors.push({ key: `registries[${index}].namespaces.include`, message: 'rewrite: never hands the upstream credential to namespaces: list the namespaces that may have it' });
      }
      if (rule.credentials === undefined) {
        errors.push({ key: `registries[${index}].credentials`, message: 'rewrite: never provisions a pull secret from the rule\'s credentials: give credentials' });
      }
    } else if (rule.shareUpstreamCredentials === true) {
      errors.push({ key: `registries[${index}].shareUpstreamCredentials`, message: 'only with rewrite: never (other modes never hand the upstream credential to a namespace)' });
    }
    const upstreamAwareKey = rule.rewrite === 'private-only' ? 'rewrite' : rule.pinDigest === true ? 'pinDigest' : rule.verify !== undefined ? 'verify' : undefined;
    if (upstreamAwareKey !== undefined && !hasBroker) {
      // The webhook asks the proxy tier with the resolver token, which is derived from the broker key, whatever the rule's auth mode.
      errors.push({ key: `registries[${index}].${upstreamAwareKey}`, message: `${upstreamAwareKey === 'rewrite' ? 'rewrite: private-only' : upstreamAwareKey} asks the proxy tier at admission with a token derived from the broker key: give broker.keyFiles (also for an anonymous rule)` });
    }
    if (mode === 'passthrough' && (rule.pinDigest === true || rule.verify !== undefined)) {
      // The webhook resolves with the namespace's own authorization; in passthrough that is the Pod's own pull secret, which the webhook never reads.
      errors.push({ key: `registries[${index}].${rule.pinDigest === true ? 'pinDigest' : 'verify'}`, message: 'auth mode "passthrough" gives the webhook no credential of the namespace to resolve the image with; use auth mode broker or anonymous' });
    }
    if (asRecord(rule.forwardProxy).mode === 'forward' && typeof rule.upstream === 'string' && rule.upstream.startsWith('https:')) {
      // A connectivity proxy that routes on Host takes plain HTTP and does TLS itself, or not at all.
      errors.push({ key: `registries[${index}].forwardProxy.mode`, message: 'mode "forward" sends plain HTTP; use an http:// upstream, or mode "connect" for https' });
    }
  });
  return errors;
}

export function compileConfig(raw: RawConfig): Config {
  return {
    proxy: raw.proxy,
    webhook: raw.webhook,
    broker: raw.broker,
    cache: raw.cache && { ...raw.cache },
    proxyAuthority: `${raw.proxy.host}:${raw.proxy.port}`,
    registries: raw.registries.map((rule) => ({
      ...rule,
      hosts: new Set(rule.match.map(canonicalRegistryHost)),
      repositoryFilter: compileFilter(rule.repositories),
      namespaceFilter: compileFilter(rule.namespaces),
    })),
  };
}

/** A file a config names: the key that names it, its path, and what it must hold. */
export interface ConfigFile {
  readonly key: string;
  readonly path: string;
  readonly holds: 'broker-key' | 'secret' | 'ca-certificates' | 'public-key';
}

/**
 * The files a component reads for a config, to be loaded before it takes the config up: the proxy
 * reads them all (the cosign keys too: it checks signatures before serving); the webhook the signing key (it signs namespace credentials), the cosign keys, and
 * the upstream credentials of rewrite: never rules only (it writes those into pull secrets; no other
 * rule's credential reaches it). Verify-only broker keys are not among them: they may be absent or
 * bad without stopping anything.
 */
export function filesReadBy(config: Config, component: 'proxy' | 'webhook'): ConfigFile[] {
  const files: ConfigFile[] = [];
  const signingKey = config.broker?.keyFiles[0];
  if (signingKey !== undefined) files.push({ key: 'broker.keyFiles[0]', path: signingKey, holds: 'broker-key' });
  const credentialFiles = (key: string, credentials: RawRule['credentials']) => {
    if (credentials?.usernameFile !== undefined) files.push({ key: `${key}.usernameFile`, path: credentials.usernameFile, holds: 'secret' });
    if (credentials?.passwordFile !== undefined) files.push({ key: `${key}.passwordFile`, path: credentials.passwordFile, holds: 'secret' });
  };
  if (component === 'webhook') {
    config.registries.forEach((rule, i) => {
      if (rule.rewrite === 'never') credentialFiles(`registries[${i}].credentials`, rule.credentials);
      rule.verify?.cosign.publicKeyFiles.forEach((path, k) => files.push({ key: `registries[${i}].verify.cosign.publicKeyFiles[${k}]`, path, holds: 'public-key' }));
    });
    return files;
  }
  config.registries.forEach((rule, i) => {
    credentialFiles(`registries[${i}].credentials`, rule.credentials);
    credentialFiles(`registries[${i}].forwardProxy.credentials`, rule.forwardProxy?.credentials);
    if (rule.tls?.caFile !== undefined) files.push({ key: `registries[${i}].tls.caFile`, path: rule.tls.caFile, holds: 'ca-certificates' });
    // The proxy checks signatures before serving a manifest of a verify rule (src/proxy/verifygate.ts).
    rule.verify?.cosign.publicKeyFiles.forEach((path, k) => files.push({ key: `registries[${i}].verify.cosign.publicKeyFiles[${k}]`, path, holds: 'public-key' }));
  });
  return files;
}

/**
 * The files a running webhook reads, given what it does: the cosign keys always (verify), the
 * signing key when it provisions pull secrets or asks the proxy tier (the resolver token), the
 * upstream credentials of rewrite: never rules when it provisions pull secrets.
 */
export function filesWebhookReads(config: Config, uses: { readonly pullSecrets: boolean; readonly resolver: boolean }): ConfigFile[] {
  return filesReadBy(config, 'webhook').filter((file) => file.holds === 'public-key' || (file.holds === 'broker-key' ? uses.pullSecrets || uses.resolver : uses.pullSecrets));
}

/** Validates an already-parsed document (e.g. from YAML) and compiles it. */
export function validateConfig(document: unknown): ConfigResult {
  const input = document ?? {};
  const parsed = configSchema.safeParse(input);
  const errors = [...(parsed.success ? [] : schemaErrors(input, parsed.error)), ...crossKeyErrors(input)];
  if (!parsed.success || errors.length > 0) return { ok: false, errors };
  return { ok: true, config: compileConfig(parsed.data) };
}

/** Parses config.yaml text (YAML or JSON) and validates it. */
export function parseConfig(text: string): ConfigResult {
  let document: unknown;
  try {
    document = parseYaml(text, { prettyErrors: true, uniqueKeys: true, maxAliasCount: 100 });
  } catch (error) {
    // The first line names the line and column; the rest is a code excerpt (one line per error here).
    const message = (error instanceof YAMLParseError || error instanceof Error ? error.message : String(error)).split('\n')[0]?.replace(/:$/, '') ?? '';
    return { ok: false, errors: [{ key: '(document)', message: `not valid YAML: ${message}` }] };
  }
  if (document !== null && document !== undefined && (typeof document !== 'object' || Array.isArray(document))) {
    return { ok: false, errors: [{ key: '(document)', message: 'must be a mapping with proxy, webhook and registries keys' }] };
  }
  return validateConfig(document);
}

export function formatConfigErrors(errors: readonly ConfigError[]): string {
  return errors.map((e) => `${e.key}: ${e.message}`).join('\n');
}

/**
 * The keys the schema knows in the mapping at `path` (e.g. `['registries', 0, 'auth']`); null where
 * the path leads to no mapping. For suggestions on unknown keys.
 */
export function knownKeysAt(path: readonly PropertyKey[]): string[] | null {
  let schema: z.core.$ZodType | undefined = configSchema;
  const unwrap = (s: z.core.$ZodType): z.core.$ZodType => {
    const def = s._zod.def;
    if (def.type === 'optional' || def.type === 'default' || def.type === 'nullable') return unwrap((def as z.core.$ZodOptionalDef).innerType);
    if (def.type === 'pipe') return unwrap((def as z.core.$ZodPipeDef).in);
    return s;
  };
  for (const part of path) {
    if (schema === undefined) return null;
    const s = unwrap(schema);
    const def = s._zod.def;
    if (typeof part === 'number' && def.type === 'array') schema = (def as z.core.$ZodArrayDef).element;
    else if (typeof part === 'string' && def.type === 'object') schema = (def as z.core.$ZodObjectDef).shape[part];
    else return null;
  }
  if (schema === undefined) return null;
  const def = unwrap(schema)._zod.def;
  return def.type === 'object' ? Object.keys((def as z.core.$ZodObjectDef).shape) : null;
}
