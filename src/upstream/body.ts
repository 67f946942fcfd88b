// One request to an upstream and its response body, which is consumed exactly once: streamed to a
// client (through content/ to proxy/stream.ts), read whole up to a limit, or dumped.
//
// Built on undici's dispatch handler rather than request()'s Readable: the chunks can be views into
// reused socket read buffers (readbuffers.ts), so nothing here keeps a view past the callback. What
// arrives before a consumer attaches is copied; a consumer gets views and must copy what it keeps,
// or hold the buffer (`hold`) while a write of it is in progress.

import type { Dispatcher } from 'undici';
import { holdView } from './readbuffers.js';

export type IncomingHeaders = Record<string, string | string[] | undefined>;

export interface BodySink {
  /** A chunk, valid during this call only. Returning false pauses the body until `resume()`. */
  data(chunk: Buffer): boolean;
  end(): void;
  error(error: Error): void;
}

export interface UpstreamReply {
  readonly statusCode: number;
  readonly headers: IncomingHeaders;
  readonly body: UpstreamBody;
}

export interface DispatchOptions {
  readonly origin: string;
  readonly path: string;
  readonly method: 'GET' | 'HEAD';
  readonly headers: Readonly<Record<string, string>>;
  readonly signal?: AbortSignal;
}

/** Bytes copied ahead of a consumer that has not attached yet. */
const QUEUE_HIGH_WATER_MARK = 256 * 1024;
/** A body larger than this is not worth reading to keep the connection: it is closed instead. */
const DUMP_LIMIT = 128 * 1024;

export class UpstreamBody {
  private controller: Dispatcher.DispatchController | undefined;
  private abortReason: Error | undefined;
  private sink: BodySink | undefined;
  private queued: Buffer[] = [];
  private queuedBytes = 0;
  private outcome: 'open' | 'ended' | 'failed' = 'open';
  private failure: Error | undefined;

  /** Hands the body to its one consumer: what was queued first, then every chunk as it comes. */
  attach(sink: BodySink): void {
    if (this.sink) throw new Error('upstream body consumed twice');
    this.sink = sink;
    const queued = this.queued;
    this.queued = [];
    this.queuedBytes = 0;
    let flowing = true;
    for (const chunk of queued) flowing = sink.data(chunk) && flowing;
    if (this.outcome === 'ended') sink.end();
    else if (this.outcome === 'failed') sink.error(this.failure ?? new Error('upstream body failed'));
    else if (flowing) this.resume();
    else this.controller?.pause();
  }

  /** Lets a sink that returned false from `data` have more. */
  resume(): void {
    this.controller?.resume();
  }

  /** Keeps the read buffer under `chunk` from reuse until the returned function is called. */
  hold(chunk: Buffer): () => void {
    return holdView(chunk);
  }

  /** Stops the upstream transfer (closing its connection) unless it already finished. */
  destroy(reason: Error = new Error('upstream body discarded')): void {
    if (this.outcome !== 'open') return;
    this.abortReason = reason;
    this.controller?.abort(reason);
  }

  /**
   * Reads and drops a small body so the connection can be reused; a large one is cut instead.
   * A body something else already consumed has nothing left to drop.
   */
  dump(): Promise<void> {
    if (this.sink) return Promise.resolve();
    return new Promise((resolve) => {
      let size = 0;
      this.attach({
        data: (chunk) => {
          size += chunk.length;
          if (size > DUMP_LIMIT) {
            this.destroy();
            resolve();
          }
          return true;
        },
        end: () => resolve(),
        error: () => resolve(),
      });
    });
  }

  /**
   * The whole body, or null when it is larger than `limit` (the transfer is then cut). `grow` is
   * told the size before each chunk is kept, and may throw to refuse it (the transfer is then cut
   * and the read rejects with that error): memory is accounted as it is taken, not after.
   */
  readAll(limit: number, expectedLength?: number, grow?: (size: number) => void): Promise<Buffer | null> {
    return new Promise((resolve, reject) => {
      // With the length announced, one buffer of that size is filled in place: half the peak
      // memory of collecting copies and concatenating them.
      const whole = expectedLength !== undefined && expectedLength <= limit ? Buffer.allocUnsafe(expectedLength) : undefined;
      const chunks: Buffer[] = [];
      let filled = 0; // bytes in `whole`; once a chunk does not fit, the rest goes to `chunks`
      let size = 0;
      let settled = false;
      this.attach({
        data: (chunk) => {
          if (settled) return true;
          if (size + chunk.length > limit) {
            settled = true;
            this.destroy();
            resolve(null);
            return true;
          }
          try {
            grow?.(size + chunk.length);
          } catch (error) {
            settled = true;
            this.destroy();
            reject(error);
            return true;
          }
          if (whole && chunks.length === 0 && filled + chunk.length <= whole.length) {
            whole.set(chunk, filled);
            filled += chunk.length;
          } else chunks.push(Buffer.from(chunk));
          size += chunk.length;
          return true;
        },
        end: () => {
          if (settled) return;
          if (whole && filled === whole.length && chunks.length === 0) resolve(whole);
          else resolve(Buffer.concat(whole ? [whole.subarray(0, filled), ...chunks] : chunks, size));
        },
        error: (error) => {
          if (!settled) reject(error);
        },
      });
    });
  }

  // The handler side.

  started(controller: Dispatcher.DispatchController): void {
    this.controller = controller;
    if (this.abortReason) controller.abort(this.abortReason);
  }

  received(chunk: Buffer): void {
    if (this.sink) {
      if (!this.sink.data(chunk)) this.controller?.pause();
      return;
    }
    this.queued.push(Buffer.from(chunk));
    this.queuedBytes += chunk.length;
    if (this.queuedBytes >= QUEUE_HIGH_WATER_MARK) this.controller?.pause();
  }

  ended(): void {
    this.outcome = 'ended';
    this.sink?.end();
  }

  failed(error: Error): void {
    if (this.outcome !== 'open') return;
    this.outcome = 'failed';
    this.failure = error;
    this.sink?.error(error);
  }
}

/** Sends one request; resolves with status and headers once they arrive, the body following. */
export function dispatchRequest(dispatcher: Dispatcher, options: DispatchOptions): Promise<UpstreamReply> {
  const { signal } = options;
  if (signal?.aborted) return Promise.reject(signal.reason as Error);
  return new Promise((resolve, reject) => {
    const body = new UpstreamBody();
    let responded = false;
    const onAbort = () => {
      const reason = (signal?.reason as Error | undefined) ?? new Error('aborted');
      body.destroy(reason);
      if (!responded) reject(reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    const finished = () => signal?.removeEventListener('abort', onAbort);
    const handler: Dispatcher.DispatchHandler = {
      onRequestStart(controller) {
        body.started(controller);
      },
      onResponseStart(_controller, statusCode, headers) {
        // 1xx interim answers are not the response.
        if (statusCode < 200 || responded) return;
        responded = true;
        resolve({ statusCode, headers: headers as IncomingHeaders, body });
      },
      onResponseData(_controller, chunk) {
        body.received(chunk);
      },
      onResponseEnd() {
        finished();
        body.ended();
      },
      onResponseError(_controller, error) {
        finished();
        if (responded) body.failed(error);
        else reject(error);
      },
    };
    try {
      dispatcher.dispatch({ origin: options.origin, path: options.path, method: options.method, headers: options.headers }, handler);
    } catch (error) {
      finished();
      reject(error as Error);
    }
  });
}
