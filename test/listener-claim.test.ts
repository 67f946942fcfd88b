// The proxy's check that its registry listener on the node's loopback is answered by itself: with
// the hostNetwork exposure, a NodePort Service given the same port takes that address over under
// kube-proxy's iptables mode (measured on a real node in ./exposure-matrix.test.ts). Here no
// kube-proxy runs: the check is pointed at a stand-in that either relays to the proxy (no Service
// in the way) or answers as another registry (the DNAT to a Service's Pod), or is gone (a Service
// with no endpoints: refused).

import assert from 'node:assert/strict';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { askListener, INSTANCE_HEADER, judgeListener, listenerChange, type ListenerStatus } from '../src/proxy/listener.js';
import { runProxy } from '../src/proxy/run.js';
import { parseConfig } from '../src/rules/config.js';
import { listen } from '../src/shell/serve.js';
import { isLoopbackAddress } from '../src/upstream/addresses.js';
import { exitOf, startCli } from './support/cli.js';
import { memoryLogger } from './support/logs.js';
import { freePort } from './support/procs.js';

const HIJACK_MESSAGE = /^127\.0\.0\.1:\d+ is answered by something other than this proxy \(.*\): is a NodePort Service using port \d+\? kube-proxy in iptables mode sends loopback traffic for NodePorts to that Service\. Give that Service another nodePort, or set proxy\.port outside the NodePort range$/;

/** A TCP server on a port of its own; `handle` decides what each connection gets. */
async function tcpServer(handle: (socket: net.Socket) => void): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => undefined);
    handle(socket);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

