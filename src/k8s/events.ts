// Kubernetes Events, so that `kubectl describe configmap` and `kubectl get events` show problems.

import type { CoreV1Api } from '@kubernetes/client-node';
import type { Logger } from '../log.js';
import { apiMessage } from './client.js';

export interface EventTarget {
  readonly kind: string;
  readonly name: string;
  readonly namespace: string;
  /** v1 when not given. */
  readonly apiVersion?: string;
}

export function recordWarning(core: CoreV1Api, logger: Logger, target: EventTarget, reason: string, message: string, component: string): Promise<void> {
  return recordEvent(core, logger, target, 'Warning', reason, message, component);
}

export async function recordEvent(core: CoreV1Api, logger: Logger, target: EventTarget, type: 'Warning' | 'Normal', reason: string, message: string, component: string): Promise<void> {
  const now = new Date();
  try {
    await core.createNamespacedEvent({
      namespace: target.namespace,
      body: {
        metadata: { generateName: `${target.name}.`, namespace: target.namespace },
        involvedObject: { apiVersion: target.apiVersion ?? 'v1', kind: target.kind, name: target.name, namespace: target.namespace },
        reason,
        message: message.slice(0, 1024),
        type,
        source: { component },
        firstTimestamp: now,
        lastTimestamp: now,
        count: 1,
      },
    });
  } catch (error) {
    logger.warn({ reason, error: apiMessage(error) }, 'could not record a Kubernetes event');
  }
}
