import jsonpatch, { type Operation } from 'fast-json-patch';

export interface ReviewOptions {
  namespace?: string;
  operation?: string;
  subResource?: string;
  dryRun?: boolean;
  oldObject?: unknown;
  uid?: string;
  kind?: string;
  resource?: string;
  /** The API group of kind and resource ('' for core, 'apps' for a ReplicaSet). */
  group?: string;
}

export function podWith(spec: Record<string, unknown>, metadata: Record<string, unknown> = { name: 'web', namespace: 'default' }): Record<string, unknown> {
  return { apiVersion: 'v1', kind: 'Pod', metadata, spec };
}

export function reviewFor(object: unknown, options: ReviewOptions = {}): Record<string, unknown> {
  const kind = options.kind ?? 'Pod';
  return {
    apiVersion: 'admission.k8s.io/v1',
    kind: 'AdmissionReview',
    request: {
      uid: options.uid ?? 'f0b5c1a2-1111-4222-8333-444455556666',
      kind: { group: options.group ?? '', version: 'v1', kind },
      resource: { group: options.group ?? '', version: 'v1', resource: options.resource ?? 'pods' },
      ...(options.subResource ? { subResource: options.subResource } : {}),
      namespace: options.namespace ?? 'default',
      operation: options.operation ?? 'CREATE',
      userInfo: { username: 'jane@example.com', groups: ['system:authenticated'] },
      object,
      oldObject: options.oldObject ?? null,
      dryRun: options.dryRun ?? false,
    },
  };
}

/** Applies a patch the way the apiserver does: on a copy, failing on any invalid operation. */
export function applyPatch<T>(document: T, patch: readonly Operation[]): T {
  return jsonpatch.applyPatch(jsonpatch.deepClone(document), [...patch], true, false).newDocument as T;
}

export function decodePatch(base64: string): Operation[] {
  return JSON.parse(Buffer.from(base64, 'base64').toString('utf8')) as Operation[];
}

export interface PodShape {
  metadata: { name?: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  spec: {
    containers: Array<{ name: string; image: string }>;
    initContainers?: Array<{ name: string; image: string }>;
    ephemeralContainers?: Array<{ name: string; image: string }>;
    imagePullSecrets?: Array<{ name: string }>;
  };
}
