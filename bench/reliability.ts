// `npm run reliability [-- --seconds 60 --clients 64 --connections 8]`: the load runs of the
// reliability suite at full length, figures and RSS curves written to BENCHMARKS.md.
// (The suite in `npm test` runs the same code for a few seconds and asserts zero errors.)

import { parseArgs } from 'node:util';
import { runProxyLoad, runWebhookLoad, startLoadRig } from './load.js';
import { rssChartSvg, writeChart, writeReportSection } from './report.js';

const { values } = parseArgs({
  options: {
    seconds: { type: 'string', default: '60' },
    clients: { type: 'string', default: '64' },
    connections: { type: 'string', default: '8' },
  },
});
const seconds = Number(values.seconds);
const clients = Number(values.clients);
const connections = Number(values.connections);
const command = `npm run reliability -- --seconds ${seconds} --clients ${clients} --connections ${connections}`;
const f = (n: number, d = 0) => n.toFixed(d);
let failed = false;

const webhook = await runWebhookLoad(seconds, connections);
failed ||= webhook.errors > 0;
const webhookChart = writeChart('webhook-rss.svg', rssChartSvg(`pullbridge webhook RSS, ${connections} HTTPS keep-alive connections, ${seconds} s`, [{ name: 'webhook', samples: webhook.rss }]));
writeReportSection(
  'load-webhook',
  'Load: webhook',
  command,
  [
    `The \`pullbridge webhook\` process (audit log on, to a pipe) answering AdmissionReviews for a 10-container Pod; every answer checked (allowed, right uid, a patch).`,
    '',
    '| connections | seconds | admissions | admissions/s | p50 ms | p99 ms | p99.9 ms | errors | peak RSS MiB |',
    '|---|---|---|---|---|---|---|---|---|',
    `| ${connections} | ${f(webhook.seconds, 1)} | ${webhook.admissions} | ${f(webhook.perSecond)} | ${f(webhook.p50Ms, 2)} | ${f(webhook.p99Ms, 2)} | ${f(webhook.p999Ms, 2)} | **${webhook.errors}** | ${f(webhook.peakRssMb)} |`,
    '',
    `![webhook RSS over the run](${webhookChart})`,
  ].join('\n'),
);
process.stdout.write(`webhook: ${webhook.admissions} admissions, ${webhook.errors} errors, p99.9 ${f(webhook.p999Ms, 2)} ms, peak RSS ${f(webhook.peakRssMb)} MiB\n`);

// Small and large layers, as real images mix them: 1 KiB to 64 MiB.
const rig = await startLoadRig({ images: [[1024, 16 * 1024], [64 * 1024, 256 * 1024], [1024 * 1024, 4 * 1024 * 1024], [16 * 1024 * 1024], [64 * 1024 * 1024]] });
try {
  const proxy = await runProxyLoad(rig, { clients, seconds, authorization: () => rig.authorization('load', rig.signingKey), abortEvery: 10 });
  failed ||= proxy.errors > 0 || proxy.corrupt > 0;
  const proxyChart = writeChart('proxy-rss.svg', rssChartSvg(`pullbridge proxy RSS, ${clients} concurrent pullers, ${seconds} s`, [{ name: 'proxy', samples: proxy.rss }]));
  writeReportSection(
    'load-proxy',
    'Load: proxy',
    command,
    [
      `The \`pullbridge proxy\` process in broker mode in front of docker-registry (htpasswd), ${clients} clients each pulling as containerd does (tag → index, manifest by digest, config and layers by digest) from 5 images with layers of 1 KiB to 64 MiB, every body hashed by the client and compared with its digest (half the clients use a rule on which the proxy does not verify blob digests, so nothing but the client would catch a corrupted body); every 10th blob pull is abandoned by its client after the first bytes.`,
      '',
      '| clients | seconds | requests | verified bodies | aborted by client | MiB/s | errors | corrupt | peak RSS MiB |',
      '|---|---|---|---|---|---|---|---|---|',
      `| ${clients} | ${f(proxy.seconds, 1)} | ${proxy.requests} | ${proxy.verified} | ${proxy.aborted} | ${f(proxy.mibPerSecond)} | **${proxy.errors}** | **${proxy.corrupt}** | ${f(proxy.peakRssMb)} |`,
      '',
      ...(proxy.firstErrors.length > 0 ? ['First errors:', '', ...proxy.firstErrors.map((e) => `- ${e}`), ''] : []),
      `![proxy RSS over the run](${proxyChart})`,
    ].join('\n'),
  );
  process.stdout.write(`proxy: ${proxy.verified} verified, ${proxy.errors} errors, ${proxy.corrupt} corrupt, ${f(proxy.mibPerSecond)} MiB/s, peak RSS ${f(proxy.peakRssMb)} MiB\n`);
} finally {
  await rig.stop();
}
if (failed) process.exitCode = 1;
