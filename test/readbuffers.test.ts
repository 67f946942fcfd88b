import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import { Agent } from 'undici';
import { dispatchRequest } from '../src/upstream/body.js';
import { holdView, readBufferStats, socketReadOptions } from '../src/upstream/readbuffers.js';
import { writeRepeated } from './support/http.js';

// Every byte of a stream is known by its offset: a repeating random block of prime length.
const BLOCK = randomBytes(1_000_003);

function expectedAt(offset: number, length: number): Buffer {
  const parts: Buffer[] = [];
  let at = offset % BLOCK.length;
  while (length > 0) {
    const n = Math.min(length, BLOCK.length - at);
    parts.push(BLOCK.subarray(at, at + n));
    length -= n;
    at = 0;
  }
  return Buffer.concat(parts);
}

/** A small seeded generator, so that a failing run can be replayed. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

/** Sends `total` bytes of the pattern in writes of varying size, then ends. */
async function patternServer(total: number, seed: number): Promise<{ port: number; close(): void }> {
  const server = net.createServer((socket) => {
    const random = prng(seed);
    let sent = 0;
    const write = () => {
      while (sent < total) {
        const n = Math.min(total - sent, 1 + Math.floor(random() * 300 * 1024));
        const ok = socket.write(expectedAt(sent, n));
        sent += n;
        if (!ok) return void socket.once('drain', write);
      }
      socket.end();
    };
    write();
    socket.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { port: (server.address() as net.AddressInfo).port, close: () => server.close() };
}

describe('socket read buffers', () => {
  it('never reads into a buffer that a write in progress, a pushed-back chunk or another socket still points into', async function () {
    this.timeout(60_000);
    const TOTAL = 16 * 1024 * 1024;
    const seed = Date.now() % 100_000;
    const server = await patternServer(TOTAL, seed);
    const before = { ...readBufferStats };
    const stats = { held: 0, pushedBack: 0, corrupt: [] as string[] };
    const check = (chunk: Buffer, at: number, when: string) => {
      if (!chunk.equals(expectedAt(at, chunk.length)) && stats.corrupt.length < 5) stats.corrupt.push(`${when}: ${chunk.length} bytes at ${at} (seed ${seed})`);
    };
    // One consumer per socket, behaving as the HTTP client and the relay do with the chunks.
    const consume = async (n: number): Promise<number> => {
      const random = prng(seed + n);
      let offset = 0;
      let paused = false;
      const releases: Array<Promise<void>> = [];
      const socket = net.connect({ host: '127.0.0.1', port: server.port, onread: socketReadOptions() });
      await new Promise<void>((resolve, reject) => {
        const drain = () => {
          let chunk: Buffer | null;
          while (!paused && (chunk = socket.read() as Buffer | null) !== null) {
            const start = offset;
            check(chunk, start, 'read');
            offset += chunk.length;
            const r = random();
            if (r < 0.3) {
              // As a client write would: the view is held until the write completes.
              stats.held++;
              const view = chunk;
              const release = holdView(view);
              releases.push(
                new Promise((done) =>
                  setTimeout(() => {
                    check(view, start, 'held');
                    release();
                    done();
                  }, Math.floor(random() * 4)),
                ),
              );
            } else if (r < 0.4) {
              // As the HTTP parser does when its consumer pauses: the rest goes back to the queue.
              stats.pushedBack++;
              const cut = Math.floor(random() * chunk.length);
              offset = start + cut;
              socket.unshift(chunk.subarray(cut));
              paused = true;
              setTimeout(() => {
                paused = false;
                drain();
              }, Math.floor(random() * 4));
            }
          }
        };
        socket.on('readable', drain);
        socket.on('end', resolve);
        socket.on('error', reject);
      });
      await Promise.all(releases);
      return offset;
    };
    const received = await Promise.all([0, 1, 2, 3].map(consume));
    server.close();
    assert.deepEqual(stats.corrupt, []);
    assert.deepEqual(received, [TOTAL, TOTAL, TOTAL, TOTAL]);
    assert.ok(stats.held > 10 && stats.pushedBack > 10, `the run exercised holds (${stats.held}) and push-backs (${stats.pushedBack})`);
    assert.ok(readBufferStats.reused - before.reused > 50, `buffers were reused (${readBufferStats.reused - before.reused} times, ${readBufferStats.fresh - before.fresh} fresh)`);
  });

  describe('upstream bodies', () => {
    let server: http.Server;
    let origin: string;
    let agent: Agent;
    let closedEarly = 0;
    const BODY = expectedAt(12_345, 3 * 1024 * 1024 + 17);

    before(async () => {
      server = http.createServer((req, res) => {
        if (req.url === '/big') {
          // More than loopback socket buffers absorb, so that a cut is seen by the sender.
          const times = 256;
          res.writeHead(200, { 'content-length': times * BODY.length });
          res.on('close', () => {
            if (!res.writableFinished) closedEarly++;
          });
          writeRepeated(res, BODY, times);
          return;
        }
        res.writeHead(200, { 'content-length': BODY.length });
        res.end(BODY);
      });
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      origin = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`;
      agent = new Agent({ connect: { onread: socketReadOptions() } });
    });
    after(async () => {
      await agent.close();
      server.close();
    });

    it('keeps what arrives before the consumer attaches, and hands it over in order', async () => {
      const reply = await dispatchRequest(agent, { origin, path: '/', method: 'GET', headers: {} });
      assert.equal(reply.statusCode, 200);
      await new Promise((resolve) => setTimeout(resolve, 100));
      const body = await reply.body.readAll(BODY.length);
      assert.ok(body);
      assert.equal(createHash('sha256').update(body).digest('hex'), createHash('sha256').update(BODY).digest('hex'));
    });

    it('gives null for a body over the limit and cuts the transfer', async () => {
      const reply = await dispatchRequest(agent, { origin, path: '/big', method: 'GET', headers: {} });
      assert.equal(await reply.body.readAll(64 * 1024), null);
      const deadline = Date.now() + 5000;
      while (closedEarly === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20));
      assert.equal(closedEarly, 1);
    });

    it('refuses a second consumer', async () => {
      const reply = await dispatchRequest(agent, { origin, path: '/', method: 'GET', headers: {} });
      const whole = reply.body.readAll(BODY.length);
      await assert.rejects(reply.body.readAll(BODY.length), /consumed twice/);
      assert.equal((await whole)?.length, BODY.length);
    });

    it('rejects at once when the signal is already aborted', async () => {
      await assert.rejects(dispatchRequest(agent, { origin, path: '/', method: 'GET', headers: {}, signal: AbortSignal.abort(new Error('client went away')) }), /client went away/);
    });
  });
});
