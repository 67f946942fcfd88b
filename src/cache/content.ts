// The node cache as a content source: manifests and blobs through the store (manifests.ts,
// blobs.ts), tag lists always from upstream, and rules with `cache: false` straight through.
// Authorization is the shell's, decided before any of this is asked.

import type { BlobRequest, BlobResult, ContentSource, ManifestRequest, ManifestResult, TagsRequest, TagsResult } from '../content/source.js';
import type { RuleUpstream } from '../upstream/rule.js';
import { CachedBlobs } from './blobs.js';
import { CachedManifests } from './manifests.js';
import type { NodeCache } from './nodecache.js';

export class CachedContent implements ContentSource {
  private readonly blobs: CachedBlobs;
  private readonly manifests: CachedManifests;

  constructor(
    private readonly cache: NodeCache,
    private readonly upstream: ContentSource,
    private readonly rules: ReadonlyMap<string, RuleUpstream>,
  ) {
    this.blobs = new CachedBlobs(cache, upstream, rules);
    this.manifests = new CachedManifests(cache, upstream, rules);
  }

  private cached(rule: string): boolean {
    return this.rules.get(rule)?.rule.cache === true;
  }

  async manifest(request: ManifestRequest): Promise<ManifestResult> {
    if (this.cached(request.rule)) return this.manifests.manifest(request);
    this.cache.count('manifest', 'bypass');
    return { ...(await this.upstream.manifest(request)), cache: 'bypass' };
  }

  async blob(request: BlobRequest): Promise<BlobResult> {
    if (this.cached(request.rule)) return this.blobs.blob(request);
    this.cache.count('blob', 'bypass');
    return { ...(await this.upstream.blob(request)), cache: 'bypass' };
  }

  tags(request: TagsRequest): Promise<TagsResult> {
    return this.upstream.tags(request);
  }
}
