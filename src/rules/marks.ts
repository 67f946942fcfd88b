// What pullbridge writes on the Pods it rewrites, and reads back: the webhook marks them, the pull
// secret reconciler finds them by the label.

/** The label on a Pod whose images the webhook rewrote. */
export const REWRITTEN_LABEL = 'pullbridge.io/rewritten';
/** The annotation holding a Pod's images as they were written, before the rewrite. */
export const ORIGINAL_IMAGES_ANNOTATION = 'pullbridge.io/original-images';
/** The label on a Pod the webhook gave the pull secret of a rewrite: never rule (its images stay as written). */
export const UPSTREAM_PULL_SECRET_LABEL = 'pullbridge.io/upstream-pull-secret';

/**
 * The annotation on a ReplicaSet holding the digests its Pods' images are pinned to, as JSON
 * `{"<image as written>": "sha256:…"}`: written by the webhook when it admits the ReplicaSet, read
 * when it admits the ReplicaSet's Pods. On the ReplicaSet's metadata, never its Pod template: the
 * Deployment controller finds its ReplicaSets by comparing templates.
 */
export const PINNED_DIGESTS_ANNOTATION = 'pullbridge.io/pinned-digests';
