// The webhook's HTTP(S) shell: express routes around the pure admission decision, audit log, metrics.

import type { RequestListener } from 'node:http';
import { TLSSocket } from 'node:tls';
import express, { type NextFunction, type Request, type Response } from 'express';
import { Counter, Histogram, type Registry } from 'prom-client';
import type { Logger } from '../log.js';
import type { Config } from '../rules/config.js';
import { pointsAtProxy } from '../rules/decide.js';
import { decideCaller, dnsNamesOf, type PeerCertificate } from './clientauth.js';
import { ADMISSION_BODY_LIMIT_BYTES, admissionDenial, admissionResponse, admitPod, admitReplicaSet, admitReplicaSetUpdate, isPodUpdateWithoutImageChange, isReplicaSetCreate, isReplicaSetUpdate, leftUnchanged, parseAdmissionReview, type AdmissionContext, type AdmissionOutcome, type AdmissionRequest } from './admission.js';
import { budgetFor, decideWithUpstream, type UpstreamAccess } from './upstream.js';
import { needsDigest, type AnswerBook } from './upstreamplan.js';

export const DEFAULT_BODY_LIMIT_BYTES = ADMISSION_BODY_LIMIT_BYTES;

export interface WebhookSideEffects {
  /** Labels of a namespace, for namespace opt-out; undefined when unknown. */
  namespaceLabels?(namespace: string): Promise<Readonly<Record<string, string>> | undefined>;
  /** Makes sure the pull secret exists in the namespace (never called on dryRun). */
  ensurePullSecret?(namespace: string, name: string): Promise<void>;
}

export interface WebhookAppOptions {
  /** The config in force; called per request so that reloads take effect at once. */
  readonly config: () => Config;
  readonly logger: Logger;
  /** Receives one record per admission decision. */
  readonly audit: Logger;
  readonly metrics: Registry;
  readonly sideEffects?: WebhookSideEffects;
  readonly bodyLimitBytes?: number;
  /** Whether the server should report ready (false while draining or before config loads). */
  readonly ready?: () => boolean;
  /** What happens when the pull secret cannot be provisioned: deny the Pod, or admit it unchanged. */
  readonly pullSecretFailure?: 'deny' | 'admit-unchanged';
  /**
   * POST /mutate only from a caller whose client certificate the TLS layer verified against the
   * client CA (see listen()), and whose CN or a DNS SAN is in `allowedNames` when that is given.
   */
  readonly clientAuth?: { readonly allowedNames?: readonly string[] };
  /** How rules with rewrite: private-only, pinDigest or verify reach the upstream, and the review's budget. */
  readonly upstream?: UpstreamAccess;
}

/** The chart's default webhook timeoutSeconds. */
export const DEFAULT_WEBHOOK_TIMEOUT_SECONDS = 5;

/**
 * The part of a review's budget kept for provisioning pull secrets after the upstream questions:
 * a quarter, at most a second. The namespace-labels read and the questions share the rest.
 */
export function pullSecretReserveMs(budgetMs: number): number {
  return Math.min(1000, budgetMs / 4);
}

/** `work`'s value, or `timedOut` once `ms` have passed; the timer never outlives the race. */
async function within<T, U>(work: Promise<T>, ms: number, timedOut: U): Promise<T | U> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<U>((resolve) => {
    timer = setTimeout(() => resolve(timedOut), Math.max(0, ms));
  });
  try {
    return await Promise.race([work, late]);
  } finally {
    clearTimeout(timer);
  }
}

interface WebhookMetrics {
  admissions: Counter<'result'>;
  rewrites: Counter<'rule'>;
  duration: Histogram<'result'>;
  pullSecretFailures: Counter;
  upstreamDecisions: Counter<'rule' | 'question' | 'outcome'>;
}

