// Credentials and keys from files (Secret mounts). Re-read after a short time so that a rotated
// Secret takes effect without a restart; never logged.

import { existsSync, readFileSync } from 'node:fs';

const REFRESH_MS = 10_000;

const FILE_ERRORS: Readonly<Record<string, string>> = {
  ENOENT: 'no such file',
  EISDIR: 'is a directory',
  ENOTDIR: 'a part of the path is not a directory',
  EACCES: 'permission denied',
  EPERM: 'permission denied',
};

/** Why a file could not be read or written, in words: `no such file`, not `ENOENT`. */
export function describeFileError(error: unknown): string {
  const code = (error as NodeJS.ErrnoException | null)?.code;
  return (code !== undefined ? FILE_ERRORS[code] : undefined) ?? code ?? (error instanceof Error ? error.message.split('\n')[0] ?? 'error' : 'error');
}

export class SecretFile {
  private value: string | undefined;
  private readAt = 0;

  constructor(
    readonly path: string,
    private readonly now: () => number = Date.now,
  ) {}

  /** Whether the file does not exist (as opposed to being unreadable). */
  missing(): boolean {
    return !existsSync(this.path);
  }

  /** The file's content without a trailing newline; throws with the path (not the content) on error. */
  read(): string {
    const now = this.now();
    if (this.value === undefined || now - this.readAt > REFRESH_MS) {
      try {
        this.value = readFileSync(this.path, 'utf8').replace(/\r?\n$/, '');
      } catch (error) {
        throw new Error(`cannot read secret file ${this.path}: ${describeFileError(error)}`);
      }
      this.readAt = now;
    }
    return this.value;
  }
}

/** Minimum size of a broker key: an HMAC key shorter than this is guessable. */
export const MIN_BROKER_KEY_BYTES = 16;

/** A verify-only key file that is there but cannot be used: its path and why, never its content. */
export interface SkippedBrokerKey {
  readonly path: string;
  readonly reason: string;
}

export class BrokerKeys {
  private readonly files: SecretFile[];

  /**
   * `onVerifyKeys` hears, at every use of the verify keys, which verify-only files were skipped (an
   * empty list when none): a bad previous key must not stop every pull, but someone must hear of it.
   */
  constructor(
    paths: readonly string[],
    private readonly onVerifyKeys: (skipped: readonly SkippedBrokerKey[]) => void = () => {},
  ) {
    this.files = paths.map((p) => new SecretFile(p));
  }

  /** One key file's key; throws with the path (never the content) when it is unreadable or too short. */
  private load(file: SecretFile): Uint8Array {
    const key = Buffer.from(file.read(), 'utf8');
    if (key.length === 0) throw new Error(`broker key ${file.path} is empty`);
    if (key.length < MIN_BROKER_KEY_BYTES) throw new Error(`broker key ${file.path} is shorter than ${MIN_BROKER_KEY_BYTES} bytes`);
    return key;
  }

  /**
   * All usable keys, signing key first. The signing key must be good (throws otherwise). Later files
   * only verify: absent is normal (a Secret holds a previous key only during a rotation), and one
   * that is present but unusable is skipped and reported.
   */
  keys(): Uint8Array[] {
    const keys = [this.signingKey()];
    const skipped: SkippedBrokerKey[] = [];
    for (const file of this.files.slice(1)) {
      try {
        keys.push(this.load(file));
      } catch (error) {
        if (!file.missing()) skipped.push({ path: file.path, reason: (error as Error).message });
      }
    }
    this.onVerifyKeys(skipped);
    return keys;
  }

  /** The key that signs namespace credentials: the first file's; the others are not read. */
  signingKey(): Uint8Array {
    const first = this.files[0];
    if (!first) throw new Error('no broker key configured');
    return this.load(first);
  }
}

/**
 * The upstream credential of a rule from its files (the username may be inline), each file re-read
 * like any SecretFile, so that a rotated Secret mount takes effect without a restart. For the
 * webhook's rewrite: never pull secrets; never logged.
 */
export class RuleCredentialFiles {
  private readonly files = new Map<string, SecretFile>();

  constructor(private readonly now: () => number = Date.now) {}

  private file(path: string): SecretFile {
    let file = this.files.get(path);
    if (file === undefined) {
      file = new SecretFile(path, this.now);
      this.files.set(path, file);
    }
    return file;
  }

  /** Throws with the rule and path (never a value) when a file cannot be read or is empty. */
  read(rule: { readonly name: string; readonly credentials?: { readonly username?: string | undefined; readonly usernameFile?: string | undefined; readonly passwordFile?: string | undefined } | undefined }): { username: string; password: string } {
    const credentials = rule.credentials;
    if (credentials?.passwordFile === undefined) throw new Error(`rule "${rule.name}" has no credentials`);
    const username = credentials.username ?? (credentials.usernameFile !== undefined ? this.file(credentials.usernameFile).read() : '');
    const password = this.file(credentials.passwordFile).read();
    if (username === '' || password === '') throw new Error(`rule "${rule.name}": ${username === '' ? 'username' : 'password'} is empty`);
    return { username, password };
  }
}
