// One line for a server that cannot start listening, naming the flag whose port (or address) it is:
// what a user fixes, instead of a stack trace. Pure.

const REASONS: Readonly<Record<string, string>> = {
  EADDRINUSE: 'address already in use',
  EACCES: 'permission denied (ports below 1024 need privileges)',
  EADDRNOTAVAIL: 'address not available on this host',
};

interface ListenError {
  readonly code?: unknown;
  readonly port?: unknown;
  readonly address?: unknown;
  readonly syscall?: unknown;
}

/** Where a port came from when no flag gave it, e.g. `proxy.port 30500 from config.yaml (override with --port)`. */
export interface PortSource {
  readonly port: number;
  readonly described: string;
}

/**
 * `--port 30500: address already in use` when `error` is a listen error on one of `ports` (flag ->
 * port as given, or where it came from); `--host 10.9.9.9: address not available on this host` when
 * the address is not this host's (`hosts`: flag -> address). Null for anything else. A port given as
 * 0 (any free port) cannot be in use.
 */
export function describeListenError(error: unknown, ports: Readonly<Record<string, number | PortSource | undefined>>, hosts: Readonly<Record<string, string | undefined>> = {}): string | null {
  if (error === null || typeof error !== 'object') return null;
  const { code, port, address, syscall } = error as ListenError;
  if (typeof code !== 'string' || syscall !== 'listen') return null;
  const reason = REASONS[code] ?? code;
  if (code === 'EADDRNOTAVAIL') {
    const hostFlag = Object.entries(hosts).find(([, h]) => h !== undefined && h === address)?.[0];
    if (hostFlag) return `${hostFlag} ${String(address)}: ${reason}`;
  }
  for (const [flag, given] of Object.entries(ports)) {
    if (given === undefined) continue;
    if (typeof given === 'number' ? given === port : given.port === port) return typeof given === 'number' ? `${flag} ${String(port)}: ${reason}` : `${given.described}: ${reason}`;
  }
  return `port ${String(port)}: ${reason}`;
}
