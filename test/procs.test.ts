import assert from 'node:assert/strict';
import { freePort } from './support/procs.js';

describe('the test support: loopback ports', () => {
  it('never hands out one port twice in a run, though the kernel gives a closed port again', async () => {
    // 2,000 ports of about 28,000 ephemeral ones: without the check the kernel repeats some.
    const ports: number[] = [];
    for (let i = 0; i < 2000; i++) ports.push(await freePort());
    const repeated = ports.filter((port, i) => ports.indexOf(port) !== i);
    assert.deepEqual(repeated, []);
  });
});
