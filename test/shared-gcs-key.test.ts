// The GCS store's key file: the JSON key as Google issues it, or base64 of it, as an SAP BTP Object
// Store binding Secret carries it (`base64EncodedPrivateKeyData`) and the chart mounts it unchanged.
// Shown for real: the store signs its requests with the key read from either form. A key whose
// universe_domain is not googleapis.com makes the library sign a self-signed JWT per request
// instead of asking Google's token endpoint, so a loopback server sees the signature.

import assert from 'node:assert/strict';
import { createVerify, generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openGcsStore, parseGcsKey } from '../src/cache/shared/gcs.js';
import { SharedStoreError } from '../src/cache/shared/store.js';

describe('shared store: GCS key file (JSON or base64 of it)', () => {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const key = {
    type: 'service_account',
    project_id: 'images',
    private_key_id: 'k1',
    private_key: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
    client_email: 'puller@images.iam.gserviceaccount.com',
    client_id: '1',
    token_uri: 'https://oauth2.googleapis.com/token',
    universe_domain: 'storage.example.test',
  };
  const json = JSON.stringify(key, null, 2);
  const base64 = Buffer.from(json).toString('base64');
  const dir = mkdtempSync(join(tmpdir(), 'pullbridge-gcs-key-'));
  const file = (name: string, text: string) => {
    const path = join(dir, name);
    writeFileSync(path, text);
    return path;
  };
  let server: Server;
  let endpoint = '';
  const authorizations: string[] = [];

  before(async () => {
    server = createServer((req, res) => {
      authorizations.push(req.headers.authorization ?? '');
      res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":{"code":404,"message":"Not Found"}}');
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    await new Promise((resolve) => server.close(resolve));
    rmSync(dir, { recursive: true, force: true });
  });

  it('parses the JSON key, and base64 of it (one line or wrapped, with a trailing newline)', () => {
    assert.deepEqual(parseGcsKey(json), key);
    assert.deepEqual(parseGcsKey(base64), key);
    assert.deepEqual(parseGcsKey(`${base64.replace(/(.{76})/g, '$1\n')}\n`), key);
    assert.throws(() => parseGcsKey('not a key'), /neither a JSON service account key nor base64 of one/);
    assert.throws(() => parseGcsKey(Buffer.from('hello').toString('base64')), /neither a JSON service account key nor base64 of one/);
    assert.throws(() => parseGcsKey('{"type": '), /holds no valid JSON/);
    assert.throws(() => parseGcsKey('[1]'), /neither|not a key object/);
  });

  for (const [form, text] of [['JSON', json], ['base64', `${base64}\n`]] as const) {
    it(`signs its requests with the key from a ${form} key file`, async () => {
      const store = await openGcsStore({ bucket: 'images', keyFile: file(`key-${form}`, text), endpoint, prefix: '' }, 5);
      authorizations.length = 0;
      assert.equal(await store.stat('blobs/none'), undefined);
      const bearer = /^Bearer (.+)$/.exec(authorizations[0] ?? '')?.[1];
      assert.ok(bearer, `a bearer token was sent: ${JSON.stringify(authorizations)}`);
      const [header = '', payload = '', signature = ''] = bearer.split('.');
      assert.ok(createVerify('RSA-SHA256').update(`${header}.${payload}`).verify(publicKey, Buffer.from(signature, 'base64url')), 'signed with the key\'s private key');
      assert.equal((JSON.parse(Buffer.from(payload, 'base64url').toString()) as { iss?: string }).iss, key.client_email);
    });
  }

  it("answers 'denied' at open for a key file that holds no key, or is not there", async () => {
    for (const keyFile of [file('junk', 'not a key'), file('b64-junk', Buffer.from('hello').toString('base64')), join(dir, 'missing')]) {
      await assert.rejects(openGcsStore({ bucket: 'images', keyFile, endpoint, prefix: '' }, 5), (error: unknown) => {
        assert.ok(error instanceof SharedStoreError, String(error));
        assert.equal(error.failure, 'denied');
        assert.match(error.message, /GCS key file/);
        return true;
      });
    }
  });
});
