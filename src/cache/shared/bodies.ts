// A shared object's download (the storage SDKs' Readable) as the proxy's body type (ContentBody:
// push, with back-pressure), so that a node fill reads it as it reads an upstream answer.

import type { Readable } from 'node:stream';
import type { ContentBody } from '../../content/source.js';
import type { BodySink } from '../../upstream/body.js';

/** A ContentBody over a Readable (a shared object being downloaded); `failed` hears of the store
 * failing the download (not of the reader leaving). */
export function bodyOfReadable(stream: Readable, failed: (error: Error) => void = () => undefined): ContentBody {
  let sink: BodySink | undefined;
  let finished = false;
  const end = (error?: Error) => {
    if (finished) return;
    finished = true;
    if (error) {
      failed(error);
      sink?.error(error);
    }
    else sink?.end();
  };
  return {
    attach(attached) {
      sink = attached;
      stream.on('data', (chunk: Buffer) => {
        if (!attached.data(chunk)) stream.pause();
      });
      stream.once('end', () => end());
      stream.once('error', (error) => end(error));
      stream.once('close', () => end(finished ? undefined : new Error('the shared store closed the download before its end')));
    },
    resume: () => stream.resume(),
    destroy(reason) {
      finished = true;
      stream.destroy(reason);
    },
    // Each chunk is a buffer of its own (the stream does not reuse them): nothing to hold.
    hold: () => () => undefined,
  };
}
