#!/usr/bin/env bash
# Build the radbridge image without a container daemon (buildah), from a Debian base made here
# with debootstrap, and optionally run it (podman). Run by hand, as root; see k8s/image/README.md.
# Neither .ci/run nor the tests call it.
#
#   k8s/image/build.sh [--variant cpu|cuda] [--tag IMAGE] [--base IMAGE] [--rebuild-base]
#                      [--storage-driver DRIVER] [--runtime crun|runc] [--no-cache] [--run-check]
#
# Environment: PIP_INDEX_URL (default: pip's configured index-url, else https://pypi.org/simple),
# TORCH_INDEX_URL (default: a local torch wheel found in pip's find-links or /opt/wheels is served
# on 127.0.0.1:TORCH_INDEX_PORT (default 48765) for the build; else the PyTorch CPU index),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), RUN_CHECK_TIMEOUT (seconds, default 600),
# SHM_SIZE (the run check's --shm-size, default 1g).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

VARIANT=cpu
TAG=""
# shellcheck disable=SC1091
RELEASE=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
BASE=""
REBUILD_BASE=""
RUN_CHECK=""
NO_CACHE=""
STORAGE_DRIVER=${STORAGE_DRIVER:-}
OCI_RUNTIME=${OCI_RUNTIME:-}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
RUN_CHECK_TIMEOUT=${RUN_CHECK_TIMEOUT:-600}

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --variant) VARIANT=$2; shift 2 ;;
    --variant=*) VARIANT=${1#*=}; shift ;;
    --tag) TAG=$2; shift 2 ;;
    --tag=*) TAG=${1#*=}; shift ;;
    --base) BASE=$2; shift 2 ;;
    --base=*) BASE=${1#*=}; shift ;;
    --rebuild-base) REBUILD_BASE=1; shift ;;
    --storage-driver) STORAGE_DRIVER=$2; shift 2 ;;
    --storage-driver=*) STORAGE_DRIVER=${1#*=}; shift ;;
    --runtime) OCI_RUNTIME=$2; shift 2 ;;
    --runtime=*) OCI_RUNTIME=${1#*=}; shift ;;
    --no-cache) NO_CACHE=1; shift ;;
    --run-check) RUN_CHECK=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$VARIANT" in cpu|cuda) ;; *) echo "--variant must be cpu or cuda" >&2; exit 2 ;; esac
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
TAG=${TAG:-localhost/radbridge:${VERSION}-${VARIANT}}
BASE=${BASE:-localhost/radbridge-base:${RELEASE}}

log() { printf '\n==> %s\n' "$*"; }
need() {
  local missing=()
  for cmd in "$@"; do command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "missing: ${missing[*]}; on Debian: apt-get install buildah podman debootstrap" \
    "fuse-overlayfs uidmap slirp4netns runc" >&2
  exit 1
}
need buildah podman
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap and the image store)" >&2; exit 1; }

# One storage driver for buildah and podman. Empty: what /etc/containers/storage.conf says
# (overlay on this project's machines); `--storage-driver vfs` where overlay is refused.
STORE=()
[ -n "$STORAGE_DRIVER" ] && STORE=(--storage-driver "$STORAGE_DRIVER")
# The OCI runtime. crun (podman's default on Debian) refuses cgroups in hybrid mode (v1
# controllers with an empty v2 tree at /sys/fs/cgroup/unified, as on this project's machines):
# there runc runs the containers (apt-get install runc).
if [ -z "$OCI_RUNTIME" ] && mountpoint -q /sys/fs/cgroup/unified 2>/dev/null; then
  OCI_RUNTIME=runc
fi
RUNTIME=()
if [ -n "$OCI_RUNTIME" ]; then
  need "$OCI_RUNTIME"
  RUNTIME=(--runtime "$OCI_RUNTIME")
