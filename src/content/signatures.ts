// Fetching an image's cosign signatures through a RegistryView (the webhook's over the proxy tier, the
// proxy's own over its content source) and checking them with
// src/signature/cosign.ts. Where cosign puts them: the `sha256-<hex>.sig` tag (its default), and
// OCI 1.1 referrers (`--registry-referrers-mode=oci-1-1`) through the referrers API or, on a registry
// without it, the referrers tag `sha256-<hex>` that OCI clients keep instead. Both are asked at once;
// the first signature a key verifies wins.

import type { KeyObject } from 'node:crypto';
import { digestError } from '../reference/reference.js';
import type { RegistryTarget, RegistryView } from '../rules/registryview.js';
import { SecretFile } from '../shell/secretfiles.js';
import {
  COSIGN_SIGNATURE_ARTIFACT_TYPE,
  matchesDigest,
  matchSignature,
  MAX_PAYLOAD_BYTES,
  parsePublicKey,
  PrivateKeyGiven,
  parseSignatureManifest,
  referrersTag,
  signatureReferrers,
  signatureTag,
} from '../signature/cosign.js';

export type SignatureVerdict =
  | {
      readonly verified: true;
      /** Index into the keys given (publicKeyFiles order). */
      readonly keyIndex: number;
      /** Where the verified signature was found: the `.sig` tag, or a referrer's manifest digest. */
      readonly source: string;
    }
  | {
      readonly verified: false;
      readonly reason: string;
      /**
       * unsigned: no signature anywhere; rejected: signatures there, none verifies; unavailable: a
       * fetch failed and nothing verified (an answer not to cache).
       */
      readonly kind: 'unsigned' | 'rejected' | 'unavailable';
    };

/** A candidate signature manifest, named for reasons. */
interface Found {
  readonly source: string;
  readonly body: Buffer;
}

interface Discovery {
  readonly found: Found[];
  /** Fetches that failed or were refused: why nothing may have been found. */
  readonly failures: string[];
}

export type SignatureView = Pick<RegistryView, 'manifest' | 'blob' | 'referrers'>;

const MAX_REASONS = 3;

/** The keys of verify.cosign.publicKeyFiles, in order; throws naming the file that does not hold one. */
export function readCosignKeys(paths: readonly string[]): KeyObject[] {
  return paths.map((path) => {
    try {
      return parsePublicKey(new SecretFile(path).read());
    } catch (error) {
      if (error instanceof PrivateKeyGiven) throw new Error(`${path} ${error.message}`);
      throw new Error(`${path} holds no usable public key: ${(error as Error).message.split('\n')[0]}`);
    }
  });
}

async function discoverByReferrers(view: SignatureView, target: RegistryTarget, digest: string, namespace: string, signal: AbortSignal): Promise<Discovery> {
  const found: Found[] = [];
  const failures: string[] = [];
  const answer = await view.referrers({ ...target, digest, namespace, artifactType: COSIGN_SIGNATURE_ARTIFACT_TYPE }, signal);
  let index: Buffer | undefined;
  if (answer.kind === 'found') index = answer.index;
  else if (answer.kind === 'unsupported') {
    // The OCI 1.1 fallback: clients keep the referrers index under the tag sha256-<hex>.
    const tag = referrersTag(digest);
    const fallback = await view.manifest({ ...target, reference: tag, namespace, method: 'GET' }, signal);
    if (fallback.kind === 'found' && fallback.body !== undefined) index = fallback.body;
    else if (fallback.kind === 'failed') failures.push(`referrers tag ${tag}: ${fallback.error}`);
    else if (fallback.kind === 'refused' && fallback.status !== 404) failures.push(`referrers tag ${tag}: ${fallback.error}`);
  } else failures.push(`referrers: ${answer.error}`);
  if (index === undefined) return { found, failures };

  const listed = signatureReferrers(index);
  if (!listed.ok) return { found, failures: [listed.reason] };
  const manifests = await Promise.all(listed.manifests.map((descriptor) => view.manifest({ ...target, reference: descriptor.digest, namespace, method: 'GET' }, signal).then((answer) => ({ descriptor, answer }))));
  for (const { descriptor, answer } of manifests) {
    if (answer.kind !== 'found' || answer.body === undefined) failures.push(`referrer ${descriptor.digest}: ${answer.kind === 'found' ? 'no body' : answer.error}`);
    else if (!matchesDigest(answer.body, descriptor.digest)) failures.push(`referrer ${descriptor.digest}: manifest does not match its digest`);
    else found.push({ source: descriptor.digest, body: answer.body });
  }
  return { found, failures };
}

