// OCI 1.1 referrers answers (image-spec index of descriptors): the artifactType filter a client asked
// for, applied by the proxy when the upstream did not apply it. Pure.

/** The header naming the filters a referrers answer has applied (distribution-spec). */
export const FILTERS_APPLIED_HEADER = 'oci-filters-applied';

/** Whether an upstream's OCI-Filters-Applied names the artifactType filter. */
export function appliedArtifactType(header: string | undefined): boolean {
  return (header ?? '').split(',').some((name) => name.trim() === 'artifactType');
}

/**
 * The referrers index with only the descriptors of `artifactType`, re-serialized; null when the body
 * is not an index with a `manifests` array (then nothing can be filtered, and it is not an answer).
 */
export function filterReferrers(body: Buffer, artifactType: string): Buffer | null {
  let index: unknown;
  try {
    index = JSON.parse(body.toString('utf8'));
  } catch {
    return null;
  }
  if (typeof index !== 'object' || index === null || Array.isArray(index)) return null;
  const manifests = (index as { manifests?: unknown }).manifests;
  if (!Array.isArray(manifests)) return null;
  const kept = manifests.filter((d: unknown) => typeof d === 'object' && d !== null && (d as { artifactType?: unknown }).artifactType === artifactType);
  return Buffer.from(JSON.stringify({ ...index, manifests: kept }));
}
