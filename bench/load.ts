// Load runs for the reliability report: sustained admissions against the webhook process, and many
// concurrent pullers against the proxy process in front of a real docker-registry, every manifest
// and blob checked against its digest. Both sample the server's RSS while they run.
//
// The test suite runs them short (test/reliability.test.ts); `npm run reliability` runs them long
// and writes the figures to BENCHMARKS.md.

import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import jsonpatch, { type Operation } from 'fast-json-patch';
import { generateCertificates } from '../src/certs/certs.js';
import { namespaceToken } from '../src/rules/credentials.js';
import { buildImage, type TestImage } from '../test/support/oci.js';
import { freePort, startProcess, waitForPort, type Proc } from '../test/support/procs.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from '../test/support/registry.js';
import { PROXY_NODE_FLAGS } from './proxy.js';
import { benchReview, BENCH_REVIEW_UID, drive, percentile } from './webhook.js';

const CLI = fileURLToPath(new URL('../src/cli.js', import.meta.url));

export interface RssSample {
  readonly seconds: number;
  readonly rssMb: number;
}

/** A process's resident set in MiB, from /proc (VmRSS); throws when the process is gone. */
export function readRssMb(pid: number): number {
  return Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN) / 1024;
}

/** Samples a process's resident set from /proc every `intervalMs` until stopped. */
export function sampleRss(pid: number, intervalMs = 250): { stop(): RssSample[] } {
  const samples: RssSample[] = [];
  const began = performance.now();
  const take = () => {
    try {
      samples.push({ seconds: (performance.now() - began) / 1000, rssMb: readRssMb(pid) });
    } catch {
      // The process is gone; the caller sees that elsewhere.
    }
  };
  take();
  const timer = setInterval(take, intervalMs);
  return {
    stop() {
      clearInterval(timer);
      take();
      return samples;
    },
  };
}

const peak = (samples: readonly RssSample[]) => samples.reduce((m, s) => Math.max(m, s.rssMb), 0);

// ---------------------------------------------------------------------------------------------
// Webhook

export interface WebhookLoadResult {
  readonly seconds: number;
  readonly connections: number;
  readonly admissions: number;
  /** Failed requests and answers that were not a correct admission response. */
  readonly errors: number;
  readonly perSecond: number;
  readonly p50Ms: number;
  readonly p99Ms: number;
  readonly p999Ms: number;
  readonly rss: readonly RssSample[];
  readonly peakRssMb: number;
}

/** The `pullbridge webhook` process over HTTPS keep-alive from `connections` connections for `seconds`. */
export async function runWebhookLoad(seconds: number, connections: number): Promise<WebhookLoadResult> {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-load-webhook-'));
  const certs = generateCertificates({ service: 'load', namespace: 'load', extraNames: ['127.0.0.1'] });
  writeFileSync(join(dir, 'tls.crt'), certs.cert);
  writeFileSync(join(dir, 'tls.key'), certs.key);
  writeFileSync(join(dir, 'broker.key'), randomBytes(32).toString('hex'));
  writeFileSync(
    join(dir, 'config.yaml'),
    `broker: {keyFiles: [${join(dir, 'broker.key')}]}\n` +
    'registries:\n  - {name: corp, match: ["registry.corp.example:5000"], upstream: "https://127.0.0.1:5000"}\n  - {name: hub, match: [docker.io], upstream: "https://127.0.0.1:5001", auth: {mode: anonymous}}\n',
  );
  const port = await freePort();
  // The audit log goes to a pipe this process drains, as it would to a container runtime.
  const proc = startProcess(process.execPath, [CLI, 'webhook', '--config', join(dir, 'config.yaml'), '--port', String(port), '--host', '127.0.0.1', '--tls-cert', join(dir, 'tls.crt'), '--tls-key', join(dir, 'tls.key')]);
  try {
    await waitForPort(port);
    const review = benchReview();
    const body = JSON.stringify(review);
    // The first answer's patch is applied to the Pod and its images checked; every later answer must
    // carry the same patch (the review is the same each time), which costs the client a comparison.
    let checkedPatch: string | undefined;
    const correct = (status: number, text: string) => {
      if (status !== 200) return false;
      const answer = JSON.parse(text) as { response?: { uid?: string; allowed?: boolean; patch?: string } };
      const patch = answer.response?.patch;
      if (answer.response?.allowed !== true || answer.response.uid !== BENCH_REVIEW_UID || typeof patch !== 'string') return false;
      if (checkedPatch === undefined && patchRewritesBenchPod(review, patch)) checkedPatch = patch;
      return patch === checkedPatch;
    };
    await drive(port, certs.caCert, body, 1, connections, correct); // warm-up
    const rss = sampleRss(proc.child.pid ?? 0);
    const result = await drive(port, certs.caCert, body, seconds, connections, correct);
    const samples = rss.stop();
    const latencies = [...result.latenciesMs].sort((a, b) => a - b);
    return {
      seconds: result.seconds,
      connections,
      admissions: result.requests,
      errors: result.errors,
      perSecond: result.requests / result.seconds,
      p50Ms: percentile(latencies, 50),
      p99Ms: percentile(latencies, 99),
      p999Ms: percentile(latencies, 99.9),
      rss: samples,
      peakRssMb: peak(samples),
    };
  } finally {
    await proc.stop();
  }
}

