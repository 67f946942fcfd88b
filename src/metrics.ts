// One Prometheus registry per server, so that several servers (and tests) in one process stay apart.

import { Registry, collectDefaultMetrics } from 'prom-client';

/**
 * With process metrics: under their standard names (process_resident_memory_bytes,
 * nodejs_heap_size_used_bytes, ...), unprefixed, so that stock Node.js dashboards and alerts work.
 * pullbridge's own metrics are the ones named pullbridge_*.
 */
export function createMetricsRegistry(withProcessMetrics = true): Registry {
  const registry = new Registry();
  if (withProcessMetrics) collectDefaultMetrics({ register: registry });
  return registry;
}
