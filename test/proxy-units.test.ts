import assert from 'node:assert/strict';
import { realmTrusted } from '../src/upstream/authorizer.js';
import { parseChallenges } from '../src/upstream/challenge.js';
import { dockerConfigJson, namespaceToken, parseBasicAuthorization, verifyNamespaceToken } from '../src/rules/credentials.js';
import { parseAdmissionRoute, parseRoute } from '../src/proxy/route.js';
import { SHA } from './support/config.js';

describe('proxy routing (pure)', () => {
  const ok: Array<[string, string, Record<string, unknown>]> = [
    ['GET', '/v2/', { kind: 'base' }],
    ['HEAD', '/v2', { kind: 'base' }],
    ['GET', '/v2/corp/team/app/manifests/1.2', { kind: 'manifest', rule: 'corp', name: 'team/app', reference: '1.2', byDigest: false }],
    ['HEAD', `/v2/corp/team/app/manifests/${SHA}`, { kind: 'manifest', rule: 'corp', name: 'team/app', reference: SHA, byDigest: true }],
    ['GET', `/v2/corp/a/blobs/b/blobs/${SHA}`, { kind: 'blob', rule: 'corp', name: 'a/blobs/b', digest: SHA }],
    ['GET', '/v2/corp/a/manifests/b/manifests/latest', { kind: 'manifest', rule: 'corp', name: 'a/manifests/b', reference: 'latest', byDigest: false }],
    ['GET', '/v2/corp/team/app/tags/list?n=10&last=b', { kind: 'tags', rule: 'corp', name: 'team/app', query: 'n=10&last=b' }],
    ['GET', '/v2/_catalog', { kind: 'catalog', query: '' }],
    ['GET', '/v2/_catalog?last=corp%2Fa&n=1', { kind: 'catalog', query: 'last=corp%2Fa&n=1' }],
    ['GET', '/v2/hub/library/nginx/manifests/1.27', { kind: 'manifest', rule: 'hub', name: 'library/nginx', reference: '1.27', byDigest: false }],
    ['GET', `/v2/corp/team/app/referrers/${SHA}?artifactType=application%2Fvnd.example%2Bjson`, { kind: 'referrers', rule: 'corp', name: 'team/app', digest: SHA, artifactType: 'application/vnd.example+json', query: 'artifactType=application%2Fvnd.example%2Bjson' }],
    ['GET', `/v2/corp/a/referrers/b/manifests/${SHA}`, { kind: 'manifest', rule: 'corp', name: 'a/referrers/b', reference: SHA, byDigest: true }],
  ];
  for (const [method, target, expected] of ok) {
    it(`routes ${method} ${target}`, () => {
      const r = parseRoute(method, target);
      assert.ok(r.ok, r.ok ? '' : r.error.message);
      assert.deepEqual(r.route, expected);
    });
  }

  const refused: Array<[string, string, number, string]> = [
    ['POST', '/v2/corp/a/blobs/uploads/', 405, 'UNSUPPORTED'],
    ['PUT', '/v2/corp/a/manifests/1', 405, 'UNSUPPORTED'],
    ['DELETE', `/v2/corp/a/blobs/${SHA}`, 405, 'UNSUPPORTED'],
    ['GET', 'http://evil.example/v2/', 400, 'NAME_INVALID'],
    ['GET', 'evil.example:443', 400, 'NAME_INVALID'],
    ['GET', '/v2/corp/../etc/passwd/manifests/1', 400, 'NAME_INVALID'],
    ['GET', '/v2/corp/./a/manifests/1', 400, 'NAME_INVALID'],
    ['GET', '/v2/corp/a/..', 400, 'NAME_INVALID'],
    ['GET', '/v2/corp/%2e%2e/a/manifests/1', 400, 'NAME_INVALID'],
    ['GET', '/v2/corp/a%2Fb/manifests/1', 400, 'NAME_INVALID'],
    ['GET', '/v2/corp//a/manifests/1', 400, 'NAME_INVALID'],
    ['GET', '/v2/corp\\a/manifests/1', 400, 'NAME_INVALID'],
    ['GET', '/v2/corp/A/manifests/1', 400, 'NAME_INVALID'],
    ['GET', '/v2/corp/manifests/1', 400, 'NAME_INVALID'],
    ['GET', '/v2/corp/a/manifests/-bad', 400, 'TAG_INVALID'],
    ['GET', '/v2/corp/a/manifests/sha256:abc', 400, 'DIGEST_INVALID'],
    ['GET', '/v2/corp/a/blobs/sha256:abc', 400, 'DIGEST_INVALID'],
    ['GET', `/v2/corp/a/blobs/md5:${'a'.repeat(32)}`, 400, 'DIGEST_INVALID'],
    ['GET', '/v2/corp/a/blobs/latest', 400, 'DIGEST_INVALID'],
    ['GET', '/v2/_catalog/', 404, 'UNSUPPORTED'],
    ['GET', '/v1/search', 404, 'UNSUPPORTED'],
    ['GET', '/v2/corp/a/referrers/x', 400, 'DIGEST_INVALID'],
    ['HEAD', `/v2/corp/a/referrers/${SHA}`, 405, 'UNSUPPORTED'],
    ['GET', `/v2/corp/a/referrers/${SHA}?artifactType=not-a-type`, 400, 'UNSUPPORTED'],
    ['GET', `/v2/corp/a%2Fb/referrers/${SHA}`, 400, 'NAME_INVALID'],
  ];
  for (const [method, target, status, code] of refused) {
    it(`refuses ${method} ${target} with ${status} ${code}`, () => {
      const r = parseRoute(method, target);
      assert.equal(r.ok, false);
      if (!r.ok) {
        assert.equal(r.error.status, status);
        assert.equal(r.error.code, code);
      }
    });
  }
});

