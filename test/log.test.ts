import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { createLogger } from '../src/log.js';

/** A logger at `level` whose records are collected, parsed. */
function collecting(level: string): { logger: ReturnType<typeof createLogger>; records: Array<Record<string, unknown>> } {
  const records: Array<Record<string, unknown>> = [];
  const destination = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split('\n')) if (line) records.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  return { logger: createLogger({ level, destination }), records };
}

describe('log records of errors', () => {
  const socket = Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:9'), { code: 'ECONNREFUSED' });
  // As an SDK's error carries the request it failed: a property a generic serializer would write.
  const failure = Object.assign(new Error('stat blobs/x: the store answered 503', { cause: socket }), { request: { headers: { authorization: 'Bearer secret-token' } } });

  it('say what failed and why in one line per cause, without a stack, at the default level', async () => {
    const { logger, records } = collecting('info');
    logger.error({ err: failure }, 'proxy request failed');
    logger.flush();
    await new Promise((resolve) => setImmediate(resolve));
    assert.deepEqual(records[0]?.err, { type: 'Error', message: 'stat blobs/x: the store answered 503', causes: ['Error: connect ECONNREFUSED 127.0.0.1:9'] });
    assert.doesNotMatch(JSON.stringify(records), /secret-token|\n\s+at /);
  });

  it('carry the stack at debug, for whoever is debugging', async () => {
    const { logger, records } = collecting('debug');
    logger.warn({ err: socket }, 'upload failed');
    logger.flush();
    await new Promise((resolve) => setImmediate(resolve));
    const err = records[0]?.err as Record<string, unknown>;
    assert.equal(err.code, 'ECONNREFUSED');
    assert.match(String(err.stack), /^Error: connect ECONNREFUSED[^\n]*\n\s+at /);
  });
});
