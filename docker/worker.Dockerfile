# Worker image of the calibration sweep: Ray head and worker nodes, and the RayJob submitter.
#
# Build from the repository root (the context must hold pyproject.toml and the packages):
#   docker build -f docker/worker.Dockerfile -t REGISTRY/calib-sweep-worker:TAG .
#
# PyTorch's wheel for Linux x86_64 on PyPI is the CUDA build and brings the CUDA runtime and cuDNN
# as nvidia-* wheels, so a plain Python base is enough: the node supplies only the NVIDIA driver
# (through the NVIDIA container toolkit / device plugin). That keeps one copy of the CUDA
# libraries in the image instead of two (a CUDA base image plus torch's own).

# ---- build: a virtual environment with the pinned dependencies and the project ----
FROM python:3.11.13-slim-bookworm AS build

# Keep these equal to the pins in pyproject.toml (tests/infra/test_infra_docker.py checks it).
ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch alone first: by far the largest layer, and it changes only with its pin.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}"

# Then the rest of the pinned dependencies, read from pyproject.toml so that this layer is
# rebuilt only when the dependencies change, not on every source edit. ray[default] adds the
# dashboard and job-submission server that KubeRay's RayJob submits to (ray[tune] lacks it).
WORKDIR /app
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt "ray[default,tune]==${RAY_VERSION}"

# The project itself, editable: `import sweeps` and `python sweeps/launch.py` then read the very
# same files under /app, grid YAMLs included, and the package metadata is still installed.
COPY calib ./calib
COPY sweeps ./sweeps
COPY tracking ./tracking
# Byte-compiled now: at run time /app is read-only, and every Ray worker imports from it.
RUN pip install --no-cache-dir --no-deps -e . \
    && python -m compileall -q calib sweeps tracking

# ---- runtime: the environment and the sources, no build leftovers, a non-root user ----
FROM python:3.11.13-slim-bookworm

# wget: KubeRay's default readiness/liveness probes of Ray pods call it.
# DL3008 (pin apt versions) is ignored: Debian drops a package version from the archive at each
# security update, so an exact pin breaks the build within weeks; the base tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# A uid above 10000 cannot collide with a system account of the node.
RUN useradd --uid 10001 --user-group --create-home --shell /bin/bash ray

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app

# Writable places live under /tmp, so that the root filesystem can be mounted read-only
# (Kubernetes mounts an emptyDir there; Ray keeps its session directory in /tmp/ray).
# NVIDIA_DRIVER_CAPABILITIES: what the NVIDIA runtime mounts from the host driver (CUDA
# images set it too); which GPUs are visible is the device plugin's business.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /app
USER 10001:10001

# Ray nodes are health-checked by KubeRay's probes (raylet and GCS endpoints), not by Docker.
HEALTHCHECK NONE

CMD ["python", "sweeps/launch.py", "--help"]
