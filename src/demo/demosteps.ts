// The numbered steps `pullbridge demo` (npm start) prints: one place, as data, so that the demo
// prints exactly what the tests run and the README quotes. Pure: paths, ports and the credential in,
// steps out. Every command works offline: the upstream is the demo's sample registry on loopback,
// and the on-prem-looking registry name is only ever matched as a string, never resolved.

import { join } from 'node:path';

export interface DemoSetup {
  /** How the CLI is invoked in the printed commands: `node /abs/path/dist/src/cli.js`, which works from any directory, offline. */
  readonly cli: string;
  /** The demo's temporary directory (config, broker key, CA, pulls); removed on exit. */
  readonly dir: string;
  readonly configFile: string;
  readonly caFile: string;
  readonly reviewFile: string;
  /** https://127.0.0.1:port of the webhook. */
  readonly webhookUrl: string;
  /** host:port of the registry proxy, as written into rewritten references. */
  readonly proxyAuthority: string;
  /** The image as the manifests name it (the on-prem registry). */
  readonly image: string;
  /** The image as the webhook rewrites it (through the proxy). */
  readonly rewrittenImage: string;
  readonly namespace: string;
  /** The namespace's credential (what the pull secret holds). */
  readonly token: string;
  /** The sample registry's process: killing it takes the upstream away. */
  readonly upstreamPid: number;
}

export interface DemoStep {
  readonly title: string;
  /** A shell command, run exactly as printed (sh -c). */
  readonly command: string;
  /** What its output shows. */
  readonly shows: string;
}

// Decodes the AdmissionReview response's JSON patch for reading; node is there wherever the demo runs.
const DECODE_PATCH = `node -e "const r=JSON.parse(require('fs').readFileSync(0,'utf8')).response;console.log('allowed:',r.allowed);console.log(JSON.stringify(JSON.parse(Buffer.from(r.patch,'base64').toString()),null,1))"`;

export const pullDir = (setup: Pick<DemoSetup, 'dir'>, n: number): string => join(setup.dir, `pull-${n}`);

function skopeoPull(setup: DemoSetup, n: number): string {
  const dir = pullDir(setup, n);
  return `skopeo copy --src-creds ${setup.namespace}:${setup.token} --src-tls-verify=false --digestfile ${dir}.digest docker://${setup.rewrittenImage} dir:${dir} && echo "digest: $(cat ${dir}.digest)"`;
}

export function demoSteps(setup: DemoSetup): DemoStep[] {
  return [
    {
      title: `Admission: send the webhook a Pod (namespace "${setup.namespace}") as the API server would`,
      command: `curl -s --cacert ${setup.caFile} -H 'Content-Type: application/json' --data @${setup.reviewFile} ${setup.webhookUrl}/mutate | ${DECODE_PATCH}`,
      shows: `the JSON patch: ${setup.image} becomes ${setup.rewrittenImage} with the pull secret in imagePullSecrets; the excluded legacy/ and the unmatched quay.io images stay`,
    },
    {
      title: 'The same decision without a server',
      command: `${setup.cli} rewrite --config ${setup.configFile} ${setup.image}`,
      shows: `${setup.image} -> ${setup.rewrittenImage}  [rewritten, rule ...]`,
    },
    {
      title: `The credential the webhook provisions for namespace "${setup.namespace}" (the pull secret's .dockerconfigjson)`,
      command: `${setup.cli} pull-secret --config ${setup.configFile} --namespace ${setup.namespace}`,
      shows: `username "${setup.namespace}" and its password for ${setup.proxyAuthority}`,
    },
    {
      title: 'Pull through the proxy with that credential, as kubelet would',
      command: skopeoPull(setup, 1),
      shows: 'the blobs copied and the manifest digest; the proxy keeps them in its node cache',
    },
    {
      title: 'Take the upstream registry away',
      command: `kill ${setup.upstreamPid}`,
      shows: 'nothing; the sample registry has stopped',
    },
    {
      title: 'Pull again: served from the node cache',
      command: skopeoPull(setup, 2),
      shows: 'the same digest, with the upstream gone',
    },
  ];
}

/** The steps as the demo prints them: numbered, each command on its own line. */
export function formatDemoSteps(steps: readonly DemoStep[]): string {
  return steps.map((step, i) => `${i + 1}. ${step.title}:\n   $ ${step.command}\n   (${step.shows})\n`).join('\n');
}

/** The commands back from printed text, in order: what a reader copies (the lines after `$ `). */
export function parseDemoCommands(printed: string): string[] {
  return printed
    .split('\n')
    .filter((line) => /^ {3}\$ /.test(line))
    .map((line) => line.slice(5));
}
