// A TCP/Unix-socket relay run as its own process, so that a test's network namespace and this
// machine's loopback can reach each other through a socket file (Unix sockets on a path are not
// tied to a network namespace). No address outside loopback is ever involved.
//
//   node forward.js LISTEN=TARGET ...     LISTEN, TARGET: tcp:127.0.0.1:PORT | unix:/abs/path.sock
//
// TARGET `connect` makes LISTEN an HTTP CONNECT proxy instead: each client names the address to dial
// (`CONNECT 10.0.0.12:443 HTTP/1.1`), dialed from wherever this process runs. Run inside a node's
// network namespace on a socket file, it is how a kube-apiserver outside reaches Services and Pods
// in there (its egress selector's `cluster` connection, as konnectivity is in managed clusters).
// LISTEN `tcp:0.0.0.0:PORT` is meant for inside such a namespace only (every address of the node).
//
//   node forward.js --pace BYTES_PER_S LISTEN=TARGET ...
//
// caps the bytes relayed from the targets to the clients at BYTES_PER_S in all (one token bucket for
// every connection of the process, as they would share one link): a tunnel of a known rate between a
// proxy and its upstream, which loopback otherwise is not. Still a real TCP relay: every byte passes
// unchanged and in order, only later. Client-to-target bytes are not paced.
//
// Prints "ready" once every listener is bound.

import { connect, createServer, type Socket } from 'node:net';
import { rmSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { TokenBucket } from './pacing.js';

/** What a paced relay lets pass at once after an idle spell: a HEAD's or a token's answer, not a layer. */
const PACE_BURST_BYTES = 64 * 1024;

type Endpoint = { readonly kind: 'tcp'; readonly host: string; readonly port: number } | { readonly kind: 'unix'; readonly path: string };

export function parseEndpoint(text: string, listening = false): Endpoint {
  if (text.startsWith('unix:')) return { kind: 'unix', path: text.slice('unix:'.length) };
  const match = /^tcp:(127\.0\.0\.1|\[::1\]|0\.0\.0\.0):(\d+)$/.exec(text);
  if (!match || (match[1] === '0.0.0.0' && !listening)) throw new Error(`not a loopback tcp: or unix: endpoint: ${text}`);
  return { kind: 'tcp', host: match[1] === '[::1]' ? '::1' : (match[1] ?? '127.0.0.1'), port: Number(match[2]) };
}

/** An HTTP CONNECT tunnel: reads the request head, dials the address it names, answers 200, relays. */
function tunnel(client: Socket): void {
  let head = Buffer.alloc(0);
  const onData = (chunk: Buffer) => {
    head = Buffer.concat([head, chunk]);
    const end = head.indexOf('\r\n\r\n');
    if (end < 0) {
      if (head.length > 8192) client.destroy();
      return;
    }
    client.off('data', onData);
    client.pause();
    const match = /^CONNECT (\[[0-9a-fA-F:]+\]|[^\s:]+):(\d+) HTTP\/1\.[01]\r\n/.exec(head.subarray(0, end).toString('latin1'));
    if (!match) {
      client.end('HTTP/1.1 405 Method Not Allowed\r\n\r\n');
      return;
    }
    const rest = head.subarray(end + 4);
    const upstream = connect(Number(match[2]), (match[1] ?? '').replace(/^\[|\]$/g, ''));
    let established = false;
    upstream.once('connect', () => {
      established = true;
      client.write('HTTP/1.1 200 Connection established\r\n\r\n');
      if (rest.length > 0) upstream.write(rest);
      splice(client, upstream);
      client.resume();
    });
    // Before the tunnel stands, the client is told why it failed; after, splice() closes both.
    upstream.once('error', (error) => {
      if (!established) client.end(`HTTP/1.1 502 Bad Gateway\r\n\r\n${error.message}`);
    });
    client.once('close', () => {
      if (!established) upstream.destroy();
    });
  };
  client.on('data', onData);
  client.once('error', () => client.destroy());
}

function dial(target: Endpoint): Socket {
  return target.kind === 'unix' ? connect(target.path) : connect(target.port, target.host);
}

function relay(client: Socket, target: Endpoint, pace: TokenBucket | undefined): void {
  if (pace) pacedSplice(client, dial(target), pace);
  else splice(client, dial(target));
}

/** splice(), with what the target sends held back by `pace`: the target is paused while a chunk waits
 * for its turn (so its own sends block once the socket buffers are full, as on a slow link). The
 * target's end reaches the client after the last chunk; its failing cuts the client at once. */
function pacedSplice(client: Socket, upstream: Socket, pace: TokenBucket): void {
  client.pipe(upstream);
  let waiting = 0;
  let ended = false;
  const close = () => {
    client.destroy();
    upstream.destroy();
  };
  upstream.on('data', (chunk: Buffer) => {
    waiting++;
    upstream.pause();
    setTimeout(() => {
      waiting--;
      if (client.destroyed) return;
      const more = client.write(chunk);
      if (ended) {
        if (waiting === 0) client.end();
      } else if (more) upstream.resume();
      else client.once('drain', () => upstream.resume());
    }, pace.reserve(chunk.length));
  });
  upstream.once('end', () => {
    ended = true;
    if (waiting === 0) client.end();
  });
  upstream.once('error', close);
  upstream.once('close', () => {
    if (!ended) close();
  });
  client.once('error', close);
  client.once('close', close);
}

/** Pipes two sockets into each other; either one failing or closing closes both. */
function splice(client: Socket, upstream: Socket): void {
  client.pipe(upstream).pipe(client);
  const close = () => {
    client.destroy();
    upstream.destroy();
  };
  client.once('error', close);
  upstream.once('error', close);
  client.once('close', close);
  upstream.once('close', close);
}

async function main(args: string[]): Promise<void> {
  let pace: TokenBucket | undefined;
  const pairs = [...args];
  if (pairs[0] === '--pace') {
    const rate = Number(pairs[1]);
    if (!Number.isSafeInteger(rate) || rate <= 0) throw new Error(`--pace: not a whole number of bytes per second: ${pairs[1] ?? ''}`);
    pace = new TokenBucket(rate, PACE_BURST_BYTES, () => performance.now());
    pairs.splice(0, 2);
  }
  if (pairs.length === 0) throw new Error('usage: forward [--pace BYTES_PER_S] LISTEN=TARGET ...');
  await Promise.all(
    pairs.map((pair) => {
      const [listenText, targetText] = pair.split('=');
      const listenAt = parseEndpoint(listenText ?? '', true);
      const target = targetText === 'connect' ? 'connect' : parseEndpoint(targetText ?? '');
      const server = createServer((client) => (target === 'connect' ? tunnel(client) : relay(client, target, pace)));
      return new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        if (listenAt.kind === 'unix') {
          rmSync(listenAt.path, { force: true });
          server.listen(listenAt.path, resolve);
        } else server.listen(listenAt.port, listenAt.host, resolve);
      });
    }),
  );
  process.stdout.write('ready\n');
}

main(process.argv.slice(2)).catch((error: unknown) => {
  process.stderr.write(`${(error as Error).message}\n`);
  process.exit(1);
});
