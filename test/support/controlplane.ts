// A real control plane on loopback: Debian's etcd and a kube-apiserver built from Go modules
// (scripts/build-control-plane.sh), with a static admin token; optionally kube-scheduler and
// kube-controller-manager too, each with its own identity and kubeconfig.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateCertificates } from '../../src/certs/certs.js';
import { freePort, startProcess, waitForPort, type Proc } from './procs.js';

export const KUBE_VERSION = process.env.KUBE_VERSION ?? 'v1.31.4';
export const HELM_VERSION = process.env.HELM_VERSION ?? 'v3.16.4';
const CACHE = process.env.PULLBRIDGE_CACHE ?? join(homedir(), '.cache', 'pullbridge');

export type CachedBinary = 'kube-apiserver' | 'kubectl' | 'kubelet' | 'kube-scheduler' | 'kube-controller-manager' | 'kube-proxy' | 'helm';

export function cachedBinary(name: CachedBinary): string {
  // helm is stamped with its Kubernetes version when built (see the script), and named so.
  const path = join(CACHE, 'bin', name === 'helm' ? `helm-${HELM_VERSION}-stamped` : `${name}-${KUBE_VERSION}`);
  if (!existsSync(path)) throw new Error(`${path} is missing: run scripts/build-control-plane.sh (it builds the Kubernetes commands and helm from Go modules)`);
  return path;
}

export interface ControlPlane {
  readonly url: string;
  readonly kubeconfig: string;
  readonly token: string;
  /** A kubelet's credential for the Node `127.0.0.1` (user `system:node:127.0.0.1`, group
   * `system:nodes`): the Node authorizer and NodeRestriction limit it as in a cluster. */
  readonly nodeToken: string;
  /** kube-proxy's credential (user `system:kube-proxy`, bound to `system:node-proxier` by the
   * apiserver's default RBAC). */
  readonly proxyToken: string;
  readonly caCert: string;
  /** Output of the apiserver and, when running, the scheduler and controller manager. */
  logs(): string;
  stop(): Promise<void>;
}

export interface ControlPlaneOptions {
  /**
   * Client certificates the apiserver presents when it calls admission webhooks, each for one
   * webhook host as the apiserver names it: `host:port` of a URL webhook, `<service>.<namespace>.svc`
   * of a Service webhook. Written into a WebhookAdmissionConfiguration's kubeconfig
   * (`--admission-control-config-file`), as a cluster operator would.
   */
  readonly webhookClientCertificates?: ReadonlyArray<{ readonly host: string; readonly cert: string; readonly key: string }>;
  /**
   * Also run kube-scheduler and kube-controller-manager (all controllers, each with its own service
   * account as kubeadm sets it up), so that Deployments, DaemonSets and Services work as in a
   * cluster. Loopback only, no leader election; stopped with the control plane.
   */
  readonly controllers?: boolean;
  /** More plugin configurations for the AdmissionConfiguration, e.g. ResourceQuota's `limitedResources`. */
  readonly admissionPlugins?: ReadonlyArray<{ readonly name: string; readonly configuration: Record<string, unknown> }>;
  /**
   * The apiserver's `cluster` egress (an EgressSelectorConfiguration): HTTP CONNECT over this socket
   * file, behind which a node's network namespace answers (NodeOptions.egressSocket). Everything the
   * apiserver dials in the cluster goes there: Service webhooks at their ClusterIP, kubelets.
   */
  readonly clusterEgressSocket?: string;
  /**
   * The ServiceAccount admission plugin (off otherwise, as nothing creates service accounts without
   * the controllers): Pods get their service account's token, as in a cluster. Needs `controllers`.
   */
  readonly serviceAccounts?: boolean;
}

/** The apiserver's AdmissionConfiguration: both webhook admission plugins read `kubeconfig` (when given), plus `others`. */
function admissionConfiguration(kubeconfig: string | undefined, others: NonNullable<ControlPlaneOptions['admissionPlugins']> = []): string {
  const plugin = (name: string) => ({ name, configuration: { apiVersion: 'apiserver.config.k8s.io/v1', kind: 'WebhookAdmissionConfiguration', kubeConfigFile: kubeconfig } });
  const webhooks = kubeconfig ? [plugin('MutatingAdmissionWebhook'), plugin('ValidatingAdmissionWebhook')] : [];
  return JSON.stringify({ apiVersion: 'apiserver.config.k8s.io/v1', kind: 'AdmissionConfiguration', plugins: [...webhooks, ...others] });
}

/** The kubeconfig an AdmissionConfiguration points at: one user per webhook host (the apiserver
 * looks users up by that name; clusters and contexts are not used). */
function webhookKubeconfig(certificates: NonNullable<ControlPlaneOptions['webhookClientCertificates']>): string {
  const users = certificates.map((c) => ({ name: c.host, user: { 'client-certificate-data': Buffer.from(c.cert).toString('base64'), 'client-key-data': Buffer.from(c.key).toString('base64') } }));
  return JSON.stringify({ apiVersion: 'v1', kind: 'Config', users });
}

