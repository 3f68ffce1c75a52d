"""nwflow.experiments.cifar_networks: presets, a tiny run on the real images, resumed checkpoints,
retraining on a changed configuration, committed float16 weights and the figure."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch

from nwflow.experiments import cifar_networks as C
from nwflow.settings import data_dir

matplotlib.use("Agg")

REAL = data_dir() or Path(__file__).resolve().parents[2] / "shared" / "data"
needs_real = pytest.mark.skipif(not (REAL / "cifar10-jpeg.zip").is_file(),
                                reason=f"the CIFAR-10 copy was not found in {REAL} (set NWFLOW_DATA_DIR)")
# smaller than the smoke preset: the tests run it several times
TINY = dict(n_list=[10, 40], n_efm=40, efm_m=[8], steps=4, batch=8, clf_train=200, test_limit=64,
            n_generated=16, err_pairs=8, ode_steps=4, taus=[0.0, 0.5, 1.0])


def test_presets():
    assert tuple(C.PRESETS) == ("smoke", "cpu", "gpu")
    smoke, cpu, gpu = C.preset("smoke"), C.preset("cpu"), C.preset("gpu")
    assert gpu["steps"] > cpu["steps"] > smoke["steps"]
    # what the chapter and the issue promise: n up to 1,000 and EFM-128/256/1000 on the cpu preset,
    # up to 50,000 on the gpu preset
    assert cpu["n_list"] == [10, 100, 1000] and cpu["efm_m"] == [128, 256, 1000] and cpu["n_efm"] == 1000
    assert gpu["n_list"][-2:] == [10000, 50000]
    for cfg in (smoke, cpu, gpu):
        assert cfg["n_efm"] in cfg["n_list"]
        assert all(abs(tau * cfg["ode_steps"] - round(tau * cfg["ode_steps"])) < 1e-9 for tau in cfg["taus"])
    with pytest.raises(ValueError, match="unknown"):
        C.preset("smoke", stepz=3)


def test_paths_and_names(tmp_path, monkeypatch):
    monkeypatch.setenv("NWFLOW_RESULTS_DIR", str(tmp_path))
    assert C.result_path("cpu") == tmp_path / "cifar_networks_cpu.json"
    assert C.weights_path("cpu") == tmp_path / "cifar_networks_cpu_weights.pt"
    assert C.result_path("gpu") == tmp_path / "gpu" / "cifar_networks_gpu.json"
    cfg = C.preset("cpu")
    assert [name for _, _, name in C.run_names(cfg)] == [
        "CFM_n10", "CFM_n100", "CFM_n1000", "EFM-128_n1000", "EFM-256_n1000", "EFM-1000_n1000"]
    # an evaluation-only change keeps the training hash, a training change does not
    assert C.training_config(C.preset("cpu", n_generated=8)) == C.training_config(cfg)
    assert C.training_config(C.preset("cpu", steps=10)) != C.training_config(cfg)


class _Counting:
    """Wraps TargetSampler and counts the batches it draws (a resumed run draws none)."""

    calls = 0

    def __init__(self, *args, **kwargs):
        from nwflow.efm import TargetSampler

        self.inner = TargetSampler(*args, **kwargs)

    def __call__(self, step, generator):
        type(self).calls += 1
        return self.inner(step, generator)


@needs_real
def test_run_resume_retrain_and_committed_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "TargetSampler", _Counting)
    cfg = C.preset("smoke", **TINY)
    ck = tmp_path / "ck"
    res = C.run_experiment(cfg, root=str(REAL), checkpoint_dir=ck, progress=False,
                           save_weights=tmp_path / "w.pt")
    names = [name for _, _, name in C.run_names(cfg)]
    assert [r["name"] for r in res["networks"]] == names
    assert _Counting.calls == len(names) * cfg["steps"]
    for r in res["networks"]:
        assert len(r["field_error"]) == len(cfg["err_times"]) and r["train_seconds"] is not None
        assert 0.0 <= r["memorisation_rate"] <= 1.0 and r["d1_mean"] > 0 and r["fd"] >= 0
    assert 0.0 <= res["classifier"]["test_accuracy"] <= 1.0 and res["classifier"]["test_images"] == 64
    hy = res["hybrid"]
    assert len(hy["d1_mean"]) == len(cfg["taus"]) and hy["decided"][-1] == 1.0
    # the closed form alone (tau = 1) lands on training images: memorised, distance ~ 0
    assert hy["memorisation_rate"][-1] == 1.0 and hy["d1_mean"][-1] < 1e-3 * hy["loo_mean"]
    # the reference rows: training images are closer to the test set than Gaussian noise
    assert res["reference"]["train_images"]["fd"] < res["reference"]["noise"]["fd"]
    # a rerun resumes the finished checkpoints: no batch drawn, same field errors
    _Counting.calls = 0
    again = C.run_experiment(cfg, root=str(REAL), checkpoint_dir=ck, progress=False)
    assert _Counting.calls == 0
    for a, b in zip(again["networks"], res["networks"], strict=True):
        assert a["field_error"] == pytest.approx(b["field_error"])
    # a changed training configuration retrains (new checkpoint names)
    changed = C.preset("smoke", **(TINY | {"steps": 5}))
    C.run_experiment(changed, root=str(REAL), checkpoint_dir=ck, progress=False)
    assert _Counting.calls == len(names) * 5
    # committed float16 weights: loaded for the same training configuration, refused for another
    assert C.load_weights(tmp_path / "w.pt", changed) is None
    assert C.load_weights(tmp_path / "missing.pt", cfg) is None
    w = C.load_weights(tmp_path / "w.pt", cfg)
    assert set(w) == set(names) | {"classifier"}
    assert all(v.dtype == torch.float16 for v in w["CFM_n10"].values() if v.is_floating_point())
    stored = torch.load(tmp_path / "w.pt", weights_only=True)
    assert stored["steps"] == cfg["steps"] and "git_commit" in stored
    _Counting.calls = 0
    loaded = C.run_experiment(cfg, root=str(REAL), checkpoint_dir=tmp_path / "empty", progress=False,
                              weights=w)
    assert _Counting.calls == 0 and all(r["train_seconds"] is None for r in loaded["networks"])
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())
    for a, b in zip(loaded["networks"], res["networks"], strict=True):
        assert a["field_error"] == pytest.approx(b["field_error"], rel=0.02)
    fig = C.plot_results(res, title="tiny")
    assert len(fig.axes) == 5


@needs_real
def test_main_writes_json_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("NWFLOW_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setattr(C, "preset", lambda name, **kw: C._runner.configure(C.PRESETS, C.COMMON, name, TINY))
    out = C.main(["--preset", "smoke", "--device", "cpu", "--no-progress", "--root", str(REAL),
                  "--checkpoint-dir", str(tmp_path / "ck"), "--save-weights"])
    assert out == tmp_path / "results" / "cifar_networks_smoke.json"
    data = json.loads(out.read_text())
    assert data["provenance"]["device"] == "cpu" and data["wall_seconds"] > 0
    assert Path(data["weights_file"]) == tmp_path / "results" / "cifar_networks_smoke_weights.pt"
    assert Path(data["weights_file"]).is_file()


def test_preloaded_data_must_cover_the_configuration():
    cfg = C.preset("smoke", **TINY)
    small = {"train": (torch.zeros(20, 3, 32, 32), torch.zeros(20, dtype=torch.long)),
             "test": (torch.zeros(64, 3, 32, 32), torch.zeros(64, dtype=torch.long))}
    with pytest.raises(ValueError, match=r"data\['train'\] holds 20 images"):
        C.run_experiment(cfg, progress=False, data=small)
