// A cache never widens who can read what, against real registries: content stored through one rule
// or repository is not served through another the upstream does not confirm; namespace and
// repository filters refuse cached content as they refuse any other; in passthrough mode a wrong
// credential is refused upstream even for cached blobs and tags, and a right one is served from
// the store. (What the cache does for pulls it may serve is in cache.test.ts.)

import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { listen, type RunningServer } from '../src/shell/serve.js';
import { errorCode, rawRequest, type RawResponse } from './support/http.js';
import { buildImage, sha256, type TestImage } from './support/oci.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const [USER, PASSWORD] = Object.entries(DEFAULT_USERS)[0] as [string, string];
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const basic = (user: string, password: string) => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
/** Files under `root` (recursively) whose path contains `part`. */
const filesWith = (root: string, part: string) =>
  readdirSync(root, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath, e.name))
    .filter((path) => path.includes(part));

describe('node cache isolation against real registries', function () {
  this.timeout(120_000);
  let open: RegistryHandle;
  let other: RegistryHandle;
  let secured: RegistryHandle;
  let image: TestImage;
  let proxy: ProxyUnderTest;

  before(async () => {
    [open, other, secured] = await Promise.all([startRegistry({ accessLog: true }), startRegistry({ accessLog: true }), startRegistry({ auth: 'basic', accessLog: true })]);
    image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }] });
    const unrelated = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }] });
    await Promise.all([
      open.push(image, 'team/app', '1'),
      open.push(image, 'team/copy', '1'),
      open.push(image, 'team/hidden', '1'),
      open.push(unrelated, 'team/other', '1'),
      other.push(unrelated, 'team/app', '1'),
      secured.push(image, 'team/app', '1'),
    ]);
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-cache-isolation-'));
    writeFileSync(join(dir, 'password'), PASSWORD);
    proxy = await startProxy({
      cache: { path: join(dir, 'cache'), tagTTLSeconds: 3600 },
      registries: [
        { name: 'a', match: ['a.example'], upstream: open.url, namespaces: { include: ['shop'] }, repositories: { exclude: ['team/hidden'] } },
        { name: 'b', match: ['b.example'], upstream: other.url },
        { name: 'pass', match: ['pass.example'], upstream: secured.url, auth: { mode: 'passthrough' } },
      ],
    });
    // Everything of the image stored through rule a for team/app.
    await pull('a', 'team/app', proxy.authorization('shop'));
  });
  after(async () => {
    await proxy?.close();
    await Promise.all([open?.stop(), other?.stop(), secured?.stop()]);
  });

  const layer = () => image.layers[0]!;
  const get = (path: string, authorization: string, accept = OCI_MANIFEST) => rawRequest(proxy.url, path, { headers: { authorization, accept } });
  /** The image by tag, its manifests by digest and its blobs, through `rule`; every body must match. */
  async function pull(rule: string, repository: string, authorization: string): Promise<void> {
    const index = await get(`/v2/${rule}/${repository}/manifests/1`, authorization, OCI_INDEX);
    assert.equal(index.status, 200, index.body.toString());
    assert.ok(index.body.equals(image.index.data));
    for (const m of image.manifests) assert.ok((await get(`/v2/${rule}/${repository}/manifests/${m.digest}`, authorization)).body.equals(m.data));
    for (const b of [...image.configs, ...image.layers]) {
      const res = await get(`/v2/${rule}/${repository}/blobs/${b.digest}`, authorization);
      assert.equal(res.status, 200);
      assert.equal(sha256(res.body), b.digest);
    }
  }
  const asked = async (registry: RegistryHandle, path: string) => (await registry.requests()).filter((r) => r.path === path);

  it('does not serve a blob or manifest stored through one rule through another whose upstream lacks it: 404, and that upstream was asked', async () => {
    const blob = await get(`/v2/b/team/app/blobs/${layer().digest}`, proxy.authorization('shop'));
    assert.equal(blob.status, 404);
    assert.equal(errorCode(blob), 'BLOB_UNKNOWN');
    assert.ok((await asked(other, `/v2/team/app/blobs/${layer().digest}`)).length > 0, 'rule b asked its upstream');
    const manifest = await get(`/v2/b/team/app/manifests/${image.manifests[0]!.digest}`, proxy.authorization('shop'));
    assert.equal(manifest.status, 404);
    assert.ok((await asked(other, `/v2/team/app/manifests/${image.manifests[0]!.digest}`)).length > 0);
  });

  it('does not serve it through the same rule for a repository the upstream does not hold it in; does for one that does, from the store', async () => {
    const blob = await get(`/v2/a/team/other/blobs/${layer().digest}`, proxy.authorization('shop'));
    assert.equal(blob.status, 404);
    assert.ok((await asked(open, `/v2/team/other/blobs/${layer().digest}`)).length > 0);
    // team/copy holds the same blob upstream: confirmed (a HEAD), then served from the store.
    const transfers = await open.blobGets(layer().digest);
    const copy = await get(`/v2/a/team/copy/blobs/${layer().digest}`, proxy.authorization('shop'));
    assert.equal(copy.status, 200);
    assert.equal(sha256(copy.body), layer().digest);
    assert.equal(await open.blobGets(layer().digest), transfers, 'no second transfer');
    assert.deepEqual((await asked(open, `/v2/team/copy/blobs/${layer().digest}`)).map((r) => r.method).filter((m) => m !== 'HEAD'), [], 'only confirmed');
  });

  it('refuses a namespace the rule does not include with 403, for cached content too, without asking upstream', async () => {
    const seen = (await open.requests()).length;
    for (const path of ['/v2/a/team/app/manifests/1', `/v2/a/team/app/manifests/${image.manifests[0]!.digest}`, `/v2/a/team/app/blobs/${layer().digest}`]) {
      const res = await get(path, proxy.authorization('intruder'), OCI_INDEX);
      assert.equal(res.status, 403, path);
      assert.equal(errorCode(res), 'DENIED');
    }
    assert.equal((await open.requests()).length, seen);
  });

  it("refuses a repository the rule excludes with 403, for cached content too, without asking upstream", async () => {
    const seen = (await open.requests()).length;
    for (const path of [`/v2/a/team/hidden/blobs/${layer().digest}`, `/v2/a/team/hidden/manifests/${image.manifests[0]!.digest}`]) {
      const res = await get(path, proxy.authorization('shop'));
      assert.equal(res.status, 403, path);
      assert.equal(errorCode(res), 'DENIED');
    }
    assert.equal((await open.requests()).length, seen);
  });

  describe('passthrough', () => {
    before(async () => pull('pass', 'team/app', basic(USER, PASSWORD)));

    it('refuses a wrong password with 401 for a cached blob, manifest and tag: the upstream said no', async () => {
      const wrong = basic(USER, 'not the password');
      for (const path of [`/team/app/blobs/${layer().digest}`, `/team/app/manifests/${image.manifests[0]!.digest}`, '/team/app/manifests/1']) {
        const seen = (await asked(secured, `/v2${path}`)).length;
        const res = await get(`/v2/pass${path}`, wrong, OCI_INDEX);
        assert.equal(res.status, 401, path);
        assert.match(String(res.headers['www-authenticate']), /^Basic /);
        assert.ok((await asked(secured, `/v2${path}`)).slice(seen).some((r) => r.status === 401), `the upstream refused ${path}`);
      }
      assert.equal(proxy.logs.records.filter((r) => r.access === 'pull' && r.status === 401).length, 3);
    });

    it('serves the right password from the store, without asking again within credentialTTLSeconds', async () => {
      const transfers = await secured.blobGets(layer().digest);
      const seen = (await secured.requests()).length;
      const res = await get(`/v2/pass/team/app/blobs/${layer().digest}`, basic(USER, PASSWORD));
      assert.equal(res.status, 200);
      assert.equal(sha256(res.body), layer().digest);
      assert.equal(await secured.blobGets(layer().digest), transfers);
      assert.equal((await secured.requests()).length, seen, 'confirmed by the pull before');
      assert.equal(proxy.logs.records.filter((r) => r.access === 'pull').at(-1)?.cache, 'hit');
    });
  });
});

