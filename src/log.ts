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

/** Levels at which an error's stack is written: an operator's log says what failed, in one line
 * per cause; the stack is for someone debugging, who turns the level down. */
const STACK_LEVELS = new Set(['debug', 'trace']);

/** The most causes an error record follows (SDK errors wrap the socket's, some twice). */
const CAUSES_MAX = 5;

/**
 * An error as a log record's `err`: its type, message and code, and its causes' messages; the stack
 * only when `withStack`. Only these fields: an SDK's error may carry the request it failed (its
 * headers among them) in other properties, which a generic serializer would write out.
 */
export function errorRecord(error: unknown, withStack: boolean): Record<string, unknown> {
  if (!(error instanceof Error)) return { message: String(error) };
  const code = (error as { code?: unknown }).code;
  const causes: string[] = [];
  for (let cause = error.cause, depth = 0; cause !== undefined && depth < CAUSES_MAX; cause = cause instanceof Error ? cause.cause : undefined, depth++) {
    causes.push(cause instanceof Error ? `${cause.name}: ${cause.message}` : String(cause));
  }
  return {
    type: error.name,
    message: error.message,
    ...(typeof code === 'string' || typeof code === 'number' ? { code } : {}),
    ...(causes.length > 0 ? { causes } : {}),
    ...(withStack && error.stack !== undefined ? { stack: error.stack } : {}),
  };
}

export function createLogger(options: LoggerOptions = {}): Logger {
  const level = options.level ?? process.env.PULLBRIDGE_LOG_LEVEL ?? 'info';
  const withStack = STACK_LEVELS.has(level);
  return pino(
    {
      level,
      ...(options.name !== undefined ? { name: options.name } : {}),
      serializers: { err: (error: unknown) => errorRecord(error, withStack) },
      redact: { paths: [...REDACTED_PATHS], censor: '[REDACTED]' },
      timestamp: pino.stdTimeFunctions.isoTime,
      base: undefined,
    },
    options.destination,
  );
}
