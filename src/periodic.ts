// A task run now and on an interval, one run at a time: a run still going when the next is due is
// not stacked on (a slow API list or collection would otherwise pile up calls).

export class PeriodicTask {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;

  constructor(
    /** Handles its own errors: a rejection is dropped. */
    private readonly task: () => Promise<void>,
    private readonly intervalMs: number,
  ) {}

  /** Runs the task now and every interval after; the timer does not keep the process alive. */
  start(): void {
    void this.run();
    this.timer = setInterval(() => void this.run(), this.intervalMs);
    this.timer.unref();
  }

  /** Runs the task now unless a run is going; either way, settles when that run ends. */
  run(): Promise<void> {
    this.running ??= this.task()
      .catch(() => undefined)
      .finally(() => (this.running = undefined));
    return this.running;
  }

  /** No further runs; settles once a run in progress ended. */
  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.running;
  }
}
