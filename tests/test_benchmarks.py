"""benchmarks/velocity.py runs end to end in --quick mode and writes well-formed JSON.

Structure only: timings on a shared machine are not asserted.
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "velocity.py"


def test_quick_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--times", "0.5", "0.9",
                          "--configs", "500,16,4", "--no-memory", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file was renamed, not left behind"
    record = json.loads(out.read_text())
    prov = record["provenance"]
    for key in ("git_commit", "created_utc", "device", "device_name", "versions", "config", "wall_time_s"):
        assert key in prov
    assert prov["device"] == "cpu" and prov["versions"]["torch"]
    assert record["threads"] == 1 and record["cpu_model"]
    methods = record["methods"]
    assert set(methods) == {"two_gemm", "two_gemm_pre", "sdpa", "sdpa_pre", "cdist", "nwflow", "field"}
    configs = [(r["n"], r["D"], r["B"], r["t"]) for r in record["results"]]
    assert configs == [(500, 16, 4, 0.5), (500, 16, 4, 0.9)]
    for r in record["results"]:
        assert r["support_bytes"] == 500 * 16 * 4
        for m in methods:
            assert len(r["time_s"][m]["all"]) == 3 and r["time_s"][m]["median"] > 0
            assert r["cpu_time_s"][m]["median"] >= 0
            # every method computes the same velocity (fp32 rounding apart)
            assert r["max_rel_diff_vs_two_gemm"][m] < 1e-3
        errors = r["max_rel_error_vs_float64"]
        assert errors["field"] < 1e-5 and errors["nwflow"] < 1e-5
        assert set(r["ratios"]) == set(r["cpu_time_ratios"]) == set(record["ratio_definitions"])
        assert r["ratios"]["field/two_gemm_pre"] == pytest.approx(
            r["time_s"]["field"]["median"] / r["time_s"]["two_gemm_pre"]["median"])
        # the paired ratio: per round first, then the median over the rounds (3 here: min and max bound it)
        times = r["time_s"]
        per_round = [a / b for a, b in zip(times["field"]["all"], times["sdpa_pre"]["all"], strict=True)]
        assert r["paired_ratios"]["field/sdpa_pre"] == pytest.approx(
            {"median": sorted(per_round)[1], "low": min(per_round), "high": max(per_round)})
        assert set(r["paired_ratios"]) == set(record["paired_ratio_definitions"]) == set(r["ratios"])
        assert "peak_memory" not in r  # --no-memory


def test_median_interval_is_the_binomial_order_statistic_interval():
    """The interval's coverage, computed here from the binomial, is at least 95% and one step
    narrower would fall below it (R = 15: the 4th and 12th of 15, 96.5%); with few rounds it is
    the whole range."""
    import math

    spec = importlib.util.spec_from_file_location("bench_velocity", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    def coverage(R, j):  # P(x_(j) <= median <= x_(R + 1 - j)) = 1 - 2 P(Binomial(R, 1/2) < j)
        return 1.0 - 2.0 * sum(math.comb(R, i) for i in range(j)) / 2.0**R

    for R in (3, 7, 9, 15, 20, 31):
        values = [float(v) for v in range(R, 0, -1)]        # R, ..., 1: sorted inside
        median, low, high = bench.median_interval(values)
        j = int(low)                                        # value k is the k-th order statistic
        assert median == (R + 1) / 2 and high == R + 1 - j
        if coverage(R, 1) < 0.95:                           # too few rounds: the whole range
            assert j == 1, R
        else:
            assert coverage(R, j) >= 0.95 > coverage(R, j + 1), (R, j)
    assert bench.median_interval([float(v) for v in range(1, 16)])[1:] == (4.0, 12.0)


def test_cpu_peak_memory_of_one_method():
    """The memory probe runs a method in a fresh process and sees its (B, n) logits."""
    spec = importlib.util.spec_from_file_location("bench_velocity", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    peak = bench.cpu_peak("two_gemm_pre", 200_000, 8, 16, 0.5, 1)
    assert peak["method"] in ("VmHWM-VmRSS after clear_refs", "ru_maxrss growth")
    logits = 16 * 200_000 * 4  # one (B, n) float32 block at least
    assert logits <= peak["extra_peak_bytes"] < 20 * logits


def test_bad_arguments_are_refused():
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--configs", "10,2", "--no-memory"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode != 0 and "n,D,B" in run.stderr
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--times", "1.0", "--no-memory"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode != 0 and "--times" in run.stderr


def test_trajectory_smoke_run_follows_the_closed_form_and_writes_json(tmp_path):
    out = tmp_path / "traj.json"
    script = ROOT / "benchmarks" / "trajectory.py"
    args = ["--synthetic", "--n", "600", "--D", "16", "--batches", "4", "--steps", "8", "--checks", "3",
            "--threads", "1", "--out", str(out)]
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr
    record = json.loads(out.read_text())
    (r,) = record["results"]
    assert [s["t"] for s in r["steps"]] == pytest.approx([0.99 * k / 8 for k in range(8)])
    assert {e["step"] for e in r["errors"]} == {0, 4, 7}
    assert r["worst_error"]["field"] <= 1e-5  # the engine's promise along the run, fp32
    assert r["worst_error"]["field_full"] <= 1e-5
    # No trail before the first step; afterwards at most the batch (the screen's own tests
    # check when it answers).
    assert r["steps"][0]["screened_rows"] == 0 and all(0 <= s["screened_rows"] <= 4 for s in r["steps"])
    # n_eff falls along the run: all 600 points weigh alike at t = 0.
    assert r["steps"][0]["median_n_eff"] == pytest.approx(600, rel=1e-4)
    assert r["steps"][-1]["median_n_eff"] < r["steps"][0]["median_n_eff"]
    assert set(r["ratios"]) == {"field/two_gemm_pre", "field/sdpa_pre", "field_full/two_gemm_pre",
                                "field_full/sdpa_pre"} and "provenance" in record
    assert record["provenance"]["config"]["flush_denormal"] is True  # the default: a fair two-GEMM


def test_gpu_check_script_parses_and_names_files_that_exist():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    named = set(re.findall(r"\b((?:tests|benchmarks)/[\w/]+\.py)\b", script.read_text()))
    assert named and all((ROOT / p).is_file() for p in named), named
