#!/usr/bin/env bash
# Builds the Kubernetes parts the tests run for real — kube-apiserver, kubectl, kubelet,
# kube-scheduler, kube-controller-manager, kube-proxy — and helm, from Go modules into a cache
# outside the repository, once per version. The end-to-end tests run a real control plane (with
# scheduler and controller manager where workloads must be scheduled) and a real node (kubelet +
# containerd CRI, kube-proxy), drive certs-scripts/ with kubectl, and lint/render the chart with helm.
#
#   scripts/build-control-plane.sh        # prints the binaries' paths, one a line
# Env: KUBE_VERSION (v1.31.4), HELM_VERSION (v3.16.4), PULLBRIDGE_CACHE (~/.cache/pullbridge)
set -euo pipefail

source "$(dirname "$0")/lib/go-tools.sh"
require_go "the Kubernetes commands and helm"

KUBE_VERSION=${KUBE_VERSION:-v1.31.4}
HELM_VERSION=${HELM_VERSION:-v3.16.4}
KUBE_COMMANDS="kube-apiserver kubectl kubelet kube-scheduler kube-controller-manager kube-proxy"
# The helm binary's name says it is stamped with a Kubernetes version (see below), so that an
# unstamped one cached by an older version of this script is never picked up.
helm="$CACHE/bin/helm-$HELM_VERSION-stamped"

missing=""
for cmd in $KUBE_COMMANDS; do [ -x "$CACHE/bin/$cmd-$KUBE_VERSION" ] || missing="$missing $cmd"; done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -n "$missing" ]; then
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
  # -mod=mod for every step: `go get` records go.sum entries only for kube-apiserver's import graph,
  # so building kubectl, kubelet and the others without it fails with "missing go.sum entry for module providing
  # package ..." on a machine whose cache is empty.
  export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod"
  go get "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION"
  minor=$(echo "$KUBE_VERSION" | cut -d. -f2)
  # Stamp the version: unstamped, /version says v0.0.0 and kubeVersion checks fail.
  ldflags="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  for cmd in $missing; do
    out="$CACHE/bin/$cmd-$KUBE_VERSION"
    echo "building $cmd $KUBE_VERSION" >&2
    go build -p 2 -o "$out.tmp" -ldflags "$ldflags" "k8s.io/kubernetes/cmd/$cmd"
    mv "$out.tmp" "$out"
  done
  cd - >/dev/null
fi

if [ ! -x "$helm" ]; then
  echo "building helm $HELM_VERSION" >&2
  # A released helm has the Kubernetes version of its client-go stamped in by its Makefile; built
  # with plain `go install` it says v1.20.0, and `helm template` of a chart with
  # `kubeVersion: >=1.25` fails offline. Stamp it the way helm's Makefile does.
  helmmod=$(cd "$work" && printf 'module helmbuild\n\ngo 1.23\n' > go.mod && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  clientgo=$(awk '$1 == "k8s.io/client-go" {print $2; exit}' "$helmmod")   # v0.<minor>.<patch>
  k8sminor=$(echo "$clientgo" | cut -d. -f2)
  [ -n "$k8sminor" ] || { echo "cannot read the client-go version of helm $HELM_VERSION from $helmmod" >&2; exit 1; }
  hldflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    hldflags="$hldflags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8sminor"
  done
  go_install_once "$helm" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" "$hldflags" >/dev/null
fi

for cmd in $KUBE_COMMANDS; do echo "$CACHE/bin/$cmd-$KUBE_VERSION"; done
echo "$helm"
