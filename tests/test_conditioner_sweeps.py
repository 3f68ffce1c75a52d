"""nwflow.experiments.conditioner_sweeps: presets, a tiny end-to-end run, the JSON chapter 5 reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nwflow.experiments import conditioner_sweeps as CS

TINY = dict(steps=2, shells_steps=2, heads_steps=2, dims=[2], shells_dim=4, head_counts=[1, 2],
            eval_support_sizes=[4, 8], n_tasks=2, width=8, eval_tasks=2, n_generated=12, ode_steps=4,
            probe_queries=4)


def test_presets():
    assert tuple(CS.PRESETS) == ("smoke", "cpu", "gpu")
    cpu = CS.preset("cpu")
    assert cpu["dims"] == [2, 4, 8, 16] and cpu["shells_dim"] == 32 and cpu["support_size"] == 50
    assert all(cpu["width"] % h == 0 for h in cpu["head_counts"])
    assert CS.preset("gpu")["steps"] > cpu["steps"] > CS.preset("smoke")["steps"]
    with pytest.raises(ValueError, match="unknown"):
        CS.preset("smoke", stepz=3)


def test_tiny_run_reports_every_sweep(tmp_path, monkeypatch):
    monkeypatch.setitem(CS.PRESETS, "smoke", {**CS.PRESETS["smoke"], **TINY})
    monkeypatch.setenv("NWFLOW_RESULTS_DIR", str(tmp_path))
    out = CS.main(["--preset", "smoke", "--device", "cpu", "--no-progress"])
    assert out == tmp_path / "conditioner_sweeps_smoke.json"
    res = json.loads(out.read_text())
    assert res["provenance"]["device"] == "cpu" and res["config"]["dims"] == [2]
    row = res["exact_head"]["2"]
    for side in ("on", "off"):
        assert len(row[side]["mmd2_learned"]) == len(row[side]["mmd2_plugin"]) == 2
    # The plug-in does not depend on the head: both sides evaluate it on the same tasks and noise.
    assert row["on"]["mmd2_plugin"] == row["off"]["mmd2_plugin"]
    off, on = row["off"]["mean_learned"], row["on"]["mean_learned"]
    assert np.isclose(row["benefit"], (off - on) / off)
    assert res["shells"]["dim"] == 4 and len(res["shells"]["mmd2_learned"]) == 2
    heads = res["heads"]
    assert heads["support_sizes"] == [4, 8] and set(heads["by_heads"]) == {"1", "2"}
    assert heads["by_heads"]["2"]["d_k"] == 4
    # alpha is minus the log-log slope of the two points.
    v = np.maximum(heads["mmd2_plugin"], 1e-6)
    assert np.isclose(heads["alpha_plugin"], -np.log(v[1] / v[0]) / np.log(2.0))


def test_parts_run_only_what_is_named():
    config = CS.preset("smoke", **TINY)
    res = CS.run_experiment(config, progress=False, parts=("shells",))
    assert set(res) == {"config", "shells", "wall_seconds"} and res["shells"]["dim"] == 4
    res = CS.run_experiment(config, progress=False, parts=("exact_head",))
    assert set(res) == {"config", "exact_head", "wall_seconds"} and set(res["exact_head"]) == {"2"}
    with pytest.raises(ValueError, match="parts"):
        CS.run_experiment(config, progress=False, parts=("head",))
    with pytest.raises(ValueError, match="parts"):
        CS.run_experiment(config, progress=False, parts=())
