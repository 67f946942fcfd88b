// `pullbridge sample-registry`: a small read-only registry (Distribution API v2 / OCI) serving the
// one generated image of sampleimage.ts, anonymously. The upstream of the offline quick start and
// of the demo. Routing is pure (answerRegistryRequest); the server around it is thin.

import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { SampleBlob, SampleImage } from './sampleimage.js';

export interface RegistryAnswer {
  readonly status: number;
  readonly headers: Readonly<Record<string, string>>;
  /** The body a GET carries (a HEAD gets the same headers and no body). */
  readonly body: Buffer;
}

function json(status: number, value: unknown, headers: Record<string, string> = {}): RegistryAnswer {
  const body = Buffer.from(JSON.stringify(value));
  return { status, headers: { 'content-type': 'application/json', 'content-length': String(body.length), ...headers }, body };
}

const registryError = (status: number, code: string, message: string) => json(status, { errors: [{ code, message }] });

function content(found: SampleBlob): RegistryAnswer {
  return { status: 200, headers: { 'content-type': found.mediaType, 'content-length': String(found.bytes.length), 'docker-content-digest': found.digest }, body: found.bytes };
}

/** The answer to one request: method, and the path with its query. */
export function answerRegistryRequest(image: SampleImage, method: string, url: string): RegistryAnswer {
  const answer = route(image, method, url);
  return { ...answer, headers: { 'docker-distribution-api-version': 'registry/2.0', ...answer.headers } };
}

function route(image: SampleImage, method: string, url: string): RegistryAnswer {
  if (method !== 'GET' && method !== 'HEAD') return registryError(405, 'UNSUPPORTED', 'this registry is read-only');
  const path = url.split('?')[0] ?? '';
  if (path === '/v2/' || path === '/v2') return json(200, {});
  if (path === '/v2/_catalog') return json(200, { repositories: [image.repository] });
  const m = /^\/v2\/(.+)\/(manifests|blobs|tags)\/([^/]+)$/.exec(path);
  if (!m) return registryError(404, 'NOT_FOUND', `no such endpoint ${path}`);
  const [, name = '', kind, reference = ''] = m;
  if (name !== image.repository) return registryError(404, 'NAME_UNKNOWN', `repository ${name} not known to this registry (it serves ${image.repository})`);
  if (kind === 'tags') {
    return reference === 'list' ? json(200, { name: image.repository, tags: [image.tag] }) : registryError(404, 'NOT_FOUND', `no such endpoint ${path}`);
  }
  if (kind === 'manifests') {
    return reference === image.tag || reference === image.manifest.digest ? content(image.manifest) : registryError(404, 'MANIFEST_UNKNOWN', `manifest ${reference} not known`);
  }
  const found = [image.config, image.layer].find((b) => b.digest === reference);
  return found ? content(found) : registryError(404, 'BLOB_UNKNOWN', `blob ${reference} not known`);
}

export interface SampleRegistryServer {
  readonly url: string;
  readonly port: number;
  close(): Promise<void>;
}

/** Listens on host:port; rejects with the listen error (EADDRINUSE ...). */
export function serveSampleRegistry(image: SampleImage, host: string, port: number): Promise<SampleRegistryServer> {
  const server = http.createServer((req, res) => {
    const answer = answerRegistryRequest(image, req.method ?? 'GET', req.url ?? '/');
    res.writeHead(answer.status, answer.headers);
    res.end(req.method === 'HEAD' ? undefined : answer.body);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      const bound = server.address() as AddressInfo;
      const shownHost = bound.address.includes(':') ? `[${bound.address}]` : bound.address;
      resolve({
        url: `http://${shownHost}:${bound.port}`,
        port: bound.port,
        close: () =>
          new Promise<void>((done) => {
            server.close(() => done());
            server.closeAllConnections();
          }),
      });
    });
  });
}
