"""The ``fedhpc-trainer`` command: run a task, check a site's environment, list task plugins.

fedhpc-trainer run --task task.json                       # result JSON on stdout
fedhpc-trainer run --task task.json --result result.json  # result written atomically
fedhpc-trainer selftest --registry registry.example.org:50051
fedhpc-trainer plugins
fedhpc-trainer make-task --plugin digits --dir ./try   # a model and a task to try a plugin
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import click

from fedhpc import __version__
from fedhpc.common.logging import configure_logging

__all__ = ["main"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=_CONTEXT)
@click.version_option(__version__, prog_name="fedhpc-trainer")
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Logging threshold; logs go to stderr, never to stdout. Example: --log-level DEBUG",
)
@click.option(
    "--log-format",
    default="json",
    show_default=True,
    type=click.Choice(["json", "text"]),
    help="JSON lines (for log collectors) or human-readable text. Example: --log-format text",
)
def main(log_level: str, log_format: str) -> None:
    """fedhpc trainer: runs federated-learning tasks on a site (HPC node, laptop, cloud VM).

    \b
    Examples:
      fedhpc-trainer run --task task.json
      fedhpc-trainer run --task task.json --result result.json
      fedhpc-trainer selftest --registry registry.example.org:50051
      fedhpc-trainer plugins
      fedhpc-trainer make-task --plugin digits --dir ./try \\
          --site-config '{"partition": 0, "num_partitions": 4}'
    """
    configure_logging(log_level, json_format=log_format == "json")


# -- run ------------------------------------------------------------------------------------------


def _read_task(source: str) -> Any:
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    return json.loads(text)


@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Batch schedulers send SIGTERM before SIGKILL (walltime, preemption, scancel): exiting
    through SystemExit unwinds the task, so its temporary files (a downloaded model) are removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_atomically(path: Path, text: str) -> None:
    """Readers (a dispatcher polling for results) see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@main.command(context_settings=_CONTEXT)
