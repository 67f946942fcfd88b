// What `pullbridge validate` says beyond errors: rules that can never match (shadowed by an earlier
// rule, globs no repository or namespace can match), and the key meant by a misspelt one. Pure.

import { canonicalRegistryHost } from '../reference/reference.js';
import { knownKeysAt, type Config, type Rule } from './config.js';
import { compileGlob, type GlobFilter } from './glob.js';

export interface ConfigWarning {
  /** The key the warning is about, e.g. `registries[2]`. */
  readonly key: string;
  readonly message: string;
}

/** Repository paths as the distribution spec allows them (lower case components, separators). */
const REPOSITORY_PATH = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:\/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$/;
const NAMESPACE_NAME = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

/** The pattern with each wildcard taken as one ordinary character: if that is no valid name, no name matches. */
const sampleOf = (pattern: string): string => pattern.replace(/\/\*\*$/, '/a').replace(/\*\*|\*|\?/g, 'a');

const hasFilters = (rule: Rule): boolean =>
  (rule.repositories?.include.length ?? 0) + (rule.repositories?.exclude.length ?? 0) + (rule.namespaces?.include.length ?? 0) + (rule.namespaces?.exclude.length ?? 0) > 0;

const WILDCARD = /[*?]/;

/**
 * Whether glob `earlier` matches every name glob `later` does, in the cases that can be told simply:
 * a match-all (`**`; `*` too where names have no `/`), the same pattern, `x/**` before anything
 * under `x/`, or any glob before a plain name it matches. False when unsure (no warning then).
 */
function globCovers(earlier: string, later: string, oneSegment: boolean): boolean {
  if (earlier === '**' || (oneSegment && earlier === '*') || earlier === later) return true;
  if (earlier.endsWith('/**') && !WILDCARD.test(earlier.slice(0, -3)) && (later === earlier.slice(0, -3) || later.startsWith(earlier.slice(0, -2)))) return true;
  return !WILDCARD.test(later) && compileGlob(earlier)(later);
}

/** Whether filter `earlier` lets through everything `later` does (an absent filter lets through all). */
function filterCovers(earlier: GlobFilter | undefined, later: GlobFilter | undefined, oneSegment: boolean): boolean {
  const laterInclude = later?.include ?? [];
  const includes =
    (earlier?.include ?? []).length === 0 ||
    (laterInclude.length > 0 ? laterInclude : ['**']).every((l) => (earlier?.include ?? []).some((e) => globCovers(e, l, oneSegment)));
  // What the earlier filter excludes the later one must exclude too, or the later rule gets it.
  const excludes = (earlier?.exclude ?? []).every((e) => (later?.exclude ?? []).includes(e));
  return includes && excludes;
}

/** Whether the earlier rule takes every image of a host it shares with the later one (first match wins). */
const takesAllOf = (earlier: Rule, later: Rule): boolean =>
  !hasFilters(earlier) || (filterCovers(earlier.repositories, later.repositories, false) && filterCovers(earlier.namespaces, later.namespaces, true));

function globWarnings(rule: Rule, index: number): ConfigWarning[] {
  const warnings: ConfigWarning[] = [];
  const check = (side: 'repositories' | 'namespaces', list: 'include' | 'exclude', valid: RegExp, what: string) => {
    (rule[side]?.[list] ?? []).forEach((pattern, i) => {
      if (!valid.test(sampleOf(pattern))) warnings.push({ key: `registries[${index}].${side}.${list}[${i}]`, message: `"${pattern}" can never match: no ${what} looks like that` });
    });
  };
  check('repositories', 'include', REPOSITORY_PATH, 'repository path (lower-case components separated by "/")');
  check('repositories', 'exclude', REPOSITORY_PATH, 'repository path (lower-case components separated by "/")');
  check('namespaces', 'include', NAMESPACE_NAME, 'namespace name (a DNS label)');
  check('namespaces', 'exclude', NAMESPACE_NAME, 'namespace name (a DNS label)');
  (rule.repositories?.exclude ?? []).forEach((pattern, i) => {
    if (pattern === '**') warnings.push({ key: `registries[${index}].repositories.exclude[${i}]`, message: `"**" excludes every repository: the rule never matches` });
  });
  return warnings;
}

