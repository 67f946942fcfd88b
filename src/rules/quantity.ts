// Sizes as Kubernetes quantities (`20Gi`, `500M`), as values files write cache.maxBytes and
// cache.minFreeBytes, and inode floors (cache.minFreeInodes): parsed where the config is validated.

const BINARY_SUFFIXES: Readonly<Record<string, number>> = { Ki: 2 ** 10, Mi: 2 ** 20, Gi: 2 ** 30, Ti: 2 ** 40, Pi: 2 ** 50, Ei: 2 ** 60 };
const DECIMAL_SUFFIXES: Readonly<Record<string, number>> = { k: 1e3, M: 1e6, G: 1e9, T: 1e12, P: 1e15, E: 1e18 };

const BYTE_QUANTITY = /^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$/;
const INODE_PERCENT = /^(\d+(?:\.\d+)?)%$/;

/** The string forms as JSON Schema patterns (values.schema.json), surrounding spaces allowed as trim() does. */
export const BYTE_QUANTITY_PATTERN = `^\\s*${BYTE_QUANTITY.source.slice(1, -1)}\\s*$`;
export const INODE_PERCENT_PATTERN = `^\\s*${INODE_PERCENT.source.slice(1, -1)}\\s*$`;

/**
 * Bytes from an integer or a Kubernetes quantity (`20Gi`, `500M`, `1.5Gi`), as `maxBytes` is
 * written in values files; null when it is neither, or not a whole, safe, non-negative number.
 */
export function parseByteQuantity(value: number | string): number | null {
  if (typeof value === 'number') return Number.isSafeInteger(value) && value >= 0 ? value : null;
  const match = BYTE_QUANTITY.exec(value.trim());
  if (!match) return null;
  const unit = match[2] ? (BINARY_SUFFIXES[match[2]] ?? DECIMAL_SUFFIXES[match[2]] ?? 1) : 1;
  const bytes = Math.floor(Number(match[1]) * unit);
  return Number.isSafeInteger(bytes) ? bytes : null;
}

/**
 * cache.minFreeInodes as written: a whole number of inodes, or a percentage of the filesystem's
 * (`10%`); null when it is neither.
 */
export function parseInodeFloor(value: number | string): { readonly inodes: number } | { readonly percent: number } | null {
  if (typeof value === 'number') return Number.isSafeInteger(value) && value >= 0 ? { inodes: value } : null;
  const match = INODE_PERCENT.exec(value.trim());
  if (!match) return null;
  const percent = Number(match[1]);
  return percent <= 100 ? { percent } : null;
}

/** Bytes for people: `512 B`, `1.5 GiB` (binary units, as the quantities above). */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}
