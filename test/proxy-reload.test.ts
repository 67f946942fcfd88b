// The proxy takes config changes live: a new rule serves at once, an invalid change (or one it
// cannot take up, like a missing CA file) is rejected and the running rules keep serving.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runProxy } from '../src/proxy/run.js';
import { parseConfig } from '../src/rules/config.js';
import { rawRequest } from './support/http.js';
import { buildImage } from './support/oci.js';
import { startProxy } from './support/proxy.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';
import { startCli } from './support/cli.js';
import { freePort } from './support/procs.js';

describe('proxy live configuration', function () {
  this.timeout(60_000);
  let registry: RegistryHandle;
  before(async () => {
    registry = await startRegistry({ auth: 'none' });
    await registry.push(buildImage(), 'team/app', '1.0');
  });
  after(async () => registry?.stop());

  it('applies a valid change at once and keeps serving through invalid ones', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-reload-'));
    const path = join(dir, 'config.yaml');
    const rule = (name: string, extra = '') => `  - {name: ${name}, match: [${name}.example], upstream: "${registry.url}", auth: {mode: anonymous}${extra}}\n`;
    writeFileSync(path, `registries:\n${rule('corp')}`);
    const initial = parseConfig(`registries:\n${rule('corp')}`);
    assert.ok(initial.ok);
    const proxy = await runProxy({ config: initial.config, configPath: path, host: '127.0.0.1', port: 0, probeIntervalMs: 3_600_000 });
    const status = async (ruleName: string) => (await fetch(`${proxy.running.url}/v2/${ruleName}/team/app/manifests/1.0`, { headers: { accept: 'application/vnd.oci.image.index.v1+json' } })).status;
    try {
      assert.equal(await status('corp'), 200);
      assert.equal(await status('extra'), 404);

      writeFileSync(path, `registries:\n${rule('corp')}${rule('extra')}`);
      assert.equal(proxy.watcher?.check(), 'applied');
      assert.equal(await status('extra'), 200);

      writeFileSync(path, 'registries: [{name: broken}]\n');
      assert.equal(proxy.watcher?.check(), 'rejected');
      assert.equal(await status('extra'), 200, 'the last good config keeps serving');

      writeFileSync(path, `registries:\n${rule('corp', ', tls: {caFile: /nonexistent/ca.crt}')}`);
      assert.equal(proxy.watcher?.check(), 'rejected', 'a CA file that is not there is rejected, not a crash');
      assert.equal(await status('extra'), 200);

      writeFileSync(path, `registries:\n${rule('corp')}\nbroker: {keyFiles: []}\n`);
      assert.equal(proxy.watcher?.check(), 'rejected');
      const metrics = await (await fetch(`${proxy.running.url}/metrics`)).text();
      assert.match(metrics, /pullbridge_config_reloads_total\{result="applied"\} 1/);
      assert.match(metrics, /pullbridge_config_reloads_total\{result="rejected"\} 3/);
      assert.match(metrics, /pullbridge_config_last_reload_ok 0/);
    } finally {
      await proxy.shutdown();
    }
  });

  it('takes up a config naming credential files that appear only later (kubelet updates the ConfigMap and Secret volumes in no order): retried until they are there', async () => {
    const privateRegistry = await startRegistry({ auth: 'basic' });
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-reload-files-'));
    const path = join(dir, 'config.yaml');
    const open = `  - {name: open, match: [open.example], upstream: "${registry.url}", auth: {mode: anonymous}}\n`;
    const credentials = join(dir, 'credentials');
    const withPrivate = `${open}  - {name: private, match: [private.example], upstream: "${privateRegistry.url}", auth: {mode: anonymous}, repositories: {include: ["team/**"]}, credentials: {usernameFile: ${credentials}/private.username, passwordFile: ${credentials}/private.password}}\n`;
    writeFileSync(path, `registries:\n${open}`);
    const port = await freePort();
    const proxy = await startCli(['proxy', '--config', path, '--port', String(port), '--host', '127.0.0.1', '--probe-interval', '3600'], /proxy listening/);
    const status = async (rule: string) => (await fetch(`http://127.0.0.1:${port}/v2/${rule}/team/app/manifests/1.0`, { headers: { accept: 'application/vnd.oci.image.index.v1+json' } })).status;
    try {
      const [user, password] = Object.entries(DEFAULT_USERS)[0] ?? [];
      await privateRegistry.push(buildImage(), 'team/app', '1.0');
      assert.equal(await status('private'), 404);
      // The ConfigMap first: the new rule's credential files are not there yet.
      writeFileSync(path, `registries:\n${withPrivate}`);
      await proxy.waitForOutput((output) => /config change rejected/.test(output));
      assert.match(proxy.output(), /private\.password/);
      assert.equal(await status('open'), 200, 'the last good config serves meanwhile');
      assert.equal(await status('private'), 404);
      // Then the Secret: the same config, unchanged, is taken up at a later poll.
      mkdirSync(credentials);
      writeFileSync(join(credentials, 'private.username'), `${user}\n`);
      writeFileSync(join(credentials, 'private.password'), `${password}\n`);
      await proxy.waitForOutput((output) => /config change applied/.test(output));
      assert.equal(await status('private'), 200);
      assert.equal(proxy.output().match(/config change rejected/g)?.length, 1, 'reported once, not at every retry');
    } finally {
      proxy.child.kill('SIGTERM');
      await privateRegistry.stop();
    }
  });

  it('takes up a ConfigMap volume update the way kubelet makes it: a new `..data` symlink renamed over the old one', async () => {
    // kubelet's atomic writer: the files live in a timestamped directory, `..data` points at it and
    // `config.yaml` at `..data/config.yaml`; an update writes a new directory, renames a fresh
    // `..data_tmp` symlink over `..data` and removes the old directory. config.yaml itself never changes.
    const volume = mkdtempSync(join(tmpdir(), 'pullbridge-configmap-'));
    let generation = 0;
    let old: string | undefined;
    const publish = (text: string) => {
      const dataDir = `..2026_12_03_00_00_0${generation++}.12345${generation}`;
      mkdirSync(join(volume, dataDir));
      writeFileSync(join(volume, dataDir, 'config.yaml'), text);
      symlinkSync(dataDir, join(volume, '..data_tmp'));
      renameSync(join(volume, '..data_tmp'), join(volume, '..data'));
      if (old) rmSync(join(volume, old), { recursive: true });
      else symlinkSync('..data/config.yaml', join(volume, 'config.yaml'));
      old = dataDir;
    };
    const rule = (name: string) => `  - {name: ${name}, match: [${name}.example], upstream: "${registry.url}", auth: {mode: anonymous}}\n`;
    publish(`registries:\n${rule('corp')}`);
    const initial = parseConfig(`registries:\n${rule('corp')}`);
    assert.ok(initial.ok);
    const proxy = await runProxy({ config: initial.config, configPath: join(volume, 'config.yaml'), host: '127.0.0.1', port: 0, probeIntervalMs: 3_600_000 });
    try {
      assert.equal(proxy.watcher?.check(), 'unchanged');
      publish(`registries:\n${rule('corp')}${rule('extra')}`);
      assert.equal(proxy.watcher?.check(), 'applied');
      assert.deepEqual(proxy.watcher?.current().registries.map((r) => r.name), ['corp', 'extra']);
      publish(`registries:\n${rule('extra')}`);
      assert.equal(proxy.watcher?.check(), 'applied', 'a second swap, after the first directory was removed');
      assert.deepEqual(proxy.watcher?.current().registries.map((r) => r.name), ['extra']);
      const response = await fetch(`${proxy.running.url}/v2/corp/team/app/manifests/1.0`, { headers: { accept: 'application/vnd.oci.image.index.v1+json' } });
      assert.equal(response.status, 404, 'the removed rule no longer serves');
    } finally {
      await proxy.shutdown();
    }
  });
});

