// What one client (a source address: a Pod, the node's runtime) may hold of the proxy at once:
// memory for buffered bodies, blob streams. Held until its response closes.

import type { ServerResponse } from 'node:http';
import { Gauge, type Registry } from 'prom-client';
import { ContentError, type BufferAllowance } from '../content/source.js';
import { Budget, type BudgetLimit, type Reservation } from './budget.js';

/** Memory for buffered bodies (manifests, tag lists) until their clients have read them. */
export const BUFFERED_BODY_BYTES = { total: 64 * 1024 * 1024, perClient: 16 * 1024 * 1024 };
/**
 * Blob streams one client address may hold at once: below the rule's upstream pool (64), so that
 * one Pod reading slowly cannot take every upstream connection of the rule on its node.
 */
export const BLOB_STREAMS_PER_CLIENT = 32;

export class ClientLimits {
  readonly buffers: Budget;
  readonly blobStreams: Budget;

  constructor(buffers: Budget | undefined, blobStreamsPerClient: number | undefined) {
    this.buffers = buffers ?? new Budget(BUFFERED_BODY_BYTES.total, BUFFERED_BODY_BYTES.perClient);
    this.blobStreams = new Budget(Number.POSITIVE_INFINITY, blobStreamsPerClient ?? BLOB_STREAMS_PER_CLIENT);
  }

  /** Buffer memory for the request answered by `res`, released when it closes. */
  bufferAllowance(res: ServerResponse): BufferAllowance {
    const client = clientOf(res);
    let reservation: Reservation | undefined;
    return {
      reserve: (bytes) => {
        const reserved = this.buffers.reserve(client, bytes);
        if (!reserved.ok) throw overBudget(reserved.limit);
        reservation = reserved.reservation;
        res.once('close', () => reserved.reservation.release());
      },
      resize: (bytes) => {
        const refusal = reservation?.resize(bytes) ?? null;
        if (refusal) throw overBudget(refusal);
      },
    };
  }

  /** One blob stream for the request answered by `res`, until it closes; false when the client holds its share. */
  takeBlobStream(res: ServerResponse): boolean {
    const stream = this.blobStreams.reserve(clientOf(res), 1);
    if (!stream.ok) return false;
    res.once('close', () => stream.reservation.release());
    return true;
  }
}

/** What the limits hold now, on /metrics. */
export function registerLimitMetrics(registry: Registry, limits: ClientLimits): void {
  new Gauge({
    name: 'pullbridge_buffered_bytes',
    help: 'Memory reserved now for buffered bodies (manifests, tag lists): responses not yet read by their clients, and manifest fetches in flight',
    registers: [registry],
    collect() {
      this.set(limits.buffers.held());
    },
  });
}

function clientOf(res: ServerResponse): string {
  return res.req.socket.remoteAddress ?? '';
}

function overBudget(limit: BudgetLimit): ContentError {
  return limit === 'client'
    ? new ContentError('too-many-requests', 'this client already holds too many buffered responses it has not read', { status: 429, retryAfter: '1' })
    : new ContentError('unavailable', 'the proxy holds too many buffered responses; try again shortly', { status: 503, retryAfter: '1' });
}
