"""Experiment reports: what ``fedhpc report RUN`` prints and renders.

:func:`build_report` turns the Coordinator API's ``Experiment`` and its ``Task`` list into a
JSON-able dict (the report); :func:`summary_table` prints it for a terminal,
:func:`render_report_png` draws it (global accuracy over wall time, and a per-site timeline of
every task's queue wait, download, train and upload), and :func:`write_report` writes both
``report.json`` and ``report.png`` atomically.

The renderer and the table read only the report dict, so a ``report.json`` written earlier can be
re-rendered without the coordinator. Times in the report are seconds since the experiment
started (``started_at``), which is what matters on HPC, where batch-queue waits dominate.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import textwrap
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from fedhpc.api.v1 import coordinator_pb2

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from numpy.typing import ArrayLike

__all__ = [
    "ACCURACY_METRIC",
    "REPORT_SCHEMA",
    "build_report",
    "render_report_png",
    "summary_table",
    "write_report",
]

REPORT_SCHEMA = "fedhpc.report/v1"
# The federated evaluation of each round's global model, as the coordinator records it.
ACCURACY_METRIC = "eval_accuracy"

_Phase = coordinator_pb2.TaskPhase
_SUCCEEDED = _Phase.TASK_PHASE_SUCCEEDED
# Terminal phases that are failures; every other non-succeeded phase is still in progress.
_FAILED_PHASES = frozenset(
    {
        _Phase.TASK_PHASE_FAILED,
        _Phase.TASK_PHASE_TIMED_OUT,
        _Phase.TASK_PHASE_CANCELLED,
        _Phase.TASK_PHASE_REJECTED,
    }
)
# When a failed task carries no error code, the phase alone still says what happened
# (the names are the stable codes of fedhpc.common.contracts.ErrorCode).
_CODE_FOR_PHASE = {
    _Phase.TASK_PHASE_TIMED_OUT: "DEADLINE_EXCEEDED",
    _Phase.TASK_PHASE_CANCELLED: "CANCELLED",
    _Phase.TASK_PHASE_REJECTED: "UPDATE_REJECTED",
}
_UNKNOWN_CODE = "UNKNOWN"

# Timeline segments in the order a trainer goes through them: (report key, label, colour).
_SEGMENTS = (
    ("queue_s", "queue wait", "#b8b8b8"),
    ("download_s", "download", "#4c72b0"),
    ("train_s", "train", "#55a868"),
    ("upload_s", "upload", "#dd8452"),
)
_FAIL_COLOUR = "#d62728"
_ROUND_LINE_COLOUR = "#9a9a9a"
# 16 x 10 inches at 100 dpi: 1600 x 1000 pixels.
_FIGSIZE = (16.0, 10.0)
_DPI = 100
# Characters per title line at the title's font size: wider would run off the figure.
_TITLE_WIDTH = 120
# Past this much wall time the accuracy panel gets a second axis in hours.
_HOURS_AXIS_AFTER_S = 2 * 3600.0
# Round labels above the timeline: at most this many, so they never overlap.
_MAX_ROUND_LABELS = 20
# summary_table shows every round up to this many, else the first and last _TABLE_EDGE_ROWS.
_MAX_TABLE_ROUNDS = 25
_TABLE_EDGE_ROWS = 10


# --------------------------------------------------------------------------- build_report


def build_report(
    experiment: coordinator_pb2.Experiment, tasks: Iterable[coordinator_pb2.Task]
) -> dict[str, Any]:
    """The report of one experiment as a JSON-able dict (no I/O, no clock).

    Keys: ``schema``, ``id``, ``name``, ``state``, ``error``, ``model``, ``latest_version``,
    ``strategy`` and ``algorithm`` (from the spec; None when it does not say), ``started_at``
    (ISO 8601 UTC: the experiment's start, else its first recorded event; every relative time
    counts from it), ``finished_at``, ``wall_time_s`` (start to finish, or to the latest
    recorded event while the experiment runs), ``rounds_completed``, ``total_rounds``,
    ``final_accuracy``/``final_accuracy_round`` (``eval_accuracy`` of the last round that has
    one), ``best_accuracy``/``best_accuracy_round``, ``rounds`` (per round), ``sites`` (per
    site, spec order), ``failures`` (per failed task) and ``timeline`` (per dispatched task:
    the segments the PNG draws).
    """
    task_list = list(tasks)
    spec_strategy, spec_algorithm = _spec_labels(experiment.spec_yaml)
    t0 = _start_time(experiment, task_list)
    t_end = _end_time(experiment, task_list)
    rounds = [_round_entry(summary, t0) for summary in sorted(experiment.rounds, key=lambda r: r.round)]
    final = _final_accuracy(rounds)
    best = _best_accuracy(rounds)
    sites = _site_names(experiment, task_list)
    finished_at = _timestamp(experiment.finished_at) if experiment.HasField("finished_at") else None
    return {
        "schema": REPORT_SCHEMA,
        "id": experiment.id,
        "name": experiment.name,
        "state": _state_name(experiment.state),
        "error": experiment.error or None,
        "model": experiment.model,
        "latest_version": experiment.latest_version,
        "strategy": spec_strategy,
        "algorithm": spec_algorithm,
        "started_at": _iso(t0),
        "finished_at": _iso(finished_at),
        "wall_time_s": t_end - t0 if t0 is not None and t_end is not None else None,
        # Round 0 is the initial model, not an aggregation.
        "rounds_completed": sum(1 for r in rounds if r["finished_s"] is not None and r["round"] > 0),
        "total_rounds": experiment.total_rounds,
        "final_accuracy": final[1] if final else None,
        "final_accuracy_round": final[0] if final else None,
        "best_accuracy": best[1] if best else None,
        "best_accuracy_round": best[0] if best else None,
        "rounds": rounds,
        "sites": [_site_entry(site, [t for t in task_list if t.site == site]) for site in sites],
        "failures": _failures(task_list),
        "timeline": _timeline(task_list, t0, t_end),
    }


def _timestamp(ts: Timestamp) -> float:
    """Epoch seconds of a google.protobuf.Timestamp."""
    return float(ts.seconds) + float(ts.nanos) / 1e9


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC).isoformat()


def _rel(epoch: float | None, t0: float | None) -> float | None:
    return None if epoch is None or t0 is None else epoch - t0


def _state_name(state: int) -> str:
    try:
        enum = coordinator_pb2.ExperimentState
        return enum.Name(enum.ValueType(state)).removeprefix("EXPERIMENT_STATE_")
    except ValueError:  # a state newer than these stubs
        return str(state)


def _phase_name(phase: int) -> str:
    try:
        return _Phase.Name(_Phase.ValueType(phase)).removeprefix("TASK_PHASE_")
    except ValueError:
        return str(phase)


def _finite(value: float) -> float | None:
    # JSON has no NaN/Infinity; a diverged round's loss becomes null rather than an invalid file.
    return value if math.isfinite(value) else None


def _spec_labels(spec_yaml: str) -> tuple[str | None, str | None]:
    """(strategy, algorithm) named by the experiment spec, each None when it does not say.

    Accepts ``strategy: fedbuff`` or ``strategy: {name: fedbuff, algorithm: fedavg}`` and
    ``algorithm:`` at the top level or under ``aggregation``/``aggregator``.
    """
    try:
        spec = yaml.safe_load(spec_yaml) if spec_yaml else None
    except yaml.YAMLError:
        return None, None
    if not isinstance(spec, Mapping):
        return None, None
    strategy = spec.get("strategy")
    candidates = [spec.get("algorithm"), strategy.get("algorithm") if isinstance(strategy, Mapping) else None]
    for section in ("aggregation", "aggregator"):
        value = spec.get(section)
        if isinstance(value, Mapping):
            candidates.append(value.get("algorithm"))
    algorithm = next((name for name in map(_label, candidates) if name), None)
    return _label(strategy), algorithm


def _label(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping):
        for key in ("name", "kind", "type"):
            name = value.get(key)
            if isinstance(name, str) and name:
                return name
    return None


def _start_time(
    experiment: coordinator_pb2.Experiment, tasks: Sequence[coordinator_pb2.Task]
) -> float | None:
    """Epoch seconds the report counts from: the experiment's start, else its first recorded
    event; None when nothing has happened yet."""
    if experiment.HasField("started_at"):
        return _timestamp(experiment.started_at)
    seen = [_timestamp(r.started_at) for r in experiment.rounds if r.HasField("started_at")]
    seen += [t.timings.dispatched_at for t in tasks if t.timings.dispatched_at > 0]
    return min(seen) if seen else None


def _end_time(experiment: coordinator_pb2.Experiment, tasks: Sequence[coordinator_pb2.Task]) -> float | None:
    """Epoch seconds the experiment finished; while it runs, its latest recorded event
    (the report is a pure function of its inputs, so it never reads the clock)."""
    if experiment.HasField("finished_at"):
        return _timestamp(experiment.finished_at)
    seen = [_timestamp(r.finished_at) for r in experiment.rounds if r.HasField("finished_at")]
    seen += [_timestamp(r.started_at) for r in experiment.rounds if r.HasField("started_at")]
    for task in tasks:
        timings = task.timings
        seen += [x for x in (timings.dispatched_at, timings.started_at, timings.finished_at) if x > 0]
        if timings.started_at > 0:
            seen.append(timings.started_at + timings.download_s + timings.train_s + timings.upload_s)
    return max(seen) if seen else None


def _round_entry(summary: coordinator_pb2.RoundSummary, t0: float | None) -> dict[str, Any]:
    started = _rel(_timestamp(summary.started_at), t0) if summary.HasField("started_at") else None
    finished = _rel(_timestamp(summary.finished_at), t0) if summary.HasField("finished_at") else None
    metrics = {name: _finite(value) for name, value in summary.metrics.items()}
    return {
        "round": summary.round,
        "version": summary.version,
        "started_s": started,
        "finished_s": finished,
        "duration_s": finished - started if started is not None and finished is not None else None,
        "accepted_updates": summary.accepted_updates,
        "rejected_updates": summary.rejected_updates,
        "accuracy": metrics.get(ACCURACY_METRIC),
        "metrics": metrics,
    }


def _final_accuracy(rounds: Sequence[Mapping[str, Any]]) -> tuple[int, float] | None:
    """(round, accuracy) of the last round that reported an accuracy (rounds are sorted)."""
    scored = [(r["round"], r["accuracy"]) for r in rounds if r["accuracy"] is not None]
    return scored[-1] if scored else None


def _best_accuracy(rounds: Sequence[Mapping[str, Any]]) -> tuple[int, float] | None:
    scored = [(r["round"], r["accuracy"]) for r in rounds if r["accuracy"] is not None]
    # Ties go to the earliest round: the first time the model got that good.
    return max(scored, key=lambda item: (item[1], -item[0])) if scored else None


def _site_names(experiment: coordinator_pb2.Experiment, tasks: Sequence[coordinator_pb2.Task]) -> list[str]:
    """The spec's sites in spec order, then any other site a task ran on, sorted."""
    names = list(dict.fromkeys(experiment.sites))
    return names + sorted({t.site for t in tasks} - set(names))


