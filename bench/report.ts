// BENCHMARKS.md: one section per benchmark or load run, each replaced in place by the command that
// produced it, with the machine it ran on; charts are SVG files beside the results.

import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { fileURLToPath } from 'node:url';
import type { RssSample } from './load.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const REPORT_FILE = `${ROOT}BENCHMARKS.md`;
export const CHART_DIR = `${ROOT}bench/results/`;

const HEADER = `# Benchmarks and load runs

Every section below is written by the command it names, on the machine it names; re-running the
command replaces that section. Figures from one shared 2-core machine are noisy: the benchmarks
compare side by side in one run and report ratios.

## How to read our figures

A ratio is worth only what its two sides hold equal; each comparison says which:
- **Webhook**: the pullbridge server against the same express server answering a constant response,
  same TLS, keep-alive connections and request body; what differs is the admission work (parse,
  decide, patch, audit). The load run checks every answer's patch against the Pod.
- **Proxy, relaying**: the same blob from the same registry, one client (curl) at a time and 16 at
  once, order alternating. *Like for like* is pullbridge without digest verification against nginx
  with buffers tuned so that it writes no temp file: both only pass bytes on. nginx on its defaults
  also writes a large body to a temp file and reads it back (the reference set-up as it ships), and
  pullbridge's default also hashes every byte: those rows are there to show what each costs, not
  as a contest of equal work.
- **Node cache, hits**: pullbridge serving from its cache against nginx serving from its own
  \`proxy_cache\` (both from a local file, neither asking the registry, which the registry's access
  log confirms); direct and relaying rows give scale.
- **Node cache, misses**: a miss fills, hashes and keeps the blob; its fair twin is pullbridge's own
  verified relay (same hashing, nothing kept). nginx relaying keeps and checks nothing.
- **Shared tier**: every setup pulls the same new layer on the same number of nodes at the same
  moment, with the same upstream (capped or not); upstream bytes come from the registry's access
  log, settled before counting.
- **Load runs**: counts of verified bodies, errors and corrupt bodies; an abort counts as one only
  after the proxy answered 200. RSS is sampled from /proc.
`;

export function machine(): string {
  return `${cpus().length} × ${cpus()[0]?.model?.trim() ?? 'cpu'}, ${Math.round(totalmem() / 2 ** 30)} GiB, Node ${process.version}, ${process.platform}`;
}

/** Replaces (or appends) the section `name` of BENCHMARKS.md. */
export function writeReportSection(name: string, title: string, command: string, body: string): void {
  const begin = `<!-- section:${name} -->`;
  const end = `<!-- /section:${name} -->`;
  const section = `${begin}\n## ${title}\n\nCommand: \`${command}\`  \nMachine: ${machine()}  \nDate: ${new Date().toISOString()}\n\n${body.trim()}\n${end}`;
  let text = existsSync(REPORT_FILE) ? readFileSync(REPORT_FILE, 'utf8') : HEADER;
  const at = text.indexOf(begin);
  const until = text.indexOf(end);
  text = at >= 0 && until > at ? `${text.slice(0, at)}${section}${text.slice(until + end.length)}` : `${text.trimEnd()}\n\n${section}\n`;
  writeFileSync(REPORT_FILE, text);
}

/** A line chart of RSS over time, one line per series, as a self-contained SVG. */
export function rssChartSvg(title: string, series: ReadonlyArray<{ readonly name: string; readonly samples: readonly RssSample[] }>): string {
  const width = 720;
  const height = 320;
  const pad = { left: 56, right: 16, top: 36, bottom: 40 };
  const all = series.flatMap((s) => s.samples);
  const maxX = Math.max(1, ...all.map((s) => s.seconds));
  const maxY = Math.max(50, ...all.map((s) => s.rssMb)) * 1.1;
  const x = (v: number) => pad.left + (v / maxX) * (width - pad.left - pad.right);
  const y = (v: number) => height - pad.bottom - (v / maxY) * (height - pad.top - pad.bottom);
  const colours = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd'];
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => f * maxY);
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="${width / 2}" y="20" text-anchor="middle" font-size="14">${escapeXml(title)}</text>`,
    ...ticks.map((t) => `<line x1="${pad.left}" x2="${width - pad.right}" y1="${y(t).toFixed(1)}" y2="${y(t).toFixed(1)}" stroke="#ddd"/><text x="${pad.left - 6}" y="${(y(t) + 4).toFixed(1)}" text-anchor="end">${t.toFixed(0)}</text>`),
    `<text x="14" y="${height / 2}" transform="rotate(-90 14 ${height / 2})" text-anchor="middle">RSS MiB</text>`,
    `<text x="${width / 2}" y="${height - 8}" text-anchor="middle">seconds (0 – ${maxX.toFixed(0)})</text>`,
    ...series.map((s, i) => {
      const points = s.samples.map((p) => `${x(p.seconds).toFixed(1)},${y(p.rssMb).toFixed(1)}`).join(' ');
      const colour = colours[i % colours.length];
      return `<polyline fill="none" stroke="${colour}" stroke-width="2" points="${points}"/><text x="${pad.left + 8}" y="${pad.top + 14 + i * 16}" fill="${colour}">${escapeXml(s.name)}</text>`;
    }),
    '</svg>',
  ];
  return `${parts.join('\n')}\n`;
}

export function writeChart(file: string, svg: string): string {
  mkdirSync(CHART_DIR, { recursive: true });
  writeFileSync(`${CHART_DIR}${file}`, svg);
  return `bench/results/${file}`;
}

function escapeXml(text: string): string {
  return text.replace(/[<>&"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', '"': '&quot;' })[c] ?? c);
}
