// A real control plane on loopback: Debian's etcd and a kube-apiserver built from Go modules
// (scripts/build-control-plane.sh), with a static admin token.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateCertificates } from '../../src/certs/certs.js';
import { freePort, startProcess, waitForPort, type Proc } from './procs.js';

export const KUBE_VERSION = process.env.KUBE_VERSION ?? 'v1.31.4';
export const HELM_VERSION = process.env.HELM_VERSION ?? 'v3.16.4';
const CACHE = process.env.PULLBRIDGE_CACHE ?? join(homedir(), '.cache', 'pullbridge');

export function cachedBinary(name: 'kube-apiserver' | 'kube-controller-manager' | 'kubectl' | 'kubelet' | 'helm'): string {
  // helm is stamped with its Kubernetes version when built (see the script), and named so.
  const path = join(CACHE, 'bin', name === 'helm' ? `helm-${HELM_VERSION}-stamped` : `${name}-${KUBE_VERSION}`);
  if (!existsSync(path)) throw new Error(`${path} is missing: run scripts/build-control-plane.sh (it builds kube-apiserver, kubectl, kubelet and helm from Go modules)`);
  return path;
}

export interface ControlPlane {
  readonly url: string;
  readonly kubeconfig: string;
  readonly token: string;
  /** A kubelet's credential for the Node `127.0.0.1` (user `system:node:127.0.0.1`, group
   * `system:nodes`): the Node authorizer and NodeRestriction limit it as in a cluster. */
  readonly nodeToken: string;
  readonly caCert: string;
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
  /** More plugin configurations for the AdmissionConfiguration, e.g. ResourceQuota's `limitedResources`. */
  readonly admissionPlugins?: ReadonlyArray<{ readonly name: string; readonly configuration: Record<string, unknown> }>;
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

  const serving = generateCertificates({ service: 'kubernetes', namespace: 'default', extraNames: ['127.0.0.1', 'localhost'] });
  writeFileSync(join(dir, 'tls.crt'), serving.cert);
  writeFileSync(join(dir, 'tls.key'), serving.key);
  const sa = generateKeyPairSync('rsa', { modulusLength: 2048, publicKeyEncoding: { type: 'spki', format: 'pem' }, privateKeyEncoding: { type: 'pkcs8', format: 'pem' } });
  writeFileSync(join(dir, 'sa.pub'), sa.publicKey);
  writeFileSync(join(dir, 'sa.key'), sa.privateKey);
  const token = randomBytes(24).toString('hex');
  const nodeToken = randomBytes(24).toString('hex');
  writeFileSync(join(dir, 'tokens.csv'), `${token},admin,admin-uid,"system:masters"\n${nodeToken},system:node:127.0.0.1,node-uid,"system:nodes"\n`);
  const admissionFlags: string[] = [];
  if (options.webhookClientCertificates) writeFileSync(join(dir, 'webhook-clients.kubeconfig'), webhookKubeconfig(options.webhookClientCertificates), { mode: 0o600 });
  if (options.webhookClientCertificates || options.admissionPlugins) {
    writeFileSync(join(dir, 'admission.json'), admissionConfiguration(options.webhookClientCertificates ? join(dir, 'webhook-clients.kubeconfig') : undefined, options.admissionPlugins));
    admissionFlags.push(`--admission-control-config-file=${join(dir, 'admission.json')}`);
  }
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
    // No controller creates default service accounts here.
    '--disable-admission-plugins=ServiceAccount',
    ...admissionFlags,
  ]);
  const stop = async () => {
    await apiserver.stop();
    await etcd.stop();
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
  writeFileSync(
    kubeconfig,
    JSON.stringify({
      apiVersion: 'v1',
      kind: 'Config',
      clusters: [{ name: 'test', cluster: { server: url, 'certificate-authority-data': Buffer.from(serving.caCert).toString('base64') } }],
      users: [{ name: 'admin', user: { token } }],
      contexts: [{ name: 'test', context: { cluster: 'test', user: 'admin' } }],
      'current-context': 'test',
    }),
  );
  return { url, kubeconfig, token, nodeToken, caCert: serving.caCert, stop };
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
