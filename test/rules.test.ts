import assert from 'node:assert/strict';
import { filesReadBy, parseConfig } from '../src/rules/config.js';
import { MEMO_MAX_BYTES, MEMO_MAX_ENTRIES, decideImage, memoSize } from '../src/rules/decide.js';
import { REFERENCE_LENGTH_MAX } from '../src/reference/reference.js';
import { compileGlob } from '../src/rules/glob.js';
import { SHA, configFrom, testConfig } from './support/config.js';

function errorsOf(yaml: string): string[] {
  const result = parseConfig(yaml);
  assert.equal(result.ok, false, 'config was accepted');
  return result.ok ? [] : result.errors.map((e) => `${e.key}: ${e.message}`);
}

describe('config validation', () => {
  it('fills defaults for an empty document', () => {
    const result = parseConfig('');
    assert.ok(result.ok);
    assert.equal(result.config.proxyAuthority, 'localhost:30500');
    assert.equal(result.config.webhook.pullSecretName, 'pullbridge-pull');
    assert.deepEqual(result.config.registries, []);
  });

  it('reads the cache: quantities, defaults, per-rule opt-out; and names each bad cache key', () => {
    const config = configFrom('cache: {path: /var/lib/pullbridge/cache, maxBytes: 5Gi}\nregistries: [{name: a, match: [a.example], upstream: "https://127.0.0.1:1", auth: {mode: anonymous}, cache: false}]');
    assert.deepEqual(config.cache, { path: '/var/lib/pullbridge/cache', maxBytes: 5 * 2 ** 30, minFreeBytes: 2 ** 30, minFreeInodes: '10%', tagTTLSeconds: 30, staleIfErrorSeconds: 604_800, credentialTTLSeconds: 60, reconfirmSeconds: 3600 });
    assert.equal(config.registries[0]?.cache, false);
    assert.equal(configFrom('').cache, undefined, 'no cache unless configured');
    assert.equal(configFrom('cache: {path: /c, minFreeInodes: 50000}').cache?.minFreeInodes, 50_000);
    assert.equal(configFrom('cache: {path: /c, minFreeInodes: 7.5%}').cache?.minFreeInodes, '7.5%');
    for (const bad of ['-1', '1.5', '"ten"', '120%']) assert.ok(errorsOf(`cache: {path: /c, minFreeInodes: ${bad}}`).some((e) => e.startsWith('cache.minFreeInodes: must be a whole number of inodes or a percentage such as 10%')), bad);
    const errors = errorsOf('cache: {path: relative/dir, maxBytes: 10GB, tagTTLSeconds: -1, shared: {s3: {bucket: b}}}');
    assert.ok(errors.some((e) => e.startsWith('cache.path: must be an absolute path')), errors.join('\n'));
    assert.ok(errors.some((e) => e.startsWith('cache.maxBytes: must be a whole number of bytes or a quantity')), errors.join('\n'));
    assert.ok(errors.some((e) => e.startsWith('cache.tagTTLSeconds:')), errors.join('\n'));
    assert.ok(errors.some((e) => e.startsWith('cache.shared.s3.bucket:')), errors.join('\n'));
    assert.deepEqual(errorsOf('cache: {path: /c, shared: {s3: {bucket: bucket-a}, filesystem: {path: /s}}}').filter((e) => e.startsWith('cache.shared')).length, 1, 'exactly one backend');
    const shared = configFrom('cache: {path: /c, shared: {filesystem: {path: /s}}}').cache?.shared;
    assert.deepEqual(shared, { filesystem: { path: '/s' }, fillWaitSeconds: 120, timeoutSeconds: 30, streamFills: true });
    assert.equal(configFrom('cache: {path: /c, shared: {filesystem: {path: /s}, recordKeyFile: /k/record-key}}').cache?.shared?.recordKeyFile, '/k/record-key');
    assert.ok(errorsOf('cache: {path: /c, shared: {filesystem: {path: /s}, recordKeyFile: record-key}}').some((e) => e === 'cache.shared.recordKeyFile: must be an absolute path'));
  });

  it('reads how a rule re-checks what the cache holds: revalidate get (the default) or head, nothing else', () => {
    const rule = (keys: string) => `registries: [{name: a, match: [a.example], upstream: "https://127.0.0.1:1", auth: {mode: anonymous}${keys}}]`;
    assert.equal(configFrom(rule('')).registries[0]?.revalidate, 'get');
    assert.equal(configFrom(rule(', revalidate: head')).registries[0]?.revalidate, 'head');
    assert.deepEqual(errorsOf(rule(', revalidate: options')), ['registries[0].revalidate: must be get or head']);
  });

  it('refuses a cache.shared.fillWaitSeconds below 10 s (0 made the claim renewal a 1 ms loop), naming the key', () => {
    for (const wait of [0, 1, 9]) {
      const errors = errorsOf(`cache: {path: /c, shared: {filesystem: {path: /s}, fillWaitSeconds: ${wait}}}`);
      assert.deepEqual(errors.map((e) => e.slice(0, e.indexOf(':'))), ['cache.shared.fillWaitSeconds'], errors.join('\n'));
      assert.match(errors[0] ?? '', /at least 10/);
    }
    assert.equal(configFrom('cache: {path: /c, shared: {filesystem: {path: /s}, fillWaitSeconds: 10}}').cache?.shared?.fillWaitSeconds, 10);
  });

  it('defaults a rule to broker auth', () => {
    const config = configFrom('broker: {keyFiles: [/k]}\nregistries: [{name: a, match: [a.example], upstream: "https://127.0.0.1:1"}]');
    assert.equal(config.registries[0]?.auth.mode, 'broker');
  });

  it('requires broker.keyFiles for broker rules, written or defaulted', () => {
    const errors = errorsOf(`
registries:
  - {name: a, match: [a.example], upstream: "https://127.0.0.1:1"}
  - {name: b, match: [b.example], upstream: "https://127.0.0.1:1", auth: {mode: anonymous}}
  - {name: c, match: [c.example], upstream: "https://127.0.0.1:1", auth: {mode: broker}}
`);
    assert.deepEqual(errors, ['registries[0].auth.mode: broker needs broker.keyFiles to check client credentials', 'registries[2].auth.mode: broker needs broker.keyFiles to check client credentials']);
    assert.ok(parseConfig('registries: [{name: b, match: [b.example], upstream: "https://127.0.0.1:1", auth: {mode: passthrough}}]').ok, 'no key needed without broker rules');
  });

  it('reports every error at once, each naming its key', () => {
    const errors = errorsOf(`
proxy: {port: 70000, host: "bad host"}
webhook: {pullSecretName: "Not_Valid", surprise: true}
registries:
  - name: Corp
    match: []
    upstream: ftp://x
  - name: ok
    match: ["registry.example:5000/path"]
    upstream: https://user:pw@127.0.0.1/v2
    auth: {mode: open}
  - name: ok
    match: [a.example]
    upstream: not a url
`);
    const expected = [
      /^proxy\.port: /,
      /^proxy\.host: /,
      /^webhook\.pullSecretName: must be a DNS subdomain/,
      /^webhook\.surprise: unknown key/,
      /^registries\[0\]\.name: must be a DNS label/,
      /^registries\[0\]\.match: needs at least one registry host/,
      /^registries\[0\]\.upstream: upstream must use http or https/,
      /^registries\[1\]\.match\[0\]: must be a registry host/,
      /^registries\[1\]\.upstream: upstream must not carry credentials/,
      /^registries\[1\]\.upstream: upstream must be scheme:\/\/host\[:port\] only/,
      /^registries\[1\]\.auth\.mode: /,
      /^registries\[2\]\.upstream: upstream must be an absolute/,
    ];
    for (const pattern of expected) assert.ok(errors.some((e) => pattern.test(e)), `no error matching ${pattern} in:\n${errors.join('\n')}`);
  });

  it('reports missing required keys', () => {
    const errors = errorsOf('registries: [{name: a}]');
    assert.ok(errors.includes('registries[0].match: is required (array)'), errors.join('\n'));
    assert.ok(errors.includes('registries[0].upstream: is required (string)'), errors.join('\n'));
  });

  it('rejects duplicate rule names and a rule that matches the proxy itself', () => {
    const errors = errorsOf(`
registries:
  - {name: a, match: [a.example], upstream: "https://127.0.0.1:1"}
  - {name: a, match: ["localhost:30500"], upstream: "https://127.0.0.1:2"}
`);
    assert.ok(errors.some((e) => e.startsWith('registries[1].name: duplicate rule name "a"')), errors.join('\n'));
    assert.ok(errors.some((e) => e.startsWith('registries[1].match[0]: "localhost:30500" is the proxy itself')), errors.join('\n'));
  });

  it('refuses an anonymous rule with credentials but no repositories.include (it would lend its credentials for every repository)', () => {
    const rule = (extra: string) => `registries:\n  - {name: a, match: [a.example], upstream: "https://127.0.0.1:1", auth: {mode: anonymous}, credentials: {username: robot, passwordFile: /p}${extra}}\n`;
    const message = 'registries[0].repositories.include: an anonymous rule with credentials must list the repositories it serves; without a list, anyone who reaches the proxy pulls every repository of the upstream with these credentials';
    assert.deepEqual(errorsOf(rule('')), [message]);
    assert.deepEqual(errorsOf(rule(', repositories: {exclude: ["secret/**"]}')), [message]);
    assert.deepEqual(errorsOf(rule(', repositories: {include: []}')), [message]);
    assert.ok(parseConfig(rule(', repositories: {include: ["public/**"]}')).ok);
    assert.ok(parseConfig('registries: [{name: a, match: [a.example], upstream: "https://127.0.0.1:1", auth: {mode: anonymous}}]').ok, 'anonymous without credentials lends nothing');
  });

  it('refuses namespace filters on rules whose clients are not identified by namespace', () => {
    const errors = errorsOf(`
broker: {keyFiles: [/k]}
registries:
  - {name: a, match: [a.example], upstream: "https://127.0.0.1:1", auth: {mode: anonymous}, namespaces: {include: ["shop-*"]}}
  - {name: b, match: [b.example], upstream: "https://127.0.0.1:1", auth: {mode: passthrough}, namespaces: {exclude: ["sandbox"]}}
  - {name: c, match: [c.example], upstream: "https://127.0.0.1:1", namespaces: {include: ["shop-*"]}}
`);
    assert.deepEqual(errors, [
      'registries[0].namespaces: auth mode "anonymous" does not identify the client\'s namespace, so the proxy cannot enforce a namespace filter; use auth mode broker',
      'registries[1].namespaces: auth mode "passthrough" does not identify the client\'s namespace, so the proxy cannot enforce a namespace filter; use auth mode broker',
    ]);
  });

  it('rejects a forward-mode connectivity proxy with an https upstream', () => {
    const errors = errorsOf(`
registries:
  - name: a
    match: [a.example]
    upstream: https://127.0.0.1:1
    forwardProxy: {url: "http://127.0.0.1:3128", mode: forward}
`);
    assert.ok(errors.some((e) => e.startsWith('registries[0].forwardProxy.mode:')), errors.join('\n'));
  });

  it('requires credentials from files, never inline passwords', () => {
    const errors = errorsOf(`
registries:
  - name: a
    match: [a.example]
    upstream: https://127.0.0.1:1
    credentials: {username: bob, password: hunter2}
`);
    assert.ok(errors.includes('registries[0].credentials.password: unknown key'), errors.join('\n'));
    assert.ok(errors.some((e) => e.startsWith('registries[0].credentials.passwordFile:')), errors.join('\n'));
  });

  it('lists the files each part reads for a config, named by their keys', () => {
    const config = configFrom(`
broker: {keyFiles: [/keys/0, /keys/1]}
registries:
  - name: a
    match: [a.example]
    upstream: https://127.0.0.1:1
    credentials: {usernameFile: /a/user, passwordFile: /a/password}
    tls: {caFile: /a/ca.crt}
    forwardProxy: {url: "http://127.0.0.1:3128", credentials: {username: fwd, passwordFile: /fwd/password}}
  - {name: b, match: [b.example], upstream: "https://127.0.0.1:1", auth: {mode: passthrough}}
`);
    const signingKey = { key: 'broker.keyFiles[0]', path: '/keys/0', holds: 'broker-key' };
    assert.deepEqual(filesReadBy(config, 'webhook'), [signingKey]);
    assert.deepEqual(filesReadBy(config, 'proxy'), [
      signingKey,
      { key: 'registries[0].credentials.usernameFile', path: '/a/user', holds: 'secret' },
      { key: 'registries[0].credentials.passwordFile', path: '/a/password', holds: 'secret' },
      { key: 'registries[0].forwardProxy.credentials.passwordFile', path: '/fwd/password', holds: 'secret' },
      { key: 'registries[0].tls.caFile', path: '/a/ca.crt', holds: 'ca-certificates' },
    ]);
  });

  it('rejects YAML that does not parse, with the reason', () => {
    const errors = errorsOf('registries: [unclosed');
    assert.match(errors[0] ?? '', /^\(document\): not valid YAML/);
    assert.match(errorsOf('- a\n- b')[0] ?? '', /^\(document\): must be a mapping/);
    assert.match(errorsOf('a: 1\na: 2')[0] ?? '', /^\(document\): not valid YAML/);
  });
});

