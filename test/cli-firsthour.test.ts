// The CLI as a newcomer meets it in the first hour: an executable binary after the build, --help on
// every command, keygen, validate that checks what the proxy will check, proxy on the config's port,
// and one line (not a stack trace) for a taken port or a missing TLS file.

import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLI, exitOf, runCli, startCli } from './support/cli.js';
import { freePort } from './support/procs.js';

function takePort(): Promise<{ port: number; server: Server }> {
  const server = createServer();
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ port: (server.address() as { port: number }).port, server })));
}

const NO_STACK = /\n\s+at /;

describe('pullbridge CLI, the first hour', function () {
  this.timeout(120_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-firsthour-'));
  after(() => rmSync(dir, { recursive: true, force: true }));
  const keyFile = join(dir, 'broker.key');
  writeFileSync(keyFile, 'a-broker-key-of-at-least-16-bytes\n', { mode: 0o600 });
  const write = (name: string, text: string) => {
    const file = join(dir, name);
    writeFileSync(file, text);
    return file;
  };
  const config = (port = 30500) => write(`config-${port}.yaml`, `proxy: {host: 127.0.0.1, port: ${port}}\nbroker: {keyFiles: [${keyFile}]}\nregistries:\n  - {name: corp, match: [registry.corp.example], upstream: "http://127.0.0.1:1"}\n`);

  it('the built binary is executable (npx pullbridge after a rebuild)', () => {
    assert.notEqual(statSync(CLI).mode & 0o111, 0, `${CLI} has no execute bit: package.json "build" must chmod it`);
  });

  it('every command answers --help and -h with its own usage, exit 0', () => {
    const overall = runCli(['--help']);
    assert.equal(overall.status, 0);
    const commands = [...overall.stdout.matchAll(/^ {2}pullbridge ([a-z-]+) /gm)].map((m) => m[1] ?? '').filter((c) => c !== 'COMMAND');
    assert.ok(commands.length >= 13, commands.join(' '));
    for (const command of ['keygen', 'sample-registry', 'demo', 'proxy', 'webhook', 'validate']) assert.ok(commands.includes(command), command);
    for (const command of commands) {
      for (const flag of ['--help', '-h']) {
        const result = runCli([command, flag]);
        assert.equal(result.status, 0, `${command} ${flag}: ${result.stderr}`);
        assert.ok(result.stdout.startsWith(`Usage:\n  pullbridge ${command} `), `${command} ${flag}: ${result.stdout}`);
        assert.equal(result.stderr, '');
      }
    }
  });

  it('keygen writes a usable broker key with mode 0600, never over an existing file; without --out prints one; --help names the openssl line', () => {
    const out = join(dir, 'new.key');
    const result = runCli(['keygen', '--out', out]);
    assert.equal(result.status, 0, result.stderr);
    const key = readFileSync(out, 'utf8');
    assert.match(key, /^[0-9a-f]{64}\n$/);
    assert.equal(statSync(out).mode & 0o777, 0o600);
    const again = runCli(['keygen', '--out', out]);
    assert.equal(again.status, 1);
    assert.equal(again.stderr, `pullbridge keygen: --out ${out}: already exists; not overwriting a key (remove it first, or rotate with a second keyFiles entry)\n`);
    assert.equal(readFileSync(out, 'utf8'), key, 'the existing key is untouched');
    const printed = runCli(['keygen']);
    assert.match(printed.stdout, /^[0-9a-f]{64}\n$/);
    assert.notEqual(printed.stdout, key);
    assert.match(runCli(['keygen', '--help']).stdout, /openssl rand -hex 32/);
    // The key is what broker.keyFiles takes: pull-secret signs with it.
    const withKey = write('keygen.yaml', `broker: {keyFiles: [${out}]}\nregistries: []\n`);
    assert.equal(runCli(['pull-secret', '--config', withKey, '--namespace', 'shop']).status, 0);
  });

  it('validate fails naming the key and the file when a file the config names is missing', () => {
    const file = write('missing-key.yaml', `broker: {keyFiles: [${join(dir, 'absent.key')}]}\nregistries:\n  - {name: a, match: [r.example], upstream: "http://127.0.0.1:1", credentials: {username: u, passwordFile: ${join(dir, 'absent.pw')}}}\n`);
    const result = runCli(['validate', '--config', file]);
    assert.equal(result.status, 1);
    assert.ok(result.stderr.includes(`broker.keyFiles[0]: cannot read secret file ${join(dir, 'absent.key')}: no such file`), result.stderr);
    assert.ok(result.stderr.includes(`registries[0].credentials.passwordFile: cannot read secret file ${join(dir, 'absent.pw')}: no such file`), result.stderr);
    assert.doesNotMatch(result.stdout, /valid/);
  });

  it('validate warns (exit 0, stderr) about rules that can never match, and suggests the key meant', () => {
    const file = write('shadowed.yaml', `broker: {keyFiles: [${keyFile}]}\nregistries:\n  - {name: a, match: [r.example], upstream: "http://127.0.0.1:1"}\n  - {name: b, match: [r.example], upstream: "http://127.0.0.1:2"}\n  - {name: c, match: [s.example], upstream: "http://127.0.0.1:3", repositories: {include: ["Apps/*"]}}\n`);
    const result = runCli(['validate', '--config', file]);
    assert.equal(result.status, 0, result.stderr);
    assert.match(result.stdout, /valid, 3 registry rule\(s\)/);
    assert.match(result.stderr, /^warning: registries\[1\]: rule "b" can never match: registries\[0\] \(a\) comes first/m);
    assert.match(result.stderr, /^warning: registries\[2\]\.repositories\.include\[0\]: "Apps\/\*" can never match/m);
    const misspelt = write('misspelt.yaml', `broker: {keyFiles: [${keyFile}]}\nregistries:\n  - {name: a, match: [r.example], url: "http://127.0.0.1:1"}\n`);
    const bad = runCli(['validate', '--config', misspelt]);
    assert.equal(bad.status, 1);
    assert.match(bad.stderr, /^registries\[0\]\.url: unknown key; did you mean upstream\?$/m);
  });

  it('proxy listens on the config proxy.port without --port', async () => {
    const port = await freePort();
    const proxy = await startCli(['proxy', '--config', config(port), '--host', '127.0.0.1'], /proxy listening/);
    try {
      const res = await fetch(`http://127.0.0.1:${port}/v2/`);
      assert.equal(res.status, 401, 'the registry API answers there (asking for the namespace credential)');
    } finally {
      proxy.child.kill('SIGTERM');
      await exitOf(proxy.child);
    }
  });

  it('proxy and webhook /metrics carry the process metrics under their standard names (process_*, nodejs_*)', async () => {
    const [port, opsPort, webhookPort] = [await freePort(), await freePort(), await freePort()];
    const proxy = await startCli(['proxy', '--config', config(port), '--host', '127.0.0.1', '--ops-port', String(opsPort)], /proxy listening/);
    const webhook = await startCli(['webhook', '--config', config(), '--host', '127.0.0.1', '--port', String(webhookPort)], /webhook listening/);
    try {
      for (const url of [`http://127.0.0.1:${opsPort}/metrics`, `http://127.0.0.1:${webhookPort}/metrics`]) {
        const text = await (await fetch(url)).text();
        for (const name of ['process_resident_memory_bytes', 'process_cpu_seconds_total', 'process_open_fds', 'nodejs_heap_size_used_bytes', 'nodejs_eventloop_lag_seconds']) {
          assert.match(text, new RegExp(`^${name} `, 'm'), `${url}: ${name}`);
        }
        assert.doesNotMatch(text, /^pullbridge_(process|nodejs)_/m, url);
        assert.match(text, /^pullbridge_/m, `${url}: its own metrics keep their prefix`);
      }
    } finally {
      proxy.child.kill('SIGTERM');
      webhook.child.kill('SIGTERM');
      await Promise.all([exitOf(proxy.child), exitOf(webhook.child)]);
    }
  });

  it('a taken port is one line naming the flag and a non-zero exit: proxy (both ports), webhook, sample-registry', async () => {
    const { port, server } = await takePort();
    try {
      const free = await freePort();
      const cases: Array<[string[], string]> = [
        [['proxy', '--config', config(port), '--host', '127.0.0.1', '--port', String(port)], `pullbridge proxy: --port ${port}: address already in use\n`],
        [['proxy', '--config', config(free), '--host', '127.0.0.1', '--ops-port', String(port)], `pullbridge proxy: --ops-port ${port}: address already in use\n`],
        [['webhook', '--config', config(), '--host', '127.0.0.1', '--port', String(port)], `pullbridge webhook: --port ${port}: address already in use\n`],
        [['webhook', '--config', config(), '--host', '127.0.0.1', '--port', String(free), '--metrics-port', String(port)], `pullbridge webhook: --metrics-port ${port}: address already in use\n`],
        [['sample-registry', '--port', String(port)], `pullbridge sample-registry: --port ${port}: address already in use\n`],
      ];
      for (const [args, line] of cases) {
        const result = runCli(args);
        assert.equal(result.status, 1, `${args.join(' ')}: ${result.stderr}`);
        assert.ok(result.stderr.endsWith(line), `${args.join(' ')}:\n${result.stderr}`);
        assert.doesNotMatch(result.stderr, NO_STACK);
      }
    } finally {
      server.close();
    }
  });

  /** A serving certificate and its key, made by the CLI itself (once). */
  let made: { cert: string; key: string; caKey: string } | undefined;
  const certs = () => {
    if (made) return made;
    const out = join(dir, 'certs');
    const result = runCli(['certs', '--service', 'pullbridge-webhook', '--namespace', 'pullbridge', '--out', out]);
    assert.equal(result.status, 0, result.stderr);
    made = { cert: join(out, 'tls.crt'), key: join(out, 'tls.key'), caKey: join(out, 'ca.key') };
    return made;
  };

  it('webhook: a missing --kubeconfig, a non-PEM --tls-cert or --tls-key, a key not the certificate\'s, swapped files: one line naming the flags, exit 1', () => {
    const tls = certs();
    const notPem = write('not.pem', 'hello\n');
    const webhook = (...extra: string[]) => runCli(['webhook', '--config', config(), '--port', '0', '--host', '127.0.0.1', ...extra]);
    const cases: Array<[string[], string]> = [
      [['--kubeconfig', join(dir, 'absent-kubeconfig')], `--kubeconfig ${join(dir, 'absent-kubeconfig')}: no such file`],
      [['--kubeconfig', dir], `--kubeconfig ${dir}: is a directory`],
      [['--tls-cert', notPem, '--tls-key', tls.key], `--tls-cert ${notPem}: not a PEM certificate`],
      [['--tls-cert', tls.cert, '--tls-key', notPem], `--tls-key ${notPem}: not a PEM private key`],
      [['--tls-cert', tls.cert, '--tls-key', tls.caKey], `--tls-key ${tls.caKey}: does not match --tls-cert ${tls.cert}`],
      [['--tls-cert', tls.key, '--tls-key', tls.cert], `--tls-cert ${tls.key}: not a PEM certificate`],
    ];
    for (const [args, line] of cases) {
      const result = webhook(...args);
      assert.equal(result.status, 1, `${args.join(' ')}: ${result.stderr}`);
      assert.equal(result.stderr, `pullbridge webhook: ${line}\n`);
    }
  });

  it('status without any kubeconfig says so and names --kubeconfig (not localhost:8080)', () => {
    const home = mkdtempSync(join(tmpdir(), 'pullbridge-home-'));
    try {
      const result = runCli(['status'], { HOME: home, KUBECONFIG: '', KUBERNETES_SERVICE_HOST: '' });
      assert.equal(result.status, 1);
      assert.equal(result.stderr, 'pullbridge status: no kubeconfig found (KUBECONFIG is not set, there is no ~/.kube/config, and this is not a Pod): pass --kubeconfig FILE\n');
    } finally {
      rmSync(home, { recursive: true, force: true });
    }
  });

  it('listen errors name the flag the user sets: --host for an address not on this host; the config file for its proxy.port', async () => {
    // 192.0.2.1 (TEST-NET-1, RFC 5737) is on no interface here: binding it fails locally, no packet is sent.
    const notHere = runCli(['proxy', '--config', config(await freePort()), '--host', '192.0.2.1']);
    assert.equal(notHere.status, 1, notHere.stderr);
    assert.ok(notHere.stderr.endsWith('pullbridge proxy: --host 192.0.2.1: address not available on this host\n'), notHere.stderr);
    const { port, server } = await takePort();
    try {
      const file = config(port);
      const busy = runCli(['proxy', '--config', file, '--host', '127.0.0.1']);
      assert.equal(busy.status, 1, busy.stderr);
      assert.ok(busy.stderr.endsWith(`pullbridge proxy: proxy.port ${port} from ${file} (override with --port): address already in use\n`), busy.stderr);
    } finally {
      server.close();
    }
  });

  it('a usage error prints the command\'s own usage, not every command\'s; --version prints the package version', () => {
    const result = runCli(['validate', '--confg', 'x.yaml']);
    assert.equal(result.status, 2);
    assert.match(result.stderr, /^pullbridge validate: Unknown option '--confg'/);
    assert.match(result.stderr, /\nUsage:\n {2}pullbridge validate --config FILE/);
    assert.doesNotMatch(result.stderr, /pullbridge (proxy|webhook|keygen) /);
    const unknown = runCli(['valdate']);
    assert.equal(unknown.status, 2);
    assert.match(unknown.stderr, /pullbridge proxy /, 'an unknown command lists them all');
    const version = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
    for (const flag of ['--version', '-V']) {
      const printed = runCli([flag]);
      assert.equal(printed.status, 0);
      assert.equal(printed.stdout, `pullbridge ${version.version}\n`);
    }
  });

  it('file and YAML problems are one line in words: no such file, is a directory, line and column; proxy suggests the key meant, as validate does', () => {
    const keygen = runCli(['keygen', '--out', join(dir, 'absent-dir', 'k')]);
    assert.equal(keygen.status, 1);
    assert.equal(keygen.stderr, `pullbridge keygen: --out ${join(dir, 'absent-dir', 'k')}: no such file\n`);
    const directory = runCli(['validate', '--config', dir]);
    assert.equal(directory.status, 1);
    assert.equal(directory.stderr, `${dir}: 1 error(s)\n(file): cannot read ${dir}: is a directory\n`);
    const broken = write('broken.yaml', 'registries: [\n  - {name: a\nproxy: {port: 1}\n');
    const yaml = runCli(['validate', '--config', broken]);
    assert.equal(yaml.status, 1);
    const lines = yaml.stderr.trimEnd().split('\n');
    assert.equal(lines.length, 2, yaml.stderr);
    assert.match(lines[1] ?? '', /^\(document\): not valid YAML: .* at line \d+, column \d+$/);
    const missing = write('absent-secret.yaml', `broker: {keyFiles: [${join(dir, 'absent.key')}]}\nregistries: []\n`);
    assert.match(runCli(['validate', '--config', missing]).stderr, /cannot read secret file .*absent\.key: no such file$/m);
    const misspelt = write('misspelt-proxy.yaml', `broker: {keyFiles: [${keyFile}]}\nregistries:\n  - {name: a, match: [r.example], url: "http://127.0.0.1:1"}\n`);
    for (const command of ['proxy', 'webhook']) {
      const result = runCli([command, '--config', misspelt, '--port', '0', '--host', '127.0.0.1']);
      assert.equal(result.status, 1);
      assert.match(result.stderr, /^registries\[0\]\.url: unknown key; did you mean upstream\?$/m, `${command}: ${result.stderr}`);
    }
  });

  it('an empty config: validate and proxy warn that no rule will rewrite anything', async () => {
    const empty = write('empty.yaml', '');
    const validate = runCli(['validate', '--config', empty]);
    assert.equal(validate.status, 0, validate.stderr);
    assert.match(validate.stderr, /^warning: registries: no registry rules: no image is rewritten/m);
    const proxy = await startCli(['proxy', '--config', empty, '--host', '127.0.0.1', '--port', '0'], /proxy listening/);
    try {
      assert.match(proxy.output(), /^warning: registries: no registry rules: no image is rewritten/m);
    } finally {
      proxy.child.kill('SIGTERM');
      await exitOf(proxy.child);
    }
  });

  it('help: certs, client-cert and warm say what they do; proxy says --host defaults to 0.0.0.0, reachable from the network', () => {
    for (const command of ['certs', 'client-cert', 'warm']) {
      const usage = runCli([command, '--help']).stdout;
      assert.match(usage, /\n {21}\(\S/, `${command} has a description line: ${usage}`);
    }
    assert.match(runCli(['proxy', '--help']).stdout, /--host defaults to 0\.0\.0\.0[^)]*reachable from the network/);
  });

  it('a missing TLS file is one line naming the flag and the file', () => {
    const cert = join(dir, 'absent.crt');
    const result = runCli(['webhook', '--config', config(), '--port', '0', '--host', '127.0.0.1', '--tls-cert', cert, '--tls-key', keyFile]);
    assert.equal(result.status, 1);
    assert.equal(result.stderr, `pullbridge webhook: --tls-cert ${cert}: no such file\n`);
    const tls = certs();
    const ca = runCli(['webhook', '--config', config(), '--port', '0', '--host', '127.0.0.1', '--tls-cert', tls.cert, '--tls-key', tls.key, '--client-ca', cert]);
    assert.equal(ca.stderr, `pullbridge webhook: --client-ca ${cert}: no such file\n`);
  });
});
