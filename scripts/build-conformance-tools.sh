#!/usr/bin/env bash
# Builds the tools the registry-API conformance tests run against the proxy, from their Go modules,
# into a cache outside the repository, once per version:
#   - the OCI distribution-spec conformance suite's test binary (`go test -c` of its module),
#   - oras (`oras discover` lists referrers the way OCI clients do),
#   - referrers-registry: go-containerregistry's registry with its OCI 1.1 referrers API on
#     (registry.WithReferrersSupport), the upstream with referrers that docker-registry 2.8 is not.
#     A ten-line program written here: `crane registry serve` is the same registry, but it never
#     turns the referrers API on (its referrers paths answer 404 METHOD_UNKNOWN).
#
#   scripts/build-conformance-tools.sh     # prints the binaries' paths, one a line
# Env: CONFORMANCE_VERSION, ORAS_VERSION, GGCR_VERSION (go-containerregistry), PULLBRIDGE_CACHE (~/.cache/pullbridge)
set -euo pipefail

source "$(dirname "$0")/lib/go-tools.sh"
require_go "the conformance tools"

CONFORMANCE_VERSION=${CONFORMANCE_VERSION:-v0.0.0-20260831232431-97274622c111}
ORAS_VERSION=${ORAS_VERSION:-v1.3.6}
GGCR_VERSION=${GGCR_VERSION:-v0.22.1}
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

go_install_once "$CACHE/bin/oras-$ORAS_VERSION" "oras.land/oras/cmd/oras@$ORAS_VERSION"

out="$CACHE/bin/referrers-registry-$GGCR_VERSION"
if [ ! -x "$out" ]; then
  echo "building referrers-registry (go-containerregistry $GGCR_VERSION)" >&2
  mkdir -p "$work/referrers-registry"
  cat > "$work/referrers-registry/main.go" <<'GO'
// go-containerregistry's registry with its OCI 1.1 referrers API on, on --address.
package main

import (
	"flag"
	"log"
	"net/http"

	"github.com/google/go-containerregistry/pkg/registry"
)

func main() {
	address := flag.String("address", "127.0.0.1:0", "address to listen on")
	flag.Parse()
	log.Fatal(http.ListenAndServe(*address, registry.New(registry.WithReferrersSupport(true))))
}
GO
  (cd "$work/referrers-registry" && go mod init pullbridge.test/referrers-registry >/dev/null 2>&1 && go get "github.com/google/go-containerregistry@$GGCR_VERSION" >/dev/null && go build -p 2 -o "$out.tmp" .)
  mv "$out.tmp" "$out"
fi
echo "$out"

# The suite is a Go test package, not a command: its module is downloaded, copied out of the
# read-only module cache, and its test binary built there.
out="$CACHE/bin/oci-conformance-$CONFORMANCE_VERSION"
if [ ! -x "$out" ]; then
  echo "building the OCI conformance suite $CONFORMANCE_VERSION" >&2
  dir=$(cd "$work" && go mod download -json "github.com/opencontainers/distribution-spec/conformance@$CONFORMANCE_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] || { echo "could not download the conformance module $CONFORMANCE_VERSION" >&2; exit 1; }
  cp -r "$dir" "$work/conformance"
  chmod -R u+w "$work/conformance"
  (cd "$work/conformance" && go test -p 2 -c -o "$out.tmp" .)
  mv "$out.tmp" "$out"
fi
echo "$out"
