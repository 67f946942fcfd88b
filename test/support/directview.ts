// A RegistryView that asks a registry directly (plain fetch, Basic or the Bearer token flow), for
// tests of admission logic against a real registry before the proxy tier is in the path. The
// product's RegistryView goes through the proxy tier (src/webhook); this one never ships.

import { createHash } from 'node:crypto';
import type { BlobAnswer, ManifestAnswer, ProbeAnswer, ReferrersAnswer, RegistryView } from '../../src/rules/registryview.js';
import { MANIFEST_ACCEPT } from '../../src/content/passthrough.js';

export interface DirectViewOptions {
  /** The upstream of every rule, e.g. `http://127.0.0.1:5000`. */
  readonly upstream: string;
  /** Used for every namespace's requests; the anonymous probe never sends them. */
  readonly credentials?: { readonly username: string; readonly password: string };
}

/** Every request the view sent, for tests that count them. */
export type DirectView = RegistryView & { readonly requests: string[] };

export function directRegistryView(options: DirectViewOptions): DirectView {
  const requests: string[] = [];
  const basic = options.credentials && `Basic ${Buffer.from(`${options.credentials.username}:${options.credentials.password}`).toString('base64')}`;

  async function send(method: 'GET' | 'HEAD', path: string, accept: string, signal: AbortSignal, authenticated: boolean): Promise<Response> {
    const url = `${options.upstream}${path}`;
    requests.push(`${method} ${path}`);
    let res = await fetch(url, { method, headers: { accept, ...(authenticated && basic ? { authorization: basic } : {}) }, signal });
    if (res.status !== 401) return res;
    const challenge = res.headers.get('www-authenticate') ?? '';
    if (!/^Bearer /i.test(challenge)) return res;
    const param = (name: string) => new RegExp(`${name}="([^"]*)"`).exec(challenge)?.[1];
    const realm = param('realm');
    if (realm === undefined) return res;
    const tokenUrl = new URL(realm);
    const service = param('service');
    if (service) tokenUrl.searchParams.set('service', service);
    const scope = param('scope');
    if (scope) tokenUrl.searchParams.set('scope', scope);
    const tokenRes = await fetch(tokenUrl, { headers: authenticated && basic ? { authorization: basic } : {}, signal });
    if (!tokenRes.ok) return res;
    const body = (await tokenRes.json()) as { token?: string; access_token?: string };
    const token = body.token ?? body.access_token;
    if (!token) return res;
    res = await fetch(url, { method, headers: { accept, authorization: `Bearer ${token}` }, signal });
    return res;
  }

  const failed = (error: unknown) => ({ kind: 'failed' as const, error: (error as Error).message });

  return {
    requests,
    async probeAnonymous({ repository, reference }, signal): Promise<ProbeAnswer> {
      try {
        const res = await send('HEAD', `/v2/${repository}/manifests/${reference}`, MANIFEST_ACCEPT, signal, false);
        return { kind: 'answered', status: res.status };
      } catch (error) {
        return failed(error);
      }
    },
    async manifest({ repository, reference, method }, signal): Promise<ManifestAnswer> {
      try {
        const res = await send(method, `/v2/${repository}/manifests/${reference}`, MANIFEST_ACCEPT, signal, true);
        if (res.status >= 500) return { kind: 'failed', error: `upstream answered ${res.status}` };
        if (!res.ok) return { kind: 'refused', status: res.status, error: `upstream answered ${res.status}` };
        const body = method === 'GET' ? Buffer.from(await res.arrayBuffer()) : undefined;
        const digest = res.headers.get('docker-content-digest') ?? (body && `sha256:${createHash('sha256').update(body).digest('hex')}`) ?? '';
        return { kind: 'found', digest, mediaType: res.headers.get('content-type') ?? '', ...(body ? { body } : {}) };
      } catch (error) {
        return failed(error);
      }
    },
    async blob({ repository, digest, maxBytes }, signal): Promise<BlobAnswer> {
      try {
        const res = await send('GET', `/v2/${repository}/blobs/${digest}`, '*/*', signal, true);
        if (res.status >= 500) return { kind: 'failed', error: `upstream answered ${res.status}` };
        if (!res.ok) return { kind: 'refused', status: res.status, error: `upstream answered ${res.status}` };
        const body = Buffer.from(await res.arrayBuffer());
        if (body.length > maxBytes) return { kind: 'refused', status: 413, error: `blob larger than ${maxBytes} bytes` };
        return { kind: 'found', body };
      } catch (error) {
        return failed(error);
      }
    },
    async referrers({ repository, digest, artifactType }, signal): Promise<ReferrersAnswer> {
      try {
        const query = artifactType ? `?artifactType=${encodeURIComponent(artifactType)}` : '';
        const res = await send('GET', `/v2/${repository}/referrers/${digest}${query}`, 'application/vnd.oci.image.index.v1+json', signal, true);
        if (res.status === 404) return { kind: 'unsupported' };
        if (res.status >= 500) return { kind: 'failed', error: `upstream answered ${res.status}` };
        if (!res.ok) return { kind: 'refused', status: res.status, error: `upstream answered ${res.status}` };
        return { kind: 'found', index: Buffer.from(await res.arrayBuffer()) };
      } catch (error) {
        return failed(error);
      }
    },
  };
}