@click.option(
    "--task",
    "task_path",
    required=True,
    metavar="PATH",
    help="The task document (fedhpc.task/v1 JSON); '-' reads it from stdin. Example: --task task.json",
)
@click.option(
    "--result",
    "result_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="PATH",
    help="Write the result JSON here (atomically) instead of printing it to stdout. Example: --result result.json",
)
def run(task_path: str, result_path: Path | None) -> None:
    """Run one task: fetch the global model, train (or evaluate), upload the update, report.

    Prints the result (fedhpc.result/v1 JSON) to stdout, or writes it to --result. Exits 0
    when the task succeeded and 1 when the result carries an error (its code and message are
    also printed to stderr).

    \b
    Examples:
      fedhpc-trainer run --task task.json
      fedhpc-trainer run --task task.json --result result.json
      cat task.json | fedhpc-trainer run --task -
    """
    from fedhpc.trainer.runtime import run_task  # torch is imported only by the commands needing it

    try:
        task = _read_task(task_path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        # Still a result document: whoever waits for it learns why.
        result: dict[str, Any] = {
            "schema": "fedhpc.result/v1",
            "task_id": "",
            "error": {"code": "INVALID_TASK", "message": f"cannot read task {task_path}: {exc}"},
        }
    else:
        with _exit_on_sigterm():
            result = run_task(task)
    text = json.dumps(result, indent=2)
    if result_path is None:
        click.echo(text)
    else:
        _write_atomically(result_path, text + "\n")
    error = result.get("error")
    if error:
        click.echo(f"task failed: {error['code']}: {error['message']}", err=True)
        sys.exit(1)


# -- make-task ------------------------------------------------------------------------------------------


def _json_object(ctx: click.Context, param: click.Parameter, value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"epochs\": 2}'")
    return parsed


@main.command("make-task", context_settings=_CONTEXT)
@click.option(
    "--plugin",
    "plugin_name",
    required=True,
    metavar="NAME",
    help="An installed plugin name or a 'module:Class' import path. Example: --plugin digits",
)
@click.option(
    "--dir",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Where to write global.safetensors and task.json (created if missing). Example: --dir ./try",
)
@click.option(
    "--hyperparameters",
    default="{}",
    callback=_json_object,
    metavar="JSON",
    help="The plugin's hyperparameters as a JSON object. Example: --hyperparameters '{\"epochs\": 2}'",
)
@click.option(
    "--site-config",
    default="{}",
    callback=_json_object,
    metavar="JSON",
    help='The site_config as a JSON object. Example: --site-config \'{"partition": 0, "num_partitions": 4}\'',
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    help="Seed of the round-0 weights and of the task. Example: --seed 1",
)
def make_task(
    plugin_name: str, out_dir: Path, hyperparameters: dict[str, Any], site_config: dict[str, Any], seed: int
) -> None:
    """Write a round-0 model and a ready-to-run train task, to try a plugin locally.

    The task reads the model from DIR/global.safetensors and writes its update to
    DIR/update.safetensors; run it with `fedhpc-trainer run --task DIR/task.json`.

    \b
    Examples:
      fedhpc-trainer make-task --plugin digits --dir ./try \\
          --site-config '{"partition": 0, "num_partitions": 4}'
      fedhpc-trainer run --task ./try/task.json
      fedhpc-trainer make-task --plugin my_lab.task:MyTask --dir ./try --hyperparameters '{"lr": 0.01}'
    """
    import time

    from fedhpc.common.tensors import write_safetensors_file
    from fedhpc.trainer.plugins import PluginError, TaskConfigError, load_plugin

    try:
        plugin = load_plugin(plugin_name)
        validated = plugin.validate_hyperparameters(hyperparameters)
        plugin.check_site_config(site_config)
        weights = plugin.initial_weights(validated, seed)
    except (PluginError, TaskConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = (out_dir / "global.safetensors").resolve()
    blob = write_safetensors_file(model_path, weights)
    task = {
        "schema": "fedhpc.task/v1",
        "experiment_id": "local-try",
        "round": 1,
        "task_id": "local-try-r1",
        "site": "local",
        "plugin": {"name": plugin_name, "hyperparameters": hyperparameters},
        "model": {
            "model": "local-try",
            "version": "r0",
            "sha256": blob.sha256,
            "size_bytes": blob.size,
            "path": str(model_path),
        },
        "update": {
            "object_key": "update.safetensors",
            "path": str(model_path.with_name("update.safetensors")),
        },
        "site_config": site_config,
        "dispatched_at": time.time(),
        "seed": seed,
    }
    task_path = out_dir / "task.json"
    _write_atomically(task_path, json.dumps(task, indent=2) + "\n")
    click.echo(f"wrote {model_path} ({blob.size} bytes) and {task_path}")
    click.echo(f"run it: fedhpc-trainer run --task {task_path}")


# -- selftest -----------------------------------------------------------------------------------------


@dataclass
class _Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _cpu_count() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{usable} usable of {os.cpu_count()}"


def _torch_checks() -> list[_Check]:
    try:
        import torch
    except ImportError as exc:
        return [_Check("torch", False, f"not importable: {exc}")]
    checks = [_Check("torch", True, torch.__version__)]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        kind = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        checks.append(
            _Check("gpu", True, f"{kind}: {torch.cuda.device_count()} device(s): {names}", required=False)
        )
    else:
        built = (
            f"ROCm {torch.version.hip}"
            if torch.version.hip
            else (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only")
        )
        checks.append(
            _Check("gpu", False, f"none visible (torch build: {built}); tasks run on the CPU", required=False)
        )
    return checks


def _plugin_checks() -> list[_Check]:
    from fedhpc.trainer.plugins import PluginError, installed_plugins, load_plugin

    found = installed_plugins()
    if not found:
        return [_Check("plugins", False, "no task plugins installed (entry point group fedhpc.tasks)")]
    checks = []
    for name, target in found.items():
        try:
            load_plugin(name)
        except PluginError as exc:
            checks.append(_Check(f"plugin {name}", False, str(exc)))
        else:
            checks.append(_Check(f"plugin {name}", True, target))
    return checks


def _registry_check(target: str, timeout: float) -> _Check:
    from fedhpc.common.grpc_client import make_channel, wait_for_ready

    channel = make_channel(target)
    try:
        wait_for_ready(channel, timeout)
    except TimeoutError as exc:
        return _Check(f"registry {target}", False, str(exc))
    finally:
        channel.close()
    return _Check(f"registry {target}", True, "gRPC channel connected")


def _url_check(url: str, timeout: float) -> _Check:
    from fedhpc.trainer.transport import redact_url

    parts = urlsplit(url)
    shown = redact_url(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return _Check(f"url {shown}", False, "not an http(s) URL")
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname, parts.port, timeout=timeout)
    try:
        # Any HTTP answer (even 403 for an unsigned request) proves the endpoint is reachable.
        conn.request("HEAD", parts.path or "/")
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return _Check(f"url {shown}", False, f"unreachable: {exc}")
    finally:
        conn.close()
    return _Check(f"url {shown}", True, f"reachable (HTTP {status})")


def _environment() -> dict[str, str]:
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpus": _cpu_count(),
        "fedhpc": __version__,
    }


@main.command(context_settings=_CONTEXT)
@click.option(
    "--registry",
    metavar="HOST:PORT",
    default=None,
    help="Also check that the registry's gRPC port is reachable. Example: --registry registry.example.org:50051",
)
@click.option(
    "--url",
    metavar="URL",
    default=None,
    help="Also check that an HTTP(S) endpoint (the object store) is reachable. Example: --url https://s3.example.org",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds to wait for each reachability check. Example: --timeout 10",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON. Example: --json")
def selftest(registry: str | None, url: str | None, timeout: float, as_json: bool) -> None:
    """Check this site's trainer environment: Python, torch, GPUs, CPUs, task plugins, network.

    Exits 1 if something required is missing or unreachable (torch, an installed plugin that
    does not load, a --registry or --url that cannot be reached). No GPU is not an error.

    \b
    Examples:
      fedhpc-trainer selftest
      fedhpc-trainer selftest --registry registry.example.org:50051 --url https://s3.example.org
      apptainer run trainer.sif fedhpc-trainer selftest --json
    """
    checks = [*_torch_checks(), *_plugin_checks()]
    if registry:
        checks.append(_registry_check(registry, timeout))
    if url:
        checks.append(_url_check(url, timeout))
    failed = [c for c in checks if c.required and not c.ok]
    if as_json:
        report = {
            "environment": _environment(),
            "checks": [
                {"name": c.name, "ok": c.ok, "required": c.required, "detail": c.detail} for c in checks
            ],
            "ok": not failed,
        }
        click.echo(json.dumps(report, indent=2))
    else:
        for key, value in _environment().items():
            click.echo(f"{key:<10} {value}")
        for c in checks:
            mark = "ok" if c.ok else ("FAIL" if c.required else "--")
            click.echo(f"[{mark:>4}] {c.name}: {c.detail}")
        click.echo(
            "selftest passed" if not failed else f"selftest FAILED: {', '.join(c.name for c in failed)}"
        )
    if failed:
        sys.exit(1)


# -- plugins -----------------------------------------------------------------------------------------


@main.command(context_settings=_CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print {name: target} as JSON. Example: --json")
def plugins(as_json: bool) -> None:
    """List the task plugins installed here (entry point group fedhpc.tasks).

    A task's plugin.name must be one of these, or a 'module:Class' import path.

    \b
    Examples:
      fedhpc-trainer plugins
      fedhpc-trainer plugins --json
    """
    from fedhpc.trainer.plugins import installed_plugins

    found = installed_plugins()
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("no task plugins installed (entry point group fedhpc.tasks)")
        return
    width = max(len(name) for name in found)
    for name, target in found.items():
        click.echo(f"{name:<{width}}  {target}")
