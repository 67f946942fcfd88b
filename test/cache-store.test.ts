// The node store on a real filesystem: only digest-verified blobs become visible, a crash or a cut
// leaves nothing servable, readers hold blobs against removal, links and tags per rule/repository.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sharedKeys } from '../src/cache/shared/tier.js';
import { NodeStore, type DiskReservation } from '../src/cache/store.js';
import type { BodySink } from '../src/upstream/body.js';
import { once } from '../src/once.js';

const digestOf = (data: Buffer) => `sha256:${createHash('sha256').update(data).digest('hex')}`;

/**
 * A scripted upstream body whose chunks are views into buffers it overwrites as soon as nothing
 * holds them, as the proxy's pooled socket reads do (a registry cannot be made to pace a body on
 * demand, nor to show what a reader kept past its hold).
 */
function reusingBody() {
  const pool: Array<{ bytes: Buffer; holds: number }> = [];
  let sink: BodySink | undefined;
  return {
    attach: (s: BodySink) => void (sink = s),
    resume: () => undefined,
    destroy: () => undefined,
    hold(view: Buffer) {
      const buffer = pool.find((p) => p.bytes.buffer === view.buffer);
      if (!buffer) return () => undefined;
      buffer.holds++;
      return once(() => buffer.holds--);
    },
    send(chunk: Buffer): boolean {
      let buffer = pool.find((p) => p.holds === 0);
      if (!buffer) pool.push((buffer = { bytes: Buffer.allocUnsafeSlow(65_536), holds: 0 }));
      buffer.bytes.fill(0xee);
      chunk.copy(buffer.bytes);
      return sink!.data(buffer.bytes.subarray(0, chunk.length));
    },
    end: () => sink!.end(),
    /** Holds on its buffers not released yet. */
    held: () => pool.reduce((sum, p) => sum + p.holds, 0),
  };
}

