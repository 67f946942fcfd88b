// A release a user can install: the chart packaged and pushed as an OCI artifact to a real registry
// (docker-registry on loopback, plain HTTP), then shown, rendered and installed from `oci://` with
// helm as a user would, the image it installs following the chart's appVersion; and the release
// command's dry run (scripts/release.sh), which checks that the versions agree before it prints
// the steps it would take.

import assert from 'node:assert/strict';
import { copyFileSync, cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnSync } from 'node:child_process';
import { AppsV1Api, KubeConfig } from '@kubernetes/client-node';
import { parse as parseYaml, parseAllDocuments } from 'yaml';
import { cachedBinary, KUBE_VERSION, startControlPlane, type ControlPlane } from './support/controlplane.js';
import { runAsync } from './support/procs.js';
import { startRegistry, type RegistryHandle } from './support/registry.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const CHART = join(ROOT, 'charts', 'pullbridge');
const chartYaml = parseYaml(readFileSync(join(CHART, 'Chart.yaml'), 'utf8')) as { name: string; version: string; appVersion: string };
const values = parseYaml(readFileSync(join(CHART, 'values.yaml'), 'utf8')) as { image: { repository: string; tag: string } };
const packageJson = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string };

/** Every container image of the rendered objects (init containers included), one entry each. */
function imagesOf(manifests: string): string[] {
  type PodSpec = { containers?: { image: string }[]; initContainers?: { image: string }[] };
  return parseAllDocuments(manifests)
    .map((doc) => doc.toJS() as { spec?: { template?: { spec?: PodSpec } } } | null)
    .flatMap((object) => {
      const spec = object?.spec?.template?.spec;
      return [...(spec?.initContainers ?? []), ...(spec?.containers ?? [])].map((c) => c.image);
    });
}

describe('release: the versions agree', () => {
  it('package.json, Chart.yaml version and appVersion are one version; values.yaml image.tag is "" (the image follows appVersion)', () => {
    assert.equal(chartYaml.version, packageJson.version);
    assert.equal(chartYaml.appVersion, packageJson.version);
    assert.equal(values.image.tag, '');
  });

  it('CHANGELOG.md has a dated section for that version, or an Unreleased section it is being prepared in', () => {
    const changelog = readFileSync(join(ROOT, 'CHANGELOG.md'), 'utf8');
    const escaped = packageJson.version.replace(/\./g, '\\.');
    assert.match(changelog, new RegExp(`^## \\[(${escaped}\\] - \\d{4}-\\d{2}-\\d{2}|Unreleased\\])$`, 'm'));
  });
});

