// Whether the registry listener still gets the node's pulls. With the hostNetwork exposure the proxy
// listens on the node's loopback at a port inside the NodePort range (30500 by default); a NodePort
// Service given the same port makes kube-proxy in iptables mode DNAT every loopback connection to
// it (route_localnet, nat OUTPUT) before it reaches this listener, and the node's pulls go to that
// Service, silently. So the proxy asks its own address for `/v2/` and checks that the answer carries
// its instance id. Pure judgement first; the HTTP ask and the stateful check are the thin shell.

import http from 'node:http';
import type { Registry } from 'prom-client';
import { Gauge } from 'prom-client';
import type { Logger } from '../log.js';
import { hostPort } from '../shell/serve.js';

/** The response header carrying the answering process's instance id (random, per process). */
export const INSTANCE_HEADER = 'pullbridge-instance';
/**
 * The request header by which the check names itself (the asking process's instance id): the proxy
 * that recognizes its own id leaves the request out of the access log, where a 401 every probe
 * interval would read like failed logins.
 */
export const LISTENER_CHECK_HEADER = 'pullbridge-listener-check';

/** What asking the listener's address for `/v2/` came to. */
export type ListenerObservation =
  | { readonly kind: 'answered'; readonly status: number; readonly instance: string | undefined; readonly server: string | undefined }
  | { readonly kind: 'refused' }
  | { readonly kind: 'reset' }
  | { readonly kind: 'timeout'; readonly ms: number }
  | { readonly kind: 'not-http' }
  | { readonly kind: 'error'; readonly reason: string };

export interface ListenerVerdict {
  readonly claimed: boolean;
  /** Who answered: `this proxy`, or what was seen instead (status and Server header, or the failure). */
  readonly answeredBy: string;
}

/** The listener's state as /status shows it; `claimed` and the rest are null until the first check. */
export interface ListenerStatus {
  /** `host:port` the registry listens on. */
  readonly address: string;
  readonly claimed: boolean | null;
  readonly answeredBy: string | null;
  readonly lastCheck: string | null;
}

/** A header value as it may be shown: printable ASCII, bounded (it comes from whoever answered). */
function shown(value: string): string {
  const printable = value.replace(/[^\x20-\x7e]/g, '?');
  return printable.length > 80 ? `${printable.slice(0, 80)}…` : printable;
}

/**
 * Judges one observation. `ownListenerFull`: this proxy's own connection limits were reached, so a
 * reset may be its own listener closing the check's connection on arrival; null then (no verdict).
 */
export function judgeListener(instanceId: string, seen: ListenerObservation, ownListenerFull: boolean): ListenerVerdict | null {
  switch (seen.kind) {
    case 'answered': {
      if (seen.instance === instanceId) return { claimed: true, answeredBy: 'this proxy' };
      const server = seen.server === undefined ? '' : `, Server: ${shown(seen.server)}`;
      const other = seen.instance === undefined ? '' : ` from another pullbridge proxy (instance ${shown(seen.instance)})`;
      return { claimed: false, answeredBy: `HTTP ${seen.status}${other}${server}` };
    }
    case 'refused':
      return { claimed: false, answeredBy: 'connection refused' };
    case 'reset':
      return ownListenerFull ? null : { claimed: false, answeredBy: 'connection reset' };
    case 'timeout':
      return { claimed: false, answeredBy: `no answer within ${seen.ms / 1000} s` };
    case 'not-http':
      return { claimed: false, answeredBy: 'an answer that is not HTTP' };
    case 'error':
      return { claimed: false, answeredBy: shown(seen.reason) };
  }
}

/** What to log when the claim changes (the first verdict logs only if it is lost), else null. */
export function listenerChange(previous: ListenerStatus, next: ListenerStatus, port: number): { level: 'warn' | 'info'; message: string } | null {
  if (next.claimed === null || next.claimed === previous.claimed) return null;
  if (next.claimed) return previous.claimed === null ? null : { level: 'info', message: `${next.address} is answered by this proxy again` };
  return {
    level: 'warn',
    message:
      `${next.address} is answered by something other than this proxy (${next.answeredBy ?? 'unknown'}): is a NodePort Service using port ${port}? ` +
      `kube-proxy in iptables mode sends loopback traffic for NodePorts to that Service. Give that Service another nodePort, or set proxy.port outside the NodePort range`,
  };
}

