// The admission's signature check (upstream.ts SignatureCheck): the verify requirement of the
// rule and repository (src/rules/verifypolicy.ts), checked through the proxy tier's RegistryView with
// src/content/signatures.ts, the same check the proxy makes before serving a manifest.

import type { Config } from '../rules/config.js';
import { verifyRequirement } from '../rules/verifypolicy.js';
import { cosignKeyReader, verifyCosignSignature, type SignatureView } from '../content/signatures.js';
import type { SignatureCheck } from './upstream.js';

export { KEY_REREAD_MS, readCosignKeys, verifyCosignSignature, type SignatureVerdict } from '../content/signatures.js';

/**
 * The admission's signature check for the rules in force: the keys of the verify requirement of the
 * target's rule and repository (its own verify, or another rule's on the same upstream), re-read
 * after KEY_REREAD_MS. A key file that no longer loads fails the check (naming the file).
 */
export function cosignSignatureCheck(view: SignatureView, config: () => Config, now: () => number = Date.now): SignatureCheck {
  const keysFor = cosignKeyReader(now);
  return async (target, digest, namespace, signal) => {
    const current = config();
    const rule = current.registries.find((r) => r.name === target.rule);
    const requirement = rule === undefined ? undefined : verifyRequirement(current.registries, rule, target.repository);
    if (requirement === undefined) return { verified: false, reason: `rule "${target.rule}" has no verify keys` };
    const keys = keysFor(requirement.verify.cosign.publicKeyFiles);
    if (keys instanceof Error) return { verified: false, reason: `the public keys cannot be read: ${keys.message}` };
    const verdict = await verifyCosignSignature(view, target, digest, namespace, keys, signal);
    return verdict.verified ? { verified: true, keyIndex: verdict.keyIndex, source: verdict.source } : { verified: false, reason: verdict.reason };
  };
}
