import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sweepAbandonedRoots } from './support/tmproot.js';

describe('the test run temporary root', () => {
  it('a run removes the roots of runs whose process ended, and only those', () => {
    const parent = mkdtempSync(join(tmpdir(), 'pullbridge-sweep-'));
    try {
      // A process id that has ended: a child that has exited and been reaped.
      const ended = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
      const deadPid = Number(ended.stdout);
      assert.ok(deadPid > 0);
      const make = (name: string, owner?: string) => {
        const dir = join(parent, name);
        mkdirSync(dir);
        writeFileSync(join(dir, 'left-behind'), 'x');
        if (owner !== undefined) writeFileSync(join(dir, 'owner.pid'), owner);
        return dir;
      };
      const abandoned = make('pullbridge-test-dead', String(deadPid));
      const running = make('pullbridge-test-live', String(process.pid));
      const starting = make('pullbridge-test-new');
      const other = make('someone-else', String(deadPid));
      assert.deepEqual(sweepAbandonedRoots(parent), [abandoned]);
      assert.equal(existsSync(abandoned), false);
      for (const kept of [running, starting, other]) assert.ok(existsSync(join(kept, 'left-behind')), kept);
    } finally {
      rmSync(parent, { recursive: true, force: true });
    }
  });

  it('this run works in its own root: os.tmpdir() is a pullbridge-test- directory owned by this process', () => {
    assert.match(tmpdir(), /\/pullbridge-test-[^/]+$/);
  });
});
