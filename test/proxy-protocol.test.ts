// The proxy's registry protocol against a real docker-registry: headers, digests, ranges, tags,
// errors, client auth modes, probing; bad input on the wire.

import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { errorCode, rawRequest, type RawResponse } from './support/http.js';
import { buildImage, sha256, type TestImage } from './support/oci.js';
import { freePort } from './support/procs.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const [USER, PASSWORD] = Object.entries(DEFAULT_USERS)[0] as [string, string];
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';


describe('proxy registry protocol against a real registry', function () {
  this.timeout(120_000);
  let upstream: RegistryHandle;
  let basicUpstream: RegistryHandle;
  let image: TestImage;
  let proxy: ProxyUnderTest;
  let passwordFile: string;

  before(async () => {
    [upstream, basicUpstream] = await Promise.all([startRegistry({ auth: 'none' }), startRegistry({ auth: 'basic' })]);
    image = buildImage({ layerSizes: [4096, 256 * 1024] });
    await Promise.all([upstream.push(image, 'team/app', '1.0'), basicUpstream.push(image, 'team/app', '1.0')]);
    for (const tag of ['a', 'b', 'c']) await upstream.push(image, 'team/app', tag);
    passwordFile = join(mkdtempSync(join(tmpdir(), 'pullbridge-pw-')), 'password');
    writeFileSync(passwordFile, PASSWORD);
    proxy = await startProxy({
      registries: [
        { name: 'corp', match: ['r.example'], upstream: upstream.url },
        { name: 'open', match: ['o.example'], upstream: upstream.url, auth: { mode: 'anonymous' } },
        { name: 'pass', match: ['p.example'], upstream: basicUpstream.url, auth: { mode: 'passthrough' } },
        { name: 'private', match: ['b.example'], upstream: basicUpstream.url, credentials: { username: USER, passwordFile } },
        { name: 'wrongcreds', match: ['w.example'], upstream: basicUpstream.url, credentials: { username: USER, passwordFile: join(tmpdir(), 'missing-password-file') } },
      ],
    });
  });
  after(async () => {
    await proxy?.close();
    await upstream?.stop();
    await basicUpstream?.stop();
  });

  const auth = () => ({ authorization: proxy.authorization('shop') });

  it('answers HEAD on a manifest with the exact type, length and digest', async () => {
    const res = await rawRequest(proxy.url, '/v2/corp/team/app/manifests/1.0', { method: 'HEAD', headers: { ...auth(), accept: `${OCI_INDEX}, ${OCI_MANIFEST}` } });
    assert.equal(res.status, 200);
    assert.equal(res.headers['content-type'], OCI_INDEX);
    assert.equal(res.headers['content-length'], String(image.index.size));
    assert.equal(res.headers['docker-content-digest'], image.index.digest);
    assert.equal(res.headers['docker-distribution-api-version'], 'registry/2.0');
    assert.equal(res.body.length, 0);
  });

  it('serves manifests by tag and by digest, byte for byte, forwarding Accept', async () => {
    const byTag = await rawRequest(proxy.url, '/v2/corp/team/app/manifests/1.0', { headers: { ...auth(), accept: OCI_INDEX } });
    assert.equal(byTag.status, 200);
    assert.ok(byTag.body.equals(image.index.data));
    assert.equal(byTag.headers['docker-content-digest'], sha256(byTag.body));
    const child = image.manifests[1]!;
    const byDigest = await rawRequest(proxy.url, `/v2/corp/team/app/manifests/${child.digest}`, { headers: { ...auth(), accept: OCI_MANIFEST } });
    assert.equal(byDigest.status, 200);
    assert.equal(byDigest.headers['content-type'], OCI_MANIFEST);
    assert.ok(byDigest.body.equals(child.data));
  });

  it('streams blobs whole, and Range requests as 206 with Content-Range', async () => {
    const layer = image.layers[1]!;
    const full = await rawRequest(proxy.url, `/v2/corp/team/app/blobs/${layer.digest}`, { headers: auth() });
    assert.equal(full.status, 200);
    assert.equal(full.headers['content-length'], String(layer.size));
    assert.equal(full.headers['docker-content-digest'], layer.digest);
    assert.ok(full.body.equals(layer.data));
    const tail = await rawRequest(proxy.url, `/v2/corp/team/app/blobs/${layer.digest}`, { headers: { ...auth(), range: 'bytes=1000-' } });
    assert.equal(tail.status, 206);
    assert.equal(tail.headers['content-range'], `bytes 1000-${layer.size - 1}/${layer.size}`);
    assert.ok(tail.body.equals(layer.data.subarray(1000)));
    const head = await rawRequest(proxy.url, `/v2/corp/team/app/blobs/${layer.digest}`, { method: 'HEAD', headers: auth() });
    assert.equal(head.status, 200);
    assert.equal(head.headers['content-length'], String(layer.size));
  });

  it('relays unknown manifests and blobs as registry errors', async () => {
    const manifest = await rawRequest(proxy.url, '/v2/corp/team/app/manifests/nope', { headers: auth() });
    assert.equal(manifest.status, 404);
    assert.equal(errorCode(manifest), 'MANIFEST_UNKNOWN');
    const blob = await rawRequest(proxy.url, `/v2/corp/team/app/blobs/sha256:${'0'.repeat(64)}`, { headers: auth() });
    assert.equal(blob.status, 404);
    assert.equal(errorCode(blob), 'BLOB_UNKNOWN');
    const head = await rawRequest(proxy.url, '/v2/corp/team/app/manifests/nope', { method: 'HEAD', headers: auth() });
    assert.equal(head.status, 404);
  });

  it('lists tags under the proxy name (pagination: see the fault suite; registry 2.8 ignores n)', async () => {
    const res = await rawRequest(proxy.url, '/v2/corp/team/app/tags/list', { headers: auth() });
    assert.equal(res.status, 200);
    const body = JSON.parse(res.body.toString()) as { name: string; tags: string[] };
    assert.equal(body.name, 'corp/team/app');
    assert.deepEqual([...body.tags].sort(), ['1.0', 'a', 'b', 'c']);
    const bad = await rawRequest(proxy.url, '/v2/corp/team/app/tags/list?n=-1', { headers: auth() });
    assert.equal(bad.status, 400);
    assert.equal(errorCode(bad), 'PAGINATION_NUMBER_INVALID');
  });

  it('answers an unknown rule with 404 NAME_UNKNOWN', async () => {
    const res = await rawRequest(proxy.url, '/v2/nosuchrule/team/app/manifests/1.0', { headers: auth() });
    assert.equal(res.status, 404);
    assert.equal(errorCode(res), 'NAME_UNKNOWN');
  });

  describe('client authentication', () => {
    it('challenges at /v2/ and accepts a namespace credential there', async () => {
      const none = await rawRequest(proxy.url, '/v2/');
      assert.equal(none.status, 401);
      // Basic first (containers/image takes the first it knows), then the registry token flow's Bearer.
      assert.equal(none.headers['www-authenticate'], `Basic realm="pullbridge", Bearer realm="http://127.0.0.1:${new URL(proxy.url).port}/token",service="pullbridge"`);
      assert.equal(errorCode(none), 'UNAUTHORIZED');
      assert.equal((await rawRequest(proxy.url, '/v2/', { headers: auth() })).status, 200);
    });

    it('broker: refuses missing and wrong credentials with a Basic challenge', async () => {
      const missing = await rawRequest(proxy.url, '/v2/corp/team/app/manifests/1.0');
      assert.equal(missing.status, 401);
      // Basic alone on a repository path: containerd answers this challenge, and stays on Basic.
      assert.equal(missing.headers['www-authenticate'], 'Basic realm="pullbridge"');
      const wrong = await rawRequest(proxy.url, '/v2/corp/team/app/manifests/1.0', { headers: { authorization: `Basic ${Buffer.from('shop:pb1.nope').toString('base64')}` } });
      assert.equal(wrong.status, 401);
      const bearer = await rawRequest(proxy.url, '/v2/corp/team/app/manifests/1.0', { headers: { authorization: 'Bearer something' } });
      assert.equal(bearer.status, 401);
    });

    it('broker: uses the rule\'s own upstream credentials, never the client\'s', async () => {
      const res = await rawRequest(proxy.url, '/v2/private/team/app/manifests/1.0', { headers: { ...auth(), accept: OCI_INDEX } });
      assert.equal(res.status, 200);
      assert.ok(res.body.equals(image.index.data));
    });

    it('answers 503 (not 500, not the secret path) when its own upstream credentials cannot be read', async () => {
      const res = await rawRequest(proxy.url, '/v2/wrongcreds/team/app/manifests/1.0', { headers: auth() });
      assert.equal(res.status, 503);
      assert.equal(errorCode(res), 'UNAVAILABLE');
      assert.doesNotMatch(res.body.toString(), /missing-password-file/);
    });

    it('anonymous: serves without client credentials', async () => {
      const res = await rawRequest(proxy.url, '/v2/open/team/app/manifests/1.0', { headers: { accept: OCI_INDEX } });
      assert.equal(res.status, 200);
    });

    it('passthrough: uses the client\'s credentials upstream and answers a rejection with a Basic challenge', async () => {
      const good = await rawRequest(proxy.url, '/v2/pass/team/app/manifests/1.0', { headers: { authorization: `Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString('base64')}`, accept: OCI_INDEX } });
      assert.equal(good.status, 200);
      const bad = await rawRequest(proxy.url, '/v2/pass/team/app/manifests/1.0', { headers: { authorization: `Basic ${Buffer.from(`${USER}:wrong`).toString('base64')}` } });
      assert.equal(bad.status, 401);
      assert.equal(bad.headers['www-authenticate'], 'Basic realm="pullbridge"');
      const none = await rawRequest(proxy.url, '/v2/pass/team/app/manifests/1.0');
      assert.equal(none.status, 401);
    });
  });

  describe('upstream Bearer tokens', () => {
    let tokenUpstream: RegistryHandle;
    let p: ProxyUnderTest;
    before(async () => {
      tokenUpstream = await startRegistry({ auth: 'token' });
      await tokenUpstream.push(image, 'team/app', '1.0');
      p = await startProxy({
        registries: [
          // The token issuer listens on another port than the registry: trusted only when listed.
          { name: 'tok', match: ['t.example'], upstream: tokenUpstream.url, credentials: { username: USER, passwordFile }, auth: { tokenRealms: [new URL(tokenUpstream.issuer!.realm).origin] } },
          { name: 'tokpass', match: ['tp.example'], upstream: tokenUpstream.url, auth: { mode: 'passthrough', tokenRealms: [new URL(tokenUpstream.issuer!.realm).origin] } },
        ],
      });
    });
    after(async () => {
      await p?.close();
      await tokenUpstream?.stop();
    });

    it('refetches a token once when the registry stops accepting the cached one', async () => {
      const issuer = tokenUpstream.issuer!;
      const get = () => rawRequest(p.url, '/v2/tok/team/app/manifests/1.0', { headers: { authorization: p.authorization('shop'), accept: OCI_INDEX } });
      // A token announced for 300 s that the registry refuses (expired beyond its leeway): as if revoked.
      issuer.jwtLifetime = -3600;
      const seen = issuer.requests.length;
      const refused = await get();
      assert.equal(refused.status, 403, 'one retry with a fresh token, then the refusal is reported');
      assert.equal(issuer.requests.length, seen + 1);
      issuer.jwtLifetime = undefined;
      // The cached token is refused now: it is dropped, a new one fetched once, the pull served.
      assert.equal((await get()).status, 200);
      assert.equal(issuer.requests.length, seen + 2, 'exactly one more token');
      assert.equal((await get()).status, 200);
      assert.equal(issuer.requests.length, seen + 2, 'and that one is cached');
    });

    it('passthrough: fetches tokens with the client\'s credentials and keeps them apart per client', async () => {
      const issuer = tokenUpstream.issuer!;
      const as = (password: string) => rawRequest(p.url, '/v2/tokpass/team/app/manifests/1.0', { headers: { authorization: `Basic ${Buffer.from(`${USER}:${password}`).toString('base64')}`, accept: OCI_INDEX } });
      assert.equal((await as(PASSWORD)).status, 200);
      assert.equal(issuer.requests.at(-1)?.user, USER);
      const wrong = await as('wrong');
      assert.equal(wrong.status, 401, 'a wrong password is not served from the right one\'s cached token');
      assert.equal(wrong.headers['www-authenticate'], 'Basic realm="pullbridge"');
    });
  });

  describe('hostile input on the wire', () => {
    const cases: Array<[string, string, string, number]> = [
      ['dot segments', 'GET', '/v2/corp/../../etc/passwd/manifests/1', 400],
      ['encoded traversal', 'GET', '/v2/corp/%2e%2e/%2e%2e/manifests/1', 400],
      ['encoded slash', 'GET', '/v2/corp/team%2Fapp/manifests/1', 400],
      ['an absolute-form target (open proxy attempt)', 'GET', `http://127.0.0.1:1/v2/`, 400],
      ['an invalid digest', 'GET', '/v2/corp/team/app/blobs/sha256:zz', 400],
      ['a push', 'PUT', '/v2/corp/team/app/manifests/1', 405],
      ['an upload', 'POST', '/v2/corp/team/app/blobs/uploads/', 405],
    ];
    for (const [name, method, path, status] of cases) {
      it(`refuses ${name} with ${status} and a registry error`, async () => {
        const res = await rawRequest(proxy.url, path, { method, headers: auth() });
        assert.equal(res.status, status);
        assert.ok(errorCode(res));
      });
    }

    it('refuses oversized headers with 431 and stays up', async () => {
      // Over Node's 16 KiB header limit, written whole before the server answers (a larger header
      // would be cut by the server's close, and the 431 lost to the reset): what came back is read raw.
      const u = new URL(proxy.url);
      const answer = await new Promise<string>((resolve, reject) => {
        const socket = net.connect(Number(u.port), u.hostname, () => socket.write(`GET /v2/ HTTP/1.1\r\nHost: ${u.host}\r\nX-Big: ${'a'.repeat(20 * 1024)}\r\n\r\n`));
        let text = '';
        socket.setEncoding('latin1');
        socket.on('data', (chunk: string) => (text += chunk));
        socket.on('close', () => resolve(text));
        socket.on('error', (error) => (text ? resolve(text) : reject(error)));
      });
      assert.match(answer, /^HTTP\/1\.1 431 /);
      assert.equal((await rawRequest(proxy.url, '/healthz')).status, 200);
    });

    it('never tunnels a CONNECT', async () => {
      const u = new URL(proxy.url);
      const outcome = await new Promise<string>((resolve) => {
        const req = http.request({ host: u.hostname, port: u.port, method: 'CONNECT', path: `127.0.0.1:${upstream.port}` });
        req.on('connect', (res) => resolve(`connected ${res.statusCode}`));
        req.on('response', (res) => resolve(`response ${res.statusCode}`));
        req.on('error', () => resolve('closed'));
        req.end();
      });
      assert.ok(!outcome.startsWith('connected 200'), outcome);
    });
  });

  describe('connection status', () => {
    it('probes every upstream through its transport, auth included, and serves the status', async () => {
      const statuses = await proxy.prober.probeAll();
      const by = Object.fromEntries(statuses.map((s) => [s.rule, s]));
      assert.equal(by.corp?.reachable, true);
      assert.equal(by.corp?.authOk, true);
      assert.equal(by.private?.authOk, true);
      assert.equal(by.pass?.reachable, true);
      assert.equal(by.pass?.authOk, null, 'passthrough has no credentials of its own to check');
      assert.equal(by.wrongcreds?.reachable, true);
      assert.equal(by.wrongcreds?.authOk, false);
      assert.match(by.wrongcreds?.lastError ?? '', /cannot read secret file/);
      const status = JSON.parse((await rawRequest(proxy.url, '/status')).body.toString()) as { configLoaded: boolean; upstreams: Array<{ rule: string; lastSuccess: string | null }> };
      assert.equal(status.configLoaded, true);
      assert.equal(status.upstreams.length, 5);
      assert.ok(status.upstreams.find((u) => u.rule === 'corp')?.lastSuccess);
      const metrics = (await rawRequest(proxy.url, '/metrics')).body.toString();
      assert.match(metrics, /pullbridge_upstream_up\{rule="corp"\} 1/);
      assert.match(metrics, /pullbridge_upstream_auth_ok\{rule="wrongcreds"\} 0/);
      assert.match(metrics, /pullbridge_proxy_requests_total\{rule="corp",kind="blob",status="200",access="pull"\} \d+/);
    });

    it('reports an unreachable upstream and answers pulls from it with 502', async () => {
      const closed = await freePort();
      const p = await startProxy({ registries: [{ name: 'gone', match: ['g.example'], upstream: `http://127.0.0.1:${closed}`, auth: { mode: 'anonymous' } }] });
      try {
        const [status] = await p.prober.probeAll();
        assert.equal(status?.reachable, false);
        assert.match(status?.lastError ?? '', /ECONNREFUSED/);
        const res = await rawRequest(p.url, '/v2/gone/team/app/manifests/1');
        assert.equal(res.status, 502);
        assert.equal(errorCode(res), 'UNAVAILABLE');
        assert.match(res.body.toString(), /ECONNREFUSED/);
        assert.equal((await rawRequest(p.url, '/readyz')).status, 200, 'probing never makes the proxy unready');
      } finally {
        await p.close();
      }
    });

    it('reports a name-resolution failure (injected resolver, no DNS query) as 502', async () => {
      const asked: string[] = [];
      const lookup = (hostname: string, _options: object, callback: (err: NodeJS.ErrnoException | null, address: string, family?: number) => void) => {
        asked.push(hostname);
        callback(Object.assign(new Error(`getaddrinfo ENOTFOUND ${hostname}`), { code: 'ENOTFOUND' }), '', 4);
      };
      const p = await startProxy({ registries: [{ name: 'dns', match: ['d.example'], upstream: 'http://registry.corp.example:5000', auth: { mode: 'anonymous' } }] }, { lookup });
      try {
        const res = await rawRequest(p.url, '/v2/dns/team/app/manifests/1');
        assert.equal(res.status, 502);
        assert.match(res.body.toString(), /ENOTFOUND/);
        assert.deepEqual([...new Set(asked)], ['registry.corp.example']);
      } finally {
        await p.close();
      }
    });
  });
});
