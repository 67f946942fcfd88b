// A tunnel of a known rate in front of a server on loopback: forward.ts as its own process with
// `--pace`, a real TCP relay whose target-to-client bytes are capped (a token bucket shared by all its
// connections, as one link is). Nothing of the server or the client is faked; bytes only come later.

import { fileURLToPath } from 'node:url';
import { freePort, startProcess } from './procs.js';

const FORWARD = fileURLToPath(new URL('./forward.js', import.meta.url));

export interface PacedTunnel {
  /** `http://127.0.0.1:PORT`: the server, reached through the tunnel. */
  readonly url: string;
  readonly port: number;
  readonly bytesPerSecond: number;
  stop(): Promise<void>;
}

export async function startPacedTunnel(targetPort: number, bytesPerSecond: number): Promise<PacedTunnel> {
  const port = await freePort();
  const proc = startProcess(process.execPath, [FORWARD, '--pace', String(bytesPerSecond), `tcp:127.0.0.1:${port}=tcp:127.0.0.1:${targetPort}`]);
  for (const deadline = Date.now() + 10_000; !proc.output().includes('ready'); ) {
    if (proc.child.exitCode !== null || Date.now() > deadline) {
      await proc.stop();
      throw new Error(`the paced tunnel did not start: ${proc.output()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return { url: `http://127.0.0.1:${port}`, port, bytesPerSecond, stop: () => proc.stop() };
}
