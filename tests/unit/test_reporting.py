"""Experiment reports: the report dict, report.json/report.png, and the terminal table."""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from fedhpc.api.v1 import coordinator_pb2
from fedhpc.reporting import build_report, render_report_png, summary_table, write_report

Phase = coordinator_pb2.TaskPhase
T0 = 1_700_000_000.0
SITES = ("polaris", "aurora", "frontier", "perlmutter")
# Rounds whose federated evaluation is missing (evaluation failed or was skipped).
NO_METRICS = frozenset({7, 14, 20})
SPEC = "name: digits-fedavg\nstrategy:\n  name: sync\n  quorum: 3\nalgorithm: fedavg\n"


@dataclass(frozen=True)
class Failure:
    phase: coordinator_pb2.TaskPhase.ValueType
    code: str
    message: str
    # How far the task got: "queue" (never started), "train" (crashed training), "all".
    reached: str


# (site, round, task index in that round) -> how it failed.
FAILURES = {
    ("polaris", 12, 0): Failure(
        Phase.TASK_PHASE_TIMED_OUT, "DEADLINE_EXCEEDED", "waited 900 s in the queue", "queue"
    ),
    ("frontier", 5, 1): Failure(
        Phase.TASK_PHASE_FAILED, "TRAINER_CRASHED", "CUDA error: illegal address", "train"
    ),
    ("frontier", 15, 0): Failure(
        Phase.TASK_PHASE_FAILED, "TRAINER_CRASHED", "segfault in dataloader", "train"
    ),
    ("aurora", 17, 1): Failure(Phase.TASK_PHASE_REJECTED, "UPDATE_REJECTED", "NORM_EXCEEDED", "all"),
    # No error code: the report derives one from the phase.
    ("perlmutter", 9, 0): Failure(Phase.TASK_PHASE_CANCELLED, "", "", "queue"),
}


def timestamp(epoch: float) -> Timestamp:
    seconds = math.floor(epoch)
    return Timestamp(seconds=seconds, nanos=round((epoch - seconds) * 1e9))


def accuracy(round_: int) -> float:
    return 0.95 - 0.85 * math.exp(-round_ / 4)


def make_task(site_index: int, site: str, round_: int, k: int, start: float) -> coordinator_pb2.Task:
    """One task with durations that differ per site, round and task, all deterministic."""
    failure = FAILURES.get((site, round_, k))
    dispatched = start + 0.5 * k
    queue = 5.0 + 10.0 * site_index + (round_ * 7 + k * 3) % 11
    download, train, upload = 1.0 + 0.5 * site_index, 20.0 + 4.0 * site_index + (round_ % 3), 0.8 + 0.1 * k
    timings = coordinator_pb2.TaskTimings(dispatched_at=dispatched)
    if failure is None or failure.reached != "queue":
        timings.started_at = dispatched + queue
        timings.queue_wait_s = queue
        timings.download_s = download
        timings.train_s = train if failure is None or failure.reached == "all" else train / 2
        timings.upload_s = upload if failure is None or failure.reached == "all" else 0.0
        timings.finished_at = timings.started_at + timings.download_s + timings.train_s + timings.upload_s
    else:
        timings.finished_at = dispatched + 60.0
    task = coordinator_pb2.Task(
        id=f"{site}-r{round_}-{k}",
        experiment_id="exp-1",
        round=round_,
        site=site,
        phase=failure.phase if failure else Phase.TASK_PHASE_SUCCEEDED,
        attempt=1,
        timings=timings,
    )
    if failure:
        task.error.code, task.error.message = failure.code, failure.message
    if failure is None or failure.reached == "all":
        task.result.task_id = task.id
        task.result.num_samples = 100 * (site_index + 1)
    return task