export async function startControlPlane(options: ControlPlaneOptions = {}): Promise<ControlPlane> {
  const apiserverBin = cachedBinary('kube-apiserver');
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-cp-'));
  const [etcdClient, etcdPeer, securePort] = await Promise.all([freePort(), freePort(), freePort()]);
  const etcd: Proc = startProcess('etcd', [
    '--data-dir', join(dir, 'etcd'),
    '--listen-client-urls', `http://127.0.0.1:${etcdClient}`,
    '--advertise-client-urls', `http://127.0.0.1:${etcdClient}`,
    '--listen-peer-urls', `http://127.0.0.1:${etcdPeer}`,
    '--initial-advertise-peer-urls', `http://127.0.0.1:${etcdPeer}`,
    '--initial-cluster', `default=http://127.0.0.1:${etcdPeer}`,
    '--log-level', 'warn',
  ], { ETCD_UNSUPPORTED_ARCH: process.arch === 'x64' ? '' : process.arch });
  await waitForPort(etcdClient, 20_000);

  // 10.0.0.1: the `kubernetes` Service's ClusterIP, which in-cluster clients dial.
  const serving = generateCertificates({ service: 'kubernetes', namespace: 'default', extraNames: ['127.0.0.1', 'localhost', '10.0.0.1'] });
  writeFileSync(join(dir, 'tls.crt'), serving.cert);
  writeFileSync(join(dir, 'tls.key'), serving.key);
  const sa = generateKeyPairSync('rsa', { modulusLength: 2048, publicKeyEncoding: { type: 'spki', format: 'pem' }, privateKeyEncoding: { type: 'pkcs8', format: 'pem' } });
  writeFileSync(join(dir, 'sa.pub'), sa.publicKey);
  writeFileSync(join(dir, 'sa.key'), sa.privateKey);
  const token = randomBytes(24).toString('hex');
  const nodeToken = randomBytes(24).toString('hex');
  // The identities the apiserver's default RBAC binds: system:kube-scheduler,
  // system:kube-controller-manager and system:kube-proxy are users, with no group.
  const identities = { scheduler: randomBytes(24).toString('hex'), controllerManager: randomBytes(24).toString('hex'), proxy: randomBytes(24).toString('hex') };
  writeFileSync(
    join(dir, 'tokens.csv'),
    [
      `${token},admin,admin-uid,"system:masters"`,
      `${nodeToken},system:node:127.0.0.1,node-uid,"system:nodes"`,
      `${identities.scheduler},system:kube-scheduler,scheduler-uid`,
      `${identities.controllerManager},system:kube-controller-manager,controller-manager-uid`,
      `${identities.proxy},system:kube-proxy,proxy-uid`,
      '',
    ].join('\n'),
  );
  const admissionFlags: string[] = [];
  if (options.webhookClientCertificates) writeFileSync(join(dir, 'webhook-clients.kubeconfig'), webhookKubeconfig(options.webhookClientCertificates), { mode: 0o600 });
  if (options.webhookClientCertificates || options.admissionPlugins) {
    writeFileSync(join(dir, 'admission.json'), admissionConfiguration(options.webhookClientCertificates ? join(dir, 'webhook-clients.kubeconfig') : undefined, options.admissionPlugins));
    admissionFlags.push(`--admission-control-config-file=${join(dir, 'admission.json')}`);
  }
  if (options.clusterEgressSocket !== undefined) {
    const egress = { apiVersion: 'apiserver.k8s.io/v1beta1', kind: 'EgressSelectorConfiguration', egressSelections: [{ name: 'cluster', connection: { proxyProtocol: 'HTTPConnect', transport: { uds: { udsName: options.clusterEgressSocket } } } }] };
    writeFileSync(join(dir, 'egress.json'), JSON.stringify(egress));
    admissionFlags.push(`--egress-selector-config-file=${join(dir, 'egress.json')}`);
  }
  if (options.serviceAccounts && !options.controllers) throw new Error('serviceAccounts needs controllers (nothing else creates the default service accounts)');
  const apiserver = startProcess(apiserverBin, [
    `--etcd-servers=http://127.0.0.1:${etcdClient}`,
    '--bind-address=127.0.0.1',
    `--secure-port=${securePort}`,
    '--advertise-address=127.0.0.1',
    '--endpoint-reconciler-type=none',
    `--tls-cert-file=${join(dir, 'tls.crt')}`,
    `--tls-private-key-file=${join(dir, 'tls.key')}`,
    `--token-auth-file=${join(dir, 'tokens.csv')}`,
    `--service-account-issuer=https://127.0.0.1:${securePort}/`,
    `--service-account-key-file=${join(dir, 'sa.pub')}`,
    `--service-account-signing-key-file=${join(dir, 'sa.key')}`,
    '--service-cluster-ip-range=10.0.0.0/24',
    '--authorization-mode=Node,RBAC',
    '--enable-admission-plugins=NodeRestriction',
    '--allow-privileged=true',
    // Without the controllers, nothing creates default service accounts.
    ...(options.serviceAccounts ? [] : ['--disable-admission-plugins=ServiceAccount']),
    ...admissionFlags,
  ]);
  const components: Proc[] = [];
  const stop = async () => {
    for (const proc of components.reverse()) await proc.stop();
    await apiserver.stop();
    await etcd.stop();
    rmSync(dir, { recursive: true, force: true });
  };
  const url = `https://127.0.0.1:${securePort}`;
  const deadline = Date.now() + 90_000;
  for (;;) {
    try {
      const ok = await readyz(url, token, serving.caCert);
      if (ok) break;
    } catch {
      // not up yet
    }
    if (apiserver.child.exitCode !== null || Date.now() > deadline) {
      await stop();
      throw new Error(`kube-apiserver did not become ready:\n${apiserver.output().slice(-4000)}`);
    }
    await new Promise((r) => setTimeout(r, 500));
  }
  const kubeconfig = join(dir, 'kubeconfig');
  writeFileSync(kubeconfig, tokenKubeconfig(url, serving.caCert, 'admin', token));
  const logs = () => [apiserver, ...components].map((p) => p.output().slice(-8000)).join('\n');
  if (options.controllers) {
    try {
      writeFileSync(join(dir, 'ca.crt'), serving.caCert);
      const component = async (name: 'kube-scheduler' | 'kube-controller-manager', identity: string, args: string[]) => {
        const config = join(dir, `${name}.kubeconfig`);
        writeFileSync(config, tokenKubeconfig(url, serving.caCert, `system:${name}`, identity), { mode: 0o600 });
        const port = await freePort();
        // Served on loopback only, with a self-signed certificate in its own directory; /healthz is
        // always allowed, so no delegated authentication is configured.
        const proc = startProcess(cachedBinary(name), [`--kubeconfig=${config}`, '--leader-elect=false', '--bind-address=127.0.0.1', `--secure-port=${port}`, `--cert-dir=${join(dir, `${name}-certs`)}`, ...args]);
        components.push(proc);
        return { name, proc, port };
      };
      const started = await Promise.all([
        component('kube-scheduler', identities.scheduler, []),
        component('kube-controller-manager', identities.controllerManager, [
          // Every controller with its own service account (their roles are bound to those), tokens
          // requested from the apiserver; the service-account key signs legacy token Secrets.
          '--use-service-account-credentials=true',
          `--service-account-private-key-file=${join(dir, 'sa.key')}`,
          `--root-ca-file=${join(dir, 'ca.crt')}`,
          '--service-cluster-ip-range=10.0.0.0/24',
        ]),
      ]);
      for (const { name, proc, port } of started) {
        for (const deadline = Date.now() + 90_000; ; await new Promise((r) => setTimeout(r, 500))) {
          if (await healthz(port).catch(() => false)) break;
          if (proc.child.exitCode !== null || Date.now() > deadline) throw new Error(`${name} did not become healthy:\n${proc.output().slice(-4000)}`);
        }
      }
    } catch (error) {
      await stop();
      throw error;
    }
  }
  return { url, kubeconfig, token, nodeToken, proxyToken: identities.proxy, caCert: serving.caCert, logs, stop };
}

