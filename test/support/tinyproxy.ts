// tinyproxy, a real forwarding proxy: CONNECT tunnels and plain HTTP forwarding, optionally with Basic auth.

import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, startProcess, waitForPort, type Proc } from './procs.js';

export interface Tinyproxy {
  readonly port: number;
  readonly url: string;
  readonly process: Proc;
  stop(): Promise<void>;
}

export async function startTinyproxy(options: { basicAuth?: { user: string; password: string }; port?: number } = {}): Promise<Tinyproxy> {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-tinyproxy-'));
  const port = options.port ?? (await freePort());
  const lines = [
    `Port ${port}`,
    'Listen 127.0.0.1',
    'Timeout 60',
    'MaxClients 64',
    'LogLevel Info',
    `LogFile "${join(dir, 'tinyproxy.log')}"`,
    `PidFile "${join(dir, 'tinyproxy.pid')}"`,
    'Allow 127.0.0.1',
    'DisableViaHeader Yes',
    // No ConnectPort line: CONNECT to any port (registries listen on arbitrary loopback ports here).
  ];
  if (options.basicAuth) lines.push(`BasicAuth ${options.basicAuth.user} ${options.basicAuth.password}`);
  writeFileSync(join(dir, 'tinyproxy.conf'), `${lines.join('\n')}\n`);
  const proc = startProcess('tinyproxy', ['-d', '-c', join(dir, 'tinyproxy.conf')]);
  try {
    await waitForPort(port);
  } catch (error) {
    await proc.stop();
    throw new Error(`${(error as Error).message}\n${proc.output()}`);
  }
  return { port, url: `http://127.0.0.1:${port}`, process: proc, stop: () => proc.stop() };
}