function registerMetrics(registry: Registry): WebhookMetrics {
  return {
    admissions: new Counter({ name: 'pullbridge_admissions_total', help: 'Admission requests by result', labelNames: ['result'], registers: [registry] }),
    rewrites: new Counter({ name: 'pullbridge_image_rewrites_total', help: 'Images rewritten, by rule', labelNames: ['rule'], registers: [registry] }),
    upstreamDecisions: new Counter({
      name: 'pullbridge_upstream_decisions_total',
      help: 'Image decisions that asked the upstream, by rule, question (probe, digest, signature) and outcome',
      labelNames: ['rule', 'question', 'outcome'],
      registers: [registry],
    }),
    pullSecretFailures: new Counter({ name: 'pullbridge_pull_secret_failures_total', help: 'Admissions whose pull secret could not be provisioned (the Pod was denied or admitted unchanged, per pullSecretFailure)', registers: [registry] }),
    duration: new Histogram({
      name: 'pullbridge_admission_duration_seconds',
      help: 'Time to answer an admission request',
      labelNames: ['result'],
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers: [registry],
    }),
  };
}

function badRequest(res: Response, status: number, message: string): void {
  res.status(status).json({ error: message });
}

/** The audit record of one decision: who asked, what was decided for each image, and why. */
function auditRecord(request: AdmissionRequest, outcome: AdmissionOutcome, result: string, durationMs: number, error?: string): Record<string, unknown> {
  const object = (request.object ?? {}) as { metadata?: { name?: string; generateName?: string } };
  return {
    audit: 'admission',
    ...(request.kind.kind !== 'Pod' ? { kind: request.kind.kind } : {}),
    uid: request.uid,
    namespace: request.namespace ?? null,
    pod: request.name ?? object.metadata?.name ?? object.metadata?.generateName ?? null,
    user: request.userInfo?.username ?? null,
    operation: request.operation,
    subResource: request.subResource ?? null,
    dryRun: request.dryRun ?? false,
    result,
    ...(outcome.skipReason ? { skipReason: outcome.skipReason } : {}),
    ...(outcome.detail ? { detail: outcome.detail } : {}),
    images: outcome.containers,
    pullSecret: outcome.pullSecret,
    ...(outcome.upstreamPullSecrets.length > 0 ? { upstreamPullSecrets: outcome.upstreamPullSecrets } : {}),
    ...(outcome.originalImagesOmitted ? { originalImagesOmitted: outcome.originalImagesOmitted } : {}),
    ...(error ? { error } : {}),
    durationMs: Math.round(durationMs * 1000) / 1000,
  };
}

/** What the TLS layer learnt about the caller's certificate; nothing over plain HTTP. */
function peerCertificate(req: Request): PeerCertificate {
  const socket = req.socket;
  if (!(socket instanceof TLSSocket)) return { presented: false, verified: false, dnsNames: [] };
  const cert = socket.getPeerCertificate();
  if (!cert || Object.keys(cert).length === 0) return { presented: false, verified: false, dnsNames: [] };
  // Node types the reason as an Error; at run time it may be OpenSSL's code as a string.
  const error: unknown = socket.authorizationError;
  const verifyError = typeof error === 'string' ? error : error instanceof Error ? error.message : undefined;
  const cn: unknown = cert.subject?.CN;
  const commonName = typeof cn === 'string' ? cn : Array.isArray(cn) && typeof cn[0] === 'string' ? cn[0] : undefined;
  return { presented: true, verified: socket.authorized, ...(verifyError ? { verifyError } : {}), ...(commonName !== undefined ? { commonName } : {}), dnsNames: dnsNamesOf(cert.subjectaltname) };
}

