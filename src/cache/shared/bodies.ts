// A shared object's download (the storage SDKs' Readable) as the proxy's body type (ContentBody:
// push, with back-pressure), so that a node fill reads it as it reads an upstream answer.

import type { Readable } from 'node:stream';
import type { ContentBody } from '../../content/source.js';
import type { BodySink } from '../../upstream/body.js';

/** A ContentBody over a Readable (a shared object being downloaded); `failed` hears of the store
 * failing the download (not of the reader leaving). */
export function bodyOfReadable(stream: Readable, failed: (error: Error) => void = () => undefined): ContentBody {
  let sink: BodySink | undefined;
  /** How the download ended before a sink attached (it may fail while the fill is being set up). */
  let ended: { error?: Error } | undefined;
  let destroyed = false;
  const end = (error?: Error) => {
    if (ended || destroyed) return;
    ended = error ? { error } : {};
    if (error) failed(error);
    if (!sink) return;
    if (error) sink.error(error);
    else sink.end();
  };
  // Listened to from the start, so that an end before attach() is kept, not lost.
  stream.once('error', (error) => end(error));
  stream.once('close', () => end(stream.readableEnded ? undefined : new Error('the shared store closed the download before its end')));
  stream.pause();
  return {
    attach(attached) {
      sink = attached;
      if (ended) {
        if (ended.error) attached.error(ended.error);
        else attached.end();
        return;
      }
      stream.on('data', (chunk: Buffer) => {
        if (!attached.data(chunk)) stream.pause();
      });
      stream.once('end', () => end());
      stream.resume();
    },
    resume: () => stream.resume(),
    destroy(reason) {
      destroyed = true;
      stream.destroy(reason);
    },
    // Each chunk is a buffer of its own (the stream does not reuse them): nothing to hold.
    hold: () => () => undefined,
  };
}
