import assert from 'node:assert/strict';
import { generateKeyPairSync, X509Certificate } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import request from 'supertest';
import { SHA, TEST_CONFIG_YAML } from './support/config.js';
import { exitOf, runCli, startCli } from './support/cli.js';
import { applyPatch, decodePatch, podWith, reviewFor, type PodShape } from './support/review.js';

describe('pullbridge CLI', () => {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-cli-'));
  const configFile = join(dir, 'config.yaml');
  writeFileSync(configFile, TEST_CONFIG_YAML);

  describe('rewrite', () => {
    it('prints one JSON array with a decision per image', () => {
      const images = [`registry.corp.example:5000/team/app:1.2@${SHA}`, 'nginx', 'quay.io/a/b', 'Bad/Ref', 'localhost:30500/corp/team/app:1'];
      const result = runCli(['rewrite', '--config', configFile, '--json', ...images]);
      assert.equal(result.status, 0, result.stderr);
      const decisions = JSON.parse(result.stdout) as Array<{ image: string; rewritten: string | null; rule: string | null; reason: string }>;
      assert.equal(decisions.length, 5);
      assert.deepEqual(decisions.map((d) => [d.image, d.rewritten, d.rule, d.reason]), [
        [images[0], `localhost:30500/corp/team/app:1.2@${SHA}`, 'corp', 'rewritten'],
        ['nginx', 'localhost:30500/hub/library/nginx', 'hub', 'rewritten'],
        ['quay.io/a/b', null, null, 'no-matching-rule'],
        ['Bad/Ref', null, null, 'invalid-reference'],
        ['localhost:30500/corp/team/app:1', null, null, 'already-proxied'],
      ]);
    });

    it('says what it cannot know for a rule that asks the upstream at admission, keeping the JSON fields', () => {
      const file = join(dir, 'upstream.yaml');
      writeFileSync(file, `proxy: {host: localhost, port: 30500}
webhook: {pullSecretName: pullbridge-pull, namespace: pullbridge}
broker: {keyFiles: [/nonexistent/broker.key]}
registries:
  - {name: corp, match: [registry.corp.example], upstream: "https://127.0.0.1:5000", auth: {mode: anonymous}, rewrite: private-only, pinDigest: true}
  - {name: plain, match: [plain.example], upstream: "https://127.0.0.1:5000", auth: {mode: anonymous}}
`);
      const result = runCli(['rewrite', '--config', file, '--json', 'registry.corp.example/team/app:1', 'plain.example/team/app:1']);
      assert.equal(result.status, 0, result.stderr);
      const [asks, plain] = JSON.parse(result.stdout) as Array<Record<string, unknown>>;
      assert.deepEqual([asks?.image, asks?.rewritten, asks?.rule, asks?.reason, asks?.upstreamUnknown], ['registry.corp.example/team/app:1', 'localhost:30500/corp/team/app:1', 'corp', 'rewritten', true]);
      assert.match(String(asks?.detail), /rule "corp" asks the upstream at admission through the proxy tier: rewrite: private-only \(is the image public\?\), pinDigest \(which digest\?\).*cannot be known here/);
      assert.deepEqual(plain, { image: 'plain.example/team/app:1', rewritten: 'localhost:30500/plain/team/app:1', rule: 'plain', reason: 'rewritten' });
    });

    it('applies namespace filters with --namespace', () => {
      const out = (ns: string) => (JSON.parse(runCli(['rewrite', '--config', configFile, '--namespace', ns, '--json', 'team.example/apps/x:1']).stdout) as Array<{ reason: string }>)[0]?.reason;
      assert.equal(out('team-a'), 'rewritten');
      assert.equal(out('other'), 'namespace-not-allowed');
    });

    it('prints a readable line per image without --json', () => {
      const result = runCli(['rewrite', '--config', configFile, 'nginx:1', 'quay.io/a/b']);
      assert.equal(result.status, 0);
      assert.equal(result.stdout, 'nginx:1 -> localhost:30500/hub/library/nginx:1  [rewritten, rule hub]\nquay.io/a/b -> (unchanged)  [no-matching-rule]\n');
    });

    it('refuses to run without images or with an invalid config', () => {
      assert.equal(runCli(['rewrite', '--config', configFile]).status, 2);
      const bad = join(dir, 'bad.yaml');
      writeFileSync(bad, 'registries: [{name: X}]');
      const result = runCli(['rewrite', '--config', bad, 'nginx']);
      assert.equal(result.status, 1);
      assert.match(result.stderr, /registries\[0\]\.name/);
    });
  });

  describe('validate', () => {
    it('exits 0 for a valid config', () => {
      // The files it names are mounted where it runs, not here.
      const result = runCli(['validate', '--config', configFile, '--skip-files']);
      assert.equal(result.status, 0, result.stderr);
      assert.match(result.stdout, /valid, 4 registry rule\(s\)/);
    });

    it('exits non-zero listing every error with its key', () => {
      const bad = join(dir, 'invalid.yaml');
      writeFileSync(bad, 'proxy: {port: "x"}\nbroker: {keyFiles: [/k]}\nregistries:\n  - name: ok\n    match: [a.example]\n    upstream: https://127.0.0.1\n    auth: {mode: sometimes}\n  - name: ok\n    match: [b.example]\n    upstream: https://127.0.0.1\n');
      const result = runCli(['validate', '--config', bad]);
      assert.equal(result.status, 1);
      assert.match(result.stderr, /3 error\(s\)/);
      assert.match(result.stderr, /^proxy\.port: must be number, got string "x"$/m);
      assert.match(result.stderr, /^registries\[0\]\.auth\.mode: /m);
      assert.match(result.stderr, /^registries\[1\]\.name: duplicate rule name "ok"/m);
    });

    it('rejects what the proxy and the webhook would refuse: broker rules without broker.keyFiles', () => {
      const file = join(dir, 'nokeys.yaml');
      writeFileSync(file, 'registries:\n  - {name: corp, match: [registry.corp.example], upstream: "https://127.0.0.1:5000"}\n');
      const result = runCli(['validate', '--config', file]);
      assert.equal(result.status, 1, result.stdout);
      assert.match(result.stderr, /^registries\[0\]\.auth\.mode: broker needs broker\.keyFiles/m);
    });

    it('names the key of a rule that would serve more than its auth mode can guard', () => {
      const file = join(dir, 'open.yaml');
      writeFileSync(file, `registries:
  - {name: hub, match: [docker.io], upstream: "https://127.0.0.1:5000", auth: {mode: anonymous}}
  - {name: open, match: [open.example], upstream: "https://127.0.0.1:5000", auth: {mode: anonymous}, credentials: {username: robot, passwordFile: /p}}
  - {name: pass, match: [pass.example], upstream: "https://127.0.0.1:5000", auth: {mode: passthrough}, namespaces: {include: [shop]}}
`);
      const result = runCli(['validate', '--config', file]);
      assert.equal(result.status, 1, result.stdout);
      assert.match(result.stderr, /2 error\(s\)/);
      assert.match(result.stderr, /^registries\[1\]\.repositories\.include: an anonymous rule with credentials must list/m);
      assert.match(result.stderr, /^registries\[2\]\.namespaces: auth mode "passthrough" does not identify/m);
    });

    it('accepts every full config example in README.md and docs/', () => {
      // Full configs are the yaml blocks at the top level; indented ones inside lists are fragments.
      const docs = fileURLToPath(new URL('../../docs/', import.meta.url));
      const readme = [fileURLToPath(new URL('../../README.md', import.meta.url)), ...readdirSync(docs).filter((f) => f.endsWith('.md')).map((f) => join(docs, f))]
        .map((file) => readFileSync(file, 'utf8'))
        .join('\n');
      // Kubernetes objects (apiVersion/kind) and Helm values (marked so in their first line) shown
      // beside them are not pullbridge configs.
      const examples = [...readme.matchAll(/^```yaml\n([\s\S]*?)^```$/gm)].map((m) => m[1] ?? '').filter((text) => !/^apiVersion:/m.test(text) && !/^# Helm values/.test(text));
      assert.ok(examples.length > 0, 'README.md or docs/ has a config example');
      examples.forEach((example, i) => {
        const file = join(dir, `readme-${i}.yaml`);
        writeFileSync(file, example);
        const result = runCli(['validate', '--config', file, '--skip-files']);
        assert.equal(result.status, 0, `README config example ${i + 1}:\n${example}\n${result.stderr}`);
      });
    });

    it('refuses cache.shared.fillWaitSeconds: 0, naming the key', () => {
      const file = join(dir, 'fillwait.yaml');
      writeFileSync(file, 'cache:\n  path: /var/lib/pullbridge/cache\n  shared: {filesystem: {path: /shared}, fillWaitSeconds: 0}\nregistries: []\n');
      const result = runCli(['validate', '--config', file]);
      assert.equal(result.status, 1, result.stdout);
      assert.match(result.stderr, /^cache\.shared\.fillWaitSeconds: must be at least 10/m);
    });

    it('says so when the file cannot be read', () => {
      const result = runCli(['validate', '--config', join(dir, 'missing.yaml')]);
      assert.equal(result.status, 1);
      assert.match(result.stderr, /\(file\): cannot read .*no such file/);
    });
  });

  it('rejects unknown commands and flags with usage', () => {
    const unknown = runCli(['frobnicate']);
    assert.equal(unknown.status, 2);
    assert.match(unknown.stderr, /unknown command "frobnicate"/);
    const flag = runCli(['validate', '--config', configFile, '--bogus']);
    assert.equal(flag.status, 2);
    assert.match(flag.stderr, /bogus/);
  });

  it('certs writes a CA and a serving certificate for the Service', () => {
    const out = join(dir, 'certs');
    const result = runCli(['certs', '--service', 'pullbridge-webhook', '--namespace', 'pullbridge', '--out', out, '--ip', '127.0.0.1']);
    assert.equal(result.status, 0, result.stderr);
    const ca = new X509Certificate(readFileSync(join(out, 'ca.crt')));
    const leaf = new X509Certificate(readFileSync(join(out, 'tls.crt')));
    assert.ok(ca.ca);
    assert.ok(leaf.verify(ca.publicKey), 'serving cert is signed by the CA');
    assert.ok(leaf.checkHost('pullbridge-webhook.pullbridge.svc'));
    assert.ok(leaf.checkHost('pullbridge-webhook.pullbridge.svc.cluster.local'));
    assert.ok(leaf.checkIP('127.0.0.1'));
    assert.equal(leaf.checkHost('other.pullbridge.svc'), undefined);
    assert.equal(statSync(join(out, 'tls.key')).mode & 0o777, 0o600);
  });

  it('webhook serves HTTPS from the given cert and stops cleanly on SIGTERM', async () => {
    const out = join(dir, 'serving');
    assert.equal(runCli(['certs', '--service', 'w', '--namespace', 'n', '--out', out, '--ip', '127.0.0.1']).status, 0);
    const { child, output } = await startCli(
      ['webhook', '--config', configFile, '--host', '127.0.0.1', '--port', '0', '--tls-cert', join(out, 'tls.crt'), '--tls-key', join(out, 'tls.key')],
      /webhook listening/,
    );
    const url = /"url":"(https:\/\/127\.0\.0\.1:\d+)"/.exec(output())?.[1];
    assert.ok(url, output());
    const pod = podWith({ containers: [{ name: 'a', image: 'registry.corp.example:5000/t/a:1' }] });
    const res = await request(url).post('/mutate').ca(readFileSync(join(out, 'ca.crt'))).send(reviewFor(pod)).expect(200);
    const patched = applyPatch(pod, decodePatch(res.body.response.patch)) as unknown as PodShape;
    assert.equal(patched.spec.containers[0]?.image, 'localhost:30500/corp/t/a:1');
    child.kill('SIGTERM');
    assert.equal(await exitOf(child), 0);
    assert.match(output(), /"audit":"admission"/);
    assert.match(output(), /webhook stopped/);
  });

  it('client-cert writes a CA and a client certificate; webhook --client-ca accepts only that certificate on /mutate, --metrics-port serves /metrics', async () => {
    const serving = join(dir, 'serving-clientca');
    assert.equal(runCli(['certs', '--service', 'w', '--namespace', 'n', '--out', serving, '--ip', '127.0.0.1']).status, 0);
    const clientDir = join(dir, 'apiserver-client');
    const written = runCli(['client-cert', '--name', 'kube-apiserver-admission', '--out', clientDir]);
    assert.equal(written.status, 0, written.stderr);
    const clientCert = new X509Certificate(readFileSync(join(clientDir, 'client.crt')));
    assert.ok(clientCert.verify(new X509Certificate(readFileSync(join(clientDir, 'ca.crt'))).publicKey));
    assert.match(clientCert.subject, /CN=kube-apiserver-admission/);
    assert.match(clientCert.keyUsage?.join(',') ?? '', /1\.3\.6\.1\.5\.5\.7\.3\.2/, 'extended key usage clientAuth');
    assert.equal(statSync(join(clientDir, 'client.key')).mode & 0o777, 0o600);

    const { child, output } = await startCli(
      ['webhook', '--config', configFile, '--host', '127.0.0.1', '--port', '0', '--tls-cert', join(serving, 'tls.crt'), '--tls-key', join(serving, 'tls.key'),
        '--client-ca', join(clientDir, 'ca.crt'), '--client-name', 'kube-apiserver-admission', '--metrics-port', '0'],
      /webhook listening/,
    );
    try {
      const url = /"url":"(https:\/\/127\.0\.0\.1:\d+)"/.exec(output())?.[1];
      const metricsUrl = /"metricsUrl":"(http:\/\/127\.0\.0\.1:\d+)"/.exec(output())?.[1];
      assert.ok(url && metricsUrl, output());
      const ca = readFileSync(join(serving, 'ca.crt'));
      const review = reviewFor(podWith({ containers: [{ name: 'a', image: 'registry.corp.example:5000/t/a:1' }] }));
      await request(url).post('/mutate').ca(ca).send(review).expect(401);
      await request(url).post('/mutate').ca(ca).cert(readFileSync(join(clientDir, 'client.crt'))).key(readFileSync(join(clientDir, 'client.key'))).send(review).expect(200);
      const metrics = await request(metricsUrl).get('/metrics').expect(200);
      assert.match(metrics.text, /pullbridge_admissions_total\{result="refused"\} 1/);
      await request(metricsUrl).post('/mutate').send(review).expect(404);
      assert.match(output(), /"audit":"refused"/);
    } finally {
      child.kill('SIGTERM');
      assert.equal(await exitOf(child), 0);
    }
  });

  it('webhook refuses --client-ca without HTTPS, and --client-name without --client-ca', () => {
    const plain = runCli(['webhook', '--config', configFile, '--port', '0', '--client-ca', configFile]);
    assert.equal(plain.status, 2);
    assert.match(plain.stderr, /--client-ca needs HTTPS/);
    const names = runCli(['webhook', '--config', configFile, '--port', '0', '--client-name', 'x']);
    assert.equal(names.status, 2);
    assert.match(names.stderr, /--client-name needs --client-ca/);
  });

  it('webhook refuses a --webhook-timeout the apiserver would not allow, with a one-line error and no stack', () => {
    for (const value of ['0', '31', '2.5', 'five']) {
      const result = runCli(['webhook', '--config', configFile, '--port', '0', '--webhook-timeout', value]);
      assert.equal(result.status, 2);
      assert.equal(result.stderr.split('\n')[0], `pullbridge webhook: --webhook-timeout must be the webhook's timeoutSeconds, a whole number from 1 to 30, got "${value}"`);
      assert.doesNotMatch(result.stderr, /at .*\.js:\d+/);
    }
  });

  it('webhook refuses a status collector without the proxy DaemonSet it reads, or with a name that is not one', () => {
    const status = ['webhook', '--config', configFile, '--port', '0', '--status-ops-port', '9090', '--status-proxy-selector', 'app=proxy'];
    const missing = runCli(status);
    assert.equal(missing.status, 2);
    assert.match(missing.stderr, /^pullbridge webhook: --status-proxy-daemonset is required\n/);
    const bad = runCli([...status, '--status-proxy-daemonset', 'Not_A_Name']);
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /^pullbridge webhook: --status-proxy-daemonset must be a DaemonSet name, got "Not_A_Name"\n/);
    const alone = runCli(['webhook', '--config', configFile, '--port', '0', '--status-proxy-daemonset', 'pb-proxy']);
    assert.equal(alone.status, 2);
    assert.match(alone.stderr, /--status-proxy-daemonset needs --status-ops-port/);
  });

  it('webhook refuses admission resolver flags it cannot use, naming the flag', () => {
    const base = ['webhook', '--config', configFile, '--port', '0'];
    const cases: Array<[string[], RegExp]> = [
      [['--resolver-url', 'not a url'], /^pullbridge webhook: --resolver-url must be a URL such as http:\/\/127\.0\.0\.1:9090, got "not a url"\n/],
      [['--resolver-url', 'http://127.0.0.1:9090/admission'], /^pullbridge webhook: --resolver-url must be http:\/\/HOST:PORT, a proxy's operations port/],
      [['--resolver-url', 'https://127.0.0.1:9090'], /^pullbridge webhook: --resolver-url must be http:\/\/HOST:PORT/],
      [['--resolver-url', 'http://127.0.0.1:9090', '--resolver-deadline-ms', '50'], /^pullbridge webhook: --resolver-deadline-ms must be whole milliseconds from 100 to 30000, got "50"\n/],
      [['--resolver-deadline-ms', '1000'], /^pullbridge webhook: --resolver-deadline-ms needs --resolver-url or --resolver-ops-port\n/],
      [['--resolver-ops-port', '9090', '--status-proxy-selector', 'app=proxy', '--status-proxy-daemonset', 'pb-proxy'], /^pullbridge webhook: --resolver-ops-port finds the proxy Pods through the Kubernetes API/],
    ];
    for (const [flags, message] of cases) {
      const result = runCli([...base, ...flags]);
      assert.equal(result.status, 2, flags.join(' '));
      assert.match(result.stderr, message);
    }
  });

  it('webhook without a cert serves plain HTTP (local use)', async () => {
    const { child, output } = await startCli(['webhook', '--config', configFile, '--host', '127.0.0.1', '--port', '0'], /webhook listening/);
    const url = /"url":"(http:\/\/127\.0\.0\.1:\d+)"/.exec(output())?.[1];
    assert.ok(url, output());
    await request(url).get('/healthz').expect(200);
    child.kill('SIGTERM');
    assert.equal(await exitOf(child), 0);
  });
  describe('upstream-aware rules: what validate, rewrite and the webhook say (trial 22)', () => {
    const brokerKey = join(dir, 'trial22-broker.key');
    const publicKey = join(dir, 'trial22-cosign.pub');
    const renameInto = (file: string, text: string) => {
      writeFileSync(`${file}.tmp`, text);
      renameSync(`${file}.tmp`, file);
    };
    before(() => {
      writeFileSync(brokerKey, `${'cd'.repeat(32)}\n`);
      writeFileSync(publicKey, generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'pem' }));
    });

    it('validate refuses private-only, pinDigest and verify without broker.keyFiles, naming each key (the resolver token comes from it)', () => {
      const file = join(dir, 'aware-nobroker.yaml');
      writeFileSync(file, `registries:
  - {name: probe, match: [probe.example], upstream: "https://127.0.0.1:5000", auth: {mode: anonymous}, rewrite: private-only}
  - {name: pin, match: [pin.example], upstream: "https://127.0.0.1:5000", auth: {mode: anonymous}, pinDigest: true}
  - {name: signed, match: [signed.example], upstream: "https://127.0.0.1:5000", auth: {mode: anonymous}, verify: {cosign: {publicKeyFiles: [${publicKey}]}}}
`);
      const result = runCli(['validate', '--config', file]);
      assert.equal(result.status, 1, result.stdout);
      assert.match(result.stderr, /^registries\[0\]\.rewrite: rewrite: private-only asks the proxy tier at admission with a token derived from the broker key: give broker\.keyFiles/m);
      assert.match(result.stderr, /^registries\[1\]\.pinDigest: pinDigest asks the proxy tier/m);
      assert.match(result.stderr, /^registries\[2\]\.verify: verify asks the proxy tier/m);
    });

    it('validate warns of onProbeFailure: leave on a rule that neither probes nor pins', () => {
      const file = join(dir, 'onprobe.yaml');
      writeFileSync(file, `broker: {keyFiles: [${brokerKey}]}
registries:
  - {name: plain, match: [plain.example], upstream: "https://127.0.0.1:5000", onProbeFailure: leave}
  - {name: pin, match: [pin.example], upstream: "https://127.0.0.1:5000", pinDigest: true, onProbeFailure: leave}
`);
      const result = runCli(['validate', '--config', file]);
      assert.equal(result.status, 0, result.stderr);
      assert.match(result.stderr, /^warning: registries\[0\]\.onProbeFailure: has no effect on rule "plain": only rewrite: private-only and pinDigest ask the upstream/m);
      assert.doesNotMatch(result.stderr, /registries\[1\]\.onProbeFailure/);
    });

    it('rewrite of an image written with a digest does not ask which digest pinDigest would pin', () => {
      const file = join(dir, 'pinned.yaml');
      writeFileSync(file, `broker: {keyFiles: [${brokerKey}]}\nregistries:\n  - {name: pin, match: [pin.example], upstream: "https://127.0.0.1:5000", pinDigest: true}\n`);
      const result = runCli(['rewrite', '--config', file, '--json', `pin.example/team/app@${SHA}`, 'pin.example/team/app:1']);
      assert.equal(result.status, 0, result.stderr);
      const [byDigest, byTag] = JSON.parse(result.stdout) as Array<{ detail?: string; upstreamUnknown?: boolean }>;
      assert.equal(byDigest?.detail, undefined);
      assert.equal(byDigest?.upstreamUnknown, undefined);
      assert.match(byTag?.detail ?? '', /pinDigest \(which digest\?\)/);
    });

    it('the webhook without API access refuses to start on a cosign key that does not load, naming the key', () => {
      const file = join(dir, 'webhook-badkey.yaml');
      writeFileSync(file, `broker: {keyFiles: [${brokerKey}]}\nregistries:\n  - {name: signed, match: [signed.example], upstream: "https://127.0.0.1:5000", verify: {cosign: {publicKeyFiles: [${join(dir, 'nope.pub')}]}}}\n`);
      const result = runCli(['webhook', '--config', file, '--host', '127.0.0.1', '--port', '0'], { KUBERNETES_SERVICE_HOST: '' });
      assert.equal(result.status, 1, result.stdout);
      assert.match(result.stderr, /^registries\[0\]\.verify\.cosign\.publicKeyFiles\[0\]: \S*nope\.pub holds no usable PEM public key: .*no such file$/m);
    });

    it('the webhook without a resolver warns, naming the flags, and without API access keeps its config when a reload names a missing cosign key', async () => {
      const file = join(dir, 'webhook-live.yaml');
      const text = (keyFile: string) => `broker: {keyFiles: [${brokerKey}]}\nregistries:\n  - {name: signed, match: [signed.example], upstream: "https://127.0.0.1:5000", verify: {cosign: {publicKeyFiles: [${keyFile}]}}}\n`;
      renameInto(file, text(publicKey));
      const webhook = await startCli(['webhook', '--config', file, '--host', '127.0.0.1', '--port', '0'], /webhook listening/, 20_000, { KUBERNETES_SERVICE_HOST: '' });
      try {
        assert.match(webhook.output(), /rules \\"signed\\" ask the upstream at admission .*give --resolver-url or --resolver-ops-port/);
        renameInto(file, text(join(dir, 'gone.pub')));
        await webhook.waitForOutput((output) => /config change (applied|rejected)/.test(output));
        assert.match(webhook.output(), /config change rejected; the last good config stays in force/);
        assert.match(webhook.output(), /"key":"registries\[0\]\.verify\.cosign\.publicKeyFiles\[0\]","message":"[^"]*gone\.pub holds no usable PEM public key: [^"]*no such file"/);
      } finally {
        webhook.child.kill('SIGTERM');
        await exitOf(webhook.child);
      }
    });
  });
});
