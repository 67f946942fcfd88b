import { strict as assert } from 'node:assert';
import { PeriodicTask } from '../src/periodic.js';

describe('PeriodicTask', () => {
  it('runs at start and never two runs at once: a run asked for while one is going joins it', async () => {
    let runs = 0;
    let finish: () => void = () => undefined;
    const task = new PeriodicTask(() => {
      runs++;
      return new Promise<void>((resolve) => (finish = resolve));
    }, 3_600_000);
    task.start();
    assert.equal(runs, 1);
    const joined = task.run();
    assert.equal(runs, 1, 'a second run while the first is going');
    finish();
    await joined;
    void task.run();
    assert.equal(runs, 2, 'a run after the first ended');
    finish();
    await task.stop();
  });

  it('a failing run does not stop later runs, and stop waits for a run in progress', async () => {
    let runs = 0;
    let ended = false;
    const task = new PeriodicTask(async () => {
      runs++;
      if (runs === 1) throw new Error('API down');
      await new Promise((resolve) => setImmediate(resolve));
      ended = true;
    }, 3_600_000);
    await task.run();
    void task.run();
    await task.stop();
    assert.equal(runs, 2);
    assert.equal(ended, true, 'stop() settled before the run in progress ended');
  });
});
