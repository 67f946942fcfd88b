// Streaming one content body to one client: backpressure, and the minimum rate a client must read at.
//
// Chunks may be views into reused socket read buffers (upstream/readbuffers.ts); each is written as
// it is and its buffer held until the write completes, so a body passes through without a copy or
// an allocation per chunk. A body that fails (a digest that does not match, a cut upstream) ends in
// an error here, and the caller cuts the connection.

import type { ServerResponse } from 'node:http';
import type { ContentBody } from '../content/source.js';
import { READ_BUFFER_BYTES } from '../upstream/readbuffers.js';

/**
 * Bytes queued for a slow client per stream before the upstream pauses: two reads' worth. With
 * one, every read's write said "wait" even when the socket took it all at once, and the upstream
 * was paused and resumed once per read (about 0.1 CPU-s per GiB relayed).
 */
export const BODY_HIGH_WATER_MARK = 2 * READ_BUFFER_BYTES;

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
  // The minimum rate is judged on the time the proxy spent waiting for the client to take more
  // (write said "wait", until 'drain'), per window: how long, and what the client took meanwhile.
  let waitingSince: number | undefined;
  let waitedMs = 0;
  let takenWhileWaiting = 0;

  const write = (chunk: Buffer): boolean => {
    options.onBytes(chunk.length);
    const release = body.hold(chunk);
    const more = res.write(chunk, () => {
      if (waitingSince !== undefined) takenWhileWaiting += chunk.length;
      release();
    });
    if (!more && waitingSince === undefined) waitingSince = performance.now();
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
      if (waitingSince !== undefined) waitedMs += performance.now() - waitingSince;
      waitingSince = undefined;
      body.resume();
    };
    const rate = options.minimumRate;
    // A client is cut when the proxy waited for it for at least half a window and it took less than
    // the minimum rate meanwhile. A slow upstream is never held against it: the waits end at once.
    const rateCheck = rate
      ? setInterval(() => {
          const now = performance.now();
          if (waitingSince !== undefined) {
            waitedMs += now - waitingSince;
            waitingSince = now;
          }
          const waited = waitedMs;
          const taken = takenWhileWaiting;
          waitedMs = 0;
          takenWhileWaiting = 0;
          if (waited >= rate.windowMs / 2 && (taken * 1000) / waited < rate.bytesPerSecond) {
            settle(new Error(`client read ${taken} bytes in ${(waited / 1000).toFixed(1)} s while the proxy waited for it, below the minimum of ${rate.bytesPerSecond} bytes/s`));
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
        // A write to a connection already destroyed (a reset, before its 'close' is emitted, or
        // before this stream listened for it) is dropped by Node without ever calling back: held,
        // its buffer (a pooled socket read) would stay held for good. The stream ends here instead.
        if (res.destroyed || res.socket?.destroyed) {
          settle(new Error('client went away'));
          return true;
        }
        return write(chunk);
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
