#!/usr/bin/env bash
# Builds the object-storage servers the shared cache tier is tested against, from Go modules into a
# cache outside the repository, once per version: versitygw (the S3 API over a posix directory, with
# conditional writes) and fake-gcs-server (the GCS JSON and XML APIs). The Azure Blob API's emulator,
# Azurite, is an npm devDependency.
#
#   scripts/build-storage-servers.sh        # prints the binaries' paths, one a line
# Env: VERSITYGW_VERSION, FAKE_GCS_VERSION, PULLBRIDGE_CACHE (~/.cache/pullbridge)
set -euo pipefail

source "$(dirname "$0")/lib/go-tools.sh"
require_go "the object-storage servers"

VERSITYGW_VERSION=${VERSITYGW_VERSION:-v1.8.0}
FAKE_GCS_VERSION=${FAKE_GCS_VERSION:-v1.56.1}

go_install_once "$CACHE/bin/versitygw-$VERSITYGW_VERSION" "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
go_install_once "$CACHE/bin/fake-gcs-server-$FAKE_GCS_VERSION" "github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION"
