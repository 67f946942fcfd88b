// A cache never widens who can read what, against real registries: content stored through one rule
// or repository is not served through another the upstream does not confirm; namespace and
// repository filters refuse cached content as they refuse any other; in passthrough mode a wrong
// credential is refused upstream even for cached blobs and tags, and a right one is served from
// the store. (What the cache does for pulls it may serve is in cache.test.ts.)

import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { rawRequest, type RawResponse } from './support/http.js';
import { buildImage, sha256, type TestImage } from './support/oci.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';

const [USER, PASSWORD] = Object.entries(DEFAULT_USERS)[0] as [string, string];
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const basic = (user: string, password: string) => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
const errorCode = (r: RawResponse) => ((JSON.parse(r.body.toString()) as { errors: Array<{ code: string }> }).errors[0] ?? { code: '' }).code;

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
