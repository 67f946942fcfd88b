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

export class ReplicaSetPins {
  private readonly cache = new Map<string, { pins: Readonly<Record<string, string>> | null; until: number }>();
  /** Reads in flight by namespace and UID: a ReplicaSet scaled up creates its Pods at once, and one GET serves them all. */
  private readonly reading = new Map<string, Promise<Readonly<Record<string, string>> | null>>();

  constructor(
    private readonly apps: AppsV1Api,
    private readonly ttlMs = 60_000,
    private readonly maxEntries = 4096,
    private readonly now: () => number = Date.now,
  ) {}

  /** The pins of ReplicaSet `name`, when its UID is `uid` (a recreated one of the same name is another ReplicaSet). */
  async get(namespace: string, name: string, uid: string): Promise<Readonly<Record<string, string>> | null> {
    // By namespace too: an owner reference is the Pod's own claim, and must not reach another namespace's entry.
    const key = `${namespace}/${uid}`;
    const hit = this.cache.get(key);
    if (hit && hit.until > this.now()) return hit.pins;
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
    const pins = parsePins(rs.metadata.annotations?.[PINNED_DIGESTS_ANNOTATION]);
    // Oldest first out (Map keeps insertion order).
    for (const oldest of this.cache.keys()) {
      if (this.cache.size < this.maxEntries) break;
      this.cache.delete(oldest);
    }
    this.cache.set(`${namespace}/${uid}`, { pins, until: this.now() + this.ttlMs });
    return pins;
  }
}