/** The error's kind as an observation: Node's codes for refused and reset, llhttp's for a non-HTTP answer. */
function observedFailure(error: unknown): ListenerObservation {
  const code = (error as { code?: string }).code ?? '';
  if (code === 'ECONNREFUSED') return { kind: 'refused' };
  if (code === 'ECONNRESET' || code === 'EPIPE') return { kind: 'reset' };
  if (code.startsWith('HPE_')) return { kind: 'not-http' };
  return { kind: 'error', reason: code ? `${code}: ${(error as Error).message}` : (error as Error).message };
}

const single = (value: string | string[] | undefined): string | undefined => (Array.isArray(value) ? value[0] : value);

/**
 * Asks `http://host:port/v2/` once: a new connection (a kept-alive one would stay with whoever
 * answered it first), no credentials, no redirect followed (node:http never follows), only the
 * status and headers read, at most `timeoutMs`.
 */
export function askListener(host: string, port: number, timeoutMs: number, instanceId?: string): Promise<ListenerObservation> {
  return new Promise((resolve) => {
    const headers: Record<string, string> = { connection: 'close', ...(instanceId !== undefined ? { [LISTENER_CHECK_HEADER]: instanceId } : {}) };
    const req = http.request({ host, port, path: '/v2/', method: 'GET', agent: false, headers, maxHeaderSize: 8192 });
    const timer = setTimeout(() => {
      resolve({ kind: 'timeout', ms: timeoutMs });
      req.destroy();
    }, timeoutMs);
    req.on('response', (res) => {
      clearTimeout(timer);
      resolve({ kind: 'answered', status: res.statusCode ?? 0, instance: single(res.headers[INSTANCE_HEADER]), server: single(res.headers.server) });
      res.destroy();
    });
    req.on('error', (error) => {
      clearTimeout(timer);
      resolve(observedFailure(error));
    });
    req.end();
  });
}

export interface ListenerCheckOptions {
  /** Where the registry listens. */
  readonly listening: { readonly host: string; readonly port: number };
  /** Where the check dials; the listening address when not given (tests point it at a stand-in). */
  readonly dial?: { readonly host: string; readonly port: number };
  readonly instanceId: string;
  readonly metrics: Registry;
  readonly logger: Logger;
  /** Whether this proxy's own listener is at a connection limit for the check's source address. */
  readonly ownListenerFull?: (source: string) => boolean;
  readonly timeoutMs?: number;
}

/** The registry listener's claim on its address: checked on demand (the prober's schedule), one check at a time. */
export class ListenerCheck {
  private current: ListenerStatus;
  private running: Promise<ListenerStatus> | undefined;
  private readonly gauge: Gauge;

  constructor(private readonly options: ListenerCheckOptions) {
    this.current = { address: hostPort(options.listening.host, options.listening.port), claimed: null, answeredBy: null, lastCheck: null };
    this.gauge = new Gauge({ name: 'pullbridge_proxy_listener_claimed', help: "1 when the registry listener's own address is answered by this proxy, 0 when something else answers it (e.g. a NodePort Service on the same port, through kube-proxy's iptables rules)", registers: [options.metrics] });
  }

  status(): ListenerStatus {
    return this.current;
  }

  /** False once something else answers the address; true before the first check. */
  claimed(): boolean {
    return this.current.claimed !== false;
  }

  check(): Promise<ListenerStatus> {
    this.running ??= this.checkOnce().finally(() => {
      this.running = undefined;
    });
    return this.running;
  }

  private async checkOnce(): Promise<ListenerStatus> {
    const { host, port } = this.options.dial ?? this.options.listening;
    const seen = await askListener(host, port, this.options.timeoutMs ?? 5_000, this.options.instanceId);
    const full = seen.kind === 'reset' && (this.options.ownListenerFull?.(this.options.listening.host) ?? false);
    const verdict = judgeListener(this.options.instanceId, seen, full);
    if (verdict === null) return this.current;
    const previous = this.current;
    this.current = { address: previous.address, claimed: verdict.claimed, answeredBy: verdict.answeredBy, lastCheck: new Date().toISOString() };
    this.gauge.set(verdict.claimed ? 1 : 0);
    const change = listenerChange(previous, this.current, this.options.listening.port);
    if (change) this.options.logger[change.level]({ listener: this.current }, change.message);
    return this.current;
  }
}