fi
# podman takes --runtime as a global option, buildah as one of `bud`.
PODMAN=(podman "${STORE[@]}" "${RUNTIME[@]}")
# Limits for `podman run`. Rootful podman asks for nofile=1048576 and a large nproc, which a
# root without CAP_SYS_RESOURCE (a sandboxed VM, as on this project's machines) may not set:
# there the container gets this shell's nofile and an nproc that conmon may pass on (32768).
ULIMITS=()
cap_eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
if (( (16#$cap_eff >> 24 & 1) == 0 )); then
  nproc=$(ulimit -Hu)
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
  ULIMITS=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit "nproc=$nproc:$nproc")
fi

WORK=$(mktemp -d /tmp/radbridge-image.XXXXXX)
SERVER_PID=""
CONTAINER=""
cleanup() {
  if [ -n "$CONTAINER" ]; then "${PODMAN[@]}" rm -f -t 5 "$CONTAINER" >/dev/null 2>&1 || true; fi
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# 1. The base image: a debootstrap'd Debian of this machine's release, imported once.
base_took="reused"
if [ -n "$REBUILD_BASE" ] || ! "${PODMAN[@]}" image exists "$BASE"; then
  need debootstrap
  base_start=$(date +%s)
  log "base image $BASE: debootstrap --variant=minbase $RELEASE from $DEBIAN_MIRROR"
  rootfs="$WORK/rootfs"
  debootstrap --variant=minbase "$RELEASE" "$rootfs" "$DEBIAN_MIRROR"
  security=${DEBIAN_SECURITY_MIRROR:-${DEBIAN_MIRROR%/debian}/debian-security}
  cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR $RELEASE main
deb $DEBIAN_MIRROR $RELEASE-updates main
deb $security $RELEASE-security main
EOF
  # As in Debian's own images: no caches or logs of the bootstrap, apt keeps no .debs.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/*.log "$rootfs"/tmp/*
  printf 'APT::Keep-Downloaded-Packages "false";\n' > "$rootfs/etc/apt/apt.conf.d/docker-clean"
  tar -C "$rootfs" --numeric-owner -cf "$WORK/rootfs.tar" .
  rm -rf "$rootfs"
  "${PODMAN[@]}" import \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
    --message "debootstrap --variant=minbase $RELEASE $DEBIAN_MIRROR" \
    "$WORK/rootfs.tar" "$BASE" >/dev/null
  rm -f "$WORK/rootfs.tar"
  base_took="$(( $(date +%s) - base_start ))s"
else
  log "base image $BASE: present, reused (--rebuild-base makes it anew)"
fi

# 2. Where pip finds packages inside the build (host network: a local index is on 127.0.0.1).
pip_cfg() { "$ROOT/.venv/bin/pip" config get "$1" 2>/dev/null || pip3 config get "$1" 2>/dev/null || true; }
PIP_INDEX_URL=${PIP_INDEX_URL:-$(pip_cfg global.index-url)}
PIP_INDEX_URL=${PIP_INDEX_URL:-https://pypi.org/simple}
if [ -z "${TORCH_INDEX_URL:-}" ] && [ "$VARIANT" = cpu ]; then
  torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' k8s/image/Dockerfile)
  wheel=""
  for dir in ${PIP_FIND_LINKS:-} $(pip_cfg global.find-links) /opt/wheels; do
    [ -d "$dir" ] || continue
    wheel=$(find "$dir" -maxdepth 1 -name "torch-${torch_version}+cpu-*.whl" | head -1)
    [ -n "$wheel" ] && break
  done
  if [ -n "$wheel" ]; then
    # A one-project PEP 503 index of that wheel; pip reads the server's directory listing.
    mkdir -p "$WORK/index/torch"
    ln "$wheel" "$WORK/index/torch/" 2>/dev/null || cp "$wheel" "$WORK/index/torch/"
    # A fixed port: the URL is a build arg, and a new one would void buildah's layer cache.
    port=${TORCH_INDEX_PORT:-48765}
    python3 -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$port" >"$WORK/http.log" 2>&1 &
    SERVER_PID=$!
    TORCH_INDEX_URL="http://127.0.0.1:${port}/"
    for _ in $(seq 50); do
      python3 -c "import urllib.request as u; u.urlopen('${TORCH_INDEX_URL}torch/', timeout=1)" 2>/dev/null && break
      kill -0 "$SERVER_PID" 2>/dev/null || { echo "port $port taken? set TORCH_INDEX_PORT" >&2; exit 1; }
      sleep 0.1
    done
    log "torch: $(basename "$wheel") served at $TORCH_INDEX_URL"
  fi
fi
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
# A CA bundle that this machine's pip is told to use (PIP_CERT or pip's global.cert: a mirror or
# a TLS-inspecting proxy with its own CA) is lent to the build's RUN steps as a pip config at
# /etc/xdg/pip, a bind mount: the image keeps only its empty mount point.
BUILD_MOUNTS=()
PIP_CERT=${PIP_CERT:-$(pip_cfg global.cert)}
if [ -n "$PIP_CERT" ] && [ -f "$PIP_CERT" ]; then
  mkdir -p "$WORK/pip"
  cp "$PIP_CERT" "$WORK/pip/ca.pem"
  printf '[global]\ncert = /etc/xdg/pip/ca.pem\n' > "$WORK/pip/pip.conf"
  BUILD_MOUNTS=(--volume "$WORK/pip:/etc/xdg/pip:ro")
  log "pip in the build trusts $PIP_CERT (mounted, not kept in the image)"
fi

# 3. The image.
log "buildah bud: $TAG (VARIANT=$VARIANT, BASE_IMAGE=$BASE, PIP_INDEX_URL=$PIP_INDEX_URL, TORCH_INDEX_URL=$TORCH_INDEX_URL)"
start=$(date +%s)
buildah "${STORE[@]}" bud "${RUNTIME[@]}" "${BUILD_MOUNTS[@]}" --network host --layers ${NO_CACHE:+--no-cache} \
  --format docker \
  -f k8s/image/Dockerfile \
  --build-arg "BASE_IMAGE=$BASE" \
  --build-arg "VARIANT=$VARIANT" \
  --build-arg "PIP_INDEX_URL=$PIP_INDEX_URL" \
  --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
  -t "$TAG" .
took=$(( $(date +%s) - start ))
if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; fi

size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$TAG")
human_size=$(numfmt --to=iec-i --suffix=B --format=%.2f "$size" 2>/dev/null || echo "$size bytes")

# 4. Optional: run it, the CLI's help and then `radbridge up` until the center is healthy.
if [ -n "$RUN_CHECK" ]; then
  # Without systemd, podman logs that it cannot add, start or remove the timer of the image's
  # HEALTHCHECK; harmless (`podman healthcheck run` below runs it), so left out of the output.
  nosd() {
    local rc=0
    "$@" 2>"$WORK/stderr" || rc=$?
    grep -v 'unable to get systemd connection' "$WORK/stderr" >&2 || true
    return "$rc"
  }
  log "podman run --rm $TAG --help"
  nosd "${PODMAN[@]}" run --rm "${ULIMITS[@]}" "$TAG" --help

  CONTAINER=radbridge-run-check-$$
  log "podman run -d --name $CONTAINER --shm-size 1g $TAG up"
  # No published ports: the services bind the container's own 127.0.0.1 (the defaults) and the
  # check runs inside it with podman exec.
  nosd "${PODMAN[@]}" run -d --name "$CONTAINER" --shm-size "${SHM_SIZE:-1g}" "${ULIMITS[@]}" "$TAG" up >/dev/null
  probe='import httpx, os
d = os.environ["RADBRIDGE_DATA_DIR"]
r = httpx.get(os.environ["RADBRIDGE_HEALTH_URL"], verify=d + "/keys/local-ca.pem", timeout=5)
print(r.status_code, r.text)
raise SystemExit(r.status_code != 200)'
  healthy=""
  up=""
  run_start=$(date +%s)
  deadline=$(( $(date +%s) + RUN_CHECK_TIMEOUT ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if [ "$("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$CONTAINER")" != true ]; then
      echo "the container stopped:" >&2
      "${PODMAN[@]}" logs "$CONTAINER" >&2 || true
      exit 1
    fi
    # Healthy, and `radbridge up` done (its table printed: the edge is up too).
    if [ -z "$healthy" ] && out=$("${PODMAN[@]}" exec "$CONTAINER" python3 -c "$probe" 2>/dev/null); then
      healthy=1
      log "center /healthz healthy after $(( $(date +%s) - run_start ))s"
    fi
    if [ -n "$healthy" ] && "${PODMAN[@]}" logs "$CONTAINER" 2>&1 | grep -q 'radbridge is up'; then
      up=1
      break
    fi
    sleep 5
  done
  log "podman logs $CONTAINER"
  "${PODMAN[@]}" logs "$CONTAINER" 2>&1 | tail -n 40
  if [ -z "$up" ]; then
    echo "radbridge up was not up and healthy within ${RUN_CHECK_TIMEOUT}s" >&2
    exit 1
  fi
  log "center /healthz from inside the container (checked against keys/local-ca.pem), up after $(( $(date +%s) - run_start ))s"
  echo "$out"
  log "podman healthcheck run $CONTAINER (the image's HEALTHCHECK)"
  if "${PODMAN[@]}" healthcheck run "$CONTAINER"; then
    echo "healthcheck: healthy"
  else
    echo "healthcheck: unhealthy" >&2
    exit 1
  fi
  log "podman stop $CONTAINER"
  nosd "${PODMAN[@]}" stop -t 30 "$CONTAINER" >/dev/null
  nosd "${PODMAN[@]}" rm "$CONTAINER" >/dev/null
  CONTAINER=""
fi

log "done"
echo "image:      $TAG"
echo "base image: $BASE ($base_took)"
echo "build time: ${took}s (buildah bud)"
echo "image size: $size bytes ($human_size)"
