// Cache warm-up: the pure plan (which rule, which platforms, which blobs), then with real parts: a
// multi-platform image pushed to docker-registry is warmed in-process and by the `pullbridge warm`
// binary, the registry is killed, and a proxy on the same cache.path serves the tag, every manifest
// and every blob from the cache; `--platform` and `POST /warm` on the operations port fill only the
// platforms named; the registry port does not serve /warm.

import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NodeCache } from '../src/cache/nodecache.js';
import { drain, warmImages, type WarmReport } from '../src/cache/warm.js';
import type { ContentBody } from '../src/content/source.js';
import type { BodySink } from '../src/upstream/body.js';
import { parseManifestDocument, parsePlatform, parseWarmRequest, selectManifests, warmTarget, WARM_IMAGES_MAX, type IndexEntry, type Platform } from '../src/cache/warmplan.js';
import { createMetricsRegistry } from '../src/metrics.js';
import { createOpsHandler } from '../src/proxy/ops.js';
import { runProxy } from '../src/proxy/run.js';
import { createProxyRuntime } from '../src/proxy/runtime.js';
import { listen } from '../src/shell/serve.js';
import { runCli } from './support/cli.js';
import { configFrom, SHA } from './support/config.js';
import { memoryLogger } from './support/logs.js';
import { buildImage, sha256, type TestImage } from './support/oci.js';
import { startProxy } from './support/proxy.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const HOST = 'registry.corp.example:5000';
const IMAGE = `${HOST}/team/app:1.0`;
const INDEX_ACCEPT = 'application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json';

const platform = (text: string): Platform => {
  const parsed = parsePlatform(text);
  if (!parsed.ok) throw new Error(parsed.error);
  return parsed.platform;
};

/** Where the node store keeps a blob. */
const storedPath = (cachePath: string, digest: string) => join(cachePath, 'blobs', 'sha256', digest.slice('sha256:'.length));