describe('node store', () => {
  let root: string;
  beforeEach(() => {
    root = mkdtempSync(join(tmpdir(), 'pullbridge-store-'));
  });

  it('stores a blob only when it hashes to its digest, and finds it again after a restart', async () => {
    const data = randomBytes(300_000);
    const store = await NodeStore.open(root);
    const fill = await store.startFill(digestOf(data));
    for (let i = 0; i < data.length; i += 65_536) await fill.append(data.subarray(i, i + 65_536));
    assert.equal(store.has(digestOf(data)), false, 'not visible while filling');
    assert.deepEqual(await fill.finish(), { stored: true });
    const lease = store.lease(digestOf(data));
    assert.ok(lease);
    assert.ok(readFileSync(lease.path).equals(data));
    lease.release();
    const reopened = await NodeStore.open(root);
    assert.deepEqual(reopened.usage(), { bytes: data.length, blobs: 1 });
    assert.equal(reopened.lease(digestOf(data))?.size, data.length);
  });

  it('discards a blob that does not match its digest: nothing stored, nothing left on disk', async () => {
    const store = await NodeStore.open(root);
    const fill = await store.startFill(digestOf(Buffer.from('expected')));
    await fill.append(Buffer.from('something else'));
    const outcome = await fill.finish();
    assert.equal(outcome.stored, false);
    assert.match(outcome.stored ? '' : outcome.reason, /content hashes to sha256:/);
    assert.equal(store.has(digestOf(Buffer.from('expected'))), false);
    assert.deepEqual(readdirSync(join(root, 'tmp')), []);
    assert.deepEqual(readdirSync(join(root, 'blobs')), []);
  });

  it('hashes fills written at once apart: large fills stored, a wrong one refused', async () => {
    const store = await NodeStore.open(root);
    const good = randomBytes(5 * 1024 * 1024 + 17);
    const other = randomBytes(3 * 1024 * 1024);
    const fills = await Promise.all([store.startFill(digestOf(good)), store.startFill(digestOf(other)), store.startFill(digestOf(Buffer.from('expected')))]);
    // Interleaved appends, as concurrent fills do.
    for (let i = 0; i < good.length; i += 131_072) {
      await fills[0]!.append(good.subarray(i, i + 131_072));
      if (i < other.length) await fills[1]!.append(other.subarray(i, i + 131_072));
    }
    await fills[2]!.append(randomBytes(2 * 1024 * 1024));
    const verified: string[] = [];
    fills[0]!.once('verified', () => verified.push('good'));
    const outcomes = await Promise.all(fills.map((f) => f.finish()));
    assert.deepEqual(outcomes.slice(0, 2), [{ stored: true }, { stored: true }]);
    assert.equal(outcomes[2]?.stored, false);
    assert.match(outcomes[2]?.stored === false ? outcomes[2].reason : '', /content hashes to sha256:/);
    assert.deepEqual(verified, ['good']);
    assert.ok(readFileSync(store.blobPathOf(digestOf(good))).equals(good));
    assert.deepEqual(readdirSync(join(root, 'tmp')), []);
  });

  it('leaves nothing servable after a cut or a crash mid-fill; the next open removes the partial file', async () => {
    const data = randomBytes(100_000);
    const store = await NodeStore.open(root);
    const cut = await store.startFill(digestOf(data));
    await cut.append(data.subarray(0, 50_000));
    await cut.abort('upstream went away');
    assert.deepEqual(readdirSync(join(root, 'tmp')), []);
    // A crash: the process dies with a fill open.
    const crashed = await store.startFill(digestOf(data));
    await crashed.append(data.subarray(0, 50_000));
    assert.equal(readdirSync(join(root, 'tmp')).length, 1);
    const reopened = await NodeStore.open(root);
    assert.equal(reopened.has(digestOf(data)), false);
    assert.deepEqual(readdirSync(join(root, 'tmp')), []);
    await crashed.close();
  });

  it('opened beside a running proxy (removePartialFills: false), leaves its fills in progress alone, and they still complete', async () => {
    const data = randomBytes(100_000);
    const proxy = await NodeStore.open(root);
    const fill = await proxy.startFill(digestOf(data));
    await fill.append(data.subarray(0, 50_000));
    const warm = await NodeStore.open(root, Date.now, { removePartialFills: false });
    assert.equal(readdirSync(join(root, 'tmp')).length, 1);
    await fill.append(data.subarray(50_000));
    assert.deepEqual(await fill.finish(), { stored: true });
    assert.equal(await warm.lookup(digestOf(data)), true, 'the other process finds it on disk');
  });

  it('lets readers follow a fill as it grows, through one descriptor that survives the rename', async () => {
    const data = randomBytes(200_000);
    const store = await NodeStore.open(root);
    const fill = await store.startFill(digestOf(data));
    const reader = await open(fill.path, 'r');
    const progress: number[] = [];
    fill.on('progress', (n: number) => progress.push(n));
    await fill.append(data.subarray(0, 120_000));
    const early = Buffer.alloc(120_000);
    await reader.read(early, 0, early.length, 0);
    assert.ok(early.equals(data.subarray(0, 120_000)));
    await fill.append(data.subarray(120_000));
    assert.deepEqual(await fill.finish(), { stored: true });
    const rest = Buffer.alloc(80_000);
    await reader.read(rest, 0, rest.length, 120_000);
    assert.ok(rest.equals(data.subarray(120_000)));
    await reader.close();
    assert.deepEqual(progress, [120_000, 200_000]);
  });

  it('never removes a blob while a reader holds it', async () => {
    const data = Buffer.from('layer');
    const store = await NodeStore.open(root);
    const fill = await store.startFill(digestOf(data));
    await fill.append(data);
    await fill.finish();
    const lease = store.lease(digestOf(data));
    assert.equal(store.blobs()[0]?.readers, 1);
    assert.equal(await store.remove(digestOf(data)), false);
    lease?.release();
    lease?.release(); // idempotent
    assert.equal(store.blobs()[0]?.readers, 0);
    assert.equal(await store.remove(digestOf(data)), true);
    assert.equal(store.has(digestOf(data)), false);
    assert.equal(existsSync(join(root, 'blobs', 'sha256', digestOf(data).slice(7))), false);
  });

  it('keeps links per rule and repository, counted only for content from the rule\'s upstream; a removed blob is linked nowhere', async () => {
    const data = Buffer.from('config');
    const digest = digestOf(data);
    const [origin, elsewhere] = ['a', 'b'].map((c) => c.repeat(64)) as [string, string];
    const store = await NodeStore.open(root);
    const fill = await store.startFill(digest);
    await fill.append(data);
    await fill.finish();
    assert.equal(await store.linked('corp', 'team/app', digest, origin), false);
    await store.link('corp', 'team/app', digest);
    assert.equal(await store.linked('corp', 'team/app', digest, origin), false, 'no upstream recorded for the bytes');
    await store.addOrigin(digest, origin);
    assert.equal(await store.linked('corp', 'team/app', digest, origin), true);
    assert.equal(await store.linked('corp', 'team/app', digest, elsewhere), false, 'the rule pointed at another upstream');
    assert.equal(await store.storedFrom(digest, elsewhere), false);
    assert.equal(await store.linked('corp', 'team/other', digest, origin), false, 'another repository');
    assert.equal(await store.linked('hub', 'team/app', digest, origin), false, 'another rule');
    await store.remove(digest);
    assert.equal(await store.linked('corp', 'team/app', digest, origin), false);
    assert.equal(await store.storedFrom(digest, origin), false);
  });

  it('keeps what each tag pointed at; a damaged record reads as none', async () => {
    const store = await NodeStore.open(root);
    const record = { digest: `sha256:${'b'.repeat(64)}`, mediaType: 'application/vnd.oci.image.index.v1+json', size: 321, confirmedAt: 42 };
    assert.equal(await store.readTag('corp', 'team/app', '1.0'), undefined);
    await store.writeTag('corp', 'team/app', '1.0', record);
    assert.deepEqual(await store.readTag('corp', 'team/app', '1.0'), record);
    writeFileSync(join(root, 'repositories', 'corp', 'team', 'app', '_tags', '1.0'), '{"digest": 1');
    assert.equal(await store.readTag('corp', 'team/app', '1.0'), undefined);
  });

  it('refuses every digest, rule, repository and tag that is not one by the grammar, as the keys of the shared tier do, and touches nothing outside its root', async () => {
    // A file beside the store that a made-up digest would reach (`<root>/blobs/sha256/../../../victimdir`).
    const top = mkdtempSync(join(tmpdir(), 'pullbridge-store-keys-'));
    mkdirSync(join(top, 'victimdir'));
    const victim = join(top, 'victimdir', 'victim.txt');
    writeFileSync(victim, 'not the cache\n');
    const store = await NodeStore.open(join(top, 'cache'));
    const refused = { name: 'CacheKeyError', message: /^cache key refused: / };
    const good = `sha256:${'a'.repeat(64)}`;
    const record = { digest: good, mediaType: '', size: 1, confirmedAt: 1 };
    const badDigests = ['sha256:../../../victimdir/victim.txt', `sha256:${'A'.repeat(64)}`, `sha256:${'a'.repeat(63)}`, `sha256:${'a'.repeat(65)}`, `md5:${'a'.repeat(32)}`, `sha256:${'a'.repeat(64)}/../../x`, 'sha256', ''];
    for (const bad of badDigests) {
      assert.throws(() => store.blobPathOf(bad), refused, bad);
      await assert.rejects(store.lookup(bad), refused, bad);
      await assert.rejects(store.startFill(bad), refused, bad);
      await assert.rejects(store.remove(bad), refused, bad);
      await assert.rejects(store.link('corp', 'team/app', bad), refused, bad);
      await assert.rejects(store.readLink('corp', 'team/app', bad, 'a'.repeat(64)), refused, bad);
      await assert.rejects(store.writeTag('corp', 'team/app', 'v1', { ...record, digest: bad }), refused, bad);
      for (const key of [() => sharedKeys.blob(bad), () => sharedKeys.claim(bad), () => sharedKeys.link('corp', 'team/app', bad)]) assert.throws(key, refused, bad);
    }
    for (const [rule, repository] of [['..', 'team/app'], ['corp/x', 'team/app'], ['', 'team/app'], ['corp', '../../../victimdir'], ['corp', 'team/../../../victimdir'], ['corp', 'team//app'], ['corp', '']] as const) {
      const what = `${rule} ${repository}`;
      await assert.rejects(store.link(rule, repository, good), refused, what);
      await assert.rejects(store.readTag(rule, repository, 'v1'), refused, what);
      await assert.rejects(store.writeTag(rule, repository, 'v1', record), refused, what);
      assert.throws(() => sharedKeys.link(rule, repository, good), refused, what);
      assert.throws(() => sharedKeys.tag(rule, repository, 'v1'), refused, what);
    }
    for (const tag of ['..', '../../../../victimdir/victim.txt', '.hidden', '']) {
      await assert.rejects(store.readTag('corp', 'team/app', tag), refused, tag);
      await assert.rejects(store.writeTag('corp', 'team/app', tag, record), refused, tag);
      assert.throws(() => sharedKeys.tag('corp', 'team/app', tag), refused, tag);
    }
    assert.equal(readFileSync(victim, 'utf8'), 'not the cache\n');
    assert.deepEqual(readdirSync(top).sort(), ['cache', 'victimdir']);
    assert.deepEqual(readdirSync(join(top, 'victimdir')), ['victim.txt']);
    assert.deepEqual(store.usage(), { bytes: 0, blobs: 0 });
  });

  it('indexes on open only files named as blobs are (a digest by the grammar), ignoring anything else in blobs/', async () => {
    const data = Buffer.from('a real blob');
    const hex = digestOf(data).slice('sha256:'.length);
    mkdirSync(join(root, 'blobs', 'sha256'), { recursive: true });
    mkdirSync(join(root, 'blobs', 'md5'), { recursive: true });
    writeFileSync(join(root, 'blobs', 'sha256', hex), data);
    writeFileSync(join(root, 'blobs', 'sha256', hex.toUpperCase()), 'upper case');
    writeFileSync(join(root, 'blobs', 'sha256', hex.slice(1)), 'too short');
    writeFileSync(join(root, 'blobs', 'sha256', 'victim.txt'), 'not hex');
    writeFileSync(join(root, 'blobs', 'md5', 'a'.repeat(32)), 'unknown algorithm');
    writeFileSync(join(root, 'blobs', 'stray'), 'a file where an algorithm directory goes');
    mkdirSync(join(root, 'blobs', 'sha256', 'b'.repeat(64)));
    const store = await NodeStore.open(root);
    assert.deepEqual(store.blobs().map((b) => [b.digest, b.size]), [[digestOf(data), data.length]]);
  });
});

