// Records in the shared tier (tag records, links, claims) authenticated with a key the nodes hold
// and the bucket does not (cache.shared.recordKeyFile): HMAC-SHA256 over the record's key and its
// bytes, written as a first line. Whoever can only write the bucket cannot make a record a node
// accepts, nor move one to another key (another tag, repository or rule). Pure: no files, no clock.
// Content (blobs, manifests) needs none of this: its bytes are checked against its digest.

import { createHmac, timingSafeEqual } from 'node:crypto';

const SEAL = 'pullbridge-record-v1 ';
/** HMAC-SHA256's own length: a shorter key is guessable. */
export const RECORD_KEY_MIN_BYTES = 32;

function mac(key: Uint8Array, objectKey: string, payload: Buffer): Buffer {
  return createHmac('sha256', key).update(SEAL).update(objectKey).update('\0').update(payload).digest();
}

/** The record as written under `objectKey`: sealed with the key, as it is without one. */
export function sealRecord(key: Uint8Array | undefined, objectKey: string, payload: Buffer): Buffer {
  if (!key) return payload;
  return Buffer.concat([Buffer.from(`${SEAL}${mac(key, objectKey, payload).toString('hex')}\n`), payload]);
}

/**
 * The record's payload when it is authentic: with a key, only a record sealed with that key for
 * `objectKey` (undefined otherwise: unsealed, sealed for another key, changed, or sealed with another
 * key); without one, what is there (a seal, written by nodes that have a key, is taken off unchecked).
 */
export function openRecord(key: Uint8Array | undefined, objectKey: string, body: Buffer): Buffer | undefined {
  const sealed = body.subarray(0, SEAL.length).toString('latin1') === SEAL;
  const newline = sealed ? body.indexOf(0x0a) : -1;
  if (!key) return sealed && newline >= 0 ? body.subarray(newline + 1) : body;
  if (!sealed || newline < 0) return undefined;
  const given = Buffer.from(body.subarray(SEAL.length, newline).toString('latin1'), 'hex');
  const payload = body.subarray(newline + 1);
  const expected = mac(key, objectKey, payload);
  return given.length === expected.length && timingSafeEqual(given, expected) ? payload : undefined;
}

/** A record key file's bytes as the key (a trailing newline is not part of it); throws, naming the
 * file but never its content, when it is too short. */
export function recordKeyOf(file: string, text: string): Uint8Array {
  const key = Buffer.from(text.replace(/\r?\n$/, ''), 'utf8');
  if (key.length < RECORD_KEY_MIN_BYTES) throw new Error(`cache.shared.recordKeyFile ${file} holds ${key.length} bytes; a record key needs at least ${RECORD_KEY_MIN_BYTES}`);
  return key;
}
