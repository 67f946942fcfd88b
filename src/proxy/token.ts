// The registry token flow's shell: the challenges the proxy offers (Basic first, then Bearer) and
// the token endpoint (`GET /token?service=&scope=`) on the registry port, which trades a namespace
// credential for a short-lived token scoped to the repositories that credential may pull.
//
// Where the Bearer challenge is offered, and in which order: at `/v2/` Basic first, then Bearer.
// containers/image (skopeo, CRI-O) pings `/v2/` and takes the first challenge it knows: Basic, as
// before. distribution 2.8's pull-through cache pings `/v2/` too and knows only Bearer. On a
// repository path the 401 carries Bearer only when the request presented a token (then with RFC
// 6750's error): containerd never pings `/v2/`, answers the 401 of the request itself, and ranks
// Bearer above Basic whatever the order; on the token flow, containerd before 1.6.25/1.7.8 keeps
// its first token for the whole pull and fails a pull outlasting it (containerd#9274), where Basic
// never expires. So containerd stays on Basic. Each challenge is its own header line: all of these
// clients parse one challenge per WWW-Authenticate value.

import type { IncomingMessage, ServerResponse } from 'node:http';
import type { TLSSocket } from 'node:tls';
import type { Rule } from '../rules/config.js';
import { parseBasicAuthorization, verifyNamespaceToken } from '../rules/credentials.js';
import { bearerChallenge, parseScopes, type TokenErrorCode, REGISTRY_TOKEN_LIFETIME_SECONDS, REGISTRY_TOKEN_MAX_REPOSITORIES, signRegistryToken, tokenRealm, type ScopeRequest } from '../rules/registrytoken.js';
import { CHALLENGE, sendError } from './answer.js';
import { registryError } from './errors.js';
import type { Exchange } from './exchange.js';
import { splitRuleName } from './route.js';
import type { ProxyRuntime } from './runtime.js';

/** Where the token endpoint lives on the registry port. */
export const TOKEN_PATH = '/token';

/** Whether the runtime can issue tokens: a broker key to derive the token key from, and a rule that wants a namespace credential. */
function issuesTokens(runtime: ProxyRuntime): boolean {
  return runtime.brokerKeys !== undefined && [...runtime.rules.values()].some((r) => r.rule.auth.mode === 'broker');
}

/**
 * The WWW-Authenticate values for a 401: Basic, then Bearer with the realm on the host the client
 * reached this proxy at. Bearer at `/v2/` (no `scope`), and on a repository path only for a refused
 * token (`tokenError`; with the repository's scope). Never where a token cannot help: a proxy that
 * issues none, a passthrough rule (a token cannot carry the client's upstream credential), a Host
 * header that is not a plain authority. The realm comes from the client's own Host header on
 * purpose: it goes back to that client only, and names where that client believes this proxy is; a
 * hostile Host sends its sender's credential to a host of the sender's choosing.
 */
export function challenges(runtime: ProxyRuntime, req: IncomingMessage, scope?: { readonly rule: Rule; readonly repository: string }, tokenError?: TokenErrorCode): string | string[] {
  if (!issuesTokens(runtime) || scope?.rule.auth.mode === 'passthrough' || (scope !== undefined && tokenError === undefined)) return CHALLENGE;
  const realm = tokenRealm((req.socket as Partial<TLSSocket>).encrypted === true ? 'https' : 'http', req.headers.host);
  if (realm === null) return CHALLENGE;
  return [CHALLENGE, bearerChallenge(realm, scope ? `repository:${scope.rule.name}/${scope.repository}:pull` : undefined, tokenError)];
}

/**
 * The repositories of `scopes` the holder of a namespace credential (null: none) may pull, as
 * `<rule>/<repo>`: broker rules admitting the namespace, anonymous rules for anyone; never a
 * passthrough rule (its client's credential goes upstream, and a token cannot carry it); always
 * within the rule's repository filter. At most REGISTRY_TOKEN_MAX_REPOSITORIES. Pure.
 */
