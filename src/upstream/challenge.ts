// WWW-Authenticate parsing (RFC 7235 auth-params, as registries send them). Pure.

export interface Challenge {
  /** Lower-case scheme: `basic`, `bearer`. */
  readonly scheme: string;
  readonly params: Readonly<Record<string, string>>;
}

/** Parses one or more challenges from a header value. Unknown syntax yields what could be read. */
export function parseChallenges(header: string | undefined): Challenge[] {
  if (!header) return [];
  const challenges: Challenge[] = [];
  const re = /\s*([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)(?:\s+|$)/y;
  let i = 0;
  while (i < header.length) {
    re.lastIndex = i;
    const scheme = re.exec(header);
    if (!scheme) break;
    i = re.lastIndex;
    const params: Record<string, string> = {};
    // key=value or key="quoted, value" pairs separated by commas, until the next scheme token.
    const param = /\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*(?:,|$)/y;
    for (;;) {
      param.lastIndex = i;
      const m = param.exec(header);
      if (!m) break;
      params[(m[1] ?? '').toLowerCase()] = m[2] !== undefined ? m[2].replace(/\\(.)/g, '$1') : (m[3] ?? '');
      i = param.lastIndex;
    }
    challenges.push({ scheme: (scheme[1] ?? '').toLowerCase(), params });
    while (header[i] === ',' || header[i] === ' ') i++;
  }
  return challenges;
}
