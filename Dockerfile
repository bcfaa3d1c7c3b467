# syntax=docker/dockerfile:1
# loadagg: the aggregator (`loadagg serve`, the default command) and the GPU-side agent (`scheduler-agent`) in one
# small image. Configure either through LOADAGG_* environment variables (docs/operations.md lists them all).
#
#   docker build -t loadagg:local .
#   docker run -p 50051:50051 -e LOADAGG_DP_SIZE=4 loadagg:local                         # aggregator
#   docker run --no-healthcheck --entrypoint scheduler-agent -e LOADAGG_AGGREGATOR=HOST:50051 loadagg:local  # agent

# Stage 1: build wheels for loadagg and every runtime dependency. Every dependency ships a wheel; gcc is for
# loadagg's own C check of pushed figures (setup.py), and stays in this stage.
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY loadagg ./loadagg
COPY scheduler_agent ./scheduler_agent
RUN pip wheel --wheel-dir /wheels '.[all]'

# Stage 2: the runtime. Installs the wheels from the builder through a bind mount, so they never land in a layer.
FROM python:3.11-slim AS runtime
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOADAGG_HOST=0.0.0.0 \
    LOADAGG_PORT=50051
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels 'loadagg[all]' \
    && groupadd --system --gid 10001 loadagg \
    && useradd --system --uid 10001 --gid loadagg --no-create-home --shell /usr/sbin/nologin loadagg
# Numeric, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 10001:10001
WORKDIR /tmp
# gRPC: LoadAggregator, AgentLink, grpc.health.v1, reflection.
EXPOSE 50051
# The gRPC health service, through `loadagg health` (target: 127.0.0.1:$LOADAGG_PORT). Agent containers, which
# serve no port, override it (see docker-compose.yml). Kubernetes uses its native grpc probes instead.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["loadagg", "health"]
ENTRYPOINT ["loadagg"]
CMD ["serve"]
