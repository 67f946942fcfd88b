// The webhook's serving certificate without cert-manager: at start-up (and then periodically) the
// webhook makes sure its TLS Secret holds a certificate valid for the Service for long enough,
// creates or renews it when not, and puts the CA into its MutatingWebhookConfiguration's caBundle.
// Replicas race safely: the Secret create or update that loses (409) reads the winner's.
// The Secret is made at run time, so Helm does not know it: it names the webhook's Deployment as its
// owner, and the garbage collector deletes it with the Deployment (on `helm uninstall`).

import { X509Certificate } from 'node:crypto';
import { isIP } from 'node:net';
import type { AdmissionregistrationV1Api, AppsV1Api, CoreV1Api, V1OwnerReference, V1Secret } from '@kubernetes/client-node';
import { generateCertificates } from '../certs/certs.js';
import { apiMessage, apiStatus } from './client.js';

export interface ServingCertificate {
  readonly cert: string;
  readonly key: string;
  readonly caCert: string;
}

export interface BootstrapOptions {
  readonly core: CoreV1Api;
  readonly admission: AdmissionregistrationV1Api;
  readonly namespace: string;
  readonly secretName: string;
  readonly service: string;
  readonly webhookConfiguration: string;
  readonly validityDays?: number;
  /** Extra SANs, e.g. a node address for a hostNetwork webhook reached by IP. */
  readonly extraNames?: readonly string[];
  /** Renew when less than this remains. */
  readonly renewBeforeDays?: number;
  readonly now?: () => Date;
  /** The Secret's owner (the webhook's Deployment): set on a Secret made or renewed, added to one without it. */
  readonly owner?: V1OwnerReference;
}

/**
 * An owner reference to the Deployment `name`, read through the API (its UID is not known before).
 * Not `blockOwnerDeletion`: that needs update rights on the Deployment's finalizers.
 */
export async function deploymentOwner(apps: AppsV1Api, namespace: string, name: string): Promise<V1OwnerReference> {
  let deployment;
  try {
    deployment = await apps.readNamespacedDeployment({ namespace, name });
  } catch (error) {
    throw new Error(`read deployment ${namespace}/${name} (the TLS Secret's owner): ${apiMessage(error)}`);
  }
  const uid = deployment.metadata?.uid;
  if (!uid) throw new Error(`deployment ${namespace}/${name} has no uid`);
  return { apiVersion: 'apps/v1', kind: 'Deployment', name, uid, controller: false };
}

const ownedBy = (secret: V1Secret | undefined, owner: V1OwnerReference): boolean => (secret?.metadata?.ownerReferences ?? []).some((r) => r.uid === owner.uid);

/** The Secret's owner references with `owner` in place of any earlier reference to a Deployment of its name. */
function withOwner(secret: V1Secret | undefined, owner: V1OwnerReference | undefined): V1OwnerReference[] | undefined {
  const others = (secret?.metadata?.ownerReferences ?? []).filter((r) => !owner || !(r.kind === owner.kind && r.name === owner.name));
  const all = owner ? [...others, owner] : others;
  return all.length > 0 ? all : undefined;
}

/** Whether a stored certificate serves the Service for at least `renewBeforeDays` more. Pure. */
export function certificateUsable(pem: string, service: string, namespace: string, now: Date, renewBeforeDays: number, extraNames: readonly string[] = []): boolean {
  try {
    const cert = new X509Certificate(pem);
    const renewAt = new Date(cert.validTo).getTime() - renewBeforeDays * 86_400_000;
    const covers = (name: string) => (isIP(name) ? cert.checkIP(name) : cert.checkHost(name)) !== undefined;
    return now.getTime() < renewAt && now.getTime() > new Date(cert.validFrom).getTime() - 300_000 && [`${service}.${namespace}.svc`, ...extraNames].every(covers);
  } catch {
    return false;
  }
}

function fromSecret(secret: V1Secret | undefined): ServingCertificate | undefined {
  const d = secret?.data;
  if (!d?.['tls.crt'] || !d['tls.key'] || !d['ca.crt']) return undefined;
  const text = (b: string) => Buffer.from(b, 'base64').toString('utf8');
  return { cert: text(d['tls.crt']), key: text(d['tls.key']), caCert: text(d['ca.crt']) };
}

async function readSecret(core: CoreV1Api, namespace: string, name: string): Promise<V1Secret | undefined> {
  try {
    return await core.readNamespacedSecret({ namespace, name });
  } catch (error) {
    if (apiStatus(error) === 404) return undefined;
    throw new Error(`read secret ${namespace}/${name}: ${apiMessage(error)}`);
  }
}

