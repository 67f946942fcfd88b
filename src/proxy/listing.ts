// Listing for mirroring tools: the catalog across rules and tag lists, paged by the proxy with
// `n`, `last` and RFC 5988 `Link` headers as distribution pages them. Pure: the shell
// (catalog.ts, server.ts) asks the upstreams and feeds the answers through these functions.
//
// The catalog lists `<rule>/<repository>`. Rule names are DNS labels (no `/`), so every name of
// one rule shares the prefix `<rule>/` and no other rule's prefix is a prefix of it: ordering the
// rules by `<rule>/` and each rule's repositories lexically orders the whole catalog lexically.
// A page is therefore a walk over the rules in that order, each one's upstream catalog asked from
// the rule's part of `last` on: no merge across upstreams, nothing read that the page does not need.

import { isValidRepositoryPath, isValidTag, NAME_TOTAL_LENGTH_MAX } from '../reference/reference.js';
import type { CompiledFilter } from '../rules/glob.js';
import { registryError, type RegistryError } from './errors.js';

/** The most entries one catalog page holds (distribution's default `catalog.maxentries`; Harbor
 * asks for 1000 at a time). A larger `n` is capped: the client follows the Link for the rest. */
export const CATALOG_PAGE_MAX = 1000;
/** A catalog page without `n` (distribution's default). */
export const CATALOG_PAGE_DEFAULT = 100;
/** The most tags one tag-list page holds when the client asks for more. */
export const TAGS_PAGE_MAX = 10_000;
const TAG_LENGTH_MAX = 128;

export interface PageQuery {
  /** Entries asked for, already capped; undefined when the client gave no `n`. */
  readonly n: number | undefined;
  /** The last entry the client has (a position: it need not exist); undefined from the start. */
  readonly last: string | undefined;
}

export type PageQueryResult = { readonly ok: true; readonly page: PageQuery } | { readonly ok: false; readonly error: RegistryError };

const quoted = (value: string): string => JSON.stringify(value.length > 64 ? `${value.slice(0, 64)}…` : value);

/**
 * `n` and `last` of a catalog (`/v2/_catalog`) or tag-list query string. A bad value is a 400
 * naming the parameter (distribution ignores a non-numeric `n`; a client sending one has a bug
 * worth seeing). An empty value counts as absent, as in distribution.
 */
export function parsePageQuery(query: string, list: 'catalog' | 'tags'): PageQueryResult {
  const params = new URLSearchParams(query);
  const rawN = params.get('n') ?? '';
  const rawLast = params.get('last') ?? '';
  let n: number | undefined;
  if (rawN !== '') {
    if (!/^\d+$/.test(rawN)) return { ok: false, error: registryError(400, 'PAGINATION_NUMBER_INVALID', `n must be a non-negative integer, not ${quoted(rawN)}`, { n: rawN.slice(0, 64) }) };
    n = Math.min(Number(rawN), list === 'catalog' ? CATALOG_PAGE_MAX : TAGS_PAGE_MAX);
  }
  if (rawLast === '') return { ok: true, page: { n, last: undefined } };
  if (list === 'catalog') {
    // A position in the catalog, compared as a string: the name grammar's characters, a name's length.
    if (rawLast.length > NAME_TOTAL_LENGTH_MAX || !/^[a-z0-9._/-]+$/.test(rawLast)) {
      return { ok: false, error: registryError(400, 'NAME_INVALID', `last must be a repository name as the catalog lists it (<rule>/<repository>, at most ${NAME_TOTAL_LENGTH_MAX} characters), not ${quoted(rawLast)}`) };
    }
  } else if (rawLast.length > TAG_LENGTH_MAX || !/^[A-Za-z0-9_.-]+$/.test(rawLast)) {
    return { ok: false, error: registryError(400, 'TAG_INVALID', `last must be a tag (at most ${TAG_LENGTH_MAX} of A-Z a-z 0-9 _ . -), not ${quoted(rawLast)}`) };
  }
  return { ok: true, page: { n, last: rawLast } };
}

