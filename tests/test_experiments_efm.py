"""nwflow.experiments.efm: presets, a smoke run on the real images, the JSON and its figure."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from nwflow.experiments import efm as E
from nwflow.settings import data_dir

matplotlib.use("Agg")

REAL = data_dir() or Path(__file__).resolve().parents[2] / "shared" / "data"
needs_real = pytest.mark.skipif(
    not (REAL / "cifar10-jpeg.zip").is_file() or not (REAL / "imagenette-64.zip").is_file(),
    reason=f"real CIFAR-10 / Imagenette copies not found in {REAL} (set NWFLOW_DATA_DIR)")


def test_presets():
    assert tuple(E.PRESETS) == ("smoke", "cpu", "gpu")
    smoke, cpu, gpu = E.preset("smoke"), E.preset("cpu"), E.preset("gpu")
    assert gpu["steps"] > cpu["steps"] > smoke["steps"]
    assert gpu["resolution"] == 32 and gpu["cifar_limit"] is None
    # What the cpu preset's docstring promises: 8 x 8 images, n up to 1,000, 2,000 steps a model.
    assert cpu["resolution"] == 8 and max(cpu["n_list"]) == 1000 and cpu["steps"] == 2000
    assert len(cpu["n_list"]) + len(cpu["efm_m"]) == 5
    for cfg in (smoke, cpu, gpu):
        assert cfg["n_efm"] in cfg["n_list"]
        # every tau must lie on the sampler's grid
        assert all(abs(tau * cfg["ode_steps"] - round(tau * cfg["ode_steps"])) < 1e-9 for tau in cfg["taus"])
    assert E.preset("smoke", steps=3)["steps"] == 3
    with pytest.raises(ValueError, match="preset"):
        E.preset("tpu")
    with pytest.raises(ValueError, match="unknown"):
        E.preset("smoke", stepz=3)


def test_result_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("NWFLOW_RESULTS_DIR", str(tmp_path))
    assert E.result_path("cpu") == tmp_path / "efm_cpu.json"
    assert E.result_path("gpu") == tmp_path / "gpu" / "efm_gpu.json"
    with pytest.raises(ValueError, match="preset"):
        E.result_path("tpu")


@needs_real
def test_smoke_run_writes_every_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("NWFLOW_RESULTS_DIR", str(tmp_path / "results"))
    out = E.main(["--preset", "smoke", "--device", "cpu", "--no-progress", "--root", str(REAL),
                  "--checkpoint-dir", str(tmp_path / "ck")])
    assert out == tmp_path / "results" / "efm_smoke.json"
    data = json.loads(out.read_text())
    cfg = data["config"]
    assert cfg == E.preset("smoke")
    assert data["provenance"]["device"] == "cpu" and "config" not in data["provenance"]
    al = data["alignment"]
    assert al["cifar10"]["n"] == cfg["cifar_limit"]
    assert set(al["imagenette"]) == {str(s) for s in cfg["nette_sizes"]}
    for rec in [al["cifar10"], *al["imagenette"].values()]:
        fr = np.array(rec["frac_above_0.9"])
        assert fr.shape == (len(cfg["align_times"]),) and np.all((fr >= 0) & (fr <= 1))
    runs = {(r["n"], r["target"]) for r in data["training"]}
    assert runs == ({(n, "CFM") for n in cfg["n_list"]} | {(cfg["n_efm"], f"EFM-{m}") for m in cfg["efm_m"]}
                    | {(cfg["n_efm"], f"EFM-{m}b") for m in cfg["efm_batch_m"]})
    assert cfg["efm_batch_m"]                    # the smoke run trains the authors' scheme too
    for r in data["training"]:
        assert len(r["field_error"]) == len(cfg["err_times"]) and all(e >= 0 for e in r["field_error"])
        assert r["d1_mean"] > 0 and r["loo_mean"] > 0 and 0 <= r["memorisation_rate"] <= 1
    hy = data["hybrid"]
    assert hy["n"] == max(cfg["n_list"]) and len(hy["d1_mean"]) == len(cfg["taus"])
    # tau = 1 is the closed form alone: Euler's last step lands on (nearly) training images,
    # and those define "decided", so the last share is 1 by construction.
    assert hy["decided"][-1] == 1.0 and hy["d1_mean"][-1] < 0.5 * hy["loo_mean"]
    # Checkpoints were written, one per model.
    assert len(list((tmp_path / "ck").glob("efm_*.pt"))) == len(runs)
    fig = E.plot_results(data)
    assert len(fig.axes) == 5
