// Cosign key-based signatures, checked without I/O: the signature manifest, each simple-signing
// payload against its layer digest, the signature over the payload bytes against PEM public keys,
// and the payload's claim on the image digest. The format is cosign's own
// (https://github.com/sigstore/cosign/blob/main/specs/SIGNATURE_SPEC.md): an OCI (or Docker) image
// manifest under the tag `sha256-<hex>.sig` or referring to the image as an OCI 1.1 referrer, one
// layer per signature with media type application/vnd.dev.cosign.simplesigning.v1+json whose blob
// is the payload and whose annotation dev.cosignproject.cosign/signature is the base64 signature.
// Keys only: certificates, Rekor bundles and the transparency log are not read (docs/security.md).

import { createHash, createPublicKey, verify as verifySignature, type KeyObject } from 'node:crypto';
import { digestError } from '../reference/reference.js';
import { ed25519phVerify } from './ed25519ph.js';

export const SIMPLE_SIGNING_MEDIA_TYPE = 'application/vnd.dev.cosign.simplesigning.v1+json';
export const SIGNATURE_ANNOTATION = 'dev.cosignproject.cosign/signature';
/** The artifactType of cosign's signature manifests as OCI 1.1 referrers (`--registry-referrers-mode=oci-1-1`). */
export const COSIGN_SIGNATURE_ARTIFACT_TYPE = 'application/vnd.dev.cosign.artifact.sig.v1+json';
const SIMPLE_SIGNING_TYPE = 'cosign container image signature';

const MANIFEST_MEDIA_TYPES = new Set(['application/vnd.oci.image.manifest.v1+json', 'application/vnd.docker.distribution.manifest.v2+json']);
const INDEX_MEDIA_TYPES = new Set(['application/vnd.oci.image.index.v1+json', 'application/vnd.docker.distribution.manifest.list.v2+json']);

// Bounds on what an upstream can make admission read and hash. cosign appends a layer per `sign`
// (a re-signed image has a few); a payload is a few hundred bytes.
export const MAX_SIGNATURE_MANIFEST_BYTES = 256 * 1024;
export const MAX_SIGNATURE_LAYERS = 32;
export const MAX_PAYLOAD_BYTES = 64 * 1024;
/** Signature manifests read from one referrers index. */
export const MAX_REFERRER_SIGNATURES = 8;
const MAX_SIGNATURE_BASE64_CHARS = 4096;

/** One signature of a signature manifest: where its payload is, and the signature over it. */
export interface SignatureLayer {
  /** The payload blob's digest. */
  readonly digest: string;
  readonly size: number;
  readonly signature: Buffer;
}

export type SignatureManifest = { readonly ok: true; readonly layers: readonly SignatureLayer[]; readonly skipped: number } | { readonly ok: false; readonly reason: string };

export type KeyMatch = { readonly verified: true; readonly keyIndex: number } | { readonly verified: false; readonly reason: string };

/** The tag cosign stores an image's signatures under: `sha256:<hex>` → `sha256-<hex>.sig`. */
export function signatureTag(imageDigest: string): string {
  return `${referrersTag(imageDigest)}.sig`;
}

/** The OCI 1.1 referrers tag schema, for registries without the referrers API: `sha256-<hex>`. */
export function referrersTag(imageDigest: string): string {
  return imageDigest.replace(':', '-');
}

const isRecord = (value: unknown): value is Record<string, unknown> => value !== null && typeof value === 'object' && !Array.isArray(value);

function parseJson(body: Buffer): unknown {
  try {
    return JSON.parse(body.toString('utf8'));
  } catch {
    return undefined;
  }
}

/** Whether `body` hashes to `digest` (sha256, sha384 or sha512); false for a digest that does not parse. */
export function matchesDigest(body: Buffer, digest: string): boolean {
  if (digestError(digest) !== null) return false;
  const [algorithm, hex] = digest.split(':') as [string, string];
  return createHash(algorithm).update(body).digest('hex') === hex;
}

