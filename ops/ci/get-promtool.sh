#!/usr/bin/env bash
# Put a real `promtool` (Prometheus's rule checker and unit-test runner) in .cache/promtool/ and
# print its path on stdout.
#
# Only the binary: Debian's `prometheus` package ships it, so it is fetched with
# `apt-get download` (apt checks the package against the signed archive's hash) and unpacked
# with `dpkg -x`. Nothing is installed and no Prometheus server is started.
#
# Idempotent: a cached promtool that runs is used as it is. Every failure exits non-zero with
# the reason on stderr (the tests rely on it).
#
# Environment:
#   PROMTOOL_CACHE_DIR  where to keep the binary (default: <repo>/.cache/promtool)
#   PROMTOOL            use this promtool instead (e.g. from Homebrew); it must run
set -euo pipefail

# `promtool test rules` as these tests use it is stable since 2.x; 2.42 is bookworm's.
readonly MIN_MAJOR=2
readonly MIN_MINOR=42

die() {
  echo "get-promtool: $*" >&2
  exit 1
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${PROMTOOL_CACHE_DIR:-$root/.cache/promtool}"
promtool="$cache/promtool"

# promtool, version 2.42.0+ds (branch: ...) -> ok when at least MIN_MAJOR.MIN_MINOR.
recent_enough() {
  local version major minor
  version="$("$1" --version 2>&1 | sed -n 's/^promtool, version \([0-9]*\.[0-9]*\).*/\1/p')"
  [[ -n "$version" ]] || return 1
  major="${version%%.*}"
  minor="${version#*.}"
  ((major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR)))
}

if [[ -n "${PROMTOOL:-}" ]]; then
  recent_enough "$PROMTOOL" || die "PROMTOOL=$PROMTOOL does not run or is older than ${MIN_MAJOR}.${MIN_MINOR}"
  echo "$PROMTOOL"
  exit 0
fi
if [[ -x "$promtool" ]] && recent_enough "$promtool"; then
  echo "$promtool"
  exit 0
fi

command -v apt-get >/dev/null \
  || die "apt-get is not here (not Debian/Ubuntu): install promtool >= ${MIN_MAJOR}.${MIN_MINOR} and set PROMTOOL=/path/to/promtool"
command -v dpkg >/dev/null || die "dpkg is needed to unpack the package"

mkdir -p "$cache"
work="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "get-promtool: fetching Debian's prometheus package for its promtool" >&2
# apt's sandbox user cannot write to a root-owned temp dir; the download is checked all the same.
(cd "$work" && apt-get download -q prometheus >/dev/null 2>"$work/apt.log") \
  || die "apt-get download prometheus failed (no package lists? run apt-get update): $(tail -n 3 "$work/apt.log")"
deb="$(find "$work" -maxdepth 1 -name 'prometheus_*.deb' -print -quit)"
[[ -n "$deb" ]] || die "apt-get download produced no prometheus_*.deb"
dpkg -x "$deb" "$work/root" || die "dpkg -x $deb failed"
[[ -x "$work/root/usr/bin/promtool" ]] || die "no usr/bin/promtool in $(basename "$deb")"
recent_enough "$work/root/usr/bin/promtool" \
  || die "$(basename "$deb")'s promtool does not run or is older than ${MIN_MAJOR}.${MIN_MINOR}"
mv -f "$work/root/usr/bin/promtool" "$promtool"
echo "$promtool"
