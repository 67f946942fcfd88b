// The registry tools built from their Go modules by scripts/build-conformance-tools.sh:
// go-containerregistry's registry with the OCI 1.1 referrers API on (referrers-registry), oras, and
// the OCI distribution-spec conformance suite's test binary.

import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeOciLayout, type TestImage } from './oci.js';
import { freePort, runAsync, startProcess, waitForPort, type Proc } from './procs.js';

const CACHE = process.env.PULLBRIDGE_CACHE ?? join(homedir(), '.cache', 'pullbridge');
export const GGCR_VERSION = process.env.GGCR_VERSION ?? 'v0.22.1';
export const ORAS_VERSION = process.env.ORAS_VERSION ?? 'v1.3.6';
export const CONFORMANCE_VERSION = process.env.CONFORMANCE_VERSION ?? 'v0.0.0-20260831232431-97274622c111';

function built(name: string, version: string): string {
  const path = join(CACHE, 'bin', `${name}-${version}`);
  if (!existsSync(path)) throw new Error(`${path} is missing: run scripts/build-conformance-tools.sh (it builds referrers-registry, oras and the OCI conformance suite from their Go modules)`);
  return path;
}

export const referrersRegistryBinary = (): string => built('referrers-registry', GGCR_VERSION);
export const orasBinary = (): string => built('oras', ORAS_VERSION);
export const conformanceBinary = (): string => built('oci-conformance', CONFORMANCE_VERSION);

export interface ReferrersRegistry {
  /** `127.0.0.1:PORT` */
  readonly host: string;
  readonly url: string;
  readonly process: Proc;
  /** Copies the image in (skopeo, as RegistryHandle.push). */
  push(image: TestImage, repository: string, tag: string): Promise<void>;
  stop(): Promise<void>;
}

/** go-containerregistry's registry with the referrers API, on loopback: no authentication, content in memory. */
export async function startReferrersRegistry(): Promise<ReferrersRegistry> {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-referrers-registry-'));
  const proc = startProcess(referrersRegistryBinary(), ['--address', `127.0.0.1:${port}`]);
  try {
    await waitForPort(port);
  } catch (error) {
    await proc.stop();
    throw new Error(`referrers-registry did not start: ${(error as Error).message}\n${proc.output()}`);
  }
  const host = `127.0.0.1:${port}`;
  return {
    host,
    url: `http://${host}`,
    process: proc,
    async push(image, repository, tag) {
      const layout = mkdtempSync(join(dir, 'layout-'));
      writeOciLayout(layout, image, tag);
      await runAsync('skopeo', ['copy', '--all', '--quiet', '--dest-tls-verify=false', `oci:${layout}:${tag}`, `docker://${host}/${repository}:${tag}`]);
    },
    async stop() {
      await proc.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
