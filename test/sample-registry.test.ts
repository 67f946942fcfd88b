// The sample registry: one generated image with stable digests, served read-only by the Distribution
// API; checked with the real tar and skopeo.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildSampleImage, SAMPLE_FILE_TEXT } from '../src/shell/sampleimage.js';
import { answerRegistryRequest } from '../src/shell/sampleregistry.js';
import { exitOf, startCli } from './support/cli.js';
import { freePort, run } from './support/procs.js';

const sha256 = (bytes: Buffer) => `sha256:${createHash('sha256').update(bytes).digest('hex')}`;

describe('pullbridge sample-registry', function () {
  this.timeout(60_000);
  const image = buildSampleImage();
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-sample-registry-'));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('builds the same bytes every time: the digests are stable', () => {
    const again = buildSampleImage();
    assert.equal(again.manifest.digest, image.manifest.digest);
    assert.equal(image.manifest.digest, 'sha256:ff965951b30ca9deacd87ee506ff07c99926fad67d68f44b688d352dd1ad8076');
    for (const blob of [image.manifest, image.config, image.layer]) assert.equal(sha256(blob.bytes), blob.digest);
    const manifest = JSON.parse(image.manifest.bytes.toString()) as { config: { digest: string; size: number }; layers: Array<{ digest: string; size: number }> };
    assert.deepEqual([manifest.config.digest, manifest.config.size], [image.config.digest, image.config.bytes.length]);
    assert.deepEqual([manifest.layers[0]?.digest, manifest.layers[0]?.size], [image.layer.digest, image.layer.bytes.length]);
  });

  it('its layer is a tar the real tar reads, holding the sample file', () => {
    const file = join(dir, 'layer.tar');
    writeFileSync(file, image.layer.bytes);
    assert.equal(run('tar', ['-tvf', file]).includes('hello.txt'), true);
    assert.equal(run('tar', ['-xOf', file, 'hello.txt']), SAMPLE_FILE_TEXT);
  });

  it('routes the Distribution API read-only: manifests by tag and digest, blobs, tags/list, errors as registry errors', () => {
    const get = (path: string, method = 'GET') => answerRegistryRequest(image, method, path);
    assert.equal(get('/v2/').status, 200);
    assert.equal(get('/v2/').headers['docker-distribution-api-version'], 'registry/2.0');
    for (const ref of ['1.0', image.manifest.digest]) {
      const answer = get(`/v2/demo/hello/manifests/${ref}`);
      assert.equal(answer.status, 200);
      assert.equal(answer.headers['docker-content-digest'], image.manifest.digest);
      assert.equal(answer.headers['content-type'], 'application/vnd.oci.image.manifest.v1+json');
    }
    assert.deepEqual(get(`/v2/demo/hello/blobs/${image.layer.digest}`).body, image.layer.bytes);
    assert.equal(get(`/v2/demo/hello/blobs/${image.config.digest}`, 'HEAD').headers['content-length'], String(image.config.bytes.length));
    assert.deepEqual(JSON.parse(get('/v2/demo/hello/tags/list').body.toString()), { name: 'demo/hello', tags: ['1.0'] });
    const codeOf = (path: string, method = 'GET') => (JSON.parse(get(path, method).body.toString()) as { errors: Array<{ code: string }> }).errors[0]?.code;
    assert.equal(get('/v2/demo/hello/manifests/2.0').status, 404);
    assert.equal(codeOf('/v2/demo/hello/manifests/2.0'), 'MANIFEST_UNKNOWN');
    assert.equal(codeOf('/v2/other/manifests/1.0'), 'NAME_UNKNOWN');
    assert.equal(codeOf(`/v2/demo/hello/blobs/sha256:${'0'.repeat(64)}`), 'BLOB_UNKNOWN');
    assert.equal(get('/v2/demo/hello/manifests/1.0', 'PUT').status, 405);
    assert.equal(codeOf('/v2/demo/hello/blobs/uploads/', 'POST'), 'UNSUPPORTED');
  });

  it('serves the image to skopeo, anonymously, and prints its URL', async () => {
    const port = await freePort();
    const server = await startCli(['sample-registry', '--port', String(port)], /sample registry: http:\/\/127\.0\.0\.1:\d+/);
    try {
      assert.match(server.output(), new RegExp(`sample registry: http://127\\.0\\.0\\.1:${port} serving demo/hello:1\\.0 \\(${image.manifest.digest}\\)`));
      const inspected = JSON.parse(run('skopeo', ['inspect', '--tls-verify=false', `docker://127.0.0.1:${port}/demo/hello:1.0`])) as { Digest: string; Layers: string[] };
      assert.equal(inspected.Digest, image.manifest.digest);
      assert.deepEqual(inspected.Layers, [image.layer.digest]);
      const out = join(dir, 'copy');
      run('skopeo', ['copy', '--src-tls-verify=false', `docker://127.0.0.1:${port}/demo/hello:1.0`, `dir:${out}`]);
      assert.deepEqual(readFileSync(join(out, image.layer.digest.slice('sha256:'.length))), image.layer.bytes);
    } finally {
      server.child.kill('SIGTERM');
      assert.equal(await exitOf(server.child), 0);
    }
  });
});
