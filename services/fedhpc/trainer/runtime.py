"""``run_task``: one unit of trainer work, from a task document to a result document.

This is the function the coordinator dispatches (Globus Compute registers it; local sites run
it in a subprocess through ``fedhpc-trainer run``). It takes and returns small JSON-able dicts
(common/contracts.py) and never raises for a task-level problem: every failure becomes a result
whose ``error`` carries a stable code, so the coordinator can record it and go on.

A train task: record the start (queue wait = started_at - dispatched_at), fetch and verify the
global model, evaluate it on the site's held-out data, train, upload the delta (local - global)
and report. An evaluate task stops after the evaluation.
"""

from __future__ import annotations

import json
import math
import numbers
import platform
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from fedhpc.common.contracts import (
    ContractError,
    ErrorCode,
    TaskErrorDoc,
    TaskResultDoc,
    TaskSpec,
    Timings,
    UpdateBlob,
    encode_result,
    failure_result,
    parse_task,
)
from fedhpc.common.logging import get_logger, log_context
from fedhpc.trainer.plugins import (
    EvalOutput,
    PluginError,
    TaskConfigError,
    TaskContext,
    TaskPlugin,
    TrainOutput,
    load_plugin,
)
from fedhpc.trainer.transport import TransferError, fetch_model, put_update

__all__ = ["PHASES", "RUNTIME_SITE_KEYS", "DeltaError", "compute_delta", "device_info", "run_task"]

log = get_logger(__name__)

PhaseCallback = Callable[[str], None]
Weights = dict[str, torch.Tensor]

#: What ``on_phase`` is called with, in this order: a train task goes downloading -> training
#: (evaluation of the global model, then local training) -> uploading; an evaluate task goes
#: downloading -> evaluating.
PHASES = ("downloading", "evaluating", "training", "uploading")
#: site_config keys the runtime consumes itself; the plugin gets the others.
#: ``device``: "auto" (default: the first GPU if torch sees one, else the CPU), "cpu", "cuda", "cuda:1", ...
#: ``registry_ca_file``: the CA that signed the registry's TLS certificate, for ``model.registry``.
RUNTIME_SITE_KEYS = ("device", "registry_ca_file")


