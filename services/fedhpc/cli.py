"""The `fedhpc` command line: start services and work with the model registry.

fedhpc registry serve --config fedhpc.yaml
fedhpc models push my-model weights.safetensors --alias latest
fedhpc models list my-model
fedhpc models pull my-model:latest out.safetensors
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
import grpc
from google.protobuf import json_format

from fedhpc import __version__
from fedhpc.api.v1 import registry_pb2
from fedhpc.common.config import ConfigError, FedhpcConfig, load_config
from fedhpc.common.logging import configure_logging
from fedhpc.common.memory import tune_malloc_for_streaming

DEFAULT_REGISTRY = "127.0.0.1:50051"


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _load(config_path: Path | None, overrides: dict[str, Any]) -> FedhpcConfig:
    try:
        return load_config(config_path, overrides=overrides)
    except ConfigError as exc:
        _fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fedhpc")
def main() -> None:
    """fedhpc: federated learning across supercomputers.

    Configuration comes from a YAML file (--config or $FEDHPC_CONFIG) plus
    FEDHPC_* environment overrides, e.g. FEDHPC_STORE__KIND=s3; see README.md.
    """


# -- services ------------------------------------------------------------------------------
def _serve_options(service: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--config, --host, --port, --metrics-port and --store-root, shared by every `serve`."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option(
            "--store-root",
            type=click.Path(path_type=Path, file_okay=False),
            help="Use the file object store under this directory (overrides store).",
        )(func)
        func = click.option(
            "--metrics-port", type=int, help=f"Prometheus port (overrides {service}.server.metrics_port)."
        )(func)
        func = click.option(
            "--port", type=int, help=f"gRPC port (overrides {service}.server.port; 0 = any free port)."
        )(func)
        func = click.option("--host", help=f"Address to bind (overrides {service}.server.host).")(func)
        return click.option(
            "--config",
            "config_path",
            type=click.Path(path_type=Path, dir_okay=False),
            envvar="FEDHPC_CONFIG",
            help="YAML configuration file (default: $FEDHPC_CONFIG, else built-in defaults).",
        )(func)

    return decorate


def _serve_config(
    service: str,
    config_path: Path | None,
    host: str | None,
    port: int | None,
    metrics_port: int | None,
    store_root: Path | None,
    settings: dict[str, Any] | None = None,
) -> FedhpcConfig:
    """The configuration with the command line's overrides applied, logging and malloc set up."""
    server = {
        key: value
        for key, value in (("host", host), ("port", port), ("metrics_port", metrics_port))
        if value is not None
    }
    section = dict(settings or {})
    if server:
        section["server"] = server
    overrides: dict[str, Any] = {service: section} if section else {}
    if store_root is not None:
        overrides["store"] = {"kind": "file", "root": str(store_root)}
    config = _load(config_path, overrides)
    configure_logging(config.log.level, config.log.json_format)
    tune_malloc_for_streaming()
    return config


@main.group()
def registry() -> None:
    """The model registry service."""


@registry.command("serve")
@_serve_options("registry")
def registry_serve(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    metrics_port: int | None,
    store_root: Path | None,
) -> None:
    """Serve the Registry gRPC API until SIGTERM/SIGINT.

    \b
    Example (embedded file store):
      fedhpc registry serve --store-root .fedhpc/store --port 50051
    Example (S3/MinIO from the environment):
      FEDHPC_STORE__KIND=s3 FEDHPC_STORE__ENDPOINT=127.0.0.1:9000 \\
      FEDHPC_STORE__ACCESS_KEY=... FEDHPC_STORE__SECRET_KEY=... fedhpc registry serve
    """
    config = _serve_config("registry", config_path, host, port, metrics_port, store_root)
    from fedhpc.registry.server import serve

    serve(config)


@main.group()
def aggregator() -> None:
    """The aggregator service."""


@aggregator.command("serve")
@_serve_options("aggregator")
@click.option(
    "--registry",
    "registry_address",
    help="Registry address host:port (overrides aggregator.registry_address).",
)
def aggregator_serve(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    metrics_port: int | None,
    store_root: Path | None,
    registry_address: str | None,
) -> None:
    """Serve the Aggregator gRPC API until SIGTERM/SIGINT.

    It reads the base model, the updates and optimizer state from the object
    store the registry uses, and writes new versions through the registry.

    \b
    Example (next to a registry on the embedded file store):
      fedhpc aggregator serve --store-root .fedhpc/store --registry 127.0.0.1:50051 --port 50052
    """
    settings = {"registry_address": registry_address} if registry_address is not None else None
    config = _serve_config("aggregator", config_path, host, port, metrics_port, store_root, settings)
    from fedhpc.aggregator.server import serve

    serve(config)


# -- registry client -----------------------------------------------------------------------
def _client_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--tls-ca",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        envvar="FEDHPC_TLS_CA",
        help="PEM CA bundle: connect with TLS [env FEDHPC_TLS_CA].",
    )(func)
    func = click.option(
        "--token", envvar="FEDHPC_TOKEN", help="Bearer token for the registry [env FEDHPC_TOKEN]."
    )(func)
    func = click.option(
        "--registry",
        "target",
        default=DEFAULT_REGISTRY,
        show_default=True,
        envvar="FEDHPC_REGISTRY",
        help="Registry address host:port [env FEDHPC_REGISTRY].",
    )(func)
    return func


