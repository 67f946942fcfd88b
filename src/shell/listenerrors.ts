// One line for a server that cannot start listening, naming the flag whose port it is: what a user
// fixes, instead of a stack trace. Pure.

const REASONS: Readonly<Record<string, string>> = {
  EADDRINUSE: 'address already in use',
  EACCES: 'permission denied (ports below 1024 need privileges)',
  EADDRNOTAVAIL: 'address not available on this host',
};

interface ListenError {
  readonly code?: unknown;
  readonly port?: unknown;
  readonly syscall?: unknown;
}

/**
 * `--port 30500: address already in use` when `error` is a listen error on one of `ports` (flag ->
 * port as given); null for anything else. A port given as 0 (any free port) cannot be in use.
 */
export function describeListenError(error: unknown, ports: Readonly<Record<string, number | undefined>>): string | null {
  if (error === null || typeof error !== 'object') return null;
  const { code, port, syscall } = error as ListenError;
  if (typeof code !== 'string' || syscall !== 'listen') return null;
  const reason = REASONS[code] ?? code;
  const flag = Object.entries(ports).find(([, p]) => p !== undefined && p === port)?.[0];
  return flag ? `${flag} ${String(port)}: ${reason}` : `port ${String(port)}: ${reason}`;
}
