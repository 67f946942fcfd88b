// What admission may ask of a rule's upstream. The webhook has no upstream transport and holds no
// upstream credential: the proxy tier answers through the rule's transport (forward proxy, auth) and
// the node cache. This is the contract between the two; the adapter lives with the webhook.

/** One manifest or blob of one repository behind one rule, as the proxy path names it. */
export interface RegistryTarget {
  readonly rule: string;
  /** The repository on the upstream, e.g. `team/app` (without the rule prefix). */
  readonly repository: string;
}

/** An anonymous manifest HEAD through the rule's transport: how the upstream answered, or why it did not. */
export type ProbeAnswer = { readonly kind: 'answered'; readonly status: number } | { readonly kind: 'failed'; readonly error: string };

export type ManifestAnswer =
  | { readonly kind: 'found'; readonly digest: string; readonly mediaType: string; readonly body?: Buffer }
  /** The proxy or the upstream refused (401, 403, 404 …): not a failure to answer. */
  | { readonly kind: 'refused'; readonly status: number; readonly error: string }
  /** No answer in time, a network error, a 5xx: the rule's onProbeFailure decides. */
  | { readonly kind: 'failed'; readonly error: string };

export type BlobAnswer = { readonly kind: 'found'; readonly body: Buffer } | { readonly kind: 'refused'; readonly status: number; readonly error: string } | { readonly kind: 'failed'; readonly error: string };

/** An OCI image index listing the referrers of a digest (OCI 1.1), or `unsupported` when the upstream lacks the API (404). */
export type ReferrersAnswer = { readonly kind: 'found'; readonly index: Buffer } | { readonly kind: 'unsupported' } | { readonly kind: 'refused'; readonly status: number; readonly error: string } | { readonly kind: 'failed'; readonly error: string };

export interface RegistryView {
  /** `reference` is a tag or a digest. */
  probeAnonymous(target: RegistryTarget & { readonly reference: string }, signal: AbortSignal): Promise<ProbeAnswer>;
  /** With the namespace's own authorization (its broker credential, or none for an anonymous rule). HEAD leaves body undefined. */
  manifest(target: RegistryTarget & { readonly reference: string; readonly namespace: string; readonly method: 'HEAD' | 'GET' }, signal: AbortSignal): Promise<ManifestAnswer>;
  /** A small blob (a signature payload), refused above maxBytes. */
  blob(target: RegistryTarget & { readonly digest: string; readonly namespace: string; readonly maxBytes: number }, signal: AbortSignal): Promise<BlobAnswer>;
  /** The referrers of `digest`, filtered by artifactType when given, with the namespace's authorization. */
  referrers(target: RegistryTarget & { readonly digest: string; readonly namespace: string; readonly artifactType?: string }, signal: AbortSignal): Promise<ReferrersAnswer>;
}
