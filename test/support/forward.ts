// A TCP/Unix-socket relay run as its own process, so that a test's network namespace and this
// machine's loopback can reach each other through a socket file (Unix sockets on a path are not
// tied to a network namespace). No address outside loopback is ever involved.
//
//   node forward.js LISTEN=TARGET ...     LISTEN, TARGET: tcp:127.0.0.1:PORT | unix:/abs/path.sock
//
// Prints "ready" once every listener is bound.

import { connect, createServer, type Socket } from 'node:net';
import { rmSync } from 'node:fs';

type Endpoint = { readonly kind: 'tcp'; readonly host: string; readonly port: number } | { readonly kind: 'unix'; readonly path: string };

export function parseEndpoint(text: string): Endpoint {
  if (text.startsWith('unix:')) return { kind: 'unix', path: text.slice('unix:'.length) };
  const match = /^tcp:(127\.0\.0\.1|\[::1\]):(\d+)$/.exec(text);
  if (!match) throw new Error(`not a loopback tcp: or unix: endpoint: ${text}`);
  return { kind: 'tcp', host: match[1] === '[::1]' ? '::1' : '127.0.0.1', port: Number(match[2]) };
}

function dial(target: Endpoint): Socket {
  return target.kind === 'unix' ? connect(target.path) : connect(target.port, target.host);
}

function relay(client: Socket, target: Endpoint): void {
  const upstream = dial(target);
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

async function main(pairs: string[]): Promise<void> {
  if (pairs.length === 0) throw new Error('usage: forward LISTEN=TARGET ...');
  await Promise.all(
    pairs.map((pair) => {
      const [listenText, targetText] = pair.split('=');
      const listenAt = parseEndpoint(listenText ?? '');
      const target = parseEndpoint(targetText ?? '');
      const server = createServer((client) => relay(client, target));
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
