// Reading the config file, and the files a config names: the only place config text comes from disk.

import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { filesReadBy, parseConfig, type Config, type ConfigError, type ConfigFile, type ConfigResult } from '../rules/config.js';
import { parsePublicKey, PrivateKeyGiven } from '../signature/cosign.js';
import { BrokerKeys, describeFileError, SecretFile } from './secretfiles.js';

export function readConfigFile(path: string): ConfigResult {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    return { ok: false, errors: [{ key: '(file)', message: `cannot read ${path}: ${describeFileError(error)}` }] };
  }
  return parseConfig(text);
}

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

/** Throws with the path (never the content) unless the file holds what the config needs from it. */
function loadFile(file: ConfigFile): void {
  switch (file.holds) {
    case 'broker-key':
      new BrokerKeys([file.path]).signingKey();
      return;
    case 'secret':
      new SecretFile(file.path).read();
      return;
    case 'ca-certificates': {
      // Node's TLS ignores what does not parse: a bad bundle would only show as failed handshakes.
      const certificates = new SecretFile(file.path).read().match(PEM_CERTIFICATE) ?? [];
      if (certificates.length === 0) throw new Error(`${file.path} holds no PEM certificate`);
      for (const pem of certificates) {
        try {
          new X509Certificate(pem);
        } catch (error) {
          throw new Error(`${file.path} holds a certificate that does not parse: ${(error as Error).message}`);
        }
      }
      return;
    }
    case 'public-key':
      try {
        // The same parse as admission's (src/signature/cosign.ts): a key type cosign cannot sign with is refused here.
        parsePublicKey(new SecretFile(file.path).read());
      } catch (error) {
        if (error instanceof PrivateKeyGiven) throw new Error(`${file.path} ${error.message}`);
        throw new Error(`${file.path} holds no usable PEM public key: ${(error as Error).message.split('\n')[0]}`);
      }
      return;
  }
}

/**
 * Every file any component reads for the config, once each: what `validate` checks, so that neither
 * the proxy nor the webhook refuses at start what validate called valid.
 */
export function filesReadByAny(config: Config): ConfigFile[] {
  const seen = new Set<string>();
  return [...filesReadBy(config, 'proxy'), ...filesReadBy(config, 'webhook')].filter((file) => !seen.has(file.key) && seen.add(file.key));
}

/** Loads every file once; an error per file that cannot be loaded, named by the key that names it. */
export function unloadableFiles(files: readonly ConfigFile[]): ConfigError[] {
  const errors: ConfigError[] = [];
  for (const file of files) {
    try {
      loadFile(file);
    } catch (error) {
      errors.push({ key: file.key, message: (error as Error).message });
    }
  }
  return errors;
}
