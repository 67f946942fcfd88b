// Shares of something a client holds while its request runs, bounded in total and per client: the
// memory of buffered bodies (manifests up to 4 MiB, tag lists), the number of blob streams. Without
// it one client (a Pod) could take all of either from the others. No I/O: callers reserve before
// they start and release when the response is done.

export interface Reservation {
  /** Changes the amount held (e.g. to the real size once read); null when done, else the limit it
   * would exceed (holding as before). */
  resize(amount: number): BudgetLimit | null;
  /** Idempotent. */
  release(): void;
}

export type BudgetLimit = 'client' | 'total';
export type Reserved = { readonly ok: true; readonly reservation: Reservation } | { readonly ok: false; readonly limit: BudgetLimit };

export class Budget {
  private used = 0;
  private readonly byClient = new Map<string, number>();

  constructor(
    readonly total: number,
    readonly perClient: number,
  ) {}

  /** Held now, in total or by one client. */
  held(client?: string): number {
    return client === undefined ? this.used : (this.byClient.get(client) ?? 0);
  }

  reserve(client: string, amount: number): Reserved {
    const refusal = this.refusal(client, amount);
    if (refusal) return { ok: false, limit: refusal };
    this.take(client, amount);
    let held = amount;
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
    if (this.held(client) + more > this.perClient) return 'client';
    if (this.used + more > this.total) return 'total';
    return null;
  }

  private take(client: string, delta: number): void {
    this.used += delta;
    const next = this.held(client) + delta;
    if (next > 0) this.byClient.set(client, next);
    else this.byClient.delete(client);
  }
}
