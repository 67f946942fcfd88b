// The forwarding proxy's credentials, with the real tinyproxy (BasicAuth): a rotated password file is
// taken up like the registry's credential files (re-read after SecretFile's refresh time, on the
// proxy's clock, without a restart), and a refusal names the forwarding proxy and its status, not
// "the upstream registry denied access", in the pull's error and in the probe's status.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildImage } from './support/oci.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';
import { startTinyproxy, type Tinyproxy } from './support/tinyproxy.js';

/** SecretFile's refresh time (src/shell/secretfiles.ts), and a millisecond past it. */
const PAST_REFRESH_MS = 10_001;

describe('forwarding proxy credentials (tinyproxy BasicAuth): rotation and who refused', function () {
  this.timeout(120_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-fwd-creds-'));
  const passwordFile = join(dir, 'password');
  let upstream: RegistryHandle;
  let tinyproxy: Tinyproxy | undefined;
  let proxy: ProxyUnderTest | undefined;
  before(async () => {
    upstream = await startRegistry({ auth: 'none', tls: true });
    await upstream.push(buildImage(), 'team/app', '1.0');
  });
  afterEach(async () => {
    await proxy?.close();
    await tinyproxy?.stop();
  });
  after(async () => {
    await upstream?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  const manifest = async (p: ProxyUnderTest) => {
    const res = await fetch(`${p.url}/v2/corp/team/app/manifests/1.0`, { headers: { accept: 'application/vnd.oci.image.index.v1+json' } });
    return { status: res.status, text: await res.text() };
  };

  it('connect mode: a rotated password is taken up without a restart; meanwhile the refusal names the forwarding proxy and its status', async () => {
    tinyproxy = await startTinyproxy({ basicAuth: { user: 'fwd', password: 'first-secret' } });
    writeFileSync(passwordFile, 'first-secret\n', { mode: 0o600 });
    let clock = 1_000_000;
    proxy = await startProxy(
      { registries: [{ name: 'corp', match: ['r.example'], upstream: upstream.url, tls: { caFile: upstream.caFile }, auth: { mode: 'anonymous' }, forwardProxy: { url: tinyproxy.url, mode: 'connect', credentials: { username: 'fwd', passwordFile } } }] },
      { now: () => clock },
    );
    assert.equal((await manifest(proxy)).status, 200);

    // The forwarding proxy's password is rotated: tinyproxy restarts on its port with the new one.
    const port = tinyproxy.port;
    await tinyproxy.stop();
    tinyproxy = await startTinyproxy({ basicAuth: { user: 'fwd', password: 'second-secret' }, port });
    const refused = await manifest(proxy);
    assert.equal(refused.status, 502);
    const message = (JSON.parse(refused.text) as { errors: Array<{ message: string }> }).errors[0]?.message ?? '';
    // tinyproxy answers a CONNECT without the right Proxy-Authorization with 401 (a GET with 407).
    assert.ok(message.includes(`the forwarding proxy ${tinyproxy.url} refused the request: 401 Proxy Authentication Required`), message);
    assert.doesNotMatch(message, /upstream registry denied/);
    const [status] = await proxy.prober.probeAll();
    assert.equal(status?.reachable, false);
    assert.ok(status?.lastError?.includes(`the forwarding proxy ${tinyproxy.url} refused the request: 401`), String(status?.lastError));

    // The Secret is updated in place; the file is re-read once its refresh time has passed.
    writeFileSync(passwordFile, 'second-secret\n');
    assert.equal((await manifest(proxy)).status, 502, 'within the refresh time the last read password stands');
    clock += PAST_REFRESH_MS;
    assert.equal((await manifest(proxy)).status, 200, 'the rotated password is used');
    const [recovered] = await proxy.prober.probeAll();
    assert.equal(recovered?.reachable, true, String(recovered?.lastError));
  });

  it('forward mode: the forwarding proxy\'s 407 answer is its refusal, not the registry\'s', async () => {
    tinyproxy = await startTinyproxy({ basicAuth: { user: 'fwd', password: 'first-secret' } });
    const plain = await startRegistry({ auth: 'none' });
    try {
      await plain.push(buildImage(), 'team/app', '1.0');
      proxy = await startProxy({ registries: [{ name: 'corp', match: ['r.example'], upstream: plain.url, auth: { mode: 'anonymous' }, forwardProxy: { url: tinyproxy.url, mode: 'forward' } }] });
      const refused = await manifest(proxy);
      assert.equal(refused.status, 502, refused.text);
      const message = (JSON.parse(refused.text) as { errors: Array<{ message: string }> }).errors[0]?.message ?? '';
      assert.ok(message.includes(`the forwarding proxy ${tinyproxy.url} refused the request: 407 Proxy Authentication Required`), message);
    } finally {
      await plain.stop();
    }
  });
});
