// Which ways of exposing a DaemonSet as `localhost:<port>` on a node answer on the node's 127.0.0.1
// (what the container runtime dials for an image `localhost:30500/...`), under each kube-proxy mode.
// One control plane; for each mode a fresh real node (./support/node.ts) with a Pod network, its own
// non-loopback address, and kube-proxy in that mode, one after the other. On each node one Pod off
// the node's network backs a NodePort Service and a hostPort, and one hostNetwork Pod listens on the
// node itself; every exposure is dialled from inside the node on 127.0.0.1 and on the node's address.
// Each Pod answers with a line of its own, so a dial tells who answered. Last, a second NodePort
// Service is given the hostNetwork Pod's port, and that port is dialled again; and the proxy command
// runs inside the node on 127.0.0.1 at a third NodePort's port.
//
// `--nodeport-addresses` unset means every local address in iptables and ipvs mode; in nftables mode
// it means `primary`, the Node's InternalIP, which is 127.0.0.1 on this node (its name), and
// kube-proxy drops a loopback primary IP: here too every local address (in a cluster, the node's
// InternalIP only).
//
// The assertions are what was observed (kube-proxy v1.31.4, containernetworking-plugins 1.1.1):
//   iptables: the NodePort answers on 127.0.0.1 and on the node address (kube-proxy sets
//             route_localnet=1 and DNATs loopback NodePort traffic).
//   nftables: the NodePort answers on the node address only; 127.0.0.1 is refused, and listing
//             127.0.0.0/8 in --nodeport-addresses does not change that (kube-proxy logs that
//             localhost NodePorts are not supported and leaves loopback out).
//   hostPort (portmap) and hostNetwork answer on 127.0.0.1 whatever kube-proxy's mode.
//   A NodePort Service given the port a hostNetwork Pod listens on (30500 here, the chart's
//   proxy.port with the hostNetwork exposure, inside the NodePort range):
//     iptables: the Service's Pod answers 127.0.0.1:30500 and the node address: the DNAT in nat
//               OUTPUT comes before the hostNetwork listener, which no longer sees those
//               connections (a node's image pulls would go to that Service).
//     nftables: the hostNetwork Pod keeps 127.0.0.1:30500; the node address goes to the Service.
//   `pullbridge proxy` on 127.0.0.1:30502 (a NodePort Service given 30502 too), its listener check
//   on: under iptables it finds its address answered by the Service's Pod ("an answer that is not
//   HTTP"), /readyz 503, pullbridge_proxy_listener_claimed 0, the warning logged; under nftables it
//   answers its address itself, /readyz 200.
// ipvs mode needs the kernel's ip_vs module and the ipset command; where they are missing its case is
// skipped, naming what is missing (kube-proxy would exit: "can't use the IPVS proxier").

import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CoreV1Api, KubeConfig, type V1Pod } from '@kubernetes/client-node';
import type { ListenerStatus } from '../src/proxy/listener.js';
import { CLI } from './support/cli.js';
import { startControlPlane, type ControlPlane } from './support/controlplane.js';
import { isSchedulable, waitForNode } from './support/cluster.js';
import { buildWorkloadImage, nodePod, startNode, stopAllNodes, type KubeProxyMode, type RealNode } from './support/node.js';
import { hasCommand } from './support/procs.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const SUBNET = '10.88.0.0/24';
const NODE_ADDRESS = '10.77.0.2';
const APP_PORT = 8080;
const NODE_PORT = 30501;
const HOST_PORT = 18080;
/** Inside the NodePort range (30000-32767, the apiserver's default): the chart's proxy.port with
 * the hostNetwork exposure, which a NodePort Service can also be given. */
const HOST_NETWORK_PORT = 30500;
/** The real proxy's registry port on the node's 127.0.0.1 (inside the NodePort range, as 30500),
 * and its operations port (outside it). */
