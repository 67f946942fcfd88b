// A clean start raises no Unhealthy events: the probe port listens before the start work, and
// /startupz holds the startup probe until the component is up, so its first try succeeds.

import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { listen } from '../src/shell/serve.js';
import { listenGated, serveGated, StartupGate, STARTUP_MAX_HELD } from '../src/shell/startupgate.js';
import { startCli, type RunningCli } from './support/cli.js';
import { freePort } from './support/procs.js';

const get = async (url: string) => {
  const response = await fetch(url);
  return { status: response.status, body: await response.text() };
};

/** Connects until the port accepts (bounded), without sending anything: the probe's first try. */
async function firstAccept(port: number): Promise<void> {
  for (let i = 0; i < 2000; i++) {
    const accepted = await new Promise<boolean>((resolve) => {
      const socket = net.connect(port, '127.0.0.1');
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (accepted) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  assert.fail(`port ${port} never listened`);
}

describe('startup probe', function () {
  this.timeout(60_000);

  it('/startupz holds until the component is up, then answers from its readiness; other paths wait for the real handler', async () => {
    const gated = await listenGated({ host: '127.0.0.1', port: 0 });
    try {
      const held = get(`${gated.server.url}/startupz`);
      assert.deepEqual(await get(`${gated.server.url}/metrics`), { status: 503, body: 'starting\n' });
      let answered = false;
      void held.then(() => (answered = true));
      await get(`${gated.server.url}/metrics`); // a round trip later, the held request is still open
      assert.equal(answered, false, 'held while starting');
      serveGated(gated, (_req, res) => res.end('real handler'), () => true);
      assert.deepEqual(await held, { status: 200, body: 'ok\n' });
      assert.deepEqual(await get(`${gated.server.url}/metrics`), { status: 200, body: 'real handler' });
      assert.deepEqual(await get(`${gated.server.url}/startupz`), { status: 200, body: 'ok\n' });
    } finally {
      await gated.server.close();
    }
  });

  it('answers 503 when the hold ends before the component is up, and when it is up but not ready', async () => {
    const gate = new StartupGate(20);
    const server = await listen(gate.listener, { host: '127.0.0.1', port: 0 });
    try {
      assert.equal((await get(`${server.url}/startupz`)).status, 503);
      let ready = false;
      gate.open((_req, res) => res.end(), () => ready);
      assert.equal((await get(`${server.url}/startupz`)).status, 503);
      ready = true;
      assert.equal((await get(`${server.url}/startupz`)).status, 200);
    } finally {
      await server.close();
    }
  });

  it(`holds at most ${STARTUP_MAX_HELD} /startupz requests: one more is answered 503 at once, with its connection closed`, async () => {
    const gate = new StartupGate(60_000);
    let arrived = 0;
    let allHeld: () => void = () => undefined;
    const held = new Promise<void>((resolve) => (allHeld = resolve));
    const server = await listen(
      (req, res) => {
        if (++arrived === STARTUP_MAX_HELD) setImmediate(allHeld);
        gate.listener(req, res);
      },
      { host: '127.0.0.1', port: 0 },
    );
    try {
      const holding = Array.from({ length: STARTUP_MAX_HELD }, () => get(`${server.url}/startupz`));
      await held;
      const beyond = await new Promise<{ status: number; connection: string | undefined }>((resolve, reject) => {
        http.get(`${server.url}/startupz`, { agent: false }, (res) => {
          res.resume();
          resolve({ status: res.statusCode ?? 0, connection: res.headers.connection });
        }).on('error', reject);
      });
      assert.deepEqual(beyond, { status: 503, connection: 'close' });
      gate.open((_req, res) => res.end(), () => true);
      assert.deepEqual((await Promise.all(holding)).map((r) => r.status), Array.from({ length: STARTUP_MAX_HELD }, () => 200), 'the held ones are answered when the component is up');
    } finally {
      await server.close();
    }
  });

  for (const component of ['proxy', 'webhook'] as const) {
    it(`${component}: the first probe the port accepts is answered 200, not refused and not 503`, async () => {
      const dir = mkdtempSync(join(tmpdir(), 'pullbridge-startup-'));
      const config = join(dir, 'config.yaml');
      writeFileSync(config, component === 'proxy' ? `cache: {path: ${join(dir, 'cache')}}\nregistries: []\n` : 'registries: []\n');
      const [port, probePort] = [await freePort(), await freePort()];
      const args = component === 'proxy' ? ['proxy', '--config', config, '--port', String(port), '--host', '127.0.0.1', '--ops-port', String(probePort)] : ['webhook', '--config', config, '--port', String(port), '--host', '127.0.0.1', '--metrics-port', String(probePort)];
      const started = startCli(args, /listening/);
      let cli: RunningCli | undefined;
      try {
        await firstAccept(probePort);
        // Sent as soon as the port accepts, typically before the component is up: held, then 200.
        assert.deepEqual(await get(`http://127.0.0.1:${probePort}/startupz`), { status: 200, body: 'ok\n' });
        cli = await started;
        assert.match(cli.output(), component === 'proxy' ? /proxy listening/ : /webhook listening/);
      } finally {
        cli ??= await started.catch(() => undefined);
        cli?.child.kill('SIGTERM');
      }
    });
  }
});
