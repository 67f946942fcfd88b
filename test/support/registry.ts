// A real upstream: distribution's registry (Debian's docker-registry) on loopback, with htpasswd
// Basic auth or token auth (a small token issuer here signs the JWTs the registry verifies), and TLS;
// on its filesystem driver, or on its s3 driver over versitygw, where it answers a blob GET or HEAD
// with 307 to a URL on the object store presigned for that method, as registries on S3 do.

import { createHash, createPrivateKey, createSign, randomBytes, X509Certificate } from 'node:crypto';
import http from 'node:http';
import https from 'node:https';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateCertificates, type CertificateBundle } from '../../src/certs/certs.js';
import { listen, type RunningServer } from '../../src/shell/serve.js';
import type { S3Server } from './objectstores.js';
import { writeOciLayout, type TestImage } from './oci.js';
import { freePort, run, runAsync, startProcess, waitForPort, type Proc } from './procs.js';

export interface RegistryOptions {
  readonly auth?: 'none' | 'basic' | 'token';
  readonly tls?: boolean;
  readonly users?: Readonly<Record<string, string>>;
  /** Record every request the registry answers (its access log), for `requests()`. */
  readonly accessLog?: boolean;
  /** Convert manifests on the fly to signed schema1 for a client whose Accept leaves schema2 out
   * (`compatibility.schema1.enabled`; off, distribution 2.8 answers such a client 400 MANIFEST_INVALID). */
  readonly schema1?: boolean;
  /** Accept DELETE of manifests (`storage.delete.enabled`), to make a once-present tag unknown. */
  readonly deletes?: boolean;
  /**
   * Keep the registry's content in this S3 server's bucket (its `s3` storage driver) instead of a
   * directory. Blob reads are then redirected (307) to URLs presigned on `endpoint` (default: the
   * server's own), which must reach the server: a relay there that passes requests on unchanged
   * (Host included, as signed) sees what the registry's clients send to the storage.
   */
  readonly storage?: { readonly s3: S3Server; readonly endpoint?: string };
  /** Token auth: repositories whose pull the issuer grants to anonymous token requests (public
   * repositories, as Docker Hub's); every other repository needs a user. */
  readonly anonymousPull?: readonly string[];
  /** The most catalog entries one page may ask for (`catalog.maxentries`; distribution's default
   * 1000): a larger `n` is refused with 400 PAGINATION_NUMBER_INVALID. */
  readonly catalogMaxEntries?: number;
  /** Run as a pull-through cache of another registry (distribution's `proxy:` section): it mirrors
   * that ONE registry, asking it with these credentials (distribution 2.8 sends them to a Bearer
   * token endpoint only). The remote must answer when the cache starts: it pings `/v2/` then. */
  readonly pullThrough?: { readonly remoteUrl: string; readonly username?: string; readonly password?: string };
}

/** One request as the registry's access log recorded it. */
export interface RegistryRequest {
  readonly method: string;
  readonly path: string;
  readonly status: number;
  /** Bytes of the response body the registry wrote (the access log's size field). */
  readonly bytes: number;
}

export interface TokenIssuer {
  readonly server: RunningServer;
  readonly realm: string;
  /** Every token request seen: service, scope, and the Basic user (or null). */
  readonly requests: Array<{ service: string | null; scope: string | null; user: string | null }>;
  /** Lifetime announced to clients (expires_in). */
  expiresIn: number;
  /** Lifetime written into the JWT itself; shorter than expiresIn simulates a revoked token. */
  jwtLifetime: number | undefined;
  /** When set, every token request is answered with this status and a JSON error instead (a token
   * endpoint refusing a scope: 400, 404, …). */
  refuseWith: number | undefined;
}

export interface RegistryHandle {
  /** `127.0.0.1:PORT` */
  readonly host: string;
  readonly port: number;
  readonly url: string;
  readonly tls: CertificateBundle | undefined;
  readonly caFile: string | undefined;
  readonly issuer: TokenIssuer | undefined;
  /** The running docker-registry (replaced by restart()). */
  readonly process: Proc;
  readonly dir: string;
  /** SIGKILL, as a crashed or OOM-killed registry: connections reset, nothing flushed. */
  kill(): Promise<void>;
  /** Starts the registry again on the same port and storage. */
  restart(): Promise<void>;
  /** Copies the image in (every platform); `docker`: converted to Docker's media types (a manifest
   * list over Docker image manifests, which the registry converts for a client that does not accept
   * a list), else kept as OCI. */
  push(image: TestImage, repository: string, tag: string, format?: 'oci' | 'docker'): Promise<void>;
  /**
   * What the registry answered so far (with `accessLog`; empty otherwise), across restarts, once its
   * log has caught up: the registry writes a line after it answers, and the line reaches this
   * process later still, so a count read at once can miss the last requests. Settled by a marker
   * request whose own line is awaited (lines arrive in order); markers are not listed.
   */
  requests(): Promise<readonly RegistryRequest[]>;
  /** GETs of a blob (any repository) answered so far (settled as requests()): the transfers the upstream made. */
  blobGets(digest: string): Promise<number>;
  stop(): Promise<void>;
}

