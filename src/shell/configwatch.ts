// Live configuration from the mounted ConfigMap file. Polled rather than watched: kubelet updates a
// ConfigMap volume by renaming a new `..data` symlink over the old one (config.yaml links to
// ..data/config.yaml and never changes itself), which a watch on the file misses; each poll reads the
// path afresh, following both links, and compares contents. Polling a small file is cheap. An invalid change is rejected loudly and the last good config stays in force; a valid one whose
// files are not there yet is tried again at every poll until they are.

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Counter, Gauge, type Registry } from 'prom-client';
import type { Logger } from '../log.js';
import { formatConfigErrors, parseConfig, type Config, type ConfigError } from '../rules/config.js';

export interface ConfigWatcherOptions {
  readonly path: string;
  readonly initial: Config;
  readonly logger: Logger;
  readonly metrics: Registry;
  /** Loads what the component reads for a config (key, credential and CA files); an error per file it cannot. */
  readonly loadErrors?: (config: Config) => readonly ConfigError[];
  readonly onApplied?: (config: Config) => void;
  readonly onRejected?: (message: string) => void;
}

export type ReloadOutcome = 'unchanged' | 'applied' | 'rejected';

export class ConfigWatcher {
  private config: Config;
  private lastHash: string;
  private timer: NodeJS.Timeout | undefined;
  /** A valid config that could not be taken up yet (a file it names is not there): tried again at
   * every poll, since kubelet updates the ConfigMap and the Secret volumes in no guaranteed order. */
  private waitingHash: string | undefined;
  private readonly reloads: Counter<'result'>;
  private readonly healthy: Gauge;

  constructor(private readonly options: ConfigWatcherOptions) {
    this.config = options.initial;
    this.lastHash = this.hashOf(this.readText() ?? '');
    this.reloads = new Counter({ name: 'pullbridge_config_reloads_total', help: 'Config changes seen, by result', labelNames: ['result'], registers: [options.metrics] });
    this.healthy = new Gauge({ name: 'pullbridge_config_last_reload_ok', help: '1 when the last config change was applied, 0 when it was rejected', registers: [options.metrics] });
    this.healthy.set(1);
  }

  current(): Config {
    return this.config;
  }

  start(intervalMs = 2000): void {
    this.timer = setInterval(() => this.check(), intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  private hashOf(text: string): string {
    return createHash('sha256').update(text).digest('hex');
  }

  private readText(): string | undefined {
    try {
      return readFileSync(this.options.path, 'utf8');
    } catch {
      return undefined;
    }
  }

  private reject(reason: string, fields: Record<string, unknown>): ReloadOutcome {
    this.reloads.inc({ result: 'rejected' });
    this.healthy.set(0);
    this.options.logger.error({ path: this.options.path, ...fields }, 'config change rejected; the last good config stays in force');
    this.options.onRejected?.(`config change rejected, keeping the last good config:${reason}`);
    return 'rejected';
  }

  /** Reads the file once; applies it when it changed and is valid. */
  check(): ReloadOutcome {
    const text = this.readText();
    if (text === undefined) return 'unchanged'; // mid-swap or briefly missing: keep what runs
    const hash = this.hashOf(text);
    const retry = hash === this.waitingHash;
    if (hash === this.lastHash && !retry) return 'unchanged';
    this.lastHash = hash;
    this.waitingHash = undefined;
    const result = parseConfig(text);
    if (!result.ok) return this.reject(`\n${formatConfigErrors(result.errors)}`, { errors: result.errors });
    // Everything the new config needs is loaded before it is taken up: a missing file keeps the old
    // one, and the new one is tried again at the next poll (reported once, not at every try).
    const errors: readonly ConfigError[] = this.options.loadErrors?.(result.config) ?? [];
    let failure = errors.length > 0 ? `\n${formatConfigErrors(errors)}` : undefined;
    if (failure === undefined) {
      try {
        this.options.onApplied?.(result.config);
      } catch (error) {
        // The component could not take the config up (e.g. a CA file that is not there yet).
        failure = ` ${(error as Error).message}`;
      }
    }
    if (failure !== undefined) {
      this.waitingHash = hash;
      return retry ? 'rejected' : this.reject(failure, errors.length > 0 ? { errors } : { error: failure.trim() });
    }
    this.config = result.config;
    this.reloads.inc({ result: 'applied' });
    this.healthy.set(1);
    this.options.logger.info({ path: this.options.path, rules: result.config.registries.map((r) => r.name) }, 'config change applied');
    return 'applied';
  }
}
