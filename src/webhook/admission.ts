// AdmissionReview in, JSON patch and audit facts out. Pure: no I/O, no clock.

import type { Operation } from 'fast-json-patch';
import { z } from 'zod';
import { ALWAYS_EXCLUDED_NAMESPACES, type Config } from '../rules/config.js';
import { decideImage, pointsAtProxy, ruleByName, type DecisionReason } from '../rules/decide.js';
import { ORIGINAL_IMAGES_ANNOTATION, PINNED_DIGESTS_ANNOTATION, REWRITTEN_LABEL, UPSTREAM_PULL_SECRET_LABEL } from '../rules/marks.js';
import { upstreamPullSecretName } from '../rules/upstreamsecret.js';
import { REFERENCE_LENGTH_MAX, parseReference } from '../reference/reference.js';
import { AnswerBook, NO_UPSTREAM, needsDigest, pinForReplicaSet, settleImage, type ReplicaSetOwner, type UpstreamFacts, type UpstreamQuestion } from './upstreamplan.js';

/** The apiserver's limit on all of an object's annotations together, keys plus values, in bytes
 * (TotalAnnotationSizeLimitB in k8s.io/apimachinery). */
export const TOTAL_ANNOTATION_SIZE_LIMIT_BYTES = 256 * 1024;
export const ADMISSION_API_VERSION = 'admission.k8s.io/v1';

/** Kubernetes caps request bodies at 3 MiB; an AdmissionReview carries object and oldObject. */
export const ADMISSION_BODY_LIMIT_BYTES = 7 * 1024 * 1024;

// The apiserver sets no limit on the number of containers in a Pod (its validation checks names,
// not counts), so the cap is derived from the body limit above: after defaulting, every container
// the apiserver writes into an AdmissionReview has at least these fields (kube-apiserver v1.31, with
// a one-letter name and image, the shortest termination message path and pull policy), so no review
// within the limit can hold more containers than this. A Pod with more did not come from an
// apiserver and is not processed container by container.
const SMALLEST_SERIALISED_CONTAINER = '{"name":"a","image":"b","resources":{},"terminationMessagePath":"/","terminationMessagePolicy":"File","imagePullPolicy":"Never"},';
export const MAX_CONTAINERS = Math.floor(ADMISSION_BODY_LIMIT_BYTES / SMALLEST_SERIALISED_CONTAINER.length);

const CONTAINER_FIELDS = ['initContainers', 'containers', 'ephemeralContainers'] as const;
type ContainerField = (typeof CONTAINER_FIELDS)[number];

// The envelope is checked strictly; the Pod only as far as we read it (the apiserver has already
// decoded and defaulted it, and will validate whatever we return).
const stringMap = z.record(z.string(), z.string());
// Containers are checked in place rather than parsed into copies: a Pod may list tens of thousands.
interface Container {
  readonly name: string;
  readonly image?: string;
}
const isContainer = (c: unknown): c is Container =>
  c !== null && typeof c === 'object' && typeof (c as { name?: unknown }).name === 'string' && ['string', 'undefined'].includes(typeof (c as { image?: unknown }).image);
const containerSchema = z.custom<Container>(isContainer, { message: 'must be an object with a string name and an optional string image' });
const podSchema = z.looseObject({
  metadata: z
    .looseObject({
      name: z.string().optional(),
      generateName: z.string().optional(),
      namespace: z.string().optional(),
      labels: stringMap.nullish(),
      annotations: stringMap.nullish(),
      ownerReferences: z.array(z.looseObject({ apiVersion: z.string(), kind: z.string(), name: z.string(), uid: z.string(), controller: z.boolean().nullish() })).nullish(),
    })
    .optional(),
  spec: z.looseObject({
    containers: z.array(containerSchema).nullish(),
    initContainers: z.array(containerSchema).nullish(),
    ephemeralContainers: z.array(containerSchema).nullish(),
    imagePullSecrets: z.array(z.looseObject({ name: z.string().optional() })).nullish(),
  }),
});
export type Pod = z.infer<typeof podSchema>;

const groupVersionKind = z.looseObject({ group: z.string(), version: z.string(), kind: z.string() });
const reviewSchema = z.looseObject({
  apiVersion: z.literal(ADMISSION_API_VERSION, { message: `apiVersion must be "${ADMISSION_API_VERSION}"` }),
  kind: z.literal('AdmissionReview', { message: 'kind must be "AdmissionReview"' }),
  request: z.looseObject({
    uid: z.string().min(1, 'must not be empty'),
    kind: groupVersionKind,
    resource: z.looseObject({ group: z.string(), version: z.string(), resource: z.string() }),
    subResource: z.string().optional(),
    operation: z.string(),
    namespace: z.string().optional(),
    name: z.string().optional(),
    object: z.unknown().optional(),
    oldObject: z.unknown().optional(),
    dryRun: z.boolean().optional(),
    userInfo: z.looseObject({ username: z.string().optional() }).optional(),
  }, { message: 'request is required' }),
});
export type AdmissionRequest = z.infer<typeof reviewSchema>['request'];

