// The OCI 1.1 referrers API through the proxy's registry port, against a real upstream with the API
// (go-containerregistry's registry with its referrers API on) and a real one without it
// (docker-registry 2.8): what clients see over HTTP, and what cosign and oras find through it.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cosignVerifies, generateKeyPair, removeCosignFiles, sign, type CosignKeyPair } from './support/cosign.js';
import { rawRequest } from './support/http.js';
import { buildImage, type TestImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';
import { orasBinary, startReferrersRegistry, type ReferrersRegistry } from './support/conformancetools.js';

const SIGNATURE_TYPE = 'application/vnd.dev.cosign.artifact.sig.v1+json';
const SBOM_TYPE = 'application/vnd.example.sbom.v1+json';
const INDEX_TYPE = 'application/vnd.oci.image.index.v1+json';

interface Index {
  readonly manifests: ReadonlyArray<{ readonly digest: string; readonly artifactType?: string }>;
}

describe('referrers API through the registry port', function () {
  this.timeout(240_000);
  let withApi: ReferrersRegistry;
  let distribution: RegistryHandle;
  let proxy: ProxyUnderTest;
  let image: TestImage;
  let key: CosignKeyPair;
  let work: string;

  const oras = (args: readonly string[]) => runAsync(orasBinary(), [...args], { env: { HOME: work, DOCKER_CONFIG: work } });

  before(async () => {
    work = mkdtempSync(join(tmpdir(), 'pullbridge-referrers-'));
    [withApi, distribution, key] = await Promise.all([startReferrersRegistry(), startRegistry({ auth: 'none' }), generateKeyPair()]);
    image = buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }] });
    await Promise.all([withApi.push(image, 'team/app', '1'), distribution.push(image, 'team/app', '1')]);
    // A cosign signature and an SBOM refer to the image on each upstream: as OCI 1.1 referrers where
    // the registry has the API, under the referrers tag sha256-<hex> where it has not (the clients'
    // fallback when pushing).
    writeFileSync(join(work, 'sbom.json'), '{"sbom": true}');
    for (const host of [withApi.host, distribution.host]) {
      await sign(`${host}/team/app@${image.index.digest}`, key, { referrers: true });
      await runAsync(orasBinary(), ['attach', '--plain-http', '--disable-path-validation', '--artifact-type', SBOM_TYPE, `${host}/team/app@${image.index.digest}`, `${join(work, 'sbom.json')}:application/json`], { env: { HOME: work, DOCKER_CONFIG: work } }).catch((error: Error) => {
        throw new Error(`oras attach on ${host}: ${error.message}`);
      });
    }
    proxy = await startProxy({
      registries: [
        { name: 'refs', match: ['refs.example'], upstream: withApi.url },
        { name: 'dist', match: ['dist.example'], upstream: distribution.url },
      ],
    });
  });

  after(async () => {
    await proxy?.close();
    await Promise.all([withApi?.stop(), distribution?.stop()]);
    removeCosignFiles();
    if (work) rmSync(work, { recursive: true, force: true });
  });

  const referrersPath = (rule: string, query = '') => `/v2/${rule}/team/app/referrers/${image.index.digest}${query}`;
  const parse = (body: Buffer): Index => JSON.parse(body.toString('utf8')) as Index;
  const typesOf = (index: Index) => index.manifests.map((d) => d.artifactType ?? '').sort();
  /** The artifact types each upstream itself lists for the image: its referrers API, or the referrers tag. */
  const upstreamTypes = async (rule: string): Promise<string[]> => {
    const direct = rule === 'refs' ? await rawRequest(withApi.url, `/v2/team/app/referrers/${image.index.digest}`) : await rawRequest(distribution.url, `/v2/team/app/manifests/${image.index.digest.replace(':', '-')}`, { headers: { accept: INDEX_TYPE } });
    assert.equal(direct.status, 200);
    const types = typesOf(parse(direct.body));
    // A signature and one other artifact (go-containerregistry lists the SBOM by its config's media type).
    assert.equal(types.length, 2);
    assert.ok(types.includes(SIGNATURE_TYPE));
    return types;
  };

  it("answers the upstream's referrers index", async () => {
    const direct = await rawRequest(withApi.url, `/v2/team/app/referrers/${image.index.digest}`);
    const r = await rawRequest(proxy.url, referrersPath('refs'), { headers: { authorization: proxy.authorization('shop') } });
    assert.equal(r.status, 200, r.body.toString());
    assert.equal(r.headers['content-type'], INDEX_TYPE);
    assert.equal(r.headers['oci-filters-applied'], undefined);
    assert.deepEqual(typesOf(parse(r.body)), await upstreamTypes('refs'));
    assert.deepEqual(parse(r.body).manifests.map((d) => d.digest).sort(), parse(direct.body).manifests.map((d) => d.digest).sort());
  });

  it('filters by artifactType when the upstream does not, and says so with OCI-Filters-Applied', async () => {
    const query = `?artifactType=${encodeURIComponent(SIGNATURE_TYPE)}`;
    // The upstream ignores the filter (the spec allows it): both referrers, no header.
    const direct = await rawRequest(withApi.url, `/v2/team/app/referrers/${image.index.digest}${query}`);
    assert.equal(direct.headers['oci-filters-applied'], undefined);
    assert.equal(parse(direct.body).manifests.length, 2);
    const r = await rawRequest(proxy.url, referrersPath('refs', query), { headers: { authorization: proxy.authorization('shop') } });
    assert.equal(r.status, 200, r.body.toString());
    assert.equal(r.headers['oci-filters-applied'], 'artifactType');
    assert.deepEqual(parse(r.body).manifests.map((d) => d.artifactType), [SIGNATURE_TYPE]);
  });

  it('answers 404 for an upstream without the API, and the referrers tag still answers', async () => {
    const r = await rawRequest(proxy.url, referrersPath('dist'), { headers: { authorization: proxy.authorization('shop') } });
    assert.equal(r.status, 404, r.body.toString());
    assert.match(r.body.toString(), /no referrers API/);
    const tag = await rawRequest(proxy.url, `/v2/dist/team/app/manifests/${image.index.digest.replace(':', '-')}`, { headers: { authorization: proxy.authorization('shop'), accept: INDEX_TYPE } });
    assert.equal(tag.status, 200, tag.body.toString());
    assert.deepEqual(typesOf(parse(tag.body)), await upstreamTypes('dist'));
  });

  it("passes on the upstream's own 404 for an unknown repository", async () => {
    const r = await rawRequest(proxy.url, `/v2/refs/team/nothing/referrers/${image.index.digest}`, { headers: { authorization: proxy.authorization('shop') } });
    assert.equal(r.status, 404);
    assert.equal((JSON.parse(r.body.toString()) as { errors: Array<{ code: string }> }).errors[0]?.code, 'NAME_UNKNOWN');
  });

  it('asks for credentials as a pull does', async () => {
    const r = await rawRequest(proxy.url, referrersPath('refs'));
    assert.equal(r.status, 401);
    assert.match(String(r.headers['www-authenticate']), /^Basic /);
    const wrong = await rawRequest(proxy.url, referrersPath('refs'), { headers: { authorization: `Basic ${Buffer.from('shop:not-the-token').toString('base64')}` } });
    assert.equal(wrong.status, 401);
  });

  /** Referrers requests the proxy answered for `rule` with `status`, from its metrics. */
  const referrersAnswered = async (rule: string, status: number): Promise<number> => {
    const text = await proxy.metrics.metrics();
    const line = text.split('\n').find((l) => l.startsWith('pullbridge_proxy_requests_total{') && l.includes(`rule="${rule}"`) && l.includes('kind="referrers"') && l.includes(`status="${status}"`));
    return line === undefined ? 0 : Number(line.split(' ').pop());
  };

  for (const rule of ['refs', 'dist']) {
    it(`cosign verify finds the signature through the proxy (${rule === 'refs' ? 'referrers API' : 'referrers tag'})`, async () => {
      const [username, password] = proxy.credential('shop').split(':') as [string, string];
      const reference = `${proxy.host}/${rule}/team/app@${image.index.digest}`;
      // The referrers API answered (refs), or answered 404 and cosign took the tag (dist).
      const status = rule === 'refs' ? 200 : 404;
      const before = await referrersAnswered(rule, status);
      assert.equal(await cosignVerifies(reference, key, { referrers: true, registryAuth: { username, password } }), true);
      assert.ok((await referrersAnswered(rule, status)) > before, `cosign asked the referrers API of ${rule}`);
      const other = await generateKeyPair();
      assert.equal(await cosignVerifies(reference, other, { referrers: true, registryAuth: { username, password } }), false);
    });

    it(`oras discover lists the referrers through the proxy (${rule === 'refs' ? 'referrers API' : 'referrers tag'})`, async () => {
      const [username, password] = proxy.credential('shop').split(':') as [string, string];
      const out = await oras(['discover', '--plain-http', '-u', username, '-p', password, '--format', 'json', `${proxy.host}/${rule}/team/app@${image.index.digest}`]);
      const listed = JSON.parse(out) as { referrers?: Array<{ artifactType: string }>; manifests?: Array<{ artifactType: string }> };
      const types = (listed.referrers ?? listed.manifests ?? []).map((d) => d.artifactType).sort();
      assert.deepEqual(types, await upstreamTypes(rule));
      const filtered = await oras(['discover', '--plain-http', '-u', username, '-p', password, '--artifact-type', SIGNATURE_TYPE, '--format', 'json', `${proxy.host}/${rule}/team/app@${image.index.digest}`]);
      const only = JSON.parse(filtered) as { referrers?: Array<{ artifactType: string }>; manifests?: Array<{ artifactType: string }> };
      assert.deepEqual((only.referrers ?? only.manifests ?? []).map((d) => d.artifactType), [SIGNATURE_TYPE]);
    });
  }
});
