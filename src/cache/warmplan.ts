// What a cache warm-up fetches, decided from plain data (no I/O): which rule and repository an image
// reference goes through (the webhook's own decision), which child manifests of an index to take for
// the platforms asked for, which blobs an image manifest names, and what a `POST /warm` body asks.

import { digestError, parseReference } from '../reference/reference.js';
import type { Config } from '../rules/config.js';
import { decideImage, ruleByName, type DecisionReason } from '../rules/decide.js';

/** `POST /warm`: what one request may carry. */
export const WARM_BODY_LIMIT_BYTES = 64 * 1024;
export const WARM_IMAGES_MAX = 100;
export const WARM_PLATFORMS_MAX = 16;

export interface Platform {
  readonly os: string;
  readonly architecture: string;
  /** '' when none (or the architecture's default, which is folded away). */
  readonly variant: string;
}

/**
 * A platform in its usual spelling, containerd's normalisation applied: `x86_64` is amd64,
 * `aarch64` arm64, `arm64/v8` plain arm64, `arm` without a variant arm/v7.
 */
function normalizePlatform(os: string, architecture: string, variant: string): Platform {
  let arch = architecture.toLowerCase();
  let v = variant.toLowerCase();
  if (arch === 'x86_64' || arch === 'x86-64') arch = 'amd64';
  else if (arch === 'i386') arch = '386';
  else if (arch === 'aarch64') arch = 'arm64';
  else if (arch === 'armhf') [arch, v] = ['arm', 'v7'];
  else if (arch === 'armel') [arch, v] = ['arm', 'v6'];
  if (arch === 'arm64' && v === 'v8') v = '';
  if (arch === 'arm' && v === '') v = 'v7';
  return { os: os.toLowerCase(), architecture: arch, variant: v };
}

const PLATFORM_PART = /^[A-Za-z0-9_.-]{1,32}$/;

/** `os/architecture[/variant]`, as `--platform` and `"platforms"` take it. */
export function parsePlatform(text: string): { readonly ok: true; readonly platform: Platform } | { readonly ok: false; readonly error: string } {
  const parts = text.split('/');
  if (parts.length < 2 || parts.length > 3 || !parts.every((p) => PLATFORM_PART.test(p))) {
    return { ok: false, error: `platform ${JSON.stringify(text.slice(0, 100))} is not os/architecture[/variant], e.g. linux/amd64 or linux/arm64/v8` };
  }
  return { ok: true, platform: normalizePlatform(parts[0] ?? '', parts[1] ?? '', parts[2] ?? '') };
}

export function formatPlatform(platform: Platform): string {
  return `${platform.os}/${platform.architecture}${platform.variant ? `/${platform.variant}` : ''}`;
}

/** Whether an index entry's platform is one asked for: os and architecture equal, and the variant
 * too when one was asked for. */
export function platformMatches(wanted: Platform, actual: Platform): boolean {
  return wanted.os === actual.os && wanted.architecture === actual.architecture && (wanted.variant === '' || wanted.variant === actual.variant);
}

/** Why an image is not warmed: the rewrite decision's reason, or a rule the cache must not or cannot fill. */
export type WarmSkipReason = Exclude<DecisionReason, 'rewritten'> | 'rule-not-cached' | 'passthrough';

export type WarmTarget =
  | {
      readonly kind: 'warm';
      readonly image: string;
      readonly rule: string;
      /** The repository on the rule's upstream. */
      readonly repository: string;
      /** A digest when the reference has one (a runtime pulls by it), else the tag (`latest` when none). */
      readonly reference: string;
      readonly byDigest: boolean;
    }
  | {
      readonly kind: 'skip';
      readonly image: string;
      readonly rule: string | null;
      readonly reason: WarmSkipReason;
      readonly detail: string;
      /** The input itself is wrong (not a reference), rather than not meant for the cache. */
      readonly invalid: boolean;
    };

/**
 * Where an image, as written in a manifest, is fetched from: the rule the webhook would rewrite it
 * to (in any namespace) and the repository on its upstream. A rule with `cache: false` is never
 * filled, and a passthrough rule has no credentials of its own to fetch with.
 */
