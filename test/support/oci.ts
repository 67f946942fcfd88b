// Test images made from nothing: tar layers, config, manifests and an index written as an OCI
// layout, ready for `skopeo copy oci:DIR:TAG docker://…`. No download involved.

import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';

export interface Blob {
  readonly mediaType: string;
  readonly digest: string;
  readonly size: number;
  readonly data: Buffer;
}

export const sha256 = (data: Buffer): string => `sha256:${createHash('sha256').update(data).digest('hex')}`;

const blob = (mediaType: string, data: Buffer): Blob => ({ mediaType, digest: sha256(data), size: data.length, data });
const json = (mediaType: string, value: unknown): Blob => blob(mediaType, Buffer.from(JSON.stringify(value)));
const descriptor = (b: Blob) => ({ mediaType: b.mediaType, digest: b.digest, size: b.size });

/** An OCI image manifest over a config and layers. */
function imageManifest(config: Blob, layers: readonly Blob[], annotations?: Readonly<Record<string, string>>): Blob {
  const mediaType = 'application/vnd.oci.image.manifest.v1+json';
  return json(mediaType, { schemaVersion: 2, mediaType, config: descriptor(config), layers: layers.map(descriptor), ...(annotations ? { annotations } : {}) });
}

/** An OCI index over one manifest per platform, and the image it makes with every blob by digest. */
function assembleImage(entries: ReadonlyArray<{ platform: { os: string; architecture: string }; manifest: Blob; config: Blob; layers: readonly Blob[] }>): TestImage {
  const mediaType = 'application/vnd.oci.image.index.v1+json';
  const index = json(mediaType, { schemaVersion: 2, mediaType, manifests: entries.map((e) => ({ ...descriptor(e.manifest), platform: e.platform })) });
  const manifests = entries.map((e) => e.manifest);
  const configs = entries.map((e) => e.config);
  const layers = entries.flatMap((e) => e.layers);
  const blobs = new Map<string, Blob>();
  for (const b of [index, ...manifests, ...configs, ...layers]) blobs.set(b.digest, b);
  return { index, manifests, configs, layers, blobs };
}

/** A file in a layer: its bytes, or its bytes and a permission mode (0o644 when not given). */
export type LayerFile = Buffer | { readonly data: Buffer; readonly mode: number };

/** A minimal ustar archive of regular files. */
export function tarOf(files: Record<string, LayerFile>): Buffer {
  const parts: Buffer[] = [];
  for (const [name, file] of Object.entries(files)) {
    const content = Buffer.isBuffer(file) ? file : file.data;
    const mode = Buffer.isBuffer(file) ? 0o644 : file.mode;
    const header = Buffer.alloc(512);
    header.write(name, 0, 100, 'utf8');
    header.write(`${mode.toString(8).padStart(7, '0')}\0`, 100);
    header.write('0000000\0', 108);
    header.write('0000000\0', 116);
    header.write(content.length.toString(8).padStart(11, '0') + '\0', 124);
    header.write('00000000000\0', 136);
    header.write('        ', 148);
    header.write('0', 156);
    header.write('ustar\0', 257);
    header.write('00', 263);
    let sum = 0;
    for (const byte of header) sum += byte;
    header.write(sum.toString(8).padStart(6, '0') + '\0 ', 148);
    parts.push(header, content, Buffer.alloc((512 - (content.length % 512)) % 512));
  }
  parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}

export interface TestImage {
  readonly index: Blob;
  readonly manifests: readonly Blob[];
  readonly configs: readonly Blob[];
  readonly layers: readonly Blob[];
  /** Every blob by digest, for comparing what a client pulled. */
  readonly blobs: ReadonlyMap<string, Blob>;
}

export interface ImageSpec {
  readonly platforms?: ReadonlyArray<{ os: string; architecture: string }>;
  /** Sizes of random (incompressible) files, one layer each, per platform. */
  readonly layerSizes?: readonly number[];
  /** A history entry per layer in each config (what distribution needs to convert a manifest to schema1). */
  readonly history?: boolean;
  /** Annotations on every platform manifest (e.g. to make a large manifest). */
  readonly annotations?: Readonly<Record<string, string>>;
}

