// The webhook process's memory under large but well-formed input, measured from the outside: the
// resident set (/proc/PID/status VmRSS) of the `pullbridge webhook` binary while it admits Pods whose
// image strings are large and all different.

import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readRssMb, sampleRss } from '../bench/load.js';
import { CLI } from './support/cli.js';
import { freePort, startProcess, waitForPort, type Proc } from './support/procs.js';
import { podWith, reviewFor } from './support/review.js';

const CONFIG = 'registries:\n  - {name: corp, match: ["registry.corp.example:5000"], upstream: "https://127.0.0.1:5000", auth: {mode: anonymous}}\n';

/** POSTs one AdmissionReview over a keep-alive connection; resolves with the status. */
function admit(agent: http.Agent, port: number, review: unknown): Promise<number> {
  const body = JSON.stringify(review);
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path: '/mutate', method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

describe('webhook process memory (the pullbridge webhook binary)', function () {
  this.timeout(120_000);
  let webhook: Proc;
  let port: number;
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

  before(async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-memory-'));
    writeFileSync(join(dir, 'config.yaml'), CONFIG);
    port = await freePort();
    // Audit records go to a pipe that startProcess drains, as a container runtime would.
    webhook = startProcess(process.execPath, [CLI, 'webhook', '--config', join(dir, 'config.yaml'), '--port', String(port), '--host', '127.0.0.1']);
    await waitForPort(port);
  });

  after(async () => {
    agent.destroy();
    await webhook?.stop();
  });

  it('keeps its resident set bounded while it admits Pods with large, unique image strings', async () => {
    const pid = webhook.child.pid ?? 0;
    const pod = (images: string[]) => podWith({ containers: images.map((image, i) => ({ name: `c${i}`, image })) }, { generateName: 'web-', namespace: 'shop' });
    // Warm-up: code compiled, buffers and pools allocated; then the baseline.
    for (let i = 0; i < 50; i++) assert.equal(await admit(agent, port, reviewFor(pod([`registry.corp.example:5000/team/app${i}:1`]), { namespace: 'shop' })), 200);
    const baselineMb = readRssMb(pid);

    // 400 admissions, each with a 256 KiB image string seen once (an invalid tag), next to an
    // ordinary image: 100 MiB of distinct strings in all, more than the process's whole baseline.
    const padding = 'x'.repeat(256 * 1024);
    const rss = sampleRss(pid, 100);
    for (let i = 0; i < 400; i++) {
      const status = await admit(agent, port, reviewFor(pod([`registry.corp.example:5000/team/app:${i}-${padding}`, `registry.corp.example:5000/team/app${i}:1`]), { namespace: 'shop' }));
      assert.equal(status, 200);
    }
    const samples = rss.stop();
    const peakMb = Math.max(...samples.map((s) => s.rssMb));
    const finalMb = samples.at(-1)?.rssMb ?? NaN;
    console.log(`      webhook RSS: baseline ${baselineMb.toFixed(1)} MiB, peak ${peakMb.toFixed(1)} MiB, after ${finalMb.toFixed(1)} MiB`);
    // What the process keeps of what it saw is bounded (the decision memo holds a few MiB at most);
    // the rest is per-request garbage. So the resident set may not double, however many unique
    // images arrive.
    assert.ok(peakMb < 2 * baselineMb, `RSS grew from ${baselineMb.toFixed(1)} MiB to a peak of ${peakMb.toFixed(1)} MiB`);
    // And it still answers.
    assert.equal(await admit(agent, port, reviewFor(pod(['registry.corp.example:5000/team/app:1']), { namespace: 'shop' })), 200);
  });
});