export type ReviewParse = { readonly ok: true; readonly request: AdmissionRequest } | { readonly ok: false; readonly error: string };

/** Validates the AdmissionReview envelope; the error names the offending field. */
export function parseAdmissionReview(body: unknown): ReviewParse {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) return { ok: false, error: 'body must be a JSON AdmissionReview object' };
  const parsed = reviewSchema.safeParse(body);
  if (parsed.success) return { ok: true, request: parsed.data.request };
  const issue = parsed.error.issues[0];
  const key = issue ? issue.path.map(String).join('.') : '';
  return { ok: false, error: `invalid AdmissionReview: ${key ? `${key}: ` : ''}${issue?.message ?? 'malformed'}` };
}

export type ContainerReason =
  | DecisionReason
  | 'pull-secret-missing-on-pod'
  /** A Pod UPDATE that keeps this container's image: nothing to decide. */
  | 'image-unchanged'
  /** The Pod carries the opt-out label: only images on the proxy under a verify rule are checked. */
  | 'pod-opted-out'
  | 'existing-ephemeral-container'
  | 'pull-secret-not-provisioned'
  /** rewrite: private-only, the probe failed and onProbeFailure: leave. */
  | 'probe-failed'
  /** pinDigest, the tag could not be resolved and onProbeFailure: leave. */
  | 'pin-failed'
  /** verify, the signature was not verified and onFailure: deny. */
  | 'signature-unverified';

export interface ContainerDecision {
  /** `containers/app`, `initContainers/setup`, `ephemeralContainers/debugger`. */
  readonly container: string;
  readonly image: string | null;
  readonly rewritten: string | null;
  readonly rule: string | null;
  readonly reason: ContainerReason;
  readonly detail?: string;
  /** What the upstream answered, for rules with rewrite: private-only, pinDigest or verify. */
  readonly upstream?: UpstreamFacts;
}

export type SkipReason = 'no-pinning-rule' | 'not-a-pod' | 'operation-not-handled' | 'no-image-changed' | 'pins-unchanged' | 'namespace-excluded' | 'namespace-opted-out' | 'pod-opted-out' | 'malformed-pod' | 'too-many-containers';

export interface AdmissionOutcome {
  readonly decision: 'mutated' | 'unchanged' | 'skipped' | 'denied';
  readonly skipReason?: SkipReason;
  readonly detail?: string;
  readonly containers: readonly ContainerDecision[];
  readonly patch: readonly Operation[];
  /** The pull secret the mutated Pod references and that must exist in its namespace, or null. */
  readonly pullSecret: string | null;
  /** The pull secrets of rewrite: never rules the Pod references and that must exist in its namespace. */
  readonly upstreamPullSecrets: readonly string[];
  /** Short messages for the user who created the Pod (AdmissionResponse warnings). */
  readonly warnings: readonly string[];
  /** Why the original-images annotation was not added, when it was not. */
  readonly originalImagesOmitted?: string;
  /** Answers the decision still needs from the upstream; the rest of the outcome is provisional while any remain. */
  readonly questions: readonly UpstreamQuestion[];
  /** verify with onFailure: deny: the review is refused with this message (the patch is not sent). */
  readonly denial?: string;
}

export interface AdmissionContext {
  /** Labels of the Pod's namespace, when the caller knows them. */
  readonly namespaceLabels?: Readonly<Record<string, string>>;
  /**
   * The upstream's answers so far. Without it nothing will be asked: a rule's upstream questions
   * count as unanswered (onProbeFailure, verify.onFailure decide), with this text.
   */
  readonly answers?: AnswerBook;
}

export { NO_UPSTREAM };
// Final and empty: it records no question and holds no answer, so one instance serves every call.
const NO_ANSWERS = new AnswerBook(NO_UPSTREAM);

