# Sourced by the scripts/build-*.sh scripts: the Go toolchain on PATH and one way to build a Go
# command into the tool cache once per version. Not a script of its own.
#
# Env: PULLBRIDGE_CACHE (~/.cache/pullbridge)

# Go may live outside a minimal PATH (CI runs with a trimmed environment).
export PATH="$PATH:/usr/local/go/bin:$HOME/go/bin"
CACHE=${PULLBRIDGE_CACHE:-$HOME/.cache/pullbridge}
mkdir -p "$CACHE/bin"

# require_go WHAT: exits naming what needs Go when there is none.
require_go() {
  command -v go >/dev/null || { echo "go is required to build $1" >&2; exit 1; }
}

# go_install_once OUT PACKAGE@VERSION [LDFLAGS]: `go install`s the package into the cache as OUT
# (a path under $CACHE/bin) unless it is there, through a temporary GOBIN and a rename, so that an
# interrupted build never leaves a half-written binary under the final name. Prints OUT.
go_install_once() {
  local out=$1 package=$2 ldflags=${3:-}
  if [ ! -x "$out" ]; then
    echo "building $package" >&2
    local gobin
    gobin=$(mktemp -d)
    GOBIN="$gobin" go install -p 2 -ldflags "$ldflags" "$package"
    local built=("$gobin"/*)
    mv "${built[0]}" "$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$gobin"
  fi
  echo "$out"
}
