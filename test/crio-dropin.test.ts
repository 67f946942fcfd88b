// CRI-O and podman pull with containers/image, which requires TLS for `localhost:PORT` unless
// registries.conf marks it insecure. `pullbridge node-setup` (the chart's opt-in node set-up)
// installs a registries.conf.d drop-in and removes it when it stops. skopeo (containers/image
// itself) is configured only through that drop-in: it runs in a mount namespace of its own where
// the test's directory is bind-mounted over /etc/containers/registries.conf.d, so this machine's
// configuration is neither read nor changed.

import assert from 'node:assert/strict';
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseAllDocuments } from 'yaml';
import { fileURLToPath } from 'node:url';
import { runCli, startCli } from './support/cli.js';
import { cachedBinary } from './support/controlplane.js';
import { buildImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const SYSTEM_DROP_INS = '/etc/containers/registries.conf.d';

/** skopeo with `dropIns` as the system registries.conf.d, in a private mount namespace. */
function skopeo(dropIns: string, args: string[]): Promise<string> {
  return runAsync('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', `mount --bind "$0" ${SYSTEM_DROP_INS} && exec skopeo "$@"`, dropIns, ...args], { timeoutMs: 60_000 });
}

describe('CRI-O / podman node set-up: the registries.conf.d drop-in', function () {
  this.timeout(120_000);
  let registry: RegistryHandle;
  let proxy: ProxyUnderTest;
  let configFile: string;
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-crio-'));
  const image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }] });

  before(async function () {
    if (!existsSync(SYSTEM_DROP_INS)) {
      // Said in the test's title, so that the run's output shows what was not proven and why.
      const reason = `skipped: ${SYSTEM_DROP_INS} is missing (containers-common is not installed), so there is no system drop-in directory to bind over`;
      for (const test of this.test?.parent?.tests ?? []) test.title += ` (${reason})`;
      this.skip();
    }
    registry = await startRegistry();
    await registry.push(image, 'team/app', '1');
    proxy = await startProxy({ registries: [{ name: 'hub', match: ['r.example'], upstream: registry.url, auth: { mode: 'anonymous' } }] });
    configFile = join(dir, 'config.yaml');
    writeFileSync(configFile, JSON.stringify({ proxy: { host: 'localhost', port: proxy.server.port }, registries: [] }));
  });
  after(async () => {
    await proxy?.close();
    await registry?.stop();
  });

  it('lets containers/image pull from the proxy over plain HTTP only while node-setup runs', async () => {
    const dropIns = join(dir, 'registries.conf.d');
    const reference = `docker://localhost:${proxy.server.port}/hub/team/app:1`;
    // Without the drop-in: containers/image insists on TLS.
    const empty = join(dir, 'empty');
    mkdirSync(empty);
    await assert.rejects(skopeo(empty, ['inspect', '--raw', reference]), /HTTP response to HTTPS client|server gave HTTP response/);

    const setup = await startCli(['node-setup', '--config', configFile, '--registries-dir', dropIns], /marked insecure/);
    try {
      assert.deepEqual(readdirSync(dropIns), ['50-pullbridge.conf']);
      assert.match(readFileSync(join(dropIns, '50-pullbridge.conf'), 'utf8'), new RegExp(`location = "localhost:${proxy.server.port}"\\ninsecure = true`));
      const out = join(dir, 'copied');
      await skopeo(dropIns, ['copy', '--quiet', `${reference}`, `oci:${out}:copied`]);
      for (const blob of [image.manifests[0]!, image.configs[0]!, ...image.layers]) {
        assert.ok(readFileSync(join(out, 'blobs', 'sha256', blob.digest.slice(7))).equals(blob.data), `skopeo got ${blob.digest}`);
        assert.ok(proxy.logs.records.some((r) => r.access === 'pull' && r.status === 200 && r.reference === blob.digest), `${blob.digest} served by the proxy`);
      }
    } finally {
      setup.child.kill('SIGTERM');
      await new Promise((resolve) => setup.child.once('exit', resolve));
    }
    // Stopped (the DaemonSet Pod ending on uninstall): the drop-in is gone, and TLS is required again.
    assert.deepEqual(readdirSync(dropIns), []);
    await assert.rejects(skopeo(dropIns, ['inspect', '--raw', reference]), /HTTP response to HTTPS client|server gave HTTP response/);
  });

  it('is what the chart runs when crio.registriesDropIn is enabled: a DaemonSet on the node\'s drop-in directory, off by default', async () => {
    const chart = fileURLToPath(new URL('../../charts/pullbridge', import.meta.url));
    type Workload = { kind: string; metadata: { name: string }; spec: { template: { spec: { containers: Array<{ args: string[]; securityContext: { runAsUser: number; capabilities: { drop: string[] } } }>; volumes: Array<{ name: string; hostPath?: { path: string }; configMap?: { name: string } }> } } } };
    const render = async (...set: string[]) =>
      parseAllDocuments(await runAsync(cachedBinary('helm'), ['template', 'pb', chart, ...set.flatMap((s) => ['--set', s])])).map((d) => d.toJS() as Workload).filter((o) => o?.kind === 'DaemonSet');
    assert.deepEqual((await render()).map((d) => d.metadata.name), ['pb-pullbridge-proxy'], 'off by default');
    const setup = (await render('crio.registriesDropIn.enabled=true', 'crio.registriesDropIn.dir=/etc/containers/registries.conf.d')).find((d) => d.metadata.name === 'pb-pullbridge-node-setup');
    assert.ok(setup);
    const spec = setup.spec.template.spec;
    assert.deepEqual(spec.containers[0]?.args, ['node-setup', '--config=/etc/pullbridge/config/config.yaml', '--registries-dir=/host/registries.conf.d']);
    assert.deepEqual(spec.containers[0]?.securityContext.capabilities.drop, ['ALL']);
    assert.equal(spec.volumes.find((v) => v.name === 'registries-d')?.hostPath?.path, '/etc/containers/registries.conf.d');
    assert.equal(spec.volumes.find((v) => v.name === 'config')?.configMap?.name, 'pb-pullbridge-config', 'the same config.yaml as the proxy: the drop-in names its address');
  });
});

