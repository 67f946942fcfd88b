// A real Kubernetes node for tests: kubelet (built from Go modules), containerd with its CRI plugin,
// and runc, joined to a control plane from ./controlplane.ts. Everything runs in a network and mount
// namespace made for the node, so that ports, mounts and sysctls never touch this machine; the
// node and this machine's loopback reach each other through relays over socket files
// (./forward.ts). Teardown stops every process of the node, removes its mounts and cgroups, and
// reports anything it found left behind. Facts behind each setting: shared/notes/real-node.md.
//
// Without `podNetwork`, Pods are scheduled by naming the node (`spec.nodeName: node.name`) with
// `hostNetwork: true`: the node has no CNI plugin, so it stays NotReady for the pod network, and no
// scheduler runs. With `podNetwork`, a CNI conflist (bridge + host-local IPAM + portmap, Debian's
// containernetworking-plugins) gives Pods their own addresses inside the node's namespace, and the
// node goes Ready for a scheduler; `kubeProxyToken` adds kube-proxy there too, in iptables mode
// unless `kubeProxyMode` says nftables or ipvs. `nodeAddress` gives the node a non-loopback address
// of its own (on a veth pair in its namespace), as a node's NIC address.

import { spawn } from 'node:child_process';
import type { V1Pod, V1PodSpec } from '@kubernetes/client-node';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cachedBinary, tokenKubeconfig, type ControlPlane } from './controlplane.js';
import { buildRunnableImage, writeOciLayout, type TestImage } from './oci.js';
import { freePort, hasCommand, run, runAsync, startProcess, type Proc } from './procs.js';

const FORWARD = fileURLToPath(new URL('./forward.js', import.meta.url));
const PAUSE_SOURCE = fileURLToPath(new URL('../../../test/support/pause.c', import.meta.url));
/** The sandbox image, imported into containerd before kubelet starts; never pulled. */
export const PAUSE_IMAGE = 'localhost/pullbridge-test/pause:1';

/** kubelet "fixes" these at start (container_manager_linux.go, setupKernelTunables); each is
 * shadowed inside the node's mount namespace by a file holding the value kubelet wants. */
const KUBELET_SYSCTLS: Readonly<Record<string, string>> = {
  'vm/overcommit_memory': '1',
  'vm/panic_on_oom': '0',
  'kernel/panic': '10',
  'kernel/panic_on_oops': '1',
  'kernel/keys/root_maxkeys': '1000000',
  'kernel/keys/root_maxbytes': '25000000',
};

/** Sysctls of this machine the node's network could touch if it leaked out of its namespace
 * (the bridge plugin, portmap and kube-proxy set these, per network namespace): checked at stop. */
const NETWORK_SYSCTLS: readonly string[] = [
  'net/ipv4/ip_forward',
  'net/ipv4/conf/all/route_localnet',
  'net/ipv4/conf/lo/route_localnet',
  'net/bridge/bridge-nf-call-iptables',
  'net/netfilter/nf_conntrack_max',
  // kube-proxy's ipvs mode sets these (and net/ipv4/vs/*, which exist only with the ip_vs module).
  'net/ipv4/conf/all/arp_ignore',
  'net/ipv4/conf/all/arp_announce',
];

/** kube-proxy's data planes (`--proxy-mode`). */
export type KubeProxyMode = 'iptables' | 'nftables' | 'ipvs';

export interface RealNode {
  /** The Node's name, and the address the apiserver reaches its kubelet on. */
  readonly name: string;
  readonly dir: string;
  /** NodeOptions.nodeAddress without its prefix length, when given. */
  readonly address: string | undefined;
  /** Makes a port of this machine's loopback reachable on the node's loopback at the same number
   * (as `localhost:PORT`, where containerd pulls rewritten images from). */
  reach(port: number): Promise<void>;
  /** Makes a port of this machine's loopback reachable on every address of the node at `nodePort`
   * (the Pod network's gateway among them, which Pods reach where they cannot reach the node's
   * loopback). */
  reachOnNodeAddresses(port: number, nodePort: number): Promise<void>;
  /** Runs a command inside the node's namespaces. */
  exec(command: string, args: readonly string[]): Promise<string>;
  /** Image references in the node's container runtime. */
  images(): Promise<string[]>;
  /** The image of every container the node's runtime still has (running or exited): a container
   * keeps its image's unpacked layers, so that a pull of that image fetches no layer. */
  containerImages(): Promise<string[]>;
  /** Removes images from the node's runtime, so that the next Pod pulls again. */
  removeImages(references: readonly string[]): Promise<void>;
  /** Everything kubelet and containerd said, for failure messages. */
  logs(): string;
  /** Stops the node and removes what it made; resolves with what was found left behind (empty when
   * clean): processes in its namespace, mounts under its directory, cgroups, changed sysctls. */
  stop(): Promise<string[]>;
}