export const DEFAULT_USERS = { puller: 'correct horse battery staple' } as const;

/** libtrust's key ID, which the registry matches against the JWT `kid`. */
function libtrustKeyId(certPem: string): string {
  const der = new X509Certificate(certPem).publicKey.export({ type: 'spki', format: 'der' });
  const hash = createHash('sha256').update(der).digest().subarray(0, 30);
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = '';
  for (const byte of hash) bits += byte.toString(2).padStart(8, '0');
  let encoded = '';
  for (let i = 0; i + 5 <= bits.length; i += 5) encoded += alphabet[parseInt(bits.slice(i, i + 5), 2)];
  return encoded.match(/.{4}/g)?.join(':') ?? encoded;
}

const b64url = (value: string | Buffer): string => Buffer.from(value).toString('base64url');

async function startTokenIssuer(signing: CertificateBundle, service: string, users: Readonly<Record<string, string>>, tls: CertificateBundle | undefined, anonymousPull: readonly string[] = []): Promise<TokenIssuer> {
  const kid = libtrustKeyId(signing.caCert);
  const key = createPrivateKey(signing.caKey);
  const requests: TokenIssuer['requests'] = [];
  const issuer: { expiresIn: number; jwtLifetime: number | undefined; refuseWith: number | undefined } = { expiresIn: 300, jwtLifetime: undefined, refuseWith: undefined };
  const server = await listen(
    (req, res) => {
      const url = new URL(req.url ?? '/', 'http://127.0.0.1');
      const auth = req.headers.authorization;
      let user: string | null = null;
      if (auth?.startsWith('Basic ')) {
        const [u, ...rest] = Buffer.from(auth.slice(6), 'base64').toString().split(':');
        if (u !== undefined && users[u] === rest.join(':')) user = u;
        else {
          res.writeHead(401, { 'content-type': 'application/json' }).end('{"details":"bad credentials"}');
          return;
        }
      }
      const scope = url.searchParams.get('scope');
      requests.push({ service: url.searchParams.get('service'), scope, user });
      if (issuer.refuseWith !== undefined) {
        res.writeHead(issuer.refuseWith, { 'content-type': 'application/json' }).end('{"details":"refused"}');
        return;
      }
      const access = [];
      if (scope && user) {
        const [type, name, actions] = scope.split(':');
        access.push({ type, name, actions: (actions ?? '').split(',') });
      } else if (scope) {
        const [type, name, actions] = scope.split(':');
        if (type === 'repository' && name !== undefined && anonymousPull.includes(name) && (actions ?? '').split(',').includes('pull')) access.push({ type, name, actions: ['pull'] });
      }
      const now = Math.floor(Date.now() / 1000);
      const header = b64url(JSON.stringify({ alg: 'RS256', typ: 'JWT', kid }));
      const claims = b64url(JSON.stringify({ iss: 'test-issuer', sub: user ?? '', aud: service, exp: now + (issuer.jwtLifetime ?? issuer.expiresIn), nbf: now - 10, iat: now, jti: `${now}-${requests.length}`, access }));
      const signature = createSign('RSA-SHA256').update(`${header}.${claims}`).sign(key).toString('base64url');
      const token = `${header}.${claims}.${signature}`;
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token, access_token: token, expires_in: issuer.expiresIn }));
    },
    // Served over TLS when the registry is: credentials never go to a plain-HTTP realm of an HTTPS registry.
    { host: '127.0.0.1', port: 0, ...(tls ? { tls: { cert: tls.cert, key: tls.key } } : {}) },
  );
  return Object.assign(issuer, { server, realm: `${server.url}/token`, requests });
}

/** The path of the marker requests that settle the access log (never a repository a test uses). */
const MARKER_PREFIX = '/v2/pullbridge-log-marker/';