const PROXY_PORT = 30502;
const PROXY_OPS_PORT = 19090;
/** Bounded waits (the machine is shared and slow at times): generous, never a measure of speed. */
const WAIT_MS = 90_000;
const MESSAGE = 'exposure matrix';
/** Each Pod's line (its arguments): who answered a dial. */
const LINES = { web: `${MESSAGE} web`, hostNetwork: `${MESSAGE} hostNetwork` } as const;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const running = (pod: V1Pod): boolean => pod.status?.phase === 'Running' && pod.status.containerStatuses?.every((c) => c.state?.running !== undefined) === true;

/** What a dial observed: the line of the Pod behind the Service and hostPort (`web`), the
 * hostNetwork Pod's line, or the connection refused. */
type Outcome = keyof typeof LINES | 'refused';

const say = (outcome: Outcome): string => (outcome === 'refused' ? 'refused' : outcome === 'web' ? "answered by the Service's Pod" : 'answered by the hostNetwork Pod');

interface Case {
  readonly mode: KubeProxyMode;
  /** kube-proxy's --nodeport-addresses; empty: unset (every local address on this node, see above). */
  readonly nodePortAddresses: readonly string[];
  /** The NodePort on 127.0.0.1 and on the node's address. */
  readonly nodePort: { readonly loopback: 'web' | 'refused'; readonly nodeAddress: 'web' | 'refused' };
  /** Once a NodePort Service is given the port the hostNetwork Pod listens on: who answers that
   * port on 127.0.0.1 and on the node's address. */
  readonly nodePortOnHostNetworkPort: { readonly loopback: Outcome; readonly nodeAddress: Outcome };
  /** `pullbridge proxy` on 127.0.0.1 at a port a NodePort Service is given: whether its listener
   * check finds its address answered by itself. */
  readonly proxyClaimsLoopback: boolean;
  /** A line kube-proxy logs in this case. */
  readonly logs?: RegExp;
}

const CASES: readonly Case[] = [
  {
    mode: 'iptables',
    nodePortAddresses: [],
    nodePort: { loopback: 'web', nodeAddress: 'web' },
    nodePortOnHostNetworkPort: { loopback: 'web', nodeAddress: 'web' },
    proxyClaimsLoopback: false,
  },
  {
    mode: 'nftables',
    nodePortAddresses: [],
    nodePort: { loopback: 'refused', nodeAddress: 'web' },
    nodePortOnHostNetworkPort: { loopback: 'hostNetwork', nodeAddress: 'web' },
    proxyClaimsLoopback: true,
  },
  {
    mode: 'nftables',
    nodePortAddresses: ['127.0.0.0/8', `${NODE_ADDRESS}/32`],
    nodePort: { loopback: 'refused', nodeAddress: 'web' },
    nodePortOnHostNetworkPort: { loopback: 'hostNetwork', nodeAddress: 'web' },
    proxyClaimsLoopback: true,
    logs: /--nodeport-addresses includes localhost but localhost NodePorts are not supported/,
  },
  // Not observed here (no ip_vs): kube-proxy's ipvs proxier leaves loopback out of the NodePort
  // addresses and returns early for traffic from 127.0.0.0/8 (pkg/proxy/ipvs/proxier.go).
  {
    mode: 'ipvs',
    nodePortAddresses: [],
    nodePort: { loopback: 'refused', nodeAddress: 'web' },
    nodePortOnHostNetworkPort: { loopback: 'hostNetwork', nodeAddress: 'web' },
    proxyClaimsLoopback: true,
  },
];

/** What this machine lacks to run kube-proxy in `mode`, detected now; empty when it can. */
function missingFor(mode: KubeProxyMode): string[] {
  if (mode === 'nftables') return hasCommand('nft') ? [] : ['the nft command (Debian package nftables)'];
  if (mode === 'ipvs') {
    const missing: string[] = [];
    if (!existsSync('/proc/net/ip_vs')) missing.push('the ip_vs kernel module (/proc/net/ip_vs is absent)');
    if (!hasCommand('ipset')) missing.push('the ipset command');
    return missing;
  }
  return [];
}