def make_run(
    rounds: int = 20, sites: tuple[str, ...] = SITES
) -> tuple[coordinator_pb2.Experiment, list[coordinator_pb2.Task]]:
    """A finished synchronous experiment: each round dispatches 2 tasks to every site and
    aggregates 2 s after the last one ends; some tasks fail, some rounds lack metrics."""
    experiment = coordinator_pb2.Experiment(
        id="exp-1",
        name="digits-fedavg",
        state=coordinator_pb2.ExperimentState.EXPERIMENT_STATE_COMPLETED,
        spec_yaml=SPEC,
        model="digits",
        total_rounds=rounds,
        current_round=rounds,
        sites=list(sites),
        started_at=timestamp(T0),
        created_at=timestamp(T0 - 30),
    )
    tasks: list[coordinator_pb2.Task] = []
    start = T0
    for r in range(1, rounds + 1):
        in_round = [make_task(i, site, r, k, start + 1.0) for i, site in enumerate(sites) for k in range(2)]
        tasks += in_round
        end = max(t.timings.finished_at for t in in_round) + 2.0
        summary = experiment.rounds.add(
            round=r,
            version=f"v{r:04d}",
            started_at=timestamp(start),
            finished_at=timestamp(end),
            accepted_updates=sum(t.phase == Phase.TASK_PHASE_SUCCEEDED for t in in_round),
            rejected_updates=sum(t.phase == Phase.TASK_PHASE_REJECTED for t in in_round),
        )
        if r not in NO_METRICS:
            summary.metrics["eval_accuracy"] = accuracy(r)
            summary.metrics["eval_loss"] = 2.0 * math.exp(-r / 4)
        start = end
    experiment.latest_version = f"v{rounds:04d}"
    experiment.finished_at.CopyFrom(timestamp(start + 1.0))
    return experiment, tasks


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def run() -> tuple[coordinator_pb2.Experiment, list[coordinator_pb2.Task]]:
    return make_run()


# --------------------------------------------------------------------------- build_report


def test_headline_fields(run: tuple[coordinator_pb2.Experiment, list[coordinator_pb2.Task]]) -> None:
    experiment, tasks = run
    report = build_report(experiment, tasks)
    assert report["id"] == "exp-1" and report["name"] == "digits-fedavg"
    assert report["state"] == "COMPLETED"
    assert report["model"] == "digits" and report["latest_version"] == "v0020"
    assert (report["strategy"], report["algorithm"]) == ("sync", "fedavg")
    assert report["started_at"] == "2023-11-14T22:13:20+00:00"
    assert report["wall_time_s"] == pytest.approx(experiment.finished_at.seconds - T0, abs=1.0)
    assert report["rounds_completed"] == 20 and report["total_rounds"] == 20
    # Round 20 has no metrics: the final accuracy is round 19's.
    assert report["final_accuracy_round"] == 19
    assert report["final_accuracy"] == pytest.approx(accuracy(19))
    assert report["best_accuracy"] == pytest.approx(accuracy(19))
    assert report["best_accuracy_round"] == 19


