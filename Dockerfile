# conus: spinal cord segmentation down to the conus medullaris, as a BIDS App.
#
# Build (from the repository root; the version MUST be bids_app.__version__, the build checks it):
#   V=$(python3 -c 'import re;print(re.search(r"__version__ = \"(.+)\"",open("bids_app/__init__.py").read())[1])')
#   docker build --build-arg CONUS_VERSION="$V" \
#       --build-arg CONUS_SOURCE="$(git remote get-url origin)" \
#       --build-arg CONUS_REVISION="$(git rev-parse HEAD)" -t "conus:$V" .
# Run (read-only root filesystem; /tmp is the only writable place besides the output folder):
#   docker run --rm --read-only --tmpfs /tmp -v "$PWD/bids:/data:ro" -v "$PWD/out:/out" \
#       "conus:$V" /data /out participant
# See the README (Containers and clusters) for Apptainer, SLURM and BABS.

# Base image pinned by digest (python 3.11, Debian bookworm, slim). The digest is the multi-arch
# index digest of python:3.11.14-slim-bookworm as pinned by several public projects; it was NOT
# resolved against Docker Hub from the conus development machine (no registry access there).
# Re-check and bump it with:  docker buildx imagetools inspect python:3.11.14-slim-bookworm
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

ARG CONUS_VERSION
ARG CONUS_SOURCE=""
ARG CONUS_REVISION=""

LABEL org.opencontainers.image.title="conus" \
      org.opencontainers.image.description="Spinal cord segmentation down to the conus medullaris (BIDS App)" \
      org.opencontainers.image.version="${CONUS_VERSION}" \
      org.opencontainers.image.source="${CONUS_SOURCE}" \
      org.opencontainers.image.revision="${CONUS_REVISION}" \
      org.opencontainers.image.licenses="MIT"

# CONUS_CONTAINER_IMAGE is recorded in dataset_description.json (GeneratedBy.Container);
# CONUS_MODELS_DIR is where the baked-in model bundles are (read-only).
# Everything that could write at run time points at /tmp (a tmpfs with `docker run --read-only
# --tmpfs /tmp`, a private in-memory /tmp with `apptainer run --containall`). The image's own
# files (/usr/local, /opt/conus) are owned by root and never written after the build.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    KERAS_HOME=/tmp/keras \
    XDG_CACHE_HOME=/tmp/cache \
    XDG_CONFIG_HOME=/tmp/config \
    DENO_DIR=/tmp/deno \
    TF_CPP_MIN_LOG_LEVEL=2 \
    CONUS_CONTAINER_IMAGE="conus:${CONUS_VERSION}" \
    CONUS_MODELS_DIR=/opt/conus/models

WORKDIR /opt/conus

# The same installer as the README and .ci/run (pinned by constraints.txt).
COPY pyproject.toml constraints.txt README.md ./
COPY scripts/install.sh scripts/install.sh
COPY bids_app/ bids_app/
RUN bash scripts/install.sh \
    && python -m compileall -q bids_app \
    && test "$(python -c 'import bids_app; print(bids_app.__version__)')" = "${CONUS_VERSION}" \
    && conus --version

# Model bundles are baked into the image (nothing is downloaded at run time).
COPY models/ models/

# Unprivileged user with no home directory; the files above stay root-owned and read-only for it.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin conus
USER 10001:10001
WORKDIR /tmp

ENTRYPOINT ["conus"]
CMD ["--help"]