/** Warnings about a valid config: rules, or some of their hosts, that no image can ever reach. */
export function configWarnings(config: Config): ConfigWarning[] {
  const warnings: ConfigWarning[] = [];
  if (config.registries.length === 0) warnings.push({ key: 'registries', message: 'no registry rules: no image is rewritten and the proxy serves nothing; add a rule under registries' });
  config.registries.forEach((rule, index) => {
    const earlier = config.registries.slice(0, index);
    // An earlier rule on the same host whose filters let through all this one's takes its every image (first match wins).
    const takenBy = (host: string) => earlier.findIndex((e) => e.hosts.has(host) && takesAllOf(e, rule));
    const hosts = rule.match.map((m) => ({ written: m, by: takenBy(canonicalRegistryHost(m)) }));
    if (hosts.every((h) => h.by >= 0)) {
      const by = [...new Set(hosts.map((h) => `registries[${h.by}] (${config.registries[h.by]?.name ?? ''})`))].join(', ');
      const filtered = hosts.some((h) => hasFilters(config.registries[h.by] as Rule));
      warnings.push({ key: `registries[${index}]`, message: `rule "${rule.name}" can never match: ${by} comes first for the same registry and ${filtered ? 'its repositories and namespaces filters let through every image this rule would take' : 'has no repositories or namespaces filter leaving anything to it'}` });
    } else {
      hosts.forEach((h, i) => {
        if (h.by >= 0) warnings.push({ key: `registries[${index}].match[${i}]`, message: `"${h.written}" never reaches rule "${rule.name}": registries[${h.by}] (${config.registries[h.by]?.name ?? ''}) takes every image of it first` });
      });
    }
    const listed = new Map<string, number>();
    rule.match.forEach((m, i) => {
      const host = canonicalRegistryHost(m);
      const first = listed.get(host);
      if (first !== undefined) warnings.push({ key: `registries[${index}].match[${i}]`, message: `"${m}" is listed twice in rule "${rule.name}" (also match[${first}])` });
      else listed.set(host, i);
    });
    if (rule.onProbeFailure === 'leave' && rule.rewrite !== 'private-only' && !rule.pinDigest) {
      // Only the anonymous probe and the tag resolution consult it; verify has its own onFailure.
      warnings.push({ key: `registries[${index}].onProbeFailure`, message: `has no effect on rule "${rule.name}": only rewrite: private-only and pinDigest ask the upstream before rewriting (verify decides with verify.onFailure)` });
    }
    warnings.push(...globWarnings(rule, index));
  });
  return warnings;
}

/** Optimal string alignment distance: edits, with a swap of neighbours counting as one. */
export function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const row = d[i] as number[];
      const prev = d[i - 1] as number[];
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      row[j] = Math.min((prev[j] ?? 0) + 1, (row[j - 1] ?? 0) + 1, (prev[j - 1] ?? 0) + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) row[j] = Math.min(row[j] ?? 0, ((d[i - 2] as number[])[j - 2] ?? 0) + 1);
    }
  }
  return (d[a.length] as number[])[b.length] ?? 0;
}

/** Names other tools (and habit) use for keys the schema calls differently. */
const SYNONYMS: Readonly<Record<string, readonly string[]>> = {
  upstream: ['url', 'endpoint', 'registry', 'server', 'remote', 'mirror'],
  match: ['host', 'hosts', 'registries', 'domains', 'from'],
  registries: ['rules', 'mirrors'],
  credentials: ['auth', 'creds', 'login'],
  passwordFile: ['password', 'pass', 'secret'],
  username: ['user', 'login'],
  usernameFile: ['userFile'],
  keyFiles: ['keyFile', 'key', 'keys'],
  repositories: ['repos', 'images'],
  caFile: ['ca', 'caCert', 'cacert'],
  insecureSkipVerify: ['insecure', 'skipVerify'],
};

/** Parses `registries[0].auth.mode` into `['registries', 0, 'auth', 'mode']`. */
function parseKey(key: string): Array<string | number> {
  const parts: Array<string | number> = [];
  for (const m of key.matchAll(/([^.[\]]+)|\[(\d+)\]/g)) parts.push(m[2] !== undefined ? Number(m[2]) : (m[1] ?? ''));
  return parts;
}

/** The known key an unknown one most likely means (`registries[0].url` -> `upstream`), or null. */
export function suggestKey(key: string): string | null {
  const path = parseKey(key);
  const written = path.pop();
  if (typeof written !== 'string') return null;
  const known = knownKeysAt(path);
  if (!known || known.length === 0) return null;
  const lower = written.toLowerCase();
  const bySynonym = known.find((k) => SYNONYMS[k]?.some((s) => s.toLowerCase() === lower));
  if (bySynonym) return bySynonym;
  let best: { key: string; distance: number } | null = null;
  for (const candidate of known) {
    const distance = editDistance(lower, candidate.toLowerCase());
    if (best === null || distance < best.distance) best = { key: candidate, distance };
  }
  // Close enough to be a slip of the keyboard, not another word.
  return best && best.distance <= Math.max(1, Math.min(3, Math.floor(best.key.length / 3))) ? best.key : null;
}