def test_rounds_are_relative_to_the_start(
    run: tuple[coordinator_pb2.Experiment, list[coordinator_pb2.Task]],
) -> None:
    experiment, tasks = run
    rounds = build_report(experiment, tasks)["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 21))
    assert rounds[0]["started_s"] == pytest.approx(0.0)
    for prev, cur in itertools.pairwise(rounds):
        assert cur["started_s"] == pytest.approx(prev["finished_s"], abs=1e-6)
    for r in rounds:
        assert r["duration_s"] == pytest.approx(r["finished_s"] - r["started_s"])
        assert r["version"] == f"v{r['round']:04d}"
    assert rounds[6]["metrics"] == {} and rounds[6]["accuracy"] is None
    assert rounds[0]["accuracy"] == pytest.approx(accuracy(1))
    assert rounds[16]["accepted_updates"] == 7 and rounds[16]["rejected_updates"] == 1


def test_failures_are_listed_with_codes(
    run: tuple[coordinator_pb2.Experiment, list[coordinator_pb2.Task]],
) -> None:
    experiment, tasks = run
    failures = build_report(experiment, tasks)["failures"]
    got = [(f["site"], f["round"], f["phase"], f["code"]) for f in failures]
    assert got == [
        ("frontier", 5, "FAILED", "TRAINER_CRASHED"),
        ("perlmutter", 9, "CANCELLED", "CANCELLED"),
        ("polaris", 12, "TIMED_OUT", "DEADLINE_EXCEEDED"),
        ("frontier", 15, "FAILED", "TRAINER_CRASHED"),
        ("aurora", 17, "REJECTED", "UPDATE_REJECTED"),
    ]
    assert failures[0]["task_id"] == "frontier-r5-1"
    assert failures[0]["message"] == "CUDA error: illegal address"


def test_site_summary(run: tuple[coordinator_pb2.Experiment, list[coordinator_pb2.Task]]) -> None:
    experiment, tasks = run
    sites = {s["site"]: s for s in build_report(experiment, tasks)["sites"]}
    assert list(sites) == list(SITES)
    frontier = sites["frontier"]
    assert (frontier["tasks"], frontier["succeeded"], frontier["failed"]) == (40, 38, 2)
    assert frontier["failures_by_code"] == {"TRAINER_CRASHED": 2}
    assert sites["aurora"]["failures_by_code"] == {"UPDATE_REJECTED": 1}
    assert sites["perlmutter"]["failures_by_code"] == {"CANCELLED": 1}
    # Samples count every task that returned a result (rejected updates included).
    assert frontier["total_samples"] == 38 * 300
    assert sites["aurora"]["total_samples"] == 40 * 200
    # polaris' timed-out task never left the queue: it has no queue wait, download, train or upload.
    polaris_tasks = [t for t in tasks if t.site == "polaris" and t.timings.started_at > 0]
    assert len(polaris_tasks) == 39
    assert sites["polaris"]["mean_queue_wait_s"] == pytest.approx(
        sum(t.timings.queue_wait_s for t in polaris_tasks) / 39
    )
    assert sites["polaris"]["mean_train_s"] == pytest.approx(
        sum(t.timings.train_s for t in polaris_tasks) / 39
    )
    # frontier's crashed tasks never uploaded: the upload mean is over the 38 that did.
    assert frontier["mean_upload_s"] == pytest.approx((19 * 0.8 + 19 * 0.9) / 38)
    assert frontier["mean_download_s"] == pytest.approx(2.0)


def test_site_means_by_hand() -> None:
    experiment = coordinator_pb2.Experiment(id="e", sites=["s"], started_at=timestamp(T0))
    ok = coordinator_pb2.TaskTimings(
        dispatched_at=T0,
        started_at=T0 + 10,
        queue_wait_s=10,
        download_s=2,
        train_s=30,
        upload_s=1,
        finished_at=T0 + 43,
    )
    # queue_wait_s unset: derived from started_at - dispatched_at.
    derived = coordinator_pb2.TaskTimings(
        dispatched_at=T0 + 5, started_at=T0 + 25, download_s=4, train_s=50, upload_s=3, finished_at=T0 + 82
    )
    crashed = coordinator_pb2.TaskTimings(
        dispatched_at=T0 + 6, started_at=T0 + 36, download_s=3, finished_at=T0 + 40
    )
    tasks = [
        coordinator_pb2.Task(id="a", site="s", round=1, phase=Phase.TASK_PHASE_SUCCEEDED, timings=ok),
        coordinator_pb2.Task(id="b", site="s", round=1, phase=Phase.TASK_PHASE_SUCCEEDED, timings=derived),
        coordinator_pb2.Task(
            id="c",
            site="s",
            round=1,
            phase=Phase.TASK_PHASE_FAILED,
            timings=crashed,
            error=coordinator_pb2.TaskError(code="TRAINING_FAILED", message="nan loss"),
        ),
        # Still queued: counts as a task in progress, adds no durations.
        coordinator_pb2.Task(
            id="d",
            site="s",
            round=1,
            phase=Phase.TASK_PHASE_QUEUED,
            timings=coordinator_pb2.TaskTimings(dispatched_at=T0),
        ),
    ]
    (site,) = build_report(experiment, tasks)["sites"]
    assert (site["tasks"], site["succeeded"], site["failed"], site["in_progress"]) == (4, 2, 1, 1)
    assert site["mean_queue_wait_s"] == pytest.approx((10 + 20 + 30) / 3)
    assert site["mean_download_s"] == pytest.approx(3.0)
    assert site["mean_train_s"] == pytest.approx(40.0)
    assert site["mean_upload_s"] == pytest.approx(2.0)
    assert site["total_samples"] is None
    assert site["failures_by_code"] == {"TRAINING_FAILED": 1}


def test_a_running_experiment_counts_to_its_latest_event() -> None:
    experiment, tasks = make_run(rounds=3)
    experiment.state = coordinator_pb2.ExperimentState.EXPERIMENT_STATE_RUNNING
    experiment.ClearField("finished_at")
    report = build_report(experiment, tasks)
    assert report["state"] == "RUNNING" and report["finished_at"] is None
    assert report["wall_time_s"] == pytest.approx(report["rounds"][-1]["finished_s"])


def test_non_finite_metrics_become_null() -> None:
    experiment, tasks = make_run(rounds=2)
    experiment.rounds[1].metrics["eval_loss"] = math.nan
    experiment.rounds[1].metrics["eval_accuracy"] = math.inf
    report = build_report(experiment, tasks)
    assert report["rounds"][1]["metrics"] == {"eval_loss": None, "eval_accuracy": None}
    assert report["final_accuracy_round"] == 1
    json.dumps(report, allow_nan=False)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("strategy: fedbuff\naggregation:\n  algorithm: {name: fedadam, lr: 0.01}\n", ("fedbuff", "fedadam")),
        ("strategy: {kind: fedasync, algorithm: fedavgm}\n", ("fedasync", "fedavgm")),
        ("rounds: 3\n", (None, None)),
        ("strategy: [unclosed\n", (None, None)),
        ("- a list\n", (None, None)),
        ("", (None, None)),
    ],
)
def test_strategy_and_algorithm_come_from_the_spec(
    spec: str, expected: tuple[str | None, str | None]
) -> None:
    report = build_report(coordinator_pb2.Experiment(id="e", spec_yaml=spec), [])
    assert (report["strategy"], report["algorithm"]) == expected


