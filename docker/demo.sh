#!/usr/bin/env bash
# A three-host mesh on this machine with Docker containers talking across it.
#
#   root namespace (Docker)            netns PREFIX-b            netns PREFIX-c
#   router "root" ==veth 10.254.N.0/24== router "b" ==veth 10.254.M.0/24== router "c"
#     serves the Docker plugin             (relays)                 netns container PREFIX-cc
#     docker containers PREFIX-web, PREFIX-client on network PREFIX-net
#
# root and c have no direct path: their traffic goes through b. Everything the demo creates is
# named PREFIX-* (DEMO_PREFIX, default meshdemo; the Docker driver is called PREFIX too, so a real
# router's `meshnet` plugin on this host is left alone) and removed on exit, also on failure.
# Needs root, Docker, iproute2 and busybox-static (for the container image, built from scratch).
# Usage: sudo docker/demo.sh            (MESHCTL=path/to/meshctl, default: cargo build's binary)
set -euo pipefail
cd "$(dirname "$0")/.."
P=${DEMO_PREFIX:-meshdemo}
PORT=${DEMO_PORT:-16783}
IMAGE="$P-busybox:latest"
N=$(( $$ % 200 + 20 ))
M=$(( N + 1 ))
if [ -z "${MESHCTL:-}" ]; then
  cargo build -q --bin meshctl
  MESHCTL=target/debug/meshctl
fi
MESHCTL=$(realpath "$MESHCTL")
dir=$(mktemp -d "/tmp/$P.XXXXXX")

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
mesh() { local where=$1; shift
  if [ "$where" = root ]; then "$MESHCTL" --state-dir "$dir/root" "$@"
  else in_ns "$P-$where" "$MESHCTL" --state-dir "$dir/$where" "$@"; fi; }

cleanup() {
  set +e
  say "cleaning up"
  docker rm -f "$P-web" "$P-client" >/dev/null 2>&1
  docker network rm "$P-net" >/dev/null 2>&1
  for h in root b c; do
    pid=$(cat "$dir/$h/meshctl.pid" 2>/dev/null)
    mesh "$h" stop >/dev/null 2>&1
    [ -n "$pid" ] && for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  for ns in "$P-b" "$P-c" "$P-cc"; do ip netns del "$ns" 2>/dev/null; done
  ip link del "$P-r" 2>/dev/null
  ip link del "$P" 2>/dev/null
  rm -f "/run/docker/plugins/$P.sock"
  docker image rm "$IMAGE" >/dev/null 2>&1
  rm -rf "$dir"
}
trap cleanup EXIT

# wait_for SECONDS COMMAND...: retries until the command succeeds.
wait_for() { local t=$1; shift
  for _ in $(seq "$((t * 2))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  "$@"; }

say "building a busybox image from scratch (no registry)"
mkdir -p "$dir/image"
cp /bin/busybox "$dir/image/busybox"
printf 'FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT ["/bin/busybox"]\nCMD ["sleep", "3600"]\n' >"$dir/image/Dockerfile"
docker build -q -t "$IMAGE" "$dir/image" >/dev/null

say "underlay: root <-> b <-> c (own veth subnets; the default route is never used)"
ip netns add "$P-b"; ip netns add "$P-c"; ip netns add "$P-cc"
ip link add "$P-r" type veth peer name eth1 netns "$P-b"
ip addr add "10.254.$N.1/24" dev "$P-r"; ip link set "$P-r" up
in_ns "$P-b" ip addr add "10.254.$N.2/24" dev eth1
ip link add bc netns "$P-b" type veth peer name eth1 netns "$P-c"
in_ns "$P-b" ip addr add "10.254.$M.1/24" dev bc
in_ns "$P-c" ip addr add "10.254.$M.2/24" dev eth1
for ns in "$P-b" "$P-c"; do in_ns "$ns" ip link set lo up; done
in_ns "$P-b" ip link set eth1 up; in_ns "$P-b" ip link set bc up; in_ns "$P-c" ip link set eth1 up

say "launching three routers (IPAM agreed among all three)"
mesh root launch --nickname root --bridge "$P" --port "$PORT" --no-metrics \
  --ipalloc-init consensus=3 --docker-plugin "/run/docker/plugins/$P.sock"
mesh b launch --nickname b --port "$PORT" --no-metrics --no-docker-plugin \
  --ipalloc-init consensus=3 "10.254.$N.1:$PORT"
mesh c launch --nickname c --port "$PORT" --no-metrics --no-docker-plugin \
  --ipalloc-init consensus=3 "10.254.$M.1:$PORT"

say "docker network create -d $P --ipam-driver $P $P-net"
docker network create -d "$P" --ipam-driver "$P" "$P-net"
docker run -d --network "$P-net" --name "$P-web" "$IMAGE" \
  sh -c 'mkdir -p /www; echo "hello from a Docker container on the mesh" >/www/index.html; exec httpd -f -p 80 -h /www' >/dev/null
web=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$P-web")
[ -n "$web" ] || { docker logs "$P-web"; echo "$P-web has no address" >&2; exit 1; }
echo "$P-web got $web from the mesh's IPAM"

say "a container on host c (a network namespace), attached with an allocated address"
mesh c attach "$P-cc"
cc=$(in_ns "$P-cc" ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)

say "c's container fetches a page from the Docker container (c -> b -> root)"
wait_for 30 in_ns "$P-cc" busybox ping -c 1 -W 1 "$web"
in_ns "$P-cc" busybox wget -q -O - "http://$web/"

say "a second Docker container pings c's container $cc across two hops"
docker run --rm --network "$P-net" --name "$P-client" "$IMAGE" ping -c 3 "$cc"

say "meshctl ps (root)"
mesh root ps
say "meshctl status (root)"
mesh root status