describe('exposure matrix: NodePort, hostPort and hostNetwork on the node\'s 127.0.0.1 under each kube-proxy mode', function () {
  this.timeout(300_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-exposure-'));
  let cp: ControlPlane;
  let registry: RegistryHandle;
  let core: CoreV1Api;
  let image: string;

  before(async function () {
    this.timeout(180_000);
    [cp, registry] = await Promise.all([startControlPlane({ controllers: true }), startRegistry()]);
    await registry.push(buildWorkloadImage(dir, 'unused'), 'team/app', '1.0');
    image = `localhost:${registry.port}/team/app:1.0`;
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    core = kc.makeApiClient(CoreV1Api);
  });

  after(async () => {
    await stopAllNodes(); // one whose case failed half-way
    await registry?.stop();
    await cp?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  CASES.forEach((c, index) => {
    const flag = c.nodePortAddresses.length > 0 ? `--nodeport-addresses=${c.nodePortAddresses.join(',')}` : '--nodeport-addresses unset';
    describe(`kube-proxy ${c.mode} mode, ${flag}`, function () {
      const namespace = `matrix-${index}`;
      let node: RealNode | undefined;

      const failure = (error: unknown) => new Error(`${(error as Error).message}\n--- node ---\n${node?.logs().slice(-6000) ?? ''}\n--- control plane ---\n${cp?.logs().slice(-3000) ?? ''}`);

      /** Dials host:port inside the node's namespace once (5 s at most): whose line came back, or
       * the connection refused; anything else (a timeout, another error) is thrown. */
      const dial = async (host: string, port: number): Promise<Outcome> => {
        if (!node) throw new Error('the node is not running');
        const script = `const s=require('net').connect(${port},${JSON.stringify(host)});let d='';s.setTimeout(5000,()=>{process.stdout.write('timeout');process.exit(0)});s.on('data',c=>d+=c);s.on('end',()=>{process.stdout.write('data:'+d);process.exit(0)});s.on('error',e=>{process.stdout.write('error:'+(e.code||e.message));process.exit(0)})`;
        const seen = (await node.exec(process.execPath, ['-e', script])).trim();
        if (seen === `data:${LINES.web}`) return 'web';
        if (seen === `data:${LINES.hostNetwork}`) return 'hostNetwork';
        if (seen === 'error:ECONNREFUSED') return 'refused';
        throw new Error(`${host}:${port}: ${seen}`);
      };
      /** Waits until `who` answers host:port (Services and port mappings are programmed asynchronously). */
      const answers = async (host: string, port: number, who: Exclude<Outcome, 'refused'>): Promise<void> => {
        let last = '';
        for (const deadline = Date.now() + WAIT_MS; Date.now() < deadline; await sleep(500)) {
          try {
            last = await dial(host, port);
            if (last === who) return;
          } catch (error) {
            last = (error as Error).message;
          }
        }
        throw failure(new Error(`${host}:${port} was never ${say(who)} inside the node: ${last}`));
      };
      /** Once host:port is known to be programmed elsewhere: three dials, each must see `outcome`. */
      const steady = async (host: string, port: number, outcome: Outcome): Promise<void> => {
        for (let i = 0; i < 3; i++, await sleep(500)) assert.equal(await dial(host, port), outcome, `${host}:${port}`);
      };
      /** The addresses in the order to check them: one the Service answers first (once it does, the
       * Service is programmed), then the other, whose outcome must then hold. */
      const expectOnBoth = async (port: number, expected: { readonly loopback: Outcome; readonly nodeAddress: Outcome }): Promise<void> => {
        const order = expected.nodeAddress === 'web' ? ([[NODE_ADDRESS, expected.nodeAddress], ['127.0.0.1', expected.loopback]] as const) : ([['127.0.0.1', expected.loopback], [NODE_ADDRESS, expected.nodeAddress]] as const);
        for (const [index, [host, outcome]] of order.entries()) await (index === 0 && outcome !== 'refused' ? answers(host, port, outcome) : steady(host, port, outcome));
      };

      before(async function () {
        const missing = missingFor(c.mode);
        if (missing.length > 0) {
          const reason = `skipped: kube-proxy ${c.mode} mode needs ${missing.join(' and ')}, missing on this machine`;
          for (const test of this.test?.parent?.tests ?? []) test.title += ` (${reason})`;
          this.skip();
        }
        node = await startNode({
          controlPlane: cp,
          token: cp.nodeToken,
          podNetwork: { subnet: SUBNET },
          kubeProxyToken: cp.proxyToken,
          kubeProxyMode: c.mode,
          nodePortAddresses: c.nodePortAddresses,
          nodeAddress: `${NODE_ADDRESS}/24`,
        });
        await node.reach(registry.port);
        await waitForNode(core, node.name, WAIT_MS, isSchedulable, 'Ready and schedulable').catch((error: unknown) => {
          throw failure(error);
        });
        await core.createNamespace({ body: { metadata: { name: namespace } } });
        const app = { name: 'app', image, args: [LINES.web], env: [{ name: 'LISTEN_PORT', value: String(APP_PORT) }], ports: [{ containerPort: APP_PORT, hostPort: HOST_PORT }] };
        await core.createNamespacedPod({ namespace, body: { metadata: { name: 'web', labels: { app: 'web' } }, spec: { nodeName: node.name, terminationGracePeriodSeconds: 1, containers: [app] } } });
        const hostNetwork = nodePod(node, 'hostnet', image, { containers: [{ name: 'app', image, args: [LINES.hostNetwork], env: [{ name: 'LISTEN_PORT', value: String(HOST_NETWORK_PORT) }] }] });
        await core.createNamespacedPod({ namespace, body: hostNetwork });
        await core.createNamespacedService({
          namespace,
          body: { metadata: { name: 'web' }, spec: { type: 'NodePort', selector: { app: 'web' }, ports: [{ port: 80, targetPort: APP_PORT, nodePort: NODE_PORT }] } },
        });
        let pods: V1Pod[] = [];
        for (const deadline = Date.now() + WAIT_MS; ; await sleep(500)) {
          pods = (await core.listNamespacedPod({ namespace })).items;
          if (pods.length === 2 && pods.every(running)) break;
          if (Date.now() > deadline) throw failure(new Error(`Pods not running: ${JSON.stringify(pods.map((p) => ({ name: p.metadata?.name, status: p.status })))}`));
        }
      });

      after(async () => {
        const stopping = node;
        node = undefined;
        await stopping?.stop();
        // The next node registers under the same name: nothing of this one may be left for it.
        if (stopping) {
          for (const service of ['web', 'on-host-network-port', 'on-proxy-port']) await core.deleteNamespacedService({ name: service, namespace }).catch(() => undefined);
          for (const pod of ['web', 'hostnet']) await core.deleteNamespacedPod({ name: pod, namespace, gracePeriodSeconds: 0 }).catch(() => undefined);
          await core.deleteNode({ name: stopping.name }).catch(() => undefined);
        }
      });

      it(`NodePort: 127.0.0.1 ${say(c.nodePort.loopback)}, the node's address ${say(c.nodePort.nodeAddress)}`, async () => {
        await expectOnBoth(NODE_PORT, c.nodePort);
        if (c.logs) assert.match(node?.logs() ?? '', c.logs);
      });

      it('hostPort (portmap): answers on 127.0.0.1 and on the node\'s address', async () => {
        await answers('127.0.0.1', HOST_PORT, 'web');
        await answers(NODE_ADDRESS, HOST_PORT, 'web');
      });

      it('hostNetwork: answers on 127.0.0.1', async () => {
        await answers('127.0.0.1', HOST_NETWORK_PORT, 'hostNetwork');
      });

      // After the hostNetwork case, which saw the hostNetwork Pod alone on its port.
      it(`a NodePort Service given the hostNetwork Pod's port: 127.0.0.1 ${say(c.nodePortOnHostNetworkPort.loopback)}, the node's address ${say(c.nodePortOnHostNetworkPort.nodeAddress)}`, async () => {
        await core.createNamespacedService({
          namespace,
          body: { metadata: { name: 'on-host-network-port' }, spec: { type: 'NodePort', selector: { app: 'web' }, ports: [{ port: 80, targetPort: APP_PORT, nodePort: HOST_NETWORK_PORT }] } },
        });
        await expectOnBoth(HOST_NETWORK_PORT, c.nodePortOnHostNetworkPort);
      });

      // The proxy's own check (src/proxy/listener.ts) against the real DNAT: the command as the chart
      // runs it with the hostNetwork exposure, inside the node; the Service's Pod answers a line
      // that is not HTTP.
      it(`pullbridge proxy on 127.0.0.1 at a NodePort Service's port: ${c.proxyClaimsLoopback ? 'answered by itself, ready' : 'finds its address answered by the Service, not ready, and warns'}`, async () => {
        await core.createNamespacedService({
          namespace,
          body: { metadata: { name: 'on-proxy-port' }, spec: { type: 'NodePort', selector: { app: 'web' }, ports: [{ port: 80, targetPort: APP_PORT, nodePort: PROXY_PORT }] } },
        });
        await answers(NODE_ADDRESS, PROXY_PORT, 'web');
        const config = join(dir, `proxy-${index}.yaml`);
        writeFileSync(config, 'registries:\n  - {name: corp, match: [corp.example], upstream: "http://127.0.0.1:9", auth: {mode: anonymous}}\n');
        // Inside the node: start the command, wait for its first check, read /status, /readyz and
        // /metrics from its operations port, stop it (and wait for it: nothing stays in the node).
        const script = `
          const child = require('child_process').spawn(process.execPath, [${JSON.stringify(CLI)}, 'proxy', '--config', ${JSON.stringify(config)}, '--host', '127.0.0.1', '--port', '${PROXY_PORT}', '--ops-host', '127.0.0.1', '--ops-port', '${PROXY_OPS_PORT}', '--probe-interval', '3600'], { stdio: ['ignore', 'pipe', 'pipe'] });
          let log = '';
          child.stdout.on('data', (c) => (log += c));
          child.stderr.on('data', (c) => (log += c));
          const ops = 'http://127.0.0.1:${PROXY_OPS_PORT}';
          const finish = (result) => { child.once('exit', () => { process.stdout.write(JSON.stringify({ ...result, log })); process.exit(0); }); child.kill('SIGTERM'); };
          (async () => {
            for (let i = 0; i < 150; i++, await new Promise((r) => setTimeout(r, 200))) {
              try {
                const listener = (await (await fetch(ops + '/status')).json()).listener;
                if (listener && listener.claimed !== null) {
                  const readyz = (await fetch(ops + '/readyz')).status;
                  const metric = /^pullbridge_proxy_listener_claimed (\\d+)$/m.exec(await (await fetch(ops + '/metrics')).text())?.[1] ?? null;
                  return finish({ listener, readyz, metric });
                }
              } catch {}
            }
            finish({ listener: null });
          })();`;
        if (!node) throw new Error('the node is not running');
        const seen = JSON.parse(await node.exec(process.execPath, ['-e', script])) as { listener: ListenerStatus | null; readyz?: number; metric?: string | null; log: string };
        const report = JSON.stringify({ ...seen, log: seen.log.slice(-3000) });
        assert.equal(seen.listener?.address, `127.0.0.1:${PROXY_PORT}`, report);
        const warning = /127\.0\.0\.1:30502 is answered by something other than this proxy \(.*\): is a NodePort Service using port 30502\?/;
        if (c.proxyClaimsLoopback) {
          assert.deepEqual([seen.listener?.claimed, seen.listener?.answeredBy, seen.readyz, seen.metric], [true, 'this proxy', 200, '1'], report);
          assert.doesNotMatch(seen.log, warning, report);
        } else {
          assert.deepEqual([seen.listener?.claimed, seen.listener?.answeredBy, seen.readyz, seen.metric], [false, 'an answer that is not HTTP', 503, '0'], report);
          assert.match(seen.log, warning, report);
        }
      });

      it('stops cleanly: no process, mount, cgroup, sysctl or nftables table left on this machine', async () => {
        const stopping = node;
        node = undefined;
        assert.ok(stopping);
        assert.deepEqual(await stopping.stop(), []);
        for (const service of ['web', 'on-host-network-port', 'on-proxy-port']) await core.deleteNamespacedService({ name: service, namespace });
        for (const pod of ['web', 'hostnet']) await core.deleteNamespacedPod({ name: pod, namespace, gracePeriodSeconds: 0 });
        await core.deleteNode({ name: stopping.name });
      });
    });
  });
});