def test_an_empty_experiment() -> None:
    report = build_report(coordinator_pb2.Experiment(id="e0", name="empty"), [])
    assert report["state"] == "UNSPECIFIED"
    assert report["started_at"] is None and report["finished_at"] is None and report["wall_time_s"] is None
    assert report["rounds_completed"] == 0 and report["rounds"] == []
    assert report["final_accuracy"] is None and report["best_accuracy"] is None
    assert report["sites"] == [] and report["failures"] == [] and report["timeline"] == []
    json.dumps(report, allow_nan=False)


# --------------------------------------------------------------------------- files


def test_write_report(
    run: tuple[coordinator_pb2.Experiment, list[coordinator_pb2.Task]], tmp_path: Path
) -> None:
    experiment, tasks = run
    out = tmp_path / "reports" / "exp-1"
    json_path, png_path = write_report(experiment, tasks, out)
    assert (json_path, png_path) == (out / "report.json", out / "report.png")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.png"]  # no temporary files left
    text = json_path.read_text()
    report = json.loads(text)
    assert text == json.dumps(report, indent=2, sort_keys=True) + "\n"
    assert report == json.loads(json.dumps(build_report(experiment, tasks)))
    assert report["final_accuracy"] == pytest.approx(accuracy(19))

    assert png_size(png_path) == (1600, 1000)
    assert 30_000 < png_path.stat().st_size < 3_000_000
    pixels = matplotlib.image.imread(png_path)
    assert pixels.shape[:2] == (1000, 1600)
    # Not blank: a drawn figure has many distinct colours.
    assert len({tuple(p) for p in pixels[::10, ::10].reshape(-1, pixels.shape[2]).tolist()}) > 20


def test_render_from_a_loaded_report_json(
    run: tuple[coordinator_pb2.Experiment, list[coordinator_pb2.Task]], tmp_path: Path
) -> None:
    experiment, tasks = run
    report = json.loads(json.dumps(build_report(experiment, tasks)))
    render_report_png(report, tmp_path / "again.png")
    assert png_size(tmp_path / "again.png") == (1600, 1000)


def test_write_report_replaces_an_old_report(tmp_path: Path) -> None:
    experiment, tasks = make_run(rounds=2)
    (tmp_path / "report.json").write_text("old")
    json_path, _ = write_report(experiment, tasks, tmp_path)
    assert json.loads(json_path.read_text())["rounds_completed"] == 2


