// verify enforced by the proxy on every pull: real registry, real cosign signatures, real proxy,
// skopeo (containers/image) as the puller. Admission can be skipped; these pulls never see it.

import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { verifyRequirement } from '../src/rules/verifypolicy.js';
import { signatureTag } from '../src/signature/cosign.js';
import { startContainerd, type Containerd } from './support/containerd.js';
import { cosignVerifies, generateKeyPair, removeCosignFiles, sign, type CosignKeyPair } from './support/cosign.js';
import { configFrom } from './support/config.js';
import { buildImage, type TestImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

describe('verify policy: which rule\'s verify holds for a repository', () => {
  const config = configFrom(`
broker: { keyFiles: [/keys/broker.key] }
registries:
  - name: signed
    match: [r.example]
    upstream: http://127.0.0.1:5000
    repositories: { include: ['priv/**'] }
    verify: { cosign: { publicKeyFiles: [/keys/cosign.pub] } }
  - name: corp
    match: [r.example]
    upstream: http://127.0.0.1:5000/
  - name: other
    match: [o.example]
    upstream: http://127.0.0.1:5001
`);
  const rule = (name: string) => config.registries.find((r) => r.name === name)!;

  it('is the rule\'s own verify, else the verify of a rule on the same upstream admitting the repository', () => {
    assert.equal(verifyRequirement(config.registries, rule('signed'), 'priv/app')?.from, 'signed');
    assert.equal(verifyRequirement(config.registries, rule('corp'), 'priv/app')?.from, 'signed');
    assert.deepEqual(verifyRequirement(config.registries, rule('corp'), 'priv/app')?.verify.cosign.publicKeyFiles, ['/keys/cosign.pub']);
    // Outside the verify rule's repositories, or on another upstream: nothing is required.
    assert.equal(verifyRequirement(config.registries, rule('corp'), 'pub/app'), undefined);
    assert.equal(verifyRequirement(config.registries, rule('other'), 'priv/app'), undefined);
  });
});

describe('the proxy serves manifests of verify rules only when signed', function () {
  this.timeout(300_000);
  let registry: RegistryHandle;
  let signer: CosignKeyPair;
  let proxy: ProxyUnderTest;
  const images = new Map<string, TestImage>();

  const skopeo = (args: string[]) => runAsync('skopeo', args, { timeoutMs: 60_000 });
  const inspect = (reference: string) => skopeo(['inspect', '--raw', '--tls-verify=false', '--creds', proxy.credential('shop'), `docker://${proxy.host}/${reference}`]);
  const denials = () => proxy.logs.records.filter((r) => r.msg === 'request' && typeof r.error === 'string' && r.error.includes('signature not verified'));

  before(async () => {
    registry = await startRegistry({ auth: 'none', accessLog: true });
    for (const name of ['app', 'unsigned', 'later', 'burst']) {
      const image = buildImage({ layerSizes: [2048] }); // two platforms: an index over two manifests
      images.set(name, image);
      await registry.push(image, `priv/${name}`, '1.0');
    }
    signer = await generateKeyPair();
    // cosign signs the index digest only (no --recursive): the children are served as its children.
    await sign(`${registry.host}/priv/app@${images.get('app')!.index.digest}`, signer);
    await sign(`${registry.host}/priv/burst@${images.get('burst')!.index.digest}`, signer);
    proxy = await startProxy({
      registries: [
        { name: 'signed', match: ['r.example'], upstream: registry.url, repositories: { include: ['priv/**'] }, verify: { cosign: { publicKeyFiles: [signer.publicKeyFile] } } },
        { name: 'corp', match: ['corp.example'], upstream: registry.url },
      ],
    });
  });

  after(async () => {
    await proxy?.close();
    await registry?.stop();
    removeCosignFiles();
  });

  it('serves a signed multi-arch image to skopeo, its children by digest included', async () => {
    const image = images.get('app')!;
    const out = mkdtempSync(join(tmpdir(), 'pullbridge-skopeo-'));
    await skopeo(['copy', '--all', '--quiet', '--src-tls-verify=false', '--src-creds', proxy.credential('shop'), `docker://${proxy.host}/signed/priv/app:1.0`, `oci:${out}:copied`]);
    const stored = new Set(readdirSync(join(out, 'blobs', 'sha256')).map((f) => `sha256:${f}`));
    for (const [digest, blob] of image.blobs) {
      assert.ok(stored.has(digest), `skopeo lacks ${digest}`);
      assert.ok(readFileSync(join(out, 'blobs', 'sha256', digest.slice(7))).equals(blob.data));
    }
    // Through another rule on the same upstream too: the signature is the same.
    await inspect('corp/priv/app:1.0');
    assert.deepEqual(denials(), []);
  });

  it('cosign verify through the proxy: the signature manifest (unsigned itself, runnable nowhere) is served; an unsigned image fails', async () => {
    const [user, password] = proxy.credential('shop').split(/:(.*)/s) as [string, string];
    const registryAuth = { username: user, password };
    assert.equal(await cosignVerifies(`${proxy.host}/signed/priv/app@${images.get('app')!.index.digest}`, signer, { registryAuth }), true);
    assert.equal(await cosignVerifies(`${proxy.host}/signed/priv/unsigned@${images.get('unsigned')!.index.digest}`, signer, { registryAuth }), false);
  });

  it('serves a signed image to containerd (ctr), one platform\'s manifest by digest, and refuses an unsigned one', async () => {
    const containerd: Containerd = await startContainerd();
    try {
      const image = images.get('app')!;
      await containerd.fetch(`${proxy.host}/corp/priv/app:1.0`, { user: proxy.credential('shop'), platform: 'linux/arm64' });
      const stored = await containerd.digests();
      // The index (signed) and the arm64 manifest (its child, fetched by digest, not signed itself).
      assert.ok(stored.has(image.index.digest));
      const arm64 = image.manifests[1]!;
      assert.ok((await containerd.content(arm64.digest)).equals(arm64.data));
      await assert.rejects(containerd.fetch(`${proxy.host}/corp/priv/unsigned:1.0`, { user: proxy.credential('shop') }), /403|denied|forbidden/i);
    } finally {
      await containerd.stop();
    }
  });

  it('denies an unsigned image whatever the path: the verify rule\'s, another rule\'s on the same upstream, by digest, a child by digest', async () => {
    const image = images.get('unsigned')!;
    const child = image.manifests[0]!.digest;
    for (const reference of ['signed/priv/unsigned:1.0', 'corp/priv/unsigned:1.0', `corp/priv/unsigned@${image.index.digest}`, `signed/priv/unsigned@${child}`]) {
      await assert.rejects(inspect(reference), (error: Error) => /signature not verified: unsigned/.test(error.message), reference);
    }
    // HEAD too (what containerd asks first), answered 403 without a body.
    const head = await fetch(`${proxy.url}/v2/corp/priv/unsigned/manifests/1.0`, { method: 'HEAD', headers: { authorization: proxy.authorization('shop'), accept: 'application/vnd.oci.image.index.v1+json' } });
    assert.equal(head.status, 403);
    const get = await fetch(`${proxy.url}/v2/corp/priv/unsigned/manifests/1.0`, { headers: { authorization: proxy.authorization('shop'), accept: 'application/vnd.oci.image.index.v1+json' } });
    assert.equal(get.status, 403);
    const body = (await get.json()) as { errors: Array<{ code: string; message: string }> };
    assert.equal(body.errors[0]?.code, 'DENIED');
    assert.match(body.errors[0]!.message, new RegExp(`^signature not verified: unsigned \\(no ${signatureTag(image.index.digest)} and no signature referrers\\)`));
    // The access log names the reason for each refusal.
    const logged = denials();
    assert.ok(logged.length >= 6, `six denials logged, got ${logged.length}`);
    assert.ok(logged.every((r) => r.status === 403 && r.kind === 'manifest'));
    assert.ok(logged.some((r) => r.rule === 'corp' && r.repository === 'priv/unsigned'));
  });

  it('checks a digest once for pulls arriving together, and not again for the next pull (the verdict is kept)', async () => {
    const digest = images.get('burst')!.index.digest;
    const earlier = (await registry.requests()).length; // cosign sign read the signature tag too
    const get = () => fetch(`${proxy.url}/v2/signed/priv/burst/manifests/1.0`, { headers: { authorization: proxy.authorization('shop'), accept: 'application/vnd.oci.image.index.v1+json' } }).then((r) => r.status);
    assert.deepEqual(await Promise.all(Array.from({ length: 8 }, get)), Array(8).fill(200));
    assert.equal(await get(), 200);
    const signatureReads = (await registry.requests()).slice(earlier).filter((r) => r.method === 'GET' && r.path === `/v2/priv/burst/manifests/${signatureTag(digest)}`);
    assert.equal(signatureReads.length, 1);
  });

  it('serves an image once its signature was pushed, after the short refusal time', async () => {
    const image = images.get('later')!;
    await assert.rejects(inspect('signed/priv/later:1.0'), /signature not verified: unsigned/);
    await sign(`${registry.host}/priv/later@${image.index.digest}`, signer);
    // Polled, bounded: the refusal is remembered for REFUSED_TTL_MS (30 s), then the check runs again.
    const deadline = Date.now() + 120_000;
    let raw: string | undefined;
    while (raw === undefined) {
      try {
        raw = await inspect('signed/priv/later:1.0');
      } catch (error) {
        assert.match((error as Error).message, /signature not verified: unsigned/);
        if (Date.now() > deadline) throw new Error('still refused two minutes after the signature was pushed');
        await new Promise((resolve) => setTimeout(resolve, 2_000));
      }
    }
    assert.equal(JSON.parse(raw).mediaType, 'application/vnd.oci.image.index.v1+json');
  });
});