/** JSON pointer escaping for a single path segment (RFC 6901). */
export const pointerSegment = (segment: string): string => segment.replace(/~/g, '~0').replace(/\//g, '~1');

const skipped = (skipReason: SkipReason, detail?: string): AdmissionOutcome => ({
  decision: 'skipped',
  skipReason,
  ...(detail !== undefined ? { detail } : {}),
  containers: [],
  patch: [],
  pullSecret: null,
  upstreamPullSecrets: [],
  warnings: [],
  questions: [],
});

/**
 * An image as audit records and warnings quote it. A string longer than any valid reference is cut:
 * records are written for every admission, and a slow log reader must not make the process hold
 * megabytes of echoed input.
 */
export function quotedImage(image: string): string {
  return image.length <= REFERENCE_LENGTH_MAX ? image : `${image.slice(0, 64)}… (${image.length} characters)`;
}

/** How many containers of all kinds an unparsed Pod lists, without copying it. */
function containerCount(object: unknown): number {
  const spec: unknown = object !== null && typeof object === 'object' ? (object as { spec?: unknown }).spec : undefined;
  if (spec === null || typeof spec !== 'object') return 0;
  return CONTAINER_FIELDS.reduce((n, field) => {
    const list: unknown = (spec as Record<string, unknown>)[field];
    return n + (Array.isArray(list) ? list.length : 0);
  }, 0);
}

/** The ReplicaSet (apps/v1) that controls a Pod, whose pinned digests the Pod's images take. */
function controllingReplicaSet(pod: Pod): ReplicaSetOwner | undefined {
  const owner = pod.metadata?.ownerReferences?.find((o) => o.controller === true);
  return owner !== undefined && owner.kind === 'ReplicaSet' && owner.apiVersion === 'apps/v1' ? { name: owner.name, uid: owner.uid } : undefined;
}

function isOptedOut(labels: Readonly<Record<string, string>> | null | undefined, key: string): boolean {
  return labels?.[key] === 'true';
}

/** Adds or overwrites one key of a string map at `base`, creating the map when absent. */
function setMapEntry(patch: Operation[], base: string, existing: Record<string, string> | null | undefined, key: string, value: string): void {
  if (existing === undefined || existing === null) patch.push({ op: 'add', path: base, value: { [key]: value } });
  else patch.push({ op: 'add', path: `${base}/${pointerSegment(key)}`, value });
}

/** Annotation keys plus values in bytes (UTF-8), as the apiserver counts them against its limit. */
export function annotationBytes(annotations: Readonly<Record<string, string>>): number {
  let total = 0;
  for (const [key, value] of Object.entries(annotations)) total += Buffer.byteLength(key) + Buffer.byteLength(value);
  return total;
}

function parseOriginalImages(value: string | undefined): Record<string, string> {
  if (value === undefined) return {};
  try {
    const parsed: unknown = JSON.parse(value);
    if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) {
      return Object.fromEntries(Object.entries(parsed).filter((e): e is [string, string] => typeof e[1] === 'string'));
    }
  } catch {
    // A hand-edited or foreign annotation is replaced rather than trusted.
  }
  return {};
}

/** The rule an image on the proxy names by its first path component, if any. */
function ruleOnProxy(config: Config, image: string): ReturnType<typeof ruleByName> {
  const parsed = parseReference(image);
  return parsed.ok ? ruleByName(config, parsed.reference.path.split('/')[0] ?? '') : undefined;
}

/** `field/name` → image of every container of an unparsed Pod (a Pod UPDATE's oldObject). */
function imagesByContainer(object: unknown): Map<string, string | undefined> {
  const images = new Map<string, string | undefined>();
  const spec: unknown = object !== null && typeof object === 'object' ? (object as { spec?: unknown }).spec : undefined;
  if (spec === null || typeof spec !== 'object') return images;
  for (const field of CONTAINER_FIELDS) {
    const list: unknown = (spec as Record<string, unknown>)[field];
    if (Array.isArray(list)) for (const c of list) if (isContainer(c)) images.set(`${field}/${c.name}`, c.image);
  }
  return images;
}

/** Whether the request is a Pod UPDATE (not a subresource) that changes no container's image. */
export function isPodUpdateWithoutImageChange(request: AdmissionRequest): boolean {
  if (request.kind.kind !== 'Pod' || request.operation !== 'UPDATE' || request.subResource) return false;
  const before = imagesByContainer(request.oldObject);
  const after = imagesByContainer(request.object);
  for (const [id, image] of after) if (before.get(id) !== image) return false;
  return true;
}

/**
 * The webhook's whole decision for one admission request: which images to rewrite, the JSON patch,
 * the pull secret the namespace needs, and the facts the audit record carries.
 */
