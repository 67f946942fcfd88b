// `pullbridge demo` (npm start) as a newcomer meets it: every printed step is run exactly as printed
// (sh -c, from a directory outside the repository), offline, and does what it says. And the
// temporary directory holding its broker key is gone after SIGTERM, SIGHUP and a failed start.

import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { demoSteps, formatDemoSteps, parseDemoCommands } from '../src/demo/demosteps.js';
import { describeListenError } from '../src/shell/listenerrors.js';
import { buildSampleImage } from '../src/demo/sampleimage.js';
import { CLI, exitOf, runCli, startCli } from './support/cli.js';
import { freePort } from './support/procs.js';

const READY = /Ctrl-C stops the demo/;
/** Where the printed commands run: a directory that is not the repository (no node_modules, no package.json). */
const ELSEWHERE = mkdtempSync(join(tmpdir(), 'pullbridge-demo-elsewhere-'));

/** Runs a printed command as printed (sh -c), in the network namespace `netnsOf` is in. */
function sh(command: string, env: NodeJS.ProcessEnv, netnsOf: number): { status: number | null; output: string } {
  const result = spawnSync('nsenter', [`--net=/proc/${netnsOf}/ns/net`, '--', 'sh', '-c', command], { cwd: ELSEWHERE, encoding: 'utf8', timeout: 60_000, env: { ...process.env, ...env } });
  return { status: result.status, output: `${result.stdout}${result.stderr}` };
}

/** `pullbridge demo` in a network namespace of its own with only its loopback up: no DNS, no route
 * anywhere. unshare and sh exec, so the child's pid is the demo's. */
