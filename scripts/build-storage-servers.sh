#!/usr/bin/env bash
# Builds the object-storage servers the shared cache tier is tested against, from Go modules into a
# cache outside the repository, once per version: versitygw (the S3 API over a posix directory, with
# conditional writes) and fake-gcs-server (the GCS JSON and XML APIs). The Azure Blob API's emulator,
# Azurite, is an npm devDependency.
#
#   scripts/build-storage-servers.sh        # prints the binaries' paths, one a line
# Env: VERSITYGW_VERSION, FAKE_GCS_VERSION, PULLBRIDGE_CACHE (~/.cache/pullbridge)
set -euo pipefail

export PATH="$PATH:/usr/local/go/bin:$HOME/go/bin"
command -v go >/dev/null || { echo "go is required to build the object-storage servers" >&2; exit 1; }

VERSITYGW_VERSION=${VERSITYGW_VERSION:-v1.8.0}
FAKE_GCS_VERSION=${FAKE_GCS_VERSION:-v1.56.1}
CACHE=${PULLBRIDGE_CACHE:-$HOME/.cache/pullbridge}
mkdir -p "$CACHE/bin"

# name  package@version
build() {
  local out="$CACHE/bin/$1"
  if [ ! -x "$out" ]; then
    echo "building $2" >&2
    local gobin
    gobin=$(mktemp -d)
    GOBIN="$gobin" go install "$2"
    mv "$gobin"/* "$out"
    rm -rf "$gobin"
  fi
  echo "$out"
}

build "versitygw-$VERSITYGW_VERSION" "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
build "fake-gcs-server-$FAKE_GCS_VERSION" "github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION"
