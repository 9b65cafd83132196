# syntax=docker/dockerfile:1
# One image for every smarthome process; the command picks which one:
#   python -m services.gateway | services.actors | services.rules | services.recorder
#             | services.webhooks
#   python -m devices.lightbulb | devices.energy_tracker
#   python -m services.launcher migrate   # the migration Job: schema, admin, API keys
#
#   docker build -t smarthome .                 # the runtime image (last stage)
#   docker build --target dev -t smarthome .    # Tilt's live-update image
ARG PYTHON_IMAGE=python:3.11-slim-trixie

# Build: a virtualenv with the hash-pinned dependencies, then the project itself.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements.txt
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY devices ./devices
# setuptools comes from requirements.txt (hash-pinned build dependency), hence no isolation;
# pip and setuptools then leave: nothing installs packages at run time.
RUN pip install --no-cache-dir --no-deps --no-build-isolation --no-index . \
    && python -m compileall -q /opt/venv/lib \
    && pip uninstall --yes setuptools pip

# What the runtime and dev images share: Python, the virtualenv, a non-root user.
FROM ${PYTHON_IMAGE} AS base
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="smarthome" \
      org.opencontainers.image.description="Event-driven smart-home / IoT platform on NATS JetStream: gateway, actors, rules, recorder and demo devices" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
RUN groupadd --system --gid 10001 smarthome \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin smarthome \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/smarthome
COPY --from=build /opt/venv /opt/venv
# Bytecode was compiled at build time; the root filesystem is read-only in Kubernetes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SMARTHOME_DATA_DIR=/var/lib/smarthome \
    SMARTHOME_HTTP_HOST=0.0.0.0
# An empty working directory: `python -m` puts it first on sys.path.
WORKDIR /app
EXPOSE 8000 8081

# Tilt's live update syncs sources into site-packages as the app user and restarts the process.
FROM base AS dev
RUN chown -R 10001:10001 /opt/venv/lib/python3.11/site-packages/libs \
        /opt/venv/lib/python3.11/site-packages/services \
        /opt/venv/lib/python3.11/site-packages/devices
USER 10001:10001
CMD ["python", "-m", "services.gateway"]

# The runtime image (default target). Exec form: no shell is involved in starting a process.
FROM base AS runtime
USER 10001:10001
CMD ["python", "-m", "services.gateway"]
