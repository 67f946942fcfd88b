// The embedded sample configuration that `npm start` runs on.

/** The sample config.yaml, with the broker key (which signs and checks namespace credentials) in `brokerKeyFile`. */
export const sampleConfigYaml = (brokerKeyFile: string): string => `# pullbridge sample configuration (the ConfigMap's config.yaml)
proxy:
  host: localhost          # written into rewritten image references
  port: 30500              # the NodePort / hostPort of the proxy DaemonSet
webhook:
  pullSecretName: pullbridge-pull
  namespace: pullbridge
broker:
  keyFiles: [${brokerKeyFile}]   # the first signs namespace credentials; all verify them
registries:
  # First match in file order wins.
  - name: corp
    match: [registry.corp.example:5000]
    upstream: https://registry.corp.example:5000
    repositories:
      exclude: ["legacy/**"]
  - name: hub
    match: [docker.io]
    upstream: https://registry-1.docker.io
    auth:
      mode: anonymous
`;

/** A Pod with images from several registries, as kubectl would send it. */
export function samplePod(namespace: string): Record<string, unknown> {
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { generateName: 'demo-', namespace, labels: { app: 'demo' } },
    spec: {
      initContainers: [{ name: 'migrate', image: 'registry.corp.example:5000/team/migrate:2.0' }],
      containers: [
        { name: 'app', image: 'registry.corp.example:5000/team/app:1.2' },
        { name: 'proxy', image: 'nginx:1.27' },
        { name: 'legacy', image: 'registry.corp.example:5000/legacy/tool:0.9' },
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