/** Combined-log lines (`… "GET /v2/… HTTP/1.1" 200 SIZE …`), which the registry writes to stdout;
 * marker lines go to `markers` (their paths), not to `into`. */
function recordAccessLog(proc: Proc, into: RegistryRequest[], markers: EventTarget): void {
  let partial = '';
  proc.child.stdout?.on('data', (chunk: Buffer) => {
    const text = partial + chunk.toString();
    const lines = text.split('\n');
    partial = lines.pop() ?? '';
    for (const line of lines) {
      const m = /"([A-Z]+) (\S+) HTTP\/[\d.]+" (\d{3}) (\d+|-)/.exec(line);
      if (!m) continue;
      const path = (m[2] ?? '').split('?')[0] ?? '';
      if (path.startsWith(MARKER_PREFIX)) markers.dispatchEvent(new Event(path));
      else into.push({ method: m[1] ?? '', path, status: Number(m[3]), bytes: m[4] === '-' ? 0 : Number(m[4]) });
    }
  });
}

/**
 * Waits until the registry's access log has caught up with every request answered before this call:
 * sends a marker request and waits for its line (at most `timeoutMs`, then throws: a count read
 * from an unsettled log is worth nothing). A registry that is not running logs nothing more: its
 * output is awaited to its end instead.
 */