/** Builds a multi-platform image: an OCI index over one manifest per platform, several layers each. */
export function buildImage(spec: ImageSpec = {}): TestImage {
  const platforms = spec.platforms ?? [
    { os: 'linux', architecture: 'amd64' },
    { os: 'linux', architecture: 'arm64' },
  ];
  const sizes = spec.layerSizes ?? [1024, 64 * 1024];
  return assembleImage(
    platforms.map((platform) => {
      const tars = sizes.map((size, i) => tarOf({ [`file-${platform.architecture}-${i}`]: randomBytes(size) }));
      const layers = tars.map((t) => blob('application/vnd.oci.image.layer.v1.tar+gzip', gzipSync(t, { level: 1 })));
      const history = spec.history ? { history: tars.map((_, i) => ({ created: '2026-01-01T00:00:00Z', created_by: `layer ${i}` })) } : {};
      const config = json('application/vnd.oci.image.config.v1+json', { architecture: platform.architecture, os: platform.os, rootfs: { type: 'layers', diff_ids: tars.map(sha256) }, config: { Cmd: ['/file'] }, ...history });
      return { platform, config, layers, manifest: imageManifest(config, layers, spec.annotations) };
    }),
  );
}

export interface RunnableImageSpec {
  /** Files of the one layer, by path without a leading slash. */
  readonly files: Record<string, LayerFile>;
  readonly entrypoint: readonly string[];
  readonly cmd?: readonly string[];
  readonly user?: string;
}

/** The runtime part of an image config (`config` in the OCI image config), as a Dockerfile sets it. */
export interface RuntimeConfig {
  readonly Entrypoint: readonly string[];
  readonly Cmd?: readonly string[];
  readonly User?: string;
  readonly WorkingDir?: string;
  readonly Env?: readonly string[];
  readonly ExposedPorts?: Readonly<Record<string, Record<string, never>>>;
}

/** A single-platform (linux/amd64) image of one gzip layer: `layer` is the compressed blob, `diffId`
 * the digest of its uncompressed tar; config, manifest and an index over it are made here. */
export function singleLayerImage(layer: Buffer, diffId: string, runtime: RuntimeConfig): TestImage {
  const layerBlob = blob('application/vnd.oci.image.layer.v1.tar+gzip', layer);
  const config = json('application/vnd.oci.image.config.v1+json', { architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [diffId] }, config: runtime });
  return assembleImage([{ platform: { os: 'linux', architecture: 'amd64' }, config, layers: [layerBlob], manifest: imageManifest(config, [layerBlob]) }]);
}

/** A single-platform (linux/amd64) image that a container runtime can run: one layer, a config with
 * an entrypoint, a manifest, and an index over it. */
export function buildRunnableImage(spec: RunnableImageSpec): TestImage {
  const tar = tarOf(spec.files);
  return singleLayerImage(gzipSync(tar, { level: 6 }), sha256(tar), { Entrypoint: spec.entrypoint, ...(spec.cmd ? { Cmd: spec.cmd } : {}), ...(spec.user ? { User: spec.user } : {}) });
}

/** Writes the image as an OCI layout whose index names it `tag` (and, for containerd's importer,
 * `name`, a full reference). */
export function writeOciLayout(dir: string, image: TestImage, tag: string, name?: string): void {
  mkdirSync(join(dir, 'blobs', 'sha256'), { recursive: true });
  writeFileSync(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  for (const b of image.blobs.values()) writeFileSync(join(dir, 'blobs', 'sha256', b.digest.slice('sha256:'.length)), b.data);
  writeFileSync(
    join(dir, 'index.json'),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{ mediaType: image.index.mediaType, digest: image.index.digest, size: image.index.size, annotations: { 'org.opencontainers.image.ref.name': tag, ...(name ? { 'io.containerd.image.name': name } : {}) } }],
    }),
  );
}
