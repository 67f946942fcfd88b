// What tests against a real control plane share: registering the shipped webhook configuration and
// waiting for Pods to reach a state.

import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { AdmissionregistrationV1Api, CoreV1Api, KubeConfig, type V1MutatingWebhookConfiguration, type V1Node, type V1Pod, type V1Secret } from '@kubernetes/client-node';
import { parse as parseYaml } from 'yaml';

export const WEBHOOK_YAML = fileURLToPath(new URL('../../../webhook-config/mutating-webhook.yaml', import.meta.url));

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Registers webhook-config/ pointed at `url`, then waits until the apiserver applies it (it picks up
 * webhook configurations asynchronously): a dry-run Pod in `probeNamespace` whose image is
 * `probeImage` comes back rewritten. With `only`, the configuration is named `only.name` and applies
 * to the probe namespace alone, so that several webhooks can run side by side, one per namespace. */
export async function registerWebhook(kc: KubeConfig, url: string, caCert: string, probeImage: string, probeNamespace = 'warmup', only?: { readonly name: string }): Promise<void> {
  const core = kc.makeApiClient(CoreV1Api);
  const shipped = parseYaml(readFileSync(WEBHOOK_YAML, 'utf8')) as V1MutatingWebhookConfiguration;
  for (const hook of shipped.webhooks ?? []) {
    hook.clientConfig = { url, caBundle: Buffer.from(caCert).toString('base64') };
    if (only) hook.namespaceSelector = { matchExpressions: [...(hook.namespaceSelector?.matchExpressions ?? []), { key: 'kubernetes.io/metadata.name', operator: 'In', values: [probeNamespace] }] };
  }
  if (only) shipped.metadata = { ...shipped.metadata, name: only.name };
  await kc.makeApiClient(AdmissionregistrationV1Api).createMutatingWebhookConfiguration({ body: shipped });
  await core.createNamespace({ body: { metadata: { name: probeNamespace } } });
  const probe: V1Pod = { apiVersion: 'v1', kind: 'Pod', metadata: { name: 'probe' }, spec: { containers: [{ name: 'c', image: probeImage }] } };
  for (const deadline = Date.now() + 30_000; ; ) {
    const dry = await core.createNamespacedPod({ namespace: probeNamespace, body: probe, dryRun: 'All' });
    if (dry.spec?.containers[0]?.image !== probeImage) return;
    if (Date.now() > deadline) throw new Error('the webhook configuration never took effect');
    await sleep(250);
  }
}

/** A Node that is Ready and carries no NoSchedule taint: Pods can be scheduled to it. */
export const isSchedulable = (node: V1Node): boolean =>
  (node.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') ?? false) && !(node.spec?.taints ?? []).some((t) => t.effect === 'NoSchedule');

/**
 * Polls until kubelet registered its Node (and `done` says so of it: Ready, schedulable…); fails
 * after `timeoutMs` with what was seen last.
 */
export async function waitForNode(core: CoreV1Api, name: string, timeoutMs: number, done: (node: V1Node) => boolean = () => true, describe = 'registered'): Promise<V1Node> {
  let last = '';
  for (const deadline = Date.now() + timeoutMs; ; await sleep(500)) {
    try {
      const node = await core.readNode({ name });
      if (done(node)) return node;
      last = JSON.stringify({ conditions: node.status?.conditions, taints: node.spec?.taints });
    } catch (error) {
      last = (error as Error).message;
    }
    if (Date.now() > deadline) throw new Error(`the Node ${name} never became ${describe}: ${last}`);
  }
}

/** Polls a Pod until `done` says so; fails after `timeoutMs` with the Pod's last status. */
export async function waitForPod(core: CoreV1Api, namespace: string, name: string, done: (pod: V1Pod) => boolean, timeoutMs: number, describe = ''): Promise<V1Pod> {
  let last: V1Pod | undefined;
  for (const deadline = Date.now() + timeoutMs; Date.now() < deadline; await sleep(500)) {
    last = await core.readNamespacedPod({ namespace, name });
    if (done(last)) return last;
  }
  throw new Error(`Pod ${namespace}/${name} never reached the expected state ${describe}; last status: ${JSON.stringify(last?.status)}`);
}

/** The waiting reason and message of a Pod's first container, e.g. `ErrImagePull: …401…`. */
export function waitingState(pod: V1Pod): string {
  const waiting = pod.status?.containerStatuses?.[0]?.state?.waiting;
  return waiting ? `${waiting.reason ?? ''}: ${waiting.message ?? ''}` : '';
}

/** A Secret, or null when there is none (any other error is thrown). */
export async function readSecretOrNull(core: CoreV1Api, namespace: string, name = 'pullbridge-pull'): Promise<V1Secret | null> {
  try {
    return await core.readNamespacedSecret({ namespace, name });
  } catch (error) {
    if ((error as { code?: number }).code === 404) return null;
    throw error;
  }
}

export const isRunning = (pod: V1Pod): boolean => pod.status?.containerStatuses?.[0]?.state?.running !== undefined;
