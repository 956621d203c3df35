"""benchmarks/transfer.py keeps working: a small run prints its table and the JSON summary.

This checks the benchmark's plumbing, not speed: the targets are judged on the full-size run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_transfer_benchmark_small_run_prints_the_json_summary() -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "transfer.py"),
            "--size-mb",
            "8",
            "--repeat",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("raw_mb_s", "presigned_mb_s", "grpc_mb_s", "presigned_vs_raw", "grpc_vs_raw"):
        assert summary[key] > 0, key
    assert "presigned" in result.stdout and "grpc" in result.stdout
