#!/usr/bin/env bash
# Builds the registry clients that mirroring tools and the API-surface tests use against the proxy,
# from their Go modules into a cache outside the repository, once per version: crane (go-containerregistry)
# and regctl (regclient). They list the catalog and tags page by page as Harbor's and other mirroring
# tools' clients do, so that the proxy's pagination is checked by someone else's reading of the spec.
#
#   scripts/build-registry-tools.sh        # prints the binaries' paths, one a line
# Env: CRANE_VERSION (v0.22.1), REGCTL_VERSION (v0.11.7), PULLBRIDGE_CACHE (~/.cache/pullbridge)
set -euo pipefail
source "$(dirname "$0")/lib/go-tools.sh"
require_go "crane and regctl"

CRANE_VERSION=${CRANE_VERSION:-v0.22.1}
REGCTL_VERSION=${REGCTL_VERSION:-v0.11.7}

go_install_once "$CACHE/bin/crane-$CRANE_VERSION" "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION" "-X github.com/google/go-containerregistry/cmd/crane/cmd.Version=$CRANE_VERSION"
# regctl names its version from the module's build info (no stamp needed).
go_install_once "$CACHE/bin/regctl-$REGCTL_VERSION" "github.com/regclient/regclient/cmd/regctl@$REGCTL_VERSION"
