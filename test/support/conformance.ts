// The OCI distribution-spec conformance suite (its test binary, scripts/build-conformance-tools.sh)
// run against a registry on loopback, and its report read back.
//
// The suite pushes the content it then pulls, to the registry it tests; the proxy is pull-only. So
// that its pulls and discovery are answered by the proxy with content the suite pushed, a splitter
// sits in front: writes and upload sessions go to the upstream (the rule's prefix taken off the
// repository name, and put back on the upload Locations the upstream answers), every other GET and
// HEAD goes to the proxy as the suite sent it. It changes no answer's status, headers or body
// otherwise: it is plumbing, not a stand-in for any part.

import { createHash } from 'node:crypto';
import { createServer, request, type IncomingMessage, type ServerResponse } from 'node:http';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import { runAsync } from './procs.js';
import { conformanceBinary } from './conformancetools.js';

export interface Splitter {
  readonly host: string;
  /** Requests sent to the upstream and to the proxy so far. */
  readonly counts: { upstream: number; proxy: number };
  close(): Promise<void>;
}

/** Whether the suite's request is a write (or an upload session's read), for the upstream. */
const isWrite = (method: string, path: string): boolean => (method !== 'GET' && method !== 'HEAD') || path.includes('/blobs/uploads/');

export async function startSplitter(upstreamUrl: string, proxyUrl: string, rule: string): Promise<Splitter> {
  const upstream = new URL(upstreamUrl);
  const proxy = new URL(proxyUrl);
  const prefix = `/v2/${rule}/`;
  const counts = { upstream: 0, proxy: 0 };
  const forward = (req: IncomingMessage, res: ServerResponse, target: URL, path: string, rewriteLocation: boolean) => {
    const headers = { ...req.headers, host: target.host };
    if (rewriteLocation) delete headers.authorization; // the upstream's writes need none; the namespace credential is the proxy's
    const out = request({ host: target.hostname, port: target.port, method: req.method, path, headers }, (answer) => {
      const back = { ...answer.headers };
      const location = answer.headers.location;
      if (rewriteLocation && location !== undefined) {
        const moved = new URL(location, upstream);
        back.location = moved.pathname.startsWith('/v2/') ? `${prefix}${moved.pathname.slice('/v2/'.length)}${moved.search}` : location;
      }
      res.writeHead(answer.statusCode ?? 502, back);
      answer.pipe(res);
    });
    out.on('error', () => res.destroy());
    req.pipe(out);
  };
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://splitter');
    if (isWrite(req.method ?? 'GET', url.pathname) && url.pathname.startsWith(prefix)) {
      counts.upstream++;
      const from = url.searchParams.get('from');
      if (from?.startsWith(`${rule}/`)) url.searchParams.set('from', from.slice(rule.length + 1));
      forward(req, res, upstream, `/v2/${url.pathname.slice(prefix.length)}${url.search}`, true);
    } else {
      counts.proxy++;
      forward(req, res, proxy, req.url ?? '/', false);
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    host: `127.0.0.1:${port}`,
    counts,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

export interface ConformanceReport {
  /** Every leaf test by its full name (` #n` for the n-th of a name): passed, skipped, failure or error. */
  readonly tests: ReadonlyMap<string, string>;
  /** The suite's verdict per API (results.yaml `apis`): Pass, FAIL, Skip, Disabled… */
  readonly apis: ReadonlyMap<string, string>;
  /** What the suite said about each test that did not pass. */
  readonly failures: ReadonlyMap<string, string>;
}

const XML_ENTITIES: Record<string, string> = { '&amp;': '&', '&lt;': '<', '&gt;': '>', '&quot;': '"', '&#39;': "'", '&#34;': '"' };
const unescapeXml = (s: string) => s.replace(/&(amp|lt|gt|quot|#39|#34|#x[0-9a-fA-F]+);/g, (m) => XML_ENTITIES[m] ?? String.fromCodePoint(Number.parseInt(m.slice(3, -1), 16)));

/** Runs the suite against `registry` (plain HTTP) with its default workflows, and reads its report. */
export async function runConformance(registry: string, env: Readonly<Record<string, string>> = {}): Promise<ConformanceReport> {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-conformance-'));
  try {
    const settings = { OCI_REGISTRY: registry, OCI_TLS: 'disabled', OCI_RESULTS_DIR: join(dir, 'results'), OCI_LOG: 'error', HOME: dir, ...env };
    // The suite exits 1 when any test fails; the report says which.
    await runAsync(conformanceBinary(), ['-test.timeout', '10m'], { env: settings, timeoutMs: 600_000 }).catch((error: Error & { code?: number }) => {
      if (error.code !== 1) throw error;
    });
    const junit = readFileSync(join(dir, 'results', 'junit.xml'), 'utf8');
    const tests = new Map<string, string>();
    const failures = new Map<string, string>();
    for (const m of junit.matchAll(/<testcase\b([^>]*?)(?:\/>|>([\s\S]*?)<\/testcase>)/g)) {
      const attrs = m[1] ?? '';
      const errors = /<system-out>([\s\S]*?)<\/system-out>/.exec(m[2] ?? '')?.[1];
      const name = /\bname="([^"]*)"/.exec(attrs)?.[1];
      const status = /\bstatus="([^"]*)"/.exec(attrs)?.[1];
      if (name === undefined || status === undefined) continue;
      // A test runs once per blob or manifest under the same name: numbered in order.
      let key = unescapeXml(name);
      for (let n = 2; tests.has(key); n++) key = `${unescapeXml(name)} #${n}`;
      tests.set(key, status);
      if (errors !== undefined) failures.set(key, unescapeXml(errors.replace(/^<!\[CDATA\[|\]\]>$/g, '')).slice(0, 64_000));
    }
    const yaml = readFileSync(join(dir, 'results', 'results.yaml'), 'utf8');
    const apis = new Map<string, string>();
    const section = /^apis:\n((?: {2}.*\n)*)/m.exec(yaml)?.[1] ?? '';
    for (const line of section.split('\n')) {
      const m = /^ {2}(.+): (\S+)$/.exec(line);
      if (m) apis.set(m[1] ?? '', m[2] ?? '');
    }
    return { tests, apis, failures };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Makes `repository` exist on a registry that answers the referrers of an unknown repository with
 * 404 NAME_UNKNOWN (go-containerregistry's does; the suite's first referrers check asks an empty
 * repository and takes a 404 as no referrers API at all): one untagged manifest, so the tag list
 * stays empty.
 */
export async function seedRepository(registryUrl: string, repository: string): Promise<void> {
  const config = Buffer.from('{}');
  const configDigest = `sha256:${createHash('sha256').update(config).digest('hex')}`;
  const started = await fetch(`${registryUrl}/v2/${repository}/blobs/uploads/`, { method: 'POST' });
  const location = started.headers.get('location');
  if (started.status !== 202 || location === null) throw new Error(`seeding ${repository}: upload not started (${started.status})`);
  const upload = new URL(location, registryUrl);
  upload.searchParams.set('digest', configDigest);
  const put = await fetch(upload, { method: 'PUT', body: config, headers: { 'content-type': 'application/octet-stream' } });
  if (put.status !== 201) throw new Error(`seeding ${repository}: blob upload answered ${put.status}`);
  const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config: { mediaType: 'application/vnd.oci.empty.v1+json', digest: configDigest, size: config.length }, layers: [] }));
  const digest = `sha256:${createHash('sha256').update(manifest).digest('hex')}`;
  const pushed = await fetch(`${registryUrl}/v2/${repository}/manifests/${digest}`, { method: 'PUT', body: manifest, headers: { 'content-type': 'application/vnd.oci.image.manifest.v1+json' } });
  if (pushed.status !== 201) throw new Error(`seeding ${repository}: manifest push answered ${pushed.status}`);
}