export function admitPod(config: Config, request: AdmissionRequest, context: AdmissionContext = {}): AdmissionOutcome {
  const isPod = request.kind.kind === 'Pod' && request.kind.group === '' && request.resource.resource === 'pods';
  if (!isPod) return skipped('not-a-pod', `${request.kind.kind} (${request.resource.resource}${request.subResource ? `/${request.subResource}` : ''})`);
  const ephemeralUpdate = request.operation === 'UPDATE' && request.subResource === 'ephemeralcontainers';
  // A running Pod's image may change (kubectl set image): that image is decided as on CREATE, or it
  // would reach the node unverified. Only changed images: the others were decided at creation.
  const podUpdate = request.operation === 'UPDATE' && !request.subResource;
  if (!(request.operation === 'CREATE' && !request.subResource) && !ephemeralUpdate && !podUpdate) {
    return skipped('operation-not-handled', `${request.operation}${request.subResource ? ` ${request.subResource}` : ''}`);
  }
  if (podUpdate && isPodUpdateWithoutImageChange(request)) return skipped('no-image-changed');
  const count = containerCount(request.object);
  if (count > MAX_CONTAINERS) return skipped('too-many-containers', `${count} containers; an AdmissionReview from the apiserver holds at most ${MAX_CONTAINERS}`);
  const podParse = podSchema.safeParse(request.object);
  if (!podParse.success) {
    const issue = podParse.error.issues[0];
    return skipped('malformed-pod', issue ? `${issue.path.map(String).join('.')}: ${issue.message}` : 'object is not a Pod');
  }
  const pod = podParse.data;
  const namespace = request.namespace ?? pod.metadata?.namespace ?? 'default';
  const webhook = config.webhook;
  if (ALWAYS_EXCLUDED_NAMESPACES.includes(namespace) || namespace === webhook.namespace || webhook.excludedNamespaces.includes(namespace)) {
    return skipped('namespace-excluded', namespace);
  }
  if (isOptedOut(context.namespaceLabels, webhook.optOutLabel)) return skipped('namespace-opted-out', `${webhook.optOutLabel}=true on namespace ${namespace}`);
  // The Pod's own label is its author's choice: it skips rewriting, never verification (else anyone
  // could write the proxy's reference of an unsigned image and label the Pod). See docs/security.md.
  const verifyOnly = isOptedOut(pod.metadata?.labels, webhook.optOutLabel);
  if (verifyOnly && !config.registries.some((r) => r.verify !== undefined)) return skipped('pod-opted-out', `${webhook.optOutLabel}=true`);

  const pullSecretName = webhook.pullSecretName;
  const listed = new Set((pod.spec.imagePullSecrets ?? []).map((s) => s.name));
  const podListsPullSecret = listed.has(pullSecretName);
  const oldImages = podUpdate ? imagesByContainer(request.oldObject) : undefined;
  const oldEphemeral = new Set<string>();
  if (ephemeralUpdate) {
    const old = podSchema.safeParse(request.oldObject);
    for (const c of old.success ? (old.data.spec.ephemeralContainers ?? []) : []) oldEphemeral.add(c.name);
  }

  const containers: ContainerDecision[] = [];
  const patch: Operation[] = [];
  const warnings: string[] = [];
  const originals: Record<string, string> = {};
  let needsPullSecret = false;
  let originalImagesOmitted: string | undefined;
  const book = context.answers ?? NO_ANSWERS;
  const owner = controllingReplicaSet(pod);
  let pending = false;
  const denials: string[] = [];
  /** rewrite: never secrets the Pod needs, in the order first needed. */
  const upstreamSecrets = new Set<string>();

  // An ephemeral-container update may change nothing but new ephemeral containers: the apiserver
  // ignores metadata changes there and forbids editing existing entries.
  const fields: readonly ContainerField[] = ephemeralUpdate ? ['ephemeralContainers'] : CONTAINER_FIELDS;
  for (const field of fields) {
    (pod.spec[field] ?? []).forEach((container, index) => {
      const id = `${field}/${container.name}`;
      if (container.image === undefined) {
        containers.push({ container: id, image: null, rewritten: null, rule: null, reason: 'invalid-reference', detail: 'no image' });
        return;
      }
      const image = quotedImage(container.image);
      if (ephemeralUpdate && oldEphemeral.has(container.name)) {
        containers.push({ container: id, image, rewritten: null, rule: null, reason: 'existing-ephemeral-container' });
        return;
      }
      if (oldImages !== undefined && oldImages.get(id) === container.image) {
        containers.push({ container: id, image, rewritten: null, rule: null, reason: 'image-unchanged' });
        return;
      }
      const decision = decideImage(config, container.image, namespace);
      if (verifyOnly && !(decision.reason === 'already-proxied' && ruleOnProxy(config, container.image)?.verify !== undefined)) {
        containers.push({ container: id, image, rewritten: null, rule: null, reason: 'pod-opted-out' });
        return;
      }
      const usesBroker = decision.rule !== null && ruleByName(config, decision.rule)?.auth.mode === 'broker';
      if (decision.rewritten !== null && podUpdate && usesBroker && !podListsPullSecret) {
        // The proxy would refuse the node without the pull secret, and the Pod cannot gain it: refuse
        // the change rather than admit an image that cannot be pulled (or one left unchecked).
        const detail = `pod does not list pull secret "${pullSecretName}", which the new image needs; a Pod's pull secrets cannot change after creation: recreate the Pod (or change its Deployment)`;
        containers.push({ container: id, image, rewritten: null, rule: decision.rule, reason: 'pull-secret-missing-on-pod', detail });
        denials.push(`pullbridge: ${id} image ${image}: ${detail}`);
        return;
      }
      if (decision.rewritten !== null && ephemeralUpdate && usesBroker && !podListsPullSecret) {
        // The Pod's pull secrets cannot change after creation, so the node could not authenticate.
        const detail = `pod does not list pull secret "${pullSecretName}" (created before pullbridge handled it)`;
        containers.push({ container: id, image, rewritten: null, rule: decision.rule, reason: 'pull-secret-missing-on-pod', detail });
        warnings.push(`pullbridge: ${id} image ${image} left unchanged: ${detail}`);
        return;
      }
      const settled = settleImage(config, decision, id, namespace, book, owner);
      if (settled.pending) {
        pending = true;
        return;
      }
      const { pending: _, proxied, warning, denial: refusal, ...facts } = settled;
      if (settled.reason === 'pull-secret-only' && decision.rule !== null) {
        const rule = ruleByName(config, decision.rule);
        const secret = rule !== undefined ? upstreamPullSecretName(config, rule) : undefined;
        if (secret !== undefined && podUpdate && !listed.has(secret)) {
          const detail = `pod does not list pull secret "${secret}", which the new image needs; a Pod's pull secrets cannot change after creation: recreate the Pod (or change its Deployment)`;
          containers.push({ container: id, image, rewritten: null, rule: decision.rule, reason: 'pull-secret-missing-on-pod', detail });
          denials.push(`pullbridge: ${id} image ${image}: ${detail}`);
          return;
        }
        if (secret !== undefined && ephemeralUpdate && !listed.has(secret)) {
          // As for the broker's secret: a Pod's pull secrets cannot change after creation.
          const detail = `pod does not list pull secret "${secret}" (created before pullbridge handled it); the node pulls without it`;
          containers.push({ container: id, image, rewritten: null, rule: decision.rule, reason: 'pull-secret-missing-on-pod', detail });
          warnings.push(`pullbridge: ${id} image ${image}: ${detail}`);
          return;
        }
        if (secret !== undefined) upstreamSecrets.add(secret);
      }
      containers.push({ container: id, rule: decision.rule, ...facts, image });
      if (warning !== undefined) warnings.push(warning);
      if (refusal !== undefined) denials.push(refusal);
      if (settled.rewritten === null) {
        if (settled.reason === 'invalid-reference' || settled.reason === 'rewritten-reference-invalid') {
          warnings.push(`pullbridge: ${id} image ${image} left unchanged: ${settled.detail ?? settled.reason}`);
        }
        return;
      }
      patch.push({ op: 'replace', path: `/spec/${field}/${index}/image`, value: settled.rewritten });
      originals[id] = container.image;
      if (usesBroker && proxied) needsPullSecret = true;
    });
  }

  const questions = book.takeQuestions();
  if (pending || questions.length > 0) {
    return { decision: 'unchanged', containers, patch: [], pullSecret: null, upstreamPullSecrets: [], warnings, questions };
  }
  if (denials.length > 0) {
    return { decision: 'denied', containers, patch: [], pullSecret: null, upstreamPullSecrets: [], warnings, questions: [], denial: denials.join('; ') };
  }
  if (verifyOnly && patch.length === 0) return { ...skipped('pod-opted-out', `${webhook.optOutLabel}=true`), containers, warnings };

  const rewrote = patch.length > 0;
  const addLabels: Record<string, string> = {};
  if (ephemeralUpdate) {
    // Nothing to add: the secrets of never rules are listed already (checked above), as the broker's is.
    if (!rewrote) return { decision: 'unchanged', containers, patch: [], pullSecret: null, upstreamPullSecrets: [...upstreamSecrets], warnings, questions: [] };
  } else {
    const missing = [...(needsPullSecret ? [pullSecretName] : []), ...upstreamSecrets].filter((name) => !listed.has(name));
    if (!rewrote && upstreamSecrets.size === 0) {
      return { decision: 'unchanged', containers, patch: [], pullSecret: null, upstreamPullSecrets: [], warnings, questions: [] };
    }
    missing.forEach((name, i) => {
      if (i === 0 && (pod.spec.imagePullSecrets === undefined || pod.spec.imagePullSecrets === null)) {
        patch.push({ op: 'add', path: '/spec/imagePullSecrets', value: [{ name }] });
      } else {
        patch.push({ op: 'add', path: '/spec/imagePullSecrets/-', value: { name } });
      }
    });
    if (pod.metadata === undefined) patch.push({ op: 'add', path: '/metadata', value: {} });
    // The reconciler finds the Pods that need a never rule's secret by this label; the original-images
    // annotation and the rewritten label are for images actually rewritten.
    if (upstreamSecrets.size > 0) addLabels[UPSTREAM_PULL_SECRET_LABEL] = 'true';
  }
  if (!ephemeralUpdate && rewrote) {
    const annotations = pod.metadata?.annotations;
    const merged = JSON.stringify({ ...parseOriginalImages(annotations?.[ORIGINAL_IMAGES_ANNOTATION] ?? undefined), ...originals });
    // The apiserver refuses a Pod whose annotations exceed its limit: a record of the originals is
    // not worth a Pod that was valid. The audit record still has them.
    const total = annotationBytes({ ...annotations, [ORIGINAL_IMAGES_ANNOTATION]: merged });
    if (total <= TOTAL_ANNOTATION_SIZE_LIMIT_BYTES) {
      setMapEntry(patch, '/metadata/annotations', annotations, ORIGINAL_IMAGES_ANNOTATION, merged);
    } else {
      originalImagesOmitted = `the Pod's annotations would total ${total} bytes, more than the apiserver's limit of ${TOTAL_ANNOTATION_SIZE_LIMIT_BYTES}`;
      warnings.push(`pullbridge: annotation ${ORIGINAL_IMAGES_ANNOTATION} not added: ${originalImagesOmitted}; images are rewritten, the originals are in the audit log`);
    }
    // The label (and the rewrites metric) mean "pulled through the proxy": not a public image only pinned.
    if (containers.some((c) => pointsAtProxy(config, c.rewritten))) addLabels[REWRITTEN_LABEL] = 'true';
  }
  // One patch operation per label: two adds of an absent map would replace one another.
  const labels = pod.metadata?.labels;
  const newLabels = Object.entries(addLabels).filter(([key]) => labels?.[key] !== 'true');
  if (!ephemeralUpdate && newLabels.length > 0) {
    if (labels === undefined || labels === null) patch.push({ op: 'add', path: '/metadata/labels', value: Object.fromEntries(newLabels) });
    else for (const [key, value] of newLabels) patch.push({ op: 'add', path: `/metadata/labels/${pointerSegment(key)}`, value });
  }

  if (patch.length === 0) return { decision: 'unchanged', containers, patch: [], pullSecret: null, upstreamPullSecrets: [...upstreamSecrets], warnings, questions: [] };
  return { decision: 'mutated', containers, patch, pullSecret: needsPullSecret ? pullSecretName : null, upstreamPullSecrets: [...upstreamSecrets], warnings, questions: [], ...(originalImagesOmitted !== undefined ? { originalImagesOmitted } : {}) };
}

