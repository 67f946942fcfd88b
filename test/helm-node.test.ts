// The chart installed with `helm install` on a real node (./support/node.ts: kubelet, containerd's
// CRI, a CNI Pod network, kube-proxy; kube-scheduler and kube-controller-manager with the
// apiserver). pullbridge's own image (./support/appimage.ts) comes from one docker-registry, the
// workload image from a second one, the upstream of the chart's one broker rule. The webhook
// bootstraps its certificate; a Pod created with its original image is rewritten and pulled by the
// node's containerd through the DaemonSet's proxy Pod, whose access log says so. Each proxy exposure
// (hostNetwork, nodePort, hostPort) is a fresh release, uninstalled after; with hostNetwork a
// `helm upgrade` adds a rule, which the running proxy Pod serves after reloading its config, and the
// node cache is shown as deployed: its hostPath store belongs to the proxy's non-root user, outlives
// the proxy Pod, and starts a new Pod while the upstream registry is down. The apiserver enforces
// Pod Security `baseline` by default, as hardened clusters do: the release namespace is labelled
// `privileged` (README), and the chart refuses a namespace that enforces less.
//
// How the pieces reach each other (the apiserver runs on this machine's loopback; Services, Pods
// and kube-proxy's rules live in the node's network namespace):
// - apiserver → webhook Service. A Service webhook is called at the Service's ClusterIP (the
//   apiserver's default resolver; with --enable-aggregator-routing, at a Pod IP). Neither address
//   exists outside the node's namespace: this machine has no route to the Pod network and no
//   kube-proxy rules for ClusterIPs, and both may not be added to a shared machine. An Endpoints
//   object pointing at a loopback relay is refused by validation (loopback endpoint addresses are
//   invalid), and the chart has no hostNetwork webhook (it would still listen in the node's
//   namespace). What works is what managed control planes do (konnectivity): the apiserver's egress
//   selector sends its `cluster` traffic through an HTTP CONNECT proxy, here one running inside
//   the node's namespace on a socket file, which dials the ClusterIP there, where kube-proxy
//   forwards it to a webhook Pod. kubelet calls (kubectl logs) take the same way.
// - webhook Pods → apiserver. In-cluster clients dial the `kubernetes` Service (10.0.0.1:443). Its
//   endpoint here is a relay to the apiserver listening on every address of the node, written by
//   hand as an EndpointSlice on the Pod network's gateway (the apiserver maintains none: loopback).
// - containerd → proxy: the exposure under test on the node's 127.0.0.1:<proxy.port>.
// - proxy → upstream registry, containerd → image registry: node.reach (this machine's loopback
//   port on the node's loopback).

