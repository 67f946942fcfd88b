// crane and regctl, built from their Go modules by scripts/build-registry-tools.sh: registry clients
// that mirroring tools are made of, run against the proxy as users run them, in a home of their own
// (no credentials from this machine's user; nothing written outside it).

import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { runAsync } from './procs.js';

export const CRANE_VERSION = process.env.CRANE_VERSION ?? 'v0.22.1';
export const REGCTL_VERSION = process.env.REGCTL_VERSION ?? 'v0.11.7';
const CACHE = process.env.PULLBRIDGE_CACHE ?? join(homedir(), '.cache', 'pullbridge');

function binary(name: string, version: string): string {
  const path = join(CACHE, 'bin', `${name}-${version}`);
  if (!existsSync(path)) throw new Error(`${path} is missing: run scripts/build-registry-tools.sh (it builds crane and regctl from their Go modules)`);
  return path;
}

export interface RegistryTools {
  /** `crane ARGS…` with the credential of `login` for its host (a docker config of its own); stdout. */
  crane(args: readonly string[]): Promise<string>;
  /** `regctl ARGS…` with `--host reg=HOST,user=…,pass=…,tls=disabled` (plain HTTP, as to 127.0.0.1); stdout. */
  regctl(args: readonly string[]): Promise<string>;
  close(): void;
}

/** The tools, logged in to `host` (`127.0.0.1:PORT`, plain HTTP) as `username`/`password`. */
export function registryTools(host: string, username: string, password: string): RegistryTools {
  const crane = binary('crane', CRANE_VERSION);
  const regctl = binary('regctl', REGCTL_VERSION);
  const home = mkdtempSync(join(tmpdir(), 'pullbridge-registrytools-'));
  writeFileSync(join(home, 'config.json'), JSON.stringify({ auths: { [host]: { auth: Buffer.from(`${username}:${password}`).toString('base64') } } }));
  const env = { HOME: home, DOCKER_CONFIG: home, XDG_CONFIG_HOME: home };
  return {
    // crane speaks plain HTTP to 127.0.0.1 by itself (go-containerregistry treats loopback as insecure).
    crane: (args) => runAsync(crane, [...args], { env }),
    regctl: (args) => runAsync(regctl, ['--host', `reg=${host},user=${username},pass=${password},tls=disabled`, ...args], { env }),
    close: () => rmSync(home, { recursive: true, force: true }),
  };
}
