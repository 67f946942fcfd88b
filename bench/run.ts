// `npm run bench [-- webhook] [--seconds N] [--rounds N]`: runs the benchmarks and writes their
// tables to bench/results/, with the machine they ran on.

import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { formatProxyBench, runProxyBench } from './proxy.js';
import { formatWebhookBench, runWebhookBench } from './webhook.js';

const { values, positionals } = parseArgs({
  options: {
    seconds: { type: 'string', default: '5' },
    rounds: { type: 'string', default: '3' },
    connections: { type: 'string', default: '8' },
    'size-mb': { type: 'string', default: '1024' },
    concurrency: { type: 'string', default: '16' },
  },
  allowPositionals: true,
});
const which = positionals.length > 0 ? positionals : ['webhook', 'proxy'];
const machine = `${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, ${Math.round(totalmem() / 2 ** 30)} GiB, Node ${process.version}`;
const resultsDir = fileURLToPath(new URL('../../bench/results/', import.meta.url));
mkdirSync(resultsDir, { recursive: true });

for (const name of which) {
  if (name === 'webhook') {
    const result = await runWebhookBench(Number(values.seconds), Number(values.rounds), Number(values.connections));
    const text = `## Webhook\n\nCommand: \`npm run bench -- webhook --seconds ${values.seconds} --rounds ${values.rounds} --connections ${values.connections}\`  \nMachine: ${machine}  \nDate: ${new Date().toISOString()}\n\n${formatWebhookBench(result)}\n`;
    writeFileSync(`${resultsDir}webhook.md`, text);
    process.stdout.write(`${text}\n`);
  } else if (name === 'proxy') {
    const result = await runProxyBench(Number(values['size-mb']), Number(values.concurrency), Number(values.rounds));
    const text = `## Proxy\n\nCommand: \`npm run bench -- proxy --size-mb ${values['size-mb']} --concurrency ${values.concurrency} --rounds ${values.rounds}\`  \nMachine: ${machine}  \nDate: ${new Date().toISOString()}\n\n${formatProxyBench(result)}\n`;
    writeFileSync(`${resultsDir}proxy.md`, text);
    process.stdout.write(`${text}\n`);
  } else {
    process.stderr.write(`unknown benchmark "${name}" (known: webhook, proxy)\n`);
    process.exitCode = 2;
  }
}
