"""run_task with a tiny in-test plugin: every failure is a result with its stable code, never an
exception; the delta math; the 64 KB result limit; phases."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import pytest
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict

from fedhpc.common.contracts import MAX_RESULT_BYTES, parse_result
from fedhpc.common.tensors import write_safetensors_file
from fedhpc.trainer import PHASES, EvalOutput, TaskContext, TaskPlugin, TrainOutput, compute_delta, run_task
from fedhpc.trainer.runtime import DeltaError


class TinyHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    behaviour: Literal[
        "ok", "raise", "nan_metric", "nan_weights", "big_metrics", "drop_tensor", "bad_count"
    ] = "ok"
    step: float = 1.0


class TinyPlugin(TaskPlugin[TinyHyperparameters]):
    """Adds ``step`` to every float tensor; misbehaves on request."""

    name = "tiny"
    hyperparameters_model = TinyHyperparameters

    def initial_weights(self, hyperparameters: TinyHyperparameters, seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {
            "w": torch.randn(4, 3, generator=generator),
            "h": torch.randn(5, generator=generator).to(torch.float16),
            "count": torch.tensor(7, dtype=torch.int64),
        }

    def train(self, weights: dict[str, torch.Tensor], ctx: TaskContext[TinyHyperparameters]) -> TrainOutput:
        hp = ctx.hyperparameters
        if hp.behaviour == "raise":
            raise RuntimeError("the GPU caught fire")
        out = {name: (t + hp.step if t.is_floating_point() else t + 1) for name, t in weights.items()}
        if hp.behaviour == "nan_weights":
            out["w"][0, 0] = float("nan")
        if hp.behaviour == "drop_tensor":
            del out["h"]
        metrics: dict[str, float] = {"loss": 0.5, "accuracy": 0.75}
        if hp.behaviour == "nan_metric":
            metrics["loss"] = float("nan")
        if hp.behaviour == "big_metrics":
            metrics = {f"metric_{i:05d}_with_a_long_name": float(i) for i in range(3000)}
        ctx.progress(1.0, "done")
        return TrainOutput(
            weights=out, num_samples=-1 if hp.behaviour == "bad_count" else 12, metrics=metrics, steps=3
        )

    def evaluate(self, weights: dict[str, torch.Tensor], ctx: TaskContext[TinyHyperparameters]) -> EvalOutput:
        return EvalOutput(num_samples=4, metrics={"loss": 1.5, "accuracy": 0.25})


TINY = f"{__name__}:TinyPlugin"


def _model(tmp_path: Path) -> tuple[Path, str, int]:
    weights = TinyPlugin().initial_weights(TinyHyperparameters(), 0)
    path = tmp_path / "store" / "models" / "exp" / "v0" / "weights.safetensors"
    path.parent.mkdir(parents=True)
    blob = write_safetensors_file(path, weights)
    return path, blob.sha256, blob.size


def _task(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    path, sha256, size = _model(tmp_path)
    task: dict[str, Any] = {
        "schema": "fedhpc.task/v1",
        "experiment_id": "exp",
        "round": 1,
        "task_id": "exp-r1-site-a",
        "site": "site-a",
        "plugin": {"name": TINY, "hyperparameters": {}},
        "model": {"model": "exp", "version": "v0", "sha256": sha256, "size_bytes": size, "path": str(path)},
        "update": {
            "object_key": "updates/exp/r1/site-a.safetensors",
            "path": str(tmp_path / "store" / "updates" / "exp" / "r1" / "site-a.safetensors"),
        },
        "dispatched_at": time.time() - 2.0,
        "seed": 3,
    }
    task.update(overrides)
    return task


def _code(result: dict[str, Any]) -> str | None:
    error = result.get("error")
    return None if error is None else str(error["code"])


# -- success ------------------------------------------------------------------------------------------


def test_train_task_uploads_delta_and_reports(tmp_path: Path) -> None:
    phases: list[str] = []
    task = _task(tmp_path)
    result = run_task(task, on_phase=phases.append)
    assert _code(result) is None, result
    parse_result(result)  # the result satisfies the contract
    assert phases == ["downloading", "training", "uploading"]
    assert set(phases) <= set(PHASES)
    assert result["task_id"] == "exp-r1-site-a"
    assert result["num_samples"] == 12 and result["eval_samples"] == 4 and result["steps"] == 3
    assert result["metrics"] == {
        "train_loss": 0.5,
        "train_accuracy": 0.75,
        "eval_loss": 1.5,
        "eval_accuracy": 0.25,
    }
    timings = result["timings"]
    assert timings["dispatched_at"] == task["dispatched_at"]
    assert timings["started_at"] - timings["dispatched_at"] >= 2.0  # the queue wait is visible
    assert timings["finished_at"] >= timings["started_at"]
    assert {"hostname", "python", "torch", "device"} <= set(result["device"])
    update = Path(task["update"]["path"])
    assert result["update"]["size_bytes"] == update.stat().st_size
    delta = safetensors.torch.load_file(str(update))
    assert delta["w"].dtype == torch.float32 and delta["h"].dtype == torch.float16
    torch.testing.assert_close(delta["w"], torch.ones(4, 3))
    assert int(delta["count"]) == 1
    # No temporary file left next to the update.
    assert [p.name for p in update.parent.iterdir()] == [update.name]


def test_evaluate_task_reports_only_evaluation(tmp_path: Path) -> None:
    phases: list[str] = []
    task = _task(tmp_path, mode="evaluate")
    del task["update"]
    result = run_task(task, on_phase=phases.append)
    assert _code(result) is None, result
    assert phases == ["downloading", "evaluating"]
    assert "update" not in result
    assert result["eval_samples"] == 4 and result["num_samples"] == 0
    assert result["metrics"] == {"eval_loss": 1.5, "eval_accuracy": 0.25}


def test_failing_phase_observer_does_not_fail_the_task(tmp_path: Path) -> None:
    def observer(phase: str) -> None:
        raise OSError("status file on a full disk")

    assert _code(run_task(_task(tmp_path), on_phase=observer)) is None


# -- failures -----------------------------------------------------------------------------------------


def test_bad_sha256_is_download_failed(tmp_path: Path) -> None:
    task = _task(tmp_path)
    task["model"]["sha256"] = "0" * 64
    result = run_task(task)
    assert _code(result) == "DOWNLOAD_FAILED"
    assert "sha256" in result["error"]["message"]
    assert not Path(task["update"]["path"]).exists()


def test_missing_model_file_is_download_failed(tmp_path: Path) -> None:
    task = _task(tmp_path)
    task["model"]["path"] = str(tmp_path / "nowhere.safetensors")
    result = run_task(task)
    assert _code(result) == "DOWNLOAD_FAILED"
    assert "nowhere.safetensors" in result["error"]["message"]


def test_valid_checksum_of_a_non_safetensors_file_is_download_failed(tmp_path: Path) -> None:
    import hashlib

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    task = _task(tmp_path)
    task["model"].update(
        path=str(junk), sha256=hashlib.sha256(junk.read_bytes()).hexdigest(), size_bytes=junk.stat().st_size
    )
    result = run_task(task)
    assert _code(result) == "DOWNLOAD_FAILED"
    assert "safetensors" in result["error"]["message"]


def test_unknown_plugin_is_plugin_not_found_listing_installed(tmp_path: Path) -> None:
    result = run_task(_task(tmp_path, plugin={"name": "no-such-task"}))
    assert _code(result) == "PLUGIN_NOT_FOUND"
    assert "no-such-task" in result["error"]["message"] and "digits" in result["error"]["message"]


def test_hyperparameter_typo_is_invalid_task_naming_the_key(tmp_path: Path) -> None:
    result = run_task(_task(tmp_path, plugin={"name": TINY, "hyperparameters": {"stepp": 2}}))
    assert _code(result) == "INVALID_TASK"
    assert "stepp" in result["error"]["message"]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda t: t.pop("site"), "site"),
        (lambda t: t.update(colour="blue"), "colour"),
        (lambda t: t["model"].update(sha256="xyz"), "sha256"),
        (lambda t: t.pop("update"), "update"),
    ],
)
def test_bad_task_json_is_invalid_task(tmp_path: Path, mutate: Any, needle: str) -> None:
    task = _task(tmp_path)
    mutate(task)
    result = run_task(task)
    assert _code(result) == "INVALID_TASK"
    assert needle in result["error"]["message"]
    assert result["task_id"] == "exp-r1-site-a"  # salvaged so the coordinator can match it
    assert result["timings"]["started_at"] > 0


def test_non_object_task_is_invalid_task() -> None:
    result = run_task([1, 2, 3])  # type: ignore[arg-type]
    assert _code(result) == "INVALID_TASK"
    assert result["task_id"] == ""


def test_passed_deadline_is_deadline_exceeded(tmp_path: Path) -> None:
    task = _task(tmp_path, deadline=time.time() - 1)
    result = run_task(task)
    assert _code(result) == "DEADLINE_EXCEEDED"
    assert not Path(task["update"]["path"]).exists()


@pytest.mark.parametrize(
    ("behaviour", "needle"),
    [
        ("raise", "the GPU caught fire"),
        ("nan_metric", "train_loss"),
        ("nan_weights", "'w'"),
        ("drop_tensor", "'h'"),
        ("bad_count", "num_samples=-1"),
    ],
)
def test_plugin_failures_are_training_failed(tmp_path: Path, behaviour: str, needle: str) -> None:
    task = _task(tmp_path, plugin={"name": TINY, "hyperparameters": {"behaviour": behaviour}})
    result = run_task(task)
    assert _code(result) == "TRAINING_FAILED"
    assert needle in result["error"]["message"]
    assert not Path(task["update"]["path"]).exists()


def test_unwritable_update_path_is_upload_failed(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    task = _task(tmp_path)
    task["update"]["path"] = str(blocker / "update.safetensors")
    result = run_task(task)
    assert _code(result) == "UPLOAD_FAILED"
    assert "a-file" in result["error"]["message"]


def test_oversized_result_is_result_too_large(tmp_path: Path) -> None:
    result = run_task(_task(tmp_path, plugin={"name": TINY, "hyperparameters": {"behaviour": "big_metrics"}}))
    assert _code(result) == "RESULT_TOO_LARGE"
    assert str(MAX_RESULT_BYTES) in result["error"]["message"]
    assert "metrics" not in result or not result["metrics"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_device_without_gpu_is_invalid_task(tmp_path: Path) -> None:
    result = run_task(_task(tmp_path, site_config={"device": "cuda"}))
    assert _code(result) == "INVALID_TASK"
    assert "device" in result["error"]["message"]


# -- delta math ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_global_plus_delta_is_local_for_floats(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(64, 8, generator=generator).to(dtype)}
    local = {"a": (base["a"].float() + 0.01 * torch.randn(64, 8, generator=generator)).to(dtype)}
    delta = compute_delta(base, local)
    assert delta["a"].dtype == dtype
    wide = torch.promote_types(dtype, torch.float32)
    # Exact up to one rounding of the delta to the model dtype.
    tolerance = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(
        (base["a"].to(wide) + delta["a"].to(wide)), local["a"].to(wide), atol=tolerance, rtol=tolerance
    )


def test_global_plus_delta_is_local_for_integers_exactly() -> None:
    base = {"n": torch.tensor([5, -3, 100], dtype=torch.int32)}
    local = {"n": torch.tensor([7, -9, 100], dtype=torch.int32)}
    delta = compute_delta(base, local)
    assert delta["n"].dtype == torch.int32
    assert torch.equal(base["n"] + delta["n"], local["n"])


def test_delta_keeps_the_global_tensor_order_and_dtype_even_if_local_differs() -> None:
    base = {"z": torch.zeros(2), "a": torch.zeros(3, dtype=torch.float16)}
    local = {"a": torch.ones(3, dtype=torch.float32), "z": torch.ones(2)}
    delta = compute_delta(base, local)
    assert list(delta) == ["z", "a"]
    assert delta["a"].dtype == torch.float16


@pytest.mark.parametrize(
    ("local", "needle"),
    [
        ({"a": torch.zeros(2)}, "missing 'b'"),
        ({"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}, "unexpected 'c'"),
        ({"a": torch.zeros(2), "b": torch.zeros(4)}, "shape"),
        ({"a": torch.tensor([0.0, float("inf")]), "b": torch.zeros(3)}, "non-finite"),
    ],
)
def test_delta_refuses_mismatched_or_non_finite_weights(local: dict[str, torch.Tensor], needle: str) -> None:
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(DeltaError, match=needle):
        compute_delta(base, local)
