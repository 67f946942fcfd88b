// The I/O half of upstream-aware admission: answers the questions the pure decision (admitPod,
// admitReplicaSet with an AnswerBook) leaves open, concurrently, each question once per review, all
// under one deadline for the whole review, and decides again until nothing is missing or the
// deadline passed. A review that asks nothing never waits here.

import { setMaxListeners } from 'node:events';
import type { ProbeAnswer, ManifestAnswer, RegistryTarget, RegistryView } from '../rules/registryview.js';
import { AnswerBook, NO_UPSTREAM, type PinsAnswer, type SignatureAnswer, type UpstreamQuestion } from './upstreamplan.js';

/**
 * Checks the signature of `digest` in a rule's repository (cosign: the `sha256-<hex>.sig` tag or a
 * referrer), through the proxy tier with the namespace's authorization. Resolves, never rejects, for
 * an answer; a rejection or no answer by `signal` counts as not verified.
 */
export type SignatureCheck = (target: RegistryTarget, digest: string, namespace: string, signal: AbortSignal) => Promise<SignatureAnswer>;

/** The pinned digests of a ReplicaSet (its annotation), or null when it has none. */
export type ReplicaSetPinsReader = (namespace: string, name: string, uid: string, signal: AbortSignal) => Promise<Readonly<Record<string, string>> | null>;

export interface UpstreamAccess {
  /** The proxy tier; absent: every question fails with "no access to the proxy tier". */
  readonly view?: RegistryView;
  readonly signatureCheck?: SignatureCheck;
  readonly replicaSetPins?: ReplicaSetPinsReader;
  /** The budget of one review for all its questions, in milliseconds (fits the apiserver's webhook timeout). */
  readonly budgetMs: number;
}

/** The webhook's timeout less what the apiserver's call, TLS and the answer itself take: at most a second, at most half. */
export function budgetFor(timeoutSeconds: number): number {
  const timeoutMs = timeoutSeconds * 1000;
  return Math.max(1, timeoutMs - Math.min(1000, timeoutMs / 2));
}

/** Rounds of questions a review may take: ReplicaSet pins, then probes and tags, then signatures. */
const MAX_ROUNDS = 4;
/** Listeners one review's signal may hold: one per question in flight and per proxy attempt; beyond Node's default 10 without a leak. */
const REVIEW_SIGNAL_MAX_LISTENERS = 1000;

/**
 * Distinct upstream questions one review may ask, over all its rounds (a verify image takes two: its
 * tag and its signature). A Pod may name thousands of distinct tags; answering them all would hold
 * the webhook past the apiserver's timeout and block every other admission. Above the cap nothing
 * more is asked: verify rules deny, the other rules follow onProbeFailure (docs/security.md).
 */
export const MAX_QUESTIONS_PER_REVIEW = 64;

/** The text of every answer a review over the cap did not get. */
export const overQuestionCapText = (wanted: number): string => `the review needs ${wanted} upstream answers, more than the ${MAX_QUESTIONS_PER_REVIEW} one review may ask`;

const message = (error: unknown): string => (error instanceof Error ? error.message : String(error));

/**
 * A review's deadline as one promise, resolving (never rejecting) when `signal` aborts: one abort
 * listener for the whole review, however many questions race it. `release` removes the listener.
 */
function deadlineOf(signal: AbortSignal): { readonly reached: Promise<undefined>; readonly release: () => void } {
  let onAbort = () => {};
  const reached = new Promise<undefined>((resolve) => {
    onAbort = () => resolve(undefined);
  });
  if (signal.aborted) onAbort();
  else signal.addEventListener('abort', onAbort, { once: true });
  return { reached, release: () => signal.removeEventListener('abort', onAbort) };
}

interface Deadline {
  readonly signal: AbortSignal;
  readonly reached: Promise<undefined>;
}

/** `work` or, when the deadline passes first, undefined; never rejects with the signal's reason. */
function beforeDeadline<T>(work: () => Promise<T>, deadline: Deadline): Promise<T | undefined> {
  const { signal, reached } = deadline;
  if (signal.aborted) return Promise.resolve(undefined);
  const settled = work().then(
    (value) => (signal.aborted ? undefined : value),
    (error: unknown) => {
      if (signal.aborted) return undefined;
      throw error instanceof Error ? error : new Error(String(error));
    },
  );
  return Promise.race([settled, reached]);
}

