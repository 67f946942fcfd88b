// Image references, following the grammar of distribution/reference (the parser that Docker,
// containerd and kubelet share) including Docker's normalisation of familiar names.
// Pure: strings in, data out.

export interface ImageReference {
  /** Registry host with optional port, as written (after Docker Hub normalisation). */
  readonly domain: string;
  /** Repository path below the registry, e.g. `library/nginx`. */
  readonly path: string;
  readonly tag?: string;
  readonly digest?: string;
}

export type ParseResult =
  | { readonly ok: true; readonly reference: ImageReference }
  | { readonly ok: false; readonly error: string };

export const DOCKER_HUB = 'docker.io';
/** Host names that all mean Docker Hub; image refs may use any of them. */
export const DOCKER_HUB_ALIASES: readonly string[] = ['docker.io', 'index.docker.io', 'registry-1.docker.io'];
/** The longest repository name (domain + "/" + path) a reference may carry. */
export const NAME_TOTAL_LENGTH_MAX = 255;
/**
 * The longest valid reference as written: a 255-character name (plus the 6 characters that
 * `index.docker.io` loses to `docker.io`), a 128-character tag and a sha512 digest. Anything longer
 * is refused before it is looked at, and no error message quotes it.
 */
export const REFERENCE_LENGTH_MAX = NAME_TOTAL_LENGTH_MAX + 6 + ':'.length + 128 + '@sha512:'.length + 128;

const ALPHANUMERIC = '[a-z0-9]+';
const SEPARATOR = '(?:[._]|__|[-]+)';
const PATH_COMPONENT = `${ALPHANUMERIC}(?:${SEPARATOR}${ALPHANUMERIC})*`;
const DOMAIN_COMPONENT = '(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])';
const DOMAIN_NAME = `${DOMAIN_COMPONENT}(?:\\.${DOMAIN_COMPONENT})*`;
const IPV6 = '\\[(?:[a-fA-F0-9:]+)\\]';
const HOST = `(?:${DOMAIN_NAME}|${IPV6})`;
const DOMAIN = `${HOST}(?::[0-9]+)?`;
const TAG = '[\\w][\\w.-]{0,127}';
const DIGEST = '[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}';

const DOMAIN_RE = new RegExp(`^${DOMAIN}$`);
const PATH_RE = new RegExp(`^${PATH_COMPONENT}(?:/${PATH_COMPONENT})*$`);
const TAG_RE = new RegExp(`^${TAG}$`);
const DIGEST_RE = new RegExp(`^${DIGEST}$`);
const HEX64_RE = /^[a-f0-9]{64}$/;

/** Hex lengths of the digest algorithms that registries and runtimes accept. */
const DIGEST_HEX_LENGTH: Readonly<Record<string, number>> = { sha256: 64, sha384: 96, sha512: 128 };

const fail = (error: string): ParseResult => ({ ok: false, error });

/** Validates a digest string (`algorithm:hex`); returns the reason it is invalid, or null. */
export function digestError(digest: string): string | null {
  if (!DIGEST_RE.test(digest)) return `invalid digest format "${digest}"`;
  const colon = digest.indexOf(':');
  const algorithm = digest.slice(0, colon);
  const hex = digest.slice(colon + 1);
  const length = DIGEST_HEX_LENGTH[algorithm];
  if (length === undefined) return `unsupported digest algorithm "${algorithm}"`;
  if (hex.length !== length) return `invalid ${algorithm} digest length ${hex.length}, want ${length}`;
  if (!/^[a-f0-9]+$/.test(hex)) return `digest hex must be lower case: "${digest}"`;
  return null;
}

/** Whether the first path component of a name is a registry host rather than a repository component. */
function looksLikeDomain(component: string): boolean {
  return component.includes('.') || component.includes(':') || component === 'localhost' || component.toLowerCase() !== component;
}

/**
 * Splits `name[:tag][@digest]` into its parts. The tag separator is the last `:` after the last `/`,
 * so a registry port is never mistaken for a tag.
 */
