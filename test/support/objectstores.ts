// Object-storage servers on loopback for the shared cache tier, each in a temp directory and on a
// free port, removed when stopped: versitygw (the S3 API over a posix directory), Azurite (the
// Azure Blob API, an npm devDependency) and fake-gcs-server (the GCS JSON API). versitygw and
// fake-gcs-server are built from Go modules by scripts/build-storage-servers.sh.

import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, startProcess, waitForPort, type Proc } from './procs.js';

export const VERSITYGW_VERSION = process.env.VERSITYGW_VERSION ?? 'v1.8.0';
export const FAKE_GCS_VERSION = process.env.FAKE_GCS_VERSION ?? 'v1.56.1';
const CACHE = process.env.PULLBRIDGE_CACHE ?? join(homedir(), '.cache', 'pullbridge');

export function storageServerBinary(name: 'versitygw' | 'fake-gcs-server'): string {
  const path = join(CACHE, 'bin', `${name}-${name === 'versitygw' ? VERSITYGW_VERSION : FAKE_GCS_VERSION}`);
  if (!existsSync(path)) throw new Error(`${path} is missing: run scripts/build-storage-servers.sh (it builds versitygw and fake-gcs-server from Go modules)`);
  return path;
}

export interface ObjectStoreServer {
  /** Base URL on 127.0.0.1 (for Azurite, with the account's path). */
  readonly endpoint: string;
  /** The server's process id (a benchmark reads its CPU time). */
  readonly pid: number;
  /** Output of the server, for a failing test's message. */
  logs(): string;
  /** Stops the server; its directory is removed. Safe to call twice. */
  stop(): Promise<void>;
}

export interface S3Server extends ObjectStoreServer {
  /** A bucket created before start. */
  readonly bucket: string;
  readonly accessKeyFile: string;
  readonly secretKeyFile: string;
  /** A secret other than the server's, for the 'denied' case. */
  readonly wrongSecretKeyFile: string;
}

export interface AzureServer extends ObjectStoreServer {
  readonly accountName: string;
  readonly accountKeyFile: string;
  readonly wrongAccountKeyFile: string;
}

export interface GcsServer extends ObjectStoreServer {
  /** A bucket created through the API after start. */
  readonly bucket: string;
}

function serverDir(name: string): string {
  return mkdtempSync(join(tmpdir(), `pullbridge-${name}-`));
}

function stopper(proc: Proc, dir: string): () => Promise<void> {
  return async () => {
    await proc.stop();
    rmSync(dir, { recursive: true, force: true });
  };
}

async function started(proc: Proc, port: number, dir: string): Promise<void> {
  try {
    await waitForPort(port, 30_000);
  } catch (error) {
    await stopper(proc, dir)();
    throw new Error(`${(error as Error).message}\n${proc.output()}`);
  }
}

/** versitygw's posix backend: every directory under its root is a bucket, so the bucket is made
 * with mkdir before start. Object metadata is kept in xattrs (the temp filesystem needs user xattrs;
 * where it has none, versitygw's --sidecar directory is the alternative). */
export async function startVersitygw(bucket = 'pullbridge-test'): Promise<S3Server> {
  const dir = serverDir('versitygw');
  const root = join(dir, 'root');
  mkdirSync(join(root, bucket), { recursive: true });
  const access = `AK${randomBytes(8).toString('hex')}`;
  const secret = randomBytes(20).toString('hex');
  // With trailing newlines, as Secret files written by hand often have: the adapter trims them.
  writeFileSync(join(dir, 'access'), `${access}\n`);
  writeFileSync(join(dir, 'secret'), `${secret}\n`);
  writeFileSync(join(dir, 'wrong-secret'), `${randomBytes(20).toString('hex')}\n`);
  const port = await freePort();
  const proc = startProcess(storageServerBinary('versitygw'), ['--access', access, '--secret', secret, '--port', `127.0.0.1:${port}`, '--quiet', 'posix', root]);
  await started(proc, port, dir);
  return {
    endpoint: `http://127.0.0.1:${port}`,
    bucket,
    accessKeyFile: join(dir, 'access'),
    secretKeyFile: join(dir, 'secret'),
    wrongSecretKeyFile: join(dir, 'wrong-secret'),
    pid: proc.child.pid ?? 0,
    logs: proc.output,
    stop: stopper(proc, dir),
  };
}

/** Azurite's blob service with its one built-in account (devstoreaccount1 and its published key);
 * path-style URLs, `http://127.0.0.1:PORT/devstoreaccount1`. */
export async function startAzurite(): Promise<AzureServer> {
  const dir = serverDir('azurite');
  const accountName = 'devstoreaccount1';
  const accountKey = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';
  writeFileSync(join(dir, 'account-key'), `${accountKey}\n`);
  writeFileSync(join(dir, 'wrong-account-key'), randomBytes(64).toString('base64'));
  const port = await freePort();
  const bin = join(process.cwd(), 'node_modules', '.bin', 'azurite-blob');
  const proc = startProcess(bin, ['--blobHost', '127.0.0.1', '--blobPort', String(port), '--location', join(dir, 'data'), '--skipApiVersionCheck', '--silent', '--loose']);
  await started(proc, port, dir);
  return {
    endpoint: `http://127.0.0.1:${port}/${accountName}`,
    accountName,
    accountKeyFile: join(dir, 'account-key'),
    wrongAccountKeyFile: join(dir, 'wrong-account-key'),
    pid: proc.child.pid ?? 0,
    logs: proc.output,
    stop: stopper(proc, dir),
  };
}

/** fake-gcs-server over a directory; it takes no credentials at all. Resumable uploads return a
 * session URL built from -external-url, so that is the loopback address too. */
export async function startFakeGcs(bucket = 'pullbridge-test'): Promise<GcsServer> {
  const dir = serverDir('fake-gcs');
  const port = await freePort();
  const endpoint = `http://127.0.0.1:${port}`;
  const proc = startProcess(storageServerBinary('fake-gcs-server'), [
    '-scheme', 'http', '-host', '127.0.0.1', '-port', String(port),
    '-backend', 'filesystem', '-filesystem-root', join(dir, 'root'),
    '-public-host', `127.0.0.1:${port}`, '-external-url', endpoint, '-log-level', 'warn',
  ]);
  await started(proc, port, dir);
  const response = await fetch(`${endpoint}/storage/v1/b?project=test`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: bucket }) });
  if (!response.ok) {
    await stopper(proc, dir)();
    throw new Error(`creating bucket ${bucket}: ${response.status} ${await response.text()}`);
  }
  return { endpoint, bucket, pid: proc.child.pid ?? 0, logs: proc.output, stop: stopper(proc, dir) };
}
