// containerd, the puller kubelet uses, run as a private daemon in a temp dir; driven with `ctr`.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runAsync, startProcess, type Proc } from './procs.js';

export interface Containerd {
  readonly socket: string;
  /** `ctr content fetch` of a reference; resolves with ctr's output, rejects with it on failure. */
  fetch(reference: string, options?: { user?: string; allPlatforms?: boolean; platform?: string }): Promise<string>;
  /** The bytes of a blob in containerd's content store. */
  content(digest: string): Promise<Buffer>;
  /** Digests in the content store. */
  digests(): Promise<Set<string>>;
  /** The refs of unfinished downloads (ingests) containerd keeps to resume them. */
  ingests(): Promise<string[]>;
  /** Removes everything from the content store, so the next fetch pulls again. */
  clear(): Promise<void>;
  stop(): Promise<void>;
}

export async function startContainerd(): Promise<Containerd> {
  const dir = mkdtempSync(join(tmpdir(), 'pb-ctd-'));
  const socket = join(dir, 'c.sock');
  writeFileSync(
    join(dir, 'config.toml'),
    [
      'version = 2',
      `root = "${join(dir, 'root')}"`,
      `state = "${join(dir, 'state')}"`,
      // Only the content store and metadata are needed to pull; the rest would want privileges.
      'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]',
      '[grpc]',
      `  address = "${socket}"`,
      '[ttrpc]',
      `  address = "${join(dir, 't.sock')}"`,
      '[debug]',
      '  address = ""',
      '[metrics]',
      '  address = ""',
    ].join('\n'),
  );
  const proc: Proc = startProcess('containerd', ['--config', join(dir, 'config.toml')]);
  const deadline = Date.now() + 20_000;
  for (;;) {
    try {
      await runAsync('ctr', ['-a', socket, 'version'], { timeoutMs: 5000 });
      break;
    } catch (error) {
      if (Date.now() > deadline) {
        await proc.stop();
        rmSync(dir, { recursive: true, force: true });
        throw new Error(`containerd did not start: ${(error as Error).message}\n${proc.output()}`);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  const ctr = (...args: string[]) => runAsync('ctr', ['-a', socket, ...args], { timeoutMs: 120_000 });
  const digests = async () => {
    const out = await ctr('content', 'ls', '-q');
    return new Set(out.split('\n').map((l) => l.trim()).filter(Boolean));
  };
  return {
    socket,
    fetch(reference, options = {}) {
      const args = ['content', 'fetch', '--plain-http'];
      if (options.user) args.push('--user', options.user);
      if (options.allPlatforms) args.push('--all-platforms');
      if (options.platform) args.push('--platform', options.platform);
      return ctr(...args, reference);
    },
    async content(digest) {
      return new Promise((resolve, reject) => {
        const child = spawn('ctr', ['-a', socket, 'content', 'get', digest]);
        const chunks: Buffer[] = [];
        child.stdout.on('data', (c: Buffer) => chunks.push(c));
        child.once('error', reject);
        child.once('close', (code) => (code === 0 ? resolve(Buffer.concat(chunks)) : reject(new Error(`ctr content get ${digest} failed`))));
      });
    },
    digests,
    async ingests() {
      const out = await ctr('content', 'active');
      return out.split('\n').slice(1).map((l) => l.trim().split(/\s+/)[0] ?? '').filter(Boolean);
    },
    async clear() {
      const all = [...(await digests())];
      if (all.length > 0) await ctr('content', 'rm', ...all);
    },
    async stop() {
      await proc.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
