// A token bucket in bytes per second, for forward.ts's paced relay (a tunnel of a known rate between
// the proxies and their upstream). Pure: the clock is passed in.
//
// Every chunk reserves its bytes at once and waits for the debt it leaves to be paid at the rate, so
// that chunks of several connections through one bucket pass in the order they came (the shared
// link of a tunnel), and the long-run rate is the cap whatever the chunk sizes are.

export class TokenBucket {
  private tokens: number;
  private at: number;

  constructor(
    readonly bytesPerSecond: number,
    /** What may pass at once after an idle spell (a small answer is not held back). */
    readonly burstBytes: number,
    private readonly now: () => number,
  ) {
    if (!(bytesPerSecond > 0) || !(burstBytes >= 0)) throw new RangeError(`a token bucket needs a rate > 0 and a burst >= 0, got ${bytesPerSecond} and ${burstBytes}`);
    this.tokens = burstBytes;
    this.at = now();
  }

  /** Reserves `bytes`: the milliseconds to wait before sending them. */
  reserve(bytes: number): number {
    const now = this.now();
    this.tokens = Math.min(this.burstBytes, this.tokens + ((now - this.at) * this.bytesPerSecond) / 1000);
    this.at = now;
    this.tokens -= bytes;
    return this.tokens >= 0 ? 0 : (-this.tokens * 1000) / this.bytesPerSecond;
  }
}
