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
# iptables for the router's FORWARD rule on hosts that filter bridged traffic (Docker hosts):
# Debian ships no static build, so copy the build host's multi-call binaries with exactly the
# shared libraries and xtables extensions they load. Without iptables here the image still
# works, but logs that it cannot add the rule.
mkdir -p "$ctx/rootfs"
if [ "${MESHCTL_IMAGE_IPTABLES:-1}" = 1 ] && [ -x /usr/sbin/xtables-nft-multi ] && [ -x /usr/sbin/xtables-legacy-multi ]; then
  for multi in /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi; do
    cp --parents "$multi" "$ctx/rootfs"
    ldd "$multi" | grep -o '/[^ ]*' | while read -r lib; do cp --parents -L "$lib" "$ctx/rootfs"; done
  done
  xtlib=$(dirname "$(ldd /usr/sbin/xtables-nft-multi | grep -o '/[^ ]*libxtables[^ ]*')")
  for dir in "/usr/lib/$(basename "$xtlib")/xtables" "$xtlib/xtables"; do
    [ -d "$dir" ] && cp -r --parents -L "$dir" "$ctx/rootfs" && break
  done
  for name in iptables ip6tables; do
    ln -s xtables-nft-multi "$ctx/rootfs/usr/sbin/$name"
    ln -s xtables-legacy-multi "$ctx/rootfs/usr/sbin/$name-legacy"
  done
  mkdir -p "$ctx/rootfs/run"
  echo "adding iptables (nft and legacy) from this host"
else
  echo "warning: no iptables on this host; the image can't add its FORWARD rule on Docker hosts" >&2
fi
# nft for the per-peer counters of the VXLAN fast path (`peers[].traffic.vxlan`); without it the
# image works and status says that VXLAN traffic is not counted.
if [ "${MESHCTL_IMAGE_IPTABLES:-1}" = 1 ] && [ -x /usr/sbin/nft ]; then
  cp --parents /usr/sbin/nft "$ctx/rootfs"
  ldd /usr/sbin/nft | grep -o '/[^ ]*' | while read -r lib; do cp --parents -L "$lib" "$ctx/rootfs"; done
  echo "adding nft from this host"
else
  echo "warning: no nft on this host; the image can't count VXLAN traffic per peer" >&2
fi
docker build -q -t "$tag" "$ctx" >/dev/null
echo "built $tag from $bin"
