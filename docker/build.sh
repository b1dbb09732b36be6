#!/usr/bin/env bash
# Builds a static meshctl and the `meshctl:latest` image from scratch (no registry needed).
# Usage: docker/build.sh [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-meshctl:latest}
target=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --bin meshctl --target "$target"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "target/$target/release/meshctl" "$ctx/meshctl"
cp docker/Dockerfile "$ctx/Dockerfile"
docker build -q -t "$tag" "$ctx"
echo "built $tag"