/**
 * Whether a base64 JSON patch, applied to the bench review's Pod, rewrites its images as the load
 * config says (Docker Hub to the `hub` rule, registry.corp.example:5000 to `corp`, quay.io left)
 * and adds an image pull secret.
 */
function patchRewritesBenchPod(review: ReturnType<typeof benchReview>, patch: string): boolean {
  const pod = structuredClone((review.request as { object: unknown }).object);
  let patched: { spec: { containers: Array<{ image: string }>; imagePullSecrets?: unknown[] } };
  try {
    patched = jsonpatch.applyPatch(pod, JSON.parse(Buffer.from(patch, 'base64').toString('utf8')) as Operation[], true).newDocument as typeof patched;
  } catch {
    return false;
  }
  const expected = (image: string) =>
    image.startsWith('nginx:') ? `localhost:30500/hub/library/${image}` : image.startsWith('registry.corp.example:5000/') ? `localhost:30500/corp/${image.slice('registry.corp.example:5000/'.length)}` : image;
  const original = (review.request as { object: { spec: { containers: Array<{ image: string }> } } }).object.spec.containers;
  return patched.spec.containers.length === original.length && patched.spec.containers.every((c, i) => c.image === expected(original[i]?.image ?? '')) && (patched.spec.imagePullSecrets?.length ?? 0) > 0;
}

// ---------------------------------------------------------------------------------------------
// Proxy

export interface LoadRig {
  readonly registry: RegistryHandle;
  readonly images: ReadonlyArray<{ readonly repository: string; readonly tag: string; readonly image: TestImage }>;
  readonly proxyUrl: string;
  readonly proxy: Proc;
  readonly configPath: string;
  readonly dir: string;
  /** The broker key files as configured: [signing, previous]. */
  readonly keyFiles: readonly [string, string];
  /** The key the rig wrote into keyFiles[0]. */
  readonly signingKey: string;
  /** The Basic header the webhook would provision for `namespace`, signed with `key`. */
  authorization(namespace: string, key: string): string;
  /** The config file's text as the rig wrote it. */
  readonly configText: string;
  stop(): Promise<void>;
}

export interface LoadRigOptions {
  /** Sizes of the layers of each image; one image per entry. */
  readonly images: ReadonlyArray<readonly number[]>;
}

/**
 * A docker-registry with htpasswd auth holding the images, and a `pullbridge proxy` process in
 * front of it in broker mode (its own upstream credentials, namespace credentials from clients).
 */
