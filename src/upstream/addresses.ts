// Where a storage redirect may lead. An upstream (or whoever controls its answers) must not turn the
// proxy into a way for Pods to read the node's own services, the cloud metadata endpoint or the
// cluster's private network. Pure: address in, refusal out.

import { BlockList, isIP } from 'node:net';

/** The node itself, link-local (cloud metadata), unspecified, multicast and reserved. */
const LOCAL: ReadonlyArray<readonly [string, number, 'ipv4' | 'ipv6']> = [
  ['0.0.0.0', 8, 'ipv4'],
  ['127.0.0.0', 8, 'ipv4'],
  ['169.254.0.0', 16, 'ipv4'],
  ['224.0.0.0', 4, 'ipv4'],
  ['240.0.0.0', 4, 'ipv4'],
  ['::', 128, 'ipv6'],
  ['::1', 128, 'ipv6'],
  ['fe80::', 10, 'ipv6'],
  ['ff00::', 8, 'ipv6'],
  // AWS's IPv6 metadata endpoint (inside fd00::/8, which an allow-list might open).
  ['fd00:ec2::254', 128, 'ipv6'],
  // 6to4 wraps any IPv4 address, 169.254.169.254 included.
  ['2002::', 16, 'ipv6'],
];

/** Refused unless allowed: private and shared address space, where the cluster and on-prem live. */
const PRIVATE: ReadonlyArray<readonly [string, number, 'ipv4' | 'ipv6']> = [
  ['10.0.0.0', 8, 'ipv4'],
  ['172.16.0.0', 12, 'ipv4'],
  ['192.168.0.0', 16, 'ipv4'],
  ['100.64.0.0', 10, 'ipv4'],
  ['fc00::', 7, 'ipv6'],
  // NAT64 embeds IPv4 addresses, private ones too.
  ['64:ff9b::', 96, 'ipv6'],
];

function blockList(entries: ReadonlyArray<readonly [string, number, 'ipv4' | 'ipv6']>): BlockList {
  const list = new BlockList();
  for (const [network, prefix, type] of entries) list.addSubnet(network, prefix, type);
  return list;
}

const local = blockList(LOCAL);
const privateRanges = blockList(PRIVATE);

/** `10.0.0.0/8`, `fd00::/8` or a bare address, as validated in the config. */
export function parseCidrs(cidrs: readonly string[]): AllowedAddresses {
  const blocks = new BlockList();
  const hosts = new BlockList();
  for (const cidr of cidrs) {
    const [network = '', prefix] = cidr.split('/');
    const type = isIP(network) === 6 ? 'ipv6' : 'ipv4';
    const bits = prefix === undefined ? (type === 'ipv4' ? 32 : 128) : Number(prefix);
    blocks.addSubnet(network, bits, type);
    if (bits === (type === 'ipv4' ? 32 : 128)) hosts.addAddress(network, type);
  }
  return { blocks, hosts };
}

/** The address as the family it really is: `::ffff:127.0.0.1` is 127.0.0.1. */
function normalise(address: string): { address: string; type: 'ipv4' | 'ipv6' } | null {
  const bare = address.replace(/^\[|\]$/g, '');
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(bare);
  if (mapped?.[1]) return { address: mapped[1], type: 'ipv4' };
  const family = isIP(bare);
  if (family === 0) return null;
  return { address: bare, type: family === 4 ? 'ipv4' : 'ipv6' };
}

const loopback = blockList([
  ['127.0.0.0', 8, 'ipv4'],
  ['::1', 128, 'ipv6'],
]);

/** Whether `address` (an IP, IPv4-mapped included) is the host's loopback. */
export function isLoopbackAddress(address: string): boolean {
  const ip = normalise(address);
  return ip !== null && loopback.check(ip.address, ip.type);
}

export interface AllowedAddresses {
  /** The rule's `redirects.allow` blocks: open private addresses. */
  readonly blocks: BlockList;
  /** Its single-address entries: the only way to open a loopback, link-local or reserved one, so
   * that a broad block (`10.0.0.0/8`, `fd00::/8`) never opens the node or a metadata endpoint. */
  readonly hosts: BlockList;
}

/**
 * Why a redirect target on `address` is refused, or null when it may be used: loopback, link-local,
 * reserved and private addresses are refused unless the rule's `redirects.allow` lists them — an
 * explicit decision of the platform team, e.g. for an on-prem object store. `fix` names the key that
 * opens it: `redirects.allow` for storage redirects, `auth.tokenRealms` for a token realm (a realm
 * listed there is trusted and never comes through this check).
 */
export function redirectAddressRefusal(address: string, allowed: AllowedAddresses, fix: 'redirects.allow' | 'auth.tokenRealms' = 'redirects.allow'): string | null {
  const ip = normalise(address);
  if (!ip) return `"${address}" is not an IP address`;
  if (local.check(ip.address, ip.type)) return allowed.hosts.check(ip.address, ip.type) ? null : `${ip.address} is a loopback, link-local or reserved address (not listed in ${fix})`;
  if (privateRanges.check(ip.address, ip.type) && !allowed.blocks.check(ip.address, ip.type)) return `${ip.address} is a private address (not in ${fix})`;
  return null;
}