async function discoverByTag(view: SignatureView, target: RegistryTarget, digest: string, namespace: string, signal: AbortSignal): Promise<Discovery> {
  const tag = signatureTag(digest);
  const answer = await view.manifest({ ...target, reference: tag, namespace, method: 'GET' }, signal);
  if (answer.kind === 'found' && answer.body !== undefined) return { found: [{ source: tag, body: answer.body }], failures: [] };
  if (answer.kind === 'refused' && answer.status === 404) return { found: [], failures: [] };
  return { found: [], failures: [`${tag}: ${answer.kind === 'found' ? 'no body' : answer.error}`] };
}

function summarise(reasons: readonly string[]): string {
  const distinct = [...new Set(reasons)];
  const shown = distinct.slice(0, MAX_REASONS).join('; ');
  return distinct.length > MAX_REASONS ? `${shown}; and ${distinct.length - MAX_REASONS} more` : shown;
}

/**
 * Whether one of `keys` signed `digest` of `target`, in cosign's format, as the registry behind the
 * view holds it. Every request carries `signal` (the caller's admission deadline).
 */
export async function verifyCosignSignature(view: SignatureView, target: RegistryTarget, digest: string, namespace: string, keys: readonly KeyObject[], signal: AbortSignal): Promise<SignatureVerdict> {
  const invalid = digestError(digest);
  if (invalid !== null) return { verified: false, kind: 'rejected', reason: invalid };
  if (keys.length === 0) return { verified: false, kind: 'rejected', reason: 'no public key to verify with' };

  const [byReferrers, byTag] = await Promise.all([discoverByReferrers(view, target, digest, namespace, signal), discoverByTag(view, target, digest, namespace, signal)]);
  const found = [...byTag.found, ...byReferrers.found];
  const failures = [...byTag.failures, ...byReferrers.failures];
  if (found.length === 0) {
    if (failures.length > 0) return { verified: false, kind: 'unavailable', reason: `signature fetch failed: ${summarise(failures)}` };
    return { verified: false, kind: 'unsigned', reason: `unsigned (no ${signatureTag(digest)} and no signature referrers)` };
  }

  const rejections: string[] = [];
  let fetchFailed = failures.length > 0;
  for (const { source, body } of found) {
    const manifest = parseSignatureManifest(body);
    if (!manifest.ok) {
      rejections.push(manifest.reason);
      continue;
    }
    if (manifest.layers.length === 0) rejections.push('signature manifest holds no cosign signature');
    for (const layer of manifest.layers) {
      if (layer.size > MAX_PAYLOAD_BYTES) {
        rejections.push(`payload larger than ${MAX_PAYLOAD_BYTES} bytes`);
        continue;
      }
      const payload = await view.blob({ ...target, digest: layer.digest, namespace, maxBytes: MAX_PAYLOAD_BYTES }, signal);
      if (payload.kind !== 'found') {
        fetchFailed ||= payload.kind === 'failed';
        rejections.push(`payload ${layer.digest} fetch failed: ${payload.error}`);
        continue;
      }
      const match = matchSignature(layer, payload.body, digest, keys);
      if (match.verified) return { verified: true, keyIndex: match.keyIndex, source };
      rejections.push(match.reason);
    }
  }
  // Nothing verified; if something could not be fetched, a later try may find the signature that verifies.
  return { verified: false, kind: fetchFailed ? 'unavailable' : 'rejected', reason: summarise([...rejections, ...failures]) };
}

/** How long public keys read from files are used before the files are read again (a Secret mount updated in place). */
export const KEY_REREAD_MS = 60_000;

/**
 * Reads verify.cosign.publicKeyFiles lists, once and again after KEY_REREAD_MS, so that a key rotated
 * in its Secret is taken up without a restart. A key file that no longer loads gives an Error (naming
 * the file) rather than a stale key.
 */
export function cosignKeyReader(now: () => number = Date.now): (paths: readonly string[]) => KeyObject[] | Error {
  const read = new Map<string, { readonly keys: KeyObject[] | Error; readonly at: number }>();
  return (paths) => {
    const id = paths.join('\n');
    const known = read.get(id);
    if (known !== undefined && now() - known.at < KEY_REREAD_MS) return known.keys;
    let keys: KeyObject[] | Error;
    try {
      keys = readCosignKeys(paths);
    } catch (error) {
      keys = error instanceof Error ? error : new Error(String(error));
    }
    if (read.size > 64) read.clear(); // key lists come from the config: a handful; never grows with traffic
    read.set(id, { keys, at: now() });
    return keys;
  };
}
