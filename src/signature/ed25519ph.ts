// Ed25519ph verification (RFC 8032 §5.1, pre-hashed, empty context). cosign signs with Ed25519ph by
// default for Ed25519 keys; Node's crypto (OpenSSL before 3.2) has only pure Ed25519, so this uses
// @noble/curves (audited, no dependencies). zip215: false gives RFC 8032's strict rules (S < L,
// canonical encodings), as Go's crypto/ed25519, which cosign verifies with.

import type { KeyObject } from 'node:crypto';
import { ed25519ph } from '@noble/curves/ed25519.js';

/** Whether `signature` is an Ed25519ph signature of `message` by `key` (an Ed25519 public key). */
export function ed25519phVerify(key: KeyObject, message: Buffer, signature: Buffer): boolean {
  if (key.asymmetricKeyType !== 'ed25519' || signature.length !== 64) return false;
  const jwk = key.export({ format: 'jwk' });
  if (typeof jwk.x !== 'string') return false;
  try {
    return ed25519ph.verify(signature, message, Buffer.from(jwk.x, 'base64url'), { zip215: false });
  } catch {
    return false; // a point that does not decode: not a signature by this key
  }
}
