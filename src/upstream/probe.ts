// Connection probing: each rule's upstream `/v2/` through its transport, auth included, on a timer.
// Probes run beside pulls and never block them.

import { Gauge, type Registry } from 'prom-client';
import type { Logger } from '../log.js';
import { UpstreamAuthError } from './authorizer.js';
import type { Config } from '../rules/config.js';
import type { RuleUpstream } from './rule.js';

export interface UpstreamStatus {
  readonly rule: string;
  readonly upstream: string;
  readonly via: string;
  readonly reachable: boolean | null;
  /** null: not checked (no credentials to check with, e.g. passthrough, or not probed yet). */
  readonly authOk: boolean | null;
  readonly latencyMs: number | null;
  readonly lastError: string | null;
  readonly lastSuccess: string | null;
  readonly lastCheck: string | null;
}

/** What is probed: the rules of the config in force and their upstreams. */
export interface ProbeTargets {
  readonly config: Pick<Config, 'registries'>;
  readonly rules: ReadonlyMap<string, RuleUpstream>;
}

export class Prober {
  private readonly status = new Map<string, UpstreamStatus>();
  private timer: NodeJS.Timeout | undefined;
  /** Other checks run on the probes' schedule (the registry listener's claim, src/proxy/listener.ts). */
  private readonly checks: Array<() => Promise<unknown>> = [];
  private readonly up: Gauge<'rule'>;
  private readonly authOk: Gauge<'rule'>;
  private readonly latency: Gauge<'rule'>;

  constructor(
    private readonly runtime: () => ProbeTargets | undefined,
    registry: Registry,
    private readonly intervalMs = 30_000,
    private readonly timeoutMs = 10_000,
    /** Hears state changes: a warning when a rule goes down (with the error), info when it is up. */
    private readonly logger?: Logger,
  ) {
    this.up = new Gauge({ name: 'pullbridge_upstream_up', help: '1 when the last probe reached the upstream', labelNames: ['rule'], registers: [registry] });
    this.authOk = new Gauge({ name: 'pullbridge_upstream_auth_ok', help: '1 when the last probe authenticated (-1: not checkable)', labelNames: ['rule'], registers: [registry] });
    this.latency = new Gauge({ name: 'pullbridge_upstream_probe_seconds', help: 'Duration of the last probe', labelNames: ['rule'], registers: [registry] });
  }

  /** Runs `check` at start() and every interval after, beside the upstream probes. */
  schedule(check: () => Promise<unknown>): void {
    this.checks.push(check);
  }

  start(): void {
    const tick = () => {
      void this.probeAll();
      for (const check of this.checks) void check();
    };
    tick();
    this.timer = setInterval(tick, this.intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  statuses(): UpstreamStatus[] {
    const runtime = this.runtime();
    if (!runtime) return [];
    return runtime.config.registries.map(
      (rule) =>
        this.status.get(rule.name) ?? {
          rule: rule.name,
          upstream: rule.upstream,
          via: rule.forwardProxy ? `${rule.forwardProxy.mode} ${rule.forwardProxy.url}` : 'direct',
          reachable: null,
          authOk: null,
          latencyMs: null,
          lastError: null,
          lastSuccess: null,
          lastCheck: null,
        },
    );
  }

  async probeAll(): Promise<UpstreamStatus[]> {
    const runtime = this.runtime();
    if (!runtime) return [];
    return Promise.all([...runtime.rules.values()].map((rr) => this.probe(rr)));
  }

  /** Logs a change of a rule's state only, not every probe: once down, once recovered. */
  private logChange(previous: UpstreamStatus | undefined, status: UpstreamStatus, ok: boolean): void {
    const wasOk = previous === undefined ? undefined : previous.reachable === true && previous.authOk !== false && previous.lastError === null;
    if (wasOk === ok) return;
    const fields = { rule: status.rule, upstream: status.upstream, via: status.via, reachable: status.reachable, authenticated: status.authOk };
    if (!ok) this.logger?.warn({ ...fields, error: status.lastError }, previous === undefined ? 'upstream probe failed' : 'upstream went down');
    else this.logger?.info({ ...fields, latencyMs: status.latencyMs }, previous === undefined ? 'upstream probe ok' : 'upstream recovered');
  }

  private async probe(rr: RuleUpstream): Promise<UpstreamStatus> {
    const rule = rr.rule;
    const started = performance.now();
    const previous = this.status.get(rule.name);
    let reachable = false;
    let authOk: boolean | null = null;
    let lastError: string | null = null;
    let credentials;
    let credentialError: string | null = null;
    try {
      credentials = rule.auth.mode === 'passthrough' ? undefined : rr.upstreamCredentials();
    } catch (error) {
      // Unreadable credentials are an auth problem; reachability is still worth knowing.
      credentialError = (error as Error).message;
    }
    try {
      const res = await rr.client.fetch({ method: 'GET', path: '/v2/', headers: {}, scope: '', credentials, signal: AbortSignal.timeout(this.timeoutMs), lane: 'metadata' });
      await res.body.dump();
      reachable = true;
      if (res.statusCode === 200) authOk = true;
      else if (res.unauthorized) {
        // Passthrough rules have no credentials of their own: a challenge is the expected answer.
        authOk = rule.auth.mode === 'passthrough' ? null : false;
        if (authOk === false) lastError = 'upstream rejected the configured credentials';
      } else lastError = `upstream /v2/ answered ${res.statusCode}`;
    } catch (error) {
      if (error instanceof UpstreamAuthError) {
        reachable = true;
        authOk = false;
      }
      const code = (error as { code?: string }).code;
      lastError = code ? `${code}: ${(error as Error).message}` : (error as Error).message;
    }
    if (credentialError !== null) {
      authOk = false;
      lastError = credentialError;
    }
    const latencyMs = Math.round((performance.now() - started) * 10) / 10;
    const now = new Date().toISOString();
    const ok = reachable && authOk !== false && lastError === null;
    const status: UpstreamStatus = {
      rule: rule.name,
      upstream: rule.upstream,
      via: rule.forwardProxy ? `${rule.forwardProxy.mode} ${rule.forwardProxy.url}` : 'direct',
      reachable,
      authOk,
      latencyMs,
      lastError,
      lastSuccess: ok ? now : (previous?.lastSuccess ?? null),
      lastCheck: now,
    };
    this.status.set(rule.name, status);
    this.logChange(previous, status, ok);
    this.up.set({ rule: rule.name }, reachable ? 1 : 0);
    this.authOk.set({ rule: rule.name }, authOk === null ? -1 : authOk ? 1 : 0);
    this.latency.set({ rule: rule.name }, latencyMs / 1000);
    return status;
  }
}
