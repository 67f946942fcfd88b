// Opens the one shared-store backend a config names.

import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { SharedConfig } from '../../rules/config.js';
import { openFilesystemStore } from './filesystem.js';
import { recordKeyOf } from './records.js';
import { SharedStoreError, type SharedStore } from './store.js';

/** The record key (cache.shared.recordKeyFile), or undefined when none is configured; a file that
 * cannot be read or holds too short a key is 'denied', as a credential file is (the tier stays down). */
export async function readRecordKey(config: SharedConfig): Promise<Uint8Array | undefined> {
  const file = config.recordKeyFile;
  if (file === undefined) return undefined;
  try {
    return recordKeyOf(file, await readFile(file, 'utf8'));
  } catch (error) {
    const message = error instanceof Error && !('code' in error) ? error.message : `cannot read cache.shared.recordKeyFile ${file}: ${String((error as NodeJS.ErrnoException).code ?? 'error')}`;
    throw new SharedStoreError('denied', message, { cause: error });
  }
}

// The cloud SDKs are loaded only by the backend in use: together they were about 40 MiB of every
// proxy's resident set, shared tier or not (npm run bench -- memory).
export async function openSharedStore(config: SharedConfig): Promise<SharedStore> {
  if (config.s3) return (await import('./s3.js')).openS3Store(config.s3, config.timeoutSeconds);
  if (config.azure) return (await import('./azure.js')).openAzureStore(config.azure, config.timeoutSeconds);
  if (config.gcs) return (await import('./gcs.js')).openGcsStore(config.gcs, config.timeoutSeconds);
  if (config.filesystem) return openFilesystemStore(config.filesystem.path);
  throw new Error('cache.shared names no backend');
}

/** The backend a config names. */
export function sharedBackend(config: SharedConfig): SharedStore['kind'] {
  if (config.s3) return 's3';
  if (config.azure) return 'azure';
  if (config.gcs) return 'gcs';
  return 'filesystem';
}

/** The files a config reads credentials and the record key from (Secret mounts), in a fixed order. */
export function sharedCredentialFiles(config: SharedConfig): string[] {
  const files = [config.s3?.accessKeyFile, config.s3?.secretKeyFile, config.azure?.accountNameFile, config.azure?.accountKeyFile, config.azure?.sasTokenFile, config.gcs?.keyFile, config.recordKeyFile];
  return files.filter((file): file is string => file !== undefined);
}

/** A digest of the files' contents (a missing file counts as such): changes when any of them does. */
export async function filesIdentity(files: readonly string[]): Promise<string> {
  const hash = createHash('sha256');
  for (const file of files) {
    const body = await readFile(file).catch(() => undefined);
    hash.update(body ? `${body.length}:` : 'missing:').update(body ?? '');
  }
  return hash.digest('hex');
}