describe('release: the chart as an OCI artifact in docker-registry, installed with helm from oci://', function () {
  this.timeout(120_000);
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-release-'));
  // helm's registry config, cache and repositories in this test's directory, never the user's.
  const helmEnv = { HELM_CACHE_HOME: join(dir, 'helm', 'cache'), HELM_CONFIG_HOME: join(dir, 'helm', 'config'), HELM_DATA_HOME: join(dir, 'helm', 'data') };
  const helm = (...args: string[]) => runAsync(cachedBinary('helm'), args, { env: helmEnv });
  let registry: RegistryHandle;
  let cp: ControlPlane;
  let reference = '';
  const image = `${values.image.repository}:${chartYaml.appVersion}`;

  before(async () => {
    [registry, cp] = await Promise.all([startRegistry(), startControlPlane()]);
    reference = `oci://${registry.host}/charts/${chartYaml.name}`;
  });
  after(async () => {
    await Promise.all([registry?.stop(), cp?.stop()]);
    rmSync(dir, { recursive: true, force: true });
  });

  it('helm package and helm push: the registry holds an OCI manifest with helm\'s config and chart layer, tagged with the chart version', async () => {
    const packaged = await helm('package', CHART, '--destination', dir);
    const archive = join(dir, `${chartYaml.name}-${chartYaml.version}.tgz`);
    assert.match(packaged, new RegExp(`saved it to: ${archive.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
    await helm('push', archive, `oci://${registry.host}/charts`, '--plain-http');

    const response = await fetch(`http://${registry.host}/v2/charts/${chartYaml.name}/manifests/${chartYaml.version}`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } });
    assert.equal(response.status, 200);
    const manifest = (await response.json()) as { config: { mediaType: string }; layers: { mediaType: string; digest: string }[] };
    assert.equal(manifest.config.mediaType, 'application/vnd.cncf.helm.config.v1+json');
    assert.deepEqual(manifest.layers.map((l) => l.mediaType), ['application/vnd.cncf.helm.chart.content.v1.tar+gzip']);
    const layer = await fetch(`http://${registry.host}/v2/charts/${chartYaml.name}/blobs/${manifest.layers[0]?.digest ?? ''}`);
    assert.equal(layer.status, 200);
    assert.ok(Buffer.from(await layer.arrayBuffer()).equals(readFileSync(archive)), 'the chart layer is the packaged archive, byte for byte');
  });

  it('helm show chart oci://… --version: the chart\'s name, version and appVersion', async () => {
    const shown = parseYaml(await helm('show', 'chart', reference, '--version', chartYaml.version, '--plain-http')) as typeof chartYaml;
    assert.deepEqual({ name: shown.name, version: shown.version, appVersion: shown.appVersion }, { name: chartYaml.name, version: chartYaml.version, appVersion: chartYaml.appVersion });
  });

  it('helm template oci://…: every container runs <image.repository>:<appVersion>; an image.tag set overrides it', async () => {
    const template = (...extra: string[]) => helm('template', 'pullbridge', reference, '--version', chartYaml.version, '--plain-http', '-n', 'pullbridge', '--kube-version', KUBE_VERSION.slice(1), ...extra);
    const images = imagesOf(await template());
    assert.ok(images.length >= 2, `the webhook and the proxy at least: ${images.join(', ')}`);
    assert.deepEqual([...new Set(images)], [image]);
    assert.deepEqual([...new Set(imagesOf(await template('--set', 'image.tag=9.9.9-rc.1')))], [`${values.image.repository}:9.9.9-rc.1`]);
  });

  it('helm install oci://… into a real apiserver: the webhook Deployment and the proxy DaemonSet run <image.repository>:<appVersion>', async () => {
    const installed = await helm('install', 'pullbridge', reference, '--version', chartYaml.version, '--plain-http', '-n', 'pullbridge', '--create-namespace', '--kubeconfig', cp.kubeconfig);
    assert.match(installed, /STATUS: deployed/);
    const kc = new KubeConfig();
    kc.loadFromFile(cp.kubeconfig);
    const apps = kc.makeApiClient(AppsV1Api);
    const deployments = (await apps.listNamespacedDeployment({ namespace: 'pullbridge' })).items;
    const daemonSets = (await apps.listNamespacedDaemonSet({ namespace: 'pullbridge' })).items;
    assert.equal(deployments.length, 1);
    assert.equal(daemonSets.length, 1);
    for (const workload of [...deployments, ...daemonSets]) {
      const spec = workload.spec?.template.spec;
      assert.deepEqual([...new Set([...(spec?.initContainers ?? []), ...(spec?.containers ?? [])].map((c) => c.image))], [image], workload.metadata?.name);
      assert.equal(workload.metadata?.labels?.['app.kubernetes.io/version'], chartYaml.appVersion);
      assert.equal(workload.metadata?.labels?.['helm.sh/chart'], `${chartYaml.name}-${chartYaml.version}`);
    }
  });
});