/** Still-valid CA certificates from a PEM bundle. */
function validCas(bundle: string, now: Date): string[] {
  return (bundle.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? []).filter((pem) => {
    try {
      return new Date(new X509Certificate(pem).validTo).getTime() > now.getTime();
    } catch {
      return false;
    }
  });
}

export async function ensureServingCertificate(options: BootstrapOptions): Promise<ServingCertificate> {
  const now = options.now?.() ?? new Date();
  const renewBefore = options.renewBeforeDays ?? 30;
  const { core, namespace, secretName: name } = options;
  let serving: ServingCertificate | undefined;
  for (let attempt = 0; attempt < 3 && !serving; attempt++) {
    const existing = await readSecret(core, namespace, name);
    const current = fromSecret(existing);
    if (current && certificateUsable(current.cert, options.service, namespace, now, renewBefore, options.extraNames)) {
      if (existing && options.owner && !ownedBy(existing, options.owner)) {
        // Made before it had an owner (or by a former Deployment): adopt it, or uninstall leaves it.
        const adopted: V1Secret = { ...existing, metadata: { ...existing.metadata, ownerReferences: withOwner(existing, options.owner) } };
        try {
          await core.replaceNamespacedSecret({ namespace, name, body: adopted });
        } catch (error) {
          if (apiStatus(error) === 409) continue; // changed meanwhile: read it again
          throw new Error(`write secret ${namespace}/${name}: ${apiMessage(error)}`);
        }
      }
      serving = current;
      break;
    }
    const fresh = generateCertificates({ service: options.service, namespace, validityDays: options.validityDays ?? 365, now, ...(options.extraNames ? { extraNames: options.extraNames } : {}) });
    // The new CA first, then the previous one while it is valid: replicas still serving the old
    // certificate keep working until they pick up the new one.
    const caBundle = [fresh.caCert.trim(), ...validCas(current?.caCert ?? '', now).filter((pem) => pem !== fresh.caCert.trim())].join('\n') + '\n';
    const body: V1Secret = {
      apiVersion: 'v1',
      kind: 'Secret',
      type: 'kubernetes.io/tls',
      metadata: {
        name,
        namespace,
        labels: { 'app.kubernetes.io/managed-by': 'pullbridge' },
        ...(existing?.metadata?.resourceVersion ? { resourceVersion: existing.metadata.resourceVersion } : {}),
        ...(withOwner(existing, options.owner) ? { ownerReferences: withOwner(existing, options.owner) } : {}),
      },
      data: { 'tls.crt': Buffer.from(fresh.cert).toString('base64'), 'tls.key': Buffer.from(fresh.key).toString('base64'), 'ca.crt': Buffer.from(caBundle).toString('base64') },
    };
    try {
      if (existing) await core.replaceNamespacedSecret({ namespace, name, body });
      else await core.createNamespacedSecret({ namespace, body });
      serving = { cert: fresh.cert, key: fresh.key, caCert: caBundle };
    } catch (error) {
      if (apiStatus(error) !== 409) throw new Error(`write secret ${namespace}/${name}: ${apiMessage(error)}`);
      // Another replica wrote it first: use theirs on the next round.
    }
  }
  if (!serving) throw new Error(`secret ${namespace}/${name} kept changing; gave up`);
  await injectCaBundle(options.admission, options.webhookConfiguration, serving.caCert);
  return serving;
}

/** Sets caBundle on every webhook of the configuration, when it differs. */
export async function injectCaBundle(admission: AdmissionregistrationV1Api, name: string, caPem: string): Promise<void> {
  const caBundle = Buffer.from(caPem).toString('base64');
  for (let attempt = 0; attempt < 5; attempt++) {
    let config;
    try {
      config = await admission.readMutatingWebhookConfiguration({ name });
    } catch (error) {
      throw new Error(`read MutatingWebhookConfiguration ${name}: ${apiMessage(error)}`);
    }
    const webhooks = config.webhooks ?? [];
    if (webhooks.every((w) => w.clientConfig.caBundle === caBundle)) return;
    for (const w of webhooks) w.clientConfig.caBundle = caBundle;
    try {
      await admission.replaceMutatingWebhookConfiguration({ name, body: config });
      return;
    } catch (error) {
      if (apiStatus(error) !== 409) throw new Error(`update MutatingWebhookConfiguration ${name}: ${apiMessage(error)}`);
    }
  }
}