export interface NodeOptions {
  readonly controlPlane: ControlPlane;
  /** A token the kubelet authenticates with; a Node identity (`system:node:<name>` in
   * `system:nodes`) so that the Node authorizer and NodeRestriction apply as in a cluster. */
  readonly token: string;
  /** A Pod network in the node's namespace: a bridge with host-local addresses from `subnet` (an
   * IPv4 CIDR, e.g. `10.88.0.0/24`), masquerading, and portmap for hostPort. */
  readonly podNetwork?: { readonly subnet: string };
  /** Runs kube-proxy in the node's namespace with this token (user `system:kube-proxy`); needs
   * `podNetwork`. In iptables mode (the default) NodePorts then answer on the node's 127.0.0.1. */
  readonly kubeProxyToken?: string;
  /** kube-proxy's `--proxy-mode` (default iptables). nftables needs the `nft` command; ipvs needs
   * the kernel's ip_vs module and the `ipset` command: kube-proxy exits without them, and startNode
   * fails with its output. */
  readonly kubeProxyMode?: KubeProxyMode;
  /** kube-proxy's `--nodeport-addresses` (CIDRs; empty: the flag is not passed, and kube-proxy's
   * own default applies: every local address in iptables and ipvs mode, `primary` in nftables mode,
   * which is the Node's InternalIP, 127.0.0.1 here, dropped as loopback: every local address
   * again). Default: `127.0.0.0/8` in iptables mode (NodePorts on the node's loopback, where the
   * node's container runtime dials them), empty in the other modes (which never serve NodePorts on
   * loopback). */
  readonly nodePortAddresses?: readonly string[];
  /** A non-loopback address of the node itself, `IP/prefix` (e.g. `10.77.0.2/24`): on one end of a
   * veth pair in the node's namespace, with the default route through it. */
  readonly nodeAddress?: string;
  /** Make `nodeAddress` the Node's InternalIP (kubelet `--node-ip`), so that hostNetwork Pods get it
   * as their Pod IP, as on a real node: without it their Pod IP is the node name, 127.0.0.1, which
   * in another Pod's namespace is that Pod's own loopback. */
  readonly nodeAddressIsInternalIP?: boolean;
  /** A socket file on which an HTTP CONNECT proxy dials into the node's network namespace: the
   * apiserver's egress selector (ControlPlaneOptions.clusterEgressSocket) reaches Service and Pod
   * addresses of the node through it. */
  readonly egressSocket?: string;
}

/** A Pod for this node: it names the node and uses the node's network (no scheduler, no CNI), and
 * pulls on every start unless `spec` says otherwise. */
export function nodePod(node: RealNode, name: string, image: string, spec: Partial<V1PodSpec> = {}, labels: Record<string, string> = {}): V1Pod {
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: { name, labels },
    spec: { nodeName: node.name, hostNetwork: true, terminationGracePeriodSeconds: 1, containers: [{ name: 'app', image, imagePullPolicy: 'Always' }], ...spec },
  };
}

/** Builds the static program of the test images (pause and workload) once per directory. */
function buildPauseBinary(dir: string): Buffer {
  const out = join(dir, 'pause');
  if (!existsSync(out)) run('gcc', ['-static', '-O2', '-o', out, PAUSE_SOURCE]);
  return readFileSync(out);
}

/** A workload image: prints `message` (seen with `kubectl logs`), then waits for a signal. */
export function buildWorkloadImage(dir: string, message: string): TestImage {
  return buildRunnableImage({ files: { app: { data: buildPauseBinary(dir), mode: 0o755 } }, entrypoint: ['/app'], cmd: [message] });
}

function netnsOf(pid: number | string): string | null {
  try {
    return readlinkSync(`/proc/${pid}/ns/net`);
  } catch {
    return null;
  }
}