describe('proxy broker keys going bad while it runs', function () {
  this.timeout(60_000);

  it('answers 503 (its own fault, not the client\'s) on /v2/ and on pulls when the signing key file is emptied, and recovers', async () => {
    const registry = await startRegistry({ auth: 'none' });
    await registry.push(buildImage(), 'team/app', '1.0');
    const proxy = await startProxy({ registries: [{ name: 'corp', match: ['corp.example'], upstream: registry.url }] });
    const auth = { authorization: proxy.authorization('shop'), accept: 'application/vnd.oci.image.index.v1+json' };
    const statuses = async () => [(await rawRequest(proxy.url, '/v2/', { headers: auth })).status, (await rawRequest(proxy.url, '/v2/corp/team/app/manifests/1.0', { headers: auth })).status];
    try {
      assert.deepEqual(await statuses(), [200, 200]);
      writeFileSync(proxy.keyFile, '');
      // Key files are re-read every 10 s; mocha's timeout bounds the wait.
      for (let s = await statuses(); s[0] === 200; s = await statuses()) await new Promise((r) => setTimeout(r, 500));
      assert.deepEqual(await statuses(), [503, 503]);
      writeFileSync(proxy.keyFile, `${proxy.key.toString()}\n`);
      for (let s = await statuses(); s[0] !== 200; s = await statuses()) await new Promise((r) => setTimeout(r, 500));
      assert.deepEqual(await statuses(), [200, 200]);
    } finally {
      await proxy.close();
      await registry.stop();
    }
  });
});
