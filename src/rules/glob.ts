// Glob patterns for repository paths and namespaces: `*` and `?` stay inside one path segment,
// `**` crosses `/`. Compiled once at config load.

export type GlobMatcher = (value: string) => boolean;

const escapeRegExp = (text: string): string => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

export function compileGlob(pattern: string): GlobMatcher {
  let source = '';
  for (let i = 0; i < pattern.length; i++) {
    const char = pattern.charAt(i);
    if (char === '*' && pattern.charAt(i + 1) === '*') {
      // `a/**` also matches `a` itself, as in most glob dialects for directories.
      if (pattern.charAt(i + 2) === '' && source.endsWith('/')) {
        source = `${source.slice(0, -1)}(?:/.*)?`;
      } else {
        source += '.*';
      }
      i++;
    } else if (char === '*') {
      source += '[^/]*';
    } else if (char === '?') {
      source += '[^/]';
    } else {
      source += escapeRegExp(char);
    }
  }
  const re = new RegExp(`^${source}$`);
  return (value) => re.test(value);
}

/** An include/exclude filter: included when any include matches (or there are none) and no exclude does. */
export interface GlobFilter {
  readonly include: readonly string[];
  readonly exclude: readonly string[];
}

export interface CompiledFilter {
  /** `null` when allowed; otherwise which side refused it. */
  readonly refuse: (value: string) => 'not-included' | 'excluded' | null;
}

export function compileFilter(filter: GlobFilter | undefined): CompiledFilter {
  const include = (filter?.include ?? []).map(compileGlob);
  const exclude = (filter?.exclude ?? []).map(compileGlob);
  return {
    refuse(value) {
      if (include.length > 0 && !include.some((m) => m(value))) return 'not-included';
      if (exclude.some((m) => m(value))) return 'excluded';
      return null;
    },
  };
}
