// pullbridge's own container image, assembled offline from this machine (the published Dockerfile
// needs node and distroless images from a registry; nothing can be downloaded in tests). The result
// matches the Dockerfile's final stage where the chart depends on it: the Node.js LTS binary
// (scripts/lts-node.sh, cached before the suite runs, whichever Node runs the tests) at
// /nodejs/bin/node (the chart's init container calls that path), the libraries `ldd` lists at their
// paths plus the dynamic loader, /app with dist/src, package.json and the production node_modules,
// user 65532 in /etc/passwd and /etc/group, /tmp, and the same WorkingDir, User, Entrypoint and Cmd.
//
// The layer is written by the system `tar` from a staging directory and compressed by `gzip`, so
// the ~100 MB Node binary never sits in this process's memory; only the compressed layer (~40 MB)
// does, as the image's blob. Facts behind it: shared/notes/real-node.md ("An offline image").

import { createHash } from 'node:crypto';
import { chmodSync, closeSync, copyFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { singleLayerImage, writeOciLayout, type RuntimeConfig, type TestImage } from './oci.js';
import { run } from './procs.js';

/** The repository root (this file runs from dist/test/support). */
const ROOT = fileURLToPath(new URL('../../../', import.meta.url));

/** What the Dockerfile's final stage sets (distroless nonroot: user 65532, NODE_ENV=production). */
export const APP_IMAGE_CONFIG: RuntimeConfig = {
  Entrypoint: ['/nodejs/bin/node', 'dist/src/cli.js'],
  Cmd: ['--help'],
  User: '65532:65532',
  WorkingDir: '/app',
  Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'NODE_ENV=production'],
  ExposedPorts: { '8443/tcp': {}, '5000/tcp': {} },
};

export interface AppImage {
  readonly image: TestImage;
  /** The image as an OCI layout (tag `test`), for `skopeo copy oci:DIR:test …`. */
  readonly layout: string;
  /** Bytes of the uncompressed layer and of the gzip blob. */
  readonly layerBytes: number;
  readonly compressedBytes: number;
}

/** Shared libraries a binary loads, at the paths `ldd` resolves them to, with the dynamic loader. */
export function sharedLibraries(binary: string): string[] {
  const paths = new Set<string>();
  for (const line of run('ldd', [binary]).split('\n')) {
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`, or the loader: `/lib64/ld-linux-x86-64.so.2 (0x…)`
    const m = /(?:=>\s*)?(\/\S+)\s+\(0x[0-9a-f]+\)/.exec(line);
    if (m?.[1]) paths.add(m[1]);
    else if (/not found/.test(line)) throw new Error(`ldd ${binary}: ${line.trim()}`);
  }
  if (![...paths].some((p) => /\/ld-linux[^/]*\.so/.test(p))) throw new Error(`ldd ${binary} named no dynamic loader`);
  return [...paths];
}

/** The directories of production dependencies under node_modules (npm's view: `--omit=dev`),
 * relative to the repository; nested ones inside a selected package are left to their parent. */
export function productionPackages(root = ROOT): string[] {
  const listed = run('npm', ['ls', '--prefix', root, '--omit=dev', '--parseable', '--all'])
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line.startsWith(join(root, 'node_modules') + sep))
    .map((line) => relative(root, line))
    .sort();
  const selected: string[] = [];
  for (const path of listed) if (!selected.some((parent) => path.startsWith(parent + sep))) selected.push(path);
  return selected;
}

function sha256OfFile(path: string): { digest: string; size: number } {
  const hash = createHash('sha256');
  const fd = openSync(path, 'r');
  const chunk = Buffer.alloc(1 << 20);
  let size = 0;
  try {
    for (let n; (n = readSync(fd, chunk, 0, chunk.length, null)) > 0; size += n) hash.update(chunk.subarray(0, n));
  } finally {
    closeSync(fd);
  }
  return { digest: `sha256:${hash.digest('hex')}`, size };
}

const built = new Map<string, AppImage>();
let runDir: string | undefined;

/** A directory for this test run's image, removed when the process exits. */
function testRunDir(): string {
  if (runDir === undefined) {
    const created = mkdtempSync(join(tmpdir(), 'pullbridge-app-image-'));
    process.once('exit', () => rmSync(created, { recursive: true, force: true }));
    runDir = created;
  }
  return runDir;
}

/** The Node.js LTS binary the image ships, as scripts/lts-node.sh cached it (never fetched here). */
function ltsNode(): string {
  return run(join(ROOT, 'scripts', 'lts-node.sh'), ['--cached']).trim();
}

/**
 * Builds pullbridge's image (in `dir`, or in a directory of this test run by default), once per
 * directory and process: later calls return the same image, so test files of one run share it.
 * Needs `npm run build` done (dist/src) and node_modules installed.
 */
export function buildAppImage(dir: string = testRunDir()): AppImage {
  const cached = built.get(dir);
  if (cached) return cached;
  if (!existsSync(join(ROOT, 'dist', 'src', 'cli.js'))) throw new Error(`${join(ROOT, 'dist', 'src')} is missing: run npm run build`);
  const work = mkdtempSync(join(dir, 'app-image-'));
  const rootfs = join(work, 'rootfs');
  const put = (from: string, to: string, mode?: number) => {
    const target = join(rootfs, to);
    mkdirSync(dirname(target), { recursive: true, mode: 0o755 });
    copyFileSync(from, target); // follows symlinks (libstdc++.so.6 → libstdc++.so.6.0.30): the file at the name asked for
    if (mode !== undefined) chmodSync(target, mode);
  };
  mkdirSync(rootfs, { mode: 0o755 });

  const node = ltsNode();
  put(node, 'nodejs/bin/node', 0o755);
  for (const library of sharedLibraries(node)) put(library, library.slice(1), 0o755);

  const etc = join(rootfs, 'etc');
  mkdirSync(etc, { mode: 0o755 });
  writeFileSync(join(etc, 'passwd'), 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n', { mode: 0o644 });
  writeFileSync(join(etc, 'group'), 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n', { mode: 0o644 });
  mkdirSync(join(rootfs, 'tmp'));
  chmodSync(join(rootfs, 'tmp'), 0o1777);

  const app = join(rootfs, 'app');
  mkdirSync(app, { mode: 0o755 });
  cpSync(join(ROOT, 'dist', 'src'), join(app, 'dist', 'src'), { recursive: true });
  copyFileSync(join(ROOT, 'package.json'), join(app, 'package.json'));
  for (const pkg of productionPackages()) cpSync(join(ROOT, pkg), join(app, pkg), { recursive: true, verbatimSymlinks: true });

  // Owned by root, readable by all, nothing writable but /tmp.
  // Top-level entries only: the archive carries no entry for `/` itself.
  const tar = join(work, 'layer.tar');
  run('tar', ['-C', rootfs, '--sort=name', '--numeric-owner', '--owner=0', '--group=0', '--mtime=@0', '--mode=go-w', '-cf', tar, ...readdirSync(rootfs).sort()]);
  rmSync(rootfs, { recursive: true, force: true });
  const diff = sha256OfFile(tar);
  run('gzip', ['-1', '-n', tar]);
  const gz = readFileSync(`${tar}.gz`);
  rmSync(`${tar}.gz`);

  const image = singleLayerImage(gz, diff.digest, APP_IMAGE_CONFIG);
  const layout = join(work, 'layout');
  writeOciLayout(layout, image, 'test');
  const result: AppImage = { image, layout, layerBytes: diff.size, compressedBytes: gz.length };
  built.set(dir, result);
  return result;
}