class _TaskFailure(Exception):
    """Ends a task with an error result; raised by the steps below, caught in run_task."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DeltaError(ValueError):
    """The trained weights do not match the global model (names, shapes) or are not finite."""


# -- small helpers ------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """``Type: message (at file:line)``, the innermost frame: enough for a scientist to find it."""
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" (at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


def _announce(on_phase: PhaseCallback | None, phase: str) -> None:
    log.info("task phase", extra={"phase": phase})
    if on_phase is None:
        return
    try:
        on_phase(phase)
    except Exception:
        # A failing observer (a status file on a full disk) must not cost the round's work.
        log.warning("on_phase callback failed", exc_info=True, extra={"phase": phase})


def _log_progress(fraction: float, message: str) -> None:
    log.debug("task progress", extra={"fraction": round(float(fraction), 4), "progress": message})


def device_info(device: torch.device | None = None) -> dict[str, str]:
    """Where the task ran, for the result: host, Python, torch, device and its name."""
    info = {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(device)
            # torch reports ROCm devices as "cuda" too; the version tells them apart.
            info["accelerator"] = (
                f"rocm {torch.version.hip}" if torch.version.hip else f"cuda {torch.version.cuda}"
            )
        else:
            info["device_name"] = platform.processor() or platform.machine() or "cpu"
    return info


# -- steps ----------------------------------------------------------------------------------------------------


def _check_deadline(spec: TaskSpec, now: float) -> None:
    if spec.deadline is not None and now > spec.deadline:
        raise _TaskFailure(
            ErrorCode.DEADLINE_EXCEEDED,
            f"task started {now - spec.deadline:.1f} s after its deadline (queue wait "
            f"{now - spec.dispatched_at:.1f} s); not running it",
        )


def _load_plugin(spec: TaskSpec) -> tuple[TaskPlugin[Any], Any]:
    try:
        plugin = load_plugin(spec.plugin.name)
    except PluginError as exc:
        raise _TaskFailure(ErrorCode.PLUGIN_NOT_FOUND, str(exc)) from exc
    try:
        return plugin, plugin.validate_hyperparameters(spec.plugin.hyperparameters)
    except TaskConfigError as exc:
        raise _TaskFailure(ErrorCode.INVALID_TASK, str(exc)) from exc


def _pick_device(wanted: object) -> torch.device:
    if wanted in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(wanted))
    except (RuntimeError, ValueError) as exc:
        raise _TaskFailure(
            ErrorCode.INVALID_TASK, f"site_config.device {wanted!r} is not a torch device"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _TaskFailure(
            ErrorCode.INVALID_TASK,
            f"site_config.device is {wanted!r} but torch sees no GPU on {socket.gethostname()}",
        )
    return device


def _split_site_config(site_config: Mapping[str, Any]) -> tuple[dict[str, Any], torch.device, Path | None]:
    """(the plugin's site_config, the device, the registry CA file)."""
    ca = site_config.get("registry_ca_file")
    plugin_config = {k: v for k, v in site_config.items() if k not in RUNTIME_SITE_KEYS}
    return plugin_config, _pick_device(site_config.get("device")), Path(ca) if ca else None


def _check_site_config(plugin: TaskPlugin[Any], site_config: Mapping[str, Any]) -> None:
    try:
        plugin.check_site_config(site_config)
    except TaskConfigError as exc:
        raise _TaskFailure(ErrorCode.INVALID_TASK, str(exc)) from exc
    except Exception as exc:
        raise _TaskFailure(
            ErrorCode.TRAINING_FAILED, f"checking site_config failed: {_describe(exc)}"
        ) from exc


def _fetch(spec: TaskSpec, work: Path, ca_file: Path | None) -> Weights:
    token = spec.report.token if spec.report is not None else None
    try:
        path = fetch_model(spec.model, work, token=token, registry_ca_file=ca_file)
    except TransferError as exc:
        raise _TaskFailure(ErrorCode.DOWNLOAD_FAILED, str(exc)) from exc
    try:
        # safetensors only: never torch.load/pickle on bytes that crossed a process boundary.
        weights: Weights = safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise _TaskFailure(
            ErrorCode.DOWNLOAD_FAILED,
            f"global model {spec.model.model}:{spec.model.version} is not a loadable safetensors file: {exc}",
        ) from exc
    return weights


def _metrics(prefix: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Plugin metrics as ``<prefix>_<key>`` floats; non-numbers and non-finite values are refused
    (JSON has no NaN, and a NaN loss means the update is garbage anyway)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise _TaskFailure(ErrorCode.TRAINING_FAILED, f"metric {key!r} is {value!r}, not a number")
        if not math.isfinite(value):
            raise _TaskFailure(ErrorCode.TRAINING_FAILED, f"metric {prefix}_{key} is {value}")
        out[f"{prefix}_{key}"] = float(value)
    return out


def _count(value: object, method: str, field: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or int(value) < 0:
        raise _TaskFailure(
            ErrorCode.TRAINING_FAILED, f"plugin {method} returned {field}={value!r}, not a count >= 0"
        )
    return int(value)


def _evaluate(plugin: TaskPlugin[Any], weights: Weights, ctx: TaskContext[Any]) -> EvalOutput:
    try:
        out = plugin.evaluate(weights, ctx)
    except TaskConfigError as exc:
        raise _TaskFailure(ErrorCode.INVALID_TASK, str(exc)) from exc
    except Exception as exc:
        log.exception("plugin evaluate failed")
        raise _TaskFailure(ErrorCode.TRAINING_FAILED, f"evaluation failed: {_describe(exc)}") from exc
    if not isinstance(out, EvalOutput):
        raise _TaskFailure(
            ErrorCode.TRAINING_FAILED, f"plugin evaluate returned {type(out).__name__}, not EvalOutput"
        )
    return out


def _train(plugin: TaskPlugin[Any], weights: Weights, ctx: TaskContext[Any]) -> TrainOutput:
    # The plugin gets its own copy: the global weights are needed unchanged for the delta.
    own = {name: t.clone() for name, t in weights.items()}
    try:
        out = plugin.train(own, ctx)
    except TaskConfigError as exc:
        raise _TaskFailure(ErrorCode.INVALID_TASK, str(exc)) from exc
    except Exception as exc:
        log.exception("plugin train failed")
        raise _TaskFailure(ErrorCode.TRAINING_FAILED, f"training failed: {_describe(exc)}") from exc
    if not isinstance(out, TrainOutput):
        raise _TaskFailure(
            ErrorCode.TRAINING_FAILED, f"plugin train returned {type(out).__name__}, not TrainOutput"
        )
    return out


def _delta_tensor(name: str, base: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    if local.shape != base.shape:
        raise DeltaError(
            f"tensor {name!r} has shape {list(local.shape)} after training, the model {list(base.shape)}"
        )
    local = local.detach().cpu()
    if base.dtype == torch.bool:
        # The aggregator keeps bool tensors as they are; the delta only marks what changed.
        return local.to(torch.bool) ^ base
    if base.is_floating_point() or base.is_complex():
        if not bool(torch.isfinite(local).all()):
            raise DeltaError(f"tensor {name!r} has non-finite values after training (diverged?)")
        # Subtract at (at least) float32 precision, then round once to the model's dtype.
        wide = torch.promote_types(base.dtype, torch.float32)
        return (local.to(wide) - base.to(wide)).to(base.dtype)
    return (local.to(torch.int64) - base.to(torch.int64)).to(base.dtype)


def compute_delta(
    global_weights: Mapping[str, torch.Tensor], local_weights: Mapping[str, torch.Tensor]
) -> Weights:
    """``local - global`` per tensor, in each global tensor's dtype and in the global model's order.

    Raises :class:`DeltaError` if a tensor is missing, extra, reshaped or not finite.
    """
    missing = [n for n in global_weights if n not in local_weights]
    extra = [n for n in local_weights if n not in global_weights]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing[:5]))}")
        if extra:
            parts.append(f"unexpected {', '.join(map(repr, extra[:5]))}")
        raise DeltaError(f"trained weights do not match the global model: {'; '.join(parts)}")
    return {name: _delta_tensor(name, base, local_weights[name]) for name, base in global_weights.items()}


def _update_metadata(spec: TaskSpec) -> dict[str, str]:
    # Provenance inside the file itself: which task made it, from which base.
    return {
        "fedhpc.kind": "delta",
        "fedhpc.experiment": spec.experiment_id,
        "fedhpc.round": str(spec.round),
        "fedhpc.site": spec.site,
        "fedhpc.task_id": spec.task_id,
        "fedhpc.base_model": spec.model.model,
        "fedhpc.base_version": spec.model.version,
        "fedhpc.base_sha256": spec.model.sha256,
    }


def _upload(spec: TaskSpec, delta: Weights, work: Path) -> UpdateBlob:
    assert spec.update is not None  # TaskSpec requires it for train tasks
    try:
        blob = put_update(spec.update, delta, _update_metadata(spec), work)
    except TransferError as exc:
        raise _TaskFailure(ErrorCode.UPLOAD_FAILED, str(exc)) from exc
    return UpdateBlob(object_key=spec.update.object_key, sha256=blob.sha256, size_bytes=blob.size)


# -- the task ---------------------------------------------------------------------------------------------------


class _Run:
    """One task's execution; fills ``timings`` as it goes so a failure still reports them."""

    def __init__(self, spec: TaskSpec, timings: Timings, on_phase: PhaseCallback | None) -> None:
        self.spec = spec
        self.timings = timings
        self.on_phase = on_phase
        self.device: torch.device | None = None

    def execute(self) -> TaskResultDoc:
        spec = self.spec
        _check_deadline(spec, self.timings.started_at)
        plugin, hyperparameters = _load_plugin(spec)
        site_config, self.device, ca_file = _split_site_config(spec.site_config)
        _check_site_config(plugin, site_config)
        with tempfile.TemporaryDirectory(prefix="fedhpc-task-") as tmp:
            work = Path(tmp)
            (work / "plugin").mkdir()
            ctx = TaskContext[Any](
                site=spec.site,
                round=spec.round,
                seed=spec.seed,
                hyperparameters=hyperparameters,
                site_config=site_config,
                work_dir=work / "plugin",
                device=self.device,
                progress=_log_progress,
                experiment_id=spec.experiment_id,
                task_id=spec.task_id,
                deadline=spec.deadline,
            )
            weights = self._download(work, ca_file)
            if spec.mode == "evaluate":
                return self._evaluate_only(plugin, weights, ctx)
            return self._train(plugin, weights, ctx, work)

    def _download(self, work: Path, ca_file: Path | None) -> Weights:
        _announce(self.on_phase, "downloading")
        began = time.perf_counter()
        weights = _fetch(self.spec, work, ca_file)
        self.timings.download_s = time.perf_counter() - began
        return weights

    def _evaluate_only(
        self, plugin: TaskPlugin[Any], weights: Weights, ctx: TaskContext[Any]
    ) -> TaskResultDoc:
        _announce(self.on_phase, "evaluating")
        began = time.perf_counter()
        evaluation = _evaluate(plugin, weights, ctx)
        self.timings.train_s = time.perf_counter() - began
        return TaskResultDoc(
            task_id=self.spec.task_id,
            eval_samples=_count(evaluation.num_samples, "evaluate", "num_samples"),
            metrics=_metrics("eval", evaluation.metrics),
            timings=self.timings,
        )

    def _train(
        self, plugin: TaskPlugin[Any], weights: Weights, ctx: TaskContext[Any], work: Path
    ) -> TaskResultDoc:
        _announce(self.on_phase, "training")
        began = time.perf_counter()
        evaluation = _evaluate(plugin, weights, ctx)
        trained = _train(plugin, weights, ctx)
        try:
            delta = compute_delta(weights, trained.weights)
        except DeltaError as exc:
            raise _TaskFailure(ErrorCode.TRAINING_FAILED, str(exc)) from exc
        # train_s is all plugin compute: the evaluation of the global model plus local training.
        self.timings.train_s = time.perf_counter() - began
        # Everything the result reports is checked before the upload: no update without a result.
        result = TaskResultDoc(
            task_id=self.spec.task_id,
            num_samples=_count(trained.num_samples, "train", "num_samples"),
            eval_samples=_count(evaluation.num_samples, "evaluate", "num_samples"),
            metrics={**_metrics("train", trained.metrics), **_metrics("eval", evaluation.metrics)},
            timings=self.timings,
            steps=_count(trained.steps, "train", "steps"),
        )
        _announce(self.on_phase, "uploading")
        began = time.perf_counter()
        result.update = _upload(self.spec, delta, work)
        self.timings.upload_s = time.perf_counter() - began
        return result


def _invalid_task_result(task: object, message: str, started_at: float) -> TaskResultDoc:
    # Salvage what identifies the task so the coordinator can still match the result.
    raw = task if isinstance(task, Mapping) else {}
    task_id = raw.get("task_id")
    dispatched = raw.get("dispatched_at")
    return TaskResultDoc(
        task_id=task_id if isinstance(task_id, str) else "",
        error=TaskErrorDoc(code=ErrorCode.INVALID_TASK, message=message[:4096]),
        timings=Timings(
            dispatched_at=float(dispatched) if isinstance(dispatched, int | float) else 0.0,
            started_at=started_at,
            finished_at=time.time(),
        ),
        device=device_info(),
    )


def _encode(doc: TaskResultDoc) -> dict[str, Any]:
    """The result as a JSON-able dict, within the 64 KB limit (else a RESULT_TOO_LARGE error)."""
    try:
        text = encode_result(doc)
    except ContractError as exc:
        small = TaskResultDoc(
            task_id=doc.task_id,
            error=TaskErrorDoc(code=ErrorCode.RESULT_TOO_LARGE, message=str(exc)[:4096]),
            timings=doc.timings,
            device=doc.device,
        )
        text = encode_result(small)
    result: dict[str, Any] = json.loads(text)
    return result


def _execute(spec: TaskSpec, timings: Timings, on_phase: PhaseCallback | None) -> TaskResultDoc:
    run = _Run(spec, timings, on_phase)
    try:
        doc = run.execute()
    except _TaskFailure as failure:
        log.warning("task failed", extra={"code": failure.code.value, "error": failure.message})
        doc = failure_result(spec, failure.code, failure.message, timings)
    except Exception as exc:
        # A bug in fedhpc itself, not in the task: still a result, never an exception.
        log.exception("trainer runtime crashed")
        doc = failure_result(
            spec, ErrorCode.TRAINER_CRASHED, f"trainer runtime crashed: {_describe(exc)}", timings
        )
    doc.device = device_info(run.device)
    return doc


def run_task(task: dict[str, Any], *, on_phase: PhaseCallback | None = None) -> dict[str, Any]:
    """Run one task document (``fedhpc.task/v1``) and return its result (``fedhpc.result/v1``).

    ``on_phase`` is called with each of :data:`PHASES` as the task enters it. Task-level
    problems (bad task, unknown plugin, download/upload failures, training errors, a passed
    deadline) come back as a result with ``error.code`` set; nothing is raised for them.
    """
    started_at = time.time()  # first: queue wait = started_at - dispatched_at
    try:
        if not isinstance(task, dict | str | bytes):
            raise ContractError(f"invalid task: expected a JSON object, got {type(task).__name__}")
        spec = parse_task(task)
    except ContractError as exc:
        return _encode(_invalid_task_result(task, str(exc), started_at))
    timings = Timings(dispatched_at=spec.dispatched_at, started_at=started_at)
    with log_context(experiment=spec.experiment_id, round=spec.round, site=spec.site, task=spec.task_id):
        log.info("task started", extra={"mode": spec.mode, "queue_wait_s": round(timings.queue_wait_s, 3)})
        doc = _execute(spec, timings, on_phase)
        timings.finished_at = time.time()
        doc.timings = timings
        log.info(
            "task finished",
            extra={
                "outcome": doc.error.code.value if doc.error else "ok",
                "total_s": round(time.time() - started_at, 3),
            },
        )
    return _encode(doc)
