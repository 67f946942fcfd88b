// What README.md, docs/*.md and the chart's NOTES.txt tell a user: every `pullbridge <command>
// --flag` they print is a real command with real flags, every link between them resolves (file and
// #anchor), and the README's offline quick start runs exactly as written.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseAllDocuments } from 'yaml';
import { parseConfig } from '../src/rules/config.js';
import { CLI, runCli } from './support/cli.js';
import { cachedBinary, KUBE_VERSION } from './support/controlplane.js';
import { hasCommand, runAsync } from './support/procs.js';

const root = fileURLToPath(new URL('../../', import.meta.url));
const docsDir = join(root, 'docs');
const readme = join(root, 'README.md');
const notes = join(root, 'charts/pullbridge/templates/NOTES.txt');

function markdownFiles(): string[] {
  return [readme, ...readdirSync(docsDir).filter((f) => f.endsWith('.md')).sort().map((f) => join(docsDir, f))];
}

interface Fence {
  readonly info: string;
  readonly body: string;
  /** Offset of the opening fence in the file. */
  readonly start: number;
}

function fences(text: string): Fence[] {
  return [...text.matchAll(/^[ \t]*```([^\n]*)\n([\s\S]*?)^[ \t]*```[ \t]*$/gm)].map((m) => ({ info: m[1] ?? '', body: m[2] ?? '', start: m.index }));
}

function withoutFences(text: string): string {
  return text.replace(/^[ \t]*```[^\n]*\n[\s\S]*?^[ \t]*```[ \t]*$/gm, '');
}

/** The code a file shows a user: fenced blocks (continuation lines joined) and inline code spans;
 * NOTES.txt is commands throughout. */
function codeOf(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  if (!file.endsWith('.md')) return text.split('\n');
  const blocks = fences(text).map((f) => f.body.replace(/\\\n\s*/g, ' '));
  // A span may wrap onto the next line, as a command in a paragraph does.
  const spans = [...withoutFences(text).matchAll(/`([^`]+)`/g)].map((m) => m[1] ?? '').filter((span) => !span.includes('\n\n')).map((span) => span.replace(/\s*\n\s*/g, ' '));
  return [...blocks, ...spans];
}

interface Invocation {
  readonly command: string;
  readonly flags: readonly string[];
  readonly text: string;
}

// `pullbridge` is also the release, namespace and chart name in helm and kubectl lines.
const NOT_THE_BINARY = new Set(['install', 'upgrade', 'uninstall', 'template', 'status', '-n', 'namespace', '--namespace']);

function invocations(code: string): Invocation[] {
  const found: Invocation[] = [];
  for (const line of code.split('\n')) {
    for (const match of line.matchAll(/(?<=^|[\s`(])pullbridge ([a-z][a-z-]*)([^|;&#`)\n]*)/g)) {
      const before = line.slice(0, match.index).trim().split(/\s+/).pop() ?? '';
      if (NOT_THE_BINARY.has(before)) continue;
      const command = match[1] ?? '';
      const flags = [...(match[2] ?? '').matchAll(/(?<=^|[\s[])(--[a-z][a-z-]*)/g)].map((m) => m[1] ?? '');
      found.push({ command, flags, text: match[0].trim() });
    }
  }
  return found;
}

/** The flags a command takes, from `pullbridge <command> --help`, or else from its lines in the
 * general usage text; undefined for a command the binary does not know. */
function flagsOf(command: string, usage: string): Set<string> | undefined {
  const help = runCli([command, '--help']);
  let text: string | undefined;
  if (help.status === 0 && help.stdout.includes(`pullbridge ${command}`)) {
    text = help.stdout;
  } else {
    const lines = usage.split('\n');
    const first = lines.findIndex((l) => new RegExp(`^\\s*pullbridge ${command}(\\s|$)`).test(l));
    if (first < 0) return undefined;
    const own = [lines[first] ?? ''];
    for (const line of lines.slice(first + 1)) {
      if (/^\s*pullbridge /.test(line) || !/^\s{4,}/.test(line)) break;
      own.push(line);
    }
    text = own.join('\n');
  }
  return new Set(['--help', ...[...text.matchAll(/--[a-z][a-z-]*/g)].map((m) => m[0])]);
}

/** GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces to `-`,
 * repeats numbered. */