async function settleAccessLog(proc: Proc, url: string, ca: string | undefined, markers: EventTarget, timeoutMs = 10_000): Promise<void> {
  const child = proc.child;
  const running = child.exitCode === null && child.signalCode === null;
  if (!running || !child.stdout) {
    if (child.stdout && !child.stdout.readableEnded) await new Promise((resolve) => child.stdout?.once('close', resolve));
    return;
  }
  const path = `${MARKER_PREFIX}${randomBytes(8).toString('hex')}/tags/list`;
  const seen = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the registry's access log did not show the marker request ${path} within ${timeoutMs} ms`)), timeoutMs);
    markers.addEventListener(path, () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
  const target = new URL(path, url);
  await new Promise<void>((resolve, reject) => {
    const request = target.protocol === 'https:' ? https.request(target, { ca }) : http.request(target);
    request.once('response', (res) => {
      res.resume();
      res.once('end', resolve);
    });
    request.once('error', reject);
    request.end();
  });
  await seen;
}

/** The `storage:` driver lines of the registry's config. With s3 (distribution 2.8's s3-aws driver):
 * a `regionendpoint` makes it use path-style URLs on that endpoint, `secure: false` plain HTTP, and
 * `redirect` is on by default. */
function storageDriver(storage: RegistryOptions['storage'], directory: string): string[] {
  if (!storage) return ['  filesystem:', `    rootdirectory: ${directory}`];
  const { s3 } = storage;
  const key = (file: string) => JSON.stringify(readFileSync(file, 'utf8').trim());
  return [
    '  s3:',
    '    region: us-east-1',
    `    regionendpoint: ${storage.endpoint ?? s3.endpoint}`,
    `    bucket: ${s3.bucket}`,
    `    accesskey: ${key(s3.accessKeyFile)}`,
    `    secretkey: ${key(s3.secretKeyFile)}`,
    '    secure: false',
    '    v4auth: true',
    '    rootdirectory: /registry',
    '  redirect:',
    '    disable: false',
  ];
}

export async function startRegistry(options: RegistryOptions = {}): Promise<RegistryHandle> {
  const auth = options.auth ?? 'none';
  const users = options.users ?? DEFAULT_USERS;
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-registry-'));
  mkdirSync(join(dir, 'data'));
  const port = await freePort();
  const lines = ['version: 0.1', 'log:', '  level: warn', '  accesslog:', `    disabled: ${options.accessLog ? 'false' : 'true'}`, 'storage:', ...storageDriver(options.storage, join(dir, 'data')), ...(options.deletes ? ['  delete:', '    enabled: true'] : []), ...(options.catalogMaxEntries !== undefined ? ['catalog:', `  maxentries: ${options.catalogMaxEntries}`] : []), 'http:', `  addr: 127.0.0.1:${port}`, '  secret: test-secret', ...(options.schema1 ? ['compatibility:', '  schema1:', '    enabled: true'] : [])];
  let tls: CertificateBundle | undefined;
  let caFile: string | undefined;
  if (options.tls) {
    tls = generateCertificates({ service: 'registry', namespace: 'test', extraNames: ['127.0.0.1'] });
    writeFileSync(join(dir, 'tls.crt'), tls.cert);
    writeFileSync(join(dir, 'tls.key'), tls.key);
    caFile = join(dir, 'ca.crt');
    writeFileSync(caFile, tls.caCert);
    lines.push('  tls:', `    certificate: ${join(dir, 'tls.crt')}`, `    key: ${join(dir, 'tls.key')}`);
  }
  let issuer: TokenIssuer | undefined;
  if (auth === 'basic') {
    const htpasswd = Object.entries(users)
      .map(([u, p]) => run('htpasswd', ['-Bbn', u, p]).trim())
      .join('\n');
    writeFileSync(join(dir, 'htpasswd'), `${htpasswd}\n`);
    lines.push('auth:', '  htpasswd:', '    realm: test-registry', `    path: ${join(dir, 'htpasswd')}`);
  } else if (auth === 'token') {
    const signing = generateCertificates({ service: 'token-signer', namespace: 'test' });
    writeFileSync(join(dir, 'token-ca.crt'), signing.caCert);
    issuer = await startTokenIssuer(signing, 'test-registry', users, tls, options.anonymousPull);
    lines.push('auth:', '  token:', `    realm: ${issuer.realm}`, '    service: test-registry', '    issuer: test-issuer', `    rootcertbundle: ${join(dir, 'token-ca.crt')}`);
  }
  if (options.pullThrough) {
    const { remoteUrl, username, password } = options.pullThrough;
    lines.push('proxy:', `  remoteurl: ${remoteUrl}`, ...(username !== undefined ? [`  username: ${JSON.stringify(username)}`] : []), ...(password !== undefined ? [`  password: ${JSON.stringify(password)}`] : []));
  }
  writeFileSync(join(dir, 'config.yml'), `${lines.join('\n')}\n`);
  const requests: RegistryRequest[] = [];
  const markers = new EventTarget();
  const serve = async (): Promise<Proc> => {
    // The s3 driver's SDK refuses to start when AWS_CA_BUNDLE is set (it cannot apply it to the
    // registry's own HTTP transport); the object store here is plain HTTP on loopback anyway.
    const started = startProcess('docker-registry', ['serve', join(dir, 'config.yml')], options.storage ? { AWS_CA_BUNDLE: undefined } : {});
    if (options.accessLog) recordAccessLog(started, requests, markers);
    try {
      await waitForPort(port);
    } catch (error) {
      await started.stop();
      throw new Error(`${(error as Error).message}\n${started.output()}`);
    }
    return started;
  };
  let proc = await serve();
  const scheme = options.tls ? 'https' : 'http';
  const url = `${scheme}://127.0.0.1:${port}`;
  const settled = async (): Promise<readonly RegistryRequest[]> => {
    if (options.accessLog) await settleAccessLog(proc, url, tls?.caCert, markers);
    return [...requests];
  };
  const [firstUser, firstPassword] = Object.entries(users)[0] ?? ['', ''];
  return {
    host: `127.0.0.1:${port}`,
    port,
    url,
    tls,
    caFile,
    issuer,
    get process() {
      return proc;
    },
    dir,
    kill() {
      return new Promise<void>((resolve) => {
        if (proc.child.exitCode !== null || proc.child.signalCode !== null) return resolve();
        proc.child.once('exit', () => resolve());
        proc.child.kill('SIGKILL');
      });
    },
    async restart() {
      proc = await serve();
    },
    async push(image, repository, tag, format = 'oci') {
      const layout = mkdtempSync(join(tmpdir(), 'pullbridge-oci-'));
      writeOciLayout(layout, image, tag);
      const creds = auth === 'none' ? [] : ['--dest-creds', `${firstUser}:${firstPassword}`];
      try {
        const formatFlags = format === 'docker' ? ['--format', 'v2s2'] : [];
        await runAsync('skopeo', ['copy', '--all', '--quiet', ...formatFlags, '--dest-tls-verify=false', ...creds, `oci:${layout}:${tag}`, `docker://127.0.0.1:${port}/${repository}:${tag}`]);
      } finally {
        rmSync(layout, { recursive: true, force: true });
      }
    },
    requests: settled,
    blobGets: async (digest) => (await settled()).filter((r) => r.method === 'GET' && r.path.endsWith(`/blobs/${digest}`) && r.status < 300).length,
    async stop() {
      await proc.stop();
      await issuer?.server.close(100);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
