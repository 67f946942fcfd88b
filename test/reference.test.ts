import assert from 'node:assert/strict';
import { canonicalRegistryHost, digestError, formatReference, parseReference } from '../src/reference/reference.js';

const SHA = 'sha256:' + 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';
const SHA512 = 'sha512:' + 'a'.repeat(128);
const SHA384 = 'sha384:' + 'b'.repeat(96);

// [input, domain, path, tag, digest] — expected parse of valid references.
const VALID: ReadonlyArray<readonly [string, string, string, string?, string?]> = [
  ['nginx', 'docker.io', 'library/nginx'],
  ['nginx:1.27', 'docker.io', 'library/nginx', '1.27'],
  ['nginx:latest', 'docker.io', 'library/nginx', 'latest'],
  [`nginx@${SHA}`, 'docker.io', 'library/nginx', undefined, SHA],
  [`nginx:1.27@${SHA}`, 'docker.io', 'library/nginx', '1.27', SHA],
  ['library/nginx', 'docker.io', 'library/nginx'],
  ['bitnami/redis:7.2', 'docker.io', 'bitnami/redis', '7.2'],
  ['docker.io/nginx', 'docker.io', 'library/nginx'],
  ['docker.io/library/nginx:1', 'docker.io', 'library/nginx', '1'],
  ['index.docker.io/nginx', 'docker.io', 'library/nginx'],
  ['index.docker.io/bitnami/redis', 'docker.io', 'bitnami/redis'],
  ['registry-1.docker.io/library/nginx', 'registry-1.docker.io', 'library/nginx'],
  ['registry.corp.example:5000/team/app:1.2', 'registry.corp.example:5000', 'team/app', '1.2'],
  [`registry.corp.example:5000/team/app:1.2@${SHA}`, 'registry.corp.example:5000', 'team/app', '1.2', SHA],
  ['registry.corp.example:5000/team/app', 'registry.corp.example:5000', 'team/app'],
  ['localhost/app', 'localhost', 'app'],
  ['localhost:5000/app:v1', 'localhost:5000', 'app', 'v1'],
  ['localhost:5000', 'docker.io', 'library/localhost', '5000'],
  ['example.com/a/b/c/d/e', 'example.com', 'a/b/c/d/e'],
  ['quay.io/prometheus/node-exporter:v1.8.2', 'quay.io', 'prometheus/node-exporter', 'v1.8.2'],
  ['gcr.io/distroless/static-debian12:nonroot', 'gcr.io', 'distroless/static-debian12', 'nonroot'],
  ['[::1]:5000/app:1', '[::1]:5000', 'app', '1'],
  ['[2001:db8::1]/team/app', '[2001:db8::1]', 'team/app'],
  ['192.168.0.10:5000/app', '192.168.0.10:5000', 'app'],
  ['Registry.Corp.Example/app', 'Registry.Corp.Example', 'app'],
  ['UPPER/app', 'UPPER', 'app'],
  ['host:443/a__b/c-d/e.f/g--h', 'host:443', 'a__b/c-d/e.f/g--h'],
  ['a/b_c', 'docker.io', 'a/b_c'],
  ['foo.com:8080/x', 'foo.com:8080', 'x'],
  ['example.com/app:_underscore', 'example.com', 'app', '_underscore'],
  ['example.com/app:' + 'a'.repeat(128), 'example.com', 'app', 'a'.repeat(128)],
  ['example.com/app:v1.0-rc.1_build', 'example.com', 'app', 'v1.0-rc.1_build'],
  [`example.com/app@${SHA512}`, 'example.com', 'app', undefined, SHA512],
  [`example.com/app@${SHA384}`, 'example.com', 'app', undefined, SHA384],
  ['xn--bcher-kva.example/app', 'xn--bcher-kva.example', 'app'],
  ['a.b-c.example/x', 'a.b-c.example', 'x'],
  ['example.com/' + 'a'.repeat(243), 'example.com', 'a'.repeat(243)],
  // The longest valid reference (526 characters as written).
  [`index.docker.io/a/${'b'.repeat(243)}:${'t'.repeat(128)}@${SHA512}`, 'docker.io', `a/${'b'.repeat(243)}`, 't'.repeat(128), SHA512],
];

