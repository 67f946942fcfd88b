// The Kubernetes API client: in-cluster service account, or a kubeconfig file.

import { CoreV1Api, AdmissionregistrationV1Api, KubeConfig, Watch } from '@kubernetes/client-node';
import type { Logger } from '../log.js';

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

/**
 * A watch that is started again when it ends: soon when the apiserver ends it routinely, after a
 * longer wait each time it fails (e.g. RBAC without watch), up to five minutes. Events missed in
 * between are the caller's to catch up on (a resync, an expiry).
 */
export function restartingWatch(
  kubeConfig: KubeConfig,
  path: () => string,
  query: () => Record<string, string>,
  onEvent: (phase: string, object: unknown) => void,
  logger: Logger,
  what: Record<string, unknown> & { readonly msg: string },
  retryMs = 5000,
): { stop(): void } {
  const watch = new Watch(kubeConfig);
  const { msg, ...fields } = what;
  let stopped = false;
  let failures = 0;
  const backoff = () => Math.min(retryMs * 2 ** failures++, 300_000);
  let request: AbortController | undefined;
  let timer: NodeJS.Timeout | undefined;
  const again = (delayMs: number) => {
    if (stopped) return;
    timer = setTimeout(start, delayMs);
    timer.unref();
  };
  function start(): void {
    watch
      .watch(path(), query(), onEvent, (error: unknown) => {
        request = undefined;
        if (stopped) return;
        if (error) logger.warn({ ...fields, error: apiMessage(error) }, `${msg} watch ended; restarting`);
        if (!error) failures = 0;
        again(error ? backoff() : 1000);
      })
      .then((controller) => {
        request = controller;
        if (stopped) controller.abort();
      })
      .catch((error: unknown) => {
        logger.warn({ ...fields, error: apiMessage(error) }, `${msg} watch failed; retrying`);
        again(backoff());
      });
  }
  start();
  return {
    stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      request?.abort();
    },
  };
}