function splitTagAndDigest(input: string): { name: string; tag?: string; digest?: string } {
  let rest = input;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
  }
  let tag: string | undefined;
  const colon = rest.lastIndexOf(':');
  if (colon > rest.lastIndexOf('/')) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
  }
  return { name: rest, tag, digest };
}

/**
 * Parses an image reference the way Docker and kubelet do (ParseNormalizedNamed): a first component
 * with `.` or `:`, `localhost`, or upper case is a registry host; otherwise the registry is Docker Hub
 * and single-component names get `library/`. `index.docker.io` becomes `docker.io`.
 */
export function parseReference(input: string): ParseResult {
  if (typeof input !== 'string' || input.length === 0) return fail('empty image reference');
  if (input.length > REFERENCE_LENGTH_MAX) return fail(`image reference is ${input.length} characters long; a valid one has at most ${REFERENCE_LENGTH_MAX}`);
  if (input !== input.trim() || /\s/.test(input)) return fail('image reference contains white space');
  if (HEX64_RE.test(input)) return fail('invalid repository name: a 64-character hex string is reserved for image IDs');

  const { name, tag, digest } = splitTagAndDigest(input);
  if (name.length === 0) return fail('image reference has no repository name');

  const slash = name.indexOf('/');
  let domain: string;
  let path: string;
  if (slash === -1 || !looksLikeDomain(name.slice(0, slash))) {
    domain = DOCKER_HUB;
    path = name;
  } else {
    domain = name.slice(0, slash);
    path = name.slice(slash + 1);
  }
  if (domain === 'index.docker.io') domain = DOCKER_HUB;
  if (domain === DOCKER_HUB && !path.includes('/')) path = `library/${path}`;

  if (!DOMAIN_RE.test(domain)) return fail(`invalid registry host "${domain}"`);
  if (path.toLowerCase() !== path) return fail(`repository name "${path}" must be lower case`);
  if (!PATH_RE.test(path)) return fail(`invalid repository name "${path}"`);
  if (tag !== undefined && !TAG_RE.test(tag)) return fail(`invalid tag "${tag}"`);
  if (digest !== undefined) {
    const reason = digestError(digest);
    if (reason) return fail(reason);
  }
  const fullName = `${domain}/${path}`;
  if (fullName.length > NAME_TOTAL_LENGTH_MAX) {
    return fail(`repository name is ${fullName.length} characters long, more than ${NAME_TOTAL_LENGTH_MAX}`);
  }
  const reference: ImageReference = {
    domain,
    path,
    ...(tag !== undefined ? { tag } : {}),
    ...(digest !== undefined ? { digest } : {}),
  };
  return { ok: true, reference };
}

/** The canonical string of a reference: `domain/path[:tag][@digest]`. */
export function formatReference(ref: ImageReference): string {
  return `${ref.domain}/${ref.path}${ref.tag !== undefined ? `:${ref.tag}` : ''}${ref.digest !== undefined ? `@${ref.digest}` : ''}`;
}

/** Whether a repository path (without domain) is valid by the grammar. */
export function isValidRepositoryPath(path: string): boolean {
  return PATH_RE.test(path);
}

/** Whether a tag is valid by the grammar. */
export function isValidTag(tag: string): boolean {
  return TAG_RE.test(tag);
}

/**
 * Canonical form of a registry host for comparisons: lower case (DNS is case-insensitive) and every
 * Docker Hub alias folded to `docker.io`.
 */
export function canonicalRegistryHost(host: string): string {
  const lower = host.toLowerCase();
  return DOCKER_HUB_ALIASES.includes(lower) ? DOCKER_HUB : lower;
}

/** `host[:port]` split; the port as written (it may have leading zeros), undefined when absent. */
export function splitAuthority(authority: string): { readonly host: string; readonly port?: string } {
  const bracket = authority.startsWith('[') ? authority.indexOf(']') : -1;
  const colon = authority.lastIndexOf(':');
  if (bracket >= 0 ? colon > bracket : colon >= 0) return { host: authority.slice(0, colon), port: authority.slice(colon + 1) };
  return { host: authority };
}

