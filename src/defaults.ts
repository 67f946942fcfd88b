// The embedded sample configuration and Pod that `npm start` (pullbridge demo) runs on.

/** The registry name the demo's rule matches: it looks like an on-prem registry and is only ever
 * matched as a string (the rule's upstream is the sample registry's loopback address). */
export const DEMO_REGISTRY = 'registry.corp.example:5000';

export interface SampleConfigOptions {
  /** The broker key (signs and checks namespace credentials). */
  readonly brokerKeyFile: string;
  /** The sample registry, http://127.0.0.1:port. */
  readonly upstream: string;
  readonly proxyPort: number;
  /** The node cache directory. */
  readonly cachePath: string;
}

/** The demo's config.yaml: one broker rule from the on-prem name to the sample registry, and a node cache. */
export const sampleConfigYaml = (options: SampleConfigOptions): string => `# pullbridge demo configuration (the ConfigMap's config.yaml)
proxy:
  host: localhost          # written into rewritten image references
  port: ${options.proxyPort}              # the proxy's port (the chart's hostPort / NodePort)
webhook:
  pullSecretName: pullbridge-pull
  namespace: pullbridge
broker:
  keyFiles: [${options.brokerKeyFile}]   # the first signs namespace credentials; all verify them
cache:
  path: ${options.cachePath}
  maxBytes: 100Mi
  minFreeBytes: 0
  minFreeInodes: 0
registries:
  # First match in file order wins.
  - name: corp
    match: [${DEMO_REGISTRY}]
    upstream: ${options.upstream}
    repositories:
      exclude: ["legacy/**"]
    # auth.mode broker (the default): clients show their namespace's credential
`;

/** A Pod with images from several registries, as kubectl would send it. */
export function samplePod(namespace: string): Record<string, unknown> {
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { generateName: 'demo-', namespace, labels: { app: 'demo' } },
    spec: {
      containers: [
        { name: 'app', image: `${DEMO_REGISTRY}/demo/hello:1.0` },
        { name: 'legacy', image: `${DEMO_REGISTRY}/legacy/tool:0.9` },
        { name: 'other', image: 'quay.io/prometheus/node-exporter:v1.8.2' },
      ],
    },
  };
}

export function sampleAdmissionReview(namespace = 'default', uid = '00000000-0000-4000-8000-000000000001'): Record<string, unknown> {
  return {
    apiVersion: 'admission.k8s.io/v1',
    kind: 'AdmissionReview',
    request: {
      uid,
      kind: { group: '', version: 'v1', kind: 'Pod' },
      resource: { group: '', version: 'v1', resource: 'pods' },
      requestKind: { group: '', version: 'v1', kind: 'Pod' },
      requestResource: { group: '', version: 'v1', resource: 'pods' },
      namespace,
      operation: 'CREATE',
      userInfo: { username: 'jane@example.com', groups: ['system:authenticated'] },
      object: samplePod(namespace),
      oldObject: null,
      dryRun: false,
      options: { apiVersion: 'meta.k8s.io/v1', kind: 'CreateOptions' },
    },
  };
}