const replicaSetSchema = z.looseObject({
  metadata: z.looseObject({ name: z.string().optional(), generateName: z.string().optional(), labels: stringMap.nullish(), annotations: stringMap.nullish() }).optional(),
  spec: z.looseObject({
    template: z.looseObject({
      metadata: z.looseObject({ labels: stringMap.nullish() }).nullish(),
      spec: z.looseObject({ containers: z.array(containerSchema).nullish(), initContainers: z.array(containerSchema).nullish() }),
    }),
  }),
});

/** Whether the request is the creation of an apps/v1 ReplicaSet (admitted to record pinned digests). */
export const isReplicaSetCreate = (request: AdmissionRequest): boolean =>
  request.kind.kind === 'ReplicaSet' && request.kind.group === 'apps' && request.resource.resource === 'replicasets' && request.operation === 'CREATE' && !request.subResource;

/**
 * A ReplicaSet's creation: the digest behind each tag its Pod template names, under rules with
 * pinDigest or verify, recorded in the ReplicaSet's metadata annotation (never in its template: the
 * Deployment controller finds its ReplicaSet by comparing templates, and a changed template would
 * make it create ReplicaSets without end). Every Pod of the ReplicaSet is then pinned to the same
 * digests, however the tag moves. A ReplicaSet with no such rule in the config costs nothing.
 */