async function answer(question: UpstreamQuestion, access: UpstreamAccess, book: AnswerBook, deadline: Deadline): Promise<void> {
  const view = access.view;
  const signal = deadline.signal;
  switch (question.kind) {
    case 'probe': {
      const result: ProbeAnswer | undefined = view ? await beforeDeadline(() => view.probeAnonymous(question.target, signal), deadline).catch((e: unknown) => ({ kind: 'failed' as const, error: message(e) })) : { kind: 'failed', error: NO_UPSTREAM };
      if (result !== undefined) book.probes.set(question.key, result);
      return;
    }
    case 'digest': {
      const result: ManifestAnswer | undefined = view ? await beforeDeadline(() => view.manifest({ ...question.target, method: 'HEAD' }, signal), deadline).catch((e: unknown) => ({ kind: 'failed' as const, error: message(e) })) : { kind: 'failed', error: NO_UPSTREAM };
      if (result !== undefined) book.digests.set(question.key, result);
      return;
    }
    case 'signature': {
      const check = access.signatureCheck;
      const { digest, namespace, ...target } = question.target;
      const result: SignatureAnswer | undefined = check ? await beforeDeadline(() => check(target, digest, namespace, signal), deadline).catch((e: unknown) => ({ verified: false as const, reason: `the signature check failed: ${message(e)}` })) : { verified: false, reason: 'the webhook has no signature verifier' };
      if (result !== undefined) book.signatures.set(question.key, result);
      return;
    }
    case 'replicaset': {
      const read = access.replicaSetPins;
      let result: PinsAnswer | undefined;
      if (!read) result = { kind: 'none', detail: 'the webhook has no Kubernetes API access' };
      else {
        result = await beforeDeadline(() => read(question.namespace, question.name, question.uid, signal), deadline).then(
          (pins): PinsAnswer | undefined => (pins === undefined ? undefined : pins === null ? { kind: 'none', detail: `ReplicaSet ${question.name} has no pinned digests` } : { kind: 'found', pins }),
          (e: unknown): PinsAnswer => ({ kind: 'none', detail: `ReplicaSet ${question.name} could not be read: ${message(e)}`, unusable: true }),
        );
      }
      if (result !== undefined) book.replicaSets.set(question.key, result);
      return;
    }
  }
}

/**
 * Runs `decide` (a pure decision over an AnswerBook) until it has no questions left, answering each
 * round's questions concurrently; past the budget (less `spentMs`, what the review already spent
 * before its questions), over MAX_QUESTIONS_PER_REVIEW, or after MAX_ROUNDS, decides a last time
 * with every missing answer failed. Returns at once when the first decision asks nothing.
 */
export async function decideWithUpstream<T extends { readonly questions: readonly UpstreamQuestion[] }>(decide: (book: AnswerBook) => T, access: UpstreamAccess, spentMs = 0): Promise<{ readonly outcome: T; readonly questionsAsked: number }> {
  const book = new AnswerBook();
  let outcome = decide(book);
  if (outcome.questions.length === 0) return { outcome, questionsAsked: 0 };
  // Aborting also tells the view to drop what it still has in flight for this review.
  const controller = new AbortController();
  const signal = controller.signal;
  const timer = setTimeout(() => controller.abort(new Error(`the review's budget of ${access.budgetMs} ms is spent`)), Math.max(0, access.budgetMs - spentMs));
  // Every question of the review (and each proxy attempt) listens on this one signal.
  setMaxListeners(REVIEW_SIGNAL_MAX_LISTENERS, signal);
  const { reached, release } = deadlineOf(signal);
  const deadline: Deadline = { signal, reached };
  let asked = 0;
  let overCap: string | undefined;
  try {
    for (let round = 0; round < MAX_ROUNDS && outcome.questions.length > 0 && !signal.aborted; round++) {
      if (asked + outcome.questions.length > MAX_QUESTIONS_PER_REVIEW) {
        overCap = overQuestionCapText(asked + outcome.questions.length);
        break;
      }
      asked += outcome.questions.length;
      await Promise.all(outcome.questions.map((q) => answer(q, access, book, deadline)));
      outcome = decide(book);
    }
  } finally {
    clearTimeout(timer);
    release();
  }
  if (outcome.questions.length === 0) return { outcome, questionsAsked: asked };
  if (overCap !== undefined) book.overQuestionCap = true;
  book.final = overCap ?? (signal.aborted ? `no answer within the review's budget of ${access.budgetMs} ms` : 'too many rounds of questions');
  book.takeQuestions();
  return { outcome: decide(book), questionsAsked: asked };
}