/** The signature layers of a cosign signature manifest; layers of other media types are skipped (counted). */
export function parseSignatureManifest(body: Buffer): SignatureManifest {
  if (body.length > MAX_SIGNATURE_MANIFEST_BYTES) return { ok: false, reason: `signature manifest larger than ${MAX_SIGNATURE_MANIFEST_BYTES} bytes` };
  const manifest = parseJson(body);
  if (!isRecord(manifest) || manifest.schemaVersion !== 2 || !Array.isArray(manifest.layers)) return { ok: false, reason: 'signature manifest malformed (not an image manifest)' };
  if (manifest.mediaType !== undefined && !MANIFEST_MEDIA_TYPES.has(String(manifest.mediaType))) return { ok: false, reason: `signature manifest malformed (media type ${String(manifest.mediaType)})` };
  if (manifest.layers.length > MAX_SIGNATURE_LAYERS) return { ok: false, reason: `signature manifest has ${manifest.layers.length} layers, more than ${MAX_SIGNATURE_LAYERS}` };
  const layers: SignatureLayer[] = [];
  let skipped = 0;
  for (const layer of manifest.layers) {
    if (!isRecord(layer) || layer.mediaType !== SIMPLE_SIGNING_MEDIA_TYPE) {
      skipped++;
      continue;
    }
    const annotations = isRecord(layer.annotations) ? layer.annotations : {};
    const encoded = annotations[SIGNATURE_ANNOTATION];
    const { digest, size } = layer;
    if (typeof digest !== 'string' || digestError(digest) !== null || typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) {
      return { ok: false, reason: 'signature manifest malformed (a layer without a valid digest and size)' };
    }
    if (typeof encoded !== 'string' || encoded.length === 0 || encoded.length > MAX_SIGNATURE_BASE64_CHARS || !/^[A-Za-z0-9+/]+={0,2}$/.test(encoded)) {
      return { ok: false, reason: `signature manifest malformed (layer ${digest} has no base64 ${SIGNATURE_ANNOTATION} annotation)` };
    }
    layers.push({ digest, size, signature: Buffer.from(encoded, 'base64') });
  }
  return { ok: true, layers, skipped };
}

export interface ReferrerDescriptor {
  readonly digest: string;
  readonly mediaType: string;
  readonly size: number;
}

/**
 * The cosign signature manifests listed in a referrers index (the API's answer or the referrers
 * tag's index). Filtered here as well: a registry may ignore the artifactType query. An index
 * carries artifactType per descriptor (OCI 1.1); cosign sets it through the config media type.
 */
export function signatureReferrers(body: Buffer): { readonly ok: true; readonly manifests: readonly ReferrerDescriptor[]; readonly more: number } | { readonly ok: false; readonly reason: string } {
  if (body.length > MAX_SIGNATURE_MANIFEST_BYTES) return { ok: false, reason: `referrers index larger than ${MAX_SIGNATURE_MANIFEST_BYTES} bytes` };
  const index = parseJson(body);
  if (!isRecord(index) || index.schemaVersion !== 2 || !Array.isArray(index.manifests)) return { ok: false, reason: 'referrers index malformed' };
  if (index.mediaType !== undefined && !INDEX_MEDIA_TYPES.has(String(index.mediaType))) return { ok: false, reason: `referrers index malformed (media type ${String(index.mediaType)})` };
  const manifests: ReferrerDescriptor[] = [];
  let more = 0;
  for (const entry of index.manifests) {
    if (!isRecord(entry) || entry.artifactType !== COSIGN_SIGNATURE_ARTIFACT_TYPE) continue;
    const { digest, mediaType, size } = entry;
    if (typeof digest !== 'string' || digestError(digest) !== null || typeof mediaType !== 'string' || typeof size !== 'number') continue;
    if (manifests.length < MAX_REFERRER_SIGNATURES) manifests.push({ digest, mediaType, size });
    else more++;
  }
  return { ok: true, manifests, more };
}

/** The image digest a simple-signing payload claims, or why it claims none. */
export function payloadDigest(payload: Buffer): { readonly ok: true; readonly digest: string } | { readonly ok: false; readonly reason: string } {
  const parsed = parseJson(payload);
  const critical = isRecord(parsed) ? parsed.critical : undefined;
  if (!isRecord(critical)) return { ok: false, reason: 'payload malformed (no critical section)' };
  if (critical.type !== SIMPLE_SIGNING_TYPE) return { ok: false, reason: `payload malformed (type ${JSON.stringify(critical.type)}, want "${SIMPLE_SIGNING_TYPE}")` };
  const image = critical.image;
  const digest = isRecord(image) ? image['docker-manifest-digest'] : undefined;
  if (typeof digest !== 'string' || digestError(digest) !== null) return { ok: false, reason: 'payload malformed (no valid critical.image.docker-manifest-digest)' };
  return { ok: true, digest };
}