/** One part of a numeric IPv4 host as inet_aton reads it: decimal, 0x hex or 0-led octal; NaN if none. */
function ipv4Part(part: string): number {
  if (/^0[xX][0-9a-fA-F]*$/.test(part)) return part.length === 2 ? 0 : parseInt(part.slice(2), 16);
  if (/^0[0-7]*$/.test(part)) return parseInt(part, 8);
  if (/^[1-9][0-9]*$/.test(part)) return parseInt(part, 10);
  return NaN;
}

/** The first octet of a numeric IPv4 host in any form resolvers accept (127.1, 2130706433, 0x7f.1, 0177.0.0.1), else undefined. */
function ipv4FirstOctet(host: string): number | undefined {
  const parts = host.split('.');
  if (parts.length > 4) return undefined;
  const values = parts.map(ipv4Part);
  if (values.some((v) => Number.isNaN(v))) return undefined;
  // The last part fills the remaining bytes: a.b.c.d, a.b.(c16), a.(b24), (a32).
  const last = values[values.length - 1] ?? NaN;
  if (values.slice(0, -1).some((v) => v > 255) || last >= 2 ** (8 * (5 - values.length))) return undefined;
  return values.length === 1 ? Math.floor(last / 2 ** 24) : values[0];
}

/**
 * Whether a registry host names this machine's loopback interface however it is spelled: `localhost`,
 * any 127.0.0.0/8 address in any numeric form, or the IPv6 loopback (also as IPv4-mapped). Runtimes
 * pull from every such host over plain HTTP and reach whatever listens on the port there.
 */
export function isLoopbackHost(host: string): boolean {
  const lower = host.toLowerCase().replace(/\.$/, '');
  if (lower === 'localhost' || lower.endsWith('.localhost')) return true;
  if (lower.startsWith('[') && lower.endsWith(']')) {
    const groups = expandIPv6(lower.slice(1, -1));
    if (groups === undefined) return false;
    if (groups.slice(0, 7).every((g) => g === 0) && groups[7] === 1) return true;
    // ::ffff:127.x.x.x (written in hex groups: the grammar has no dots inside brackets).
    return groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff && ((groups[6] ?? 0) >> 8) === 127;
  }
  return ipv4FirstOctet(lower) === 127;
}

/** The eight 16-bit groups of an IPv6 address of hex groups and at most one `::`, else undefined. */
function expandIPv6(address: string): number[] | undefined {
  const halves = address.split('::');
  if (halves.length > 2) return undefined;
  const parse = (s: string): number[] | undefined => {
    if (s === '') return [];
    const groups = s.split(':');
    return groups.every((g) => /^[0-9a-f]{1,4}$/.test(g)) ? groups.map((g) => parseInt(g, 16)) : undefined;
  };
  const head = parse(halves[0] ?? '');
  const tail = halves.length === 2 ? parse(halves[1] ?? '') : [];
  if (head === undefined || tail === undefined) return undefined;
  if (halves.length === 1) return head.length === 8 ? head : undefined;
  const fill = 8 - head.length - tail.length;
  return fill >= 1 ? [...head, ...new Array<number>(fill).fill(0), ...tail] : undefined;
}

/**
 * Whether `authority` (a reference's domain) reaches the same listener as `proxyAuthority`: the same
 * host and port, or, for a loopback proxy, any loopback spelling with the same port number (leading
 * zeros and all).
 */
export function isSameProxyAuthority(authority: string, proxyAuthority: string): boolean {
  if (canonicalRegistryHost(authority) === canonicalRegistryHost(proxyAuthority)) return true;
  const a = splitAuthority(authority);
  const p = splitAuthority(proxyAuthority);
  if (a.port === undefined || p.port === undefined || !/^[0-9]+$/.test(a.port) || !/^[0-9]+$/.test(p.port)) return false;
  if (parseInt(a.port, 10) !== parseInt(p.port, 10)) return false;
  if (isLoopbackHost(a.host) && isLoopbackHost(p.host)) return true;
  return canonicalRegistryHost(a.host) === canonicalRegistryHost(p.host);
}
