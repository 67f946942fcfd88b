// The registry token flow: a site's own pull-through cache (docker-registry 2.8, which sends its
// credentials to a Bearer token endpoint only) in front of the proxy, with a namespace credential as
// its username/password; skopeo pulls through it. Basic keeps working for skopeo (first challenge at
// /v2/) and containerd (which prefers Bearer, but never sees it: it does not ping /v2/). Forged,
// expired and wrong-scope tokens are refused.

import assert from 'node:assert/strict';
import { createHmac, randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { grantedRepositories } from '../src/proxy/token.js';
import { bearerChallenge, parseScopes, REGISTRY_TOKEN_LIFETIME_SECONDS, registryTokenKey, signRegistryToken, tokenCovers, tokenRealm, verifyRegistryToken, type RegistryTokenClaims } from '../src/rules/registrytoken.js';
import { startContainerd, type Containerd } from './support/containerd.js';
import { errorCode, rawRequest } from './support/http.js';
import { buildImage, sha256, type TestImage } from './support/oci.js';
import { runAsync } from './support/procs.js';
import { startProxy, type ProxyUnderTest } from './support/proxy.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const errorMessage = (res: { body: Buffer }): string => (JSON.parse(res.body.toString()) as { errors: Array<{ message: string }> }).errors[0]?.message ?? '';
const now = () => Math.floor(Date.now() / 1000);
const claims = (over: Partial<RegistryTokenClaims> = {}): RegistryTokenClaims => ({ namespace: 'shop', repositories: ['corp/team/app'], issuedAt: now(), expiresAt: now() + 300, ...over });

describe('registry tokens (pure)', () => {
  const key = randomBytes(32);

  it('verifies its own tokens under any of the broker keys, and refuses forged, altered and expired ones', () => {
    const token = signRegistryToken(key, claims());
    const checked = verifyRegistryToken([randomBytes(32), key], token, now());
    assert.ok(checked.ok);
    assert.equal(checked.claims.namespace, 'shop');
    assert.deepEqual(verifyRegistryToken([randomBytes(32)], token, now()), { ok: false, reason: 'bad signature' });
    // Another namespace's claims under the same signature.
    const [prefix, payload, mac] = token.split('.');
    const altered = Buffer.from(JSON.stringify({ ...JSON.parse(Buffer.from(payload!, 'base64url').toString()), ns: 'other' })).toString('base64url');
    assert.deepEqual(verifyRegistryToken([key], `${prefix}.${altered}.${mac}`, now()), { ok: false, reason: 'bad signature' });
    assert.deepEqual(verifyRegistryToken([key], signRegistryToken(key, claims({ expiresAt: now() - 1 })), now()), { ok: false, reason: 'expired' });
    assert.deepEqual(verifyRegistryToken([key], 'pb1.abc', now()), { ok: false, reason: 'not a pullbridge registry token' });
  });

  it('is signed with a key derived from the broker key, never the broker key itself', () => {
    assert.notDeepEqual(registryTokenKey(key), key);
    // A MAC under the raw broker key is not accepted.
    const token = signRegistryToken(key, claims());
    const [prefix, payload] = token.split('.');
    const raw = createHmac('sha256', key).update(`${prefix}.${payload}`).digest('base64url');
    assert.equal(verifyRegistryToken([key], `${prefix}.${payload}.${raw}`, now()).ok, false);
  });

  it('covers exactly the repositories it names', () => {
    assert.ok(tokenCovers(claims(), 'corp', 'team/app'));
    assert.ok(!tokenCovers(claims(), 'corp', 'team/app2'));
    assert.ok(!tokenCovers(claims(), 'corp', 'team'));
  });

  it('parses repository scopes, repeated or space-separated, and skips other resource types', () => {
    assert.deepEqual(parseScopes(['repository:corp/team/app:pull', 'repository:corp/x:pull,push registry:catalog:*', 'nonsense']), [
      { name: 'corp/team/app', actions: ['pull'] },
      { name: 'corp/x', actions: ['pull', 'push'] },
    ]);
  });

  it('builds the realm from a plain Host only', () => {
    assert.equal(tokenRealm('http', '127.0.0.1:5000'), 'http://127.0.0.1:5000/token');
    assert.equal(tokenRealm('https', '[::1]:5000'), 'https://[::1]:5000/token');
    assert.equal(tokenRealm('http', 'localhost'), 'http://localhost/token');
    for (const hostile of ['evil"x', 'a/b', 'a@b', 'a b', '', 'x:99999999', undefined]) assert.equal(tokenRealm('http', hostile), null, String(hostile));
    assert.equal(bearerChallenge('http://h/token', 'repository:a/b:pull'), 'Bearer realm="http://h/token",service="pullbridge",scope="repository:a/b:pull"');
  });
});

describe('the registry token flow against real clients', function () {
  this.timeout(180_000);
  let upstream: RegistryHandle;
  let image: TestImage;
  let p: ProxyUnderTest;
  const cleanups: Array<() => Promise<void>> = [];

  before(async () => {
    upstream = await startRegistry({ auth: 'none' });
    image = buildImage({ layerSizes: [2048, 600 * 1024] });
    await upstream.push(image, 'team/app', '1.0');
    await upstream.push(image, 'team/other', '1.0');
    p = await startProxy({
      registries: [
        { name: 'corp', match: ['corp.example'], upstream: upstream.url, namespaces: { include: ['shop', 'ops'] }, repositories: { exclude: ['team/hidden'] } },
        { name: 'open', match: ['open.example'], upstream: upstream.url, auth: { mode: 'anonymous' } },
        { name: 'pass', match: ['pass.example'], upstream: upstream.url, auth: { mode: 'passthrough' } },
      ],
    });
  });
  after(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
    await p?.close();
    await upstream?.stop();
  });

  /** The challenges of a 401 as separate values (Node joins repeated headers with ", "). */
  function challengesOf(res: { headers: Record<string, unknown> }): string[] {
    const joined = String(res.headers['www-authenticate'] ?? '');
    return joined.split(/, (?=Basic |Bearer )/);
  }

  async function token(credential: string | null, ...scopes: string[]): Promise<{ status: number; body: Record<string, unknown> }> {
    const query = new URLSearchParams([['service', 'pullbridge'], ...scopes.map((s): [string, string] => ['scope', s])]);
    const res = await rawRequest(p.url, `/token?${query.toString()}`, { headers: credential ? { authorization: `Basic ${Buffer.from(credential).toString('base64')}` } : {} });
    return { status: res.status, body: JSON.parse(res.body.toString()) as Record<string, unknown> };
  }

  /** The proxy's access records, once one matching `match` has arrived (bounded). */
  async function accessRecord(match: (r: Record<string, unknown>) => boolean): Promise<Record<string, unknown>> {
    for (let i = 0; i < 200; i++) {
      const found = p.logs.records.find(match);
      if (found) return found;
      await new Promise((r) => setTimeout(r, 25));
    }
    assert.fail(`no access record matched; last: ${JSON.stringify(p.logs.records.slice(-5))}`);
  }

  it('challenges with Basic first, then Bearer with the realm on the host the client used', async () => {
    const base = await rawRequest(p.url, '/v2/');
    assert.equal(base.status, 401);
    assert.deepEqual(challengesOf(base), ['Basic realm="pullbridge"', `Bearer realm="http://${p.host}/token",service="pullbridge"`]);
    const named = await rawRequest(p.url, '/v2/', { headers: { host: `localhost:${p.server.port}` } });
    assert.deepEqual(challengesOf(named)[1], `Bearer realm="http://localhost:${p.server.port}/token",service="pullbridge"`);
    // A repository path without a token: Basic only (containerd, which never pings /v2/, answers
    // this challenge and would take Bearer if offered; containerd#9274).
    assert.deepEqual(challengesOf(await rawRequest(p.url, '/v2/corp/team/app/manifests/1.0')), ['Basic realm="pullbridge"']);
    assert.deepEqual(challengesOf(await rawRequest(p.url, '/v2/corp/team/app/manifests/1.0', { headers: { authorization: 'Basic c2hvcDpwYjEubm9wZQ==' } })), ['Basic realm="pullbridge"']);
    // A passthrough rule's client credential must reach the upstream: no token is offered there.
    assert.deepEqual(challengesOf(await rawRequest(p.url, '/v2/pass/team/app/manifests/1.0')), ['Basic realm="pullbridge"']);
    // A Host that is not a plain authority gets no Bearer challenge (nothing of it is reflected).
    const hostile = await rawRequest(p.url, '/v2/', { headers: { host: 'evil.example/x"y' } });
    assert.deepEqual(challengesOf(hostile), ['Basic realm="pullbridge"']);
  });

  it('issues a short-lived token for the repositories the credential may pull, and only those', async () => {
    const got = await token(p.credential('shop'), 'repository:corp/team/app:pull', 'repository:corp/team/hidden:pull', 'repository:pass/team/app:pull', 'repository:open/team/app:pull', 'repository:nosuch/x:pull');
    assert.equal(got.status, 200);
    assert.equal(got.body.expires_in, REGISTRY_TOKEN_LIFETIME_SECONDS);
    assert.equal(got.body.token, got.body.access_token);
    assert.ok(!Number.isNaN(Date.parse(String(got.body.issued_at))));
    const checked = verifyRegistryToken([p.key], String(got.body.token), now());
    assert.ok(checked.ok);
    assert.deepEqual(checked.claims.repositories, ['corp/team/app', 'open/team/app']);
    assert.ok(checked.claims.expiresAt - checked.claims.issuedAt === REGISTRY_TOKEN_LIFETIME_SECONDS);
    // A namespace the rule does not admit gets nothing from it.
    const outsider = verifyRegistryToken([p.key], String((await token(p.credential('intruder'), 'repository:corp/team/app:pull')).body.token), now());
    assert.ok(outsider.ok);
    assert.deepEqual(outsider.claims.repositories, []);
    // A wrong credential is refused; no credential is an anonymous token.
    const wrong = await token('shop:pb1.nope', 'repository:corp/team/app:pull');
    assert.equal(wrong.status, 401);
    const anonymous = await token(null, 'repository:corp/team/app:pull', 'repository:open/team/app:pull');
    assert.equal(anonymous.status, 200);
    const anon = verifyRegistryToken([p.key], String(anonymous.body.token), now());
    assert.ok(anon.ok);
    assert.equal(anon.claims.namespace, null);
    assert.deepEqual(anon.claims.repositories, ['open/team/app']);
    // OAuth2's POST is not offered: containerd falls back to GET on 405.
    assert.equal((await rawRequest(p.url, '/token', { method: 'POST' })).status, 405);
    // The token endpoint's record names the namespace and never the token or the credential.
    const record = await accessRecord((r) => r.kind === 'token' && r.namespace === 'shop');
    assert.doesNotMatch(JSON.stringify(p.logs.records), /pbt1\.|pb1\./);
    assert.equal(record.status, 200);
  });

  it('serves a pull with a token and refuses expired, forged, wrong-scope and anonymous ones with a challenge', async () => {
    const got = await token(p.credential('shop'), 'repository:corp/team/app:pull');
    const as = (bearer: string, path = '/v2/corp/team/app/manifests/1.0') => rawRequest(p.url, path, { headers: { authorization: `Bearer ${bearer}`, accept: 'application/vnd.oci.image.index.v1+json' } });
    const ok = await as(String(got.body.token));
    assert.equal(ok.status, 200);
    assert.equal(sha256(ok.body), image.index.digest);
    assert.equal((await rawRequest(p.url, '/v2/', { headers: { authorization: `Bearer ${String(got.body.token)}` } })).status, 200);
    // The challenge names the error, so that containerd (which keeps a token for the whole pull)
    // fetches a new one when a long pull outlasts it.
    const refusals: Array<[string, string, string | undefined, string]> = [
      ['expired', signRegistryToken(p.key, claims({ issuedAt: now() - 600, expiresAt: now() - 300 })), undefined, 'invalid_token'],
      ['forged', signRegistryToken(randomBytes(32), claims()), undefined, 'invalid_token'],
      ['wrong scope', String(got.body.token), '/v2/corp/team/other/manifests/1.0', 'insufficient_scope'],
      ['anonymous', String((await token(null, 'repository:corp/team/app:pull')).body.token), undefined, 'insufficient_scope'],
    ];
    for (const [what, bearer, path, error] of refusals) {
      const res = await as(bearer, path);
      assert.equal(res.status, 401, what);
      assert.equal(errorCode(res), 'UNAUTHORIZED', what);
      const repository = path === undefined ? 'app' : 'other';
      assert.equal(challengesOf(res)[1], `Bearer realm="http://${p.host}/token",service="pullbridge",scope="repository:corp/team/${repository}:pull",error="${error}"`, what);
    }
    assert.equal((await rawRequest(p.url, '/v2/', { headers: { authorization: `Bearer ${refusals[0]![1]}` } })).status, 401, 'an expired token at /v2/');
    // A token of a namespace the rule no longer admits: refused by the rule as configured now.
    const intruder = signRegistryToken(p.key, claims({ namespace: 'intruder' }));
    assert.equal((await as(intruder)).status, 403);
    // A repository the rule excludes says so (403), as with Basic, rather than "not granted".
    const hidden = await as(String(got.body.token), '/v2/corp/team/hidden/manifests/1.0');
    assert.equal(hidden.status, 403);
    assert.match(errorMessage(hidden), /excluded from rule "corp"/);
  });

  it('docker-registry 2.8 as a pull-through cache in front of the proxy serves skopeo the upstream\'s digests', async () => {
    const [username, password] = p.credential('shop').split(/:(.*)/s) as [string, string];
    const cache = await startRegistry({ pullThrough: { remoteUrl: p.url, username, password }, accessLog: true });
    cleanups.push(() => cache.stop());
    const out = mkdtempSync(join(tmpdir(), 'pullbridge-cache-'));
    cleanups.push(async () => rmSync(out, { recursive: true, force: true }));
    await runAsync('skopeo', ['copy', '--all', '--quiet', '--src-tls-verify=false', '--src-no-creds', `docker://${cache.host}/corp/team/app:1.0`, `oci:${out}:copied`], { timeoutMs: 120_000 });
    const stored = new Set(readdirSync(join(out, 'blobs', 'sha256')).map((f) => `sha256:${f}`));
    for (const digest of image.blobs.keys()) assert.ok(stored.has(digest), `the copy through the cache lacks ${digest}`);
    const raw = await runAsync('skopeo', ['inspect', '--raw', '--tls-verify=false', '--no-creds', `docker://${cache.host}/corp/team/app:1.0`]);
    assert.equal(sha256(Buffer.from(raw)), image.index.digest, 'the index digest the cache serves is the upstream\'s');
    // The proxy saw the cache's requests as the namespace, authenticated by token.
    const record = await accessRecord((r) => r.kind === 'manifest' && r.rule === 'corp' && r.status === 200 && r.credential === 'token');
    assert.equal(record.namespace, 'shop');
    assert.equal(record.repository, 'team/app');
    await accessRecord((r) => r.kind === 'token' && r.namespace === 'shop' && r.repository === 'corp/team/app');
  });

  describe('Basic keeps working', () => {
    let containerd: Containerd;
    before(async () => {
      containerd = await startContainerd();
    });
    after(async () => {
      await containerd?.stop();
    });

    it('skopeo (containers/image: the first challenge, Basic)', async () => {
      const before = p.logs.records.length;
      const raw = await runAsync('skopeo', ['inspect', '--raw', '--tls-verify=false', '--creds', p.credential('ops'), `docker://${p.host}/corp/team/other:1.0`]);
      assert.equal(sha256(Buffer.from(raw)), image.index.digest);
      const record = await accessRecord((r) => r.kind === 'manifest' && r.namespace === 'ops' && r.repository === 'team/other' && r.status === 200);
      assert.equal(record.credential, undefined, 'authenticated with Basic, not a token');
      assert.ok(!p.logs.records.slice(before).some((r) => r.kind === 'token'), 'skopeo never asked for a token');
    });

    it('containerd (prefers Bearer, but is offered Basic alone: no token whose expiry would fail a long pull)', async () => {
      const before = p.logs.records.length;
      await containerd.fetch(`${p.host}/corp/team/app:1.0`, { user: p.credential('ops'), allPlatforms: true });
      const have = await containerd.digests();
      for (const digest of image.blobs.keys()) assert.ok(have.has(digest), `containerd lacks ${digest}`);
      const blob = await accessRecord((r) => r.kind === 'blob' && r.namespace === 'ops' && r.status === 200);
      assert.equal(blob.credential, undefined, 'authenticated with Basic');
      assert.ok(!p.logs.records.slice(before).some((r) => r.kind === 'token'), 'containerd never asked for a token');
      await containerd.clear();
      await assert.rejects(containerd.fetch(`${p.host}/corp/team/app:1.0`, { user: 'ops:pb1.wrong' }), /401|unauthorized/i);
    });
  });

  it('grants nothing for names that are not a rule/repository', () => {
    assert.deepEqual(grantedRepositories(p.runtime.rules, 'shop', parseScopes(['repository:corp:pull', 'repository:corp/../x:pull', 'repository:corp/Team:pull'])), []);
  });
});