describe('release: scripts/release.sh --dry-run', () => {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-release-script-'));
  after(() => rmSync(dir, { recursive: true, force: true }));
  const version = packageJson.version;

  /** A copy of what the script reads, as a release commit has it: CHANGELOG's section cut for the version. */
  const releaseTree = (name: string, edit: (root: string) => void = () => undefined): string => {
    const root = join(dir, name);
    mkdirSync(join(root, 'scripts'), { recursive: true });
    copyFileSync(join(ROOT, 'scripts', 'release.sh'), join(root, 'scripts', 'release.sh'));
    copyFileSync(join(ROOT, 'package.json'), join(root, 'package.json'));
    cpSync(CHART, join(root, 'charts', 'pullbridge'), { recursive: true });
    const changelog = readFileSync(join(ROOT, 'CHANGELOG.md'), 'utf8');
    writeFileSync(join(root, 'CHANGELOG.md'), changelog.replace(/^## \[Unreleased\]$/m, `## [Unreleased]\n\n## [${version}] - 2026-12-07`));
    edit(root);
    return root;
  };
  const release = (root: string, args: string[], env: Record<string, string> = {}) => {
    // PATH without docker, cosign or helm would not matter: a dry run runs none of them.
    const result = spawnSync(join(root, 'scripts', 'release.sh'), args, { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 30_000 });
    return { status: result.status, stdout: result.stdout, stderr: result.stderr };
  };

  it('prints every step (image build with SBOM, signing by digest, chart package, push and signing, tag) and exits 0', () => {
    const root = releaseTree('agree');
    const { status, stdout, stderr } = release(root, ['--dry-run', version], { IMAGE_REPOSITORY: '127.0.0.1:5000/pullbridge', CHART_REPOSITORY: 'oci://127.0.0.1:5000/charts', COSIGN_KEY: 'cosign.key' });
    assert.equal(status, 0, stderr);
    assert.equal(stderr, '');
    const commands = stdout.split('\n').filter((line) => line.startsWith('+ '));
    const expected = [
      /^\+ docker buildx build --platform linux\/amd64\\,linux\/arm64 --tag 127\.0\.0\.1:5000\/pullbridge:VERSION .*--sbom=true --provenance=mode=max .*--push \.$/,
      /^\+ cosign sign --yes --key cosign\.key 127\.0\.0\.1:5000\/pullbridge@sha256:IMAGE-DIGEST$/,
      /^\+ helm lint charts\/pullbridge$/,
      /^\+ helm package charts\/pullbridge --destination \S+$/,
      /^\+ helm push \S+\/pullbridge-VERSION\.tgz oci:\/\/127\.0\.0\.1:5000\/charts$/,
      /^\+ cosign sign --yes --key cosign\.key 127\.0\.0\.1:5000\/charts\/pullbridge@sha256:CHART-DIGEST$/,
      /^\+ git tag -a vVERSION -m pullbridge\\ VERSION$/,
      /^\+ git push origin vVERSION$/,
    ].map((pattern) => new RegExp(pattern.source.replace(/VERSION/g, version.replace(/\./g, '\\.'))));
    assert.equal(commands.length, expected.length, stdout);
    commands.forEach((command, i) => assert.match(command, expected[i] as RegExp));
    assert.match(stdout, new RegExp(`helm install pullbridge oci://127\\.0\\.0\\.1:5000/charts/pullbridge --version ${version.replace(/\./g, '\\.')}$`, 'm'));
    assert.match(stdout, /nothing was built, signed or pushed/);
  });

  it('signs keyless without COSIGN_KEY, and pushes to the chart\'s image.repository by default', () => {
    const { status, stdout } = release(releaseTree('keyless'), ['--dry-run', version], { COSIGN_KEY: '' });
    assert.equal(status, 0);
    assert.match(stdout, new RegExp(`^\\+ cosign sign --yes ${values.image.repository.replace(/[./]/g, '\\$&')}@sha256:IMAGE-DIGEST$`, 'm'));
  });

  const refusals: [string, (root: string) => void, string[], RegExp, Record<string, string>?][] = [
    ['a version other than package.json\'s', () => undefined, ['--dry-run', '99.0.0'], /^release: package\.json version is .+, not 99\.0\.0/],
    ['a version that is not MAJOR.MINOR.PATCH', () => undefined, ['--dry-run', '1.2'], /^release: VERSION 1\.2 is not a semantic version/],
    ['Chart.yaml appVersion apart', (root) => sed(join(root, 'charts/pullbridge/Chart.yaml'), /^appVersion: .*$/m, 'appVersion: "0.0.1"'), ['--dry-run', version], /^release: charts\/pullbridge\/Chart\.yaml appVersion is 0\.0\.1, not /],
    ['Chart.yaml version apart', (root) => sed(join(root, 'charts/pullbridge/Chart.yaml'), /^version: .*$/m, 'version: 0.0.1'), ['--dry-run', version], /^release: charts\/pullbridge\/Chart\.yaml version is 0\.0\.1, not /],
    ['image.tag pinned in values.yaml', (root) => sed(join(root, 'charts/pullbridge/values.yaml'), /^ {2}tag: ""/m, '  tag: "0.0.1"'), ['--dry-run', version], /^release: charts\/pullbridge\/values\.yaml image\.tag is "0\.0\.1"/],
    ['an IMAGE_REPOSITORY with a tag', () => undefined, ['--dry-run', version], /^release: IMAGE_REPOSITORY 127\.0\.0\.1:5000\/pullbridge:1 names a tag or digest/, { IMAGE_REPOSITORY: '127.0.0.1:5000/pullbridge:1' }],
    ['no CHANGELOG section for the version', (root) => sed(join(root, 'CHANGELOG.md'), /^## \[\d[^\]]*\] - 2026-12-07$/m, ''), ['--dry-run', version], /^release: CHANGELOG\.md has no section "## \[.+\] - YYYY-MM-DD": move the Unreleased entries under it$/],
  ];
  for (const [name, edit, args, message, env] of refusals) {
    it(`refuses ${name}: one line naming the file or key, exit 1, no step printed`, () => {
      const { status, stdout, stderr } = release(releaseTree(name.replace(/\W+/g, '-'), edit), args, env);
      assert.equal(status, 1, stdout);
      assert.match(stderr.trim(), message);
      assert.equal(stderr.trim().split('\n').length, 1, stderr);
      assert.doesNotMatch(stdout, /^\+ /m);
    });
  }
});

function sed(file: string, pattern: RegExp, replacement: string): void {
  const text = readFileSync(file, 'utf8');
  assert.match(text, pattern, `${file} has what the test replaces`);
  writeFileSync(file, text.replace(pattern, replacement));
}
