// Reading the config file: the only place config text comes from disk.

import { readFileSync } from 'node:fs';
import { parseConfig, type ConfigResult } from '../rules/config.js';

export function readConfigFile(path: string): ConfigResult {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    return { ok: false, errors: [{ key: '(file)', message: `cannot read ${path}: ${(error as NodeJS.ErrnoException).code ?? String(error)}` }] };
  }
  return parseConfig(text);
}