export function warmTarget(config: Config, image: string): WarmTarget {
  const decision = decideImage(config, image);
  const parsed = parseReference(image);
  if (decision.reason !== 'rewritten' || decision.rule === null || !parsed.ok) {
    const reason = decision.reason === 'rewritten' ? 'invalid-reference' : decision.reason;
    const invalid = reason === 'invalid-reference' || reason === 'rewritten-reference-invalid';
    return { kind: 'skip', image, rule: decision.rule, reason, detail: decision.detail ?? SKIP_DETAIL[reason], invalid };
  }
  const rule = ruleByName(config, decision.rule);
  if (rule && !rule.cache) return { kind: 'skip', image, rule: decision.rule, reason: 'rule-not-cached', detail: `rule "${decision.rule}" has cache: false`, invalid: false };
  if (rule?.auth.mode === 'passthrough') {
    return { kind: 'skip', image, rule: decision.rule, reason: 'passthrough', detail: `rule "${decision.rule}" is passthrough: it has no upstream credentials of its own to fetch with`, invalid: false };
  }
  const { path, tag, digest } = parsed.reference;
  return { kind: 'warm', image, rule: decision.rule, repository: path, reference: digest ?? tag ?? 'latest', byDigest: digest !== undefined };
}

const SKIP_DETAIL: Readonly<Record<WarmSkipReason, string>> = {
  'already-proxied': 'the image already points at the proxy: give it as written before the rewrite',
  'no-matching-rule': 'no registry rule matches its registry host',
  'repository-not-included': 'the rule does not include the repository',
  'repository-excluded': 'the rule excludes the repository',
  'namespace-not-allowed': 'the rule does not allow the namespace',
  'invalid-reference': 'not a valid image reference',
  'rewritten-reference-invalid': 'the rewritten reference would be invalid',
  'rule-not-cached': 'the rule has cache: false',
  passthrough: 'the rule is passthrough',
  'public-image': 'the upstream serves it anonymously: nodes pull it directly',
  'pull-secret-only': 'the rule has rewrite: never: nodes pull it directly with the rule\'s pull secret',
};

export interface Descriptor {
  readonly digest: string;
  readonly size: number;
  readonly mediaType: string;
}

export interface IndexEntry extends Descriptor {
  /** Absent when the entry names none. */
  readonly platform: Platform | undefined;
  /** A build attestation (buildx): runtimes never pull it. */
  readonly attestation: boolean;
}

export type ManifestDocument =
  | { readonly kind: 'index'; readonly manifests: readonly IndexEntry[] }
  | { readonly kind: 'image'; readonly config: Descriptor; readonly layers: readonly Descriptor[] }
  | { readonly kind: 'invalid'; readonly error: string };

const INDEX_TYPES = new Set(['application/vnd.oci.image.index.v1+json', 'application/vnd.docker.distribution.manifest.list.v2+json']);

const isRecord = (value: unknown): value is Record<string, unknown> => typeof value === 'object' && value !== null && !Array.isArray(value);

/** A descriptor from a manifest, or why it is unusable: its digest becomes a store path, so it is checked. */
function descriptorOf(value: unknown, where: string): Descriptor | string {
  if (!isRecord(value)) return `${where} is not a descriptor`;
  const { digest, size, mediaType } = value;
  if (typeof digest !== 'string') return `${where} has no digest`;
  const bad = digestError(digest);
  if (bad !== null) return `${where}: ${bad}`;
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) return `${where} has no valid size`;
  return { digest, size, mediaType: typeof mediaType === 'string' ? mediaType : '' };
}