describe('cache warm-up plan', () => {
  const config = configFrom(`
broker: {keyFiles: [/nonexistent/key]}
cache: {path: /var/cache/pullbridge}
registries:
  - {name: corp, match: [${HOST}], upstream: "https://127.0.0.1:5000", repositories: {exclude: ["legacy/**"]}}
  - {name: secret, match: [secret.example], upstream: "https://127.0.0.1:5001", cache: false}
  - {name: pass, match: [pass.example], upstream: "https://127.0.0.1:5002", auth: {mode: passthrough}}
`);

  it('resolves an image to its rule and upstream repository, by tag, by digest, or latest', () => {
    assert.deepEqual(warmTarget(config, IMAGE), { kind: 'warm', image: IMAGE, rule: 'corp', repository: 'team/app', reference: '1.0', byDigest: false });
    assert.deepEqual(warmTarget(config, `${HOST}/team/app:1.0@${SHA}`), { kind: 'warm', image: `${HOST}/team/app:1.0@${SHA}`, rule: 'corp', repository: 'team/app', reference: SHA, byDigest: true });
    assert.equal((warmTarget(config, `${HOST}/team/app`) as { reference: string }).reference, 'latest');
  });

  it('skips, with the reason, images no rule takes, rules that must not be cached and passthrough rules', () => {
    const skip = (image: string) => {
      const target = warmTarget(config, image);
      assert.equal(target.kind, 'skip', image);
      return target.kind === 'skip' ? { reason: target.reason, rule: target.rule, invalid: target.invalid } : undefined;
    };
    assert.deepEqual(skip('quay.io/team/app:1'), { reason: 'no-matching-rule', rule: null, invalid: false });
    assert.deepEqual(skip(`${HOST}/legacy/app:1`), { reason: 'repository-excluded', rule: 'corp', invalid: false });
    assert.deepEqual(skip('secret.example/team/app:1'), { reason: 'rule-not-cached', rule: 'secret', invalid: false });
    assert.deepEqual(skip('pass.example/team/app:1'), { reason: 'passthrough', rule: 'pass', invalid: false });
    assert.deepEqual(skip('localhost:30500/corp/team/app:1'), { reason: 'already-proxied', rule: null, invalid: false });
    assert.deepEqual(skip('Not A Reference'), { reason: 'invalid-reference', rule: null, invalid: true });
  });

  it('parses platforms as containerd normalises them, and refuses what is not one', () => {
    assert.deepEqual(platform('linux/amd64'), { os: 'linux', architecture: 'amd64', variant: '' });
    assert.deepEqual(platform('linux/x86_64'), { os: 'linux', architecture: 'amd64', variant: '' });
    assert.deepEqual(platform('linux/arm64/v8'), { os: 'linux', architecture: 'arm64', variant: '' });
    assert.deepEqual(platform('linux/aarch64'), { os: 'linux', architecture: 'arm64', variant: '' });
    assert.deepEqual(platform('linux/arm'), { os: 'linux', architecture: 'arm', variant: 'v7' });
    for (const bad of ['linux', 'linux/', 'linux/amd64/v1/x', 'linux/am d64', '']) assert.equal(parsePlatform(bad).ok, false, bad);
  });

  it('selects the manifests of an index: every platform but attestations, or those named, and says which are missing', () => {
    const entry = (digestChar: string, os: string, architecture: string, variant = '', attestation = false): IndexEntry => ({
      digest: `sha256:${digestChar.repeat(64)}`,
      size: 100,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      platform: { os, architecture, variant },
      attestation,
    });
    const index = [entry('a', 'linux', 'amd64'), entry('b', 'linux', 'arm64'), entry('c', 'linux', 'arm', 'v6'), entry('d', 'unknown', 'unknown', '', true)];
    assert.deepEqual(selectManifests(index, []).selected.map((m) => m.digest[7]), ['a', 'b', 'c']);
    assert.deepEqual(selectManifests(index, [platform('linux/arm64/v8')]).selected.map((m) => m.digest[7]), ['b']);
    const some = selectManifests(index, [platform('linux/amd64'), platform('linux/arm/v7'), platform('windows/amd64')]);
    assert.deepEqual(some.selected.map((m) => m.digest[7]), ['a']);
    assert.deepEqual(some.missing, [platform('linux/arm/v7'), platform('windows/amd64')]);
  });

  it('reads an index and an image manifest, and refuses digests that are not digests (they become store paths)', () => {
    const image = buildImage();
    const index = parseManifestDocument(image.index.data, undefined);
    assert.equal(index.kind, 'index');
    assert.deepEqual(
      index.kind === 'index' ? index.manifests.map((m) => [m.digest, m.platform?.architecture]) : [],
      image.manifests.map((m, i) => [m.digest, i === 0 ? 'amd64' : 'arm64']),
    );
    const manifest = parseManifestDocument(image.manifests[0]?.data ?? Buffer.alloc(0), 'application/vnd.oci.image.manifest.v1+json');
    assert.equal(manifest.kind, 'image');
    assert.deepEqual(manifest.kind === 'image' ? [manifest.config.digest, ...manifest.layers.map((l) => l.digest)] : [], [image.configs[0]?.digest, image.layers[0]?.digest, image.layers[1]?.digest]);
    const list = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.docker.distribution.manifest.list.v2+json', manifests: [{ digest: SHA, size: 1, platform: { os: 'linux', architecture: 'amd64' } }] }));
    assert.equal(parseManifestDocument(list, undefined).kind, 'index');
    const hostile = Buffer.from(JSON.stringify({ schemaVersion: 2, config: { digest: 'sha256:../../../etc/passwd', size: 1 }, layers: [] }));
    assert.equal(parseManifestDocument(hostile, undefined).kind, 'invalid');
    assert.equal(parseManifestDocument(Buffer.from('{"schemaVersion":1,"fsLayers":[]}'), undefined).kind, 'invalid');
    assert.equal(parseManifestDocument(Buffer.from('not json'), undefined).kind, 'invalid');
  });

  it('drains a body to its end, and stops it when the warm-up is aborted', async () => {
    let sink: BodySink | undefined;
    let destroyed: Error | undefined;
    const body: ContentBody = {
      attach: (s) => (sink = s),
      resume: () => undefined,
      destroy: (reason) => (destroyed = reason),
      hold: () => () => undefined,
    };
    const abort = new AbortController();
    const done = drain(body, abort.signal);
    sink?.data(Buffer.alloc(10));
    sink?.data(Buffer.alloc(5));
    abort.abort();
    await assert.rejects(done, /warm-up aborted/);
    assert.match(destroyed?.message ?? '', /warm-up aborted/);
    const whole = drain({ ...body, attach: (s) => (s.data(Buffer.alloc(7)), s.end()) }, new AbortController().signal);
    assert.equal(await whole, 7);
  });

  it('checks a POST /warm body: images required and capped, platforms valid, nothing else', () => {
    assert.deepEqual(parseWarmRequest({ images: [IMAGE], platforms: ['linux/amd64'] }), { ok: true, request: { images: [IMAGE], platforms: [platform('linux/amd64')] } });
    assert.deepEqual(parseWarmRequest({ images: [IMAGE] }), { ok: true, request: { images: [IMAGE], platforms: [] } });
    const refused = (body: unknown) => {
      const result = parseWarmRequest(body);
      assert.equal(result.ok, false, JSON.stringify(body).slice(0, 80));
      return result.ok ? '' : result.error;
    };
    assert.match(refused([IMAGE]), /JSON object/);
    assert.match(refused({}), /"images" must be/);
    assert.match(refused({ images: [] }), /"images" must be/);
    assert.match(refused({ images: [1] }), /"images" must be/);
    assert.match(refused({ images: Array.from({ length: WARM_IMAGES_MAX + 1 }, () => IMAGE) }), /at most 100/);
    assert.match(refused({ images: [IMAGE], platforms: ['amd64'] }), /os\/architecture/);
    assert.match(refused({ images: [IMAGE], platform: ['linux/amd64'] }), /unknown field "platform"/);
  });
});