export async function startLoadRig(options: LoadRigOptions): Promise<LoadRig> {
  const registry = await startRegistry({ auth: 'basic' });
  const images = options.images.map((layerSizes, i) => ({ repository: `load/app${i}`, tag: `v${i}`, image: buildImage({ layerSizes }) }));
  await Promise.all(images.map((i) => registry.push(i.image, i.repository, i.tag)));
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-load-proxy-'));
  const keyFiles: [string, string] = [join(dir, 'key-0'), join(dir, 'key-1')];
  const signingKey = randomBytes(32).toString('hex');
  writeFileSync(keyFiles[0], signingKey);
  const [user, password] = Object.entries(DEFAULT_USERS)[0] ?? ['', ''];
  writeFileSync(join(dir, 'password'), password);
  const port = await freePort();
  const configText = [
    `proxy: {host: 127.0.0.1, port: ${port}}`,
    `broker: {keyFiles: ["${keyFiles[0]}", "${keyFiles[1]}"]}`,
    'registries:',
    `  - {name: corp, match: ["corp.example"], upstream: "${registry.url}", credentials: {username: ${user}, passwordFile: "${join(dir, 'password')}"}}`,
    // The same upstream without the proxy's digest check: the client's own hash is the only guard.
    `  - {name: fast, match: ["fast.example"], upstream: "${registry.url}", credentials: {username: ${user}, passwordFile: "${join(dir, 'password')}"}, verifyBlobDigests: false}`,
    '',
  ].join('\n');
  const configPath = join(dir, 'config.yaml');
  writeFileSync(configPath, configText);
  const proxy = startProcess(process.execPath, [...PROXY_NODE_FLAGS, CLI, 'proxy', '--config', configPath, '--port', String(port), '--host', '127.0.0.1'], {
    PULLBRIDGE_LOG_LEVEL: 'warn',
    MALLOC_ARENA_MAX: '2',
  });
  try {
    await waitForPort(port);
  } catch (error) {
    await proxy.stop();
    await registry.stop();
    throw new Error(`${(error as Error).message}\n${proxy.output()}`);
  }
  return {
    registry,
    images,
    proxyUrl: `http://127.0.0.1:${port}`,
    proxy,
    configPath,
    dir,
    keyFiles,
    signingKey,
    configText,
    authorization: (namespace, key) => `Basic ${Buffer.from(`${namespace}:${namespaceToken(Buffer.from(key), namespace)}`).toString('base64')}`,
    async stop() {
      await proxy.stop();
      await registry.stop();
    },
  };
}

export interface ProxyLoadResult {
  readonly seconds: number;
  readonly clients: number;
  readonly requests: number;
  /** Manifests and blobs whose bytes were checked against their digest. */
  readonly verified: number;
  /** Requests that failed or answered anything but the expected success. */
  readonly errors: number;
  /** Bodies that arrived complete but did not match their digest. Must be zero. */
  readonly corrupt: number;
  /** Pulls the client gave up on purpose mid-body (a share of the clients abort). */
  readonly aborted: number;
  readonly bytes: number;
  readonly mibPerSecond: number;
  readonly firstErrors: readonly string[];
  readonly rss: readonly RssSample[];
  readonly peakRssMb: number;
}

export interface ProxyLoadOptions {
  readonly clients: number;
  readonly seconds: number;
  /** The client credential at this moment (it may change during the run, as after a rotation). */
  readonly authorization: () => string;
  /** Every n-th blob pull is aborted halfway by the client; 0 for none. */
  readonly abortEvery?: number;
}

interface PullOutcome {
  readonly status: number;
  readonly bytes: number;
  readonly digest: string;
  readonly body?: Buffer;
  readonly complete: boolean;
  /** The client cut the body short on purpose (`abortAfter`), after the status arrived. */
  readonly abortedByClient?: true;
}

/**
 * Each puller is a client of its own, as Pods and nodes are: its own keep-alive pool from its own
 * loopback source address (127.0.3.N), so that the proxy's per-client limits see what they would
 * in a cluster.
 */
function clientAgent(n: number): http.Agent {
  return new http.Agent({ keepAlive: true, maxSockets: 4, localAddress: `127.0.${3 + Math.floor(n / 250)}.${(n % 250) + 1}` });
}

/** One GET through the proxy, hashing the body as it arrives; `abortAfter` bytes cuts it short. */
function pull(agent: http.Agent, url: string, headers: Record<string, string>, keepBody: boolean, abortAfter?: number): Promise<PullOutcome> {
  return new Promise((resolve) => {
    const req = http.get(url, { agent, headers }, (res) => {
      const hash = createHash('sha256');
      const chunks: Buffer[] = [];
      let bytes = 0;
      res.on('data', (chunk: Buffer) => {
        hash.update(chunk);
        bytes += chunk.length;
        if (keepBody) chunks.push(chunk);
        if (abortAfter !== undefined && bytes >= abortAfter) {
          req.destroy();
          resolve({ status: res.statusCode ?? 0, bytes, digest: '', complete: false, abortedByClient: true });
        }
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, bytes, digest: `sha256:${hash.digest('hex')}`, complete: res.complete, ...(keepBody ? { body: Buffer.concat(chunks) } : {}) }));
      res.on('error', () => resolve({ status: res.statusCode ?? 0, bytes, digest: '', complete: false }));
    });
    req.on('error', () => resolve({ status: 0, bytes: 0, digest: '', complete: false }));
  });
}

