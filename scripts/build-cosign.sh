#!/usr/bin/env bash
# Builds cosign from its Go module into a cache outside the repository, once per version. The
# signature tests sign images on a real registry with it (a key pair, `cosign sign --key`, no
# transparency log) and cross-check their fixtures with `cosign verify`, so that what the webhook
# verifies is what cosign itself writes, not this project's reading of cosign's format.
#
#   scripts/build-cosign.sh        # prints the binary's path
# Env: COSIGN_VERSION (v2.6.5), PULLBRIDGE_CACHE (~/.cache/pullbridge)
set -euo pipefail
source "$(dirname "$0")/lib/go-tools.sh"
require_go cosign

# v2: signatures as the simple-signing payload under the sha256-<hex>.sig tag by default (v3 writes
# Sigstore bundles as OCI referrers by default).
COSIGN_VERSION=${COSIGN_VERSION:-v2.6.5}
# Stamped as cosign's Makefile does, so that `cosign version` names what was built.
go_install_once "$CACHE/bin/cosign-$COSIGN_VERSION" "github.com/sigstore/cosign/v2/cmd/cosign@$COSIGN_VERSION" "-X sigs.k8s.io/release-utils/version.gitVersion=$COSIGN_VERSION"