// [input, fragment of the error]
const INVALID: ReadonlyArray<readonly [string, string]> = [
  ['', 'empty'],
  [' nginx', 'white space'],
  ['nginx ', 'white space'],
  ['ngi nx', 'white space'],
  ['Nginx', 'lower case'],
  ['docker.io/Library/nginx', 'lower case'],
  ['example.com/Team/app', 'lower case'],
  ['e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855', 'reserved for image IDs'],
  ['example.com/app:', 'invalid tag'],
  ['example.com/app:-leading-dash', 'invalid tag'],
  ['example.com/app:.leading-dot', 'invalid tag'],
  ['example.com/app:' + 'a'.repeat(129), 'invalid tag'],
  ['example.com/app:a+b', 'invalid tag'],
  ['example.com/app@', 'digest'],
  ['example.com/app@sha256:abc', 'digest'],
  ['example.com/app@sha256:' + 'a'.repeat(63), 'length'],
  ['example.com/app@sha256:' + 'a'.repeat(65), 'length'],
  ['example.com/app@sha256:' + 'A'.repeat(64), 'lower case'],
  ['example.com/app@md5:' + 'a'.repeat(32), 'unsupported digest algorithm'],
  ['example.com/app@sha1:' + 'a'.repeat(40), 'unsupported digest algorithm'],
  ['example.com/app@sha256:' + 'g'.repeat(64), 'digest'],
  [`example.com/app@${SHA}@${SHA}`, 'digest'],
  ['example.com/app//x', 'invalid repository name'],
  ['example.com//app', 'invalid repository name'],
  ['example.com/app/', 'invalid repository name'],
  ['/app', 'invalid'],
  ['example.com/', 'invalid repository name'],
  ['example.com/-app', 'invalid repository name'],
  ['example.com/app-', 'invalid repository name'],
  ['example.com/a___b', 'invalid repository name'],
  ['example.com/a..b', 'invalid repository name'],
  ['example.com/../etc/passwd', 'invalid repository name'],
  ['example.com/a/./b', 'invalid repository name'],
  ['-bad.example/app', 'invalid registry host'],
  ['bad-.example/app', 'invalid registry host'],
  ['exa mple.com/app', 'white space'],
  ['example.com:port/app', 'invalid registry host'],
  ['[zz::1]/app', 'invalid registry host'],
  ['[::1/app', 'invalid'],
  ['example.com/' + 'a'.repeat(244), 'more than 255'],
  ['example.com/app:' + 'a'.repeat(600), 'characters long; a valid one has at most 526'],
  [':tag', 'no repository name'],
  ['@' + SHA, 'no repository name'],
  ['example.com/app%2fx', 'invalid repository name'],
  ['example.com/app\nx', 'white space'],
];

describe('image reference parser', () => {
  for (const [input, domain, path, tag, digest] of VALID) {
    it(`parses ${JSON.stringify(input.length > 60 ? input.slice(0, 60) + '…' : input)}`, () => {
      const result = parseReference(input);
      assert.ok(result.ok, result.ok ? '' : result.error);
      assert.equal(result.reference.domain, domain);
      assert.equal(result.reference.path, path);
      assert.equal(result.reference.tag, tag);
      assert.equal(result.reference.digest, digest);
    });
  }

  for (const [input, fragment] of INVALID) {
    it(`rejects ${JSON.stringify(input.length > 60 ? input.slice(0, 60) + '…' : input)} (${fragment})`, () => {
      const result = parseReference(input);
      assert.equal(result.ok, false, `accepted ${input}`);
      if (!result.ok) assert.match(result.error, new RegExp(fragment.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'), 'i'));
    });
  }

  it('round-trips the canonical form and keeps tag and digest as given', () => {
    for (const [input] of VALID) {
      const first = parseReference(input);
      assert.ok(first.ok);
      const formatted = formatReference(first.reference);
      const second = parseReference(formatted);
      assert.ok(second.ok, formatted);
      assert.deepEqual(second.reference, first.reference);
    }
  });

  it('separates a registry port from a tag', () => {
    const result = parseReference('host:5000/app:5000');
    assert.ok(result.ok);
    assert.equal(result.reference.domain, 'host:5000');
    assert.equal(result.reference.tag, '5000');
  });

  it('validates digests alone', () => {
    assert.equal(digestError(SHA), null);
    assert.match(digestError('sha256:xyz') ?? '', /invalid digest format/);
    assert.match(digestError('blake3:' + 'a'.repeat(64)) ?? '', /unsupported/);
  });

  it('canonicalises registry hosts for comparison', () => {
    assert.equal(canonicalRegistryHost('INDEX.docker.io'), 'docker.io');
    assert.equal(canonicalRegistryHost('registry-1.docker.io'), 'docker.io');
    assert.equal(canonicalRegistryHost('Registry.Corp.Example:5000'), 'registry.corp.example:5000');
  });
});
