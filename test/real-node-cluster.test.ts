// A real node in a working cluster: kube-scheduler and kube-controller-manager run with the
// apiserver (./support/controlplane.ts), and the node (./support/node.ts) has a CNI Pod network
// (bridge + host-local + portmap) and kube-proxy in iptables mode, all inside its own namespace.
// A Deployment's Pod is scheduled there and gets an address from the bridge's range; a DaemonSet's
// Pod runs there; a hostPort and a NodePort answer on the node's 127.0.0.1. The workload image is
// pulled by containerd from a local docker-registry reached through the node's relay.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AppsV1Api, CoreV1Api, KubeConfig, type V1Container, type V1Node, type V1Pod } from '@kubernetes/client-node';
import { startControlPlane, type ControlPlane } from './support/controlplane.js';
import { isSchedulable, waitForNode } from './support/cluster.js';
import { buildWorkloadImage, startNode, stopAllNodes, type RealNode } from './support/node.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const SUBNET = '10.88.0.0/24';
const NAMESPACE = 'apps';
const APP_PORT = 8080;
const HOST_PORT = 18080;
const NODE_PORT = 30080;
/** Bounded waits (the machine is shared and slow at times): generous, never a measure of speed. */
const WAIT_MS = 180_000;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Whether an IPv4 address is in SUBNET (a /24). */
const inSubnet = (ip: string | undefined): boolean => ip !== undefined && ip.startsWith('10.88.0.') && ip !== '10.88.0.0';

const running = (pod: V1Pod): boolean => pod.status?.phase === 'Running' && pod.status.containerStatuses?.every((c) => c.state?.running !== undefined) === true;

