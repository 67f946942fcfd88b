// Client credentials: the per-namespace broker credential the webhook provisions and the proxy
// checks, Basic header parsing, the dockerconfigjson payload, and the operations port's bearer
// tokens. Pure: keys come in as bytes. Here (below proxy, webhook and k8s) because all three use it.

import { createHmac, timingSafeEqual } from 'node:crypto';

const TOKEN_PREFIX = 'pb1.';

/** The password a namespace authenticates with: an HMAC of the namespace under the signing key. */
export function namespaceToken(key: Uint8Array, namespace: string): string {
  return TOKEN_PREFIX + createHmac('sha256', key).update(`pullbridge-namespace:${namespace}`).digest('base64url');
}

/**
 * Whether `password` is the credential of `namespace` under any of the keys (the first key signs;
 * the others are still accepted so that a key rotation never breaks Pods mid-flight).
 */
export function verifyNamespaceToken(keys: readonly Uint8Array[], namespace: string, password: string): boolean {
  const given = Buffer.from(password);
  let ok = false;
  for (const key of keys) {
    const expected = Buffer.from(namespaceToken(key, namespace));
    // Compare every key, in constant time, so timing says nothing about which key or prefix matched.
    if (expected.length === given.length && timingSafeEqual(expected, given)) ok = true;
  }
  return ok;
}

export interface BasicCredentials {
  readonly username: string;
  readonly password: string;
}

/** Parses `Authorization: Basic …`; null when absent or not Basic. */
export function parseBasicAuthorization(header: string | undefined): BasicCredentials | null {
  if (!header) return null;
  const m = /^Basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(header);
  if (!m) return null;
  const decoded = Buffer.from(m[1] ?? '', 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return null;
  return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
}

/** The `.dockerconfigjson` of the pull secret for a namespace, keyed by the proxy's host:port. */
export function dockerConfigJson(proxyAuthority: string, namespace: string, key: Uint8Array): string {
  const password = namespaceToken(key, namespace);
  return JSON.stringify({
    auths: { [proxyAuthority]: { username: namespace, password, auth: Buffer.from(`${namespace}:${password}`).toString('base64') } },
  });
}

/**
 * Bearer tokens on a proxy's operations port, one per purpose: the status collector's (reads
 * /status) and the admission resolver's (asks the upstream through the proxy, /admission/…). Each is
 * an HMAC of its own purpose string under the broker key both sides already hold, so that no other
 * Secret exists, neither is any namespace's credential, and one never opens the other's endpoints.
 */
const OPS_TOKEN_PURPOSES = {
  collector: 'pullbridge ops collector v1',
  resolver: 'pullbridge admission resolver v1',
} as const;

export type OpsTokenPurpose = keyof typeof OPS_TOKEN_PURPOSES;

/** The bearer token for `purpose` under `key`: hex of the HMAC. */
export function opsToken(key: Uint8Array, purpose: OpsTokenPurpose): string {
  return createHmac('sha256', key).update(OPS_TOKEN_PURPOSES[purpose]).digest('hex');
}

/** Whether `authorization` is `Bearer <token for purpose>` under any of the keys (constant time, every key compared). */
export function verifyOpsToken(keys: readonly Uint8Array[], purpose: OpsTokenPurpose, authorization: string | undefined): boolean {
  const m = /^Bearer\s+(\S+)\s*$/i.exec(authorization ?? '');
  if (!m) return false;
  const given = Buffer.from(m[1] ?? '');
  let ok = false;
  for (const key of keys) {
    const expected = Buffer.from(opsToken(key, purpose));
    if (expected.length === given.length && timingSafeEqual(expected, given)) ok = true;
  }
  return ok;
}