def _failure_code(task: coordinator_pb2.Task) -> str:
    code = task.error.code or task.result.error.code
    return code or _CODE_FOR_PHASE.get(task.phase, _UNKNOWN_CODE)


def _queue_wait(timings: coordinator_pb2.TaskTimings) -> float | None:
    """Seconds in the site's batch queue; None when the task never started (still queued)."""
    if timings.queue_wait_s > 0:
        return timings.queue_wait_s
    if timings.started_at > 0 and timings.dispatched_at > 0:
        return max(0.0, timings.started_at - timings.dispatched_at)
    return None


def _mean(values: Iterable[float]) -> float | None:
    items = list(values)
    return sum(items) / len(items) if items else None


def _site_entry(site: str, tasks: Sequence[coordinator_pb2.Task]) -> dict[str, Any]:
    """Counts and mean phase durations of one site's tasks.

    A mean is over the tasks that reached that phase: proto3 cannot tell an unrecorded
    duration from 0, and a task that failed while downloading did not train for 0 s.
    """
    failed = [t for t in tasks if t.phase in _FAILED_PHASES]
    succeeded = sum(1 for t in tasks if t.phase == _SUCCEEDED)
    samples = [t.result.num_samples for t in tasks if t.HasField("result") and t.result.num_samples > 0]
    queue = [q for q in (_queue_wait(t.timings) for t in tasks) if q is not None]
    return {
        "site": site,
        "tasks": len(tasks),
        "succeeded": succeeded,
        "failed": len(failed),
        "in_progress": len(tasks) - succeeded - len(failed),
        "failures_by_code": dict(sorted(Counter(_failure_code(t) for t in failed).items())),
        "mean_queue_wait_s": _mean(queue),
        "mean_download_s": _mean(t.timings.download_s for t in tasks if t.timings.download_s > 0),
        "mean_train_s": _mean(t.timings.train_s for t in tasks if t.timings.train_s > 0),
        "mean_upload_s": _mean(t.timings.upload_s for t in tasks if t.timings.upload_s > 0),
        "total_samples": sum(samples) if samples else None,
    }


