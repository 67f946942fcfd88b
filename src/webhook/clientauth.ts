// Who may ask for an admission decision: the check of a caller's TLS client certificate (pure; the
// TLS layer has already verified the signature against the client CA, or said why not).

export interface PeerCertificate {
  /** Whether the caller sent a certificate at all. */
  readonly presented: boolean;
  /** Whether the TLS layer verified it against the client CA. */
  readonly verified: boolean;
  /** Why verification failed (OpenSSL's reason), when it did. */
  readonly verifyError?: string;
  readonly commonName?: string;
  readonly dnsNames: readonly string[];
}

export type CallerDecision =
  | { readonly allowed: true }
  | { readonly allowed: false; readonly status: 401 | 403; readonly reason: string };

/**
 * 401 without a verified certificate, 403 when `allowedNames` is given and neither the CN nor a DNS
 * SAN is in it (exact match), else allowed.
 */
export function decideCaller(peer: PeerCertificate, allowedNames: readonly string[] | undefined): CallerDecision {
  if (!peer.presented) return { allowed: false, status: 401, reason: 'no client certificate' };
  if (!peer.verified) return { allowed: false, status: 401, reason: `client certificate not verified against the client CA: ${peer.verifyError ?? 'unknown reason'}` };
  if (allowedNames === undefined || allowedNames.length === 0) return { allowed: true };
  const names = [...(peer.commonName !== undefined ? [peer.commonName] : []), ...peer.dnsNames];
  if (names.some((name) => allowedNames.includes(name))) return { allowed: true };
  return { allowed: false, status: 403, reason: `client certificate names [${names.join(', ')}] are not among the allowed names` };
}

/** The DNS names in Node's `subjectaltname` ("DNS:a, IP Address:10.0.0.1, DNS:b"; Node quotes a
 * value that holds a comma or quote as a JSON string). */
export function dnsNamesOf(subjectaltname: string | undefined): string[] {
  if (!subjectaltname) return [];
  const names: string[] = [];
  for (const entry of subjectaltname.match(/(?:[^,"]|"(?:[^"\\]|\\.)*")+/g) ?? []) {
    const trimmed = entry.trim();
    if (!trimmed.startsWith('DNS:')) continue;
    const value = trimmed.slice(4);
    names.push(value.startsWith('"') ? (JSON.parse(value) as string) : value);
  }
  return names;
}
