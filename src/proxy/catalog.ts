// `GET /v2/_catalog`: the repositories each rule lets this client list, as `<rule>/<repository>`,
// one page at a time (pure parts in listing.ts). Who may list a rule is who may pull from it
// (access.ts): anonymous rules for everyone, broker rules for a namespace credential the rule's
// namespace filter admits, passthrough rules with the client's own credential, asked upstream.
//
// Cost: a page walks the rules in catalog order and asks each upstream for `n` names after the
// rule's part of `last`, one page at a time, until `n` names are listed. Upstream pages are read
// one at a time within the buffer budget and dropped once filtered, so memory is one upstream
// page (at most CATALOG_PAGE_LIMIT_BYTES) plus the `n` names answered. Time is bounded by
// MAX_UPSTREAM_PAGES upstream pages that list names (repository filters may drop most of them),
// plus one answer per rule without a catalog: a page ends early, with a Link past the last name
// examined, rather than walk a whole upstream.

import type { IncomingMessage } from 'node:http';
import type { Logger } from '../log.js';
import { readCatalogPage } from '../content/catalog.js';
import { ContentError, type BufferAllowance } from '../content/source.js';
import { parseBasicAuthorization, verifyNamespaceToken } from '../rules/credentials.js';
import type { UpstreamCredentials } from '../upstream/authorizer.js';
import type { RuleUpstream } from '../upstream/rule.js';
import { authenticate } from './access.js';
import { registryError, type RegistryError } from './errors.js';
import { catalogEntries, catalogLink, catalogWalk, CATALOG_PAGE_DEFAULT, type PageQuery } from './listing.js';
import type { ProxyRuntime } from './runtime.js';

/** Upstream pages with names one catalog page may read (besides one answer per rule without a catalog). */
export const MAX_UPSTREAM_PAGES = 8;

/** Rules the client may list, with what each upstream is asked with. */
export type CatalogAccess =
  | { readonly ok: true; readonly namespace: string | null; readonly rules: ReadonlyArray<{ readonly name: string; readonly rule: ListedRule }> }
  | { readonly ok: false; readonly error: RegistryError; readonly challenge: boolean; readonly namespace: string | null };

export interface ListedRule {
  readonly upstream: RuleUpstream;
  readonly credentials: UpstreamCredentials | undefined;
}

/**
 * Which rules this client may list. Without a credential while some rule needs one, or with one that
 * nothing here can use, the client is challenged (as at `/v2/`). A namespace credential is never
 * sent to a passthrough rule's upstream: it is pullbridge's, not the client's registry credential.
 */
export function catalogAccess(runtime: ProxyRuntime, req: IncomingMessage, logger: Logger): CatalogAccess {
  const rules = [...runtime.rules.values()];
  const header = req.headers.authorization;
  const basic = parseBasicAuthorization(header);
  if (!basic && rules.some((rr) => rr.rule.auth.mode !== 'anonymous')) return { ok: false, error: registryError(401, 'UNAUTHORIZED', 'authentication required'), challenge: true, namespace: null };
  let namespace: string | null = null;
  if (basic && runtime.brokerKeys) {
    try {
      if (verifyNamespaceToken(runtime.brokerKeys.keys(), basic.username, basic.password)) namespace = basic.username;
    } catch {
      return { ok: false, error: registryError(503, 'UNAVAILABLE', 'the proxy cannot load its broker keys'), challenge: false, namespace: null };
    }
  }
  if (basic && namespace === null && !rules.some((rr) => rr.rule.auth.mode === 'passthrough')) {
    return { ok: false, error: registryError(401, 'UNAUTHORIZED', 'invalid credentials: use the pull secret pullbridge provisions in your namespace'), challenge: true, namespace: null };
  }
  const listed: Array<{ name: string; rule: ListedRule }> = [];
  for (const rr of rules) {
    if (rr.rule.auth.mode === 'passthrough' && namespace !== null) continue;
    // A registry token names repositories, never the catalog: it lists nothing (Basic lists).
    const auth = authenticate(runtime, rr, '', header, logger);
    if (auth.ok) listed.push({ name: rr.rule.name, rule: { upstream: rr, credentials: auth.credentials } });
    else if (auth.error.status === 503) return { ok: false, error: auth.error, challenge: false, namespace };
    // Otherwise this client may not pull from the rule (namespace filter), so it lists nothing there.
  }
  return { ok: true, namespace, rules: listed };
}

export interface CatalogPageAnswer {
  readonly repositories: readonly string[];
  /** The Link header to the next page, when there may be one. */
  readonly link: string | undefined;
  /** Rules skipped because their upstream has no catalog for this client, with why (for the log). */
  readonly skipped: readonly string[];
}

/** One catalog page; throws a ContentError when an upstream fails (never a silently shorter catalog). */
export async function listCatalog(rules: ReadonlyArray<{ readonly name: string; readonly rule: ListedRule }>, page: PageQuery, signal: AbortSignal, buffers: BufferAllowance): Promise<CatalogPageAnswer> {
  const n = page.n ?? CATALOG_PAGE_DEFAULT;
  const repositories: string[] = [];
  const skipped: string[] = [];
  if (n === 0) return { repositories, link: undefined, skipped };
  const walk = catalogWalk(rules, page.last);
  let pagesRead = 0;
  /** The last catalog position moved past: the next page starts after it. */
  let position: string | undefined;
  for (let i = 0; i < walk.length; i++) {
    const start = walk[i];
    if (start === undefined) break;
    const { upstream, credentials } = start.rule;
    let after = start.after;
    for (;;) {
      if (pagesRead === MAX_UPSTREAM_PAGES) {
        // Time is up for this page: the client goes on from the last name examined.
        return { repositories, link: position === undefined ? undefined : catalogLink(position, n), skipped };
      }
      const answer = await readCatalogPage(upstream, { n, last: after, credentials, signal, buffers }).catch((error: unknown) => {
        // Say whose upstream failed: the catalog spans every rule.
        if (error instanceof ContentError && !error.message.includes(`rule "${start.name}"`)) throw new ContentError(error.failure, `rule "${start.name}": ${error.message}`, error.details);
        throw error;
      });
      if (answer.kind === 'none') {
        skipped.push(`${start.name}: ${answer.reason}`);
        break;
      }
      const entries = catalogEntries(start.name, answer.names, after, upstream.rule.repositoryFilter);
      if (entries.length > 0) pagesRead++;
      for (let e = 0; e < entries.length; e++) {
        const entry = entries[e];
        if (entry === undefined) break;
        after = entry.upstream;
        position = `${start.name}/${entry.upstream}`;
        if (entry.listed === undefined) continue;
        repositories.push(entry.listed);
        if (repositories.length === n) {
          // The page is full: a next page when this upstream page lists more, or more may come.
          const more = entries.slice(e + 1).some((rest) => rest.listed !== undefined) || answer.hasNext || i < walk.length - 1;
          return { repositories, link: more ? catalogLink(position, n) : undefined, skipped };
        }
      }
      // An upstream that linked a next page but answered nothing new would loop: that rule is done.
      if (!answer.hasNext || entries.length === 0) break;
    }
  }
  return { repositories, link: undefined, skipped };
}
