// Memory held by buffered bodies (manifests up to 4 MiB, tag lists), bounded in total and per client.
// A buffered body stays in memory until the client has read it, so clients that ask and never read
// could otherwise pin as much as they like. No I/O: callers reserve before reading and release when
// the response is done.

export interface Reservation {
  /** Changes the bytes held (e.g. to the real size once read); null when done, else the limit it
   * would exceed (holding as before). */
  resize(bytes: number): BudgetLimit | null;
  /** Idempotent. */
  release(): void;
}

export type BudgetLimit = 'client' | 'total';
export type Reserved = { readonly ok: true; readonly reservation: Reservation } | { readonly ok: false; readonly limit: BudgetLimit };

export class ByteBudget {
  private used = 0;
  private readonly byClient = new Map<string, number>();

  constructor(
    readonly totalBytes: number,
    readonly perClientBytes: number,
  ) {}

  /** Bytes held now, in total and by one client. */
  held(client?: string): number {
    return client === undefined ? this.used : (this.byClient.get(client) ?? 0);
  }

  reserve(client: string, bytes: number): Reserved {
    const refusal = this.refusal(client, bytes);
    if (refusal) return { ok: false, limit: refusal };
    this.take(client, bytes);
    let held = bytes;
    let released = false;
    return {
      ok: true,
      reservation: {
        resize: (next) => {
          if (released) return 'total';
          const refusal = next > held ? this.refusal(client, next - held) : null;
          if (refusal) return refusal;
          this.take(client, next - held);
          held = next;
          return null;
        },
        release: () => {
          if (released) return;
          released = true;
          this.take(client, -held);
        },
      },
    };
  }

  private refusal(client: string, more: number): BudgetLimit | null {
    if (this.held(client) + more > this.perClientBytes) return 'client';
    if (this.used + more > this.totalBytes) return 'total';
    return null;
  }

  private take(client: string, delta: number): void {
    this.used += delta;
    const next = this.held(client) + delta;
    if (next > 0) this.byClient.set(client, next);
    else this.byClient.delete(client);
  }
}