/** A kubeconfig for `url` whose one user authenticates with a bearer token. */
export function tokenKubeconfig(url: string, caCert: string, user: string, token: string): string {
  return JSON.stringify({
    apiVersion: 'v1',
    kind: 'Config',
    clusters: [{ name: 'test', cluster: { server: url, 'certificate-authority-data': Buffer.from(caCert).toString('base64') } }],
    users: [{ name: user, user: { token } }],
    contexts: [{ name: 'test', context: { cluster: 'test', user } }],
    'current-context': 'test',
  });
}

/** A component's /healthz on loopback (its certificate is self-signed: only the answer matters). */
async function healthz(port: number): Promise<boolean> {
  const https = await import('node:https');
  return new Promise((resolve, reject) => {
    const req = https.get(`https://127.0.0.1:${port}/healthz`, { rejectUnauthorized: false }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.on('error', reject);
    req.setTimeout(3000, () => req.destroy(new Error('timeout')));
  });
}

async function readyz(url: string, token: string, ca: string): Promise<boolean> {
  const https = await import('node:https');
  return new Promise((resolve, reject) => {
    const req = https.get(`${url}/readyz`, { headers: { authorization: `Bearer ${token}` }, ca }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.on('error', reject);
    req.setTimeout(3000, () => req.destroy(new Error('timeout')));
  });
}
