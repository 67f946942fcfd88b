// pullbridge's own image on a real node: the image assembled offline (./support/appimage.ts, the
// Dockerfile's final stage as far as the chart depends on it) pushed to docker-registry and pulled
// by containerd as kubelet asks, then run as the chart runs it: the default command, the proxy with
// the chart's security context and readiness probe, and the chart's `/nodejs/bin/node -e` init
// container that hands the cache directory to user 65532.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { CoreV1Api, KubeConfig, type V1Pod } from '@kubernetes/client-node';
import { buildAppImage, type AppImage } from './support/appimage.js';
import { waitForNode, waitForPod } from './support/cluster.js';
import { cachedBinary, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { nodePod, startNode, stopAllNodes, type RealNode } from './support/node.js';
import { freePort, runAsync } from './support/procs.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const NAMESPACE = 'pullbridge';
// A Pod can wait on the Node-authorizer race for its ConfigMap (~15 s backoff), see real-node.md.
const POD_TIMEOUT_MS = 90_000;
const CACHE_DIR = '/var/lib/pullbridge/cache';

/** The proxy's config: one anonymous rule, no broker (nothing to authenticate), and the node cache. */
const CONFIG_YAML = [
  'proxy:',
  '  host: localhost',
  '  port: 30500',
  'registries:',
  '  - name: public',
  '    match: ["registry.example:5000"]',
  '    upstream: http://127.0.0.1:5000',
  '    auth:',
  '      mode: anonymous',
  'cache:',
  `  path: ${CACHE_DIR}`,
  '  maxBytes: 64Mi',
  '  minFreeBytes: 0',
  '',
].join('\n');

/** What the chart's pod and container security contexts say (templates/_helpers.tpl). */
const POD_SECURITY = { runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, seccompProfile: { type: 'RuntimeDefault' } };
const CONTAINER_SECURITY = { allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: { drop: ['ALL'] } };

const terminated = (pod: V1Pod) => pod.status?.containerStatuses?.[0]?.state?.terminated !== undefined;
const ready = (pod: V1Pod) => pod.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true;

describe("pullbridge's image on a real node (assembled offline, pulled by containerd from docker-registry)", function () {
  this.timeout(120_000);
  let cp: ControlPlane;
  let registry: RegistryHandle;
  let node: RealNode | undefined;
  let core: CoreV1Api;
  let app: AppImage;
  let imageRef: string;

  const failure = (error: unknown) => new Error(`${(error as Error).message}\n--- node ---\n${node?.logs().slice(-6000) ?? ''}`);
  const kubectl = (...args: string[]) => runAsync(cachedBinary('kubectl'), ['--kubeconfig', cp.kubeconfig, ...args]);
  const pod = (name: string, spec: Parameters<typeof nodePod>[3]): V1Pod => {
    if (!node) throw new Error('the node is not running');
    return nodePod(node, name, imageRef, spec);
  };

  before(async function () {
    this.timeout(180_000);
    app = buildAppImage();
    [cp, registry] = await Promise.all([startControlPlane(), startRegistry()]);
    await registry.push(app.image, 'pullbridge', 'test');
    imageRef = `localhost:${registry.port}/pullbridge:test`;
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);
    await core.createNamespace({ body: { metadata: { name: NAMESPACE } } });
    await core.createNamespacedConfigMap({ namespace: NAMESPACE, body: { metadata: { name: 'pullbridge-config' }, data: { 'config.yaml': CONFIG_YAML } } });

    node = await startNode({ controlPlane: cp, token: cp.nodeToken });
    await node.reach(registry.port);
    await waitForNode(core, node.name, 60_000).catch((error: unknown) => {
      throw failure(error);
    });
  });

  after(async () => {
    await node?.stop();
    await stopAllNodes();
    await registry?.stop();
    await cp?.stop();
  });

  it('runs the default command (--help) as user 65532: the usage text in kubectl logs, exit 0', async () => {
    await core.createNamespacedPod({ namespace: NAMESPACE, body: pod('help', { restartPolicy: 'Never' }) });
    const done = await waitForPod(core, NAMESPACE, 'help', terminated, POD_TIMEOUT_MS, 'terminated').catch((error: unknown) => {
      throw failure(error);
    });
    const logs = await kubectl('logs', '-n', NAMESPACE, 'help');
    assert.match(logs, /^pullbridge — rewrite Pod images to a node-local registry proxy/);
    assert.match(logs, /pullbridge proxy --config FILE \[--port N\]/);
    assert.equal(done.status?.containerStatuses?.[0]?.state?.terminated?.exitCode, 0, logs);
    assert.equal(done.status?.containerStatuses?.[0]?.imageID, `localhost:${registry.port}/pullbridge@${app.image.index.digest}`);
  });

  it("ships the Node.js LTS line the Dockerfile names (ARG NODE_MAJOR): /nodejs/bin/node's version in kubectl logs", async () => {
    const major = /^ARG NODE_MAJOR=(\d+)$/m.exec(readFileSync(new URL('../../Dockerfile', import.meta.url), 'utf8'))?.[1];
    assert.ok(major, 'the Dockerfile names its Node.js line in ARG NODE_MAJOR');
    const containers = [{ name: 'app', image: imageRef, imagePullPolicy: 'IfNotPresent', command: ['/nodejs/bin/node', '--version'] }];
    await core.createNamespacedPod({ namespace: NAMESPACE, body: pod('node-version', { restartPolicy: 'Never', containers }) });
    await waitForPod(core, NAMESPACE, 'node-version', terminated, POD_TIMEOUT_MS, 'terminated').catch((error: unknown) => {
      throw failure(error);
    });
    const logs = await kubectl('logs', '-n', NAMESPACE, 'node-version');
    assert.match(logs.trim(), new RegExp(`^v${major}\\.\\d+\\.\\d+$`));
  });

  it("runs the proxy as the chart's DaemonSet does: security context, the init container, a ConfigMap config; Ready on /readyz", async () => {
    const [port, opsPort] = await Promise.all([freePort(), freePort()]);
    const body = pod('proxy', {
      securityContext: POD_SECURITY,
      initContainers: [
        // `pullbridge validate` on the mounted config, through the image's entrypoint.
        { name: 'validate', image: imageRef, imagePullPolicy: 'IfNotPresent', args: ['validate', '--config', '/etc/pullbridge/config/config.yaml'], securityContext: CONTAINER_SECURITY, volumeMounts: [{ name: 'config', mountPath: '/etc/pullbridge/config', readOnly: true }] },
        // The chart's cache-owner: root with CHOWN alone, `/nodejs/bin/node -e`.
        {
          name: 'cache-owner',
          image: imageRef,
          imagePullPolicy: 'IfNotPresent',
          command: [
            '/nodejs/bin/node',
            '-e',
            "const fs = require('node:fs'); const dir = process.argv[1]; fs.mkdirSync(dir, { recursive: true }); if (fs.statSync(dir).uid !== 65532) { fs.chmodSync(dir, 0o700); fs.chownSync(dir, 65532, 65532); } console.log('cache owner', fs.statSync(dir).uid);",
            CACHE_DIR,
          ],
          securityContext: { ...CONTAINER_SECURITY, runAsUser: 0, runAsNonRoot: false, capabilities: { drop: ['ALL'], add: ['CHOWN'] } },
          volumeMounts: [{ name: 'cache', mountPath: CACHE_DIR }],
        },
      ],
      containers: [
        {
          name: 'proxy',
          image: imageRef,
          imagePullPolicy: 'IfNotPresent',
          args: ['proxy', '--config=/etc/pullbridge/config/config.yaml', '--host=127.0.0.1', `--port=${port}`, '--ops-host=127.0.0.1', `--ops-port=${opsPort}`],
          env: [
            { name: 'NODE_OPTIONS', value: '--max-semi-space-size=1' },
            { name: 'MALLOC_ARENA_MAX', value: '2' },
          ],
          readinessProbe: { httpGet: { path: '/readyz', port: opsPort, host: '127.0.0.1' }, periodSeconds: 2 },
          livenessProbe: { httpGet: { path: '/healthz', port: opsPort, host: '127.0.0.1' }, periodSeconds: 10 },
          securityContext: CONTAINER_SECURITY,
          volumeMounts: [
            { name: 'config', mountPath: '/etc/pullbridge/config', readOnly: true },
            { name: 'cache', mountPath: CACHE_DIR },
          ],
        },
      ],
      volumes: [
        { name: 'config', configMap: { name: 'pullbridge-config' } },
        { name: 'cache', emptyDir: {} },
      ],
    });
    await core.createNamespacedPod({ namespace: NAMESPACE, body });
    const running = await waitForPod(core, NAMESPACE, 'proxy', ready, POD_TIMEOUT_MS, 'Ready').catch((error: unknown) => {
      throw failure(error);
    });
    const status = running.status?.containerStatuses?.[0];
    assert.ok(status?.state?.running, JSON.stringify(status));
    assert.equal(status?.ready, true);
    assert.equal(status?.restartCount, 0);

    const validate = await kubectl('logs', '-n', NAMESPACE, 'proxy', '-c', 'validate');
    assert.match(validate, /config\.yaml: valid, 1 registry rule\(s\)/);
    const owner = await kubectl('logs', '-n', NAMESPACE, 'proxy', '-c', 'cache-owner');
    assert.equal(owner.trim(), 'cache owner 65532');
    const logs = await kubectl('logs', '-n', NAMESPACE, 'proxy', '-c', 'proxy');
    const messages = logs
      .split('\n')
      .filter((line) => line.startsWith('{'))
      .map((line) => JSON.parse(line) as { msg?: string; url?: string; rules?: string[] });
    assert.ok(messages.some((m) => m.msg === 'operations endpoints listening' && m.url === `http://127.0.0.1:${opsPort}`), logs);
    assert.ok(messages.some((m) => m.msg === 'proxy listening' && m.url === `http://127.0.0.1:${port}` && m.rules?.[0] === 'public -> http://127.0.0.1:5000'), logs);
    // The registry port answers on the node's loopback, from inside the node.
    if (!node) throw new Error('the node is not running');
    const answer = await node.exec(process.execPath, ['-e', `fetch('http://127.0.0.1:${port}/v2/').then((r) => console.log(r.status))`]);
    assert.match(answer.trim(), /^\d{3}$/);
  });

  it('stops cleanly: no process, mount, cgroup or changed sysctl left on this machine', async () => {
    const stopping = node;
    node = undefined;
    assert.ok(stopping);
    assert.deepEqual(await stopping.stop(), []);
  });
});