function startOfflineDemo(args: string[], env: NodeJS.ProcessEnv): Promise<{ child: ChildProcess; output: () => string }> {
  const child = spawn('unshare', ['--net', '--', 'sh', '-c', 'ip link set lo up && exec "$@"', 'sh', process.execPath, CLI, 'demo', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let output = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the demo did not get ready:\n${output}`)), 60_000);
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      if (READY.test(output)) {
        clearTimeout(timer);
        resolve({ child, output: () => output });
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`the demo exited with ${code}:\n${output}`));
    });
  });
}

/** Whether a process is gone, asked a bounded number of times. */
async function gone(pid: number): Promise<boolean> {
  for (let i = 0; i < 100; i++) {
    try {
      process.kill(pid, 0);
    } catch {
      return true;
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return false;
}

/** Processes whose environment names `tmp` (the demo and its children get TMPDIR=tmp); waits a bounded time for them to end. */
async function processesWith(tmp: string): Promise<number[]> {
  const find = () =>
    readdirSync('/proc')
      .filter((entry) => /^\d+$/.test(entry))
      .filter((pid) => {
        try {
          return readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').includes(`TMPDIR=${tmp}`);
        } catch {
          return false;
        }
      })
      .map(Number);
  for (let i = 0; i < 100; i++) {
    if (find().length === 0) return [];
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return find();
}

describe('pullbridge demo (npm start)', function () {
  this.timeout(180_000);
  // The demo's own temporary directories go here (TMPDIR), so the test sees exactly what it leaves.
  const tmp = mkdtempSync(join(tmpdir(), 'pullbridge-demo-test-'));
  const env = { TMPDIR: tmp };
  after(() => {
    rmSync(tmp, { recursive: true, force: true });
    rmSync(ELSEWHERE, { recursive: true, force: true });
  });

  it('its steps are data: printed and read back to the same commands, in the order of the walk-through', () => {
    const steps = demoSteps({
      cli: 'node /opt/pullbridge/dist/src/cli.js',
      dir: '/tmp/d',
      configFile: '/tmp/d/config.yaml',
      caFile: '/tmp/d/ca.crt',
      reviewFile: '/tmp/d/review.json',
      webhookUrl: 'https://127.0.0.1:8443',
      proxyAuthority: 'localhost:30500',
      image: 'registry.corp.example:5000/demo/hello:1.0',
      rewrittenImage: 'localhost:30500/corp/demo/hello:1.0',
      namespace: 'default',
      token: 'pb1.x',
      upstreamPid: 4242,
    });
    assert.deepEqual(parseDemoCommands(formatDemoSteps(steps)), steps.map((s) => s.command));
    assert.deepEqual(
      steps.map((s) => s.command.split(' ')[0]),
      ['curl', 'node', 'node', 'skopeo', 'kill', 'skopeo'],
    );
    assert.equal(steps[4]?.command, 'kill 4242');
    assert.ok(steps.every((s) => !s.command.includes('registry.corp.example') || s.command.startsWith('node /opt/pullbridge/dist/src/cli.js rewrite')), 'only the rewrite names the on-prem registry, as a string');
  });

  it('names the flag of a port that cannot be listened on', () => {
    const inUse = Object.assign(new Error('listen EADDRINUSE'), { code: 'EADDRINUSE', syscall: 'listen', port: 30500 });
    assert.equal(describeListenError(inUse, { '--port': 8443, '--proxy-port': 30500 }), '--proxy-port 30500: address already in use');
    assert.equal(describeListenError(inUse, {}), 'port 30500: address already in use');
    assert.equal(describeListenError(inUse, { '--port': { port: 30500, described: 'proxy.port 30500 from c.yaml (override with --port)' } }), 'proxy.port 30500 from c.yaml (override with --port): address already in use');
    const notHere = Object.assign(new Error('listen EADDRNOTAVAIL'), { code: 'EADDRNOTAVAIL', syscall: 'listen', address: '10.9.9.9', port: 30600 });
    assert.equal(describeListenError(notHere, { '--port': 30600 }, { '--host': '10.9.9.9' }), '--host 10.9.9.9: address not available on this host');
    assert.equal(describeListenError(new Error('other'), { '--port': 1 }), null);
    assert.equal(describeListenError(Object.assign(new Error('x'), { code: 'ECONNREFUSED', syscall: 'connect', port: 1 }), { '--port': 1 }), null);
  });

  it('prints steps that each work exactly as printed, offline (a network namespace with only loopback); the pull after killing the upstream comes from the cache; SIGTERM removes its directory', async () => {
    const [port, proxyPort] = [await freePort(), await freePort()];
    const demo = await startOfflineDemo(['--port', String(port), '--proxy-port', String(proxyPort)], env);
    const netns = demo.child.pid ?? 0;
    try {
      const printed = demo.output();
      const commands = parseDemoCommands(printed);
      assert.equal(commands.length, 6, printed);
      const [admission = '', rewrite = '', pullSecret = '', pull = '', kill = '', pullAgain = ''] = commands;
      // The CLI by its absolute path (npx elsewhere would ask the npm registry for a package of that name).
      assert.ok(rewrite.startsWith(`node ${CLI} rewrite `), rewrite);
      assert.ok(pullSecret.startsWith(`node ${CLI} pull-secret `), pullSecret);
      assert.ok(!commands.some((c) => c.includes('npx')), printed);
      // The terminal shows the banner and steps; the components' JSON logs go to a file in its directory.
      assert.doesNotMatch(printed, /^\{"level"/m, printed);
      const logFile = /^Logs \(JSON, the webhook's and the proxy's\): (\S+)$/m.exec(printed)?.[1] ?? '';
      assert.ok(logFile.startsWith(tmp) && existsSync(logFile), printed);
      const [dir] = readdirSync(tmp);
      assert.ok(dir?.startsWith('pullbridge-demo-'), `its directory is under TMPDIR: ${String(dir)}`);
      const rewritten = `localhost:${proxyPort}/corp/demo/hello:1.0`;
      const image = buildSampleImage();

      // 1. the webhook's patch rewrites the on-prem image and adds the pull secret.
      const step1 = sh(admission, env, netns);
      assert.equal(step1.status, 0, step1.output);
      assert.match(step1.output, /allowed: true/);
      assert.ok(step1.output.includes(`"value": "${rewritten}"`), step1.output);
      assert.match(step1.output, /"name": "pullbridge-pull"/);

      // 2. the same decision from the CLI.
      const step2 = sh(rewrite, env, netns);
      assert.equal(step2.status, 0, step2.output);
      assert.ok(step2.output.includes(`registry.corp.example:5000/demo/hello:1.0 -> ${rewritten}  [rewritten, rule corp]`), step2.output);

      // 3. the namespace credential, which step 4 pulls with.
      const step3 = sh(pullSecret, env, netns);
      assert.equal(step3.status, 0, step3.output);
      const secret = JSON.parse(step3.output) as { auths: Record<string, { username: string; password: string }> };
      const credential = secret.auths[`localhost:${proxyPort}`];
      assert.equal(credential?.username, 'default');
      assert.ok(pull.includes(`--src-creds default:${credential.password} `), 'the pull uses the printed credential');

      // 4. a pull through the proxy: the sample image's digest and blobs.
      const step4 = sh(pull, env, netns);
      assert.equal(step4.status, 0, step4.output);
      assert.ok(step4.output.includes(`digest: ${image.manifest.digest}`), step4.output);
      assert.ok(step4.output.includes(`Copying blob ${image.layer.digest}`), step4.output);

      // The config it wrote is valid with its files, and its status is on the operations port only.
      const configFile = /--config (\S+)/.exec(rewrite)?.[1] ?? '';
      const validated = runCli(['validate', '--config', configFile]);
      assert.equal(validated.status, 0, validated.stderr);
      assert.equal(validated.stderr, '', 'no warnings on the demo config');
      const opsUrl = /operations: (http:\/\/127\.0\.0\.1:\d+)\/status/.exec(printed)?.[1];
      assert.ok(opsUrl, printed);
      assert.equal(sh(`curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:${proxyPort}/status`, env, netns).output, '404');
      const status = JSON.parse(sh(`curl -s ${opsUrl}/status`, env, netns).output) as { configLoaded: boolean; rules: string[] };
      assert.deepEqual([status.configLoaded, status.rules], [true, ['corp']]);

      // 5. the upstream goes away.
      const upstreamPid = Number(/^kill (\d+)$/.exec(kill)?.[1]);
      assert.ok(upstreamPid > 0, kill);
      const step5 = sh(kill, env, netns);
      assert.equal(step5.status, 0, step5.output);
      assert.ok(await gone(upstreamPid), 'the sample registry stopped');

      // 6. the same image again, from the node cache.
      const step6 = sh(pullAgain, env, netns);
      assert.equal(step6.status, 0, step6.output);
      assert.ok(step6.output.includes(`digest: ${image.manifest.digest}`), step6.output);
      assert.ok(step6.output.includes(`Copying blob ${image.layer.digest}`), step6.output);

      // The pulls went to the log file, not to the terminal.
      const logged = readFileSync(logFile, 'utf8').trim().split('\n').map((line) => JSON.parse(line) as Record<string, unknown>);
      assert.ok(logged.some((r) => r['access'] === 'pull' && r['kind'] === 'manifest' && r['status'] === 200), 'the pulls are in the log file');
      assert.ok(logged.some((r) => r['name'] === 'pullbridge-webhook'), 'the webhook logs there too');
      assert.doesNotMatch(demo.output(), /^\{"level"/m);

      demo.child.kill('SIGTERM');
      assert.equal(await exitOf(demo.child), 0);
      assert.deepEqual(readdirSync(tmp), [], 'the directory with the broker key is removed');
    } finally {
      demo.child.kill('SIGKILL');
    }
  });

  it('a failed start (the proxy port taken) says which flag in one line, exits 1, and leaves no directory and no sample registry behind', async () => {
    // A taken port whose neighbour (the demo's operations port, +1) is free: else the message names that one.
    const listenOn = (server: Server, port: number) =>
      new Promise<number | null>((resolve) => {
        server.once('error', () => resolve(null));
        server.listen(port, '127.0.0.1', () => resolve((server.address() as { port: number }).port));
      });
    let taken: Server = createServer();
    let proxyPort = 0;
    for (let tries = 0; tries < 20; tries++) {
      proxyPort = (await listenOn(taken, 0)) ?? 0;
      const neighbour = createServer();
      const free = (await listenOn(neighbour, proxyPort + 1)) !== null;
      await new Promise((resolve) => (free ? neighbour.close(resolve) : resolve(undefined)));
      if (free) break;
      await new Promise((resolve) => taken.close(resolve));
      taken = createServer();
    }
    try {
      const port = await freePort();
      const result = runCli(['demo', '--port', String(port), '--proxy-port', String(proxyPort)], env);
      assert.equal(result.status, 1, result.stderr);
      assert.ok(result.stderr.includes(`pullbridge demo: --proxy-port ${proxyPort}: address already in use\n`), result.stderr);
      assert.doesNotMatch(result.stderr, /\n\s+at /, 'no stack trace');
      assert.deepEqual(readdirSync(tmp), []);
      assert.deepEqual(await processesWith(tmp), [], 'no process of the demo (the sample registry) is left running');
    } finally {
      taken.close();
    }
  });

  it('SIGHUP (its terminal closed) stops it like SIGTERM: exit 0, its directory and the sample registry gone', async () => {
    const [port, proxyPort] = [await freePort(), await freePort()];
    const demo = await startCli(['demo', '--port', String(port), '--proxy-port', String(proxyPort)], READY, 60_000, env);
    assert.equal(readdirSync(tmp).length, 1);
    demo.child.kill('SIGHUP');
    assert.equal(await exitOf(demo.child), 0);
    assert.deepEqual(readdirSync(tmp), []);
    assert.deepEqual(await processesWith(tmp), []);
  });

  it('SIGTERM while it is still starting removes its directory too', async () => {
    const [port, proxyPort] = [await freePort(), await freePort()];
    // The registry child is started first; by its line the directory exists and the demo is mid-start.
    const demo = await startCli(['demo', '--port', String(port), '--proxy-port', String(proxyPort)], /./, 60_000, env).catch(() => undefined);
    if (demo) {
      demo.child.kill('SIGTERM');
      await exitOf(demo.child);
    }
    assert.deepEqual(readdirSync(tmp), []);
    assert.deepEqual(await processesWith(tmp), []);
  });
});