describe('admission routing (pure)', () => {
  const ok: Array<[string, string, Record<string, unknown>]> = [
    ['GET', '/admission/probe/v2/corp/team/app/manifests/1.2', { kind: 'probe', rule: 'corp', name: 'team/app', reference: '1.2' }],
    ['HEAD', `/admission/v2/corp/team/app/manifests/${SHA}`, { kind: 'manifest', rule: 'corp', name: 'team/app', reference: SHA, byDigest: true }],
    ['GET', `/admission/v2/corp/team/app/blobs/${SHA}`, { kind: 'blob', rule: 'corp', name: 'team/app', digest: SHA }],
    ['GET', `/admission/v2/corp/team/app/referrers/${SHA}`, { kind: 'referrers', rule: 'corp', name: 'team/app', digest: SHA, artifactType: undefined, query: '' }],
    ['GET', `/admission/v2/corp/a/referrers/b/referrers/${SHA}?artifactType=application/vnd.dev.cosign.artifact.sig.v1%2Bjson`, { kind: 'referrers', rule: 'corp', name: 'a/referrers/b', digest: SHA, artifactType: 'application/vnd.dev.cosign.artifact.sig.v1+json', query: 'artifactType=application/vnd.dev.cosign.artifact.sig.v1%2Bjson' }],
  ];
  for (const [method, target, expected] of ok) {
    it(`routes ${method} ${target}`, () => {
      const r = parseAdmissionRoute(method, target);
      assert.ok(r.ok, r.ok ? '' : r.error.message);
      assert.deepEqual(r.route, expected);
    });
  }
  const refused: Array<[string, string, number, string]> = [
    ['GET', '/admission/v2/corp/team/app/tags/list', 404, 'UNSUPPORTED'],
    ['GET', `/admission/probe/v2/corp/team/app/blobs/${SHA}`, 404, 'UNSUPPORTED'],
    ['GET', '/admission/v2/', 404, 'UNSUPPORTED'],
    ['GET', '/admission/other', 404, 'UNSUPPORTED'],
    ['HEAD', `/admission/v2/corp/team/app/referrers/${SHA}`, 405, 'UNSUPPORTED'],
    ['POST', '/admission/v2/corp/team/app/manifests/1', 405, 'UNSUPPORTED'],
    ['GET', '/admission/v2/corp/team/app/referrers/sha256:abc', 400, 'DIGEST_INVALID'],
    ['GET', `/admission/v2/corp/../x/referrers/${SHA}`, 400, 'NAME_INVALID'],
    ['GET', `/admission/v2/corp/a%2Fb/referrers/${SHA}`, 400, 'NAME_INVALID'],
    ['GET', `/admission/v2/corp/team/app/referrers/${SHA}?artifactType=not-a-type`, 400, 'UNSUPPORTED'],
    ['GET', '/admission/v2/corp/%2e%2e/manifests/1', 400, 'NAME_INVALID'],
  ];
  for (const [method, target, status, code] of refused) {
    it(`refuses ${method} ${target} with ${status} ${code}`, () => {
      const r = parseAdmissionRoute(method, target);
      assert.equal(r.ok, false);
      if (!r.ok) {
        assert.equal(r.error.status, status);
        assert.equal(r.error.code, code);
      }
    });
  }
});

