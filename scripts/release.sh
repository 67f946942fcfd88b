#!/usr/bin/env bash
# Publishes a release of pullbridge in one command, for whoever holds the registry credentials and
# the signing identity (docs/releasing.md): checks that the version is one number everywhere, builds
# the multi-arch image with its SBOM and provenance, signs it by digest, then packages, pushes and
# signs the Helm chart as an OCI artifact, and tags the commit.
#
#   scripts/release.sh [--dry-run] VERSION
#
# --dry-run checks the versions and prints every command without running any (no docker, cosign or
# credentials needed).
# Env: IMAGE_REPOSITORY   where the image goes (default: the chart's values.yaml image.repository)
#      CHART_REPOSITORY   the OCI repository the chart goes under (default: oci://ghcr.io/pullbridge/charts)
#      PLATFORMS          the image's platforms (default: linux/amd64,linux/arm64)
#      COSIGN_KEY         a cosign key reference (file, KMS URI); unset: keyless signing (Sigstore OIDC)
#      HELM, COSIGN       the commands to use (default: helm, cosign)
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: scripts/release.sh [--dry-run] VERSION   (VERSION like 0.2.0, as in package.json)" >&2; exit 2; }
fail() { echo "release: $*" >&2; exit 1; }

dry_run=false
version=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=true ;;
    -h | --help) usage ;;
    -*) echo "release: unknown option $arg" >&2; usage ;;
    *) [ -z "$version" ] || usage; version=$arg ;;
  esac
done
[ -n "$version" ] || usage
[[ "$version" =~ ^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?$ ]] ||
  fail "VERSION $version is not a semantic version (MAJOR.MINOR.PATCH, e.g. 0.2.0)"

