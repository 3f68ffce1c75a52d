"""nwflow.experiments.failure_regimes: presets, a tiny end-to-end run, the JSON the chapter reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nwflow.experiments import failure_regimes as FR

TINY = dict(steps=3, n_tasks=2, width=8, heads=2, layers=1, eval_tasks=2, n_generated=16, ode_steps=5,
            probe_queries=4)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_presets():
    cpu = FR.preset("cpu")
    assert cpu["dim"] == 8 and cpu["support_size"] == 50 and cpu["sigma_min"] == 0.01
    assert FR.preset("gpu")["steps"] > cpu["steps"] > FR.preset("fast")["steps"]
    assert FR.preset("fast", steps=7)["steps"] == 7
    with pytest.raises(ValueError, match="preset"):
        FR.preset("tpu")
    with pytest.raises(ValueError, match="unknown"):
        FR.preset("fast", stepz=3)


def test_tiny_run_reports_every_measurement():
    config = FR.preset("fast", **TINY)
    model, res = FR.run_experiment(config, progress=False)
    n_t = len(config["times"])
    assert len(res["loss_every_10"]) == 1
    for fam in ("mixture", "shells"):
        v = res["families"][fam]
        assert len(v["mmd2_learned"]) == len(v["mmd2_plugin"]) == 2
        assert len(v["fm_error_learned"]) == len(v["fm_error_plugin"]) == n_t
        rho = np.array(v["spearman"])
        assert rho.shape == (n_t, 1, 2) and np.all(np.abs(rho) <= 1 + 1e-12)
        neff = np.array(v["neff_heads"])
        assert neff.shape == (n_t, 1, 2) and np.all((neff >= 1 - 1e-9) & (neff <= 50 + 1e-9))
        # The exact kernel sharpens along the path: n_eff falls from near m towards 1.
        assert np.all(np.diff(v["neff_nw"]) < 0.05) and v["neff_nw"][0] > 10 and v["neff_nw"][-1] < 2
        # The plug-in's error explodes at the end of the path (collapse).
        assert v["fm_error_plugin"][-1] > 10 * v["fm_error_plugin"][0]


def test_main_writes_json_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setitem(FR.PRESETS, "fast", {**FR.PRESETS["fast"], **TINY})
    out = FR.main(["--preset", "fast", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "r.json")])
    data = json.loads(out.read_text())
    assert data["config"]["steps"] == 3 and data["config"]["exact_head"] is True
    assert data["provenance"]["device"] == "cpu" and data["provenance"]["config"] == data["config"]
    assert set(data["families"]) == {"mixture", "shells"}
