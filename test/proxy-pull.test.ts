// Pulls through the proxy with the real pullers (containerd, skopeo) from a real registry, directly
// and through a real forwarding proxy; every blob's bytes compared with what was pushed.

import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { listen } from '../src/shell/serve.js';
import { headerValue } from '../src/upstream/client.js';
import { startContainerd, type Containerd } from './support/containerd.js';
import { buildImage, sha256, type TestImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';
import { startTinyproxy, type Tinyproxy } from './support/tinyproxy.js';

const [USER, PASSWORD] = Object.entries(DEFAULT_USERS)[0] as [string, string];

describe('pulling through the proxy with containerd and skopeo', function () {
  this.timeout(180_000);
  let containerd: Containerd;
  let credsDir: string;
  const cleanups: Array<() => Promise<void>> = [];

  before(async () => {
    containerd = await startContainerd();
    credsDir = mkdtempSync(join(tmpdir(), 'pullbridge-creds-'));
  });
  after(async () => {
    await containerd?.stop();
  });
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
    await containerd.clear();
  });

  function credentialFiles(): { usernameFile: string; passwordFile: string } {
    const dir = mkdtempSync(join(credsDir, 'c-'));
    const usernameFile = join(dir, 'username');
    const passwordFile = join(dir, 'password');
    require_write(usernameFile, USER);
    require_write(passwordFile, `${PASSWORD}\n`);
    return { usernameFile, passwordFile };
  }

  async function registry(options: Parameters<typeof startRegistry>[0]): Promise<RegistryHandle> {
    const r = await startRegistry(options);
    cleanups.push(() => r.stop());
    return r;
  }
  async function proxy(config: Parameters<typeof startProxy>[0]): Promise<ProxyUnderTest> {
    const p = await startProxy(config);
    cleanups.push(() => p.close());
    return p;
  }

  /** Every blob of the image is in containerd's store with exactly the pushed bytes. */
  async function assertPulled(image: TestImage, platforms: 'all' | 'one' = 'all'): Promise<void> {
    const have = await containerd.digests();
    const wanted = platforms === 'all' ? [...image.blobs.keys()] : [image.index.digest, image.manifests[0]!.digest, image.configs[0]!.digest];
    for (const digest of wanted) {
      assert.ok(have.has(digest), `containerd lacks ${digest}`);
      const bytes = await containerd.content(digest);
      assert.equal(sha256(bytes), digest);
      assert.ok(bytes.equals(image.blobs.get(digest)!.data));
    }
  }

  it('serves a multi-arch image from a TLS registry with Basic auth (CA bundle, broker credentials)', async () => {
    const upstream = await registry({ auth: 'basic', tls: true });
    const image = buildImage({ layerSizes: [2048, 3 * 1024 * 1024] });
    await upstream.push(image, 'team/app', '1.0');
    const p = await proxy({ registries: [{ name: 'corp', match: ['registry.corp.example:5000'], upstream: upstream.url, tls: { caFile: upstream.caFile }, credentials: { username: USER, passwordFile: credentialFiles().passwordFile } }] });
    await containerd.fetch(`${p.host}/corp/team/app:1.0`, { user: p.credential('shop'), allPlatforms: true });
    await assertPulled(image);
    // By digest as well, as a rewritten tag@digest reference is pulled.
    await containerd.clear();
    await containerd.fetch(`${p.host}/corp/team/app@${image.index.digest}`, { user: p.credential('shop'), allPlatforms: true });
    await assertPulled(image);
    const access = p.logs.records.filter((r) => r.access === 'pull' && r.kind === 'blob' && r.status === 200);
    assert.ok(access.length >= image.layers.length, 'one access record per blob');
    assert.ok(access.every((r) => r.namespace === 'shop' && r.rule === 'corp' && r.repository === 'team/app'));
    const raw = p.logs.raw.join('');
    assert.ok(!raw.includes(PASSWORD) && !raw.includes(p.credential('shop').split(':')[1]!), 'no credential in the logs');
  });

  it('serves a registry behind the Bearer token flow, fetching one token per scope', async () => {
    const upstream = await registry({ auth: 'token', tls: true });
    const image = buildImage();
    await upstream.push(image, 'team/app', '2.0');
    const pushRequests = upstream.issuer!.requests.length;
    const p = await proxy({ registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.url, tls: { caFile: upstream.caFile }, credentials: { ...credentialFiles() }, auth: { tokenRealms: [new URL(upstream.issuer!.realm).origin] } }] });
    await containerd.fetch(`${p.host}/corp/team/app:2.0`, { user: p.credential('shop'), allPlatforms: true });
    await assertPulled(image);
    const pulls = upstream.issuer!.requests.slice(pushRequests);
    assert.deepEqual(pulls.map((r) => [r.scope, r.user, r.service]), [['repository:team/app:pull', USER, 'test-registry']], 'one token, cached for every manifest and blob');
  });

  it('is pulled by skopeo (containers/image, the CRI-O puller) with the namespace credential', async () => {
    const upstream = await registry({ auth: 'basic' });
    const image = buildImage();
    await upstream.push(image, 'team/app', '3.0');
    const p = await proxy({ registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.url, credentials: { username: USER, passwordFile: credentialFiles().passwordFile } }] });
    const out = mkdtempSync(join(tmpdir(), 'pullbridge-skopeo-'));
    await runAsync('skopeo', ['copy', '--all', '--quiet', '--src-tls-verify=false', '--src-creds', p.credential('shop'), `docker://${p.host}/corp/team/app:3.0`, `oci:${out}:copied`]);
    const stored = new Set(readdirSync(join(out, 'blobs', 'sha256')).map((f) => `sha256:${f}`));
    for (const digest of image.blobs.keys()) {
      assert.ok(stored.has(digest), `skopeo lacks ${digest}`);
      assert.ok(readFileSync(join(out, 'blobs', 'sha256', digest.slice(7))).equals(image.blobs.get(digest)!.data));
    }
    // Without credentials skopeo is refused: the proxy challenges at /v2/, as containers/image expects.
    await assert.rejects(runAsync('skopeo', ['inspect', '--raw', '--tls-verify=false', '--no-creds', `docker://${p.host}/corp/team/app:3.0`]), /unauthorized|authentication required/i);
  });

  it('refuses containerd without credentials, with another namespace\'s credential for a restricted rule, and with a forged one', async () => {
    const upstream = await registry({ auth: 'none' });
    await upstream.push(buildImage(), 'team/app', '1');
    const p = await proxy({ registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.url, namespaces: { include: ['shop'] } }] });
    await assert.rejects(containerd.fetch(`${p.host}/corp/team/app:1`), /401|unauthorized|no basic auth credentials/i);
    await assert.rejects(containerd.fetch(`${p.host}/corp/team/app:1`, { user: 'shop:pb1.forged' }), /401|unauthorized/i);
    await assert.rejects(containerd.fetch(`${p.host}/corp/team/app:1`, { user: p.credential('other') }), /403|forbidden|denied/i);
    // A credential of one namespace presented as another's is forged, too.
    const [, token] = p.credential('shop').split(':');
    await assert.rejects(containerd.fetch(`${p.host}/corp/team/app:1`, { user: `other:${token}` }), /401|unauthorized/i);
    await containerd.fetch(`${p.host}/corp/team/app:1`, { user: p.credential('shop') });
  });

  describe('through a real forwarding proxy (tinyproxy)', () => {
    let tinyproxy: Tinyproxy;
    afterEach(async () => tinyproxy?.stop());

    it('tunnels with CONNECT (and Proxy-Authorization) to a TLS registry', async () => {
      tinyproxy = await startTinyproxy({ basicAuth: { user: 'fwd', password: 'fwd-secret' } });
      const upstream = await registry({ auth: 'basic', tls: true });
      const image = buildImage();
      await upstream.push(image, 'team/app', '1.0');
      const fwdPassword = join(mkdtempSync(join(credsDir, 'f-')), 'password');
      require_write(fwdPassword, 'fwd-secret');
      const p = await proxy({
        registries: [
          {
            name: 'corp',
            match: ['r.example'],
            upstream: upstream.url,
            tls: { caFile: upstream.caFile },
            credentials: { username: USER, passwordFile: credentialFiles().passwordFile },
            forwardProxy: { url: tinyproxy.url, mode: 'connect', credentials: { username: 'fwd', passwordFile: fwdPassword } },
          },
        ],
      });
      await containerd.fetch(`${p.host}/corp/team/app:1.0`, { user: p.credential('shop'), allPlatforms: true });
      await assertPulled(image);
      assert.match(readTinyproxyLog(tinyproxy), new RegExp(`CONNECT 127\\.0\\.0\\.1:${upstream.port}`));
    });

    it('refuses to tunnel without the forwarding proxy\'s credentials, as a clear 502', async () => {
      tinyproxy = await startTinyproxy({ basicAuth: { user: 'fwd', password: 'fwd-secret' } });
      const upstream = await registry({ auth: 'none', tls: true });
      const p = await proxy({ registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.url, tls: { caFile: upstream.caFile }, auth: { mode: 'anonymous' }, forwardProxy: { url: tinyproxy.url, mode: 'connect' } }] });
      const res = await fetch(`${p.url}/v2/corp/team/app/manifests/1`);
      assert.equal(res.status, 502);
      const body = (await res.json()) as { errors: Array<{ code: string; message: string }> };
      assert.equal(body.errors[0]?.code, 'UNAVAILABLE');
    });

    it('forwards plain HTTP routed on Host, with the connectivity headers, to an HTTP registry', async () => {
      tinyproxy = await startTinyproxy();
      const upstream = await registry({ auth: 'basic' });
      const image = buildImage();
      await upstream.push(image, 'team/app', '1.0');
      // What tinyproxy forwards, as the registry receives it: a relay in front of the registry that
      // records each request's connectivity header (docker-registry logs no request headers).
      const locations: Array<string | undefined> = [];
      const relay = await listen((req, res) => {
        locations.push(headerValue(req.headers['sap-connectivity-scc-location_id']));
        const onward = http.request({ host: '127.0.0.1', port: upstream.port, method: req.method, path: req.url, headers: req.headers }, (up) => {
          res.writeHead(up.statusCode ?? 502, up.headers);
          up.pipe(res);
        });
        onward.on('error', () => res.destroy());
        req.pipe(onward);
      }, { host: '127.0.0.1', port: 0 });
      cleanups.push(() => relay.close(100));
      const p = await proxy({
        registries: [
          {
            name: 'onprem',
            match: ['virtual-host.example:443'],
            upstream: relay.url,
            credentials: { username: USER, passwordFile: credentialFiles().passwordFile },
            forwardProxy: { url: tinyproxy.url, mode: 'forward', headers: { 'SAP-Connectivity-SCC-Location_ID': 'loc-1' } },
          },
        ],
      });
      await containerd.fetch(`${p.host}/onprem/team/app:1.0`, { user: p.credential('shop'), allPlatforms: true });
      await assertPulled(image);
      assert.match(readTinyproxyLog(tinyproxy), new RegExp(`GET http://127\\.0\\.0\\.1:${relay.port}/v2/team/app/`));
      assert.ok(locations.length > 0, 'requests went through tinyproxy to the registry');
      assert.deepEqual([...new Set(locations)], ['loc-1'], 'every request carried the location header through the forwarding proxy');
    });
  });
});

function require_write(path: string, content: string): void {
  // Secret files as a kubelet mounts them.
  writeFileSync(path, content, { mode: 0o600 });
}

function readTinyproxyLog(t: Tinyproxy): string {
  const conf = t.process.child.spawnargs[t.process.child.spawnargs.length - 1] ?? '';
  return readFileSync(join(conf, '..', 'tinyproxy.log'), 'utf8');
}

import { writeFileSync } from 'node:fs';
