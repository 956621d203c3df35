"""benchmarks/aggregation.py keeps working: a small run without the anchors prints its JSON summary.

This checks the benchmark's plumbing (the fedhpc runner subprocesses, the bandwidth
reference, the agreement checks, the summary's keys), not speed: the targets are judged on
the full-size run, and --skip-anchors keeps Flower and APPFL (and their venv) out of CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {
    "speedup_vs_best_anchor",
    "peak_rss_ratio_n16_vs_n4",
    "fedhpc_vs_bandwidth",
    "fedhpc_gb_s",
    "bandwidth_gb_s",
    "best_anchor",
    "largest_case",
    "targets",
    "outputs_agree",
    "all_ran",
    "disagreements",
    "failures",
    "bandwidth",
    "anchor_versions",
    "cases",
}
METHOD_KEYS = {"seconds", "gb_s", "peak_rss_mib", "peak_above_before_mib", "max_abs_diff_f32", "agrees"}


def test_aggregation_benchmark_small_run_without_anchors_prints_the_json_summary() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "aggregation.py"),
            "--params",
            "2M",
            "--clients",
            "2,3",
            "--json",
            "--skip-anchors",
            "--repeat",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary.keys() >= SUMMARY_KEYS, SUMMARY_KEYS - summary.keys()
    assert summary["outputs_agree"] is True and summary["disagreements"] == []
    assert summary["all_ran"] is True and summary["failures"] == []
    # No anchors ran: their figures are null, fedhpc's and the bandwidth reference's are not.
    assert summary["speedup_vs_best_anchor"] is None and summary["best_anchor"] is None
    assert summary["anchor_versions"] is None
    assert summary["fedhpc_vs_bandwidth"] > 0 and summary["bandwidth_gb_s"] > 0
    assert summary["peak_rss_ratio_n16_vs_n4"] > 0
    assert set(summary["targets"]) == {
        "speedup_vs_best_anchor",
        "peak_rss_ratio_n16_vs_n4",
        "fedhpc_vs_bandwidth",
    }
    assert summary["targets"]["speedup_vs_best_anchor"]["met"] is None

    assert [(c["params"], c["clients"]) for c in summary["cases"]] == [(2_000_000, 2), (2_000_000, 3)]
    for case in summary["cases"]:
        methods = case["methods"]
        for name in ("fedhpc", "fedhpc-sha256"):
            assert methods[name].keys() >= METHOD_KEYS, name
            assert methods[name]["seconds"] > 0 and methods[name]["agrees"] is True
        for name in ("flower", "flower-inplace", "appfl"):
            assert methods[name] is None
        assert case["reference_check"]["agrees"] is True
    assert "fedhpc-sha256" in result.stdout and "bandwidth ref" in result.stdout
