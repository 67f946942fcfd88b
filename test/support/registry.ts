// A real upstream: distribution's registry (Debian's docker-registry) on loopback, with htpasswd
// Basic auth or token auth (a small token issuer here signs the JWTs the registry verifies), and TLS.

import { createHash, createPrivateKey, createSign, randomBytes, X509Certificate } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { generateCertificates, type CertificateBundle } from '../../src/certs/certs.js';
import { listen, type RunningServer } from '../../src/shell/serve.js';
import { writeOciLayout, type TestImage } from './oci.js';
import { freePort, run, runAsync, startProcess, waitForPort, type Proc } from './procs.js';

export interface RegistryOptions {
  readonly auth?: 'none' | 'basic' | 'token';
  readonly tls?: boolean;
  readonly users?: Readonly<Record<string, string>>;
  /** Record every request the registry answers (its access log), for `requests()`. */
  readonly accessLog?: boolean;
  /** Accept DELETE of manifests (`storage.delete.enabled`), to make a once-present tag unknown. */
  readonly deletes?: boolean;
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
  push(image: TestImage, repository: string, tag: string): Promise<void>;
  /** What the registry answered so far (with `accessLog`; empty otherwise), across restarts. */
  requests(): readonly RegistryRequest[];
  /** GETs of a blob (any repository) answered so far: the transfers the upstream made. */
  blobGets(digest: string): number;
  /**
   * Resolves once the access log holds every request answered before the call: the registry writes
   * a line after its answer, so a count read right after a response may miss it. It asks for a
   * marker (a tag list of a repository no one has) and waits for that line (bounded).
   */
  settled(): Promise<void>;
  stop(): Promise<void>;
}

/** settled()'s marker requests: a repository no one pushes. */
const MARKER_PREFIX = '/v2/pullbridge-log-marker/';

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

async function startTokenIssuer(signing: CertificateBundle, service: string, users: Readonly<Record<string, string>>, tls: CertificateBundle | undefined): Promise<TokenIssuer> {
  const kid = libtrustKeyId(signing.caCert);
  const key = createPrivateKey(signing.caKey);
  const requests: TokenIssuer['requests'] = [];
  const issuer: { expiresIn: number; jwtLifetime: number | undefined } = { expiresIn: 300, jwtLifetime: undefined };
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
      const access = [];
      if (scope && user) {
        const [type, name, actions] = scope.split(':');
        access.push({ type, name, actions: (actions ?? '').split(',') });
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

/** Combined-log lines (`… "GET /v2/… HTTP/1.1" 200 SIZE …`), which the registry writes to stdout. */
function recordAccessLog(proc: Proc, into: RegistryRequest[]): void {
  let partial = '';
  proc.child.stdout?.on('data', (chunk: Buffer) => {
    const text = partial + chunk.toString();
    const lines = text.split('\n');
    partial = lines.pop() ?? '';
    for (const line of lines) {
      const m = /"([A-Z]+) (\S+) HTTP\/[\d.]+" (\d{3}) (\d+|-)/.exec(line);
      if (m) into.push({ method: m[1] ?? '', path: (m[2] ?? '').split('?')[0] ?? '', status: Number(m[3]), bytes: m[4] === '-' ? 0 : Number(m[4]) });
    }
  });
}

export async function startRegistry(options: RegistryOptions = {}): Promise<RegistryHandle> {
  const auth = options.auth ?? 'none';
  const users = options.users ?? DEFAULT_USERS;
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-registry-'));
  mkdirSync(join(dir, 'data'));
  const port = await freePort();
  const lines = ['version: 0.1', 'log:', '  level: warn', '  accesslog:', `    disabled: ${options.accessLog ? 'false' : 'true'}`, 'storage:', '  filesystem:', `    rootdirectory: ${join(dir, 'data')}`, ...(options.deletes ? ['  delete:', '    enabled: true'] : []), 'http:', `  addr: 127.0.0.1:${port}`, '  secret: test-secret'];
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
    issuer = await startTokenIssuer(signing, 'test-registry', users, tls);
    lines.push('auth:', '  token:', `    realm: ${issuer.realm}`, '    service: test-registry', '    issuer: test-issuer', `    rootcertbundle: ${join(dir, 'token-ca.crt')}`);
  }
  writeFileSync(join(dir, 'config.yml'), `${lines.join('\n')}\n`);
  const requests: RegistryRequest[] = [];
  const serve = async (): Promise<Proc> => {
    const started = startProcess('docker-registry', ['serve', join(dir, 'config.yml')]);
    if (options.accessLog) recordAccessLog(started, requests);
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
  const [firstUser, firstPassword] = Object.entries(users)[0] ?? ['', ''];
  return {
    host: `127.0.0.1:${port}`,
    port,
    url: `${scheme}://127.0.0.1:${port}`,
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
    async push(image, repository, tag) {
      const layout = mkdtempSync(join(tmpdir(), 'pullbridge-oci-'));
      writeOciLayout(layout, image, tag);
      const creds = auth === 'none' ? [] : ['--dest-creds', `${firstUser}:${firstPassword}`];
      try {
        await runAsync('skopeo', ['copy', '--all', '--quiet', '--dest-tls-verify=false', ...creds, `oci:${layout}:${tag}`, `docker://127.0.0.1:${port}/${repository}:${tag}`]);
      } finally {
        rmSync(layout, { recursive: true, force: true });
      }
    },
    // Without settled()'s markers: they are not questions the proxy asked.
    requests: () => requests.filter((r) => !r.path.startsWith(MARKER_PREFIX)),
    async settled() {
      if (!options.accessLog) throw new Error('settled() reads the access log: start the registry with accessLog');
      const marker = `${MARKER_PREFIX}${randomBytes(8).toString('hex')}/tags/list`;
      await new Promise<void>((resolve) => {
        const options = { host: '127.0.0.1', port, path: marker, ...(tls ? { ca: tls.caCert } : {}) };
        const req = (tls ? https : http).get(options, (res) => res.resume().on('end', resolve).on('error', () => resolve()));
        req.on('error', () => resolve());
      });
      for (let i = 0; i < 500 && !requests.some((r) => r.path === marker); i++) await new Promise((resolve) => setTimeout(resolve, 10));
      if (!requests.some((r) => r.path === marker)) throw new Error('the registry access log did not show the marker request within 5 s');
    },
    blobGets: (digest) => requests.filter((r) => r.method === 'GET' && r.path.endsWith(`/blobs/${digest}`) && r.status < 300).length,
    async stop() {
      await proc.stop();
      await issuer?.server.close(100);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
