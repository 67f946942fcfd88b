// Keeps the proxies' mirror Secret equal to planMirror(credential sources, their Secrets): reconciled
// when the sources file changes (the ConfigMap, updated in place), when a source Secret changes (a
// watch per Secret, by name: the Role grants only those names), and every minute besides.

import { readFileSync } from 'node:fs';
import type { CoreV1Api, KubeConfig, V1Secret } from '@kubernetes/client-node';
import type { Logger } from '../log.js';
import { parseCredentialSources, planMirror, sameData, type SourceData } from '../rules/credentialmirror.js';
import { apiMessage, apiStatus, restartingWatch } from './client.js';

export interface CredentialMirrorOptions {
  readonly core: CoreV1Api;
  readonly kubeConfig: KubeConfig;
  readonly namespace: string;
  /** The Secret the proxies mount (the chart creates it). */
  readonly mirror: string;
  /** The chart's credential-sources.json (rule -> Secret), a mounted ConfigMap file. */
  readonly sourcesPath: string;
  readonly logger: Logger;
  readonly resyncMs?: number;
  readonly pollMs?: number;
}

export type MirrorOutcome = 'updated' | 'unchanged' | 'failed';

export class CredentialMirror {
  private sourcesText: string | undefined;
  private sources: ReadonlyMap<string, string> = new Map();
  private readonly watches = new Map<string, { stop(): void }>();
  private readonly timers: NodeJS.Timeout[] = [];
  private running: Promise<MirrorOutcome> | undefined;
  private pending = false;
  private stopped = false;
  private reported = '';

  constructor(private readonly options: CredentialMirrorOptions) {}

  start(): void {
    void this.reconcile();
    const poll = setInterval(() => {
      if (this.readSources()) void this.reconcile();
    }, this.options.pollMs ?? 2000);
    const resync = setInterval(() => void this.reconcile(), this.options.resyncMs ?? 60_000);
    for (const timer of [poll, resync]) timer.unref();
    this.timers.push(poll, resync);
  }

  stop(): void {
    this.stopped = true;
    for (const timer of this.timers) clearInterval(timer);
    for (const watch of this.watches.values()) watch.stop();
    this.watches.clear();
  }

  /** One reconcile; concurrent calls coalesce into one more run after the current one. */
  reconcile(): Promise<MirrorOutcome> {
    if (this.stopped) return Promise.resolve('unchanged');
    if (this.running) {
      this.pending = true;
      return this.running;
    }
    this.running = this.reconcileOnce().finally(() => {
      this.running = undefined;
      if (this.pending && !this.stopped) {
        this.pending = false;
        void this.reconcile();
      }
    });
    return this.running;
  }

  /** Reads the sources file; true when it changed. A bad or missing file keeps the last sources. */
  private readSources(): boolean {
    let text: string;
    try {
      text = readFileSync(this.options.sourcesPath, 'utf8');
    } catch {
      return false; // mid-swap or not mounted yet
    }
    if (text === this.sourcesText) return false;
    this.sourcesText = text;
    const parsed = parseCredentialSources(text);
    if (!parsed.ok) {
      this.options.logger.error({ path: this.options.sourcesPath, error: parsed.error }, 'credential sources rejected; the mirror keeps the last ones');
      return false;
    }
    this.sources = parsed.sources;
    this.updateWatches();
    return true;
  }

  private async reconcileOnce(): Promise<MirrorOutcome> {
    if (this.sourcesText === undefined) this.readSources();
    const { core, namespace, mirror, logger } = this.options;
    try {
      const secrets = new Map<string, SourceData>();
      for (const name of new Set(this.sources.values())) {
        try {
          secrets.set(name, (await core.readNamespacedSecret({ name, namespace })).data ?? {});
        } catch (error) {
          secrets.set(name, apiStatus(error) === 404 ? 'missing' : 'unreadable');
        }
      }
      const current = await core.readNamespacedSecret({ name: mirror, namespace });
      const plan = planMirror(this.sources, secrets, current.data);
      const report = JSON.stringify(plan.problems);
      if (report !== this.reported) {
        this.reported = report;
        for (const problem of plan.problems) logger.warn(problem, 'upstream credentials of a rule not mirrored: until its Secret has keys username and password, the proxies keep their last good config');
      }
      if (sameData(current.data, plan.data)) return 'unchanged';
      // resourceVersion guards against a concurrent writer (the other webhook replica): a conflict
      // is retried by the next run, which reads again.
      await core.replaceNamespacedSecret({ name: mirror, namespace, body: { ...current, data: { ...plan.data } } });
      logger.info({ secret: mirror, rules: [...this.sources.keys()].filter((rule) => `${rule}.username` in plan.data) }, 'upstream credentials mirrored');
      return 'updated';
    } catch (error) {
      // 409: the other replica wrote it first; read again at once. Anything else is worth a line.
      const conflict = apiStatus(error) === 409;
      if (!conflict) logger.error({ secret: mirror, error: apiMessage(error) }, 'upstream credentials mirror failed; retrying');
      const retry = setTimeout(() => void this.reconcile(), conflict ? 100 : 5000);
      retry.unref();
      return 'failed';
    }
  }

  /** One watch per source Secret, by name (what the Role allows); each event reconciles. */
  private updateWatches(): void {
    const wanted = new Set(this.sources.values());
    for (const [name, watch] of this.watches) {
      if (!wanted.has(name)) {
        watch.stop();
        this.watches.delete(name);
      }
    }
    for (const name of wanted) {
      if (!this.watches.has(name) && !this.stopped) this.watches.set(name, this.watchSecret(name));
    }
  }

  private watchSecret(name: string): { stop(): void } {
    const { kubeConfig, namespace, logger } = this.options;
    return restartingWatch(kubeConfig, () => `/api/v1/namespaces/${namespace}/secrets`, () => ({ fieldSelector: `metadata.name=${name}` }), () => void this.reconcile(), logger, { secret: name, msg: 'credential source' });
  }

}
