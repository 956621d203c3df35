"""The fedhpc-trainer command: run (stdout / --result, exit codes), selftest, plugins, help."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from fedhpc.common.tensors import write_safetensors_file
from fedhpc.testing.ports import free_port
from fedhpc.trainer import EvalOutput, TaskContext, TrainOutput
from fedhpc.trainer.cli import main
from fedhpc.trainer.plugins import make_initial_weights
from fedhpc.trainer.tasks.digits import DigitsHyperparameters, DigitsTask


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # The command configures the root logger onto CliRunner's stderr, which closes afterwards.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


class SleepyPlugin(DigitsTask):
    """Announces that training started (a file in site_config's marker_dir), then sleeps."""

    def check_site_config(self, site_config: Mapping[str, Any]) -> None:
        del site_config

    def evaluate(
        self, weights: dict[str, torch.Tensor], ctx: TaskContext[DigitsHyperparameters]
    ) -> EvalOutput:
        return EvalOutput(num_samples=0)

    def train(self, weights: dict[str, torch.Tensor], ctx: TaskContext[DigitsHyperparameters]) -> TrainOutput:
        (Path(ctx.site_config["marker_dir"]) / "training").write_text(str(ctx.work_dir))
        time.sleep(60)
        raise AssertionError("should have been terminated")


def _task(tmp_path: Path, **overrides: Any) -> Path:
    model = tmp_path / "global.safetensors"
    blob = write_safetensors_file(model, make_initial_weights("digits", {}, seed=0))
    task: dict[str, Any] = {
        "experiment_id": "exp",
        "round": 0,
        "task_id": "t-1",
        "site": "laptop",
        "plugin": {"name": "digits", "hyperparameters": {"epochs": 1}},
        "model": {
            "model": "exp",
            "version": "v0",
            "sha256": blob.sha256,
            "size_bytes": blob.size,
            "path": str(model),
        },
        "update": {
            "object_key": "updates/t-1.safetensors",
            "path": str(tmp_path / "out" / "t-1.safetensors"),
        },
        "site_config": {"partition": 0, "num_partitions": 2},
        "dispatched_at": time.time(),
    }
    task.update(overrides)
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    return path


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(main, ["--log-level", "ERROR", *args])


def test_run_prints_the_result_and_exits_zero(tmp_path: Path) -> None:
    result = _invoke("run", "--task", str(_task(tmp_path)))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["task_id"] == "t-1" and "error" not in doc
    assert (tmp_path / "out" / "t-1.safetensors").is_file()


def test_run_writes_result_file_and_exits_one_on_error(tmp_path: Path) -> None:
    task = _task(tmp_path, plugin={"name": "digits", "hyperparameters": {"epoch": 1}})
    out = tmp_path / "results" / "result.json"
    result = _invoke("run", "--task", str(task), "--result", str(out))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "INVALID_TASK" in result.stderr and "epoch" in result.stderr
    doc = json.loads(out.read_text())
    assert doc["error"]["code"] == "INVALID_TASK"
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temporary file left


def test_sigterm_ends_the_task_and_removes_its_temporary_files(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    plugin = {"name": f"{Path(__file__).stem}:SleepyPlugin", "hyperparameters": {}}
    task = _task(tmp_path, plugin=plugin, site_config={"marker_dir": str(tmp_path)})
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "fedhpc.trainer", "--log-level", "ERROR", "run", "--task", str(task)]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.monotonic() + 60
            while not (tmp_path / "training").exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "training never started"
                time.sleep(0.05)
            assert Path((tmp_path / "training").read_text()).is_dir()  # the task's scratch exists now
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        finally:
            proc.kill()
    assert list(scratch.iterdir()) == []


def test_run_reads_the_task_from_stdin(tmp_path: Path) -> None:
    task = _task(tmp_path).read_text()
    result = CliRunner().invoke(main, ["--log-level", "ERROR", "run", "--task", "-"], input=task)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("content", [None, "{not json"])
def test_unreadable_task_is_an_invalid_task_result(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "task.json"
    if content is not None:
        path.write_text(content)
    result = _invoke("run", "--task", str(path))
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "INVALID_TASK"


def test_make_task_writes_a_model_and_a_task_that_runs(tmp_path: Path) -> None:
    made = _invoke(
        "make-task", "--plugin", "digits", "--dir", str(tmp_path / "try"),
        "--hyperparameters", '{"epochs": 1}', "--site-config", '{"partition": 1, "num_partitions": 3}',
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    task = json.loads((tmp_path / "try" / "task.json").read_text())
    assert task["site_config"] == {"partition": 1, "num_partitions": 3}
    ran = _invoke("run", "--task", str(tmp_path / "try" / "task.json"))
    assert ran.exit_code == 0, ran.output
    assert (tmp_path / "try" / "update.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--hyperparameters", '{"lrr": 1}'], "lrr"),
        (["--site-config", '{"partition": 9, "num_partitions": 2}'], "out of range"),
        (["--hyperparameters", "[1]"], "JSON object"),
        (["--plugin", "nope"], "installed: digits"),
    ],
)
def test_make_task_refuses_bad_input(tmp_path: Path, args: list[str], needle: str) -> None:
    base = {"--plugin": "digits", "--site-config": '{"partition": 0, "num_partitions": 2}'}
    given = dict(zip(args[::2], args[1::2], strict=True))
    options = [item for key, value in {**base, **given}.items() for item in (key, value)]
    result = _invoke("make-task", "--dir", str(tmp_path / "try"), *options)
    assert result.exit_code != 0
    assert needle in result.output


def test_plugins_lists_digits() -> None:
    result = _invoke("plugins")
    assert result.exit_code == 0
    assert "digits" in result.stdout and "fedhpc.trainer.tasks.digits:DigitsTask" in result.stdout
    as_json = json.loads(_invoke("plugins", "--json").stdout)
    assert as_json["digits"] == "fedhpc.trainer.tasks.digits:DigitsTask"


def test_selftest_passes_here_and_reports_the_environment() -> None:
    result = _invoke("selftest", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    names = {c["name"] for c in report["checks"]}
    assert {"torch", "gpu", "plugin digits"} <= names
    assert "cpus" in report["environment"] and "python" in report["environment"]


def test_selftest_fails_for_unreachable_registry_and_url() -> None:
    port = free_port()  # nothing listens there
    result = _invoke(
        "selftest", "--registry", f"127.0.0.1:{port}", "--url", f"http://127.0.0.1:{port}/b?X-Amz-Signature=s3cr3t",
        "--timeout", "0.5",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "FAIL" in result.stdout and "selftest FAILED" in result.stdout
    assert "s3cr3t" not in result.stdout  # presigned signatures are never echoed


@pytest.mark.parametrize("command", [[], ["run"], ["selftest"], ["plugins"], ["make-task"]])
def test_every_command_has_help_with_examples(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output
    assert "fedhpc-trainer" in result.output


def test_python_dash_m_works() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedhpc.trainer", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: fedhpc-trainer" in done.stdout
