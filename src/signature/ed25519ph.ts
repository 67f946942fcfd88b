// Ed25519ph verification (RFC 8032 §5.1, pre-hashed, empty context). cosign signs with Ed25519ph
// by default for Ed25519 keys; Node's crypto (OpenSSL before 3.2) has only pure Ed25519. Verifying
// touches public data only, so BigInt arithmetic (not constant-time) is fine here. The check is
// Go's crypto/ed25519's, which cosign verifies with: encode([S]B - [k]A) must equal R's bytes.

import { createHash, type KeyObject } from 'node:crypto';

const P = 2n ** 255n - 19n;
const L = 2n ** 252n + 27742317777372353535851937790883648493n;

const mod = (a: bigint, m: bigint = P): bigint => {
  const r = a % m;
  return r >= 0n ? r : r + m;
};
function power(base: bigint, exponent: bigint): bigint {
  let result = 1n;
  let b = mod(base);
  let e = exponent;
  while (e > 0n) {
    if (e & 1n) result = mod(result * b);
    b = mod(b * b);
    e >>= 1n;
  }
  return result;
}
const inverse = (a: bigint): bigint => power(a, P - 2n);

const D = mod(-121665n * inverse(121666n));
const SQRT_M1 = power(2n, (P - 1n) / 4n);

/** Extended homogeneous coordinates (X:Y:Z:T), x = X/Z, y = Y/Z, xy = T/Z. */
type Point = readonly [bigint, bigint, bigint, bigint];
const IDENTITY: Point = [0n, 1n, 1n, 0n];

function add([x1, y1, z1, t1]: Point, [x2, y2, z2, t2]: Point): Point {
  const a = mod((y1 - x1) * (y2 - x2));
  const b = mod((y1 + x1) * (y2 + x2));
  const c = mod(t1 * 2n * D * t2);
  const d = mod(z1 * 2n * z2);
  const e = b - a;
  const f = d - c;
  const g = d + c;
  const h = b + a;
  return [mod(e * f), mod(g * h), mod(f * g), mod(e * h)];
}

function multiply(point: Point, scalar: bigint): Point {
  let result = IDENTITY;
  let addend = point;
  for (let s = scalar; s > 0n; s >>= 1n) {
    if (s & 1n) result = add(result, addend);
    addend = add(addend, addend);
  }
  return result;
}

const littleEndian = (bytes: Uint8Array): bigint => BigInt(`0x${Buffer.from(bytes).reverse().toString('hex') || '0'}`);

function decode(bytes: Uint8Array): Point | null {
  if (bytes.length !== 32) return null;
  const copy = Buffer.from(bytes);
  const sign = (copy[31]! >> 7) & 1;
  copy[31]! &= 0x7f;
  const y = littleEndian(copy);
  if (y >= P) return null;
  const u = mod(y * y - 1n);
  const v = mod(D * y * y + 1n);
  let x = mod(u * power(v, 3n) * power(u * power(v, 7n), (P - 5n) / 8n));
  const vxx = mod(v * x * x);
  if (vxx === mod(-u)) x = mod(x * SQRT_M1);
  else if (vxx !== u) return null;
  if (x === 0n && sign === 1) return null;
  if (Number(x & 1n) !== sign) x = P - x;
  return [x, y, 1n, mod(x * y)];
}

function encode([x, y, z]: Point): Buffer {
  const zInverse = inverse(z);
  const ax = mod(x * zInverse);
  const ay = mod(y * zInverse);
  const bytes = Buffer.from(ay.toString(16).padStart(64, '0'), 'hex').reverse();
  bytes[31]! |= Number(ax & 1n) << 7;
  return bytes;
}

const BASE = decode(Buffer.from('5866666666666666666666666666666666666666666666666666666666666666', 'hex'))!;
// dom2(phflag = 1, context = ""), RFC 8032 §2.
const DOM2_PH = Buffer.concat([Buffer.from('SigEd25519 no Ed25519 collisions', 'latin1'), Buffer.from([1, 0])]);

/** Whether `signature` is an Ed25519ph signature of `message` by `key` (an Ed25519 public key). */
export function ed25519phVerify(key: KeyObject, message: Buffer, signature: Buffer): boolean {
  if (key.asymmetricKeyType !== 'ed25519' || signature.length !== 64) return false;
  const jwk = key.export({ format: 'jwk' });
  if (typeof jwk.x !== 'string') return false;
  const publicBytes = Buffer.from(jwk.x, 'base64url');
  const a = decode(publicBytes);
  const rBytes = signature.subarray(0, 32);
  const s = littleEndian(signature.subarray(32));
  if (a === null || s >= L) return false;
  const prehash = createHash('sha512').update(message).digest();
  const k = mod(littleEndian(createHash('sha512').update(DOM2_PH).update(rBytes).update(publicBytes).update(prehash).digest()), L);
  const negativeA: Point = [mod(-a[0]), a[1], a[2], mod(-a[3])];
  return encode(add(multiply(BASE, s), multiply(negativeA, k))).equals(rBytes);
}
