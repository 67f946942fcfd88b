// One temporary directory per test run, removed when the run ends: every directory a test (or a
// process it starts) makes under os.tmpdir() lands inside it, so a run leaves nothing behind even
// where a test's own cleanup is skipped by a failure. Loaded by mocha before the tests (.mocharc's
// `require`) as a root hook plugin.
//
// A run that was killed (CI's time limit, ^C) cannot clean up after itself; the next run removes
// the roots whose process is gone.
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const PREFIX = 'pullbridge-test-';
const OWNER_FILE = 'owner.pid';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Removes the run roots under `parent` whose owning process has ended. */
export function sweepAbandonedRoots(parent: string): string[] {
  const removed: string[] = [];
  for (const name of readdirSync(parent)) {
    if (!name.startsWith(PREFIX)) continue;
    const root = join(parent, name);
    let owner: number;
    try {
      owner = Number(readFileSync(join(root, OWNER_FILE), 'utf8'));
    } catch {
      continue; // being created, or not ours
    }
    if (!Number.isInteger(owner) || owner <= 0 || alive(owner)) continue;
    rmSync(root, { recursive: true, force: true });
    removed.push(root);
  }
  return removed;
}

const parent = tmpdir();
sweepAbandonedRoots(parent);
const root = mkdtempSync(join(parent, PREFIX));
writeFileSync(join(root, OWNER_FILE), String(process.pid));
// os.tmpdir() reads TMPDIR on every call, and the processes the tests start inherit it.
process.env['TMPDIR'] = root;

export const mochaHooks = {
  afterAll(): void {
    process.env['TMPDIR'] = parent;
    try {
      // Retries: a process a test stopped may still be closing a file in it.
      rmSync(root, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 });
    } catch (err) {
      console.warn(`could not remove the run's temporary directory ${root}: ${(err as Error).message}`);
    }
  },
};
