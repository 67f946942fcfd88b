// Signed schema1 manifests (Docker's `application/vnd.docker.distribution.manifest.v1+prettyjws`,
// which distribution 2.x still writes when it converts a manifest for a client whose Accept leaves
// schema2 out): their digest is that of the payload as it was before signing, not of the bytes
// served, whose signature (and its timestamp) changes on every conversion. Pure.

const SIGNED_SCHEMA1 = 'application/vnd.docker.distribution.manifest.v1+prettyjws';

/** Whether a manifest's media type is signed schema1. */
export function isSignedSchema1(mediaType: string | undefined): boolean {
  return (mediaType ?? '').split(';')[0]?.trim().toLowerCase() === SIGNED_SCHEMA1;
}

/**
 * The signed payload of a signed schema1 manifest (libtrust's JWS "pretty" form): the bytes before
 * the signatures, `formatLength` long, followed by the decoded `formatTail` of the signature's
 * protected header. Null when the document is not such a manifest, or its signatures disagree.
 */
export function schema1Payload(body: Buffer): Buffer | null {
  let document: unknown;
  try {
    document = JSON.parse(body.toString('utf8'));
  } catch {
    return null;
  }
  if (typeof document !== 'object' || document === null) return null;
  const signatures = (document as { signatures?: unknown }).signatures;
  if ((document as { schemaVersion?: unknown }).schemaVersion !== 1 || !Array.isArray(signatures) || signatures.length === 0) return null;
  let payload: Buffer | null = null;
  for (const signature of signatures as unknown[]) {
    const encoded = typeof signature === 'object' && signature !== null ? (signature as { protected?: unknown }).protected : undefined;
    if (typeof encoded !== 'string') return null;
    let header: unknown;
    try {
      header = JSON.parse(Buffer.from(encoded, 'base64url').toString('utf8'));
    } catch {
      return null;
    }
    const { formatLength, formatTail } = (header ?? {}) as { formatLength?: unknown; formatTail?: unknown };
    if (!Number.isSafeInteger(formatLength) || (formatLength as number) < 0 || (formatLength as number) > body.length || typeof formatTail !== 'string') return null;
    const candidate = Buffer.concat([body.subarray(0, formatLength as number), Buffer.from(formatTail, 'base64url')]);
    if (payload !== null && !payload.equals(candidate)) return null;
    payload = candidate;
  }
  return payload;
}
