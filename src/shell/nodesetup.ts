// Node set-up for runtimes built on containers/image (CRI-O, podman): they require TLS for every
// registry not marked insecure in registries.conf, `localhost:PORT` included. A drop-in in
// registries.conf.d marks the node's pull proxy, and is removed again when the set-up stops.

import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/** The drop-in's name: early in the alphabetical order, so later drop-ins may still override it. */
export const DROP_IN_NAME = '50-pullbridge.conf';

/** registries.conf (v2) text marking `authority` (`host:port`, as rewritten references name it) plain HTTP. */
export function registriesDropIn(authority: string): string {
  return [
    '# Written by pullbridge node-setup, removed when it stops: the node-local pull proxy serves',
    '# plain HTTP on the node itself (see the pullbridge docs/exposures.md, "CRI-O and podman").',
    '[[registry]]',
    `location = ${JSON.stringify(authority)}`,
    'insecure = true',
    '',
  ].join('\n');
}

/**
 * Writes the drop-in into `dir` atomically (a runtime reading the directory never sees half of it);
 * returns its path. The temporary file has a random name and is created exclusively (`wx`: a link
 * or file planted there fails the create rather than being followed or overwritten), and is removed
 * when the write fails; the rename replaces whatever is at the drop-in's name without following it.
 */
export function installDropIn(dir: string, authority: string): string {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, DROP_IN_NAME);
  const temporary = join(dir, `.${DROP_IN_NAME}.${randomBytes(8).toString('hex')}.tmp`); // not *.conf: never loaded
  const fd = openSync(temporary, 'wx', 0o644);
  try {
    try {
      writeFileSync(fd, registriesDropIn(authority));
    } finally {
      closeSync(fd);
    }
    renameSync(temporary, path);
  } catch (error) {
    rmSync(temporary, { force: true });
    throw error;
  }
  return path;
}

export function removeDropIn(dir: string): void {
  rmSync(join(dir, DROP_IN_NAME), { force: true });
}