describe('a real node in a cluster: scheduler, controller manager, CNI Pod network and kube-proxy', function () {
  this.timeout(600_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-node-cluster-'));
  const message = `hello from the pod network ${randomBytes(4).toString('hex')}`;
  let cp: ControlPlane;
  let registry: RegistryHandle;
  let node: RealNode | undefined;
  let core: CoreV1Api;
  let apps: AppsV1Api;
  let image: string;

  const failure = (error: unknown) => new Error(`${(error as Error).message}\n--- node ---\n${node?.logs().slice(-6000) ?? ''}\n--- control plane ---\n${cp?.logs().slice(-4000) ?? ''}`);
  const container = (): V1Container => ({ name: 'app', image, args: [message], env: [{ name: 'LISTEN_PORT', value: String(APP_PORT) }], ports: [{ containerPort: APP_PORT }] });

  /** What a TCP connection to host:port inside the node's namespace reads (the workload answers
   * every connection with its message line). */
  const readInside = async (host: string, port: number): Promise<string> => {
    if (!node) throw new Error('the node is not running');
    const script = `const s=require('net').connect(${port},${JSON.stringify(host)});let d='';s.setTimeout(5000,()=>{process.stderr.write('timeout');process.exit(2)});s.on('data',c=>d+=c);s.on('end',()=>{process.stdout.write(d);process.exit(0)});s.on('error',e=>{process.stderr.write(e.message);process.exit(1)})`;
    return node.exec(process.execPath, ['-e', script]);
  };
  /** Polls readInside until it answers (Services and port mappings are programmed asynchronously). */
  const answerInside = async (host: string, port: number): Promise<string> => {
    let last = '';
    for (const deadline = Date.now() + WAIT_MS; Date.now() < deadline; await sleep(1000)) {
      try {
        return await readInside(host, port);
      } catch (error) {
        last = (error as Error).message;
      }
    }
    throw failure(new Error(`${host}:${port} never answered inside the node: ${last}`));
  };
  /** Waits for a Pod matching `selector` in NAMESPACE to run; returns it. */
  const runningPod = async (selector: string): Promise<V1Pod> => {
    let last: V1Pod[] = [];
    for (const deadline = Date.now() + WAIT_MS; Date.now() < deadline; await sleep(1000)) {
      last = (await core.listNamespacedPod({ namespace: NAMESPACE, labelSelector: selector })).items;
      const pod = last.find(running);
      if (pod) return pod;
    }
    throw failure(new Error(`no running Pod for ${selector}; last: ${JSON.stringify(last.map((p) => ({ name: p.metadata?.name, node: p.spec?.nodeName, status: p.status })))}`));
  };

  before(async function () {
    this.timeout(600_000);
    [cp, registry] = await Promise.all([startControlPlane({ controllers: true }), startRegistry()]);
    await registry.push(buildWorkloadImage(dir, 'unused'), 'team/app', '1.0');
    image = `localhost:${registry.port}/team/app:1.0`;
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);
    apps = kc.makeApiClient(AppsV1Api);
    await core.createNamespace({ body: { metadata: { name: NAMESPACE } } });

    node = await startNode({ controlPlane: cp, token: cp.nodeToken, podNetwork: { subnet: SUBNET }, kubeProxyToken: cp.proxyToken });
    await node.reach(registry.port);
    await waitForNode(core, node.name, WAIT_MS, isSchedulable, 'Ready and schedulable').catch((error: unknown) => {
      throw failure(error);
    });
  });

  after(async () => {
    await node?.stop();
    await stopAllNodes(); // one whose start outlived a timed-out setup
    await registry?.stop();
    await cp?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('schedules a Deployment\'s Pod to the node: Running, with an address from the bridge\'s range that answers', async () => {
    const labels = { app: 'web' };
    await apps.createNamespacedDeployment({
      namespace: NAMESPACE,
      body: { metadata: { name: 'web' }, spec: { replicas: 1, selector: { matchLabels: labels }, template: { metadata: { labels }, spec: { terminationGracePeriodSeconds: 1, containers: [container()] } } } },
    });
    const pod = await runningPod('app=web');
    assert.equal(pod.spec?.nodeName, node?.name);
    assert.equal(pod.spec?.hostNetwork ?? false, false);
    assert.ok(inSubnet(pod.status?.podIP), `Pod IP ${pod.status?.podIP} is in ${SUBNET}`);
    assert.equal((await readInside(pod.status?.podIP ?? '', APP_PORT)).trim(), message);
  });

  it('runs a DaemonSet\'s Pod on the node', async () => {
    const labels = { app: 'agent' };
    await apps.createNamespacedDaemonSet({
      namespace: NAMESPACE,
      body: { metadata: { name: 'agent' }, spec: { selector: { matchLabels: labels }, template: { metadata: { labels }, spec: { terminationGracePeriodSeconds: 1, containers: [container()] } } } },
    });
    const pod = await runningPod('app=agent');
    assert.equal(pod.spec?.nodeName, node?.name);
    assert.ok(inSubnet(pod.status?.podIP), `Pod IP ${pod.status?.podIP} is in ${SUBNET}`);
  });

  it('a hostPort answers on the node\'s 127.0.0.1 (portmap)', async () => {
    const labels = { app: 'hostport' };
    const c = container();
    c.ports = [{ containerPort: APP_PORT, hostPort: HOST_PORT }];
    await core.createNamespacedPod({ namespace: NAMESPACE, body: { metadata: { name: 'hostport', labels }, spec: { terminationGracePeriodSeconds: 1, containers: [c] } } });
    await runningPod('app=hostport');
    assert.equal((await answerInside('127.0.0.1', HOST_PORT)).trim(), message);
  });

  it('a NodePort Service reaches the Deployment\'s Pod on the node\'s 127.0.0.1 (kube-proxy, iptables)', async () => {
    await core.createNamespacedService({
      namespace: NAMESPACE,
      body: { metadata: { name: 'web' }, spec: { type: 'NodePort', selector: { app: 'web' }, ports: [{ port: 80, targetPort: APP_PORT, nodePort: NODE_PORT }] } },
    });
    assert.equal((await answerInside('127.0.0.1', NODE_PORT)).trim(), message);
  });

  it('stops cleanly: no process, mount, cgroup or changed sysctl left on this machine', async () => {
    const stopping = node;
    node = undefined;
    assert.ok(stopping);
    assert.deepEqual(await stopping.stop(), []);
  });
});