describe('a fill in flight (BlobFlight)', () => {
  it('stores and serves a blob whose upstream delivers its last chunks and its end at once when resumed', async () => {
    // A scripted body: undici may hand over queued data and the end inside resume(), which the
    // real registry cannot be made to do on demand. It was finishing the fill under a write.
    const { BlobFlight } = await import('../src/cache/flight.js');
    const root = mkdtempSync(join(tmpdir(), 'pullbridge-flight-'));
    const store = await NodeStore.open(root);
    // 18 chunks until the write queue (1 MiB) pauses the body, then one more and the end on resume.
    const data = randomBytes(19 * 65_536 - 100);
    const chunks = Array.from({ length: Math.ceil(data.length / 65_536) }, (_, i) => data.subarray(i * 65_536, (i + 1) * 65_536));
    let sink: { data(c: Buffer): boolean; end(): void; error(e: Error): void } | undefined;
    let next = 0;
    const flow = () => {
      while (sink && next < chunks.length) if (!sink.data(chunks[next++]!)) return;
      if (next === chunks.length) sink?.end();
    };
    const body = { attach: (s: typeof sink) => { sink = s; flow(); }, resume: flow, destroy: () => undefined, hold: () => () => undefined };
    const flight = new BlobFlight(digestOf(data), { rule: 'r', repository: 'a' }, new AbortController(), store);
    const reading = flight.reader();
    flight.start(await store.startFill(digestOf(data)), body, { 'content-length': String(data.length) });
    const reader = await reading;
    const received: Buffer[] = [];
    await new Promise<void>((resolve, reject) => reader.attach({ data: (c) => (received.push(Buffer.from(c)), true), end: resolve, error: reject }));
    assert.ok(Buffer.concat(received).equals(data));
    assert.deepEqual(await flight.done, { stored: true });
    assert.ok(readFileSync(store.blobPathOf(digestOf(data))).equals(data));
  });
  it('gives a reader that caught up each chunk as it arrives, before it is in the file, held through the upstream; the last byte only once verified', async () => {
    // A scripted body, to push chunks one at a time and look between them (a registry cannot be
    // paused mid-body on demand).
    const { BlobFlight } = await import('../src/cache/flight.js');
    const root = mkdtempSync(join(tmpdir(), 'pullbridge-flight-'));
    const store = await NodeStore.open(root);
    const run = async (data: Buffer, digest: string) => {
      const chunks = Array.from({ length: Math.ceil(data.length / 65_536) }, (_, i) => data.subarray(i * 65_536, (i + 1) * 65_536));
      let sink: { data(c: Buffer): boolean; end(): void; error(e: Error): void } | undefined;
      let holds = 0;
      const body = { attach: (s: typeof sink) => void (sink = s), resume: () => undefined, destroy: () => undefined, hold: () => (holds++, () => undefined) };
      const flight = new BlobFlight(digest, { rule: 'r', repository: 'a' }, new AbortController(), store);
      const reading = flight.reader();
      const fill = await store.startFill(digest);
      flight.start(fill, body, { 'content-length': String(data.length) });
      const reader = await reading;
      const received: Buffer[] = [];
      let got = 0;
      let heldByReader = 0;
      const outcome = new Promise<Error | undefined>((resolve) =>
        reader.attach({
          data: (c) => {
            received.push(Buffer.from(c));
            got += c.length;
            const release = reader.hold(c); // as a client write does
            heldByReader++;
            release();
            return true;
          },
          end: () => resolve(undefined),
          error: resolve,
        }),
      );
      // Each chunk of 64 KiB reaches the reader in the call that delivers it: from memory, not read
      // back. The last, short one (123 bytes) waits for the file, as small chunks do.
      const full = chunks.length - 1;
      for (const [i, chunk] of chunks.slice(0, full).entries()) {
        const before = got;
        sink!.data(chunk);
        assert.equal(got - before, chunk.length, `chunk ${i}: delivered at once`);
      }
      assert.ok(fill.written < full * 65_536, 'the reader was ahead of the file');
      assert.equal(holds - full, heldByReader, 'every chunk the reader had was held through the upstream body');
      sink!.data(chunks[full]!);
      assert.equal(got, full * 65_536, 'the short last chunk is not delivered from memory');
      await new Promise((resolve) => setTimeout(resolve, 200)); // its write lands
      assert.equal(got, data.length - 1, 'all but the last byte before the end');
      sink!.end();
      return { error: await outcome, received: Buffer.concat(received), done: await flight.done };
    };
    const data = randomBytes(5 * 65_536 + 123);
    const good = await run(data, digestOf(data));
    assert.equal(good.error, undefined);
    assert.ok(good.received.equals(data));
    assert.deepEqual(good.done, { stored: true });
    // The same bytes announced under another digest: the reader never gets the last byte.
    const other = randomBytes(data.length);
    const bad = await run(data, digestOf(other));
    assert.match(bad.error?.message ?? '', /hashes to/);
    assert.equal(bad.received.length, data.length - 1);
    assert.equal(bad.done.stored, false);
  });
  it('keeps a view a caught-up reader took from memory intact until the client released it, however the upstream reuses its buffers', async () => {
    const { BlobFlight } = await import('../src/cache/flight.js');
    const store = await NodeStore.open(mkdtempSync(join(tmpdir(), 'pullbridge-flight-')));
    const data = randomBytes(40 * 65_536 + 77);
    const body = reusingBody();
    const flight = new BlobFlight(digestOf(data), { rule: 'r', repository: 'a' }, new AbortController(), store);
    const reading = flight.reader();
    flight.start(await store.startFill(digestOf(data)), body, { 'content-length': String(data.length) });
    const reader = await reading;
    const parts: Array<Promise<Buffer>> = [];
    const ended = new Promise<Error | undefined>((resolve) =>
      reader.attach({
        data(chunk) {
          // A client write that completes only once the fill is done: the view must survive until then.
          const release = reader.hold(chunk);
          parts.push(
            flight.done.then(() => {
              const copy = Buffer.from(chunk);
              release();
              return copy;
            }),
          );
          return true;
        },
        end: () => resolve(undefined),
        error: resolve,
      }),
    );
    for (let i = 0; i < data.length; i += 65_536) {
      body.send(data.subarray(i, i + 65_536));
      if (i % 262_144 === 0) await new Promise((resolve) => setImmediate(resolve));
    }
    body.end();
    assert.equal(await ended, undefined);
    assert.ok(Buffer.concat(await Promise.all(parts)).equals(data));
  });

  it('hands a reader that was ahead of the file over to the relayed tail when the disk has no room, without losing a byte', async () => {
    const { BlobFlight } = await import('../src/cache/flight.js');
    const store = await NodeStore.open(mkdtempSync(join(tmpdir(), 'pullbridge-flight-')));
    const data = randomBytes(12 * 65_536 + 5);
    const body = reusingBody();
    // Room for the first chunk only: the fill turns into a relay while the reader has more from memory.
    const room: DiskReservation = { bytes: 65_536, wrote: () => undefined, grow: () => Promise.resolve(false), release: () => undefined };
    const flight = new BlobFlight(digestOf(data), { rule: 'r', repository: 'a' }, new AbortController(), store);
    const reading = flight.reader();
    flight.start(await store.startFill(digestOf(data)), body, { 'content-length': String(data.length) }, room);
    const reader = await reading;
    const received: Buffer[] = [];
    const ended = new Promise<Error | undefined>((resolve) =>
      reader.attach({ data: (chunk) => (received.push(Buffer.from(chunk)), true), end: () => resolve(undefined), error: resolve }),
    );
    for (let i = 0; i < data.length; i += 65_536) body.send(data.subarray(i, i + 65_536));
    body.end();
    assert.equal(await ended, undefined);
    assert.equal(flight.relaying, true);
    assert.ok(Buffer.concat(received).equals(data));
  });

  it('fails a fill whose upstream sends more or fewer bytes than its Content-Length, the reader never getting the length announced', async () => {
    const { BlobFlight } = await import('../src/cache/flight.js');
    const store = await NodeStore.open(mkdtempSync(join(tmpdir(), 'pullbridge-flight-')));
    const run = async (sent: Buffer, announced: number, digest: string) => {
      const body = reusingBody();
      const flight = new BlobFlight(digest, { rule: 'r', repository: 'a' }, new AbortController(), store);
      const reading = flight.reader();
      flight.start(await store.startFill(digest), body, { 'content-length': String(announced) });
      const reader = await reading;
      let got = 0;
      const ended = new Promise<Error | undefined>((resolve) => reader.attach({ data: (chunk) => ((got += chunk.length), true), end: () => resolve(undefined), error: resolve }));
      for (let i = 0; i < sent.length; i += 65_536) body.send(sent.subarray(i, i + 65_536));
      body.end();
      return { error: await ended, got, done: await flight.done };
    };
    const data = randomBytes(3 * 65_536);
    // Longer than announced, the announced length hashing right: refused at the first byte too many.
    const longer = await run(Buffer.concat([data, randomBytes(10)]), data.length, digestOf(data));
    assert.match(longer.error?.message ?? '', /more than its Content-Length/);
    assert.ok(longer.got < data.length, `got ${longer.got} bytes`);
    assert.equal(longer.done.stored, false);
    // Shorter than announced, what came hashing right: not a complete blob either.
    const shorter = await run(data, data.length + 10, digestOf(data));
    assert.match(shorter.error?.message ?? '', /ended at 196608 of its Content-Length of 196618/);
    assert.ok(shorter.got < data.length + 10);
    assert.equal(shorter.done.stored, false);
  });

  it('lets go of every chunk still waiting for the disk when a write fails (a full disk): the upstream\'s buffers are not held for good', async () => {
    const { BlobFlight } = await import('../src/cache/flight.js');
    const store = await NodeStore.open(mkdtempSync(join(tmpdir(), 'pullbridge-flight-')));
    const data = randomBytes(10 * 65_536);
    const body = reusingBody();
    const flight = new BlobFlight(digestOf(data), { rule: 'r', repository: 'a' }, new AbortController(), store);
    const reading = flight.reader();
    const fill = await store.startFill(digestOf(data));
    // The second write fails as a full disk does, while the chunks after it wait for it.
    const appendv = fill.appendv.bind(fill);
    let writes = 0;
    fill.appendv = async (chunks) => {
      if (++writes === 1) return appendv(chunks);
      await new Promise((resolve) => setTimeout(resolve, 20));
      throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
    };
    flight.start(fill, body, { 'content-length': String(data.length) });
    const reader = await reading;
    const ended = new Promise<Error | undefined>((resolve) => reader.attach({ data: () => true, end: () => resolve(undefined), error: resolve }));
    body.send(data.subarray(0, 65_536));
    await new Promise((resolve) => setTimeout(resolve, 20)); // the first write lands
    for (let i = 65_536; i < data.length; i += 65_536) body.send(data.subarray(i, i + 65_536));
    assert.match((await ended)?.message ?? '', /ENOSPC/);
    assert.equal((await flight.done).stored, false);
    assert.equal(body.held(), 0, 'buffers of the upstream still held after the fill failed');
  });

  it('takes no hold on a chunk from memory for a client whose connection is already gone (Node drops that write and never calls back)', async () => {
    const { BlobFlight } = await import('../src/cache/flight.js');
    const { streamBody } = await import('../src/proxy/stream.js');
    const { createServer, get } = await import('node:http');
    const store = await NodeStore.open(mkdtempSync(join(tmpdir(), 'pullbridge-flight-')));
    const data = randomBytes(8 * 65_536);
    const body = reusingBody();
    const flight = new BlobFlight(digestOf(data), { rule: 'r', repository: 'a' }, new AbortController(), store);
    const reading = flight.reader();
    flight.start(await store.startFill(digestOf(data)), body, { 'content-length': String(data.length) });
    const reader = await reading;
    let response: import('node:http').ServerResponse | undefined;
    let streamed: Promise<Error | undefined> | undefined;
    const server = createServer((_req, res) => {
      response = res;
      res.writeHead(200, { 'content-length': String(data.length) });
      res.flushHeaders();
      streamed = streamBody(reader, res, { onBytes: () => undefined });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      let got = 0;
      await new Promise<void>((resolve) => {
        get({ host: '127.0.0.1', port: (server.address() as import('node:net').AddressInfo).port, path: '/' }, (res) => {
          res.on('data', (chunk: Buffer) => (got += chunk.length));
          res.on('error', () => undefined);
          res.on('close', () => undefined);
          resolve();
        }).on('error', () => undefined);
      });
      body.send(data.subarray(0, 65_536));
      while (got < 65_536) await new Promise((resolve) => setTimeout(resolve, 5));
      await new Promise((resolve) => setTimeout(resolve, 50)); // drained: the reader takes the next chunk at once
      // The client's connection breaks (a reset) and, before its 'close' is emitted, the next chunk comes.
      response!.socket!.destroy();
      body.send(data.subarray(65_536, 2 * 65_536));
      assert.match((await streamed)?.message ?? '', /client went away/);
      assert.equal((await flight.done).stored, false);
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.equal(body.held(), 0, 'a buffer of the upstream held for good by a write Node dropped');
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });

  it('pauses an upstream that sends a body in tiny chunks while the disk is slow, before a million of them wait (held) for the write', async () => {
    // A chunked body of 1-byte chunks: each is its own view, hold and queue entry, and the queue's
    // bound in bytes (1 MiB) allowed a million of them (hundreds of MB) per fill.
    const { BlobFlight } = await import('../src/cache/flight.js');
    const store = await NodeStore.open(mkdtempSync(join(tmpdir(), 'pullbridge-flight-')));
    const data = randomBytes(1_100_000);
    let sink: BodySink | undefined;
    let holds = 0;
    const body = { attach: (s: BodySink) => void (sink = s), resume: () => undefined, destroy: () => undefined, hold: () => (holds++, () => void holds--) };
    const flight = new BlobFlight(digestOf(data), { rule: 'r', repository: 'a' }, new AbortController(), store);
    const reading = flight.reader();
    const fill = await store.startFill(digestOf(data));
    const appendv = fill.appendv.bind(fill);
    fill.appendv = async (chunks) => {
      await new Promise((resolve) => setTimeout(resolve, 100)); // a slow disk
      return appendv(chunks);
    };
    flight.start(fill, body, { 'content-length': String(data.length) });
    const reader = await reading;
    const ended = new Promise<Error | undefined>((resolve) => reader.attach({ data: () => true, end: () => resolve(undefined), error: resolve }));
    let sent = 0;
    while (sent < data.length && sink!.data(data.subarray(sent, sent + 1))) sent++;
    const held = holds;
    reader.destroy(new Error('done looking'));
    assert.ok(await ended);
    assert.ok(held <= 4096, `${held} chunks of one byte held for the disk before the upstream was paused`);
  });
});
