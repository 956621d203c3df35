# syntax=docker/dockerfile:1.7
# The fedhpc control plane: one image for `fedhpc registry|aggregator|coordinator serve` (and
# every other `fedhpc` command, e.g. the one-shot `fedhpc sites add` jobs of docker-compose.yml).
#
#   docker build -f containers/control-plane.Dockerfile -t fedhpc/control-plane:0.1.0 .
#
# Build context: the repository root (pyproject.toml, setup.py, README.md and services/ are copied).
# The heredoc below needs BuildKit (Docker >= 23 uses it by default; the syntax line pins the
# Dockerfile frontend to 1.7).
#
# Runtime contract:
# - runs as uid/gid 10001 (user "fedhpc"); works with a read-only root filesystem as long as
#   /tmp is writable (tmpfs/emptyDir: temp files, the aggregator's spool, matplotlib's cache)
#   and /data is a volume (the working directory: the coordinator's SQLite state and the local
#   sites' spools, coordinator.data_dir=/data in docker-compose.yml and the Helm chart).
#   No VOLUME instruction: it would give every registry/aggregator container an anonymous
#   volume it never uses; compose and the chart mount /data where it is needed.
# - configuration: --config FILE or $FEDHPC_CONFIG plus FEDHPC_<SECTION>__<KEY> variables;
#   nothing fedhpc-specific is baked into the image's environment, so a config file is never
#   silently overridden. Inside a container set <service>.server.host to 0.0.0.0.
# - HEALTHCHECK: /usr/local/bin/fedhpc-healthcheck asks the gRPC health service of the fedhpc
#   service this container runs (found from PID 1's command line, port/TLS from the same
#   configuration the server loads). Containers running something else count as healthy.
# - torch (CPU wheel) is installed because the coordinator builds round 0 of an experiment
#   with the task plugin and may run `local` trainer sites itself (docker-compose does).

# The trainer image (containers/trainer.Dockerfile, trainer.def) pins the same Python: Globus
# Compute needs the coordinator and the trainers on one minor version (DESIGN.md).
ARG PYTHON_VERSION=3.11.14
ARG PYTHON_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

# pip compiles the installed modules to bytecode here: at run time the root is read-only.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A C compiler for the aggregator's fused kernel (fedhpc.aggregator._kernels, setup.py); only
# in this stage: the runtime stage copies the built venv.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The CPU wheel from the PyTorch index: torch from PyPI without an index pulls the CUDA build
# (several GB). Pinned like the Makefile.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
# Dependencies change less often than code, but pyproject.toml lists them and the package is
# built from services/: copy both, then install (not editable) with the HPC dispatchers.
COPY pyproject.toml setup.py README.md ./
COPY services ./services
# The project itself; its dependencies are pinned/ranged in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[hpc]" \
 && fedhpc --version \
 && python -c "import torch, fedhpc.trainer.tasks.digits; print('torch', torch.__version__)" \
 && python -c "import fedhpc.aggregator._kernels"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="fedhpc-control-plane" \
      org.opencontainers.image.description="fedhpc control plane: registry, aggregator and coordinator (gRPC), fedhpc CLI" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.11.14-slim-bookworm" \
      io.fedhpc.grpc-ports="registry=50051 aggregator=50052 coordinator=50053" \
      io.fedhpc.metrics-ports="registry=9101 aggregator=9102 coordinator=9103" \
      io.fedhpc.user="10001:10001" \
      io.fedhpc.writable-paths="/tmp /data"

RUN groupadd --system --gid 10001 fedhpc \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin fedhpc \
 && install -d -o 10001 -g 10001 -m 0750 /data

COPY --from=build /opt/venv /opt/venv