describe('node-setup writing its drop-in', () => {
  it('follows no link planted in the drop-in directory: not at the temporary names one could guess, not at the drop-in\'s own name', () => {
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-dropin-links-'));
    const dropIns = join(dir, 'registries.conf.d');
    mkdirSync(dropIns);
    const configFile = join(dir, 'config.yaml');
    writeFileSync(configFile, JSON.stringify({ proxy: { host: 'localhost', port: 30500 }, registries: [] }));
    // Files node-setup's writes must never reach: one per planted link.
    const planted = ['.50-pullbridge.conf.tmp', '50-pullbridge.conf.tmp', '.50-pullbridge.conf.tmp.1', '50-pullbridge.conf'];
    const targets = planted.map((name, i) => {
      const target = join(dir, `target-${i}`);
      writeFileSync(target, `someone else's file ${i}\n`);
      symlinkSync(target, join(dropIns, name));
      return target;
    });
    const run = runCli(['node-setup', '--config', configFile, '--registries-dir', dropIns, '--once']);
    assert.equal(run.status, 0, run.stderr);
    targets.forEach((target, i) => assert.equal(readFileSync(target, 'utf8'), `someone else's file ${i}\n`, `the target of ${planted[i]}`));
    // The drop-in replaced the link at its name (rename does not follow it); the other links stay links.
    assert.ok(lstatSync(join(dropIns, '50-pullbridge.conf')).isFile());
    assert.match(readFileSync(join(dropIns, '50-pullbridge.conf'), 'utf8'), /location = "localhost:30500"\ninsecure = true/);
    assert.deepEqual(readdirSync(dropIns).sort(), [...planted].sort(), 'no temporary file left behind');
    for (const name of planted.slice(0, 3)) assert.ok(lstatSync(join(dropIns, name)).isSymbolicLink());
  });
});