@contextmanager
def _registry_client(target: str, token: str | None, tls_ca: Path | None) -> Iterator[Any]:
    from fedhpc.common.grpc_client import make_channel
    from fedhpc.common.registry_client import RegistryClient, RegistryClientError

    channel = make_channel(target, token=token, tls_ca_file=tls_ca)
    try:
        yield RegistryClient(channel)
    except grpc.RpcError as exc:
        code = exc.code()
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            _fail(f"registry at {target} is unavailable: {detail}")
        _fail(f"{code.name}: {detail}")
    except RegistryClientError as exc:
        _fail(str(exc))
    finally:
        channel.close()


@contextmanager
def _progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    if quiet:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr) as bar:

        def advance(n: int) -> None:
            bar.update(n)

        yield advance


def _as_json(message: Any) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2)


@main.group()
def models() -> None:
    """Model versions in the registry: list, show, push, pull."""


@models.command("list")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_client_options
def models_list(
    model: str | None, as_json: bool, target: str, token: str | None, tls_ca: Path | None
) -> None:
    """List models, or the committed versions of MODEL (oldest first).

    \b
    Example:
      fedhpc models list               # every model
      fedhpc models list my-model      # its versions, with aliases
    """
    with _registry_client(target, token, tls_ca) as client:
        if model is None:
            found = list(client.list_models())
            if as_json:
                click.echo(json.dumps([json.loads(_as_json(m)) for m in found], indent=2))
                return
            for m in found:
                click.echo(f"{m.name}\t{m.description}")
            return
        versions = list(client.list_versions(model))
        if as_json:
            click.echo(json.dumps([json.loads(_as_json(v)) for v in versions], indent=2))
            return
        click.echo(f"{'VERSION':<36} {'ROUND':>5} {'SIZE':>12} {'CREATED':<20} ALIASES")
        for v in versions:
            m = v.manifest
            created = m.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            click.echo(f"{m.version:<36} {m.round:>5} {m.size_bytes:>12} {created:<20} {','.join(v.aliases)}")


@models.command("show")
@click.argument("ref")
@_client_options
def models_show(ref: str, target: str, token: str | None, tls_ca: Path | None) -> None:
    """Print the manifest of REF (MODEL[:VERSION-or-ALIAS], default alias 'latest') as JSON."""
    from fedhpc.common.registry_client import parse_model_ref

    with _registry_client(target, token, tls_ca) as client:
        version = client.get_version(parse_model_ref(ref))
        click.echo(_as_json(version))


_TRANSPORT = click.option(
    "--transport",
    type=click.Choice(["auto", "presigned", "stream"]),
    default="auto",
    show_default=True,
    help="presigned: straight to object storage; stream: through the registry's gRPC stream; "
    "auto: presigned when offered.",
)
_QUIET = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")


@models.command("push")
@click.argument("model")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--version", "version_id", default="", help="Version id (default: generated, time-ordered).")
@click.option(
    "--alias",
    "aliases",
    multiple=True,
    default=["latest"],
    show_default=True,
    help="Alias to set (repeatable).",
)
@click.option("--parent", default="", help="Version this one derives from.")
@click.option("--round", "round_number", type=int, default=0, show_default=True, help="Training round.")
@click.option("--create/--no-create", default=True, show_default=True, help="Create MODEL if missing.")
@_TRANSPORT
@_QUIET
@_client_options
def models_push(
    model: str,
    path: Path,
    version_id: str,
    aliases: tuple[str, ...],
    parent: str,
    round_number: int,
    create: bool,
    transport: str,
    quiet: bool,
    target: str,
    token: str | None,
    tls_ca: Path | None,
) -> None:
    """Upload the safetensors file PATH as a new version of MODEL.

    \b
    Example:
      fedhpc models push my-model weights.safetensors --version r0 --alias latest --alias best
    """
    with _registry_client(target, token, tls_ca) as client:
        if create:
            client.create_model(model)
        with _progress(path.stat().st_size, f"push {model}", quiet) as progress:
            version = client.push(
                model,
                path,
                version=version_id,
                transport=transport,
                parent=parent,
                round_number=round_number,
                aliases=aliases,
                progress=progress,
            )
    m = version.manifest
    click.echo(f"committed {m.model}:{m.version} ({m.size_bytes} bytes, sha256 {m.sha256[:16]}...)")


@models.command("pull")
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path, dir_okay=False))
@_TRANSPORT
@_QUIET
@_client_options
def models_pull(
    ref: str, dest: Path, transport: str, quiet: bool, target: str, token: str | None, tls_ca: Path | None
) -> None:
    """Download REF (MODEL[:VERSION-or-ALIAS]) to DEST, verified against its sha256.

    \b
    Example:
      fedhpc models pull my-model:latest global.safetensors
    """
    from fedhpc.common.registry_client import parse_model_ref

    model_ref = parse_model_ref(ref)
    with _registry_client(target, token, tls_ca) as client:
        info: registry_pb2.ModelVersion = client.get_version(model_ref)
        with _progress(info.manifest.size_bytes, f"pull {ref}", quiet) as progress:
            version = client.pull(model_ref, dest, transport=transport, progress=progress)
    m = version.manifest
    click.echo(f"pulled {m.model}:{m.version} to {dest} ({m.size_bytes} bytes, sha256 verified)")


# -- federations: coordinator serve, up/down, run, status, watch, stop, sites, report, demo --
def _register_federation_commands() -> None:
    from fedhpc import federation_cli

    federation_cli.register(main, _serve_options, _serve_config)


_register_federation_commands()


if __name__ == "__main__":
    main()
