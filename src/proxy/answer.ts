// Writing answers: content results as registry responses, content failures and refusals as
// registry errors.

import type { ServerResponse } from 'node:http';
import type { AuthMode } from '../rules/config.js';
import type { ContentError, ContentFailure, ManifestResult } from '../content/source.js';
import { registryError, registryErrorBody, type RegistryError, type RegistryErrorCode } from './errors.js';

export type ContentKind = 'manifest' | 'blob' | 'tags' | 'referrers';

const JSON_TYPE = 'application/json; charset=utf-8';
/** How the proxy asks a client for its credential. */
export const CHALLENGE = 'Basic realm="pullbridge"';

/** A registry error; a response already under way is cut instead (its status is out). */
export function sendError(res: ServerResponse, error: RegistryError, extraHeaders: Record<string, string | string[]> = {}): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body = registryErrorBody(error);
  res.writeHead(error.status, { 'content-type': JSON_TYPE, 'content-length': Buffer.byteLength(body), ...extraHeaders });
  res.end(res.req.method === 'HEAD' ? undefined : body);
}

/** A manifest, or for a HEAD its headers only. */
export function answerManifest(res: ServerResponse, manifest: ManifestResult): void {
  res.writeHead(200, { 'content-type': manifest.mediaType ?? 'application/octet-stream', 'content-length': manifest.size, 'docker-content-digest': manifest.digest, ...(manifest.warning ? { warning: manifest.warning } : {}) });
  res.end(res.req.method === 'HEAD' ? undefined : manifest.body);
}

/** A page of a tag list under the name the client knows the repository by; `link` to the next page. */
export function answerTags(res: ServerResponse, rule: string, repository: string, tags: readonly string[], link: string | undefined): void {
  answerList(res, JSON.stringify({ name: `${rule}/${repository}`, tags }), link);
}

/** A page of the catalog; `link` to the next page. */
export function answerCatalog(res: ServerResponse, repositories: readonly string[], link: string | undefined): void {
  answerList(res, JSON.stringify({ repositories }), link);
}

function answerList(res: ServerResponse, body: string, link: string | undefined): void {
  const headers: Record<string, string | number> = { 'content-type': JSON_TYPE, 'content-length': Buffer.byteLength(body) };
  if (link !== undefined) headers.link = link;
  res.writeHead(200, headers);
  res.end(res.req.method === 'HEAD' ? undefined : body);
}

/**
 * A content failure as a registry error: the upstream's own error document passed on as it is,
 * its status and Retry-After kept; an upstream refusing the credentials is the client's problem
 * only when they were the client's (passthrough).
 */
export function answerContentError(res: ServerResponse, error: ContentError, kind: ContentKind, repository: string, mode: AuthMode): void {
  const { status, retryAfter, registryBody, contentRange } = error.details;
  const extra: Record<string, string> = { ...(retryAfter ? { 'retry-after': retryAfter } : {}), ...(contentRange !== undefined ? { 'content-range': contentRange } : {}) };
  if (registryBody !== undefined && !res.headersSent) {
    res.writeHead(status, { 'content-type': JSON_TYPE, 'content-length': Buffer.byteLength(registryBody), ...extra });
    res.end(res.req.method === 'HEAD' ? undefined : registryBody);
  } else if (error.failure === 'unauthorized') {
    if (mode === 'passthrough') sendError(res, registryError(401, 'UNAUTHORIZED', `the upstream registry rejected your credentials for ${repository}`), { 'www-authenticate': CHALLENGE });
    else sendError(res, registryError(403, 'DENIED', `the upstream registry denied access to ${repository}`));
  } else {
    sendError(res, registryError(status, errorCode(error.failure, kind), error.message), extra);
  }
}

function errorCode(failure: ContentFailure, kind: ContentKind): RegistryErrorCode {
  switch (failure) {
    case 'not-found':
      return kind === 'blob' ? 'BLOB_UNKNOWN' : kind === 'manifest' ? 'MANIFEST_UNKNOWN' : 'NAME_UNKNOWN';
    case 'unauthorized':
      return 'UNAUTHORIZED';
    case 'denied':
    case 'refused':
      return 'DENIED';
    case 'too-many-requests':
      return 'TOOMANYREQUESTS';
    case 'invalid':
      return kind === 'manifest' ? 'MANIFEST_INVALID' : 'UNAVAILABLE';
    case 'unavailable':
      return 'UNAVAILABLE';
  }
}
