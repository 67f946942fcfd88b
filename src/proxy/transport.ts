// How a rule's requests reach its upstream: directly, through an HTTP CONNECT proxy, or through a
// forwarding (connectivity) proxy that takes plain HTTP and routes on the Host header. One undici
// dispatcher per rule, pooling keep-alive connections per origin. Every request on it goes through
// dispatchRequest (body.ts), which is what lets its sockets reuse their read buffers.

import { readFileSync } from 'node:fs';
import { Agent, ProxyAgent, type Dispatcher } from 'undici';
import type { Rule } from '../rules/config.js';
import { SecretFile } from '../shell/secretfiles.js';
import { socketReadOptions } from './readbuffers.js';

export interface TransportTimeouts {
  readonly connectMs: number;
  readonly headersMs: number;
  /** Longest pause between two body chunks before the upstream is given up. */
  readonly bodyIdleMs: number;
}

export const DEFAULT_TIMEOUTS: TransportTimeouts = { connectMs: 10_000, headersMs: 30_000, bodyIdleMs: 60_000 };

export interface TransportOptions {
  readonly timeouts?: TransportTimeouts;
  /** Name resolution, injectable so that tests can simulate failures without a DNS server. */
  readonly lookup?: (hostname: string, options: object, callback: (err: NodeJS.ErrnoException | null, address: string | Array<{ address: string; family: number }>, family?: number) => void) => void;
}

export function createTransport(rule: Rule, options: TransportOptions = {}): Dispatcher {
  const timeouts = options.timeouts ?? DEFAULT_TIMEOUTS;
  const ca = rule.tls?.caFile ? readFileSync(rule.tls.caFile, 'utf8') : undefined;
  const tls = {
    ...(ca ? { ca } : {}),
    rejectUnauthorized: !(rule.tls?.insecureSkipVerify ?? false),
    timeout: timeouts.connectMs,
    ...(options.lookup ? { lookup: options.lookup } : {}),
  };
  const common = {
    headersTimeout: timeouts.headersMs,
    bodyTimeout: timeouts.bodyIdleMs,
    keepAliveTimeout: 30_000,
    connections: 64,
  };
  const forward = rule.forwardProxy;
  // Large reads into reused buffers for direct upstreams; through a forwarding proxy, Node's default.
  if (!forward) return new Agent({ ...common, connect: { ...tls, onread: socketReadOptions() } });

  const headers: Record<string, string> = { ...forward.headers };
  if (forward.credentials) {
    const user = forward.credentials.username ?? new SecretFile(forward.credentials.usernameFile ?? '').read();
    const password = new SecretFile(forward.credentials.passwordFile ?? '').read();
    headers['proxy-authorization'] = `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
  }
  return new ProxyAgent({
    ...common,
    uri: forward.url,
    headers,
    // connect: CONNECT tunnel (TLS to the upstream inside it); forward: absolute-form plain HTTP.
    proxyTunnel: forward.mode === 'connect',
    requestTls: tls,
    proxyTls: { timeout: timeouts.connectMs, ...(options.lookup ? { lookup: options.lookup } : {}) },
  });
}
