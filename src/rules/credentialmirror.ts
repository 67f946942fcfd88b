// Which upstream credentials the webhook copies into the proxies' mirror Secret: a pure function of
// the rules' credentialsSecret names and what those Secrets hold. The proxies mount the mirror whole
// (one Secret their Pod template always names), so a rule taking its credentials from a Secret the
// user manages changes no Pod template. Data stays base64, as the API gives and takes it.

export interface CredentialSourcesResult {
  readonly ok: boolean;
  /** Rule name -> name of the Secret (release namespace) with keys `username` and `password`. */
  readonly sources: ReadonlyMap<string, string>;
  readonly error?: string;
}

const SECRET_KEY = /^[-._a-zA-Z0-9]+$/;

/** The chart's credential-sources.json: `{"<rule>": "<secret>", ...}`. */
export function parseCredentialSources(text: string): CredentialSourcesResult {
  let document: unknown;
  try {
    document = JSON.parse(text === '' ? '{}' : text);
  } catch (error) {
    return { ok: false, sources: new Map(), error: `not JSON: ${(error as Error).message}` };
  }
  if (document === null || typeof document !== 'object' || Array.isArray(document)) return { ok: false, sources: new Map(), error: 'must be an object of rule name -> Secret name' };
  const sources = new Map<string, string>();
  for (const [rule, secret] of Object.entries(document)) {
    if (typeof secret !== 'string' || secret === '' || !SECRET_KEY.test(rule)) return { ok: false, sources: new Map(), error: `rule ${JSON.stringify(rule)}: must name a Secret` };
    sources.set(rule, secret);
  }
  return { ok: true, sources };
}

/** A source Secret's data (base64 values); `missing` when it does not exist, `unreadable` when it
 * could not be read this time (forbidden, API error): then the rule keeps what the mirror holds. */
export type SourceData = Readonly<Record<string, string>> | 'missing' | 'unreadable';

export interface MirrorProblem {
  readonly rule: string;
  readonly secret: string;
  readonly message: string;
}

export interface MirrorPlan {
  /** The mirror Secret's whole data: `<rule>.username` and `<rule>.password` per rule whose source is complete. */
  readonly data: Readonly<Record<string, string>>;
  /** Rules left out or kept as they were, and why (never a value). */
  readonly problems: readonly MirrorProblem[];
}

/** The mirror's data for these sources; keys of rules that are gone are simply not in it. */
export function planMirror(sources: ReadonlyMap<string, string>, secrets: ReadonlyMap<string, SourceData>, current: Readonly<Record<string, string>> = {}): MirrorPlan {
  const data: Record<string, string> = {};
  const problems: MirrorProblem[] = [];
  for (const [rule, secret] of [...sources].sort(([a], [b]) => a.localeCompare(b))) {
    const source = secrets.get(secret) ?? 'unreadable';
    if (source === 'unreadable') {
      // A passing API or RBAC error must not take working credentials away from the nodes.
      for (const key of [`${rule}.username`, `${rule}.password`]) if (current[key] !== undefined) data[key] = current[key];
      problems.push({ rule, secret, message: `Secret ${secret} could not be read; the mirror keeps what it had` });
      continue;
    }
    if (source === 'missing') {
      problems.push({ rule, secret, message: `Secret ${secret} does not exist` });
      continue;
    }
    const missing = ['username', 'password'].filter((key) => !source[key]);
    if (missing.length > 0) {
      problems.push({ rule, secret, message: `Secret ${secret} has no ${missing.join(' and no ')} key` });
      continue;
    }
    data[`${rule}.username`] = source.username as string;
    data[`${rule}.password`] = source.password as string;
  }
  return { data, problems };
}

/** Whether two Secrets' data are the same (key order aside). */
export function sameData(a: Readonly<Record<string, string>> | undefined, b: Readonly<Record<string, string>> | undefined): boolean {
  const left = Object.entries(a ?? {});
  const right = b ?? {};
  return left.length === Object.keys(right).length && left.every(([key, value]) => right[key] === value);
}
