// Broker keys from files: the first signs and must be good; a verify-only key that is present but
// unusable is skipped and reported, so that it cannot stop every pull and every admission.

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BrokerKeys, type SkippedBrokerKey } from '../src/shell/secretfiles.js';

describe('broker keys', () => {
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-keys-'));
  const file = (name: string, text: string) => {
    const path = join(dir, name);
    writeFileSync(path, text);
    return path;
  };
  const signing = file('key-0', 'the-signing-key-of-32-characters\n');
  const previous = file('key-1', 'the-previous-key-still-verifying\n');

  it('verifies with every key, signing key first', () => {
    const keys = new BrokerKeys([signing, previous]);
    assert.deepEqual(keys.keys().map((k) => Buffer.from(k).toString()), ['the-signing-key-of-32-characters', 'the-previous-key-still-verifying']);
    assert.equal(Buffer.from(keys.signingKey()).toString(), 'the-signing-key-of-32-characters');
  });

  it('skips an empty, short or unreadable verify-only key and reports which, never its content', () => {
    const empty = file('empty', '');
    const short = file('short', 'tooshort');
    const directory = join(dir, 'a-directory');
    mkdirSync(directory);
    const reports: Array<readonly SkippedBrokerKey[]> = [];
    const keys = new BrokerKeys([signing, empty, short, directory, join(dir, 'absent')], (skipped) => reports.push(skipped));
    assert.deepEqual(keys.keys().map((k) => Buffer.from(k).toString()), ['the-signing-key-of-32-characters']);
    assert.equal(Buffer.from(keys.signingKey()).toString(), 'the-signing-key-of-32-characters');
    const last = reports.at(-1) ?? [];
    // An absent file is a normal state (no rotation in progress), not a problem.
    assert.deepEqual(last.map((s) => s.path), [empty, short, directory]);
    assert.match(last[0]?.reason ?? '', /is empty/);
    assert.match(last[1]?.reason ?? '', /shorter than 16 bytes/);
    assert.match(last[2]?.reason ?? '', /: is a directory$/);
    assert.ok(!JSON.stringify(reports).includes('tooshort'), 'the report never carries key material');
  });

  it('fails when the signing key is bad, whatever the other keys', () => {
    for (const bad of [file('bad-empty', ''), file('bad-short', 'tooshort'), join(dir, 'bad-absent')]) {
      const keys = new BrokerKeys([bad, previous]);
      assert.throws(() => keys.keys(), new RegExp(bad));
      assert.throws(() => keys.signingKey(), new RegExp(bad));
    }
  });

  it('signs without reading the verify-only keys at all', () => {
    const reports: Array<readonly SkippedBrokerKey[]> = [];
    const keys = new BrokerKeys([signing, file('empty-too', '')], (skipped) => reports.push(skipped));
    assert.equal(Buffer.from(keys.signingKey()).toString(), 'the-signing-key-of-32-characters');
    assert.deepEqual(reports, []);
  });
});
