// Kubernetes Events, so that `kubectl describe configmap` and `kubectl get events` show problems.

import type { CoreV1Api } from '@kubernetes/client-node';
import type { Logger } from '../log.js';
import { apiMessage } from './client.js';

export interface EventTarget {
  readonly kind: string;
  readonly name: string;
  readonly namespace: string;
}

export async function recordWarning(core: CoreV1Api, logger: Logger, target: EventTarget, reason: string, message: string, component: string): Promise<void> {
  const now = new Date();
  try {
    await core.createNamespacedEvent({
      namespace: target.namespace,
      body: {
        metadata: { generateName: `${target.name}.`, namespace: target.namespace },
        involvedObject: { apiVersion: 'v1', kind: target.kind, name: target.name, namespace: target.namespace },
        reason,
        message: message.slice(0, 1024),
        type: 'Warning',
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