export function admitReplicaSet(config: Config, request: AdmissionRequest, context: AdmissionContext = {}): AdmissionOutcome {
  if (!config.registries.some(needsDigest)) return skipped('no-pinning-rule');
  const count = containerCount((request.object as { spec?: { template?: unknown } } | null)?.spec?.template);
  if (count > MAX_CONTAINERS) return skipped('too-many-containers', `${count} containers`);
  const parsed = replicaSetSchema.safeParse(request.object);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    return skipped('malformed-pod', issue ? `${issue.path.map(String).join('.')}: ${issue.message}` : 'object is not a ReplicaSet');
  }
  const rs = parsed.data;
  const namespace = request.namespace ?? 'default';
  const webhook = config.webhook;
  if (ALWAYS_EXCLUDED_NAMESPACES.includes(namespace) || namespace === webhook.namespace || webhook.excludedNamespaces.includes(namespace)) return skipped('namespace-excluded', namespace);
  if (isOptedOut(context.namespaceLabels, webhook.optOutLabel)) return skipped('namespace-opted-out', `${webhook.optOutLabel}=true on namespace ${namespace}`);
  if (isOptedOut(rs.spec.template.metadata?.labels, webhook.optOutLabel)) {
    // Its Pods are not admitted, so they need no pins; any the creator wrote are removed all the same.
    if (rs.metadata?.annotations?.[PINNED_DIGESTS_ANNOTATION] === undefined) return skipped('pod-opted-out', `${webhook.optOutLabel}=true`);
    return { ...skipped('pod-opted-out', `${webhook.optOutLabel}=true`), decision: 'mutated', patch: [{ op: 'remove', path: `/metadata/annotations/${pointerSegment(PINNED_DIGESTS_ANNOTATION)}` }] };
  }
  const book = context.answers ?? NO_ANSWERS;
  const containers: ContainerDecision[] = [];
  const pins: Record<string, string> = {};
  const warnings: string[] = [];
  let pending = false;
  for (const field of ['initContainers', 'containers'] as const) {
    for (const container of rs.spec.template.spec[field] ?? []) {
      if (container.image === undefined || container.image in pins) continue;
      const decision = decideImage(config, container.image, namespace);
      const rule = decision.rule === null ? undefined : ruleByName(config, decision.rule);
      if (rule === undefined || (decision.reason !== 'rewritten' && decision.reason !== 'pull-secret-only') || !needsDigest(rule) || /@/.test(container.image)) continue;
      const pin = pinForReplicaSet(rule, decision, namespace, book);
      if (pin.pending) {
        pending = true;
        continue;
      }
      if (pin.digest !== null) pins[container.image] = pin.digest;
      const reason: ContainerReason = pin.unverified !== undefined ? 'signature-unverified' : decision.reason;
      // The ReplicaSet itself is admitted: what runs is its Pods, and each is checked (and, with onFailure: deny, refused) at its own admission.
      if (pin.unverified !== undefined) warnings.push(`pullbridge: ${field}/${container.name} image ${quotedImage(container.image)}: signature not verified (${pin.unverified}); no digest recorded${rule.verify?.onFailure === 'deny' ? ', and its Pods will be refused' : ''}`);
      containers.push({ container: `${field}/${container.name}`, image: quotedImage(container.image), rewritten: null, rule: rule.name, reason, detail: pin.detail, upstream: pin.upstream });
    }
  }
  const questions = book.takeQuestions();
  if (pending || questions.length > 0) return { decision: 'unchanged', containers, patch: [], pullSecret: null, upstreamPullSecrets: [], warnings: [], questions };
  const annotations = rs.metadata?.annotations;
  const patch: Operation[] = [];
  // Pins are always the webhook's own: whatever the creator wrote under the key is replaced or removed.
  if (Object.keys(pins).length > 0) {
    if (rs.metadata === undefined) patch.push({ op: 'add', path: '/metadata', value: {} });
    setMapEntry(patch, '/metadata/annotations', annotations, PINNED_DIGESTS_ANNOTATION, JSON.stringify(pins));
  } else if (annotations?.[PINNED_DIGESTS_ANNOTATION] !== undefined) {
    patch.push({ op: 'remove', path: `/metadata/annotations/${pointerSegment(PINNED_DIGESTS_ANNOTATION)}` });
  }
  return { decision: patch.length > 0 ? 'mutated' : 'unchanged', containers, patch, pullSecret: null, upstreamPullSecrets: [], warnings, questions: [] };
}