describe('WWW-Authenticate parsing', () => {
  it('reads a Bearer challenge with quoted parameters', () => {
    assert.deepEqual(parseChallenges('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull"'), [
      { scheme: 'bearer', params: { realm: 'https://auth.docker.io/token', service: 'registry.docker.io', scope: 'repository:library/nginx:pull' } },
    ]);
  });
  it('reads Basic, unquoted values, escapes and several challenges', () => {
    assert.deepEqual(parseChallenges('Basic realm="a \\"b\\"", Bearer realm=https://x/t, service=s'), [
      { scheme: 'basic', params: { realm: 'a "b"' } },
      { scheme: 'bearer', params: { realm: 'https://x/t', service: 's' } },
    ]);
  });
  it('yields nothing for an empty header', () => {
    assert.deepEqual(parseChallenges(undefined), []);
    assert.deepEqual(parseChallenges(''), []);
  });
});

describe('token realm trust boundary', () => {
  const t = (u: string, r: string, listed: string[] = []) => realmTrusted(new URL(u), new URL(r), listed);
  it('trusts the upstream origin exactly, and origins the rule lists', () => {
    assert.equal(t('https://registry.corp.example', 'https://registry.corp.example/auth'), true);
    assert.equal(t('https://127.0.0.1:5000', 'https://127.0.0.1:5000/token'), true);
    assert.equal(t('https://registry-1.docker.io', 'https://auth.docker.io/token', ['https://auth.docker.io']), true);
  });
  it('never guesses trust from a shared domain suffix or host', () => {
    // Another port of the same host is another service; the last two labels are not an owner.
    assert.equal(t('https://127.0.0.1:5000', 'https://127.0.0.1:5001/token'), false);
    assert.equal(t('https://registry-1.docker.io', 'https://auth.docker.io/token'), false);
    assert.equal(t('https://corp.azurecr.io', 'https://attacker.azurecr.io/oauth2/token'), false);
    assert.equal(t('https://registry.corp.co.uk', 'https://evil.co.uk/token'), false);
    assert.equal(t('https://registry.corp.example', 'https://registry.corp.example:8443/token'), false);
    assert.equal(t('https://registry-1.docker.io', 'https://auth.docker.io:444/token', ['https://auth.docker.io']), false);
  });
  it('does not send credentials elsewhere or over a downgrade', () => {
    assert.equal(t('https://registry.corp.example', 'https://evil.example/token'), false);
    assert.equal(t('https://registry.corp.example', 'http://registry.corp.example/token'), false);
    assert.equal(t('https://127.0.0.1:5000', 'https://127.0.0.2/token'), false);
  });
});

describe('namespace credentials', () => {
  const key = Buffer.from('0123456789abcdef0123456789abcdef');
  const old = Buffer.from('fedcba9876543210fedcba9876543210');
  it('verifies a namespace token under the current or a previous key', () => {
    const token = namespaceToken(key, 'shop');
    assert.match(token, /^pb1\.[A-Za-z0-9_-]{43}$/);
    assert.equal(verifyNamespaceToken([key], 'shop', token), true);
    assert.equal(verifyNamespaceToken([old, key], 'shop', token), true);
    assert.equal(verifyNamespaceToken([old], 'shop', token), false);
    assert.equal(verifyNamespaceToken([key], 'other', token), false);
    assert.equal(verifyNamespaceToken([key], 'shop', token.slice(0, -1)), false);
    assert.equal(verifyNamespaceToken([], 'shop', token), false);
  });
  it('parses Basic authorization headers', () => {
    assert.deepEqual(parseBasicAuthorization(`Basic ${Buffer.from('ns:pa:ss').toString('base64')}`), { username: 'ns', password: 'pa:ss' });
    assert.equal(parseBasicAuthorization('Bearer abc'), null);
    assert.equal(parseBasicAuthorization(`Basic ${Buffer.from('nocolon').toString('base64')}`), null);
    assert.equal(parseBasicAuthorization(undefined), null);
  });
  it('builds the dockerconfigjson kubelet reads, keyed by host:port', () => {
    const doc = JSON.parse(dockerConfigJson('localhost:30500', 'shop', key)) as { auths: Record<string, { username: string; password: string; auth: string }> };
    const entry = doc.auths['localhost:30500'];
    assert.ok(entry);
    assert.equal(entry.username, 'shop');
    assert.equal(entry.password, namespaceToken(key, 'shop'));
    assert.equal(Buffer.from(entry.auth, 'base64').toString(), `shop:${entry.password}`);
  });
});