/** One rule's place in a catalog walk: `after` is the rule's part of the client's `last`
 * (undefined: from the rule's first repository). */
export interface CatalogStart<R> {
  readonly rule: R;
  readonly name: string;
  readonly after: string | undefined;
}

/**
 * The rules a catalog page after `last` walks, in catalog order, each with where it starts: rules
 * whose names all sort at or before `last` are left out.
 */
export function catalogWalk<R>(rules: ReadonlyArray<{ readonly name: string; readonly rule: R }>, last: string | undefined): Array<CatalogStart<R>> {
  const ordered = [...rules].sort((a, b) => compare(`${a.name}/`, `${b.name}/`));
  const walk: Array<CatalogStart<R>> = [];
  for (const { name, rule } of ordered) {
    const prefix = `${name}/`;
    if (last === undefined || last < prefix) walk.push({ rule, name, after: undefined });
    else if (last.startsWith(prefix)) walk.push({ rule, name, after: last.length > prefix.length ? last.slice(prefix.length) : undefined });
    // Otherwise `last` sorts after every `<rule>/…`: the client has had this rule's names.
  }
  return walk;
}

/**
 * One upstream catalog page as the client may see it, in order: sorted and de-duplicated (an
 * upstream that ignores `n` or `last` answers every name, in its own order), entries at or before
 * `after` dropped, names the proxy would not serve (not the grammar's, too long as
 * `<rule>/<name>`, refused by the rule's repository filter) left out. `examined` is the upstream
 * entries the page moved past, the position to ask the upstream from next.
 */
export function catalogEntries(rule: string, upstreamNames: readonly unknown[], after: string | undefined, filter: CompiledFilter): Array<{ readonly upstream: string; readonly listed: string | undefined }> {
  const names = [...new Set(upstreamNames.filter((n): n is string => typeof n === 'string'))].sort(compare);
  const out: Array<{ upstream: string; listed: string | undefined }> = [];
  for (const name of names) {
    if (after !== undefined && name <= after) continue;
    const listed = `${rule}/${name}`;
    const servable = listed.length <= NAME_TOTAL_LENGTH_MAX && isValidRepositoryPath(name) && filter.refuse(name) === null;
    out.push({ upstream: name, listed: servable ? listed : undefined });
  }
  return out;
}

/** `Link` to the catalog's next page, as distribution writes it. */
export function catalogLink(last: string, n: number): string {
  return `</v2/_catalog?last=${encodeURIComponent(last)}&n=${n}>; rel="next"`;
}

export interface TagPage {
  readonly tags: readonly string[];
  /** The tag to ask the next page after, when there is one. */
  readonly nextAfter: string | undefined;
}

/**
 * A tag-list page from the upstream's answer, whether or not the upstream paged it (distribution
 * 2.8 ignores `n` and `last` and answers every tag, unsorted): sorted, after `last`, at most `n`.
 * There is a next page when tags remain past `n`, or the upstream linked one itself.
 */
export function pageTags(upstreamTags: unknown, page: PageQuery, upstreamHasNext: boolean): TagPage {
  const all = Array.isArray(upstreamTags) ? [...new Set(upstreamTags.filter((t): t is string => typeof t === 'string' && isValidTag(t)))].sort(compare) : [];
  const after = page.last === undefined ? all : all.filter((t) => t > (page.last ?? ''));
  const tags = page.n === undefined ? after : after.slice(0, page.n);
  const more = tags.length < after.length || upstreamHasNext;
  const lastTag = tags[tags.length - 1];
  return { tags, nextAfter: more && lastTag !== undefined ? lastTag : undefined };
}

/** `Link` to a tag list's next page on the proxy's path. */
export function tagsLink(rule: string, repository: string, last: string, n: number | undefined): string {
  return `</v2/${rule}/${repository}/tags/list?last=${encodeURIComponent(last)}${n === undefined ? '' : `&n=${n}`}>; rel="next"`;
}

/** Byte order (distribution compares Go strings); names and tags are ASCII by their grammar. */
function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