/** Whether the request is an UPDATE of an apps/v1 ReplicaSet (its pins annotation is guarded). */
export const isReplicaSetUpdate = (request: AdmissionRequest): boolean =>
  request.kind.kind === 'ReplicaSet' && request.kind.group === 'apps' && request.resource.resource === 'replicasets' && request.operation === 'UPDATE' && !request.subResource;

const annotationOf = (object: unknown, key: string): string | undefined => {
  const annotations: unknown = (object as { metadata?: { annotations?: unknown } } | null)?.metadata?.annotations;
  const value: unknown = annotations !== null && typeof annotations === 'object' ? (annotations as Record<string, unknown>)[key] : undefined;
  return typeof value === 'string' ? value : undefined;
};

/**
 * A ReplicaSet's UPDATE: pins are the webhook's own, written at creation, so a change to the pins
 * annotation (a forged digest every Pod would take unverified) is reverted to the old value, or
 * removed when there was none. Anything else (scaling, the controllers' own annotations) passes at once.
 */
export function admitReplicaSetUpdate(request: AdmissionRequest): AdmissionOutcome {
  const before = annotationOf(request.oldObject, PINNED_DIGESTS_ANNOTATION);
  const after = annotationOf(request.object, PINNED_DIGESTS_ANNOTATION);
  if (before === after) return skipped('pins-unchanged');
  const metadata = (request.object as { metadata?: { annotations?: Record<string, string> | null } } | null)?.metadata;
  const patch: Operation[] = [];
  if (before === undefined) patch.push({ op: 'remove', path: `/metadata/annotations/${pointerSegment(PINNED_DIGESTS_ANNOTATION)}` });
  else {
    if (metadata === undefined) patch.push({ op: 'add', path: '/metadata', value: {} });
    setMapEntry(patch, '/metadata/annotations', metadata?.annotations, PINNED_DIGESTS_ANNOTATION, before);
  }
  const detail = `annotation ${PINNED_DIGESTS_ANNOTATION} is written by pullbridge only, at the ReplicaSet's creation: ${before === undefined ? 'removed' : 'restored to its old value'}`;
  return { decision: 'mutated', detail, containers: [], patch, pullSecret: null, upstreamPullSecrets: [], warnings: [`pullbridge: ${detail}`], questions: [] };
}

