// Listing for mirroring tools, with real parts: docker-registry upstreams (one with token auth,
// whose catalog needs the `registry:catalog:*` scope; one with Basic auth), the proxy as `pullbridge
// proxy` runs it, and crane, regctl and skopeo as mirroring tools run them against it.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { namespaceToken } from '../src/rules/credentials.js';
import { listen, type RunningServer } from '../src/shell/serve.js';
import { MAX_UPSTREAM_PAGES } from '../src/proxy/catalog.js';
import { errorCode, rawRequest, type RawResponse } from './support/http.js';
import { buildImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { runProxyUnderTest, type ProxyProcessUnderTest } from './support/proxy.js';
import { DEFAULT_USERS, startRegistry, type RegistryHandle } from './support/registry.js';
import { registryTools, type RegistryTools } from './support/registrytools.js';

const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
const [USER = 'puller'] = Object.keys(DEFAULT_USERS);
const PASSWORD = DEFAULT_USERS.puller;
/** Repositories the `corp` rule's filters leave out, more than one catalog page reads (legacy/*: not included). */
const LEGACY = Array.from({ length: MAX_UPSTREAM_PAGES + 1 }, (_, i) => `legacy/r${i}`);

describe('listing for mirroring tools (catalog, tag pages) through the proxy', function () {
  this.timeout(180_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-listing-'));
  const key = Buffer.from(randomBytes(32).toString('hex'));
  let corp: RegistryHandle;
  let shop: RegistryHandle;
  let mirror: RegistryHandle;
  let proxy: ProxyProcessUnderTest;
  let proxyHost: string;
  const tools: RegistryTools[] = [];
  const images = [buildImage({ platforms: [{ os: 'linux', architecture: 'amd64' }], layerSizes: [512] }), buildImage({ layerSizes: [256] })];
  const APP_TAGS: ReadonlyArray<[string, number]> = [['latest', 0], ['2.0', 1], ['1.0', 0], ['1.1', 1]];

  const credential = (namespace: string) => ({ username: namespace, password: namespaceToken(key, namespace) });
  const basic = (username: string, password: string) => ({ authorization: `Basic ${Buffer.from(`${username}:${password}`).toString('base64')}` });
  const as = (namespace: string) => {
    const c = credential(namespace);
    return basic(c.username, c.password);
  };
  const toolsAs = (username: string, password: string, host = proxyHost): RegistryTools => {
    const t = registryTools(host, username, password);
    tools.push(t);
    return t;
  };
  const body = <T>(res: RawResponse): T => JSON.parse(res.body.toString()) as T;
  /** Follows the Link headers from `path`, every page's answer in order (at most `limit` pages). */
  const walk = async (path: string, headers: Record<string, string>, limit = 50): Promise<RawResponse[]> => {
    const pages: RawResponse[] = [];
    let next: string | undefined = path;
    while (next !== undefined) {
      assert.ok(pages.length < limit, `more than ${limit} pages`);
      const res = await rawRequest(proxy.url, next, { headers });
      assert.equal(res.status, 200, res.body.toString());
      pages.push(res);
      const link = typeof res.headers.link === 'string' ? res.headers.link : undefined;
      next = link === undefined ? undefined : /^<([^>]+)>; rel="next"$/.exec(link)?.[1];
      if (link !== undefined) assert.ok(next, `a Link as distribution writes it: ${link}`);
    }
    return pages;
  };
  const catalogGets = async (registry: RegistryHandle) => (await registry.requests()).filter((r) => r.method === 'GET' && r.path === '/v2/_catalog' && r.status === 200).length;

  before(async () => {
    writeFileSync(join(dir, 'password'), PASSWORD);
    corp = await startRegistry({ auth: 'token', accessLog: true, anonymousPull: ['team/app'] });
    // Pages of at most 2: the proxy's n=1000 is refused there (400), and the proxy asks for its default page.
    shop = await startRegistry({ auth: 'basic', accessLog: true, catalogMaxEntries: 2 });
    mirror = await startRegistry();
    for (const [tag, i] of APP_TAGS) await corp.push(images[i] ?? images[0]!, 'team/app', tag);
    for (const repository of ['team/web', 'team/secret', ...LEGACY]) await corp.push(images[0]!, repository, '1');
    for (const repository of ['shop/search', 'shop/cart', 'shop/pay']) await shop.push(images[0]!, repository, '1');
    const credentials = { username: USER, passwordFile: join(dir, 'password') };
    const tokenRealms = [new URL(corp.issuer?.realm ?? '').origin];
    proxy = await runProxyUnderTest(
      {
        registries: [
          { name: 'shop', match: ['shop.example'], upstream: shop.url, credentials, namespaces: { include: ['shop-*'] } },
          { name: 'corp', match: ['corp.example'], upstream: corp.url, credentials, auth: { mode: 'broker', tokenRealms }, repositories: { include: ['team/**'], exclude: ['team/secret'] } },
          // Anonymous: the upstream's token endpoint grants no catalog scope to anyone (401): skipped.
          { name: 'pub', match: ['pub.example'], upstream: corp.url, auth: { mode: 'anonymous', tokenRealms } },
          // The client's own credential goes upstream; never a namespace credential.
          { name: 'pass', match: ['pass.example'], upstream: shop.url, auth: { mode: 'passthrough' } },
        ],
      },
      key,
    );
    proxyHost = new URL(proxy.url).host;
  });

  after(async () => {
    for (const t of tools) t.close();
    await proxy?.close();
    await Promise.all([corp, shop, mirror].map((r) => r?.stop()));
    rmSync(dir, { recursive: true, force: true });
  });

  const SHOP_A = ['corp/team/app', 'corp/team/web', 'shop/shop/cart', 'shop/shop/pay', 'shop/shop/search'];

  it('crane catalog and regctl repo ls list what a namespace may pull, as <rule>/<repository>, in lexical order', async () => {
    const c = credential('shop-a');
    const t = toolsAs(c.username, c.password);
    assert.deepEqual((await t.crane(['catalog', proxyHost])).trim().split('\n'), SHOP_A);
    assert.deepEqual((await t.regctl(['repo', 'ls', proxyHost])).trim().split('\n'), SHOP_A);
    // With --limit (n) and --last, regctl reads the one page it asks for.
    assert.deepEqual((await t.regctl(['repo', 'ls', '--limit', '2', proxyHost])).trim().split('\n'), SHOP_A.slice(0, 2));
    assert.deepEqual((await t.regctl(['repo', 'ls', '--limit', '2', '--last', 'corp/team/web', proxyHost])).trim().split('\n'), SHOP_A.slice(2, 4));
    // The access log names the namespace that listed.
    const logged = () => proxy.logs.records.filter((r) => r.kind === 'catalog' && r.namespace === 'shop-a' && r.status === 200).map((r) => r.reference);
    // A record is written once the proxy saw its response close, which may come after the client left: wait for it (bounded).
    for (let i = 0; i < 100 && logged().length < 4; i++) await new Promise((resolve) => setTimeout(resolve, 50));
    // crane asks 1000 at a time; regctl asks without n (the default page, 100), then n=2, then after corp/team/web.
    assert.deepEqual(logged(), ['n=1000', null, 'n=2', 'n=2&last=corp/team/web']);
  });

  it('pages with n=1 through Link headers (distribution format), each upstream asked from the rule part of last', async () => {
    const before = await catalogGets(corp);
    const first = await rawRequest(proxy.url, '/v2/_catalog?n=1', { headers: as('shop-a') });
    assert.equal(first.status, 200);
    // Nine names in a row that the rule's filter leaves out: the page ends after MAX_UPSTREAM_PAGES
    // upstream pages, empty, with a Link past the last name examined.
    assert.deepEqual(body(first), { repositories: [] });
    assert.equal(first.headers.link, `</v2/_catalog?last=${encodeURIComponent(`corp/${LEGACY[MAX_UPSTREAM_PAGES - 1]}`)}&n=1>; rel="next"`);
    assert.equal((await catalogGets(corp)) - before, MAX_UPSTREAM_PAGES, 'one upstream page of n=1 at a time, no more');

    const pages = await walk('/v2/_catalog?n=1', as('shop-a'));
    const listed = pages.flatMap((p) => body<{ repositories: string[] }>(p).repositories);
    assert.deepEqual(listed, SHOP_A);
    assert.ok(pages.every((p) => body<{ repositories: string[] }>(p).repositories.length <= 1));
    assert.equal(pages.at(-1)?.headers.link, undefined, 'the last page has no Link');
    const second = pages[1];
    assert.deepEqual(body(second!), { repositories: ['corp/team/app'] });
    assert.equal(second?.headers.link, '</v2/_catalog?last=corp%2Fteam%2Fapp&n=1>; rel="next"');
    // A page starting in the middle: after corp/team/web comes the next rule, from its start.
    const middle = await rawRequest(proxy.url, '/v2/_catalog?n=2&last=corp%2Fteam%2Fweb', { headers: as('shop-a') });
    assert.deepEqual(body(middle), { repositories: ['shop/shop/cart', 'shop/shop/pay'] });
    assert.equal(middle.headers.link, '</v2/_catalog?last=shop%2Fshop%2Fpay&n=2>; rel="next"');
  });

  it('answers n=1000 (what Harbor asks) and no n in one page without a Link; caps n above 1000', async () => {
    for (const query of ['?n=1000', '', '?n=5000']) {
      const res = await rawRequest(proxy.url, `/v2/_catalog${query}`, { headers: as('shop-a') });
      assert.equal(res.status, 200, `${query}: ${res.body.toString()}`);
      assert.deepEqual(body(res), { repositories: SHOP_A });
      assert.equal(res.headers.link, undefined);
    }
    // The upstream was asked for at most 1000, which distribution accepts (it refuses more with 400).
    const asked = (await corp.requests()).filter((r) => r.path === '/v2/_catalog');
    assert.ok(asked.every((r) => r.status !== 400), JSON.stringify(asked));
    // The shop upstream takes at most 2: it refused n=1000, and its default pages were followed.
    const shopAsked = (await shop.requests()).filter((r) => r.path === '/v2/_catalog').map((r) => r.status);
    assert.ok(shopAsked.includes(400) && shopAsked.includes(200), JSON.stringify(shopAsked));
  });

  it('refuses bad n and last with a clear 400', async () => {
    const bad = await rawRequest(proxy.url, '/v2/_catalog?n=ten', { headers: as('shop-a') });
    assert.equal(bad.status, 400);
    assert.equal(errorCode(bad), 'PAGINATION_NUMBER_INVALID');
    assert.match(bad.body.toString(), /n must be a non-negative integer, not \\"ten\\"/);
    const last = await rawRequest(proxy.url, '/v2/_catalog?last=Corp', { headers: as('shop-a') });
    assert.equal(last.status, 400);
    assert.equal(errorCode(last), 'NAME_INVALID');
    const tagLast = await rawRequest(proxy.url, '/v2/corp/team/app/tags/list?last=a/b', { headers: as('shop-a') });
    assert.equal(tagLast.status, 400);
    assert.equal(errorCode(tagLast), 'TAG_INVALID');
  });

  it('shows a namespace the rule refuses none of its repositories; challenges a client without a credential', async () => {
    const other = await rawRequest(proxy.url, '/v2/_catalog', { headers: as('other') });
    assert.equal(other.status, 200);
    assert.deepEqual(body(other), { repositories: ['corp/team/app', 'corp/team/web'] });
    const c = credential('other');
    assert.deepEqual((await toolsAs(c.username, c.password).crane(['catalog', proxyHost])).trim().split('\n'), ['corp/team/app', 'corp/team/web']);
    const none = await rawRequest(proxy.url, '/v2/_catalog');
    assert.equal(none.status, 401);
    assert.equal(none.headers['www-authenticate'], 'Basic realm="pullbridge"');
    const forged = await rawRequest(proxy.url, '/v2/_catalog', { headers: basic('shop-a', namespaceToken(randomBytes(32), 'shop-a')) });
    assert.equal(forged.status, 200, 'a credential that is no namespace credential may still be a passthrough one');
    assert.deepEqual(body(forged), { repositories: [] }, 'the passthrough upstream refused it: nothing listed');
  });

  it('lists a passthrough rule with the client own credential, and never sends it a namespace credential', async () => {
    const res = await rawRequest(proxy.url, '/v2/_catalog', { headers: basic(USER, PASSWORD) });
    assert.equal(res.status, 200);
    assert.deepEqual(body(res), { repositories: ['pass/shop/cart', 'pass/shop/pay', 'pass/shop/search'] });
    // A namespace credential sent to the shop upstream (htpasswd) would be refused there: a 401 in its log.
    const refusals = async () => (await shop.requests()).filter((r) => r.path === '/v2/_catalog' && r.status === 401).length;
    const before = await refusals();
    assert.deepEqual(body(await rawRequest(proxy.url, '/v2/_catalog', { headers: as('shop-a') })), { repositories: SHOP_A });
    assert.equal(await refusals(), before);
  });

  it('pages tag lists in the proxy though distribution 2.8 answers every tag, unsorted (regctl tag ls, crane ls)', async () => {
    const sorted = APP_TAGS.map(([tag]) => tag).sort();
    const c = credential('shop-a');
    const t = toolsAs(c.username, c.password);
    assert.deepEqual((await t.regctl(['tag', 'ls', `${proxyHost}/corp/team/app`])).trim().split('\n'), sorted);
    assert.deepEqual((await t.crane(['ls', `${proxyHost}/corp/team/app`])).trim().split('\n'), sorted);
    // n and last honoured by the proxy: the upstream answers every tag whatever it is asked.
    assert.deepEqual((await t.regctl(['tag', 'ls', '--limit', '2', '--last', '1.0', `${proxyHost}/corp/team/app`])).trim().split('\n'), ['1.1', '2.0']);
    const pages = await walk('/v2/corp/team/app/tags/list?n=1', as('shop-a'));
    assert.deepEqual(pages.map((p) => body<{ name: string; tags: string[] }>(p)), sorted.map((tag) => ({ name: 'corp/team/app', tags: [tag] })));
    assert.equal(pages[0]?.headers.link, '</v2/corp/team/app/tags/list?last=1.0&n=1>; rel="next"');
    const rest = await rawRequest(proxy.url, '/v2/corp/team/app/tags/list?last=1.1', { headers: as('shop-a') });
    assert.deepEqual(body(rest), { name: 'corp/team/app', tags: ['2.0', 'latest'] });
    assert.equal(rest.headers.link, undefined);
    // Repository filters hold for tag lists as for pulls.
    const secret = await rawRequest(proxy.url, '/v2/corp/team/secret/tags/list?n=1', { headers: as('shop-a') });
    assert.equal(secret.status, 403);
    const refused = await rawRequest(proxy.url, '/v2/shop/shop/cart/tags/list', { headers: as('other') });
    assert.equal(refused.status, 403);
  });

  it("skopeo sync mirrors a rule's repositories, listed by the catalog, with the upstream digests", async () => {
    const c = credential('shop-a');
    const listed = body<{ repositories: string[] }>(await rawRequest(proxy.url, '/v2/_catalog?n=1000', { headers: as('shop-a') })).repositories.filter((r) => r.startsWith('corp/'));
    assert.deepEqual(listed, ['corp/team/app', 'corp/team/web']);
    for (const repository of listed) {
      await runAsync('skopeo', ['sync', '--all', '--src', 'docker', '--dest', 'docker', '--src-tls-verify=false', '--dest-tls-verify=false', '--src-creds', `${c.username}:${c.password}`, `${proxyHost}/${repository}`, `${mirror.host}/mirror/${repository.split('/').slice(0, -1).join('/')}`]);
    }
    const expected: Array<[string, string]> = [...APP_TAGS.map(([tag]): [string, string] => ['team/app', tag]), ['team/web', '1']];
    for (const [repository, tag] of expected) {
      // The upstream's manifest as skopeo reads it there (crane refuses a token realm on loopback).
      const raw = await runAsync('skopeo', ['inspect', '--raw', '--tls-verify=false', '--creds', `${USER}:${PASSWORD}`, `docker://${corp.host}/${repository}:${tag}`]);
      const digest = `sha256:${createHash('sha256').update(raw).digest('hex')}`;
      const mirrored = await rawRequest(mirror.url, `/v2/mirror/corp/${repository}/manifests/${tag}`, { method: 'HEAD', headers: { accept: OCI_INDEX } });
      assert.equal(mirrored.status, 200, `${repository}:${tag}`);
      assert.equal(mirrored.headers['docker-content-digest'], digest, `${repository}:${tag}`);
    }
    const mirroredRepos = body<{ repositories: string[] }>(await rawRequest(mirror.url, '/v2/_catalog'));
    assert.deepEqual(mirroredRepos.repositories, ['mirror/corp/team/app', 'mirror/corp/team/web']);
  });

  it('answers 502 naming the rule when an upstream with a catalog fails, never a shorter catalog', async () => {
    await shop.kill();
    try {
      const res = await rawRequest(proxy.url, '/v2/_catalog', { headers: as('shop-a') });
      assert.equal(res.status, 502, res.body.toString());
      assert.equal(errorCode(res), 'UNAVAILABLE');
      assert.match(res.body.toString(), /rule \\"shop\\": upstream unreachable/);
      // A namespace that may not list the failing rule is not affected.
      const other = await rawRequest(proxy.url, '/v2/_catalog', { headers: as('other') });
      assert.deepEqual(body(other), { repositories: ['corp/team/app', 'corp/team/web'] });
    } finally {
      await shop.restart();
    }
  });
});

describe('listing: an upstream that ignores catalog pagination', () => {
  // A fake, for what docker-registry cannot do: answer every name, unsorted, whatever n and last say
  // (as some vendor registries and proxies do), with no Link.
  const names = ['zeta', 'alpha', 'mid/one', 'beta', 'mid/two'];
  const key = Buffer.from(randomBytes(32).toString('hex'));
  let upstream: RunningServer;
  let proxy: ProxyProcessUnderTest;
  const asked: string[] = [];

  before(async () => {
    upstream = await listen(
      (req, res) => {
        const url = req.url ?? '';
        if (url.startsWith('/v2/_catalog')) asked.push(url);
        const body = url.startsWith('/v2/_catalog') ? JSON.stringify({ repositories: names }) : '{}';
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body);
      },
      { host: '127.0.0.1', port: 0 },
    );
    proxy = await runProxyUnderTest({ registries: [{ name: 'vendor', match: ['vendor.example'], upstream: upstream.url, auth: { mode: 'anonymous' } }] }, key);
  });

  after(async () => {
    await proxy?.close();
    await upstream?.close(100);
  });

  it('pages the whole answer in the proxy: sorted, after last, n at a time, each page asking the upstream once', async () => {
    const pages: string[][] = [];
    let next: string | undefined = '/v2/_catalog?n=2';
    while (next !== undefined && pages.length < 10) {
      const res = await rawRequest(proxy.url, next);
      assert.equal(res.status, 200, res.body.toString());
      pages.push((JSON.parse(res.body.toString()) as { repositories: string[] }).repositories);
      next = typeof res.headers.link === 'string' ? /^<([^>]+)>; rel="next"$/.exec(res.headers.link)?.[1] : undefined;
    }
    assert.deepEqual(pages, [
      ['vendor/alpha', 'vendor/beta'],
      ['vendor/mid/one', 'vendor/mid/two'],
      ['vendor/zeta'],
    ]);
    assert.deepEqual(asked, ['/v2/_catalog?n=2', '/v2/_catalog?n=2&last=beta', '/v2/_catalog?n=2&last=mid%2Ftwo']);
  });
});
