"""The task and result JSON contracts: validation messages and the 64 KB result limit."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedhpc.common.contracts import (
    MAX_RESULT_BYTES,
    ContractError,
    ErrorCode,
    TaskResultDoc,
    encode_result,
    encode_task,
    failure_result,
    parse_result,
    parse_task,
)

SHA = "a" * 64


def task(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "experiment_id": "e",
        "round": 1,
        "task_id": "e.r0001-s-a1",
        "site": "s",
        "plugin": {"name": "digits"},
        "model": {"model": "e", "version": "r0000", "sha256": SHA, "size_bytes": 10, "path": "/m"},
        "update": {"object_key": "updates/e/r0001/t.safetensors", "path": "/u"},
        "dispatched_at": 1.0,
    }
    data.update(overrides)
    return data


def test_a_task_round_trips_through_json() -> None:
    parsed = parse_task(json.dumps(task()))
    assert parse_task(encode_task(parsed)) == parsed
    assert json.loads(encode_task(parsed))["schema"] == "fedhpc.task/v1"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"round": -1}, "round"),
        ({"colour": "blue"}, "colour"),
        ({"update": None}, "update target"),
        (
            {"model": {"model": "e", "version": "v", "sha256": SHA, "size_bytes": 1}},
            "exactly one of url, path, registry",
        ),
        (
            {"model": {"model": "e", "version": "v", "sha256": "nothex", "size_bytes": 1, "path": "/m"}},
            "model.sha256",
        ),
        ({"update": {"object_key": "k", "path": "/u", "url": "http://x"}}, "exactly one of url, path"),
        ({"mode": "fly"}, "mode"),
    ],
)
def test_bad_tasks_name_what_is_wrong(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(ContractError) as caught:
        parse_task(task(**overrides))
    assert named in str(caught.value)


def test_an_evaluate_task_needs_no_update_target() -> None:
    assert parse_task(task(mode="evaluate", update=None)).update is None


def test_results_over_64_kb_are_refused_both_ways() -> None:
    big = TaskResultDoc(task_id="t", metrics={f"m{i:05d}": float(i) for i in range(6000)})
    with pytest.raises(ContractError, match="65536-byte limit"):
        encode_result(big)
    raw = big.model_dump_json(by_alias=True)
    assert len(raw) > MAX_RESULT_BYTES
    with pytest.raises(ContractError, match="over the"):
        parse_result(raw)
    small = TaskResultDoc(task_id="t", metrics={"eval_accuracy": 0.9})
    assert parse_result(encode_result(small)) == small


def test_a_failure_result_carries_a_stable_code() -> None:
    result = failure_result(parse_task(task()), ErrorCode.TRAINER_CRASHED, "exit code 17")
    decoded = parse_result(encode_result(result))
    assert not decoded.ok and decoded.error is not None
    assert decoded.error.code == ErrorCode.TRAINER_CRASHED and decoded.timings.dispatched_at == 1.0


def test_an_unknown_error_code_is_refused() -> None:
    with pytest.raises(ContractError, match=r"error\.code"):
        parse_result(json.dumps({"task_id": "t", "error": {"code": "OOPS", "message": ""}}))
