// What one client (a source address: a Pod, the node's runtime) may hold of the proxy at once:
// memory for buffered bodies, blob streams. Held until its response closes; memory for a fetch that
// outlives it (shared with other clients), until the fetch ends.

import type { ServerResponse } from 'node:http';
import { Gauge, type Registry } from 'prom-client';
import { ContentError, type BufferAllowance, type DetachedBufferAllowance } from '../content/source.js';
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

  /**
   * Buffer memory for the request answered by `res`, given back when it closes. A response already
   * closed takes nothing: no close would give it back (a client that left while waiting for a fetch
   * reserves its copy when the fetch is over).
   */
  bufferAllowance(res: ServerResponse): BufferAllowance {
    const client = clientOf(res);
    const held = this.account(client, overBudget);
    if (res.closed || res.destroyed) held.release();
    else res.once('close', held.release);
    return { reserve: held.reserve, resize: held.resize, detached: () => this.detachedAllowance(client) };
  }

  /**
   * Buffer memory for work `client` started that outlives its request (one manifest fetch for every
   * client asking at once), given back when the work ends. On an account of its own for what the
   * client started: its leaving does not end the work, and fetches it left cannot take the whole
   * budget from the others.
   */
  private detachedAllowance(client: string): DetachedBufferAllowance {
    return { ...this.account(`${client} (detached)`, overBudgetDetached), detached: () => this.detachedAllowance(client) };
  }

  /** Reservations on one account of the buffer budget until `release`, which gives them back; nothing is taken after. */
  private account(key: string, refused: (limit: BudgetLimit) => ContentError): Omit<DetachedBufferAllowance, 'detached'> {
    const held: Reservation[] = [];
    let released = false;
    return {
      reserve: (bytes) => {
        if (released) return;
        const reserved = this.buffers.reserve(key, bytes);
        if (!reserved.ok) throw refused(reserved.limit);
        held.push(reserved.reservation);
      },
      resize: (bytes) => {
        if (released) return;
        const refusal = held.at(-1)?.resize(bytes) ?? null;
        if (refusal) throw refused(refusal);
      },
      release: () => {
        released = true;
        for (const reservation of held.splice(0)) reservation.release();
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
    ? new ContentError('too-many-requests', 'this client already holds too many buffered responses it has not read', { status: 429, retryAfter: '1', local: true })
    : overTotal();
}

function overBudgetDetached(limit: BudgetLimit): ContentError {
  return limit === 'client'
    ? new ContentError('too-many-requests', 'manifest fetches this client started (and may have left) still hold its share of the buffer memory; try again shortly', { status: 429, retryAfter: '1', local: true })
    : overTotal();
}

function overTotal(): ContentError {
  return new ContentError('unavailable', 'the proxy holds too many buffered responses; try again shortly', { status: 503, retryAfter: '1', local: true });
}