describe('globs', () => {
  const cases: Array<[string, string, boolean]> = [
    ['team/*', 'team/app', true],
    ['team/*', 'team/app/sub', false],
    ['team/**', 'team/app/sub', true],
    ['team/**', 'team', true],
    ['team/**', 'teamx/app', false],
    ['**', 'a/b/c', true],
    ['app?', 'app1', true],
    ['app?', 'app/', false],
    ['a.b', 'aXb', false],
    ['team-*', 'team-a', true],
  ];
  for (const [pattern, value, expected] of cases) {
    it(`${pattern} ${expected ? 'matches' : 'does not match'} ${value}`, () => assert.equal(compileGlob(pattern)(value), expected));
  }
});

describe('rewrite decision', () => {
  const config = testConfig();

  it('rewrites onto the proxy keeping tag and digest', () => {
    const d = decideImage(config, `registry.corp.example:5000/team/app:1.2@${SHA}`, 'default');
    assert.deepEqual(d, {
      image: `registry.corp.example:5000/team/app:1.2@${SHA}`,
      rewritten: `localhost:30500/corp/team/app:1.2@${SHA}`,
      rule: 'corp',
      reason: 'rewritten',
    });
  });

  it('keeps a reference without tag untagged (the runtime applies latest)', () => {
    assert.equal(decideImage(config, 'registry.corp.example:5000/team/app').rewritten, 'localhost:30500/corp/team/app');
  });

  it('matches hosts case-insensitively and through every listed alias', () => {
    assert.equal(decideImage(config, 'registry-alias.corp.example:5000/x').rule, 'corp');
    assert.equal(decideImage(config, 'Registry.Corp.Example:5000/x').rule, 'corp');
  });

  it('does not confuse a host with another port', () => {
    assert.equal(decideImage(config, 'registry.corp.example/x').reason, 'no-matching-rule');
    assert.equal(decideImage(config, 'registry.corp.example:5001/x').reason, 'no-matching-rule');
  });

  it('takes the first matching rule in file order, falling through filters', () => {
    const d = decideImage(config, 'registry.corp.example:5000/legacy/tool:1');
    assert.equal(d.rule, 'corp-legacy');
    assert.equal(d.rewritten, 'localhost:30500/corp-legacy/legacy/tool:1');
  });

  it('covers every Docker Hub spelling and implicit library/', () => {
    for (const image of ['nginx', 'nginx:1.27', 'library/nginx', 'docker.io/nginx', 'docker.io/library/nginx', 'index.docker.io/library/nginx', 'registry-1.docker.io/library/nginx']) {
      const d = decideImage(config, image);
      assert.equal(d.rule, 'hub', image);
      assert.match(d.rewritten ?? '', /^localhost:30500\/hub\/library\/nginx(:1\.27)?$/, image);
    }
    assert.equal(decideImage(config, 'bitnami/redis:7').rewritten, 'localhost:30500/hub/bitnami/redis:7');
  });

  it('leaves images already on the proxy alone (idempotence)', () => {
    const once = decideImage(config, 'registry.corp.example:5000/team/app:1').rewritten;
    assert.ok(once);
    assert.deepEqual(decideImage(config, once), { image: once, rewritten: null, rule: null, reason: 'already-proxied' });
  });

  it('takes any loopback spelling of the proxy\'s address and port as the proxy itself', () => {
    for (const host of ['127.0.0.1', '127.1.2.3', '127.1', '2130706433', '0x7f.1', '0177.0.0.1', '[::1]', '[0:0:0:0:0:0:0:1]', '[::ffff:7f00:1]', 'LOCALHOST', 'app.localhost']) {
      for (const port of ['30500', '030500', '0030500']) {
        const image = `${host}:${port}/corp/team/app:1`;
        assert.equal(decideImage(config, image).reason, 'already-proxied', image);
      }
    }
    // Another port, or a host that is not this machine's loopback, is not the proxy.
    for (const image of ['127.0.0.1:30501/corp/team/app:1', '128.0.0.1:30500/corp/team/app:1', '[::2]:30500/corp/team/app:1', '127.0.0.1/corp/team/app:1', '10.0.0.1:30500/corp/team/app:1', '0x17f.1:30500/corp/app:1']) {
      assert.notEqual(decideImage(config, image).reason, 'already-proxied', image);
    }
  });

  it('explains a refusal by repository or namespace filter', () => {
    const team = decideImage(config, 'team.example/apps/web:1', 'other');
    assert.equal(team.reason, 'namespace-not-allowed');
    assert.equal(team.rule, 'team');
    assert.equal(decideImage(config, 'team.example/apps/web:1', 'team-a').rewritten, 'localhost:30500/team/apps/web:1');
    assert.equal(decideImage(config, 'team.example/tools/x:1', 'team-a').reason, 'repository-not-included');
    // Without a namespace (CLI), namespace filters do not apply.
    assert.equal(decideImage(config, 'team.example/apps/web:1').reason, 'rewritten');
    const excluded = configFrom('registries: [{name: c, match: [c.example], upstream: "http://127.0.0.1:1", auth: {mode: anonymous}, repositories: {exclude: ["secret/*"]}}]');
    assert.equal(decideImage(excluded, 'c.example/secret/x').reason, 'repository-excluded');
  });

  it('leaves an invalid reference unchanged with the parser error', () => {
    const d = decideImage(config, 'registry.corp.example:5000/Team/App');
    assert.equal(d.reason, 'invalid-reference');
    assert.equal(d.rewritten, null);
    assert.match(d.detail ?? '', /lower case/);
  });

  it('never produces a reference over the length limit', () => {
    // 255 characters before rewriting: valid as written, too long with the proxy prefix.
    const image = `team.example/apps/${'a'.repeat(255 - 'team.example/apps/'.length)}`;
    assert.ok(decideImage(config, image).reason !== 'invalid-reference');
    const d = decideImage(config, image);
    assert.equal(d.reason, 'rewritten-reference-invalid');
    assert.equal(d.rewritten, null);
    assert.match(d.detail ?? '', /more than 255/);
  });

  it('keeps its memo within its entry and byte bounds, and never memoises an over-long image', () => {
    const fresh = testConfig();
    // Valid references of the longest kind, all different: the byte bound is reached first.
    const longest = (i: number) => `team.example/apps/${String(i).padStart(8, '0')}${'a'.repeat(200)}:${'t'.repeat(128)}@sha512:${'b'.repeat(128)}`;
    for (let i = 0; i < 6000; i++) decideImage(fresh, longest(i), 'team-a');
    const full = memoSize(fresh);
    assert.ok(full.bytes <= MEMO_MAX_BYTES, `${full.bytes} bytes`);
    assert.ok(full.entries < MEMO_MAX_ENTRIES && full.entries > 0, `${full.entries} entries`);
    // Short ones: the entry bound.
    for (let i = 0; i < 6000; i++) decideImage(fresh, `team.example/apps/w${i}:1`, 'team-a');
    assert.equal(memoSize(fresh).entries, MEMO_MAX_ENTRIES);
    // Past the longest valid reference: decided (invalid, without quoting it), not memoised.
    const huge = `registry.corp.example:5000/team/app:${'x'.repeat(100_000)}`;
    const before = memoSize(fresh);
    const d = decideImage(fresh, huge, 'shop');
    assert.equal(d.reason, 'invalid-reference');
    assert.match(d.detail ?? '', new RegExp(`^image reference is 100036 characters long; a valid one has at most ${REFERENCE_LENGTH_MAX}$`));
    assert.deepEqual(memoSize(fresh), before);
  });
});
