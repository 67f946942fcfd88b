// The digest guard on a streamed blob: every byte is hashed, and the last chunk (known by the
// length; without one, each latest chunk) is kept back, copied, until the hash matches. A truncated
// or corrupted body then ends in an error, never in a complete response.

import { createHash } from 'node:crypto';
import type { ContentBody } from './source.js';

/** `body` as it must hash to `digest` (`algorithm:hex`); `length` is its Content-Length, if known. */
export function verifiedBody(body: ContentBody, digest: string, length: number | undefined): ContentBody {
  const colon = digest.indexOf(':');
  if (colon <= 0) return body;
  const hash = createHash(digest.slice(0, colon));
  const expected = digest.slice(colon + 1);
  let received = 0;
  let held: Buffer | undefined;
  return {
    attach(sink) {
      body.attach({
        data(chunk) {
          received += chunk.length;
          hash.update(chunk);
          if (length !== undefined && received < length) return sink.data(chunk);
          const previous = held;
          held = Buffer.from(chunk);
          return previous ? sink.data(previous) : true;
        },
        end() {
          const actual = hash.digest('hex');
          if (actual !== expected) {
            sink.error(new Error(`upstream blob does not match ${digest} (got ${digest.slice(0, colon)}:${actual})`));
            return;
          }
          if (held) sink.data(held);
          sink.end();
        },
        error: (error) => sink.error(error),
      });
    },
    resume: () => body.resume(),
    destroy: (reason) => body.destroy(reason),
    hold: (chunk) => body.hold(chunk),
  };
}