describe('registry listener claim', function () {
  this.timeout(30_000);

  describe('judgement (pure)', () => {
    const id = 'a1b2';
    it('claimed only when the answer carries this process\'s instance id', () => {
      assert.deepEqual(judgeListener(id, { kind: 'answered', status: 401, instance: id, server: undefined }, false), { claimed: true, answeredBy: 'this proxy' });
      assert.deepEqual(judgeListener(id, { kind: 'answered', status: 200, instance: undefined, server: 'nginx/1.27' }, false), { claimed: false, answeredBy: 'HTTP 200, Server: nginx/1.27' });
      assert.deepEqual(judgeListener(id, { kind: 'answered', status: 401, instance: 'ffff', server: undefined }, false), { claimed: false, answeredBy: 'HTTP 401 from another pullbridge proxy (instance ffff)' });
      assert.deepEqual(judgeListener(id, { kind: 'refused' }, false), { claimed: false, answeredBy: 'connection refused' });
      assert.deepEqual(judgeListener(id, { kind: 'timeout', ms: 5000 }, false), { claimed: false, answeredBy: 'no answer within 5 s' });
      assert.deepEqual(judgeListener(id, { kind: 'not-http' }, false), { claimed: false, answeredBy: 'an answer that is not HTTP' });
    });

    it('a reset while this proxy\'s own connection limits are reached is no verdict (it may be its own listener closing the check)', () => {
      assert.deepEqual(judgeListener(id, { kind: 'reset' }, false), { claimed: false, answeredBy: 'connection reset' });
      assert.equal(judgeListener(id, { kind: 'reset' }, true), null);
    });

    it('whatever answered is shown bounded and printable', () => {
      const verdict = judgeListener(id, { kind: 'answered', status: 200, instance: undefined, server: `evil\u001b[31m${'x'.repeat(500)}` }, false);
      assert.ok(verdict);
      assert.ok(verdict.answeredBy.length < 120, verdict.answeredBy);
      assert.doesNotMatch(verdict.answeredBy, /\u001b/);
    });

    it('logs on a change of claim only: a first claimed check is quiet, a loss warns naming the likely cause, a recovery says so', () => {
      const at = (claimed: boolean | null, answeredBy: string | null): ListenerStatus => ({ address: '127.0.0.1:30500', claimed, answeredBy, lastCheck: claimed === null ? null : '2026-01-01T00:00:00.000Z' });
      assert.equal(listenerChange(at(null, null), at(true, 'this proxy'), 30500), null);
      const lost = listenerChange(at(true, 'this proxy'), at(false, 'HTTP 200, Server: nginx'), 30500);
      assert.equal(lost?.level, 'warn');
      assert.equal(
        lost?.message,
        '127.0.0.1:30500 is answered by something other than this proxy (HTTP 200, Server: nginx): is a NodePort Service using port 30500? kube-proxy in iptables mode sends loopback traffic for NodePorts to that Service. Give that Service another nodePort, or set proxy.port outside the NodePort range',
      );
      assert.equal(listenerChange(at(null, null), at(false, 'connection refused'), 30500)?.level, 'warn', 'lost from the start');
      assert.equal(listenerChange(at(false, 'connection refused'), at(false, 'HTTP 200'), 30500), null, 'still lost: no new line');
      assert.deepEqual(listenerChange(at(false, 'HTTP 200'), at(true, 'this proxy'), 30500), { level: 'info', message: '127.0.0.1:30500 is answered by this proxy again' });
    });

    it('loopback addresses', () => {
      for (const address of ['127.0.0.1', '127.1.2.3', '::1', '::ffff:127.0.0.1']) assert.ok(isLoopbackAddress(address), address);
      for (const address of ['0.0.0.0', '::', '10.0.0.1', 'localhost', '']) assert.ok(!isLoopbackAddress(address), address);
    });
  });

  describe('the HTTP ask (real sockets)', () => {
    it('asks /v2/ once on a new connection, without credentials, and does not follow a redirect', async () => {
      const seen: http.IncomingHttpHeaders[] = [];
      const paths: string[] = [];
      const server = await listen(
        (req, res) => {
          seen.push(req.headers);
          paths.push(req.url ?? '');
          res.writeHead(301, { location: '/elsewhere', server: 'redirector' }).end('moved');
        },
        { host: '127.0.0.1', port: 0 },
      );
      try {
        assert.deepEqual(await askListener('127.0.0.1', server.port, 5_000), { kind: 'answered', status: 301, instance: undefined, server: 'redirector' });
        assert.deepEqual(paths, ['/v2/']);
        assert.equal(seen[0]?.authorization, undefined);
        assert.equal(seen[0]?.connection, 'close');
      } finally {
        await server.close(100);
      }
    });

    it('a line that is not HTTP, a silent peer (bounded by the timeout), a closed port', async () => {
      const line = await tcpServer((socket) => socket.end('exposure matrix web\n'));
      const silent = await tcpServer(() => undefined);
      try {
        assert.deepEqual(await askListener('127.0.0.1', line.port, 5_000), { kind: 'not-http' });
        assert.deepEqual(await askListener('127.0.0.1', silent.port, 200), { kind: 'timeout', ms: 200 });
      } finally {
        await line.close();
        await silent.close();
      }
      assert.deepEqual(await askListener('127.0.0.1', line.port, 5_000), { kind: 'refused' });
    });

    it('the listener knows when a source is at its connection limit', async () => {
      const server = await listen((_req, res) => res.end('ok'), { host: '127.0.0.1', port: 0, maxConnectionsPerSource: 1 });
      const held = net.connect(server.port, '127.0.0.1');
      try {
        await new Promise<void>((resolve) => held.once('connect', () => resolve()));
        for (let i = 0; i < 100 && !server.full('127.0.0.1'); i++) await new Promise((r) => setTimeout(r, 10));
        assert.ok(server.full('127.0.0.1'));
        assert.ok(!server.full('127.0.0.2'));
      } finally {
        held.destroy();
        await server.close(100);
      }
    });
  });

  describe('the proxy on a loopback address', () => {
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-listener-'));
    const keyFile = join(dir, 'broker.key');
    writeFileSync(keyFile, 'a-broker-key-of-at-least-16-bytes\n');
    const configText = `broker: {keyFiles: [${keyFile}]}\nregistries:\n  - {name: corp, match: [registry.corp.example], upstream: "http://127.0.0.1:9"}\n`;

    it('is not ready, says who answers in /status, counts 0 and warns once while another party answers its address; recovers when it answers again', async () => {
      const parsed = parseConfig(configText);
      assert.ok(parsed.ok);
      // The stand-in for kube-proxy's DNAT: the check dials it instead of the proxy's own address.
      // `relay`: no Service in the way (connections go on to the proxy); `hijack`: a NodePort
      // Service's Pod answers instead (here a registry-like server of its own).
      const mode = { current: 'relay' as 'relay' | 'hijack', proxyPort: 0 };
      const hijacked: http.IncomingHttpHeaders[] = [];
      const foreign = http.createServer((req, res) => {
        hijacked.push(req.headers);
        res.writeHead(200, { server: 'stand-in-registry', 'content-type': 'application/json' }).end('{}');
      });
      const standIn = await tcpServer((socket) => {
        if (mode.current === 'hijack') foreign.emit('connection', socket);
        else socket.pipe(net.connect(mode.proxyPort, '127.0.0.1').on('error', () => socket.destroy())).pipe(socket);
      });
      const logs = memoryLogger();
      const proxy = await runProxy({ config: parsed.config, host: '127.0.0.1', port: 0, opsPort: 0, opsHost: '127.0.0.1', probeIntervalMs: 3_600_000, listenerCheckDial: { host: '127.0.0.1', port: standIn.port }, logger: logs.logger });
      mode.proxyPort = proxy.running.port;
      const opsUrl = proxy.ops?.url ?? '';
      const readyz = async () => (await fetch(`${opsUrl}/readyz`)).status;
      const listenerStatus = async () => ((await (await fetch(`${opsUrl}/status`)).json()) as { listener: ListenerStatus | null }).listener;
      const claimedMetric = async () => /^pullbridge_proxy_listener_claimed (\d+)$/m.exec(await (await fetch(`${opsUrl}/metrics`)).text())?.[1];
      const warnings = () => logs.records.filter((r) => typeof r['msg'] === 'string' && HIJACK_MESSAGE.test(r['msg']));
      const address = `127.0.0.1:${proxy.running.port}`;
      try {
        assert.ok(proxy.listener, 'on by default on a loopback address');
        // The first check runs at start (the prober's schedule); check() joins or repeats it.
        assert.equal((await proxy.listener.check()).claimed, true);
        assert.equal(await readyz(), 200);
        assert.equal(await claimedMetric(), '1');
        assert.deepEqual({ ...(await listenerStatus()), lastCheck: null }, { address, claimed: true, answeredBy: 'this proxy', lastCheck: null });
        assert.equal(warnings().length, 0);
        // The check's own /v2/ (a 401 without credentials) is no access to log: debug level only.
        const baseAccesses = () => logs.records.filter((r) => r['access'] === 'pull' && r['kind'] === 'base');
        assert.ok(baseAccesses().length > 0 && baseAccesses().every((r) => r['level'] === 20 && r['status'] === 401), JSON.stringify(baseAccesses()));
        await (await fetch(`http://127.0.0.1:${proxy.running.port}/v2/`)).arrayBuffer();
        for (let i = 0; i < 100 && !baseAccesses().some((r) => r['level'] === 30); i++) await new Promise((r) => setTimeout(r, 20));
        assert.equal(baseAccesses().filter((r) => r['level'] === 30).length, 1, "a client's /v2/ is logged as before");

        mode.current = 'hijack';
        await proxy.listener.check();
        assert.equal(await readyz(), 503);
        assert.equal(await claimedMetric(), '0');
        const lost = await listenerStatus();
        assert.deepEqual({ ...lost, lastCheck: null }, { address, claimed: false, answeredBy: 'HTTP 200, Server: stand-in-registry', lastCheck: null });
        assert.ok(lost && lost.lastCheck !== null && !Number.isNaN(Date.parse(lost.lastCheck)));
        assert.equal(hijacked[0]?.authorization, undefined, 'the check sends no credentials');
        await proxy.listener.check();
        assert.equal(warnings().length, 1, 'one line per change, not per check');
        assert.match(String(warnings()[0]?.['msg']), new RegExp(`^${address.replaceAll('.', '\\.')} is answered .*port ${proxy.running.port}\\?`));
        assert.equal(warnings()[0]?.['level'], 40);

        mode.current = 'relay';
        await proxy.listener.check();
        assert.equal(await readyz(), 200);
        assert.equal(await claimedMetric(), '1');
        assert.equal((await listenerStatus())?.claimed, true);
        assert.equal(logs.records.filter((r) => r['msg'] === `${address} is answered by this proxy again`).length, 1);

        // A NodePort Service without endpoints: kube-proxy rejects, the connection is refused.
        await standIn.close();
        await proxy.listener.check();
        assert.equal(await readyz(), 503);
        assert.equal((await listenerStatus())?.answeredBy, 'connection refused');
        assert.equal(warnings().length, 2);
      } finally {
        await proxy.shutdown();
        await standIn.close();
      }
    });

    it('the command: checks by default on a loopback --host and answers it with its instance id (random hex, nothing else)', async () => {
      const file = join(dir, 'config.yaml');
      writeFileSync(file, configText);
      const [port, opsPort] = [await freePort(), await freePort()];
      const { child } = await startCli(['proxy', '--config', file, '--port', String(port), '--host', '127.0.0.1', '--ops-port', String(opsPort), '--probe-interval', '3600'], /proxy listening/);
      try {
        const [url, opsUrl] = [`http://127.0.0.1:${port}`, `http://127.0.0.1:${opsPort}`];
        const base = await fetch(`${url}/v2/`);
        assert.match(base.headers.get(INSTANCE_HEADER) ?? '', /^[0-9a-f]{32}$/);
        let listener: ListenerStatus | null = null;
        for (let i = 0; i < 100 && listener?.claimed !== true; i++, await new Promise((r) => setTimeout(r, 50))) listener = ((await (await fetch(`${opsUrl}/status`)).json()) as { listener: ListenerStatus | null }).listener;
        assert.equal(listener?.claimed, true, JSON.stringify(listener));
        assert.equal(listener?.address, `127.0.0.1:${port}`);
        assert.equal((await fetch(`${opsUrl}/readyz`)).status, 200);
      } finally {
        child.kill('SIGTERM');
        await exitOf(child);
      }
    });
  });
});