/** Parses a manifest as an index (manifest list) or an image manifest, from its bytes and Content-Type. */
export function parseManifestDocument(body: Buffer, contentType: string | undefined): ManifestDocument {
  let document: unknown;
  try {
    document = JSON.parse(body.toString('utf8'));
  } catch {
    return { kind: 'invalid', error: 'the manifest is not JSON' };
  }
  if (!isRecord(document)) return { kind: 'invalid', error: 'the manifest is not a JSON object' };
  if (document.schemaVersion === 1) return { kind: 'invalid', error: 'schema 1 manifests are not supported' };
  const mediaType = typeof document.mediaType === 'string' ? document.mediaType : (contentType?.split(';')[0]?.trim() ?? '');
  if (INDEX_TYPES.has(mediaType) || (Array.isArray(document.manifests) && document.config === undefined)) {
    if (!Array.isArray(document.manifests)) return { kind: 'invalid', error: 'the index has no manifests' };
    const manifests: IndexEntry[] = [];
    for (const [i, entry] of document.manifests.entries()) {
      const descriptor = descriptorOf(entry, `manifests[${i}]`);
      if (typeof descriptor === 'string') return { kind: 'invalid', error: descriptor };
      const platform = isRecord(entry) && isRecord(entry.platform) ? entry.platform : undefined;
      const annotations = isRecord(entry) && isRecord(entry.annotations) ? entry.annotations : {};
      const os = typeof platform?.os === 'string' ? platform.os : undefined;
      const architecture = typeof platform?.architecture === 'string' ? platform.architecture : undefined;
      const variant = typeof platform?.variant === 'string' ? platform.variant : '';
      manifests.push({
        ...descriptor,
        platform: os !== undefined && architecture !== undefined ? normalizePlatform(os, architecture, variant) : undefined,
        attestation: annotations['vnd.docker.reference.type'] === 'attestation-manifest' || (os === 'unknown' && architecture === 'unknown'),
      });
    }
    return { kind: 'index', manifests };
  }
  if (document.config === undefined || !Array.isArray(document.layers)) return { kind: 'invalid', error: `not an image manifest or index (media type "${mediaType}")` };
  const config = descriptorOf(document.config, 'config');
  if (typeof config === 'string') return { kind: 'invalid', error: config };
  const layers: Descriptor[] = [];
  for (const [i, layer] of document.layers.entries()) {
    const descriptor = descriptorOf(layer, `layers[${i}]`);
    if (typeof descriptor === 'string') return { kind: 'invalid', error: descriptor };
    // Non-distributable (foreign) layers come from elsewhere, if at all: runtimes do not ask the registry.
    if (!/nondistributable|foreign/.test(descriptor.mediaType)) layers.push(descriptor);
  }
  return { kind: 'image', config, layers };
}

/**
 * The entries of an index to warm: every platform's (attestations left out: runtimes never pull
 * them), or those of the platforms asked for, and which of those the index does not have.
 */
export function selectManifests(manifests: readonly IndexEntry[], wanted: readonly Platform[]): { readonly selected: readonly IndexEntry[]; readonly missing: readonly Platform[] } {
  if (wanted.length === 0) return { selected: manifests.filter((m) => !m.attestation), missing: [] };
  const selected = manifests.filter((m) => !m.attestation && m.platform !== undefined && wanted.some((w) => m.platform !== undefined && platformMatches(w, m.platform)));
  const missing = wanted.filter((w) => !manifests.some((m) => !m.attestation && m.platform !== undefined && platformMatches(w, m.platform)));
  return { selected, missing };
}

export interface WarmRequest {
  readonly images: readonly string[];
  readonly platforms: readonly Platform[];
}

/** The body of `POST /warm` (`{"images": [...], "platforms": [...]}`, parsed JSON), or what is wrong with it. */
export function parseWarmRequest(body: unknown): { readonly ok: true; readonly request: WarmRequest } | { readonly ok: false; readonly error: string } {
  if (!isRecord(body)) return { ok: false, error: 'the body must be a JSON object: {"images": ["registry.example/team/app:1.0", ...], "platforms": ["linux/amd64", ...]}' };
  const unknown = Object.keys(body).filter((k) => k !== 'images' && k !== 'platforms');
  if (unknown.length > 0) return { ok: false, error: `unknown field ${JSON.stringify(unknown[0]?.slice(0, 100))}: only "images" and "platforms"` };
  const { images, platforms = [] } = body;
  if (!Array.isArray(images) || images.length === 0 || !images.every((i): i is string => typeof i === 'string')) return { ok: false, error: '"images" must be a non-empty array of image references (strings)' };
  if (images.length > WARM_IMAGES_MAX) return { ok: false, error: `"images" has ${images.length} entries; at most ${WARM_IMAGES_MAX} per request` };
  if (!Array.isArray(platforms) || !platforms.every((p): p is string => typeof p === 'string')) return { ok: false, error: '"platforms" must be an array of strings such as "linux/amd64"' };
  if (platforms.length > WARM_PLATFORMS_MAX) return { ok: false, error: `"platforms" has ${platforms.length} entries; at most ${WARM_PLATFORMS_MAX}` };
  const parsed: Platform[] = [];
  for (const text of platforms) {
    const platform = parsePlatform(text);
    if (!platform.ok) return { ok: false, error: platform.error };
    parsed.push(platform.platform);
  }
  return { ok: true, request: { images, platforms: parsed } };
}