export function createWebhookApp(options: WebhookAppOptions): express.Express {
  const { logger, audit, metrics: registry } = options;
  const metrics = registerMetrics(registry);
  const upstream: UpstreamAccess = options.upstream ?? { budgetMs: budgetFor(DEFAULT_WEBHOOK_TIMEOUT_SECONDS) };
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);

  app.get('/healthz', (_req, res) => {
    res.type('text/plain').send('ok');
  });
  app.get('/readyz', (_req, res) => {
    const ready = options.ready?.() ?? true;
    res.status(ready ? 200 : 503).type('text/plain').send(ready ? 'ready' : 'not ready');
  });
  app.get('/metrics', async (_req, res) => {
    res.type(registry.contentType).send(await registry.metrics());
  });

  const requireClientCertificate = (req: Request, res: Response, next: NextFunction) => {
    const clientAuth = options.clientAuth;
    if (!clientAuth) return next();
    const peer = peerCertificate(req);
    const decision = decideCaller(peer, clientAuth.allowedNames);
    if (decision.allowed) return next();
    // Refused before the body is read: a forged review never reaches the decision or its side effects.
    metrics.admissions.inc({ result: 'refused' });
    audit.warn(
      {
        audit: 'refused',
        method: req.method,
        path: req.path,
        status: decision.status,
        reason: decision.reason,
        remoteAddress: req.socket.remoteAddress ?? null,
        certificate: peer.presented ? { commonName: peer.commonName ?? null, dnsNames: peer.dnsNames } : null,
      },
      'request refused',
    );
    badRequest(res, decision.status, decision.status === 401 ? `a client certificate signed by the webhook's client CA is required (${decision.reason})` : decision.reason);
  };

  app.post(
    '/mutate',
    (_req, res, next) => {
      // The review's one deadline counts from here: body, namespace labels, questions, pull secrets.
      res.locals.arrived = process.hrtime.bigint();
      next();
    },
    requireClientCertificate,
    (req, res, next) => {
      if (!req.is('application/json')) {
        badRequest(res, 415, 'Content-Type must be application/json (an admission.k8s.io/v1 AdmissionReview)');
        return;
      }
      next();
    },
    express.json({ limit: options.bodyLimitBytes ?? DEFAULT_BODY_LIMIT_BYTES, strict: true }),
    async (req, res) => {
      const started = typeof res.locals.arrived === 'bigint' ? res.locals.arrived : process.hrtime.bigint();
      const elapsedMs = () => Number(process.hrtime.bigint() - started) / 1e6;
      const parsed = parseAdmissionReview(req.body);
      if (!parsed.ok) {
        metrics.admissions.inc({ result: 'invalid' });
        logger.warn({ error: parsed.error }, 'rejected malformed AdmissionReview');
        badRequest(res, 400, parsed.error);
        return;
      }
      const request = parsed.request;
      let outcome: AdmissionOutcome;
      let result: string;
      let error: string | undefined;
      let body;
      try {
        const config = options.config();
        const namespace = request.namespace;
        const replicaSet = isReplicaSetCreate(request);
        const replicaSetUpdate = isReplicaSetUpdate(request);
        // A ReplicaSet under a config that pins nothing, and a Pod UPDATE that changes no image, are
        // answered without any call (they are skipped).
        const pins = (!replicaSet || config.registries.some(needsDigest)) && !replicaSetUpdate && !isPodUpdateWithoutImageChange(request);
        // Labels and questions share the budget less the pull secrets' reserve; unknown labels in
        // time count as no opt-out, as a failed read does.
        const questionsBudgetMs = upstream.budgetMs - pullSecretReserveMs(upstream.budgetMs);
        const readLabels = options.sideEffects?.namespaceLabels;
        const namespaceLabels = pins && namespace && readLabels ? await within(readLabels(namespace), questionsBudgetMs - elapsedMs(), undefined) : undefined;
        const context: AdmissionContext = namespaceLabels ? { namespaceLabels } : {};
        const admit = replicaSetUpdate ? (_config: Config, r: AdmissionRequest) => admitReplicaSetUpdate(r) : replicaSet ? admitReplicaSet : admitPod;
        ({ outcome } = await decideWithUpstream((answers: AnswerBook) => admit(config, request, { ...context, answers }), { ...upstream, budgetMs: questionsBudgetMs }, elapsedMs()));
        result = outcome.decision;
        body = outcome.denial !== undefined ? admissionDenial(request.uid, 403, outcome.denial) : admissionResponse(request.uid, outcome);
        const secrets = [...(outcome.pullSecret !== null ? [outcome.pullSecret] : []), ...outcome.upstreamPullSecrets];
        const ensure = options.sideEffects?.ensurePullSecret;
        if (secrets.length > 0 && namespace && !request.dryRun && ensure) {
          let failed = secrets[0];
          try {
            const provisioned = Promise.all(secrets.map((name) => ensure(namespace, name).catch((cause: unknown) => {
              failed = name;
              throw cause;
            })));
            const late = Symbol('late');
            if ((await within(provisioned, upstream.budgetMs - elapsedMs(), late)) === late) {
              provisioned.catch(() => {});
              throw new Error(`not done within the review's budget of ${upstream.budgetMs} ms`);
            }
          } catch (cause) {
            metrics.pullSecretFailures.inc();
            error = `could not provision pull secret "${failed ?? ''}" in namespace "${namespace}": ${cause instanceof Error ? cause.message : String(cause)}`;
            if (options.pullSecretFailure === 'admit-unchanged') {
              // The audit record shows the Pod as admitted: no image rewritten.
              outcome = leftUnchanged(outcome, error);
              result = 'unchanged-after-error';
              body = admissionResponse(request.uid, outcome);
            } else {
              result = 'denied';
              body = admissionDenial(request.uid, 500, `pullbridge: ${error}`);
            }
          }
        }
      } catch (cause) {
        // A bug must not block Pod creation cluster-wide: admit unchanged and say so loudly.
        error = cause instanceof Error ? cause.message : String(cause);
        logger.error({ err: cause, uid: request.uid }, 'admission decision failed; admitting unchanged');
        outcome = { decision: 'unchanged', containers: [], patch: [], pullSecret: null, upstreamPullSecrets: [], warnings: [], questions: [] };
        result = 'error';
        body = admissionResponse(request.uid, outcome);
      }
      const durationMs = elapsedMs();
      metrics.admissions.inc({ result });
      metrics.duration.observe({ result }, durationMs / 1000);
      if (result === 'mutated') {
        // One increment per rule: prom-client's per-call label handling is not free.
        const perRule = new Map<string, number>();
        const current = options.config();
        for (const c of outcome.containers) if (c.rule !== null && pointsAtProxy(current, c.rewritten)) perRule.set(c.rule, (perRule.get(c.rule) ?? 0) + 1);
        for (const [rule, n] of perRule) metrics.rewrites.inc({ rule }, n);
      }
      for (const c of outcome.containers) {
        const facts = c.upstream;
        if (facts === undefined || c.rule === null) continue;
        if (facts.probe) metrics.upstreamDecisions.inc({ rule: c.rule, question: 'probe', outcome: facts.probe.outcome });
        if (facts.digest) metrics.upstreamDecisions.inc({ rule: c.rule, question: 'digest', outcome: 'error' in facts.digest ? 'failed' : facts.digest.pinned ? `pinned-${facts.digest.source}` : facts.digest.source });
        if (facts.signature) metrics.upstreamDecisions.inc({ rule: c.rule, question: 'signature', outcome: facts.signature.verified ? 'verified' : `unverified-${facts.signature.onFailure ?? 'deny'}` });
      }
      audit.info(auditRecord(request, outcome, result, durationMs, error), 'admission');
      res.json(body);
    },
  );

  app.use((_req, res) => {
    badRequest(res, 404, 'not found: POST /mutate, GET /healthz, /readyz, /metrics');
  });

  // body-parser errors carry a status and a type; anything else is our fault.
  app.use((err: unknown, _req: Request, res: Response, _next: NextFunction) => {
    const e = err as { status?: number; type?: string; message?: string; limit?: number };
    if (e.type === 'entity.parse.failed') {
      metrics.admissions.inc({ result: 'invalid' });
      badRequest(res, 400, `body is not valid JSON: ${e.message ?? ''}`.trim());
    } else if (e.type === 'entity.too.large') {
      metrics.admissions.inc({ result: 'invalid' });
      badRequest(res, 413, `body is larger than the limit of ${e.limit ?? options.bodyLimitBytes ?? DEFAULT_BODY_LIMIT_BYTES} bytes`);
    } else if (typeof e.status === 'number' && e.status >= 400 && e.status < 500) {
      badRequest(res, e.status, e.message ?? 'bad request');
    } else {
      logger.error({ err }, 'unhandled error');
      badRequest(res, 500, 'internal error');
    }
  });
  return app;
}

/** GET /metrics alone, for a plain-HTTP port of its own: a NetworkPolicy can open that port to
 * Prometheus without letting Prometheus reach POST /mutate. */
export function createMetricsHandler(registry: Registry): RequestListener {
  return (req, res) => {
    if (req.method !== 'GET' || new URL(req.url ?? '/', 'http://metrics').pathname !== '/metrics') {
      res.writeHead(404, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'not found: GET /metrics' }));
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
      () => res.writeHead(500, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'internal error' })),
    );
  };
}
