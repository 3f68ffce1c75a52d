"""nwflow.experiments.failure_regimes: presets, a tiny end-to-end run, the JSON the chapter reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nwflow.experiments import failure_regimes as FR
from nwflow.settings import config_hash

TINY = dict(steps=3, n_tasks=2, width=8, heads=2, layers=1, eval_tasks=2, n_generated=16, ode_steps=5,
            probe_queries=4)


def test_presets():
    assert tuple(FR.PRESETS) == ("smoke", "cpu", "gpu")
    cpu = FR.preset("cpu")
    assert cpu["dim"] == 8 and cpu["support_size"] == 50 and cpu["sigma_min"] == 0.01
    assert FR.preset("gpu")["steps"] > cpu["steps"] > FR.preset("smoke")["steps"]
    assert FR.preset("smoke", steps=7)["steps"] == 7
    with pytest.raises(ValueError, match="preset"):
        FR.preset("fast")   # the old name of "smoke" is gone, not aliased
    with pytest.raises(ValueError, match="unknown"):
        FR.preset("smoke", stepz=3)


def test_result_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("NWFLOW_RESULTS_DIR", str(tmp_path))
    assert FR.result_path("cpu") == tmp_path / "failure_regimes_conditioner_cpu.json"
    no_head = tmp_path / "failure_regimes_conditioner_cpu_no_exact_head.json"
    assert FR.result_path("cpu", exact_head=False) == no_head
    assert FR.result_path("gpu") == tmp_path / "gpu" / "failure_regimes_conditioner_gpu.json"


def test_committed_cpu_result_still_reads():
    """book/results/failure_regimes_conditioner_cpu.json (written before the config left the
    provenance block) has what chapter 5 reads, at the place result_path names."""
    path = FR.result_path("cpu")
    data = json.loads(path.read_text())
    assert data["config"] == FR.preset("cpu") == FR.preset("cpu", families=["shells", "mixture"])
    prov = data["provenance"]
    assert len(prov["git_commit"]) == 40 and prov["device"] == "cpu" and prov["device_name"]
    assert data["wall_seconds"] > 0 and set(data["families"]) == {"mixture", "shells"}


def test_tiny_run_reports_every_measurement():
    config = FR.preset("smoke", **TINY)
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


def test_one_family_is_trained_and_evaluated_alone():
    config = FR.preset("smoke", **TINY, families=["shells"])
    _, res = FR.run_experiment(config, progress=False)
    assert set(res["families"]) == {"shells"} and tuple(res["task"]["families"]) == ("shells",)
    # The shells' held-out tasks are the same as in a two-family run (same evaluation seed).
    _, both = FR.run_experiment(FR.preset("smoke", **TINY), progress=False)
    assert res["families"]["shells"]["neff_nw"] == both["families"]["shells"]["neff_nw"]
    with pytest.raises(ValueError, match="families"):
        FR.preset("smoke", families=["moons"])
    assert FR.result_path("cpu", families=["shells"]).name == "failure_regimes_conditioner_cpu_shells.json"


def test_main_writes_json_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setitem(FR.PRESETS, "smoke", {**FR.PRESETS["smoke"], **TINY})
    monkeypatch.setenv("NWFLOW_RESULTS_DIR", str(tmp_path / "results"))
    argv = ["--preset", "smoke", "--device", "cpu", "--no-progress", "--no-exact-head",
            "--checkpoint-dir", str(tmp_path / "ck")]
    out = FR.main(argv)
    assert out == tmp_path / "results" / "failure_regimes_conditioner_smoke_no_exact_head.json"
    data = json.loads(out.read_text())
    assert data["config"]["steps"] == 3 and data["config"]["exact_head"] is False
    # The configuration is stored once, at the top level.
    assert data["provenance"]["device"] == "cpu" and "config" not in data["provenance"]
    assert set(data["families"]) == {"mixture", "shells"}
    # One checkpoint, named after the configuration's hash; a rerun resumes it: it finds the
    # run complete, so it neither trains nor rewrites the file.
    (ckpt,) = (tmp_path / "ck").glob("conditioner-*.pt")
    assert ckpt.name == f"conditioner-{config_hash(data['config'])}.pt"
    written = ckpt.stat().st_mtime_ns
    FR.main(argv + ["--out", str(tmp_path / "again.json")])
    assert list((tmp_path / "ck").iterdir()) == [ckpt] and ckpt.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "again.json").read_text())["loss_every_10"] == data["loss_every_10"]


def test_saved_weights_load_and_reproduce_the_evaluation(tmp_path):
    """save_weights -> _runner.committed_weights -> run_experiment(weights=...) evaluates the
    same model without training (same numbers); another configuration finds no weights."""
    from nwflow.experiments import _runner

    config = FR.preset("smoke", **TINY, families=["shells"])
    model, res = FR.run_experiment(config, progress=False)
    path = FR.save_weights(tmp_path / "w.pt", model, config, train_seconds=res["train_seconds"])
    weights = _runner.committed_weights(path, config)
    assert weights is not None and set(weights) == set(model.state_dict())
    assert _runner.committed_weights(path, {**config, "steps": 4}) is None
    assert _runner.committed_weights(tmp_path / "missing.pt", config) is None
    _, again = FR.run_experiment(config, progress=False, weights=weights)
    assert again["weights_loaded"] and not res["weights_loaded"] and again["train_seconds"] == 0.0
    assert again["loss_every_10"] == []
    assert again["families"]["shells"]["mmd2_learned"] == res["families"]["shells"]["mmd2_learned"]
    assert FR.weights_path("cpu").name == "failure_regimes_conditioner_cpu_weights.pt"


def test_committed_cpu_weights_match_the_cpu_preset():
    """book/results/failure_regimes_conditioner_cpu_weights.pt: weights only, for today's cpu preset."""
    import torch

    from nwflow.experiments import _runner

    path = FR.weights_path("cpu")
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert set(stored) >= {"state_dict", "config", "config_hash", "provenance", "train_seconds"}
    assert "optimizer" not in stored and stored["config"] == FR.preset("cpu")
    assert stored["config_hash"] == config_hash(FR.preset("cpu"))
    assert _runner.committed_weights(path, FR.preset("cpu")) is not None
    assert path.stat().st_size < 1_000_000