describe('node cache isolation between upstreams: a HEAD confirms only content from its own upstream', function () {
  this.timeout(120_000);
  let secured: RegistryHandle;
  let hostile: RunningServer;
  let image: TestImage;
  let proxy: ProxyUnderTest;
  let dir: string;
  const hostileSeen: Array<{ method: string; path: string }> = [];

  before(async () => {
    secured = await startRegistry({ auth: 'basic', accessLog: true });
    image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }] });
    await secured.push(image, 'team/app', '1');
    const known = new Map([image.index, ...image.manifests, ...image.configs, ...image.layers].map((b) => [b.digest, b]));
    // A hostile upstream behind an anonymous rule; a real registry cannot be made to lie like this. It
    // says yes to every HEAD with the right digest, length and type (it knows the digests: they are
    // public in any pull's manifests) and never serves a byte.
    hostile = await listen(
      (req, res) => {
        const path = req.url ?? '';
        hostileSeen.push({ method: req.method ?? '', path });
        if (path === '/v2/') return void res.writeHead(200, { 'content-type': 'application/json' }).end('{}');
        const reference = /\/(?:manifests|blobs)\/([^/]+)$/.exec(path)?.[1] ?? '';
        const blob = known.get(reference) ?? (path.includes('/manifests/') ? image.index : undefined);
        if (req.method === 'HEAD' && blob) {
          return void res.writeHead(200, { 'docker-content-digest': blob.digest, 'content-length': blob.size, 'content-type': path.includes('/manifests/') ? blob.mediaType : 'application/octet-stream' }).end();
        }
        res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"BLOB_UNKNOWN","message":"not here"}]}');
      },
      { host: '127.0.0.1', port: 0 },
    );
    dir = mkdtempSync(join(tmpdir(), 'pullbridge-cache-origins-'));
    writeFileSync(join(dir, 'password'), PASSWORD);
    const credentials = { username: USER, passwordFile: join(dir, 'password') };
    proxy = await startProxy({
      cache: { path: join(dir, 'cache'), tagTTLSeconds: 3600, shared: { filesystem: { path: join(dir, 'shared') } } },
      registries: [
        // A private registry, its own credentials on the proxy, for namespace shop only.
        { name: 'a', match: ['a.example'], upstream: secured.url, credentials, namespaces: { include: ['shop'] } },
        // The same registry for namespace other, through another rule.
        { name: 'c', match: ['c.example'], upstream: secured.url, credentials, namespaces: { include: ['other'] } },
        { name: 'b', match: ['b.example'], upstream: hostile.url, auth: { mode: 'anonymous' } },
      ],
    });
    // The private image pulled through rule a: stored on the node and in the shared tier.
    const index = await get('/v2/a/team/app/manifests/1', proxy.authorization('shop'), OCI_INDEX);
    assert.equal(index.status, 200, index.body.toString());
    for (const m of image.manifests) assert.equal((await get(`/v2/a/team/app/manifests/${m.digest}`, proxy.authorization('shop'))).status, 200);
    for (const b of [...image.configs, ...image.layers]) assert.equal(sha256((await get(`/v2/a/team/app/blobs/${b.digest}`, proxy.authorization('shop'))).body), b.digest);
    await proxy.cache!.sharing();
  });
  after(async () => {
    await proxy?.close();
    await hostile?.close(100);
    await secured?.stop();
  });

  const get = (path: string, authorization?: string, accept = OCI_MANIFEST) => rawRequest(proxy.url, path, { headers: { ...(authorization ? { authorization } : {}), accept } });

  it('does not serve what rule a stored to an anonymous client of rule b, whose upstream says yes to every HEAD and serves nothing: 404, and no link for b', async () => {
    const paths = ['/v2/b/team/app/manifests/1', ...[...image.manifests, ...image.configs, ...image.layers].map((b) => `/v2/b/team/app/${b.mediaType.includes('manifest') ? 'manifests' : 'blobs'}/${b.digest}`)];
    for (const path of paths) {
      const res = await get(path, undefined, `${OCI_INDEX}, ${OCI_MANIFEST}`);
      assert.equal(res.status, 404, `${path}: ${res.status} ${res.body.length} bytes`);
    }
    assert.ok(hostileSeen.some((r) => r.method === 'GET'), 'the bytes were asked of rule b\'s own upstream');
    await proxy.cache!.sharing();
    // (What the upstream said the tag names is recorded, as for any tag; it serves nothing without a link.)
    assert.deepEqual(filesWith(join(dir, 'cache', 'repositories'), '/b/').filter((f) => f.includes('/_links/')), [], 'no link for b on the node');
    assert.deepEqual(filesWith(join(dir, 'shared'), '/repositories/b/').filter((f) => f.includes('/_links/')), [], 'no link for b in the shared tier');
  });

  it('serves it to rule c, on the same upstream, once that upstream confirms it (HEAD): blobs from the store, no second transfer', async () => {
    // Blobs are confirmed by a HEAD; a manifest by digest is fetched again (a few hundred bytes), as before.
    const blobs = [...image.configs, ...image.layers];
    const before = await secured.requests();
    const transfers = blobs.map((b) => before.filter((r) => r.method === 'GET' && r.path.endsWith(`/${b.digest}`)).length);
    const index = await get('/v2/c/team/app/manifests/1', proxy.authorization('other'), OCI_INDEX);
    assert.equal(index.status, 200);
    assert.ok(index.body.equals(image.index.data));
    for (const m of image.manifests) assert.ok((await get(`/v2/c/team/app/manifests/${m.digest}`, proxy.authorization('other'))).body.equals(m.data));
    for (const b of [...image.configs, ...image.layers]) assert.equal(sha256((await get(`/v2/c/team/app/blobs/${b.digest}`, proxy.authorization('other'))).body), b.digest);
    const after = await secured.requests();
    assert.deepEqual(blobs.map((b) => after.filter((r) => r.method === 'GET' && r.path.endsWith(`/${b.digest}`)).length), transfers, 'no GET of a blob');
    assert.ok(after.some((r) => r.method === 'HEAD' && r.path === `/v2/team/app/blobs/${image.layers[0]!.digest}`), 'confirmed with a HEAD');
  });
});