# The health probe (Docker HEALTHCHECK, docker-compose healthchecks, and the Helm chart's exec
# probes when TLS is on: Kubernetes' native gRPC probes cannot speak TLS).
COPY --chmod=0755 <<'EOF' /usr/local/bin/fedhpc-healthcheck
#!/opt/venv/bin/python
"""Exit 0 when a fedhpc service answers SERVING on the standard gRPC health service.

usage: fedhpc-healthcheck [registry|aggregator|coordinator] [--address HOST:PORT]
                          [--config FILE] [--tls-ca FILE] [--server-name NAME] [--timeout S]

Without a service name it probes the one PID 1 runs (`fedhpc <service> serve`), and exits 0
when PID 1 runs no fedhpc service (a one-shot CLI job). Port, TLS and the client certificate
come from the same configuration the server loads (--config, else the --config of PID 1 when
it serves that service, else $FEDHPC_CONFIG; plus FEDHPC_* variables). With TLS the CA is --tls-ca, $FEDHPC_HEALTHCHECK_CA, the server's
client_ca_file, else its own certificate chain; the name checked in the certificate is
--server-name or $FEDHPC_HEALTHCHECK_SERVER_NAME (default: the certificate must name
localhost). With mTLS the probe presents the server's own certificate as its client
certificate, so issue it for both server and client authentication.
"""

import argparse
import os
import sys
from pathlib import Path

SERVICES = {
    "registry": "fedhpc.v1.Registry",
    "aggregator": "fedhpc.v1.Aggregator",
    "coordinator": "fedhpc.v1.Coordinator",
}


def from_pid1(cmdline="/proc/1/cmdline"):
    """(service, --config value) of `fedhpc <service> serve [--config FILE]` run by PID 1."""
    try:
        with open(cmdline, "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        return None, None
    for i, arg in enumerate(args[:-1]):
        if arg in SERVICES and args[i + 1] == "serve":
            config = None
            for j, opt in enumerate(args[i + 2 :], start=i + 2):
                if opt == "--config" and j + 1 < len(args):
                    config = args[j + 1]
                elif opt.startswith("--config="):
                    config = opt.split("=", 1)[1]
            return arg, config
    return None, None


def main():
    parser = argparse.ArgumentParser(prog="fedhpc-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("service", nargs="?", choices=sorted(SERVICES))
    parser.add_argument("--address", help="host:port to probe (default 127.0.0.1:<server.port>)")
    parser.add_argument("--config", help="fedhpc config file (default: $FEDHPC_CONFIG / PID 1's)")
    parser.add_argument("--tls-ca", default=os.environ.get("FEDHPC_HEALTHCHECK_CA"))
    parser.add_argument("--server-name", default=os.environ.get("FEDHPC_HEALTHCHECK_SERVER_NAME"))
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    pid1_service, pid1_config = from_pid1()
    service = args.service or pid1_service
    if service is None:
        print("PID 1 runs no fedhpc service: nothing to probe")
        return 0
    if service != pid1_service:
        pid1_config = None

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedhpc.common.config import ConfigError, load_config
    from fedhpc.common.grpc_client import make_channel

    try:
        server = getattr(load_config(args.config or pid1_config), service).server
    except ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        return 1
    if not args.address and not server.port:
        print(f"{service}: server.port is 0 (any free port): give --address", file=sys.stderr)
        return 1
    address = args.address or f"127.0.0.1:{server.port}"
    tls = server.tls
    kwargs = {}
    if tls is not None:
        kwargs["tls_ca_file"] = Path(args.tls_ca) if args.tls_ca else tls.client_ca_file or tls.cert_file
        kwargs["tls_server_name"] = args.server_name
        if tls.client_ca_file is not None:
            kwargs["client_cert_file"] = tls.cert_file
            kwargs["client_key_file"] = tls.key_file
    name = SERVICES[service]
    try:
        with make_channel(address, **kwargs) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"{service} at {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{service} at {address}: {exc}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{service} at {address}: {name} {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
EOF

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/data \
    TMPDIR=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    GLOBUS_COMPUTE_USER_DIR=/data/.globus_compute

# gRPC: registry, aggregator, coordinator; Prometheus /metrics: the same order.
EXPOSE 50051 50052 50053 9101 9102 9103

USER 10001:10001
WORKDIR /data

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["fedhpc-healthcheck"]

ENTRYPOINT ["fedhpc"]
CMD ["--help"]
