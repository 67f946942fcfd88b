// Loggers. Every logger redacts credentials wherever they might appear in a record.

import { pino, type DestinationStream, type Logger } from 'pino';

export type { Logger };

/**
 * Record paths that may carry credentials; their values are replaced before anything is written.
 * Explicit paths only: wildcard paths make every record walk its keys (measured: twice the cost
 * of an audit record), and the project logs headers under these names and nowhere else.
 */
const CREDENTIAL_HEADERS = ['authorization', '"proxy-authorization"', 'cookie', '"set-cookie"', '"www-authenticate"'];
export const REDACTED_PATHS: readonly string[] = [
  'authorization',
  'password',
  'token',
  'credentials',
  ...['headers', 'req.headers', 'res.headers', 'upstream.headers', 'request.headers'].flatMap((base) =>
    CREDENTIAL_HEADERS.map((h) => (h.startsWith('"') ? `${base}[${h}]` : `${base}.${h}`)),
  ),
];

export interface LoggerOptions {
  readonly level?: string;
  readonly name?: string;
  /** Where records go; stdout when absent (tests pass a stream to read them back). */
  readonly destination?: DestinationStream;
}

export function createLogger(options: LoggerOptions = {}): Logger {
  return pino(
    {
      level: options.level ?? process.env.PULLBRIDGE_LOG_LEVEL ?? 'info',
      ...(options.name !== undefined ? { name: options.name } : {}),
      redact: { paths: [...REDACTED_PATHS], censor: '[REDACTED]' },
      timestamp: pino.stdTimeFunctions.isoTime,
      base: undefined,
    },
    options.destination,
  );
}
