// Who may pull what, decided before any content is looked up: the client's credential under the
// rule's auth mode, the rule's namespace filter, its repository filter.

import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from '../log.js';
import type { UpstreamCredentials } from '../upstream/authorizer.js';
import type { RuleUpstream } from '../upstream/rule.js';
import { parseBasicAuthorization, verifyNamespaceToken } from '../rules/credentials.js';
import { parseBearerAuthorization, tokenCovers, verifyRegistryToken, type TokenErrorCode } from '../rules/registrytoken.js';
import { registryError, type RegistryError } from './errors.js';
import { sendError } from './answer.js';
import type { ProxyRuntime } from './runtime.js';
import { challenges } from './token.js';

/** A refusal names the namespace when its credential was valid, so the access log says who was refused. */
export type ClientAuth = { ok: true; namespace: string | null; credentials: UpstreamCredentials | undefined; viaToken?: boolean } | { ok: false; error: RegistryError; challenge: boolean; namespace?: string; tokenError?: TokenErrorCode };

/** Client authentication; the proxy's own secrets failing to load is a 503, not the client's fault. */
export function authenticate(runtime: ProxyRuntime, rr: RuleUpstream, repository: string, header: string | undefined, logger: Logger): ClientAuth {
  try {
    const bearer = parseBearerAuthorization(header);
    if (bearer !== null && rr.rule.auth.mode !== 'anonymous') return checkToken(runtime, rr, repository, bearer);
    return checkClient(runtime, rr, header);
  } catch (error) {
    logger.error({ rule: rr.rule.name, error: (error as Error).message }, 'cannot load credentials');
    return { ok: false, error: registryError(503, 'UNAVAILABLE', `the proxy cannot load its credentials for rule "${rr.rule.name}"`), challenge: false };
  }
}

function checkClient(runtime: ProxyRuntime, rr: RuleUpstream, header: string | undefined): ClientAuth {
  const mode = rr.rule.auth.mode;
  if (mode === 'anonymous') return { ok: true, namespace: null, credentials: rr.upstreamCredentials() };
  const basic = parseBasicAuthorization(header);
  if (!basic) return { ok: false, error: registryError(401, 'UNAUTHORIZED', 'authentication required'), challenge: true };
  if (mode === 'passthrough') return { ok: true, namespace: null, credentials: basic };
  const keys = runtime.brokerKeys?.keys() ?? [];
  if (!verifyNamespaceToken(keys, basic.username, basic.password)) {
    return { ok: false, error: registryError(401, 'UNAUTHORIZED', 'invalid credentials: use the pull secret pullbridge provisions in your namespace'), challenge: true };
  }
  if (rr.rule.namespaceFilter.refuse(basic.username) !== null) {
    return { ok: false, error: registryError(403, 'DENIED', `namespace "${basic.username}" may not pull through rule "${rr.rule.name}"`), challenge: false, namespace: basic.username };
  }
  return { ok: true, namespace: basic.username, credentials: rr.upstreamCredentials() };
}

/**
 * A registry token (src/proxy/token.ts) on a rule that wants a namespace credential: its signature
 * and expiry, that it names this repository, and that the namespace is still admitted by the rule
 * as configured now (a token outlives no config change that refuses its namespace).
 */
