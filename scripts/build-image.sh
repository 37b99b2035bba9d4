#!/usr/bin/env bash
# Builds the stream-asd image without a Docker engine and runs `stream-asd --help` in it.
#
#   scripts/build-image.sh                  # CUDA variant (default), tag localhost/stream-asd:dev
#   TORCH_VARIANT=cpu scripts/build-image.sh
#   KEEP=1 scripts/build-image.sh           # keep the image (default: removed after the check)
#
# Tools: Debian buildah (--isolation=chroot: no daemon, no user namespaces needed), podman (to
# import a base), debootstrap. The Dockerfile's base python:3.11-slim-bookworm is pulled when
# the registry is reachable; where it is not (machines that reach only package registries), a
# stand-in with the same name is made with debootstrap from the Debian mirror: Debian 12 with
# its CPython 3.11 and venv, which is what the Dockerfile needs of the base.
# pip inside RUN trusts the host's CA bundle and pip.conf (mounted read-only), so builds behind
# a TLS-inspecting proxy work too. Heavy: the CUDA variant downloads ~3 GB of wheels and the vfs
# storage driver needs ~25 GB of disk while it builds.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-localhost/stream-asd:dev}"
TORCH_VARIANT="${TORCH_VARIANT:-cuda}"
BASE="docker.io/library/python:3.11-slim-bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"   # overlay needs kernel support a container may lack
export BUILDAH_ISOLATION=chroot

log() { echo "build-image: $(date -u +%H:%M:%S) $*" >&2; }
WORK="$(mktemp -d)"
CTR=""
cleanup() {
  if [ -n "$CTR" ]; then buildah rm "$CTR" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

missing=()
for t in buildah podman debootstrap; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah podman debootstrap >/dev/null
fi

if podman image exists "$BASE"; then
  log "base $BASE present"
elif timeout 120 podman pull -q "$BASE" >/dev/null 2>&1; then
  log "pulled $BASE"
else
  log "cannot pull $BASE: making a stand-in with debootstrap (Debian 12 + python3.11 + venv)"
  rootfs="$WORK/rootfs"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE" >/dev/null
  log "imported the stand-in as $BASE"
fi

log "building $IMAGE (TORCH_VARIANT=$TORCH_VARIANT)"
started=$(date +%s)
mounts=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
if [ -f "${PIP_CONF:-/etc/pip.conf}" ]; then mounts+=(--volume "${PIP_CONF:-/etc/pip.conf}:/etc/pip.conf:ro"); fi
# docker format: the OCI image config has no HEALTHCHECK field.
buildah bud --isolation=chroot --pull=never --format docker "${mounts[@]}" \
  --build-arg "TORCH_VARIANT=$TORCH_VARIANT" \
  -f Dockerfile -t "$IMAGE" .
log "built in $(( $(date +%s) - started )) s"

CTR="$(buildah from --pull=never "$IMAGE")"
log "image size: $(podman image inspect --format '{{.Size}}' "$IMAGE" 2>/dev/null || echo '?') bytes"
log "running stream-asd --help inside (as the image's user)"
buildah run --isolation=chroot --user 10001:10001 "$CTR" -- stream-asd --help
buildah run --isolation=chroot --user 10001:10001 "$CTR" -- asd-train --help >/dev/null
buildah run --isolation=chroot --user 10001:10001 "$CTR" -- python -c \
  'import torch, faust, stream_asd.processor.app, trainer.job; print("torch", torch.__version__, "cuda build:", torch.version.cuda)'
buildah run --isolation=chroot --user 10001:10001 --env ASD_METRICS__PORT=0 "$CTR" -- python /usr/local/bin/asd-healthcheck
buildah run --isolation=chroot "$CTR" -- sh -c '! command -v pip && ! command -v gcc' >/dev/null
healthcheck="$(buildah inspect --type image --format '{{.Docker.Config.Healthcheck}}' "$IMAGE")"
log "healthcheck in the image config: $healthcheck"
case "$healthcheck" in *asd-healthcheck*) ;; *) log "FAIL: no HEALTHCHECK in the image"; exit 1;; esac
log "OK: stream-asd and asd-train answer, the runtime imports, no pip or compiler in the image"

if [ -z "${KEEP:-}" ]; then
  buildah rm "$CTR" >/dev/null && CTR=""
  buildah rmi "$IMAGE" >/dev/null
  log "removed $IMAGE (KEEP=1 keeps it)"
fi
