"""The federation commands as a user runs them, each a real `fedhpc` process: up, sites add,
run --detach, watch, status, report, stop, down; and `fedhpc demo` on a short run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FEDHPC = [sys.executable, "-c", "from fedhpc.cli import main; main()"]
SPEC = """\
name: cli-e2e
task: {plugin: digits, hyperparameters: {epochs: 1}}
strategy: {name: sync, rounds: 2, min_sites: 2, round_deadline_s: 60, final_evaluation: true}
algorithm: {name: fedavg}
"""


def fedhpc(
    cwd: Path, *args: str, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*FEDHPC, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"fedhpc {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done


@pytest.mark.slow
def test_up_run_watch_status_report_stop_down(tmp_path: Path) -> None:
    fedhpc(tmp_path, "up")
    try:
        for i in range(2):
            fedhpc(
                tmp_path,
                "sites",
                "add",
                f"site-{i}",
                "--task-config",
                f"partition={i}",
                "--task-config",
                "num_partitions=2",
            )
        listed = fedhpc(tmp_path, "sites", "list").stdout
        assert "site-0" in listed and '"partition": 1' in listed
        again = fedhpc(tmp_path, "sites", "add", "site-0", check=False)
        assert again.returncode == 1 and "exists" in again.stderr
        # An HPC site from an endpoint template (registered only: nothing is dispatched to it).
        hpc = [
            "sites",
            "add",
            "polaris",
            "--template",
            "polaris",
            "--endpoint-id",
            "2f9c1d0e-5b7a-4c1e-9a61-3f0d8e7c6b5a",
        ]
        values = [
            "--var",
            "account=MYPROJ",
            "--var",
            "image=/eagle/MYPROJ/trainer.sif",
            "--var",
            "data_dir=/eagle/MYPROJ",
        ]
        wrong = fedhpc(tmp_path, *hpc, *values, "--var", "walltime=1h", check=False)
        assert wrong.returncode == 1 and "walltime" in wrong.stderr
        fedhpc(tmp_path, *hpc, *values, "--var", "walltime=01:30:00")
        listed = fedhpc(tmp_path, "sites", "list").stdout
        assert "globus-compute" in listed and "01:30:00" in listed
        fedhpc(tmp_path, "sites", "remove", "polaris")
        (tmp_path / "spec.yaml").write_text(SPEC)
        bad = tmp_path / "bad.yaml"
        bad.write_text(SPEC.replace("rounds: 2", "rounds: zero"))
        refused = fedhpc(tmp_path, "run", str(bad), check=False)
        assert refused.returncode == 1 and "strategy.rounds" in refused.stderr
        started = fedhpc(tmp_path, "run", "spec.yaml", "--detach", "--id", "cli-run").stdout
        assert "experiment cli-run started" in started
        watched = fedhpc(tmp_path, "watch", "cli-run").stdout
        assert "round   2/2" in watched and "experiment completed" in watched
        status = fedhpc(tmp_path, "status", "cli-run").stdout
        assert "COMPLETED" in status and "site-1" in status
        assert "cli-run" in fedhpc(tmp_path, "status").stdout
        as_json = json.loads(fedhpc(tmp_path, "status", "cli-run", "--json").stdout)
        assert as_json["experiment"]["state"] == "EXPERIMENT_STATE_COMPLETED"
        fedhpc(tmp_path, "report", "cli-run")
        report = json.loads((tmp_path / "runs" / "cli-run" / "report.json").read_text())
        assert report["rounds_completed"] == 2 and report["final_accuracy"] is not None
        assert (tmp_path / "runs" / "cli-run" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        stopped = fedhpc(tmp_path, "stop", "cli-run").stdout
        assert "completed" in stopped  # stopping a finished experiment changes nothing
        missing = fedhpc(tmp_path, "status", "nope", check=False)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    finally:
        fedhpc(tmp_path, "down")
    down_again = fedhpc(tmp_path, "status", check=False, timeout=30)
    assert down_again.returncode == 1 and "cannot reach the coordinator" in down_again.stderr


@pytest.mark.slow
def test_demo_runs_a_short_federation_and_writes_its_report(tmp_path: Path) -> None:
    done = fedhpc(tmp_path, "demo", "--rounds", "2", "--sites", "2", timeout=300)
    assert "round   2/2" in done.stdout and "final accuracy" in done.stdout
    reports = list((tmp_path / "runs").glob("*/report.json"))
    assert len(reports) == 1
    assert json.loads(reports[0].read_text())["state"] == "COMPLETED"
    # The demo stops what it started: no service or site worker is left behind.
    plane = json.loads((tmp_path / ".fedhpc" / "demo" / "control-plane.json").read_text())
    for pid in plane["pids"].values():
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )
    for pidfile in (tmp_path / ".fedhpc" / "demo" / "coordinator" / "sites").glob("*/worker.pid"):
        assert not Path(f"/proc/{pidfile.read_text().strip()}").exists()
