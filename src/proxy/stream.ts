// Streaming one content body to one client: backpressure, and the minimum rate a client must read at.
//
// Chunks may be views into reused socket read buffers (upstream/readbuffers.ts); each is written as
// it is and its buffer held until the write completes, so a body passes through without a copy or
// an allocation per chunk. A body that fails (a digest that does not match, a cut upstream) ends in
// an error here, and the caller cuts the connection.

import type { ServerResponse } from 'node:http';
import type { ContentBody } from '../content/source.js';
import { READ_BUFFER_BYTES } from '../upstream/readbuffers.js';

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
  readonly onBytes: (n: number) => void;
  readonly minimumRate?: MinimumRate;
}

/** Resolves with undefined when the client got the whole body, or with what went wrong. */
export function streamBody(body: ContentBody, res: ServerResponse, options: StreamOptions): Promise<Error | undefined> {
  // Bytes the client's socket took (write callbacks), and whether the proxy is waiting for it.
  let flushed = 0;
  let waitingForClient = false;

  const write = (chunk: Buffer): boolean => {
    options.onBytes(chunk.length);
    const release = body.hold(chunk);
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
        return settled ? true : write(chunk);
      },
      end() {
        if (!settled) res.end(() => settle());
      },
      error(error) {
        settle(error);
      },
    });
  });
}
