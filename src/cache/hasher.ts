// How a fill's digest is computed: on the event loop, each chunk as it is written to the file. (A
// hashing thread that read the file back cost a copy and a hand-off per MiB: about 0.2 CPU-s per
// GiB more for the same sha256, with no gain in wall time on two cores.)

import { createHash } from 'node:crypto';

/** The digest of one fill's bytes, told about each chunk as it is written to the file. */
export interface FillHash {
  /** `chunk` (valid during the call) is being written to the file, which then holds `written` bytes. */
  update(chunk: Uint8Array, written: number): void;
  /** Hex digest of the file's first `size` bytes (all of it, once every write is done). */
  digest(size: number): Promise<string>;
  /** Nothing more is wanted of it. */
  dispose(): void;
}

export type HashFactory = (path: string, algorithm: string) => FillHash;

export const inlineHash: HashFactory = (_path, algorithm) => {
  const hash = createHash(algorithm);
  return {
    update: (chunk) => void hash.update(chunk),
    digest: () => Promise.resolve(hash.digest('hex')),
    dispose: () => undefined,
  };
};
