// Credentials and keys from files (Secret mounts). Re-read after a short time so that a rotated
// Secret takes effect without a restart; never logged.

import { existsSync, readFileSync } from 'node:fs';

const REFRESH_MS = 10_000;

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
        throw new Error(`cannot read secret file ${this.path}: ${(error as NodeJS.ErrnoException).code ?? 'error'}`);
      }
      this.readAt = now;
    }
    return this.value;
  }
}

/** Minimum size of a broker key: an HMAC key shorter than this is guessable. */
export const MIN_BROKER_KEY_BYTES = 16;

export class BrokerKeys {
  private readonly files: SecretFile[];

  constructor(paths: readonly string[]) {
    this.files = paths.map((p) => new SecretFile(p));
  }

  /**
   * All keys, signing key first. The signing key must exist; later files are optional (a Secret
   * holds a previous key only during a rotation). Throws when a present key is too short.
   */
  keys(): Uint8Array[] {
    const keys: Uint8Array[] = [];
    this.files.forEach((f, i) => {
      let text: string;
      try {
        text = f.read();
      } catch (error) {
        if (i > 0 && f.missing()) return;
        throw error;
      }
      const key = Buffer.from(text, 'utf8');
      if (key.length < MIN_BROKER_KEY_BYTES) throw new Error(`broker key ${f.path} is shorter than ${MIN_BROKER_KEY_BYTES} bytes`);
      keys.push(key);
    });
    return keys;
  }

  signingKey(): Uint8Array {
    const first = this.keys()[0];
    if (!first) throw new Error('no broker key configured');
    return first;
  }
}
