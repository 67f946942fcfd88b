// The pinned digests of a Pod's ReplicaSet, read through the API with a short cache by UID: every
// Pod of a ReplicaSet asks for the same object, and the webhook itself wrote the pins when it
// admitted the ReplicaSet, so they do not change under it.

import type { AppsV1Api } from '@kubernetes/client-node';
import { PINNED_DIGESTS_ANNOTATION } from '../rules/marks.js';
import { apiMessage } from './client.js';

/** Parses the annotation's JSON; null when absent, malformed or empty. */
export function parsePins(value: string | undefined): Record<string, string> | null {
  if (value === undefined) return null;
  try {
    const parsed: unknown = JSON.parse(value);
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) return null;
    const pins = Object.fromEntries(Object.entries(parsed).filter((e): e is [string, string] => typeof e[1] === 'string' && /^sha256:[a-f0-9]{64}$/.test(e[1])));
    return Object.keys(pins).length > 0 ? pins : null;
  } catch {
    return null;
  }
}

/**
 * The largest pins annotation read: the webhook writes one entry per image of a template (an image
 * reference and a digest, some 600 bytes at worst), so a larger value was not written by it, and
 * parsing it for every Pod would cost the webhook's memory (a Pod names its owner itself).
 */
export const MAX_PINS_ANNOTATION_BYTES = 16 * 1024;
/** What the cache may hold in all, counted as the parsed pins' characters, two bytes each. */
export const MAX_PINS_CACHE_BYTES = 8 * 1024 * 1024;
// A Map entry, its key and the pins object, beyond the characters.
const ENTRY_OVERHEAD_BYTES = 200;

const pinsBytes = (key: string, pins: Readonly<Record<string, string>> | null): number =>
  ENTRY_OVERHEAD_BYTES + 2 * (key.length + Object.entries(pins ?? {}).reduce((n, [image, digest]) => n + image.length + digest.length, 0));

export class ReplicaSetPins {
  /** Only the parsed pins are kept (never the annotation's text), bounded by entries, bytes and age. */
  private readonly cache = new Map<string, { pins: Readonly<Record<string, string>> | null; until: number; bytes: number }>();
  private cacheBytes = 0;
  /** Reads in flight by namespace and UID: a ReplicaSet scaled up creates its Pods at once, and one GET serves them all. */
  private readonly reading = new Map<string, Promise<Readonly<Record<string, string>> | null>>();

  constructor(
    private readonly apps: AppsV1Api,
    private readonly ttlMs = 60_000,
    private readonly maxEntries = 4096,
    private readonly now: () => number = Date.now,
    private readonly maxBytes = MAX_PINS_CACHE_BYTES,
  ) {}

  /** The pins of ReplicaSet `name`, when its UID is `uid` (a recreated one of the same name is another ReplicaSet). */
  async get(namespace: string, name: string, uid: string): Promise<Readonly<Record<string, string>> | null> {
    // By namespace too: an owner reference is the Pod's own claim, and must not reach another namespace's entry.
    const key = `${namespace}/${uid}`;
    const hit = this.cache.get(key);
    if (hit && hit.until > this.now()) return hit.pins;
    if (hit) this.drop(key);
    const inFlight = this.reading.get(key);
    if (inFlight) return inFlight;
    const read = this.read(namespace, name, uid).finally(() => this.reading.delete(key));
    this.reading.set(key, read);
    return read;
  }

  private async read(namespace: string, name: string, uid: string): Promise<Readonly<Record<string, string>> | null> {
    let rs;
    try {
      rs = await this.apps.readNamespacedReplicaSet({ namespace, name });
    } catch (error) {
      throw new Error(apiMessage(error));
    }
    if (rs.metadata?.uid !== uid) throw new Error(`ReplicaSet ${namespace}/${name} has UID ${rs.metadata?.uid ?? 'none'}, not the Pod owner's ${uid}`);
    const value = rs.metadata.annotations?.[PINNED_DIGESTS_ANNOTATION];
    const size = value === undefined ? 0 : Buffer.byteLength(value);
    // Thrown, so that admission records why the pins were not used (the tag is resolved instead).
    if (size > MAX_PINS_ANNOTATION_BYTES) throw new Error(`its ${PINNED_DIGESTS_ANNOTATION} annotation is ${size} bytes, more than the ${MAX_PINS_ANNOTATION_BYTES} pullbridge writes: ignored`);
    const pins = parsePins(value);
    const key = `${namespace}/${uid}`;
    const bytes = pinsBytes(key, pins);
    this.drop(key);
    // Oldest first out (Map keeps insertion order).
    for (const oldest of this.cache.keys()) {
      if (this.cache.size < this.maxEntries && this.cacheBytes + bytes <= this.maxBytes) break;
      this.drop(oldest);
    }
    if (bytes <= this.maxBytes) {
      this.cache.set(key, { pins, until: this.now() + this.ttlMs, bytes });
      this.cacheBytes += bytes;
    }
    return pins;
  }

  /** What the cache holds now, for tests and metrics. */
  size(): { readonly entries: number; readonly bytes: number } {
    return { entries: this.cache.size, bytes: this.cacheBytes };
  }

  private drop(key: string): void {
    const entry = this.cache.get(key);
    if (entry === undefined) return;
    this.cache.delete(key);
    this.cacheBytes -= entry.bytes;
  }
}
