#!/usr/bin/env bash
# Builds kube-apiserver, kubectl and helm from Go modules into a cache outside the repository, once
# per version: the end-to-end tests run a real control plane, drive certs-scripts/ with kubectl,
# and lint/render the chart with helm.
#
#   scripts/build-control-plane.sh        # prints the two binaries' paths
# Env: KUBE_VERSION (v1.31.4), HELM_VERSION (v3.16.4), PULLBRIDGE_CACHE (~/.cache/pullbridge)
set -euo pipefail

# Go may live outside a minimal PATH (CI runs with a trimmed environment).
export PATH="$PATH:/usr/local/go/bin:$HOME/go/bin"
command -v go >/dev/null || { echo "go is required to build kube-apiserver, kubectl and helm" >&2; exit 1; }

KUBE_VERSION=${KUBE_VERSION:-v1.31.4}
HELM_VERSION=${HELM_VERSION:-v3.16.4}
CACHE=${PULLBRIDGE_CACHE:-$HOME/.cache/pullbridge}
mkdir -p "$CACHE/bin"
apiserver="$CACHE/bin/kube-apiserver-$KUBE_VERSION"
kubectl="$CACHE/bin/kubectl-$KUBE_VERSION"
helm="$CACHE/bin/helm-$HELM_VERSION"

if [ ! -x "$apiserver" ] || [ ! -x "$kubectl" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cd "$work"
  # k8s.io/kubernetes pins its staging modules to ./staging at v0.0.0; a throwaway module replaces
  # each with the published v0.<minor>.<patch> so that the project's own go.mod is never involved.
  printf 'module kubebuild\n\ngo 1.23\n' > go.mod
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  staging="v0.${KUBE_VERSION#v1.}"
  {
    printf 'module kubebuild\n\ngo 1.23\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$KUBE_VERSION"
    grep '=> ./staging' "$gomod" | awk -v v="$staging" '{print "  " $1 " => " $1 " " v}'
    printf ')\n'
  } > go.mod
  GOFLAGS=-mod=mod go get "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION"
  minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
  # Stamp the version: unstamped, /version says v0.0.0 and kubeVersion checks fail.
  ldflags="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  for cmd in kube-apiserver kubectl; do
    out="$CACHE/bin/$cmd-$KUBE_VERSION"
    [ -x "$out" ] && continue
    go build -p 2 -o "$out.tmp" -ldflags "$ldflags" "k8s.io/kubernetes/cmd/$cmd"
    mv "$out.tmp" "$out"
  done
  cd - >/dev/null
fi

if [ ! -x "$helm" ]; then
  gobin=$(mktemp -d)
  GOBIN="$gobin" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$gobin/helm" "$helm"
  rm -rf "$gobin"
fi

echo "$apiserver"
echo "$kubectl"
echo "$helm"