def test_an_empty_experiment_renders(tmp_path: Path) -> None:
    json_path, png_path = write_report(coordinator_pb2.Experiment(id="e0"), [], tmp_path)
    assert json.loads(json_path.read_text())["rounds"] == []
    assert png_size(png_path) == (1600, 1000)


def test_rounds_without_any_accuracy_render(tmp_path: Path) -> None:
    experiment, tasks = make_run(rounds=3)
    for summary in experiment.rounds:
        summary.metrics.clear()
    report = build_report(experiment, tasks)
    assert report["final_accuracy"] is None
    render_report_png(report, tmp_path / "r.png")
    assert png_size(tmp_path / "r.png") == (1600, 1000)


# --------------------------------------------------------------------------- summary_table


def test_summary_table(run: tuple[coordinator_pb2.Experiment, list[coordinator_pb2.Task]]) -> None:
    experiment, tasks = run
    table = summary_table(build_report(experiment, tasks))
    lines = table.splitlines()
    assert f"final accuracy: {accuracy(19):.4f} (round 19)" in table
    assert "..." not in table  # 20 rounds: all shown
    round_lines = [line for line in lines if line.split() and line.split()[0].isdigit()]
    assert len(round_lines) == 20
    assert round_lines[6].split()[2] == "-"  # round 7 has no accuracy
    assert round_lines[16].split()[3] == "7/1"
    frontier = next(line for line in lines if line.startswith("frontier"))
    assert frontier.split()[1:4] == ["40", "38", "2"] and "TRAINER_CRASHED x2" in frontier
    assert "sync/fedavg" in lines[0] and "COMPLETED" in lines[0]


def test_summary_table_elides_long_runs() -> None:
    experiment, tasks = make_run(rounds=40, sites=("a", "b"))
    table = summary_table(build_report(experiment, tasks))
    round_numbers = [
        int(line.split()[0]) for line in table.splitlines() if line.split() and line.split()[0].isdigit()
    ]
    assert round_numbers == [*range(1, 11), *range(31, 41)]
    assert "(20 more rounds)" in table
    assert max(len(line) for line in table.splitlines()) < 110


def test_summary_table_of_an_empty_experiment() -> None:
    table = summary_table(build_report(coordinator_pb2.Experiment(id="e0"), []))
    assert "no rounds yet" in table and "final accuracy: n/a" in table


def test_timeline_places_every_dispatched_task(
    run: tuple[coordinator_pb2.Experiment, list[coordinator_pb2.Task]],
) -> None:
    experiment, tasks = run
    timeline = build_report(experiment, tasks)["timeline"]
    assert len(timeline) == 4 * 20 * 2
    by_id = {e["task_id"]: e for e in timeline}
    ok = by_id["aurora-r3-1"]
    task = next(t for t in tasks if t.id == "aurora-r3-1")
    assert ok["dispatched_s"] == pytest.approx(task.timings.dispatched_at - T0)
    assert ok["queue_s"] == pytest.approx(task.timings.queue_wait_s)
    assert (ok["download_s"], ok["train_s"], ok["upload_s"]) == (
        task.timings.download_s,
        task.timings.train_s,
        task.timings.upload_s,
    )
    assert ok["failed"] is False and ok["phase"] == "SUCCEEDED"
    # Timed out in the queue: the queue bar runs from dispatch to when the task ended.
    stuck = by_id["polaris-r12-0"]
    assert stuck["failed"] is True and stuck["queue_s"] == pytest.approx(60.0)
    assert stuck["train_s"] == 0.0


def test_without_a_recorded_start_times_count_from_the_first_event() -> None:
    experiment, tasks = make_run(rounds=2)
    experiment.ClearField("started_at")
    experiment.rounds[0].started_at.CopyFrom(timestamp(T0 + 0.5))  # before its first task (T0 + 1)
    report = build_report(experiment, tasks)
    assert report["started_at"] == "2023-11-14T22:13:20.500000+00:00"
    assert report["rounds"][0]["started_s"] == 0.0