CHART=charts/pullbridge
HELM=${HELM:-helm}
COSIGN=${COSIGN:-cosign}
PLATFORMS=${PLATFORMS:-linux/amd64,linux/arm64}
CHART_REPOSITORY=${CHART_REPOSITORY:-oci://ghcr.io/pullbridge/charts}

# --- 1. One version everywhere -------------------------------------------------------------------
# The first match of `key: value` at the start of a line of a YAML file, quotes removed.
yaml_value() { sed -n "s/^$1:[[:space:]]*\"\{0,1\}\([^\"#[:space:]]*\)\"\{0,1\}[[:space:]]*\(#.*\)\{0,1\}$/\1/p" "$2" | head -n 1; }
# A key of the top-level `image:` block of values.yaml, quotes removed.
image_value() {
  awk -v key="$1" '/^image:/ { block = 1; next } /^[^[:space:]#]/ { block = 0 }
    block && $1 == key ":" { value = $2; gsub(/"/, "", value); if (value == "#") value = ""; print value; exit }' "$CHART/values.yaml"
}

package_version=$(sed -n 's/^  "version": "\([^"]*\)",$/\1/p' package.json | head -n 1)
chart_version=$(yaml_value version "$CHART/Chart.yaml")
app_version=$(yaml_value appVersion "$CHART/Chart.yaml")
image_tag=$(image_value tag)
[ "$package_version" = "$version" ] || fail "package.json version is $package_version, not $version (npm version $version --no-git-tag-version)"
[ "$chart_version" = "$version" ] || fail "$CHART/Chart.yaml version is $chart_version, not $version"
[ "$app_version" = "$version" ] || fail "$CHART/Chart.yaml appVersion is $app_version, not $version (the chart installs the image of its appVersion)"
[ -z "$image_tag" ] || fail "$CHART/values.yaml image.tag is \"$image_tag\": leave it \"\" so the chart installs the image of its appVersion"
grep -Eq "^## \[$(printf '%s' "$version" | sed 's/\./\\./g')\] - [0-9]{4}-[0-9]{2}-[0-9]{2}$" CHANGELOG.md ||
  fail "CHANGELOG.md has no section \"## [$version] - YYYY-MM-DD\": move the Unreleased entries under it"
IMAGE_REPOSITORY=${IMAGE_REPOSITORY:-$(image_value repository)}
[ -n "$IMAGE_REPOSITORY" ] || fail "no image repository: set IMAGE_REPOSITORY or image.repository in $CHART/values.yaml"
# A registry may have a port (host:5000/name); the repository's last part has no tag or digest.
[[ "${IMAGE_REPOSITORY##*/}" != *[:@]* ]] || fail "IMAGE_REPOSITORY $IMAGE_REPOSITORY names a tag or digest; give the repository alone"
[[ "$CHART_REPOSITORY" = oci://* ]] || fail "CHART_REPOSITORY $CHART_REPOSITORY is not an oci:// reference"
echo "release $version: package.json, $CHART/Chart.yaml (version, appVersion) and CHANGELOG.md agree"

# --- How each step runs --------------------------------------------------------------------------
# Every command is printed as it would be typed (quoted), then run unless this is a dry run.
step() { echo; echo "# $*"; }
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$dry_run" = false ]; then "$@"; fi
}
sign_args=(--yes)
[ -z "${COSIGN_KEY:-}" ] || sign_args+=(--key "$COSIGN_KEY")

if [ "$dry_run" = false ]; then
  for tool in git docker "$HELM" "$COSIGN"; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (needed to publish; --dry-run only prints the commands)"
  done
  [ -z "$(git status --porcelain)" ] || fail "the work tree has uncommitted changes: release from a clean checkout"
  ! git rev-parse -q --verify "refs/tags/v$version" >/dev/null || fail "tag v$version exists already: $version was released"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
image="$IMAGE_REPOSITORY:$version"
chart_name=$(yaml_value name "$CHART/Chart.yaml")
chart_ref="${CHART_REPOSITORY#oci://}/$chart_name"

# --- 2. Image: multi-arch, with SBOM and provenance attestations, pushed -------------------------
step "image $image for $PLATFORMS, SBOM (SPDX, by BuildKit's syft scanner) and provenance attached"
run docker buildx build --platform "$PLATFORMS" --tag "$image" \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --sbom=true --provenance=mode=max --metadata-file "$work/image.json" --push .
if [ "$dry_run" = false ]; then
  image_digest=$(sed -n 's/.*"containerimage\.digest":[[:space:]]*"\(sha256:[0-9a-f]\{64\}\)".*/\1/p' "$work/image.json" | head -n 1)
  [ -n "$image_digest" ] || fail "docker buildx wrote no image digest to $work/image.json"
else
  image_digest='sha256:IMAGE-DIGEST' # what the build reports
fi

# --- 3. Signing the image by digest (a tag can be moved; a digest cannot) ------------------------
step "signature of $IMAGE_REPOSITORY@$image_digest (${COSIGN_KEY:+key $COSIGN_KEY}${COSIGN_KEY:-keyless})"
run "$COSIGN" sign "${sign_args[@]}" "$IMAGE_REPOSITORY@$image_digest"

# --- 4. Chart: packaged, pushed as an OCI artifact, signed ---------------------------------------
step "chart $chart_name $version to $CHART_REPOSITORY"
run "$HELM" lint "$CHART"
run "$HELM" package "$CHART" --destination "$work"
if [ "$dry_run" = false ]; then
  "$HELM" push "$work/$chart_name-$version.tgz" "$CHART_REPOSITORY" 2>&1 | tee "$work/push.log"
  chart_digest=$(sed -n 's/^Digest: \(sha256:[0-9a-f]\{64\}\)$/\1/p' "$work/push.log" | head -n 1)
  [ -n "$chart_digest" ] || fail "helm push printed no digest"
else
  run "$HELM" push "$work/$chart_name-$version.tgz" "$CHART_REPOSITORY"
  chart_digest='sha256:CHART-DIGEST' # what helm push reports
fi
run "$COSIGN" sign "${sign_args[@]}" "$chart_ref@$chart_digest"

# --- 5. The commit the release was made from -----------------------------------------------------
step "tag v$version"
run git tag -a "v$version" -m "pullbridge $version"
run git push origin "v$version"

echo
if [ "$dry_run" = true ]; then echo "dry run of release $version: nothing was built, signed or pushed"; else echo "released $version"; fi
echo "  image: $image ($IMAGE_REPOSITORY@$image_digest)"
echo "  chart: helm install pullbridge oci://$chart_ref --version $version"
