// Streaming one upstream body to one client: backpressure and the digest guard.
//
// Chunks are views into reused socket read buffers (readbuffers.ts); each is written as it is and
// its buffer held until the write completes, so a body passes through without a copy or an
// allocation per chunk.
// With a digest, every byte is hashed and the last chunk (known by Content-Length; without one,
// each latest chunk) is kept back, copied, until the hash matches: a truncated or corrupted body
// then ends in a cut connection, never in a complete response.

import { createHash } from 'node:crypto';
import type { ServerResponse } from 'node:http';
import type { UpstreamBody } from './body.js';
import { holdView, READ_BUFFER_BYTES } from './readbuffers.js';

/** Bytes queued for a slow client per stream before the upstream pauses: one read's worth. */
export const BODY_HIGH_WATER_MARK = READ_BUFFER_BYTES;

/** Below this a client that holds up the stream (the proxy waits for it to read) is cut: it would
 * otherwise keep an upstream connection of the rule's pool for as long as it likes. */
export interface MinimumRate {
  readonly bytesPerSecond: number;
  /** Judged over windows this long, and only while the client is the bottleneck. */
  readonly windowMs: number;
}

export const DEFAULT_MINIMUM_RATE: MinimumRate = { bytesPerSecond: 64 * 1024, windowMs: 30_000 };

export interface StreamOptions {
  /** `algorithm:hex` the whole body must hash to; omit for partial (Range) or unverified bodies. */
  readonly digest?: string;
  /** The body's Content-Length, when the upstream sent one. */
  readonly length?: number;
  readonly onBytes: (n: number) => void;
  readonly minimumRate?: MinimumRate;
}

/** Resolves with undefined when the client got the whole body, or with what went wrong. */
export function streamBody(body: UpstreamBody, res: ServerResponse, options: StreamOptions): Promise<Error | undefined> {
  const colon = options.digest?.indexOf(':') ?? -1;
  const hash = options.digest && colon > 0 ? createHash(options.digest.slice(0, colon)) : undefined;
  const expected = options.digest?.slice(colon + 1);
  const length = options.length;
  let received = 0;
  let held: Buffer | undefined;
  // Bytes the client's socket took (write callbacks), and whether the proxy is waiting for it.
  let flushed = 0;
  let waitingForClient = false;

  const write = (chunk: Buffer): boolean => {
    options.onBytes(chunk.length);
    const release = holdView(chunk);
    const more = res.write(chunk, () => {
      flushed += chunk.length;
      release();
    });
    if (!more) waitingForClient = true;
    return more;
  };

  return new Promise((resolve) => {
    let settled = false;
    const settle = (error?: Error) => {
      if (settled) return;
      settled = true;
      clearInterval(rateCheck);
      res.off('drain', onDrain);
      res.off('close', onClose);
      if (error) body.destroy(error);
      resolve(error);
    };
    const onDrain = () => {
      waitingForClient = false;
      body.resume();
    };
    const rate = options.minimumRate;
    let flushedAtLastCheck = 0;
    const rateCheck = rate
      ? setInterval(() => {
          const moved = flushed - flushedAtLastCheck;
          flushedAtLastCheck = flushed;
          // Only a client that holds the stream up is judged; a slow upstream is the body idle timeout's.
          if (waitingForClient && moved < (rate.bytesPerSecond * rate.windowMs) / 1000) {
            settle(new Error(`client read ${moved} bytes in ${rate.windowMs / 1000} s, below the minimum of ${rate.bytesPerSecond} bytes/s`));
          }
        }, rate.windowMs).unref()
      : undefined;
    const onClose = () => {
      if (!res.writableFinished) settle(new Error('client went away'));
    };
    res.on('drain', onDrain);
    res.once('close', onClose);
    body.attach({
      data(chunk) {
        if (settled) return true;
        received += chunk.length;
        if (!hash) return write(chunk);
        hash.update(chunk);
        if (length !== undefined && received < length) return write(chunk);
        const previous = held;
        held = Buffer.from(chunk);
        return previous ? write(previous) : true;
      },
      end() {
        if (settled) return;
        if (hash) {
          const actual = hash.digest('hex');
          if (actual !== expected) {
            settle(new Error(`upstream blob does not match ${options.digest} (got ${options.digest?.slice(0, colon)}:${actual})`));
            return;
          }
          if (held) write(held);
        }
        res.end(() => settle());
      },
      error(error) {
        settle(error);
      },
    });
  });
}