function checkToken(runtime: ProxyRuntime, rr: RuleUpstream, repository: string, token: string): ClientAuth {
  const refuse = (message: string, tokenError: TokenErrorCode, namespace?: string | null): ClientAuth => ({ ok: false, error: registryError(401, 'UNAUTHORIZED', message), challenge: true, tokenError, ...(namespace ? { namespace } : {}) });
  if (rr.rule.auth.mode === 'passthrough') return refuse(`rule "${rr.rule.name}" passes your own credential upstream: authenticate with Basic, not a token`, 'invalid_token');
  const check = verifyRegistryToken(runtime.brokerKeys?.keys() ?? [], token, Math.floor(Date.now() / 1000));
  if (!check.ok) return refuse(`invalid registry token (${check.reason}): ask the token endpoint again`, 'invalid_token');
  const namespace = check.claims.namespace;
  if (namespace === null) return refuse('an anonymous token: this rule needs your namespace credential at the token endpoint', 'insufficient_scope');
  // The rule's own refusals first, so that a token the endpoint granted nothing in says why, as Basic does.
  if (rr.rule.namespaceFilter.refuse(namespace) !== null) {
    return { ok: false, error: registryError(403, 'DENIED', `namespace "${namespace}" may not pull through rule "${rr.rule.name}"`), challenge: false, namespace };
  }
  const filtered = repositoryRefusal(rr, repository);
  if (filtered !== null) return { ok: false, error: filtered, challenge: false, namespace };
  if (!tokenCovers(check.claims, rr.rule.name, repository)) return refuse(`the token does not grant pull on ${rr.rule.name}/${repository}`, 'insufficient_scope', namespace);
  return { ok: true, namespace, credentials: rr.upstreamCredentials(), viaToken: true };
}

/**
 * The rule's repository filter holds for every auth mode, here as in the webhook: a Pod can write
 * any repository after the rule's prefix itself. Null when the repository may be pulled.
 */
export function repositoryRefusal(rr: RuleUpstream, repository: string): RegistryError | null {
  const refusal = rr.rule.repositoryFilter.refuse(repository);
  if (refusal === null) return null;
  return registryError(403, 'DENIED', `repository "${repository}" is ${refusal === 'excluded' ? 'excluded from' : 'not included in'} rule "${rr.rule.name}"`);
}

/** `/v2/`: the version check, which is also where clients learn to authenticate. Returns the
 * namespace whose credential was verified, if any. */
export function answerBase(runtime: ProxyRuntime, req: IncomingMessage, res: ServerResponse): string | null {
  const rules = [...runtime.rules.values()];
  const needsAuth = rules.some((r) => r.rule.auth.mode !== 'anonymous');
  const basic = parseBasicAuthorization(req.headers.authorization);
  const bearer = parseBearerAuthorization(req.headers.authorization);
  const challenge = { 'www-authenticate': challenges(runtime, req) };
  // containers/image pings /v2/ and uses only this challenge, so it must challenge here too.
  if (needsAuth && !basic && bearer === null) {
    sendError(res, registryError(401, 'UNAUTHORIZED', 'authentication required'), challenge);
    return null;
  }
  let namespace: string | null = null;
  if (basic || bearer !== null) {
    let keys: Uint8Array[] = [];
    try {
      keys = runtime.brokerKeys?.keys() ?? [];
    } catch {
      // The signing key went bad under a running proxy: its fault, not the client's (as on pulls).
      sendError(res, registryError(503, 'UNAVAILABLE', 'the proxy cannot load its broker keys'));
      return null;
    }
    if (bearer !== null) {
      // A token is checked for its signature and expiry here; what it grants, on each request.
      const check = verifyRegistryToken(keys, bearer, Math.floor(Date.now() / 1000));
      if (!check.ok && needsAuth) {
        sendError(res, registryError(401, 'UNAUTHORIZED', `invalid registry token (${check.reason})`), { 'www-authenticate': challenges(runtime, req, undefined, 'invalid_token') });
        return null;
      }
      if (check.ok) namespace = check.claims.namespace;
    } else if (basic) {
      const brokerOk = runtime.brokerKeys ? verifyNamespaceToken(keys, basic.username, basic.password) : false;
      if (brokerOk) namespace = basic.username;
      // Passthrough credentials can only be checked by their upstream, on a real request.
      else if (!rules.some((r) => r.rule.auth.mode === 'passthrough')) {
        sendError(res, registryError(401, 'UNAUTHORIZED', 'invalid credentials'), challenge);
        return null;
      }
    }
  }
  const body = '{}';
  res.writeHead(200, { 'content-type': 'application/json; charset=utf-8', 'content-length': body.length });
  res.end(req.method === 'HEAD' ? undefined : body);
  return namespace;
}