def _failures(tasks: Sequence[coordinator_pb2.Task]) -> list[dict[str, Any]]:
    failed = sorted(
        (t for t in tasks if t.phase in _FAILED_PHASES), key=lambda t: (t.round, t.site, t.attempt, t.id)
    )
    return [
        {
            "task_id": t.id,
            "site": t.site,
            "round": t.round,
            "attempt": t.attempt,
            "phase": _phase_name(t.phase),
            "code": _failure_code(t),
            "message": t.error.message or t.result.error.message,
        }
        for t in failed
    ]


def _timeline(
    tasks: Sequence[coordinator_pb2.Task], t0: float | None, t_end: float | None
) -> list[dict[str, Any]]:
    """Where each dispatched task's segments lie, in seconds since the start.

    The queue runs from dispatch to start; download, train and upload follow the start in
    that order. A task that never started queued until it finished (e.g. deadline exceeded
    in the queue) or, still waiting, until the latest recorded event.
    """
    if t0 is None:
        return []
    entries = []
    for task in sorted(tasks, key=lambda t: (t.timings.dispatched_at, t.site, t.round, t.attempt, t.id)):
        timings = task.timings
        if timings.dispatched_at <= 0:  # never dispatched: nothing happened anywhere
            continue
        queue = _queue_wait(timings)
        if queue is None:
            until = timings.finished_at if timings.finished_at > 0 else t_end
            queue = max(0.0, (until or timings.dispatched_at) - timings.dispatched_at)
        entries.append(
            {
                "task_id": task.id,
                "site": task.site,
                "round": task.round,
                "attempt": task.attempt,
                "phase": _phase_name(task.phase),
                "failed": task.phase in _FAILED_PHASES,
                "dispatched_s": timings.dispatched_at - t0,
                "queue_s": queue,
                "download_s": timings.download_s,
                "train_s": timings.train_s,
                "upload_s": timings.upload_s,
                "finished_s": timings.finished_at - t0 if timings.finished_at > 0 else None,
            }
        )
    return entries


