import type { DestinationStream } from 'pino';
import { createLogger, type Logger } from '../../src/log.js';

/** A logger whose records land in memory, parsed, plus the raw lines (to search for leaked secrets). */
export function memoryLogger(): { logger: Logger; records: Array<Record<string, unknown>>; raw: string[] } {
  const records: Array<Record<string, unknown>> = [];
  const raw: string[] = [];
  const destination: DestinationStream = {
    write(line: string) {
      raw.push(line);
      records.push(JSON.parse(line) as Record<string, unknown>);
    },
  };
  return { logger: createLogger({ destination, level: 'debug' }), records, raw };
}
