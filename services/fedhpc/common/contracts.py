"""The task and result contracts between the coordinator and trainers (DESIGN.md).

Both are small JSON documents: a task goes out through a dispatcher (a spool file for
``local`` sites, a Globus Compute argument for HPC sites), a result comes back the same
way or through ``Coordinator.ReportTaskResult``. Weights never travel in them, only
references (presigned URLs, registry refs, staged paths, object keys) plus checksums.

A result is limited to :data:`MAX_RESULT_BYTES` of JSON; both ends enforce it.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedhpc.common.config import errors_by_key

TASK_SCHEMA = "fedhpc.task/v1"
RESULT_SCHEMA = "fedhpc.result/v1"
# DESIGN.md: results are small JSON; the limit also keeps them far below Globus Compute's 10 MB.
MAX_RESULT_BYTES = 64 * 1024


class ContractError(ValueError):
    """A task or result document that does not satisfy its contract; the message says why."""


class ErrorCode(StrEnum):
    """Stable task error codes: shown by ``fedhpc status`` and used as metric labels."""

    INVALID_TASK = "INVALID_TASK"
    PLUGIN_NOT_FOUND = "PLUGIN_NOT_FOUND"
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
    TRAINING_FAILED = "TRAINING_FAILED"
    UPLOAD_FAILED = "UPLOAD_FAILED"
    TRAINER_CRASHED = "TRAINER_CRASHED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UPDATE_REJECTED = "UPDATE_REJECTED"
    RESULT_TOO_LARGE = "RESULT_TOO_LARGE"
    INVALID_RESULT = "INVALID_RESULT"
    DISPATCH_FAILED = "DISPATCH_FAILED"
    CANCELLED = "CANCELLED"


class _Contract(BaseModel):
    # Unknown keys are errors: a typo in a hand-written task must not be ignored.
    model_config = ConfigDict(extra="forbid")


class ModelSource(_Contract):
    """Where the trainer gets the global model. Exactly one of url, path, registry is used:
    ``url`` (presigned GET, the default), ``path`` (a staged file: file store or Globus
    Transfer), ``registry`` (the registry's gRPC Download stream, a fallback)."""

    model: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    url: str | None = None
    path: str | None = None
    registry: str | None = Field(default=None, description="host:port of the registry for the stream path.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        given = [name for name in ("url", "path", "registry") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(f"model needs exactly one of url, path, registry; got {given or 'none'}")
        return self


class UpdateTarget(_Contract):
    """Where the trainer puts its update: a presigned PUT ``url`` (with ``headers``) or a
    filesystem ``path`` (file store or a Globus Transfer staging directory). ``object_key``
    is the key the aggregator reads it from."""

    object_key: str
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    path: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> UpdateTarget:
        if (self.url is None) == (self.path is None):
            raise ValueError("update needs exactly one of url, path")
        return self


class PluginSpec(_Contract):
    """A task plugin (entry point group ``fedhpc.tasks``) and its hyperparameters."""

    name: str
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class ReportTarget(_Contract):
    """For trainers that report directly: the coordinator address and a site token."""

    coordinator: str
    token: str = ""


class TaskSpec(_Contract):
    """One unit of trainer work. ``mode`` is ``train`` (evaluate the global model on the
    site's held-out data, train, upload the delta) or ``evaluate`` (evaluation only)."""

    schema_: Literal["fedhpc.task/v1"] = Field(default="fedhpc.task/v1", alias="schema")
    experiment_id: str
    round: int = Field(ge=0)
    task_id: str
    site: str
    attempt: int = Field(default=1, ge=1)
    mode: Literal["train", "evaluate"] = "train"
    plugin: PluginSpec
    model: ModelSource
    update: UpdateTarget | None = None
    # Site-specific settings handed to the plugin: data directory, partition, device, ...
    site_config: dict[str, Any] = Field(default_factory=dict)
    dispatched_at: float = Field(description="Epoch seconds when the coordinator dispatched the task.")
    deadline: float | None = Field(
        default=None, description="Epoch seconds after which the result is useless."
    )
    seed: int = 0
    report: ReportTarget | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _update_for_training(self) -> TaskSpec:
        if self.mode == "train" and self.update is None:
            raise ValueError("a train task needs an update target")
        return self


class UpdateBlob(_Contract):
    object_key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


class Timings(_Contract):
    """Epoch seconds (``*_at``) and durations in seconds (``*_s``)."""

    dispatched_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    download_s: float = 0.0
    train_s: float = 0.0
    upload_s: float = 0.0

    @property
    def queue_wait_s(self) -> float:
        return max(0.0, self.started_at - self.dispatched_at) if self.started_at else 0.0


class TaskErrorDoc(_Contract):
    code: ErrorCode
    message: str = Field(max_length=4096)


class TaskResultDoc(_Contract):
    """What a trainer returns. ``metrics`` uses ``eval_*`` keys for the evaluation of the
    global model it received and ``train_*`` keys for local training."""

    schema_: Literal["fedhpc.result/v1"] = Field(default="fedhpc.result/v1", alias="schema")
    task_id: str
    update: UpdateBlob | None = None
    num_samples: int = Field(default=0, ge=0)
    eval_samples: int = Field(default=0, ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    timings: Timings = Field(default_factory=Timings)
    steps: int = Field(default=0, ge=0)
    device: dict[str, str] = Field(default_factory=dict)
    error: TaskErrorDoc | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @property
    def ok(self) -> bool:
        return self.error is None


def encode_task(task: TaskSpec) -> str:
    return task.model_dump_json(by_alias=True, exclude_none=True)


def parse_task(data: str | bytes | dict[str, Any]) -> TaskSpec:
    try:
        if isinstance(data, dict):
            return TaskSpec.model_validate(data)
        return TaskSpec.model_validate_json(data)
    except ValidationError as exc:
        raise ContractError(f"invalid task: {errors_by_key(exc, '(document)')}") from exc


def encode_result(result: TaskResultDoc) -> str:
    text = result.model_dump_json(by_alias=True, exclude_none=True)
    if len(text.encode()) > MAX_RESULT_BYTES:
        raise ContractError(
            f"result of task {result.task_id} is {len(text.encode())} bytes of JSON, over the "
            f"{MAX_RESULT_BYTES}-byte limit; report fewer or shorter metrics"
        )
    return text


def parse_result(data: str | bytes | dict[str, Any]) -> TaskResultDoc:
    """Validate a result, refusing anything over the size limit before parsing it."""
    raw = json.dumps(data) if isinstance(data, dict) else data
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_RESULT_BYTES:
        raise ContractError(f"result is {size} bytes of JSON, over the {MAX_RESULT_BYTES}-byte limit")
    try:
        return TaskResultDoc.model_validate_json(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid result: {errors_by_key(exc, '(document)')}") from exc


def failure_result(
    task: TaskSpec, code: ErrorCode, message: str, timings: Timings | None = None
) -> TaskResultDoc:
    return TaskResultDoc(
        task_id=task.task_id,
        error=TaskErrorDoc(code=code, message=message[:4096]),
        timings=timings or Timings(dispatched_at=task.dispatched_at),
    )