/** PIDs of every process in a network namespace (the node's daemons, shims and containers). */
function processesIn(netns: string, except: number): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === except) continue;
    if (netnsOf(entry) === netns) pids.push(Number(entry));
  }
  return pids;
}

/** PIDs in a cgroup tree: the Pods' processes, which live in network namespaces of their own (a
 * Pod network) and are found by their cgroup under the node's root, not by the node's namespace. */
function processesInCgroup(path: string): number[] {
  if (!existsSync(path)) return [];
  const pids: number[] = [];
  for (const entry of readdirSync(path, { withFileTypes: true })) {
    if (entry.isDirectory()) pids.push(...processesInCgroup(join(path, entry.name)));
    else if (entry.name === 'cgroup.procs') {
      try {
        pids.push(...readFileSync(join(path, entry.name), 'utf8').split('\n').filter(Boolean).map(Number));
      } catch {
        // removed meanwhile
      }
    }
  }
  return pids;
}

/** Cgroup hierarchies of this machine (cgroup v1 controllers, and the v2 tree where mounted). */
function cgroupHierarchies(): string[] {
  return readFileSync('/proc/self/mounts', 'utf8')
    .split('\n')
    .map((line) => line.split(' '))
    .filter((fields) => fields[2] === 'cgroup' || fields[2] === 'cgroup2')
    .map((fields) => fields[1] ?? '')
    .filter((path) => path.startsWith('/sys/fs/cgroup'));
}

