# syntax=docker/dockerfile:1
# One image for every role of stream-asd:
#   stream-asd produce | process | archive ...   (ENTRYPOINT, pick the role with the args)
#   asd-train job ...                              (override the command: asd-train)
#
# GPU by default: the pinned PyPI torch 2.11.0 wheels are CUDA builds that carry the CUDA
# runtime, cuDNN and NCCL as nvidia-* wheels, so the image runs on GPU nodes with only the
# host's NVIDIA driver (injected by the NVIDIA container toolkit / device plugin) and falls
# back to the CPU elsewhere. For a smaller CPU-only image (no CUDA libraries, ~1 GB instead
# of ~6 GB) build with:  --build-arg TORCH_VARIANT=cpu
#
# Build stages: "build" resolves the pinned stack into /opt/venv (pip, wheels, no compiler
# needed: every pinned dependency ships manylinux wheels); "runtime" copies only that venv
# onto a clean base: no pip cache, no build tools, no apt lists, no source tree.

# Base (both stages): Debian 12 slim with CPython 3.11, the interpreter the pins were resolved on.
FROM python:3.11-slim-bookworm AS build
# cuda: PyPI torch wheels (CUDA-capable); cpu: the PyTorch CPU-only wheel index.
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (this layer is reused while only the source changes).
COPY pyproject.toml README.md ./
# Same pins as pyproject.toml (tests/test_deploy.py checks they agree).
RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_CPU_INDEX" \
            torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0; \
    elif [ "$TORCH_VARIANT" != "cuda" ]; then \
        echo "TORCH_VARIANT must be cuda or cpu, not $TORCH_VARIANT" >&2; exit 1; \
    fi \
 && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["s3"]))' \
    > /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt dumb-init==1.2.5.post1
COPY stream_asd ./stream_asd
COPY trainer ./trainer
RUN pip install --no-cache-dir --no-deps . \
 && pip check \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && rm -rf /opt/venv/lib/python3.11/site-packages/pip /opt/venv/bin/pip*

FROM python:3.11-slim-bookworm AS runtime
ARG TORCH_VARIANT=cuda
LABEL org.opencontainers.image.title="stream-asd" \
      org.opencontainers.image.description="Real-time anomalous machine sound detection on Kafka (all roles)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.stream-asd.torch-variant="${TORCH_VARIANT}"
# Fixed numeric ids so Kubernetes runAsNonRoot/runAsUser can check them. The base's own
# pip/setuptools go too: nothing installs packages at run time.
RUN groupadd --gid 10001 asd \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin asd \
 && rm -rf /usr/local/lib/python3.11/site-packages/pip /usr/local/lib/python3.11/site-packages/pip-* \
           /usr/local/lib/python3.11/site-packages/setuptools* /usr/local/lib/python3.11/site-packages/wheel* \
           /usr/local/bin/pip* /root/.cache
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/asd-healthcheck
# Caches of torch/matplotlib/HF go to /tmp (an emptyDir in Kubernetes: the root FS is read-only).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch \
    HF_HOME=/tmp/huggingface \
    OMP_WAIT_POLICY=PASSIVE \
    ASD_METRICS__PORT=9108
USER 10001:10001
WORKDIR /tmp
EXPOSE 9108
# Healthy when the role's /metrics endpoint answers (roles without one: always healthy).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/asd-healthcheck"]
# dumb-init as PID 1 forwards SIGTERM so workers drain their batch and commit offsets.
ENTRYPOINT ["dumb-init", "--", "stream-asd"]
CMD ["--help"]
