// The sample registry's one image, demo/hello:1.0, built from constants: a layer tar holding one
// small file, its config and its OCI manifest. Pure and deterministic (fixed times, owners and
// modes, an uncompressed layer), so its digests are the same on every machine and every start.

import { createHash } from 'node:crypto';

export const SAMPLE_REPOSITORY = 'demo/hello';
export const SAMPLE_TAG = '1.0';

export interface SampleBlob {
  readonly digest: string;
  readonly mediaType: string;
  readonly bytes: Buffer;
}

export interface SampleImage {
  readonly repository: string;
  readonly tag: string;
  readonly manifest: SampleBlob;
  readonly config: SampleBlob;
  readonly layer: SampleBlob;
}

const sha256 = (bytes: Buffer): string => `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
const blob = (mediaType: string, bytes: Buffer): SampleBlob => ({ digest: sha256(bytes), mediaType, bytes });

/** A fixed time for every timestamp in the image (tar mtime, config `created`). */
const EPOCH_SECONDS = 1_767_225_600; // 2026-01-01T00:00:00Z

/** One ustar header field: octal, zero-padded, NUL-terminated. */
function octal(value: number, width: number): string {
  return `${value.toString(8).padStart(width - 1, '0')}\0`;
}

/** A ustar archive of regular files (mode 0644, owner 0:0, fixed mtime), then the two zero blocks. */
export function tarOf(files: ReadonlyArray<{ readonly name: string; readonly content: Buffer }>): Buffer {
  const blocks: Buffer[] = [];
  for (const file of files) {
    const header = Buffer.alloc(512);
    header.write(file.name, 0, 100, 'utf8');
    header.write(octal(0o644, 8), 100, 'ascii');
    header.write(octal(0, 8), 108, 'ascii');
    header.write(octal(0, 8), 116, 'ascii');
    header.write(octal(file.content.length, 12), 124, 'ascii');
    header.write(octal(EPOCH_SECONDS, 12), 136, 'ascii');
    header.write('        ', 148, 'ascii'); // the checksum counts its own field as spaces
    header.write('0', 156, 'ascii');
    header.write('ustar\0', 257, 'ascii');
    header.write('00', 263, 'ascii');
    header.write('root', 265, 'ascii');
    header.write('root', 297, 'ascii');
    let sum = 0;
    for (const byte of header) sum += byte;
    header.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'ascii');
    blocks.push(header, file.content, Buffer.alloc((512 - (file.content.length % 512)) % 512));
  }
  blocks.push(Buffer.alloc(1024));
  return Buffer.concat(blocks);
}

export const SAMPLE_FILE_TEXT = 'Hello from the pullbridge sample registry.\n';

export function buildSampleImage(): SampleImage {
  const layer = blob('application/vnd.oci.image.layer.v1.tar', tarOf([{ name: 'hello.txt', content: Buffer.from(SAMPLE_FILE_TEXT) }]));
  const created = new Date(EPOCH_SECONDS * 1000).toISOString();
  const config = blob(
    'application/vnd.oci.image.config.v1+json',
    Buffer.from(
      JSON.stringify({
        created,
        architecture: 'amd64',
        os: 'linux',
        config: { Cmd: ['/hello.txt'], Labels: { 'org.opencontainers.image.title': 'pullbridge sample image' } },
        rootfs: { type: 'layers', diff_ids: [layer.digest] },
        history: [{ created, created_by: 'pullbridge sample-registry' }],
      }),
    ),
  );
  const descriptor = (b: SampleBlob) => ({ mediaType: b.mediaType, digest: b.digest, size: b.bytes.length });
  const manifest = blob(
    'application/vnd.oci.image.manifest.v1+json',
    Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config: descriptor(config), layers: [descriptor(layer)] })),
  );
  return { repository: SAMPLE_REPOSITORY, tag: SAMPLE_TAG, manifest, config, layer };
}
