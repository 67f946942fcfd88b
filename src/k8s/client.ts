// The Kubernetes API client: in-cluster service account, or a kubeconfig file.

import { CoreV1Api, AdmissionregistrationV1Api, KubeConfig } from '@kubernetes/client-node';

export interface KubeClients {
  readonly core: CoreV1Api;
  readonly admission: AdmissionregistrationV1Api;
  /** For watches. */
  readonly config: KubeConfig;
}

/** In a Pod: the service account. Elsewhere: `kubeconfig` (or $KUBECONFIG), else none. */
export function kubeClients(kubeconfig?: string): KubeClients | undefined {
  const kc = new KubeConfig();
  if (kubeconfig) kc.loadFromFile(kubeconfig);
  else if (process.env.KUBERNETES_SERVICE_HOST) kc.loadFromCluster();
  else if (process.env.KUBECONFIG) kc.loadFromDefault();
  else return undefined;
  return { core: kc.makeApiClient(CoreV1Api), admission: kc.makeApiClient(AdmissionregistrationV1Api), config: kc };
}

/** The HTTP status of a client error, if it is one. */
export function apiStatus(error: unknown): number | undefined {
  const code = (error as { code?: unknown }).code;
  return typeof code === 'number' ? code : undefined;
}

/** A short message for an API error, without the request (which may carry a bearer token). */
export function apiMessage(error: unknown): string {
  const e = error as { code?: number; body?: unknown; message?: string };
  if (typeof e.code === 'number') {
    let reason = '';
    try {
      const body = typeof e.body === 'string' ? (JSON.parse(e.body) as { message?: string }) : (e.body as { message?: string } | undefined);
      reason = body?.message ?? '';
    } catch {
      reason = '';
    }
    return `HTTP ${e.code}${reason ? `: ${reason}` : ''}`;
  }
  return e.message ?? String(error);
}