function anchorsOf(file: string): Set<string> {
  const anchors = new Set<string>();
  const seen = new Map<string, number>();
  for (const m of withoutFences(readFileSync(file, 'utf8')).matchAll(/^#{1,6}\s+(.+?)\s*#*\s*$/gm)) {
    const base = (m[1] ?? '').toLowerCase().replace(/[^\p{L}\p{N}\s_-]/gu, '').replace(/\s/g, '-');
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    anchors.add(n === 0 ? base : `${base}-${n}`);
  }
  return anchors;
}

describe('the docs (README.md, docs/, NOTES.txt)', function () {
  this.timeout(180_000);
  const usage = runCli(['--help']).stdout;

  it('print only pullbridge commands and flags the binary has', () => {
    const problems: string[] = [];
    let checked = 0;
    const known = new Map<string, Set<string> | undefined>();
    for (const file of [...markdownFiles(), notes]) {
      for (const code of codeOf(file)) {
        for (const { command, flags, text } of invocations(code)) {
          if (!known.has(command)) known.set(command, flagsOf(command, usage));
          const accepted = known.get(command);
          checked += 1;
          if (accepted === undefined) {
            problems.push(`${relative(root, file)}: "${text}": no command "${command}"`);
            continue;
          }
          for (const flag of flags) if (!accepted.has(flag)) problems.push(`${relative(root, file)}: "${text}": ${command} has no ${flag}`);
        }
      }
    }
    assert.ok(checked >= 20, `found only ${checked} pullbridge invocations: the extraction is broken`);
    assert.ok(known.has('proxy') && known.has('pull-secret') && known.has('purge'), 'the docs name proxy, pull-secret and purge');
    assert.deepEqual(problems, []);
  });

  it('link only to files and headings that exist, and the README lists every docs/ page', () => {
    const problems: string[] = [];
    for (const file of markdownFiles()) {
      for (const m of withoutFences(readFileSync(file, 'utf8')).matchAll(/\]\(([^)\s]+)\)/g)) {
        const target = m[1] ?? '';
        if (/^[a-z]+:/i.test(target)) continue; // https:, mailto:
        const [path = '', anchor] = target.split('#');
        const resolved = path === '' ? file : resolve(dirname(file), path);
        if (!existsSync(resolved)) {
          problems.push(`${relative(root, file)}: ${target}: no such file`);
          continue;
        }
        if (anchor !== undefined && resolved.endsWith('.md') && !anchorsOf(resolved).has(anchor)) {
          problems.push(`${relative(root, file)}: ${target}: no heading with that anchor`);
        }
      }
    }
    const index = readFileSync(readme, 'utf8');
    for (const page of readdirSync(docsDir).filter((f) => f.endsWith('.md'))) {
      if (!index.includes(`](docs/${page})`)) problems.push(`README.md does not link docs/${page}`);
    }
    assert.deepEqual(problems, []);
  });

  it('port-forward to the proxy\'s operations port, where /status is (the registry port answers it with a 404)', () => {
    const values = parseAllDocuments(readFileSync(join(root, 'charts/pullbridge/values.yaml'), 'utf8'))[0]?.toJS() as { proxy: { opsPort: number; port: number } };
    const forwards: string[] = [];
    for (const file of [...markdownFiles(), notes]) {
      for (const code of codeOf(file)) {
        for (const m of code.matchAll(/port-forward\s+(?:ds|daemonset)\/[^\n]*?-proxy\s+(\d+(?::(?:\d+|\{\{ \.Values\.proxy\.\w+ \}\}))?)/g)) forwards.push(`${relative(root, file)}: ${m[1] ?? ''}`);
      }
    }
    assert.ok(forwards.some((f) => f.startsWith('charts/')) && forwards.some((f) => f.startsWith('docs/')), `port-forwards found: ${forwards.join(', ')}`);
    for (const forward of forwards) {
      const target = forward.split(': ')[1]?.split(':').pop(); // LOCAL:REMOTE, or one port for both
      assert.ok(target === String(values.proxy.opsPort) || target === '{{ .Values.proxy.opsPort }}', `${forward}: not the operations port (${values.proxy.opsPort})`);
    }
  });

  it('install with the README\'s Helm values: the chart renders them into a config with their rule', async () => {
    const text = readFileSync(readme, 'utf8');
    const values = /cat > my-values.yaml <<'YAML'\n([\s\S]*?)^YAML$/m.exec(text)?.[1];
    assert.ok(values, 'the README shows the values it installs with');
    const dir = mkdtempSync(join(tmpdir(), 'pullbridge-docs-helm-'));
    writeFileSync(join(dir, 'my-values.yaml'), values);
    const chart = join(root, 'charts/pullbridge');
    const out = await runAsync(cachedBinary('helm'), ['template', 'pullbridge', chart, '-n', 'pullbridge', '--kube-version', KUBE_VERSION.slice(1), '-f', join(dir, 'my-values.yaml')]);
    const configMap = parseAllDocuments(out)
      .map((d) => d.toJS() as { kind?: string; data?: Record<string, string> } | null)
      .find((o) => o?.kind === 'ConfigMap' && o.data?.['config.yaml'] !== undefined);
    const result = parseConfig(configMap?.data?.['config.yaml'] ?? '');
    assert.ok(result.ok, result.ok ? '' : JSON.stringify(result.errors));
    assert.deepEqual(result.config.registries.map((r) => [r.name, r.match, r.upstream]), [['corp', ['registry.corp.example:5000'], 'https://registry.corp.example:5000']]);
  });

  describe('the offline quick start', () => {
    const text = readFileSync(readme, 'utf8');
    const blocks = fences(text).filter((f) => /<!-- quickstart -->\s*$/.test(text.slice(0, f.start)));

    it('is in the README as shell blocks', () => {
      assert.ok(blocks.length >= 6, `found ${blocks.length} quick start blocks`);
      for (const block of blocks) assert.equal(block.info, 'sh');
    });

    it('runs as written, offline: the image pulled through the proxy again, same digest, with the upstream killed', async function () {
      for (const command of ['keygen', 'sample-registry']) {
        if (!new RegExp(`pullbridge ${command}\\b`).test(usage)) this.skip(); // until the binary has them
      }
      for (const tool of ['sh', 'curl', 'skopeo', 'unshare', 'ip']) assert.ok(hasCommand(tool), `${tool} is needed`);

      // The README has the reader alias `pullbridge` to the built binary; a script sees no aliases,
      // so the same binary goes on PATH. Nothing in the blocks is changed.
      const dir = mkdtempSync(join(tmpdir(), 'pullbridge-quickstart-'));
      const bin = join(dir, '.bin');
      mkdirSync(bin);
      writeFileSync(join(bin, 'pullbridge'), `#!/bin/sh\nexec "${process.execPath}" "${CLI}" "$@"\n`);
      chmodSync(join(bin, 'pullbridge'), 0o755);
      const work = join(dir, 'work');
      mkdirSync(work);
      const script = ['set -e', ...blocks.map((b) => b.body)].join('\n');

      // In a network namespace with only loopback: offline is checked, not assumed, and the fixed
      // ports the quick start uses are its own.
      const child = spawn('unshare', ['--net', '--', 'sh', '-c', 'ip link set lo up && exec sh -c "$1"', 'sh', script], { cwd: work, detached: true, env: { ...process.env, PATH: `${bin}:${process.env.PATH ?? ''}` }, stdio: ['ignore', 'pipe', 'pipe'] });
      let output = '';
      child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
      child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
      const killGroup = () => {
        try {
          process.kill(-(child.pid ?? 0), 'SIGKILL');
        } catch {
          // the group is gone already
        }
      };
      const timer = setTimeout(killGroup, 150_000);
      const code = await new Promise<number | null>((settle) => child.once('close', settle));
      clearTimeout(timer);
      killGroup(); // the background servers, should a step have failed before the last one stops them

      assert.equal(code, 0, `the quick start failed:\n${output}`);
      assert.match(output, /^401$/m, 'the proxy asks for a credential');
      assert.match(output, /^upstream unreachable$/m, 'the upstream is gone before the second pull');
      const digests = [...output.matchAll(/^digest: (sha256:[0-9a-f]{64})$/gm)].map((m) => m[1]);
      assert.equal(digests.length, 2, output);
      assert.equal(digests[1], digests[0], 'the same image before and after the upstream was killed');
      assert.equal(readFileSync(join(work, 'hello-2/manifest.json'), 'utf8'), readFileSync(join(work, 'hello-1/manifest.json'), 'utf8'));
      // The second pull (copy, then inspect: manifests and blobs) is served from the node cache.
      const access = readFileSync(join(work, 'proxy.log'), 'utf8')
        .split('\n')
        .filter((line) => line.includes('"access":"pull"'))
        .map((line) => JSON.parse(line) as { status: number; cache?: string; kind: string });
      const secondPull = access.filter((r) => r.kind !== 'base').slice(-4);
      assert.equal(secondPull.length, 4, JSON.stringify(access));
      for (const record of secondPull) assert.ok(record.status === 200 && (record.cache === 'hit' || record.cache === 'stale'), JSON.stringify(record));
    });
  });
});
