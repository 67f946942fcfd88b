// Opens the one shared-store backend a config names.

import type { SharedConfig } from '../../rules/config.js';
import { openAzureStore } from './azure.js';
import { openFilesystemStore } from './filesystem.js';
import { openGcsStore } from './gcs.js';
import { openS3Store } from './s3.js';
import type { SharedStore } from './store.js';

export async function openSharedStore(config: SharedConfig): Promise<SharedStore> {
  if (config.s3) return openS3Store(config.s3, config.timeoutSeconds);
  if (config.azure) return openAzureStore(config.azure, config.timeoutSeconds);
  if (config.gcs) return openGcsStore(config.gcs, config.timeoutSeconds);
  if (config.filesystem) return openFilesystemStore(config.filesystem.path);
  throw new Error('cache.shared names no backend');
}
