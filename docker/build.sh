#!/usr/bin/env bash
# Builds a static meshctl and the router image from scratch (no registry, no base image).
# Usage: docker/build.sh [TAG]      (default meshctl:latest)
# MESHCTL_PROFILE=dev builds a debug binary (faster to build; the tests use it).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-meshctl:latest}
profile=${MESHCTL_PROFILE:-release}
target=$(rustc -vV | sed -n 's/^host: //p')
# A separate target dir: crt-static changes the flags of every crate.
export CARGO_TARGET_DIR=${MESHCTL_STATIC_TARGET_DIR:-target/static}
RUSTFLAGS="-C target-feature=+crt-static" cargo build --profile "$profile" --bin meshctl --target "$target"
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
bin="$CARGO_TARGET_DIR/$target/$dir/meshctl"
if readelf -d "$bin" | grep -q NEEDED; then
  echo "error: $bin is dynamically linked; the image has no libc" >&2
  exit 1
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/meshctl"
cp docker/Dockerfile "$ctx/Dockerfile"
docker build -q -t "$tag" "$ctx" >/dev/null
echo "built $tag from $bin"