/** Removes a cgroup tree bottom-up (cgroup directories are removed with rmdir, never unlinked). */
function removeCgroup(path: string): void {
  if (!existsSync(path)) return;
  for (const entry of readdirSync(path)) {
    const child = join(path, entry);
    if (statSync(child).isDirectory()) removeCgroup(child);
  }
  rmdirSync(path);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function readSysctls(): Record<string, string | null> {
  const values: Record<string, string | null> = {};
  for (const key of [...Object.keys(KUBELET_SYSCTLS), ...NETWORK_SYSCTLS]) {
    try {
      values[key] = readFileSync(`/proc/sys/${key}`, 'utf8').trim();
    } catch {
      values[key] = null;
    }
  }
  return values;
}

/** This machine's nftables tables (iptables-nft's among them), when the `nft` command is here: the
 * node's rules live in its network namespace and go with it, which stop() checks. */
function hostNftTables(): string | null {
  if (!hasCommand('nft')) return null;
  try {
    return run('nft', ['list', 'tables'], { timeoutMs: 10_000 }).split('\n').filter(Boolean).sort().join('\n');
  } catch {
    return null;
  }
}

/** Nodes started and not yet stopped, so that a suite whose setup timed out can still stop them. */
const runningNodes = new Set<RealNode>();

/** Stops every node still running; resolves with what they left behind. */
export async function stopAllNodes(): Promise<string[]> {
  const leftovers: string[] = [];
  for (const node of [...runningNodes]) leftovers.push(...(await node.stop()));
  return leftovers;
}

export async function startNode(options: NodeOptions): Promise<RealNode> {
  const kubeletBin = cachedBinary('kubelet');
  const dir = mkdtempSync(join(tmpdir(), 'pb-node-'));
  const id = `pb-node-${randomBytes(4).toString('hex')}`;
  const name = '127.0.0.1';
  const sysctlsBefore = readSysctls();
  const nftBefore = hostNftTables();
  const procs: Proc[] = [];
  const relays: Proc[] = [];

  // The namespace holder. It must not inherit this process's stdout (a pipe would never close).
  const holder = spawn('unshare', ['--net', '--mount', '--propagation', 'private', 'sleep', 'infinity'], { stdio: 'ignore' });
  holder.on('error', () => undefined);
  const holderPid = holder.pid;
  if (holderPid === undefined) throw new Error('unshare did not start');
  // Ready once unshare has exec'd sleep: only then is `/` private in the new mount namespace, so
  // that nothing mounted inside propagates to this machine.
  let netns: string | null = null;
  for (let i = 0; i < 250; i++) {
    await sleep(20);
    netns = netnsOf(holderPid);
    let command = '';
    try {
      command = readFileSync(`/proc/${holderPid}/comm`, 'utf8').trim();
    } catch {
      break;
    }
    if (command === 'sleep' && netns !== null && netns !== netnsOf(process.pid)) break;
  }
  if (netns === null || netns === netnsOf(process.pid) || holder.exitCode !== null) {
    holder.kill('SIGKILL');
    throw new Error('the node namespace was not created');
  }
  const nodeNetns = netns;
  const inside = (command: string, args: readonly string[]) => ['-t', String(holderPid), '-n', '-m', command, ...args];
  const exec = (command: string, args: readonly string[]) => runAsync('nsenter', inside(command, args), { timeoutMs: 60_000 });
  const startInside = (command: string, args: readonly string[]) => {
    const proc = startProcess('nsenter', inside(command, args));
    procs.push(proc);
    return proc;
  };

  const cgroups: string[] = [];
  const stop = async (): Promise<string[]> => {
    const leftovers: string[] = [];
    // kubelet first, so that it does not restart what is stopped below; then the containers,
    // shims and containerd, by namespace (container processes are children of shims, not of us).
    for (const proc of [...procs].reverse()) await proc.stop();
    // Pods with their own network are not in the node's namespace: they are found by cgroup.
    const nodeProcesses = () => [...new Set([...processesIn(nodeNetns, holderPid), ...cgroups.flatMap(processesInCgroup)])].filter((pid) => pid !== holderPid);
    for (let round = 0; round < 20; round++) {
      const pids = nodeProcesses();
      if (pids.length === 0) break;
      for (const pid of pids) {
        try {
          process.kill(pid, round < 5 ? 'SIGTERM' : 'SIGKILL');
        } catch {
          // gone already
        }
      }
      await sleep(200);
    }
    const stray = nodeProcesses();
    if (stray.length > 0) leftovers.push(`processes still in the node's namespace or cgroups: ${stray.join(', ')}`);
    for (const relay of relays) await relay.stop();
    // Mounts: every mount of the namespace under the node's directory or over /run, /var, /proc/sys
    // — only while the holder is still the node's (a dead holder's PID could be another process).
    const holderIsOurs = holder.exitCode === null && netnsOf(holderPid) === nodeNetns;
    try {
      if (holderIsOurs) await exec('sh', ['-c', `grep -o ' ${dir}[^ ]*\\| /run \\| /var/[a-z]* \\| /proc/sys/[^ ]*' /proc/self/mounts | sort -r | while read m; do umount -l "$m"; done`]);
    } catch {
      // the namespace dies with its holder anyway
    }
    holder.kill('SIGKILL');
    await sleep(100);
    const hostMounts = readFileSync('/proc/self/mounts', 'utf8').split('\n').filter((line) => line.includes(dir));
    if (hostMounts.length > 0) leftovers.push(`mounts on this machine under ${dir}: ${hostMounts.join('; ')}`);
    for (const cgroup of cgroups) {
      for (let attempt = 0; ; attempt++) {
        try {
          removeCgroup(cgroup);
          break;
        } catch (error) {
          if (attempt >= 20) {
            leftovers.push(`cgroup ${cgroup}: ${(error as Error).message}`);
            break;
          }
          await sleep(250);
        }
      }
    }
    const sysctlsAfter = readSysctls();
    for (const [key, before] of Object.entries(sysctlsBefore)) if (sysctlsAfter[key] !== before) leftovers.push(`sysctl ${key} changed: ${before} -> ${sysctlsAfter[key]}`);
    const nftAfter = hostNftTables();
    if (nftAfter !== nftBefore) leftovers.push(`nftables tables of this machine changed: ${JSON.stringify(nftBefore)} -> ${JSON.stringify(nftAfter)}`);
    rmSync(dir, { recursive: true, force: true });
    return leftovers;
  };

  try {
    // Inside the namespace: loopback up; /run, /var/log, /var/lib are the node's own (kubelet and
    // the shims write there whatever their flags say); kubelet's sysctls are shadowed.
    const paths = { run: join(dir, 'run'), varlog: join(dir, 'var-log'), varlib: join(dir, 'var-lib'), sysctl: join(dir, 'sysctl') };
    for (const path of Object.values(paths)) mkdirSync(path, { recursive: true });
    const script = ['ip link set lo up', `mount --bind ${paths.run} /run`, `mount --bind ${paths.varlog} /var/log`, `mount --bind ${paths.varlib} /var/lib`];
    if (options.nodeAddress !== undefined) {
      // No dummy interface driver on every kernel: a veth pair (both ends here) carries the address.
      script.push('ip link add pb-nic type veth peer name pb-nic-peer', `ip addr add ${options.nodeAddress} dev pb-nic`, 'ip link set pb-nic up', 'ip link set pb-nic-peer up', 'ip route add default dev pb-nic');
    }
    for (const [key, value] of Object.entries(KUBELET_SYSCTLS)) {
      if (sysctlsBefore[key] === null || sysctlsBefore[key] === undefined) continue;
      const file = join(paths.sysctl, key.replaceAll('/', '.'));
      writeFileSync(file, `${value}\n`);
      script.push(`mount --bind ${file} /proc/sys/${key}`);
    }
    await exec('sh', ['-ec', script.join('\n')]);

    // A cgroup root in every hierarchy (cgroup v1 here): kubelet's cgroupfs driver wants it everywhere.
    for (const hierarchy of cgroupHierarchies()) {
      const path = join(hierarchy, id);
      mkdirSync(path);
      cgroups.push(path);
      if (hierarchy.endsWith('/cpuset')) {
        for (const file of ['cpuset.cpus', 'cpuset.mems']) writeFileSync(join(path, file), readFileSync(join(hierarchy, file)));
      }
    }

    // containerd with the CRI plugin.
    const ctd = join(dir, 'containerd');
    const socket = join(ctd, 'containerd.sock');
    mkdirSync(join(dir, 'cni', 'net.d'), { recursive: true });
    mkdirSync(ctd, { recursive: true });
    if (options.podNetwork) {
      // containerd's CRI plugin runs `loopback` for each sandbox itself; this list gives the Pod
      // its interface. Everything it sets (the bridge, ip_forward, iptables rules) is in the
      // node's network namespace and goes with it.
      writeFileSync(
        join(dir, 'cni', 'net.d', '10-pod-network.conflist'),
        JSON.stringify({
          cniVersion: '0.4.0',
          name: 'pod-network',
          plugins: [
            {
              type: 'bridge',
              bridge: 'pb0',
              isGateway: true,
              ipMasq: true,
              hairpinMode: true,
              ipam: { type: 'host-local', ranges: [[{ subnet: options.podNetwork.subnet }]], routes: [{ dst: '0.0.0.0/0' }], dataDir: join(dir, 'cni', 'ipam') },
            },
            // hostPort; its default SNAT sets route_localnet on the bridge, so 127.0.0.1:hostPort works.
            { type: 'portmap', capabilities: { portMappings: true } },
          ],
        }),
      );
    }
    const cri = 'plugins."io.containerd.grpc.v1.cri"';
    writeFileSync(
      join(ctd, 'config.toml'),
      [
        'version = 2',
        `root = "${join(ctd, 'root')}"`,
        `state = "${join(ctd, 'state')}"`,
        'disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]',
        '[grpc]',
        `  address = "${socket}"`,
        '[ttrpc]',
        `  address = "${join(ctd, 'containerd.ttrpc.sock')}"`,
        '[debug]',
        '  address = ""',
        '[metrics]',
        '  address = ""',
        '[plugins."io.containerd.internal.v1.opt"]',
        `  path = "${join(ctd, 'opt')}"`,
        `[${cri}]`,
        `  sandbox_image = "${PAUSE_IMAGE}"`,
        // No CAP_SYS_RESOURCE here: runc cannot lower oom_score_adj below 0 as kubelet asks.
        '  restrict_oom_score_adj = true',
        `[${cri}.containerd]`,
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        `[${cri}.containerd.runtimes.runc]`,
        '  runtime_type = "io.containerd.runc.v2"',
        `[${cri}.containerd.runtimes.runc.options]`,
        '  SystemdCgroup = false',
        `[${cri}.cni]`,
        '  bin_dir = "/usr/lib/cni"',
        `  conf_dir = "${join(dir, 'cni', 'net.d')}"`,
        '  max_conf_num = 1',
      ].join('\n'),
    );
    const containerd = startInside('containerd', ['--config', join(ctd, 'config.toml')]);
    const ctr = (...args: string[]) => runAsync('ctr', ['-a', socket, '-n', 'k8s.io', ...args], { timeoutMs: 60_000 });
    for (let deadline = Date.now() + 30_000; ; ) {
      try {
        await ctr('version');
        break;
      } catch (error) {
        if (containerd.child.exitCode !== null || Date.now() > deadline) throw new Error(`containerd did not start: ${(error as Error).message}\n${containerd.output()}`);
        await sleep(200);
      }
    }

    // The sandbox image, imported (never pulled).
    const pause = buildRunnableImage({ files: { pause: { data: buildPauseBinary(dir), mode: 0o755 } }, entrypoint: ['/pause'] });
    const layout = join(dir, 'pause-layout');
    writeOciLayout(layout, pause, '1', PAUSE_IMAGE);
    run('tar', ['-C', layout, '-cf', join(dir, 'pause.tar'), '.']);
    await ctr('images', 'import', join(dir, 'pause.tar'));
    const imported = await ctr('images', 'ls', '-q');
    if (!imported.split('\n').includes(PAUSE_IMAGE)) throw new Error(`the pause image was not imported as ${PAUSE_IMAGE}: ${imported}`);

    // The apiserver on the node's loopback; the kubelet's port on this machine's loopback.
    const apiPort = Number(new URL(options.controlPlane.url).port);
    const kubeletPort = await freePort();
    const relay = async (hostSide: string[], nodeSide: string[]) => {
      const host = startProcess(process.execPath, [FORWARD, ...hostSide]);
      relays.push(host);
      const node = startProcess('nsenter', inside(process.execPath, [FORWARD, ...nodeSide]));
      relays.push(node);
      for (const proc of [host, node]) {
        for (let deadline = Date.now() + 10_000; !proc.output().includes('ready'); ) {
          if (proc.child.exitCode !== null || Date.now() > deadline) throw new Error(`relay did not start: ${proc.output()}`);
          await sleep(20);
        }
      }
    };
    const reach = async (port: number) => {
      const sock = join(dir, `host-${port}.sock`);
      await relay([`unix:${sock}=tcp:127.0.0.1:${port}`], [`tcp:127.0.0.1:${port}=unix:${sock}`]);
    };
    await reach(apiPort);
    const reachOnNodeAddresses = async (port: number, nodePort: number) => {
      const sock = join(dir, `host-${port}-all.sock`);
      await relay([`unix:${sock}=tcp:127.0.0.1:${port}`], [`tcp:0.0.0.0:${nodePort}=unix:${sock}`]);
    };
    if (options.egressSocket !== undefined) {
      const egress = startProcess('nsenter', inside(process.execPath, [FORWARD, `unix:${options.egressSocket}=connect`]));
      relays.push(egress);
      for (let deadline = Date.now() + 10_000; !egress.output().includes('ready'); ) {
        if (egress.child.exitCode !== null || Date.now() > deadline) throw new Error(`the egress proxy did not start: ${egress.output()}`);
        await sleep(20);
      }
    }
    const kubeletSock = join(dir, 'kubelet.sock');
    await relay([`tcp:127.0.0.1:${kubeletPort}=unix:${kubeletSock}`], [`unix:${kubeletSock}=tcp:127.0.0.1:${kubeletPort}`]);

    // kubelet.
    const kubeletDir = join(dir, 'kubelet');
    mkdirSync(kubeletDir, { recursive: true });
    writeFileSync(
      join(kubeletDir, 'kubeconfig'),
      JSON.stringify({
        apiVersion: 'v1',
        kind: 'Config',
        clusters: [{ name: 'test', cluster: { server: options.controlPlane.url, 'certificate-authority-data': Buffer.from(options.controlPlane.caCert).toString('base64') } }],
        users: [{ name: 'node', user: { token: options.token } }],
        contexts: [{ name: 'test', context: { cluster: 'test', user: 'node' } }],
        'current-context': 'test',
      }),
    );
    writeFileSync(
      join(kubeletDir, 'config.json'),
      JSON.stringify({
        apiVersion: 'kubelet.config.k8s.io/v1beta1',
        kind: 'KubeletConfiguration',
        address: '127.0.0.1',
        port: kubeletPort,
        readOnlyPort: 0,
        healthzBindAddress: '127.0.0.1',
        healthzPort: 0,
        // The apiserver reaches the kubelet (logs) only through the node's own relay.
        authentication: { anonymous: { enabled: true }, webhook: { enabled: false } },
        authorization: { mode: 'AlwaysAllow' },
        cgroupDriver: 'cgroupfs',
        cgroupRoot: `/${id}`,
        containerRuntimeEndpoint: `unix://${socket}`,
        failSwapOn: false,
        podLogsDir: join(dir, 'pod-logs'),
        volumePluginDir: join(kubeletDir, 'volume-plugins'),
        evictionHard: { 'memory.available': '1Mi', 'nodefs.available': '1%', 'imagefs.available': '1%', 'nodefs.inodesFree': '1%' },
        // Test images are never garbage-collected under the test's feet.
        imageGCHighThresholdPercent: 100,
        imageGCLowThresholdPercent: 99,
        syncFrequency: '5s',
        fileCheckFrequency: '5s',
        nodeStatusUpdateFrequency: '5s',
      }),
    );
    startInside(kubeletBin, [
      `--config=${join(kubeletDir, 'config.json')}`,
      `--kubeconfig=${join(kubeletDir, 'kubeconfig')}`,
      `--hostname-override=${name}`,
      ...(options.nodeAddressIsInternalIP && options.nodeAddress !== undefined ? [`--node-ip=${options.nodeAddress.split('/')[0]}`] : []),
      `--root-dir=${join(kubeletDir, 'root')}`,
      `--cert-dir=${join(kubeletDir, 'pki')}`,
    ]);

    if (options.kubeProxyToken !== undefined) {
      if (!options.podNetwork) throw new Error('kube-proxy needs the node\'s podNetwork');
      const mode = options.kubeProxyMode ?? 'iptables';
      const nodePortAddresses = options.nodePortAddresses ?? (mode === 'iptables' ? ['127.0.0.0/8'] : []);
      const proxyDir = join(dir, 'kube-proxy');
      mkdirSync(proxyDir, { recursive: true });
      writeFileSync(join(proxyDir, 'kubeconfig'), tokenKubeconfig(options.controlPlane.url, options.controlPlane.caCert, 'system:kube-proxy', options.kubeProxyToken), { mode: 0o600 });
      const kubeProxy = startInside(cachedBinary('kube-proxy'), [
        `--kubeconfig=${join(proxyDir, 'kubeconfig')}`,
        `--hostname-override=${name}`,
        `--proxy-mode=${mode}`,
        `--cluster-cidr=${options.podNetwork.subnet}`,
        // Zeros leave the conntrack sysctls (global ones among them) as they are.
        '--conntrack-max-per-core=0',
        '--conntrack-tcp-timeout-established=0',
        '--conntrack-tcp-timeout-close-wait=0',
        ...(nodePortAddresses.length > 0 ? [`--nodeport-addresses=${nodePortAddresses.join(',')}`] : []),
        '--metrics-bind-address=127.0.0.1:10249',
        '--healthz-bind-address=127.0.0.1:10256',
      ]);
      // Its healthz server listens once the proxier for the mode exists; a mode this machine cannot
      // run (ipvs without ip_vs) makes kube-proxy exit before that.
      const listening = `require('net').connect(10256,'127.0.0.1').on('connect',()=>process.exit(0)).on('error',()=>process.exit(1))`;
      for (let deadline = Date.now() + 60_000; ; await sleep(250)) {
        if (kubeProxy.child.exitCode !== null) throw new Error(`kube-proxy (${mode} mode) exited (${kubeProxy.child.exitCode}):\n${kubeProxy.output().slice(-4000)}`);
        if (await exec(process.execPath, ['-e', listening]).then(() => true, () => false)) break;
        if (Date.now() > deadline) throw new Error(`kube-proxy (${mode} mode) did not start:\n${kubeProxy.output().slice(-4000)}`);
      }
    }

    const node: RealNode = {
      name,
      dir,
      address: options.nodeAddress?.split('/')[0],
      reach,
      reachOnNodeAddresses,
      exec,
      async images() {
        return (await ctr('images', 'ls', '-q')).split('\n').filter(Boolean);
      },
      async containerImages() {
        return (await ctr('containers', 'ls'))
          .split('\n')
          .slice(1)
          .map((line) => line.trim().split(/\s+/)[1] ?? '')
          .filter(Boolean);
      },
      async removeImages(references) {
        if (references.length > 0) await ctr('images', 'rm', '--sync', ...references); // --sync: garbage-collect their content too
      },
      logs: () => procs.map((p) => p.output()).join('\n'),
      stop: async () => {
        runningNodes.delete(node);
        return stop();
      },
    };
    runningNodes.add(node);
    return node;
  } catch (error) {
    const output = procs.map((p) => p.output().slice(-4000)).join('\n');
    await stop();
    throw new Error(`${(error as Error).message}\n${output}`);
  }
}