export interface AdmissionResponseBody {
  readonly apiVersion: typeof ADMISSION_API_VERSION;
  readonly kind: 'AdmissionReview';
  readonly response: {
    readonly uid: string;
    readonly allowed: boolean;
    readonly patchType?: 'JSONPatch';
    readonly patch?: string;
    readonly warnings?: readonly string[];
    readonly status?: { readonly code: number; readonly message: string };
  };
}

/**
 * The outcome as admitted when the pull secret could not be provisioned and the Pod is let through
 * as it came (`admit-unchanged`): no patch, no pull secret, every image it would have rewritten
 * left as it was (reason `pull-secret-not-provisioned`), and a warning saying why. Pure.
 */
export function leftUnchanged(outcome: AdmissionOutcome, error: string): AdmissionOutcome {
  return {
    decision: 'unchanged',
    containers: outcome.containers.map((c) => (c.rewritten === null && c.reason !== 'pull-secret-only' ? c : { container: c.container, image: c.image, rewritten: null, rule: c.rule, reason: 'pull-secret-not-provisioned' as const })),
    patch: [],
    pullSecret: null,
    upstreamPullSecrets: [],
    warnings: [`pullbridge: images left unchanged: ${error}`],
    questions: [],
  };
}

export function admissionResponse(uid: string, outcome: Pick<AdmissionOutcome, 'patch' | 'warnings'>): AdmissionResponseBody {
  return {
    apiVersion: ADMISSION_API_VERSION,
    kind: 'AdmissionReview',
    response: {
      uid,
      allowed: true,
      ...(outcome.patch.length > 0 ? { patchType: 'JSONPatch' as const, patch: Buffer.from(JSON.stringify(outcome.patch)).toString('base64') } : {}),
      ...(outcome.warnings.length > 0 ? { warnings: outcome.warnings } : {}),
    },
  };
}

/** A denial, for the configured failure mode when a side effect (the pull secret) cannot be made. */
export function admissionDenial(uid: string, code: number, message: string): AdmissionResponseBody {
  return { apiVersion: ADMISSION_API_VERSION, kind: 'AdmissionReview', response: { uid, allowed: false, status: { code, message } } };
}
