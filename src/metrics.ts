// One Prometheus registry per server, so that several servers (and tests) in one process stay apart.

import { Registry, collectDefaultMetrics } from 'prom-client';

export function createMetricsRegistry(withProcessMetrics = true): Registry {
  const registry = new Registry();
  if (withProcessMetrics) collectDefaultMetrics({ register: registry, prefix: 'pullbridge_' });
  return registry;
}