/**
 * The hashes a key's signatures are checked with, as cosign makes them: ECDSA with the curve's hash
 * (cosign signs P-384 with SHA-384) and with SHA-256 (cosign verify's default, and what KMS and older
 * signers use); RSA PKCS#1 v1.5 with SHA-256; Ed25519 pure and pre-hashed (Ed25519ph, cosign's
 * default for Ed25519 keys since v2.2).
 */
function keyAccepts(key: KeyObject, payload: Buffer, signature: Buffer): boolean {
  try {
    switch (key.asymmetricKeyType) {
      case 'ec': {
        const curve = key.asymmetricKeyDetails?.namedCurve;
        const curveHash = curve === 'secp384r1' ? 'sha384' : curve === 'secp521r1' ? 'sha512' : 'sha256';
        return [...new Set([curveHash, 'sha256'])].some((hash) => verifySignature(hash, payload, key, signature));
      }
      case 'rsa':
        return verifySignature('sha256', payload, key, signature);
      case 'ed25519':
        return verifySignature(null, payload, key, signature) || ed25519phVerify(key, payload, signature);
      default:
        return false;
    }
  } catch {
    // A signature that is not even DER for the key's type.
    return false;
  }
}

/** Parses a PEM public key for `matchSignature`; throws with a one-line reason. */
/** A private key where a public one belongs (cosign.key for cosign.pub): said plainly, not as OpenSSL's decoder error. */
export class PrivateKeyGiven extends Error {
  constructor() {
    super('holds a private key; give the public key (cosign.pub)');
  }
}

const PEM_PRIVATE_KEY = /-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----/;

export function parsePublicKey(pem: string | Buffer): KeyObject {
  if (PEM_PRIVATE_KEY.test(typeof pem === 'string' ? pem : pem.toString('latin1'))) throw new PrivateKeyGiven();
  const key = createPublicKey(pem);
  if (!['ec', 'rsa', 'ed25519'].includes(key.asymmetricKeyType ?? '')) throw new Error(`unsupported key type ${String(key.asymmetricKeyType)} (cosign keys are ECDSA, RSA or Ed25519)`);
  return key;
}

/**
 * One signature layer with its payload against the keys and the image digest: the payload must hash
 * to the layer's digest, one of the keys must verify the signature over the payload's bytes, and the
 * payload must be a cosign image signature for `imageDigest`. The signature is checked before the
 * claim, so a claim is only read from a payload a key stands behind.
 */
export function matchSignature(layer: SignatureLayer, payload: Buffer, imageDigest: string, keys: readonly KeyObject[]): KeyMatch {
  if (payload.length > MAX_PAYLOAD_BYTES) return { verified: false, reason: `payload larger than ${MAX_PAYLOAD_BYTES} bytes` };
  if (!matchesDigest(payload, layer.digest)) return { verified: false, reason: `payload does not match its layer digest ${layer.digest}` };
  const keyIndex = keys.findIndex((key) => keyAccepts(key, payload, layer.signature));
  if (keyIndex < 0) return { verified: false, reason: keys.length === 1 ? 'signed by another key' : `signed by another key (none of the ${keys.length} keys verifies it)` };
  const claim = payloadDigest(payload);
  if (!claim.ok) return { verified: false, reason: claim.reason };
  if (claim.digest !== imageDigest) return { verified: false, reason: `signature for another digest (${claim.digest})` };
  return { verified: true, keyIndex };
}

/**
 * Whether a manifest is a cosign signature and nothing else: an image manifest whose layers are all
 * simple-signing payloads (JSON, never a filesystem). No runtime can run it (its layers unpack to
 * nothing), so a proxy that serves only signed images may still serve it to `cosign verify`.
 */
export function isSignatureOnlyManifest(body: Buffer): boolean {
  const parsed = parseSignatureManifest(body);
  return parsed.ok && parsed.skipped === 0 && parsed.layers.length > 0;
}