export function grantedRepositories(rules: ReadonlyMap<string, { readonly rule: Rule }>, namespace: string | null, scopes: readonly ScopeRequest[]): string[] {
  const granted = new Set<string>();
  for (const scope of scopes) {
    if (granted.size >= REGISTRY_TOKEN_MAX_REPOSITORIES) break;
    if (!scope.actions.includes('pull') && !scope.actions.includes('*')) continue;
    const parts = splitRuleName(scope.name);
    const rule = parts ? rules.get(parts.rule)?.rule : undefined;
    if (!parts || !rule) continue;
    if (rule.repositoryFilter.refuse(parts.name) !== null) continue;
    const admitted = rule.auth.mode === 'anonymous' || (rule.auth.mode === 'broker' && namespace !== null && rule.namespaceFilter.refuse(namespace) === null);
    if (admitted) granted.add(`${parts.rule}/${parts.name}`);
  }
  return [...granted];
}

/**
 * `GET /token`: a namespace credential (Basic) or none (anonymous) for a token. A wrong credential
 * is a 401; scopes it may not pull are left out of the token (the registry token spec's answer),
 * so the request that follows is refused with the reason. POST (OAuth2) is 405, on which a client
 * that tries it (containerd) falls back to this GET.
 */
export function answerToken(runtime: ProxyRuntime, req: IncomingMessage, res: ServerResponse, exchange: Exchange, nowSeconds: number): void {
  exchange.kind = 'token';
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    exchange.error = `method ${req.method ?? ''} on the token endpoint`;
    sendError(res, registryError(405, 'UNSUPPORTED', 'the token endpoint answers GET (with Basic credentials)'), { allow: 'GET, HEAD' });
    return;
  }
  if (!issuesTokens(runtime)) {
    exchange.error = 'no token issuer';
    sendError(res, registryError(404, 'UNSUPPORTED', 'this proxy issues no tokens: it has no broker key or no rule in broker mode'));
    return;
  }
  let keys: Uint8Array[];
  try {
    keys = runtime.brokerKeys?.keys() ?? [];
  } catch {
    exchange.error = 'cannot load broker keys';
    sendError(res, registryError(503, 'UNAVAILABLE', 'the proxy cannot load its broker keys'));
    return;
  }
  const query = new URLSearchParams((req.url ?? '').slice((req.url ?? '').indexOf('?') + 1 || (req.url ?? '').length));
  const header = req.headers.authorization;
  const basic = parseBasicAuthorization(header);
  if (header !== undefined && basic === null) {
    exchange.error = 'not Basic credentials';
    sendError(res, registryError(401, 'UNAUTHORIZED', 'the token endpoint takes the namespace credential as Basic'), { 'www-authenticate': CHALLENGE });
    return;
  }
  if (basic && !verifyNamespaceToken(keys, basic.username, basic.password)) {
    exchange.error = 'invalid credentials';
    sendError(res, registryError(401, 'UNAUTHORIZED', 'invalid credentials: use the pull secret pullbridge provisions in your namespace'), { 'www-authenticate': CHALLENGE });
    return;
  }
  const namespace = basic ? basic.username : null;
  exchange.namespace = namespace;
  const scopes = parseScopes(query.getAll('scope'));
  const repositories = grantedRepositories(runtime.rules, namespace, scopes);
  exchange.repository = repositories.join(' ') || null;
  if (scopes.length > repositories.length) exchange.error = `granted ${repositories.length} of ${scopes.length} repository scopes`;
  const [signingKey] = keys;
  if (signingKey === undefined) throw new Error('broker keys without a signing key');
  const token = signRegistryToken(signingKey, { namespace, repositories, issuedAt: nowSeconds, expiresAt: nowSeconds + REGISTRY_TOKEN_LIFETIME_SECONDS });
  const body = JSON.stringify({ token, access_token: token, expires_in: REGISTRY_TOKEN_LIFETIME_SECONDS, issued_at: new Date(nowSeconds * 1000).toISOString() });
  res.writeHead(200, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body), 'cache-control': 'no-store' });
  res.end(req.method === 'HEAD' ? undefined : body);
}

/** Whether a request target is the token endpoint (with or without a query). */
export function isTokenRequest(target: string): boolean {
  return target === TOKEN_PATH || target.startsWith(`${TOKEN_PATH}?`);
}
