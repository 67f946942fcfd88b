// `pullbridge proxy` and `pullbridge pull-secret` as a user runs them: the credential printed by
// pull-secret is what containerd pulls with through the proxy process.

import assert from 'node:assert/strict';
import { mkdtempSync, renameSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { namespaceToken } from '../src/rules/credentials.js';
import { exitOf, runCli, startCli } from './support/cli.js';
import { startContainerd, type Containerd } from './support/containerd.js';
import { buildImage, sha256 } from './support/oci.js';
import { freePort } from './support/procs.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

describe('pullbridge proxy and pull-secret commands', function () {
  this.timeout(120_000);
  let registry: RegistryHandle;
  let containerd: Containerd;
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-cli-proxy-'));
  const keyFile = join(dir, 'broker.key');
  writeFileSync(keyFile, 'a-broker-key-of-at-least-16-bytes\n');

  before(async () => {
    [registry, containerd] = await Promise.all([startRegistry({ auth: 'none' }), startContainerd()]);
  });
  after(async () => {
    await registry?.stop();
    await containerd?.stop();
  });

  function config(proxyPort: number): string {
    const file = join(dir, `config-${proxyPort}.yaml`);
    writeFileSync(file, `proxy: {host: 127.0.0.1, port: ${proxyPort}}\nbroker: {keyFiles: [${keyFile}]}\nregistries:\n  - {name: corp, match: [registry.corp.example], upstream: "${registry.url}"}\n`);
    return file;
  }

  it('pull-secret prints the dockerconfigjson keyed by the proxy host:port', () => {
    const result = runCli(['pull-secret', '--config', config(30500), '--namespace', 'shop']);
    assert.equal(result.status, 0, result.stderr);
    const doc = JSON.parse(result.stdout) as { auths: Record<string, { username: string; password: string; auth: string }> };
    assert.deepEqual(Object.keys(doc.auths), ['127.0.0.1:30500']);
    assert.equal(doc.auths['127.0.0.1:30500']?.username, 'shop');
    assert.equal(runCli(['pull-secret', '--config', config(30500), '--namespace', 'Bad_NS']).status, 2);
  });

  it('proxy refuses a broker rule without broker keys', () => {
    const file = join(dir, 'nokeys.yaml');
    writeFileSync(file, `registries:\n  - {name: corp, match: [r.example], upstream: "${registry.url}"}\n`);
    const result = runCli(['proxy', '--config', file, '--port', '0', '--host', '127.0.0.1']);
    assert.equal(result.status, 1);
    assert.match(result.stderr, /registries\[0\]\.auth\.mode: broker needs broker\.keyFiles/);
  });

  it('with --ops-port, serves /metrics and /status only there: the registry port every Pod reaches does not disclose upstreams', async () => {
    const [port, opsPort] = [await freePort(), await freePort()];
    const { child, output } = await startCli(['proxy', '--config', config(port), '--port', String(port), '--host', '127.0.0.1', '--ops-port', String(opsPort)], /operations endpoints listening/);
    try {
      for (const path of ['/metrics', '/status']) {
        const onRegistry = await fetch(`http://127.0.0.1:${port}${path}`);
        assert.equal(onRegistry.status, 404, path);
        assert.ok(!(await onRegistry.text()).includes(registry.url), 'no upstream URL on the registry port');
        assert.equal((await fetch(`http://127.0.0.1:${opsPort}${path}`)).status, 200, path);
      }
      assert.match(await (await fetch(`http://127.0.0.1:${opsPort}/status`)).text(), /"corp"/);
      // Health tells nothing about the config: both ports answer it, for probes.
      for (const p of [port, opsPort]) assert.equal((await fetch(`http://127.0.0.1:${p}/readyz`)).status, 200);
      assert.equal((await fetch(`http://127.0.0.1:${opsPort}/v2/`)).status, 404, 'no registry API on the operations port');
      assert.ok(!output().includes('give the proxy an --ops-port'));
    } finally {
      child.kill('SIGTERM');
      await exitOf(child);
    }
  });

  it('without --ops-port keeps /metrics and /status on the registry port, and warns that every Pod can read them', async () => {
    const { child, output } = await startCli(['proxy', '--config', config(30500), '--port', '0', '--host', '127.0.0.1'], /proxy listening/);
    try {
      const url = /"url":"(http:\/\/127\.0\.0\.1:\d+)"/.exec(output())?.[1];
      assert.equal((await fetch(`${url}/status`)).status, 200);
      assert.match(output(), /give the proxy an --ops-port/);
    } finally {
      child.kill('SIGTERM');
      await exitOf(child);
    }
  });

  /** `proxy listening` has been seen: the URL it printed. */
  const listeningUrl = (output: string): string => {
    const url = /"url":"(http:\/\/127\.0\.0\.1:\d+)"/.exec(output)?.[1];
    assert.ok(url, output);
    return url;
  };
  const accessRecords = (output: string) => output.split('\n').filter((line) => line.includes('"access":"pull"')).length;
  const basic = (credential: string) => `Basic ${Buffer.from(credential).toString('base64')}`;

  it('keeps serving broker pulls when a verify-only key file is empty, and warns once', async () => {
    await registry.push(buildImage(), 'team/keys', '1.0');
    const emptyKey = join(dir, 'empty-previous.key');
    writeFileSync(emptyKey, '');
    const file = join(dir, 'verify-only-empty.yaml');
    writeFileSync(file, `proxy: {host: 127.0.0.1, port: 30500}\nbroker: {keyFiles: [${keyFile}, ${emptyKey}]}\nregistries:\n  - {name: corp, match: [registry.corp.example], upstream: "${registry.url}"}\n`);
    const secret = runCli(['pull-secret', '--config', file, '--namespace', 'shop']);
    assert.equal(secret.status, 0, secret.stderr);
    const entry = (JSON.parse(secret.stdout) as { auths: Record<string, { username: string; password: string }> }).auths['127.0.0.1:30500'];
    assert.ok(entry);
    const proxy = await startCli(['proxy', '--config', file, '--port', '0', '--host', '127.0.0.1', '--probe-interval', '3600'], /proxy listening/);
    try {
      const url = listeningUrl(proxy.output());
      for (let i = 1; i <= 3; i++) {
        const res: Response = await fetch(`${url}/v2/corp/team/keys/manifests/1.0`, { headers: { authorization: basic(`${entry.username}:${entry.password}`), accept: 'application/vnd.oci.image.index.v1+json' } });
        assert.equal(res.status, 200, await res.text());
        await proxy.waitForOutput((output) => accessRecords(output) === i);
      }
      const warnings = proxy.output().split('\n').filter((line) => line.includes('"level":40') && line.includes('broker key'));
      assert.equal(warnings.length, 1, `one warning for the state, not one per request:\n${warnings.join('\n')}`);
      assert.match(warnings[0] ?? '', /broker key file skipped/);
      assert.ok(warnings[0]?.includes(emptyKey), warnings[0]);
      assert.match(await (await fetch(`${url}/metrics`)).text(), /^pullbridge_broker_keys_skipped 1$/m);
    } finally {
      proxy.child.kill('SIGTERM');
      await exitOf(proxy.child);
    }
  });

  it('refuses to start (and pull-secret to print) when the signing key file is not there, naming the key', () => {
    const file = join(dir, 'missing-key.yaml');
    writeFileSync(file, `broker: {keyFiles: [${join(dir, 'no-such.key')}]}\nregistries:\n  - {name: corp, match: [r.example], upstream: "${registry.url}"}\n`);
    const result = runCli(['proxy', '--config', file, '--port', '0', '--host', '127.0.0.1']);
    assert.equal(result.status, 1, result.stdout + result.stderr);
    assert.match(result.stderr, /^broker\.keyFiles\[0\]: cannot read .*no-such\.key: no such file$/m);
    const secret = runCli(['pull-secret', '--config', file, '--namespace', 'shop']);
    assert.equal(secret.status, 1);
    assert.match(secret.stderr, /^broker\.keyFiles\[0\]: cannot read .*no-such\.key: no such file$/m);
  });

  it('keeps the last good config when a new one names files it cannot load, and logs and counts each rejection', async () => {
    await registry.push(buildImage(), 'team/reload', '1.0');
    const passwordFile = join(dir, 'robot.password');
    writeFileSync(passwordFile, 'not-needed-by-this-registry');
    const notPem = join(dir, 'not-a-certificate.crt');
    writeFileSync(notPem, 'this is no PEM certificate\n');
    const file = join(dir, 'live.yaml');
    const configText = (keyFiles: string, extra = '') => `proxy: {host: 127.0.0.1, port: 30500}\nbroker: {keyFiles: [${keyFiles}]}\nregistries:\n  - {name: corp, match: [registry.corp.example], upstream: "${registry.url}"${extra}}\n`;
    // As kubelet updates a mounted ConfigMap: a new file swapped in, never a half-written one.
    const replaceConfig = (text: string) => {
      writeFileSync(`${file}.tmp`, text);
      renameSync(`${file}.tmp`, file);
    };
    replaceConfig(configText(keyFile));
    const proxy = await startCli(['proxy', '--config', file, '--port', '0', '--host', '127.0.0.1', '--probe-interval', '3600'], /proxy listening/);
    const outcomes = (output: string) => output.split('\n').filter((line) => /config change (applied|rejected)/.test(line));
    try {
      const url = listeningUrl(proxy.output());
      const credential = `shop:${namespaceToken(Buffer.from('a-broker-key-of-at-least-16-bytes'), 'shop')}`;
      const pull = async () => (await fetch(`${url}/v2/corp/team/reload/manifests/1.0`, { headers: { authorization: basic(credential), accept: 'application/vnd.oci.image.index.v1+json' } })).status;
      assert.equal(await pull(), 200);
      const changes: Array<[string, RegExp]> = [
        [configText(join(dir, 'missing-signing.key')), /"key":"broker\.keyFiles\[0\]","message":"cannot read [^"]*missing-signing\.key: no such file"/],
        [configText(keyFile, `, credentials: {username: robot, passwordFile: ${join(dir, 'missing.password')}}`), /"key":"registries\[0\]\.credentials\.passwordFile","message":"cannot read [^"]*missing\.password: no such file"/],
        [configText(keyFile, `, credentials: {username: robot, passwordFile: ${passwordFile}}, tls: {caFile: ${notPem}}`), /"key":"registries\[0\]\.tls\.caFile","message":"[^"]*no PEM certificate/],
      ];
      for (const [index, [text, named]] of changes.entries()) {
        replaceConfig(text);
        await proxy.waitForOutput((output) => outcomes(output).length === index + 1);
        const outcome = outcomes(proxy.output())[index] ?? '';
        assert.match(outcome, /config change rejected; the last good config stays in force/);
        assert.match(outcome, named);
        assert.equal(await pull(), 200, 'the last good config keeps serving');
      }
      const metrics = await (await fetch(`${url}/metrics`)).text();
      assert.match(metrics, /^pullbridge_config_reloads_total\{result="rejected"\} 3$/m);
      assert.match(metrics, /^pullbridge_config_last_reload_ok 0$/m);
      assert.doesNotMatch(proxy.output(), /not-needed-by-this-registry/, 'file contents are never logged');
    } finally {
      proxy.child.kill('SIGTERM');
      await exitOf(proxy.child);
    }
  });

  it('serves containerd with the credential pull-secret printed, and stops on SIGTERM', async () => {
    const image = buildImage();
    await registry.push(image, 'team/app', '1.0');
    const { child, output } = await startCli(['proxy', '--config', config(30500), '--port', '0', '--host', '127.0.0.1'], /proxy listening/);
    const url = /"url":"http:\/\/(127\.0\.0\.1:\d+)"/.exec(output())?.[1];
    assert.ok(url, output());
    const port = Number(url.split(':')[1]);
    // The secret a namespace gets is keyed by proxy.host:proxy.port; use the listening port here.
    const secret = JSON.parse(runCli(['pull-secret', '--config', config(port), '--namespace', 'shop']).stdout) as { auths: Record<string, { username: string; password: string }> };
    const entry = secret.auths[url];
    assert.ok(entry);
    await containerd.fetch(`${url}/corp/team/app:1.0`, { user: `${entry.username}:${entry.password}`, allPlatforms: true });
    for (const [digest, blob] of image.blobs) assert.ok((await containerd.content(digest)).equals(blob.data), digest);
    assert.equal(sha256(await containerd.content(image.index.digest)), image.index.digest);
    const status = (await (await fetch(`http://${url}/status`)).json()) as { upstreams: Array<{ rule: string; reachable: boolean }> };
    assert.equal(status.upstreams[0]?.rule, 'corp');
    child.kill('SIGTERM');
    assert.equal(await exitOf(child), 0);
    assert.match(output(), /"access":"pull"/);
    assert.doesNotMatch(output(), new RegExp(entry.password.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
  });
});
