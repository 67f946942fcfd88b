// cosign itself, built from its Go module by scripts/build-cosign.sh: key pairs and signatures made
// the way users make them, so that admission is tested against cosign's format as cosign writes it.

import { existsSync, mkdtempSync as makeTempDir, readFileSync, rmSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { run, runAsync } from './procs.js';

export const COSIGN_VERSION = process.env.COSIGN_VERSION ?? 'v2.6.5';
const CACHE = process.env.PULLBRIDGE_CACHE ?? join(homedir(), '.cache', 'pullbridge');
const PASSWORD = 'cosign test key password';

const made: string[] = [];
function mkdtempSync(prefix: string): string {
  const dir = makeTempDir(prefix);
  made.push(dir);
  return dir;
}

/** Removes every key and run directory made so far. */
export function removeCosignFiles(): void {
  for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
}

export function cosignBinary(): string {
  const path = join(CACHE, 'bin', `cosign-${COSIGN_VERSION}`);
  if (!existsSync(path)) throw new Error(`${path} is missing: run scripts/build-cosign.sh (it builds cosign from its Go module)`);
  return path;
}

export interface CosignKeyPair {
  /** cosign's encrypted private key file. */
  readonly privateKeyFile: string;
  /** The PEM public key file, as verify.cosign.publicKeyFiles names it. */
  readonly publicKeyFile: string;
  readonly publicKeyPem: string;
}

// No call may reach a public service: no transparency log, no TUF root, no registry credentials
// from the user's home (DOCKER_CONFIG points to an empty directory).
function environment(dir: string): NodeJS.ProcessEnv {
  return { COSIGN_PASSWORD: PASSWORD, DOCKER_CONFIG: dir, TUF_ROOT: join(dir, 'tuf'), HOME: dir, COSIGN_YES: 'true', SIGSTORE_NO_CACHE: 'true' };
}

/** `cosign generate-key-pair`: an ECDSA P-256 key, cosign's default. */
export async function generateKeyPair(): Promise<CosignKeyPair> {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-cosign-'));
  await runAsync(cosignBinary(), ['generate-key-pair', '--output-key-prefix', join(dir, 'cosign')], { env: environment(dir) });
  return keyPair(dir);
}

/** `cosign import-key-pair` of a key openssl made (`genpkey` arguments): RSA, ECDSA on other curves, Ed25519. */
export async function importKeyPair(genpkeyArgs: readonly string[]): Promise<CosignKeyPair> {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-cosign-'));
  run('openssl', ['genpkey', ...genpkeyArgs, '-out', join(dir, 'plain.pem')]);
  await runAsync(cosignBinary(), ['import-key-pair', '--key', join(dir, 'plain.pem'), '--output-key-prefix', join(dir, 'cosign')], { env: environment(dir) });
  return keyPair(dir);
}

function keyPair(dir: string): CosignKeyPair {
  const publicKeyFile = join(dir, 'cosign.pub');
  return { privateKeyFile: join(dir, 'cosign.key'), publicKeyFile, publicKeyPem: readFileSync(publicKeyFile, 'utf8') };
}

/** `cosign sign --key` of `repo@sha256:…` on a loopback registry, without the transparency log. */
export async function sign(imageByDigest: string, key: CosignKeyPair, options: { readonly referrers?: boolean } = {}): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-cosign-run-'));
  const args = ['sign', '--key', key.privateKeyFile, '--tlog-upload=false', '--allow-insecure-registry', ...(options.referrers ? ['--registry-referrers-mode=oci-1-1'] : []), imageByDigest];
  // The referrers mode is experimental in cosign v2.
  await runAsync(cosignBinary(), args, { env: { ...environment(dir), ...(options.referrers ? { COSIGN_EXPERIMENTAL: '1' } : {}) } });
}

/** `cosign verify --key` without the transparency log: whether cosign itself accepts the signature. */
export async function cosignVerifies(imageByDigest: string, key: CosignKeyPair, options: { readonly referrers?: boolean; readonly registryAuth?: { readonly username: string; readonly password: string } } = {}): Promise<boolean> {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-cosign-run-'));
  const auth = options.registryAuth ? ['--registry-username', options.registryAuth.username, '--registry-password', options.registryAuth.password] : [];
  const args = ['verify', '--key', key.publicKeyFile, '--insecure-ignore-tlog', '--allow-insecure-registry', ...auth, ...(options.referrers ? ['--experimental-oci11'] : []), imageByDigest];
  try {
    await runAsync(cosignBinary(), args, { env: environment(dir) });
    return true;
  } catch {
    return false;
  }
}