# --------------------------------------------------------------------------- writing


def write_report(
    experiment: coordinator_pb2.Experiment, tasks: Iterable[coordinator_pb2.Task], out_dir: Path
) -> tuple[Path, Path]:
    """Write ``report.json`` (indent 2, sorted keys) and ``report.png`` into out_dir, each
    atomically (a reader never sees a half-written file); returns (json path, png path)."""
    report = build_report(experiment, tasks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "report.json", out_dir / "report.png"
    # allow_nan=False: build_report already maps non-finite metrics to null, so this only trips on a bug.
    text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n"
    _atomic_write(json_path, lambda fh: fh.write(text.encode("utf-8")))
    render_report_png(report, png_path)
    return json_path, png_path


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file in the same directory, fsynced, then renamed over path."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # O_EXCL: never clobber another writer's temporary file; mode 0o666 lets umask decide.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# --------------------------------------------------------------------------- the PNG


def render_report_png(report: Mapping[str, Any], path: Path) -> None:
    """Draw the report into a PNG at path (atomically): global accuracy against wall time
    above, the per-site task timeline below. Works on a report loaded from report.json."""
    figure = _report_figure(report)
    _atomic_write(Path(path), lambda fh: figure.savefig(fh, format="png", dpi=_DPI))


def _report_figure(report: Mapping[str, Any]) -> Figure:
    # The Figure API with its own Agg canvas: no pyplot, so no global backend or figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    accuracy_ax, timeline_ax = figure.subplots(2, 1, sharex=True, height_ratios=[2, 3])
    figure.suptitle(_figure_title(report), fontsize=14, fontweight="bold")
    rounds = list(report.get("rounds") or [])
    _draw_accuracy(accuracy_ax, report, rounds)
    _draw_timeline(timeline_ax, report, rounds)
    # sharex hides nothing by itself; both panels keep tick labels so each reads on its own.
    accuracy_ax.tick_params(labelbottom=True)
    if not _accuracy_points(rounds) and not report.get("timeline"):
        # Nothing to place in time: an axis of 0..1 "seconds" would only mislead.
        for ax in (accuracy_ax, timeline_ax):
            ax.set_xticks([])
            ax.set_yticks([])
    return figure


def _figure_title(report: Mapping[str, Any]) -> str:
    """Two lines: the experiment, then how it ran; each wrapped so a long name stays inside."""
    name = str(report.get("name") or report.get("id") or "experiment")
    experiment_id = report.get("id")
    first = f"{name} ({experiment_id})" if experiment_id and experiment_id != name else name
    details = [f"strategy {report['strategy']}" if report.get("strategy") else ""]
    details.append(f"algorithm {report['algorithm']}" if report.get("algorithm") else "")
    details.append(str(report.get("state") or "UNKNOWN"))
    total, done = report.get("total_rounds"), report.get("rounds_completed") or 0
    details.append(f"{done}/{total} rounds" if total else f"{done} rounds")
    wall = report.get("wall_time_s")
    details.append(f"wall time {_duration(wall)}" if wall is not None else "")
    second = " | ".join(d for d in details if d)
    return "\n".join([textwrap.fill(first, _TITLE_WIDTH), textwrap.fill(second, _TITLE_WIDTH)])


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _accuracy_points(rounds: Sequence[Mapping[str, Any]]) -> list[tuple[float, float, int]]:
    """(seconds since start, accuracy, round) for each round that reported an accuracy; a
    round's model exists once the round finished, so that is where its point goes."""
    points = []
    for r in rounds:
        when = r.get("finished_s") if r.get("finished_s") is not None else r.get("started_s")
        if r.get("accuracy") is not None and when is not None:
            points.append((float(when), float(r["accuracy"]), int(r["round"])))
    return points


def _draw_accuracy(ax: Axes, report: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> None:
    ax.set_title(f"Global model accuracy ({ACCURACY_METRIC}), one point per round", fontsize=13)
    ax.set_ylabel("global accuracy", fontsize=12)
    ax.set_xlabel("wall time since start (s)", fontsize=12)
    ax.grid(True, alpha=0.3)
    points = _accuracy_points(rounds)
    if not points:
        _no_data(ax, "no accuracy yet: no round has reported eval_accuracy")
        return
    _round_lines(ax, rounds)
    xs, ys, _ = zip(*points, strict=True)
    ax.plot(xs, ys, marker="o", markersize=5, linewidth=1.6, color="#1f77b4", label="global model, per round")
    _unevaluated_rounds(ax, rounds)
    final = report.get("final_accuracy")
    if final is not None:
        ax.axhline(final, linestyle="--", linewidth=1.2, color="#444444", label="final accuracy")
        # Left edge: the curve rises towards the final value, so the left end of the line is clear.
        ax.annotate(
            f"final {final:.4f} (round {report.get('final_accuracy_round')})",
            xy=(0.005, final),
            xycoords=("axes fraction", "data"),
            xytext=(0, 4),
            textcoords="offset points",
            ha="left",
            va="bottom",
            fontsize=11,
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
        )
    low, high = min(ys), max(ys)
    pad = max(0.02, 0.08 * (high - low))
    ax.set_ylim(low - pad, high + 2.5 * pad)  # headroom for the annotation above the dashed line
    ax.legend(loc="lower right", fontsize=10)
    if (report.get("wall_time_s") or 0.0) > _HOURS_AXIS_AFTER_S:
        _hours_axis(ax)


def _hours_axis(ax: Axes) -> None:
    """Seconds are hard to read in the hundreds of thousands: the same axis in hours on top."""
    hours = ax.secondary_xaxis("top", functions=(_seconds_to_hours, _hours_to_seconds))
    hours.set_xlabel("hours since start", fontsize=11)


def _unevaluated_rounds(ax: Axes, rounds: Sequence[Mapping[str, Any]]) -> None:
    """Finished rounds without an accuracy, as ticks on the bottom edge: a gap in the curve
    then reads as "not evaluated", not as a round that never happened."""
    missing = [
        float(r["finished_s"])
        for r in rounds
        if r.get("accuracy") is None and r.get("finished_s") is not None
    ]
    if missing:
        ax.plot(
            missing,
            [0.0] * len(missing),
            transform=ax.get_xaxis_transform(),  # x in seconds, y in axes fraction
            linestyle="none",
            marker="^",
            markersize=8,
            color="#999999",
            clip_on=False,
            label="round without eval_accuracy",
        )


def _seconds_to_hours(seconds: ArrayLike) -> ArrayLike:
    return np.divide(seconds, 3600.0)


def _hours_to_seconds(hours: ArrayLike) -> ArrayLike:
    return np.multiply(hours, 3600.0)


def _no_data(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=13, color="#666666")


def _round_lines(ax: Axes, rounds: Sequence[Mapping[str, Any]]) -> None:
    """Faint vertical lines where rounds start."""
    for r in rounds:
        if r.get("started_s") is not None:
            ax.axvline(float(r["started_s"]), color=_ROUND_LINE_COLOUR, linewidth=0.7, alpha=0.45, zorder=0)


def _lanes(entries: Sequence[Mapping[str, Any]]) -> list[int]:
    """A lane per task inside its site's row so that overlapping tasks never hide each other
    (greedy interval packing; entries are sorted by dispatch time)."""
    lane_ends: list[float] = []
    lanes = []
    for entry in entries:
        start, end = float(entry["dispatched_s"]), _task_end(entry)
        free = next((i for i, lane_end in enumerate(lane_ends) if lane_end <= start), None)
        if free is None:
            lane_ends.append(end)
            lanes.append(len(lane_ends) - 1)
        else:
            lane_ends[free] = end
            lanes.append(free)
    return lanes


def _task_end(entry: Mapping[str, Any]) -> float:
    drawn = float(entry["dispatched_s"]) + sum(float(entry[key]) for key, _, _ in _SEGMENTS)
    finished = entry.get("finished_s")
    return max(drawn, float(finished)) if finished is not None else drawn


@dataclass(frozen=True)
class _Placed:
    """A timeline entry placed in its site's row: the centre and height of its lane."""

    entry: Mapping[str, Any]
    y: float
    height: float


def _draw_timeline(ax: Axes, report: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> None:
    ax.set_title("Tasks per site: queue wait, download, train, upload", fontsize=13)
    ax.set_xlabel("wall time since start (s)", fontsize=12)
    timeline = list(report.get("timeline") or [])
    if not timeline:
        ax.set_yticks([])
        _no_data(ax, "no tasks yet")
        return
    sites = list(
        dict.fromkeys([*(s["site"] for s in report.get("sites") or []), *(e["site"] for e in timeline)])
    )
    sites = [s for s in sites if any(e["site"] == s for e in timeline)]
    placed = _place(timeline, sites)
    for failed in (False, True):
        _draw_segments(ax, [p for p in placed if bool(p.entry["failed"]) == failed], failed=failed)
    _failure_marks(ax, [p for p in placed if p.entry["failed"]])
    _round_lines(ax, rounds)
    ax.set_yticks(range(len(sites)), labels=sites, fontsize=12)
    # Rows top to bottom in site order, plus a band above the first row for round labels.
    ax.set_ylim(len(sites) - 0.5, -1.1)
    _round_labels(ax, rounds)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(handles=_legend_handles(), loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=7, fontsize=11)


def _place(timeline: Sequence[Mapping[str, Any]], sites: Sequence[str]) -> list[_Placed]:
    """Each task's lane inside its site's row (row i spans i - 0.4 .. i + 0.4)."""
    placed = []
    for row, site in enumerate(sites):
        entries = [e for e in timeline if e["site"] == site]
        lanes = _lanes(entries)
        height = 0.8 / (max(lanes) + 1)
        placed += [
            _Placed(entry, row - 0.4 + height * (lane + 0.5), height * 0.9)
            for entry, lane in zip(entries, lanes, strict=True)
        ]
    return placed


def _draw_segments(ax: Axes, placed: Sequence[_Placed], *, failed: bool) -> None:
    """The queue/download/train/upload bars of these tasks, one barh call per segment kind."""
    for index, (key, label, colour) in enumerate(_SEGMENTS):
        # Segments follow each other: this one starts where the ones before it end.
        bars = [
            (
                p.y,
                p.height,
                float(p.entry["dispatched_s"]) + sum(float(p.entry[k]) for k, _, _ in _SEGMENTS[:index]),
                float(p.entry[key]),
            )
            for p in placed
            if float(p.entry[key]) > 0
        ]
        if not bars:
            continue
        ys, heights, lefts, widths = zip(*bars, strict=True)
        ax.barh(
            ys,
            widths,
            left=lefts,
            height=heights,
            color=colour,
            edgecolor=_FAIL_COLOUR if failed else "white",
            linewidth=1.3 if failed else 0.3,
            hatch="///" if failed else None,
            label=label,
        )


def _failure_marks(ax: Axes, failed: Sequence[_Placed]) -> None:
    """A red cross where each failed task ended, visible even when its bars are too thin."""
    if failed:
        ax.scatter(
            [_task_end(p.entry) for p in failed],
            [p.y for p in failed],
            marker="X",
            s=70,
            color=_FAIL_COLOUR,
            edgecolors="white",
            linewidths=0.6,
            zorder=5,
        )


def _round_labels(ax: Axes, rounds: Sequence[Mapping[str, Any]]) -> None:
    """Round numbers in the band above the rows; every k-th one when there are many."""
    starts = [(float(r["started_s"]), int(r["round"])) for r in rounds if r.get("started_s") is not None]
    step = max(1, math.ceil(len(starts) / _MAX_ROUND_LABELS))
    for x, number in starts[::step]:
        ax.text(x, -0.8, f" r{number}", ha="left", va="center", fontsize=9, color="#555555", clip_on=True)


def _legend_handles() -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(facecolor=colour, label=label) for _, label, colour in _SEGMENTS]
    handles.append(Patch(facecolor="white", edgecolor=_FAIL_COLOUR, hatch="///", label="failed task"))
    handles.append(
        Line2D(
            [], [], marker="X", color=_FAIL_COLOUR, linestyle="none", markersize=9, label="failure (task end)"
        )
    )
    handles.append(Line2D([], [], color=_ROUND_LINE_COLOUR, linewidth=1.0, label="round start"))
    return handles


# --------------------------------------------------------------------------- the terminal table


def summary_table(report: Mapping[str, Any]) -> str:
    """A plain-text summary: a header, one line per round (first and last rows when there are
    many), one line per site, and the final accuracy."""
    lines = [_header_line(report), ""]
    lines += _round_table(list(report.get("rounds") or []))
    lines.append("")
    lines += _site_table(list(report.get("sites") or []))
    lines.append("")
    lines.append(_accuracy_line(report))
    return "\n".join(lines)


def _header_line(report: Mapping[str, Any]) -> str:
    parts = [f"experiment {report.get('id')}"]
    if report.get("name"):
        parts.append(f"{report['name']!r}")
    parts.append(str(report.get("state")))
    if report.get("strategy") or report.get("algorithm"):
        parts.append("/".join(str(x) for x in (report.get("strategy"), report.get("algorithm")) if x))
    wall = report.get("wall_time_s")
    parts.append(f"wall {_duration(wall)}" if wall is not None else "wall -")
    if report.get("latest_version"):
        parts.append(f"model {report.get('model')}:{report['latest_version']}")
    return "  ".join(parts)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _round_table(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rounds:
        return ["no rounds yet"]
    lines = [f"{'round':>5}  {'time_s':>9}  {'accuracy':>8}  {'acc/rej':>7}"]
    if len(rounds) > _MAX_TABLE_ROUNDS:
        hidden = len(rounds) - 2 * _TABLE_EDGE_ROWS
        shown: list[Mapping[str, Any] | None] = [
            *rounds[:_TABLE_EDGE_ROWS],
            None,
            *rounds[-_TABLE_EDGE_ROWS:],
        ]
    else:
        hidden, shown = 0, list(rounds)
    for r in shown:
        if r is None:
            lines.append(f"{'...':>5}  ({hidden} more rounds)")
            continue
        when = r.get("finished_s") if r.get("finished_s") is not None else r.get("started_s")
        updates = f"{r.get('accepted_updates', 0)}/{r.get('rejected_updates', 0)}"
        lines.append(
            f"{r['round']:>5}  {_num(when, '9.1f'):>9}  {_num(r.get('accuracy'), '8.4f'):>8}  {updates:>7}"
        )
    return lines


def _site_table(sites: Sequence[Mapping[str, Any]]) -> list[str]:
    if not sites:
        return ["no sites"]
    width = max(4, *(len(str(s["site"])) for s in sites))
    lines = [
        f"{'site':<{width}}  {'tasks':>5}  {'ok':>4}  {'failed':>6}  {'queue_s':>8}  {'download_s':>10}"
        f"  {'train_s':>8}  {'upload_s':>8}  failures"
    ]
    for s in sites:
        codes = ", ".join(f"{code} x{n}" for code, n in (s.get("failures_by_code") or {}).items())
        lines.append(
            f"{s['site']:<{width}}  {s['tasks']:>5}  {s['succeeded']:>4}  {s['failed']:>6}"
            f"  {_num(s.get('mean_queue_wait_s'), '8.1f'):>8}  {_num(s.get('mean_download_s'), '10.1f'):>10}"
            f"  {_num(s.get('mean_train_s'), '8.1f'):>8}  {_num(s.get('mean_upload_s'), '8.1f'):>8}  {codes or '-'}"
        )
    return lines


def _accuracy_line(report: Mapping[str, Any]) -> str:
    final = report.get("final_accuracy")
    if final is None:
        return f"final accuracy: n/a (no round reported {ACCURACY_METRIC})"
    line = f"final accuracy: {final:.4f} (round {report.get('final_accuracy_round')})"
    best = report.get("best_accuracy")
    if best is not None:
        line += f"  best: {best:.4f} (round {report.get('best_accuracy_round')})"
    return line