import assert from 'node:assert/strict';
import { randomBytes, X509Certificate } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { AdmissionregistrationV1Api, AppsV1Api, CoreV1Api, DiscoveryV1Api, KubeConfig, type V1Node, type V1Pod } from '@kubernetes/client-node';
import { stringify as stringifyYaml } from 'yaml';
import { buildAppImage } from './support/appimage.js';
import { isRunning, isSchedulable, waitForNode, waitForPod } from './support/cluster.js';
import { cachedBinary, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { buildWorkloadImage, startNode, stopAllNodes, type RealNode } from './support/node.js';
import type { TestImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const CHART = fileURLToPath(new URL('../../charts/pullbridge', import.meta.url));
const SUBNET = '10.88.0.0/24';
/** The Pod network's gateway: the bridge's address in the node's namespace (host-local's first). */
const GATEWAY = '10.88.0.1';
/** Where the apiserver relay listens on the node's addresses, for the `kubernetes` Service. */
const APISERVER_NODE_PORT = 6443;
const RELEASE_NAMESPACE = 'pullbridge';
/** Where the upstream registry's relay listens on the node's addresses, for a proxy Pod on the
 * Pod network (its own loopback is not the node's). */
const UPSTREAM_NODE_PORT = 15000;
const CORP_IMAGE = 'registry.corp.example:5000/team/app:1.0';
const PROXY_PORT = 30500;
/** Bounded waits (the machine is shared and slow at times): generous, never a measure of speed. */
const WAIT_MS = 240_000;
const HELM_TIMEOUT = '8m';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const podReady = (pod: V1Pod): boolean => pod.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true;

interface AccessRecord {
  readonly access?: string;
  readonly rule?: string | null;
  readonly kind?: string;
  readonly reference?: string | null;
  readonly namespace?: string | null;
  readonly status?: number;
  readonly cache?: string;
}

type Exposure = 'hostNetwork' | 'nodePort' | 'hostPort';

describe('the Helm chart on a real node: webhook with bootstrapped certificate, proxy DaemonSet, a Pod pulled through it', function () {
  this.timeout(900_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-helm-node-'));
  const egressSocket = join(dir, 'egress.sock');
  const message = `hello through the chart ${randomBytes(4).toString('hex')}`;
  let cp: ControlPlane;
  let images: RegistryHandle;
  let upstream: RegistryHandle;
  /** An upstream that wants credentials (basic auth): the rules the upgrade adds use it. */
  let privateUpstream: RegistryHandle;
  let node: RealNode | undefined;
  let kc: KubeConfig;
  let core: CoreV1Api;
  let workload: TestImage;

  const failure = (error: unknown) => new Error(`${(error as Error).message}\n--- node ---\n${node?.logs().slice(-6000) ?? ''}\n--- control plane ---\n${cp?.logs().slice(-4000) ?? ''}`);
  const helmEnv = { HELM_CACHE_HOME: join(dir, 'helm', 'cache'), HELM_CONFIG_HOME: join(dir, 'helm', 'config'), HELM_DATA_HOME: join(dir, 'helm', 'data') };
  const helm = (...args: string[]) => runAsync(cachedBinary('helm'), ['--kubeconfig', cp.kubeconfig, ...args], { timeoutMs: 10 * 60_000, env: helmEnv });
  const kubectl = (...args: string[]) => runAsync(cachedBinary('kubectl'), ['--kubeconfig', cp.kubeconfig, ...args]);

  /** Polls `read` until `done`; fails with the last value after WAIT_MS. */
  const until = async <T>(what: string, read: () => Promise<T>, done: (value: T) => boolean): Promise<T> => {
    let last: T | string = '';
    for (const deadline = Date.now() + WAIT_MS; Date.now() < deadline; await sleep(1000)) {
      try {
        const value = await read();
        if (done(value)) return value;
        last = value;
      } catch (error) {
        last = (error as Error).message;
      }
    }
    throw failure(new Error(`${what}; last: ${JSON.stringify(last).slice(0, 4000)}`));
  };

  before(async function () {
    this.timeout(900_000);
    const app = buildAppImage();
    workload = buildWorkloadImage(dir, message);
    // Pod Security: `baseline` enforced wherever a namespace does not say otherwise (the apiserver's
    // PodSecurityConfiguration defaults), as on hardened clusters.
    const podSecurity = { name: 'PodSecurity', configuration: { apiVersion: 'pod-security.admission.config.k8s.io/v1', kind: 'PodSecurityConfiguration', defaults: { enforce: 'baseline', 'enforce-version': 'latest' }, exemptions: {} } };
    [cp, images, upstream, privateUpstream] = await Promise.all([
      startControlPlane({ controllers: true, serviceAccounts: true, clusterEgressSocket: egressSocket, admissionPlugins: [podSecurity] }),
      startRegistry(),
      startRegistry(),
      startRegistry({ auth: 'basic' }),
    ]);
    await Promise.all([images.push(app.image, 'pullbridge', 'test'), upstream.push(workload, 'team/app', '1.0'), privateUpstream.push(workload, 'team/app', '1.0')]);
    kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);

    // The node's own address as its InternalIP: the webhook's status collector reaches a hostNetwork
    // proxy at its Pod IP, which is the node's address (127.0.0.1 would be the webhook Pod's own).
    node = await startNode({ controlPlane: cp, token: cp.nodeToken, podNetwork: { subnet: SUBNET }, kubeProxyToken: cp.proxyToken, egressSocket, nodeAddress: '10.77.0.2/24', nodeAddressIsInternalIP: true });
    await node.reach(images.port);
    await node.reach(upstream.port);
    await node.reach(privateUpstream.port);
    await node.reachOnNodeAddresses(upstream.port, UPSTREAM_NODE_PORT);
    await node.reachOnNodeAddresses(Number(new URL(cp.url).port), APISERVER_NODE_PORT);
    await kc.makeApiClient(DiscoveryV1Api).createNamespacedEndpointSlice({
      namespace: 'default',
      body: {
        metadata: { name: 'kubernetes', labels: { 'kubernetes.io/service-name': 'kubernetes' } },
        addressType: 'IPv4',
        endpoints: [{ addresses: [GATEWAY], conditions: { ready: true } }],
        ports: [{ name: 'https', port: APISERVER_NODE_PORT, protocol: 'TCP' }],
      },
    });
    // README "Install with Helm": the namespace first, labelled for the proxy.
    await core.createNamespace({ body: { metadata: { name: RELEASE_NAMESPACE, labels: { 'pod-security.kubernetes.io/enforce': 'privileged' } } } });
    const name = node.name;
    await waitForNode(core, name, WAIT_MS, isSchedulable, 'Ready and schedulable').catch((error: unknown) => {
      throw failure(error);
    });
  });

  after(async () => {
    await node?.stop();
    await stopAllNodes(); // one whose start outlived a timed-out setup
    await images?.stop();
    await upstream?.stop();
    await privateUpstream?.stop();
    await cp?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  describe('Pod Security Admission', () => {
    const STRICT = 'pullbridge-baseline';
    const strictValues = (): string => {
      const file = join(dir, 'values-strict.yaml');
      writeFileSync(file, stringifyYaml({ image: { repository: `localhost:${images.port}/pullbridge`, tag: 'test' }, registries: [], proxy: { exposure: 'hostNetwork', port: PROXY_PORT } }));
      return file;
    };

    it('helm install into a namespace that enforces `baseline` is refused, naming the label to set', async () => {
      await core.createNamespace({ body: { metadata: { name: STRICT, labels: { 'pod-security.kubernetes.io/enforce': 'baseline' } } } });
      const refused = await helm('install', 'strict', CHART, '-n', STRICT, '-f', strictValues()).then(
        () => '',
        (error: unknown) => (error as Error).message,
      );
      assert.match(refused, /namespace pullbridge-baseline enforces Pod Security "baseline", but the proxy needs "privileged" \(a hostPath for the cache, hostNetwork\)/);
      assert.match(refused, /kubectl label namespace pullbridge-baseline pod-security\.kubernetes\.io\/enforce=privileged --overwrite/);
      assert.match(await helm('list', '-n', STRICT, '-q'), /^\s*$/, 'nothing was installed');
    });

    it('without that check the apiserver refuses the proxy Pods: the DaemonSet stays at 0 Pods with a PodSecurity event', async () => {
      await helm('install', 'strict', CHART, '-n', STRICT, '-f', strictValues(), '--set', 'podSecurity.checkNamespace=false', '--set', 'webhook.replicas=0');
      try {
        const events = await until(
          'no FailedCreate event for the proxy DaemonSet',
          async () => (await core.listNamespacedEvent({ namespace: STRICT })).items.filter((e) => e.reason === 'FailedCreate' && e.involvedObject.kind === 'DaemonSet'),
          (list) => list.length > 0,
        );
        assert.match(events[0]?.message ?? '', /violates PodSecurity "baseline:latest": host namespaces \(hostNetwork=true\).*hostPath volumes/);
        assert.equal((await core.listNamespacedPod({ namespace: STRICT, labelSelector: 'app.kubernetes.io/component=proxy' })).items.length, 0);
      } finally {
        await helm('uninstall', 'strict', '-n', STRICT, '--wait', '--timeout', HELM_TIMEOUT);
      }
    });
  });

  // Each exposure is a fresh release: installed, used, uninstalled.
  const exposures: readonly Exposure[] = ['hostNetwork', 'nodePort', 'hostPort'];
  for (const exposure of exposures) {
    describe(`proxy exposure ${exposure}`, () => {
      const APP_NAMESPACE = `shop-${exposure.toLowerCase()}`;
      // With hostNetwork the proxy is on the node's loopback, where node.reach puts the upstream.
      const upstreamUrl = (): string => (exposure === 'hostNetwork' ? `http://127.0.0.1:${upstream.port}` : `http://${GATEWAY}:${UPSTREAM_NODE_PORT}`);
      let valuesFile = '';
      /** The proxy's access-log records of pulls, from its Pod's log (kubectl logs). */
      const proxyRecords = async (): Promise<AccessRecord[]> => {
        const proxyPod = (await core.listNamespacedPod({ namespace: RELEASE_NAMESPACE, labelSelector: 'app.kubernetes.io/component=proxy' })).items[0]?.metadata?.name ?? '';
        return (await kubectl('logs', '-n', RELEASE_NAMESPACE, proxyPod, '-c', 'proxy'))
          .split('\n')
          .filter((line) => line.startsWith('{'))
          .map((line) => JSON.parse(line) as AccessRecord)
          .filter((r) => r.access === 'pull');
      };

      it('helm install --wait: webhook Pods Ready with the bootstrapped certificate in caBundle, the proxy DaemonSet Pod Ready', async () => {
        const values = {
          image: { repository: `localhost:${images.port}/pullbridge`, tag: 'test' },
          registries: [{ name: 'corp', match: ['registry.corp.example:5000'], upstream: upstreamUrl(), auth: { mode: 'broker' } }],
          webhook: { certificates: { mode: 'bootstrap' } },
          proxy: { exposure, port: PROXY_PORT },
          // A tag is asked upstream on every pull, so that one served while the upstream is down is stale.
          cache: { tagTTLSeconds: 0 },
          // Connection status collected every 2 s rather than every probe interval (30 s).
          status: { intervalSeconds: 2 },
        };
        valuesFile = join(dir, `values-${exposure}.yaml`);
        writeFileSync(valuesFile, stringifyYaml(values));
        await helm('install', 'pullbridge', CHART, '-n', RELEASE_NAMESPACE, '-f', valuesFile, '--wait', '--timeout', HELM_TIMEOUT).catch((error: unknown) => {
          throw failure(error);
        });

        const apps = kc.makeApiClient(AppsV1Api);
        const deployment = await apps.readNamespacedDeployment({ namespace: RELEASE_NAMESPACE, name: 'pullbridge-webhook' });
        assert.equal(deployment.status?.readyReplicas, deployment.spec?.replicas);
        const webhookPods = (await core.listNamespacedPod({ namespace: RELEASE_NAMESPACE, labelSelector: 'app.kubernetes.io/component=webhook' })).items;
        assert.equal(webhookPods.filter(podReady).length, deployment.spec?.replicas, JSON.stringify(webhookPods.map((p) => p.status?.conditions)));
        // helm --wait can return before the DaemonSet controller has counted the node (0 of 0
        // scheduled reads as ready): wait, bounded, for its one Pod.
        await until(
          'the proxy DaemonSet never had its Pod Ready',
          () => apps.readNamespacedDaemonSet({ namespace: RELEASE_NAMESPACE, name: 'pullbridge-proxy' }),
          (ds) => ds.status?.desiredNumberScheduled === 1 && ds.status.numberReady === 1,
        );
        const proxyPods = (await core.listNamespacedPod({ namespace: RELEASE_NAMESPACE, labelSelector: 'app.kubernetes.io/component=proxy' })).items;
        assert.equal(proxyPods.length, 1);
        assert.ok(proxyPods.every(podReady));
        assert.equal(proxyPods[0]?.spec?.nodeName, node?.name);

        // The certificate the webhook made: its Secret, its CA in the webhook configuration's caBundle,
        // the serving certificate issued by that CA for the Service's name.
        const secret = await core.readNamespacedSecret({ namespace: RELEASE_NAMESPACE, name: 'pullbridge-webhook-tls' });
        const data = (key: string) => Buffer.from(secret.data?.[key] ?? '', 'base64').toString();
        const hook = await kc.makeApiClient(AdmissionregistrationV1Api).readMutatingWebhookConfiguration({ name: 'pullbridge' });
        const caBundle = Buffer.from(hook.webhooks?.[0]?.clientConfig.caBundle ?? '', 'base64').toString();
        assert.match(caBundle, /BEGIN CERTIFICATE/);
        assert.equal(caBundle.trim(), data('ca.crt').trim());
        const serving = new X509Certificate(data('tls.crt'));
        assert.ok(serving.checkIssued(new X509Certificate(caBundle)), 'the serving certificate is issued by the caBundle CA');
        assert.match(serving.subjectAltName ?? '', /DNS:pullbridge-webhook\.pullbridge\.svc\b/);
      });

      it('a Pod created with its original image is rewritten, pulled through the DaemonSet\'s proxy Pod, and Running', async () => {
        // The node's namespace has no default route (nothing but the Pod network's bridge), so a
        // connection from there to a ClusterIP fails before kube-proxy's DNAT could apply: route
        // everything to the bridge, which exists since the webhook Pods got their addresses.
        await node?.exec('ip', ['route', 'replace', 'default', 'dev', 'pb0']);
        await core.createNamespace({ body: { metadata: { name: APP_NAMESPACE } } });
        // The ServiceAccount admission plugin refuses Pods until the namespace's default account exists.
        await until('no default ServiceAccount', () => core.readNamespacedServiceAccount({ namespace: APP_NAMESPACE, name: 'default' }), () => true);
        const proxied = `localhost:${PROXY_PORT}/corp/team/app:1.0`;
        const body: V1Pod = { metadata: { name: 'web' }, spec: { terminationGracePeriodSeconds: 1, containers: [{ name: 'app', image: CORP_IMAGE, imagePullPolicy: 'Always' }] } };
        // The apiserver takes up a new webhook configuration asynchronously: dry runs until it mutates.
        await until('the webhook never mutated a dry-run Pod', () => core.createNamespacedPod({ namespace: APP_NAMESPACE, body, dryRun: 'All' }), (p) => p.spec?.containers[0]?.image === proxied);
        await core.createNamespacedPod({ namespace: APP_NAMESPACE, body });
        const stored = await core.readNamespacedPod({ namespace: APP_NAMESPACE, name: 'web' });
        assert.equal(stored.spec?.containers[0]?.image, proxied);
        assert.deepEqual(stored.spec?.imagePullSecrets?.map((s) => s.name), ['pullbridge-pull']);

        // A first Pod can wait ~15 s on the Node-authorizer race for its pull secret (real-node.md).
        const running = await waitForPod(core, APP_NAMESPACE, 'web', isRunning, WAIT_MS, 'Running').catch((error: unknown) => {
          throw failure(error);
        });
        assert.equal(running.status?.containerStatuses?.[0]?.imageID, `localhost:${PROXY_PORT}/corp/team/app@${workload.index.digest}`);
        assert.equal((await kubectl('logs', '-n', APP_NAMESPACE, 'web')).trim(), message);

        // The proxy Pod's own access log (kubectl logs, through the apiserver and kubelet).
        // Read until the log shows them (kubelet's log file may trail the response), then assert.
        const digests = [workload.manifests[0]?.digest, workload.configs[0]?.digest, workload.layers[0]?.digest];
        const servedTo = (r: AccessRecord) => r.rule === 'corp' && r.status === 200 && r.namespace === APP_NAMESPACE;
        const records = await until(`the proxy Pod's log never named all of ${digests.join(', ')}`, proxyRecords, (rs) => digests.every((d) => rs.some((r) => servedTo(r) && r.reference === d))).catch(() => proxyRecords());
        for (const digest of digests) {
          assert.ok(records.some((r) => servedTo(r) && r.reference === digest), `the proxy Pod served ${digest} to namespace ${APP_NAMESPACE}: ${JSON.stringify(records.filter((r) => r.rule === 'corp'))}`);
        }
      });

      it('kubectl get regconn: the webhook collected the node\'s proxy status into the rule\'s RegistryConnection', async () => {
        type Connection = { status?: { conditions?: Array<{ type: string; status: string }>; nodes?: Array<{ node: string; reachable: boolean | null; lastError: string | null }> } };
        const read = async () => JSON.parse(await kubectl('get', 'registryconnections', 'corp', '-n', RELEASE_NAMESPACE, '-o', 'json')) as Connection;
        const connection = await until('the rule never showed Ready', read, (c) => c.status?.conditions?.find((x) => x.type === 'Ready')?.status === 'True');
        assert.deepEqual(connection.status?.conditions?.map((c) => [c.type, c.status]), [
          ['Reachable', 'True'],
          ['Authenticated', 'True'],
          ['Ready', 'True'],
        ]);
        assert.deepEqual(connection.status?.nodes?.map((n) => [n.node, n.reachable, n.lastError]), [[node?.name, true, null]]);
        assert.match(await kubectl('get', 'regconn', '-n', RELEASE_NAMESPACE), /\ncorp\s+\S+\s+True\s+True\s+True\s+1\/1\s/);
      });

      if (exposure === 'hostNetwork') {
        it('helm upgrade adding rules with upstream credentials (inline, and from a Secret the user made): the proxy Pod stays (same UID), both are served after the reload; no Warning event in the release namespace', async () => {
          const selector = { namespace: RELEASE_NAMESPACE, labelSelector: 'app.kubernetes.io/component=proxy' };
          const before = (await core.listNamespacedPod(selector)).items.map((p) => p.metadata?.uid);
          assert.equal(before.length, 1);
          // Both upstreams answer 401 without the puller's credentials: a pull that works used them.
          const [username, password] = Object.entries(DEFAULT_USERS)[0] ?? ['', ''];
          const privateUrl = `http://127.0.0.1:${privateUpstream.port}`;
          await core.createNamespacedSecret({ namespace: RELEASE_NAMESPACE, body: { metadata: { name: 'mirrored-robot' }, stringData: { username, password } } });
          const added = [
            { name: 'other', match: ['registry.other.example:5000'], upstream: privateUrl, auth: { mode: 'broker' }, credentials: { username, password } },
            { name: 'mirrored', match: ['registry.mirrored.example:5000'], upstream: privateUrl, auth: { mode: 'broker' }, credentialsSecret: 'mirrored-robot' },
          ];
          const upgraded = join(dir, `values-${exposure}-upgrade.yaml`);
          // The first file's values, then the rules extended (a list is replaced, not merged).
          const first = await helm('get', 'values', 'pullbridge', '-n', RELEASE_NAMESPACE, '-o', 'json');
          const registries = [...((JSON.parse(first) as { registries: unknown[] }).registries), ...added];
          writeFileSync(upgraded, stringifyYaml({ registries }));
          await helm('upgrade', 'pullbridge', CHART, '-n', RELEASE_NAMESPACE, '-f', valuesFile, '-f', upgraded, '--wait', '--timeout', HELM_TIMEOUT).catch((error: unknown) => {
            throw failure(error);
          });
          // The ConfigMap and the credential Secrets changed; the Pod templates did not: no Pod
          // restarts, each reloads in place (kubelet updates mounted ConfigMaps and Secrets within
          // its sync period, node.ts sets 5 s, in no particular order: the proxy waits for the files).
          for (const rule of ['other', 'mirrored']) {
            const image = `registry.${rule}.example:5000/team/app:1.0`;
            const proxied = `localhost:${PROXY_PORT}/${rule}/team/app:1.0`;
            const body: V1Pod = { metadata: { name: `web-${rule}` }, spec: { terminationGracePeriodSeconds: 1, containers: [{ name: 'app', image, imagePullPolicy: 'Always' }] } };
            await until(`the webhook never took up the rule ${rule}`, () => core.createNamespacedPod({ namespace: APP_NAMESPACE, body, dryRun: 'All' }), (p) => p.spec?.containers[0]?.image === proxied);
            // The proxy reloads on its own schedule: until its log shows the rule answering, a pull of
            // an unknown rule fails and kubelet retries (with back-off), so the Pod waits, bounded.
            await core.createNamespacedPod({ namespace: APP_NAMESPACE, body });
          }
          for (const rule of ['other', 'mirrored']) {
            await waitForPod(core, APP_NAMESPACE, `web-${rule}`, isRunning, WAIT_MS, 'Running').catch((error: unknown) => {
              throw failure(error);
            });
            const records = (await proxyRecords()).filter((r) => r.rule === rule && r.status === 200 && r.namespace === APP_NAMESPACE);
            assert.ok(records.some((r) => r.kind === 'manifest'), `the rule ${rule} served the manifest`);
          }
          assert.deepEqual((await core.listNamespacedPod(selector)).items.map((p) => p.metadata?.uid), before, 'the proxy Pod was not replaced');
          for (const rule of ['other', 'mirrored']) await core.deleteNamespacedPod({ namespace: APP_NAMESPACE, name: `web-${rule}`, gracePeriodSeconds: 0 });
          // The install and the upgrade raised no Warning (no failed probe while the webhook made its
          // certificate or the proxy opened its cache, no failed mount).
          // MissingClusterDNS is this harness's: its kubelet has no cluster DNS (node.ts runs none).
          // "failed to sync secret cache" and "failed to sync configmap cache" are kubelet's own race
          // at Pod start (its watch of a Secret or ConfigMap the Node authorizer admits only once the
          // Pod is bound; seen on a loaded machine, the mount retried and succeeded, the Pods went
          // Ready): not the chart's. Any other failed mount counts.
          const kubeletSecretCacheRace = (e: { reason?: string; message?: string }) => e.reason === 'FailedMount' && /failed to sync (secret|configmap) cache: timed out waiting for the condition$/.test(e.message ?? '');
          const warnings = (await core.listNamespacedEvent({ namespace: RELEASE_NAMESPACE })).items.filter((e) => e.type === 'Warning' && e.reason !== 'MissingClusterDNS' && !kubeletSecretCacheRace(e));
          assert.deepEqual(warnings.map((e) => `${e.involvedObject.kind}/${e.involvedObject.name} ${e.reason}: ${e.message}`), []);
        });

        it('the node cache as deployed: its hostPath store is the proxy user\'s, outlives the proxy Pod, and starts a new Pod while the upstream is down', async () => {
          if (!node) throw new Error('the node is not running');
          // The chart's cache.hostPath (/var/lib/pullbridge/cache) as the node sees it.
          const store = join(node.dir, 'var-lib', 'pullbridge', 'cache');
          const layer = workload.layers[0]?.digest ?? '';
          const blobFile = join(store, 'blobs', 'sha256', layer.slice('sha256:'.length));
          const stored = statSync(blobFile);
          assert.equal(stored.uid, 65532, 'the blob was written by the proxy\'s non-root user');
          assert.equal(stored.size, workload.layers[0]?.size);
          assert.equal(statSync(store).uid, 65532, 'the init container handed the store to the proxy\'s user');

          // A proxy restart: the Pod deleted, the DaemonSet makes a new one on the same hostPath.
          const selector = { namespace: RELEASE_NAMESPACE, labelSelector: 'app.kubernetes.io/component=proxy' };
          const [old] = (await core.listNamespacedPod(selector)).items;
          await core.deleteNamespacedPod({ namespace: RELEASE_NAMESPACE, name: old?.metadata?.name ?? '' });
          await until('no new proxy Pod Ready', async () => (await core.listNamespacedPod(selector)).items, (pods) => pods.length === 1 && pods[0]?.metadata?.uid !== old?.metadata?.uid && pods[0] !== undefined && podReady(pods[0]));
          assert.ok(existsSync(blobFile), 'the stored blob outlived the proxy Pod');

          // The upstream goes down; the workload image leaves the node; a new Pod of it still starts.
          await core.deleteNamespacedPod({ namespace: APP_NAMESPACE, name: 'web', gracePeriodSeconds: 0 });
          await until('the Pod web is still there', async () => (await core.listNamespacedPod({ namespace: APP_NAMESPACE })).items.filter((p) => p.metadata?.name === 'web'), (pods) => pods.length === 0);
          const ofWorkload = (reference: string) => reference.includes('/team/app') || reference === workload.configs[0]?.digest;
          // Until kubelet removed the old container, it holds the unpacked layer and a pull skips it.
          await until('a container of the workload image is still on the node', () => node?.containerImages() ?? Promise.resolve([]), (list) => !list.some(ofWorkload));
          await node.removeImages((await node.images()).filter(ofWorkload));
          await upstream.kill();
          try {
            const body: V1Pod = { metadata: { name: 'web' }, spec: { terminationGracePeriodSeconds: 1, containers: [{ name: 'app', image: CORP_IMAGE, imagePullPolicy: 'Always' }] } };
            await core.createNamespacedPod({ namespace: APP_NAMESPACE, body });
            await waitForPod(core, APP_NAMESPACE, 'web', isRunning, WAIT_MS, 'Running').catch((error: unknown) => {
              throw failure(error);
            });
            assert.equal((await kubectl('logs', '-n', APP_NAMESPACE, 'web')).trim(), message);
          } finally {
            await upstream.restart();
          }
          // The new proxy Pod's access log: the tag from its last known digest (stale, the upstream
          // unreachable), the manifest and every blob from the node store.
          const records = (await proxyRecords()).filter((r) => r.rule === 'corp' && r.namespace === APP_NAMESPACE && r.status === 200);
          assert.ok(records.some((r) => r.kind === 'manifest' && r.reference === '1.0' && r.cache === 'stale'), `the tag was served stale: ${JSON.stringify(records)}`);
          for (const digest of [workload.manifests[0]?.digest, workload.configs[0]?.digest, layer]) {
            assert.ok(records.some((r) => r.reference === digest && r.cache === 'hit'), `${digest} was a cache hit: ${JSON.stringify(records)}`);
          }
        });
      }

      it('helm uninstall --wait removes the release; the workload image leaves the node, so the next release pulls again', async () => {
        await core.deleteNamespacedPod({ namespace: APP_NAMESPACE, name: 'web', gracePeriodSeconds: 0 });
        await helm('uninstall', 'pullbridge', '-n', RELEASE_NAMESPACE, '--wait', '--timeout', HELM_TIMEOUT).catch((error: unknown) => {
          throw failure(error);
        });
        await until('Pods of the release or the workload are still there', async () => [...(await core.listNamespacedPod({ namespace: RELEASE_NAMESPACE })).items, ...(await core.listNamespacedPod({ namespace: APP_NAMESPACE })).items], (pods) => pods.length === 0);
        await until('the MutatingWebhookConfiguration is still there', () => kc.makeApiClient(AdmissionregistrationV1Api).listMutatingWebhookConfiguration(), (list) => list.items.length === 0);
        if (!node) throw new Error('the node is not running');
        // CRI names an image by its references and by its config digest: remove all, content with them.
        // Both rules' references share the content: remove every one.
        const ofWorkload = (reference: string) => reference.includes('/team/app') || reference === workload.configs[0]?.digest;
        // Until kubelet removed the Pods' containers, they hold the unpacked layer, and the next
        // release's pull would skip fetching it (kubelet's container GC runs every minute).
        await until('a container of the workload image is still on the node', () => node?.containerImages() ?? Promise.resolve([]), (list) => !list.some(ofWorkload));
        await node.removeImages((await node.images()).filter(ofWorkload));
        assert.deepEqual((await node.images()).filter(ofWorkload), []);
      });
    });
  }

  // In a suite of its own: mocha runs a suite's own tests before its nested suites.
  describe('teardown', () => {
    it('stops cleanly: no process, mount, cgroup or changed sysctl left on this machine', async () => {
      const stopping = node;
      node = undefined;
      assert.ok(stopping);
      assert.deepEqual(await stopping.stop(), []);
    });
  });
});