const MANIFEST_ACCEPT = 'application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json';

/**
 * `clients` pullers, each repeating for `seconds`: resolve a random image's tag to its index,
 * fetch a platform manifest by digest, then its config and every layer by digest, as containerd
 * does. Every body is hashed and compared with the digest it was asked for; half the pullers use
 * a rule whose proxy does not verify blob digests, so a body corrupted in the proxy reaches them.
 */
export async function runProxyLoad(rig: LoadRig, options: ProxyLoadOptions): Promise<ProxyLoadResult> {
  const stats = { requests: 0, verified: 0, errors: 0, corrupt: 0, aborted: 0, bytes: 0 };
  const firstErrors: string[] = [];
  const fail = (what: string) => {
    stats.errors++;
    if (firstErrors.length < 5) firstErrors.push(what);
  };
  let blobPulls = 0;
  const agents = Array.from({ length: options.clients }, (_, n) => clientAgent(n));
  const check = async (agent: http.Agent, path: string, digest: string | undefined, accept?: string): Promise<Buffer | undefined> => {
    const blob = path.includes('/blobs/');
    const abortAfter = blob && options.abortEvery && ++blobPulls % options.abortEvery === 0 ? 1 : undefined;
    stats.requests++;
    const headers: Record<string, string> = { authorization: options.authorization(), ...(accept ? { accept } : {}) };
    const out = await pull(agent, `${rig.proxyUrl}${path}`, headers, !blob, abortAfter);
    stats.bytes += out.bytes;
    // An abort counts as one only when the proxy had answered 200: a pull that failed before the
    // client cut it (an error status, a reset) is an error like any other.
    if (out.abortedByClient && out.status === 200) {
      stats.aborted++;
      return undefined;
    }
    if (out.status !== 200 || !out.complete) {
      fail(`${path}: status ${out.status}${out.complete ? '' : ', incomplete'}`);
      return undefined;
    }
    if (digest && out.digest !== digest) {
      stats.corrupt++;
      fail(`${path}: body hashes to ${out.digest}`);
      return undefined;
    }
    stats.verified++;
    return out.body ?? Buffer.alloc(0);
  };
  const client = async (n: number, deadline: number) => {
    const agent = agents[n]!;
    for (let i = n; performance.now() < deadline; i++) {
      const { repository, tag, image } = rig.images[i % rig.images.length]!;
      const base = `/v2/${n % 2 === 0 ? 'corp' : 'fast'}/${repository}`;
      const index = await check(agent, `${base}/manifests/${tag}`, image.index.digest, MANIFEST_ACCEPT);
      if (!index) continue;
      const manifest = image.manifests[i % image.manifests.length]!;
      if (!(await check(agent, `${base}/manifests/${manifest.digest}`, manifest.digest, MANIFEST_ACCEPT))) continue;
      const parsed = JSON.parse(manifest.data.toString()) as { config: { digest: string }; layers: Array<{ digest: string }> };
      for (const d of [parsed.config.digest, ...parsed.layers.map((l) => l.digest)]) await check(agent, `${base}/blobs/${d}`, d);
    }
  };
  const rss = sampleRss(rig.proxy.child.pid ?? 0);
  const began = performance.now();
  const deadline = began + options.seconds * 1000;
  await Promise.all(Array.from({ length: options.clients }, (_, n) => client(n, deadline)));
  for (const agent of agents) agent.destroy();
  const seconds = (performance.now() - began) / 1000;
  const samples = rss.stop();
  return { ...stats, seconds, clients: options.clients, mibPerSecond: stats.bytes / 2 ** 20 / seconds, firstErrors, rss: samples, peakRssMb: peak(samples) };
}