describe('cache warm-up with a real registry', function () {
  this.timeout(120_000);
  const cleanups: Array<() => Promise<void>> = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-warm-'));
  const keyFile = join(dir, 'broker.key');
  writeFileSync(keyFile, 'a-broker-key-of-at-least-16-bytes\n');

  async function upstreamWith(image: TestImage): Promise<RegistryHandle> {
    const registry = await startRegistry({ accessLog: true });
    cleanups.push(() => registry.stop());
    await registry.push(image, 'team/app', '1.0');
    return registry;
  }

  /** The config as an operator writes it: the image's rule, a rule with cache: false, a passthrough rule. */
  function configYaml(registry: RegistryHandle, cachePath: string | undefined, auth = 'broker'): string {
    return [
      'proxy: {host: 127.0.0.1, port: 30500}',
      `broker: {keyFiles: [${keyFile}]}`,
      ...(cachePath ? [`cache: {path: ${cachePath}}`] : []),
      'registries:',
      `  - {name: corp, match: [${HOST}], upstream: "${registry.url}", auth: {mode: ${auth}}}`,
      `  - {name: secret, match: [secret.example], upstream: "${registry.url}", cache: false}`,
      `  - {name: pass, match: [pass.example], upstream: "${registry.url}", auth: {mode: passthrough}}`,
      '',
    ].join('\n');
  }

  function configFile(yaml: string): string {
    const file = join(mkdtempSync(join(dir, 'config-')), 'config.yaml');
    writeFileSync(file, yaml);
    return file;
  }

  const newCachePath = () => mkdtempSync(join(dir, 'cache-'));

  /** GET through a proxy; the body and its sha256. */
  async function get(url: string, headers: Record<string, string>): Promise<{ status: number; digest: string; header: string | null; body: Buffer }> {
    const res = await fetch(url, { headers });
    const body = Buffer.from(await res.arrayBuffer());
    return { status: res.status, digest: sha256(body), header: res.headers.get('docker-content-digest'), body };
  }

  it('warms every platform in-process; with the registry killed a proxy on the same cache.path serves the tag, every manifest and every blob', async () => {
    const image = buildImage({ layerSizes: [4096, 512 * 1024] });
    const registry = await upstreamWith(image);
    const cachePath = newCachePath();
    const config = configFrom(configYaml(registry, cachePath));
    const logs = memoryLogger();
    const cache = await NodeCache.open(config.cache ?? assert.fail('no cache'), createMetricsRegistry(false), logs.logger, Date.now, { removePartialFills: false });
    const runtime = createProxyRuntime(config, {}, undefined, cache);
    cleanups.push(async () => {
      await runtime.close();
      await cache.close();
    });
    const warm = (images: string[]) => warmImages({ content: runtime.content, rules: runtime.rules, config, images });

    const report = await warm([IMAGE, 'quay.io/team/app:1', 'secret.example/team/app:1.0', 'pass.example/team/app:1.0']);
    const [first, unmatched, uncached, passthrough] = report.images;
    assert.ok(report.ok, JSON.stringify(report, null, 2));
    assert.equal(first?.status, 'warmed');
    assert.equal(first?.rule, 'corp');
    assert.equal(first?.repository, 'team/app');
    assert.equal(first?.digest, image.index.digest);
    assert.deepEqual(first?.platforms, ['linux/amd64', 'linux/arm64']);
    assert.deepEqual(first?.manifests, { count: 3, cached: 0, filled: 3 });
    const blobBytes = [...image.configs, ...image.layers].reduce((sum, b) => sum + b.size, 0);
    assert.deepEqual(first?.blobs, { count: 6, bytes: blobBytes, cached: 0, filled: 6 });
    assert.deepEqual([unmatched?.status, unmatched?.reason], ['skipped', 'no-matching-rule']);
    assert.deepEqual([uncached?.status, uncached?.reason], ['skipped', 'rule-not-cached']);
    assert.deepEqual([passthrough?.status, passthrough?.reason], ['skipped', 'passthrough']);
    for (const blob of [...image.configs, ...image.layers]) assert.equal(await registry.blobGets(blob.digest), 1, `one upstream transfer of ${blob.digest}`);

    const again = await warm([IMAGE]);
    assert.deepEqual(again.images[0]?.blobs, { count: 6, bytes: blobBytes, cached: 6, filled: 0 }, 'a second warm-up finds everything stored');
    for (const blob of [...image.configs, ...image.layers]) assert.equal(await registry.blobGets(blob.digest), 1, 'and fetches no blob again');

    await registry.kill();
    const proxy = await startProxy({ cache: { path: cachePath }, registries: [{ name: 'corp', match: [HOST], upstream: registry.url }] });
    cleanups.push(() => proxy.close());
    const authorization = proxy.authorization('shop');
    const byTag = await get(`${proxy.url}/v2/corp/team/app/manifests/1.0`, { authorization, accept: INDEX_ACCEPT });
    assert.equal(byTag.status, 200);
    assert.equal(byTag.header, image.index.digest);
    assert.equal(byTag.digest, image.index.digest);
    for (const manifest of image.manifests) {
      const got = await get(`${proxy.url}/v2/corp/team/app/manifests/${manifest.digest}`, { authorization, accept: INDEX_ACCEPT });
      assert.deepEqual([got.status, got.digest], [200, manifest.digest]);
    }
    for (const blob of [...image.configs, ...image.layers]) {
      const got = await get(`${proxy.url}/v2/corp/team/app/blobs/${blob.digest}`, { authorization });
      assert.deepEqual([got.status, got.digest], [200, blob.digest]);
    }
    const pulls = proxy.logs.records.filter((r) => r.access === 'pull');
    assert.equal(pulls.length, 1 + image.manifests.length + 6);
    assert.ok(pulls.every((r) => r.cache === 'hit'), JSON.stringify(pulls.map((r) => [r.kind, r.cache])));
  });

  it('`pullbridge warm --platform linux/amd64` fills only that platform; exit 1 when an image fails, and a clear error without a cache', async () => {
    const image = buildImage();
    const registry = await upstreamWith(image);
    const cachePath = newCachePath();
    const file = configFile(configYaml(registry, cachePath));
    // A proxy already running on the store: it learns what the warm-up process stores from the disk.
    const proxy = await startProxy({ cache: { path: cachePath }, registries: [{ name: 'corp', match: [HOST], upstream: registry.url }] });
    cleanups.push(() => proxy.close());

    const result = runCli(['warm', '--config', file, '--platform', 'linux/amd64', '--json', IMAGE, 'quay.io/team/app:1']);
    assert.equal(result.status, 0, result.stderr + result.stdout);
    const report = JSON.parse(result.stdout) as WarmReport;
    assert.equal(report.ok, true);
    assert.deepEqual(report.images[0]?.platforms, ['linux/amd64']);
    assert.deepEqual(report.images[0]?.blobs, { count: 3, bytes: [image.configs[0], image.layers[0], image.layers[1]].reduce((sum, b) => sum + (b?.size ?? 0), 0), cached: 0, filled: 3 });
    assert.equal(report.images[1]?.status, 'skipped');
    const [amd64, arm64] = [
      [image.index, image.manifests[0], image.configs[0], image.layers[0], image.layers[1]],
      [image.manifests[1], image.configs[1], image.layers[2], image.layers[3]],
    ];
    for (const blob of amd64) assert.ok(blob && existsSync(storedPath(cachePath, blob.digest)), `stored: ${blob?.digest}`);
    for (const blob of arm64) assert.ok(blob && !existsSync(storedPath(cachePath, blob.digest)), `not stored: ${blob?.digest}`);
    // The log is settled first (the warm-up ran in a child this process waited for without reading
    // the registry's output); the amd64 blobs' one transfer each shows the count sees its fetches.
    for (const blob of amd64.slice(2)) assert.equal(await registry.blobGets(blob?.digest ?? ''), 1, `the amd64 blob ${blob?.digest} was fetched once`);
    for (const blob of arm64) assert.equal(await registry.blobGets(blob?.digest ?? ''), 0, 'the arm64 blobs were never fetched');

    // The human summary, and a failure: a tag the registry does not have.
    const failed = runCli(['warm', '--config', file, IMAGE, `${HOST}/team/app:missing`]);
    assert.equal(failed.status, 1, failed.stderr);
    assert.match(failed.stdout, /team\/app:1\.0 -> warmed {2}\[rule corp, team\/app@sha256:[0-9a-f]{64}, linux\/amd64 linux\/arm64; 3 manifest\(s\), 6 blob\(s\) [\d.]+ KiB: 3 already cached, 3 filled\]/);
    assert.match(failed.stdout, /team\/app:missing -> failed .*\n {4}error: manifest missing: upstream answered 404/);

    await registry.kill();
    const authorization = proxy.authorization('shop');
    const byTag = await get(`${proxy.url}/v2/corp/team/app/manifests/1.0`, { authorization, accept: INDEX_ACCEPT });
    assert.deepEqual([byTag.status, byTag.digest], [200, image.index.digest]);
    for (const blob of amd64.slice(1)) {
      const kind = blob === image.manifests[0] ? 'manifests' : 'blobs';
      const got = await get(`${proxy.url}/v2/corp/team/app/${kind}/${blob?.digest ?? ''}`, { authorization, accept: INDEX_ACCEPT });
      assert.deepEqual([got.status, got.digest], [200, blob?.digest]);
    }
    assert.ok(proxy.logs.records.filter((r) => r.access === 'pull').every((r) => r.cache === 'hit'));

    const noCache = runCli(['warm', '--config', configFile(configYaml(registry, undefined)), IMAGE]);
    assert.equal(noCache.status, 1);
    assert.match(noCache.stderr, /has no cache \(cache\.path\)/);
    assert.equal(runCli(['warm', '--config', file, '--platform', 'amd64', IMAGE]).status, 2, 'a platform that is not one is a usage error');
  });

  it('POST /warm on the operations port fills the platforms named; the registry port does not serve it; bad input is a 400', async () => {
    const image = buildImage();
    const registry = await upstreamWith(image);
    const cachePath = newCachePath();
    const config = configFrom(configYaml(registry, cachePath, 'anonymous'));
    const proxy = await runProxy({ config, host: '127.0.0.1', port: 0, opsPort: 0, probeIntervalMs: 0 });
    cleanups.push(() => proxy.shutdown());
    const ops = proxy.ops?.url ?? assert.fail('no operations port');
    const post = (url: string, body: string, type = 'application/json') => fetch(`${url}/warm`, { method: 'POST', headers: { 'content-type': type }, body });

    const before = (await registry.requests()).length;
    const onRegistryPort = await post(proxy.running.url, JSON.stringify({ images: [IMAGE] }));
    assert.equal(onRegistryPort.status, 405);
    assert.equal((await registry.requests()).length, before, 'nothing was fetched for it');
    assert.equal((await fetch(`${ops}/warm`)).status, 405, 'GET /warm');

    const bad = async (body: string, status: number, message: RegExp, type?: string) => {
      const res = await post(ops, body, type);
      assert.equal(res.status, status, body.slice(0, 60));
      assert.match(((await res.json()) as { error: string }).error, message);
    };
    await bad('{"images": [', 400, /not valid JSON/);
    await bad('{"images": []}', 400, /"images" must be/);
    await bad(JSON.stringify({ images: Array.from({ length: 101 }, () => IMAGE) }), 400, /at most 100/);
    await bad(JSON.stringify({ images: [IMAGE], platforms: ['arm64'] }), 400, /os\/architecture/);
    await bad(JSON.stringify({ images: [IMAGE] }), 415, /application\/json/, 'text/plain');
    await bad(JSON.stringify({ images: ['x'.repeat(70 * 1024)] }), 413, /larger than the limit/);

    const res = await post(ops, JSON.stringify({ images: [IMAGE, 'quay.io/team/app:1'], platforms: ['linux/arm64'] }));
    assert.equal(res.status, 200);
    const report = (await res.json()) as WarmReport;
    assert.equal(report.ok, true, JSON.stringify(report));
    assert.deepEqual(report.images[0]?.platforms, ['linux/arm64']);
    assert.deepEqual([report.images[1]?.status, report.images[1]?.reason], ['skipped', 'no-matching-rule']);
    for (const blob of [image.manifests[1], image.configs[1], image.layers[2], image.layers[3]]) assert.ok(blob && existsSync(storedPath(cachePath, blob.digest)), `stored: ${blob?.digest}`);
    for (const blob of [image.manifests[0], image.configs[0], image.layers[0], image.layers[1]]) assert.ok(blob && !existsSync(storedPath(cachePath, blob.digest)), `not stored: ${blob?.digest}`);

    // The proxy that warmed serves the arm64 image with its registry gone.
    await registry.kill();
    const byTag = await get(`${proxy.running.url}/v2/corp/team/app/manifests/1.0`, { accept: INDEX_ACCEPT });
    assert.deepEqual([byTag.status, byTag.digest], [200, image.index.digest]);
    for (const blob of [image.manifests[1], image.configs[1], image.layers[2], image.layers[3]]) {
      const kind = blob === image.manifests[1] ? 'manifests' : 'blobs';
      const got = await get(`${proxy.running.url}/v2/corp/team/app/${kind}/${blob?.digest ?? ''}`, { accept: INDEX_ACCEPT });
      assert.deepEqual([got.status, got.digest], [200, blob?.digest]);
    }
  });

  it('POST /warm is a 409 on a proxy without a cache', async () => {
    const config = configFrom(`registries: [{name: corp, match: [${HOST}], upstream: "http://127.0.0.1:1", auth: {mode: anonymous}}]`);
    const runtime = createProxyRuntime(config);
    const server = await listen(createOpsHandler({ runtime: () => runtime, metrics: createMetricsRegistry(false) }), { host: '127.0.0.1', port: 0 });
    cleanups.push(async () => {
      await server.close(100);
      await runtime.close();
    });
    const res = await fetch(`${server.url}/warm`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ images: [IMAGE] }) });
    assert.equal(res.status, 409);
    assert.match(((await res.json()) as { error: string }).error, /no node cache/);
  });
});
