"""nwflow.experiments.feature_space: presets, the pieces on known answers, a smoke run on real Imagenette."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nwflow import conditioner
from nwflow.data import dinov2, imagenette
from nwflow.experiments import feature_space as FS


def _have_imagenette() -> bool:
    try:
        imagenette.load_imagenette(split="val", size=8, limit=10, progress=False)
    except (FileNotFoundError, OSError):
        return False
    return True


needs_data = pytest.mark.skipif(
    not _have_imagenette(), reason="Imagenette not found: set NWFLOW_DATA_DIR (see nwflow.data.imagenette)")


def test_presets():
    assert tuple(FS.PRESETS) == ("smoke", "cpu", "gpu")
    cpu = FS.preset("cpu")
    assert cpu["sizes"] == [8, 16, 32, 64] and cpu["pca_dims"] == [16, 64] and cpu["scarcity_dim"] == 16
    assert cpu["support_sizes"] == [1, 5, 10, 25, 50] and cpu["neff_t"] == 0.56 and cpu["neff_m"] == 50
    assert FS.preset("gpu")["dinov2"] and not cpu["dinov2"]
    assert FS.preset("gpu")["cond_steps"] > cpu["cond_steps"] > FS.preset("smoke")["cond_steps"]
    with pytest.raises(ValueError, match="unknown"):
        FS.preset("smoke", stepz=3)
    with pytest.raises(ValueError, match="features"):
        FS.run_experiment(FS.preset("smoke"), parts=("scarcity",))


def test_predicted_collapse_is_chapter5_formula():
    X = torch.randn(200, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    trace = float(X.var(0).sum())
    assert math.isclose(FS.predicted_collapse(X, 0.01), 1 / (0.99 + math.sqrt(trace / (2 * math.log(200)))))


def test_class_neff_known_limits():
    # Two far-apart classes: at t close to 0 every support point counts (n_eff near m), and a
    # support scaled up by 100 collapses onto one point (n_eff near 1) at t = 0.56.
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(120, 4, generator=g)
    labels = torch.arange(120) % 2
    early = FS.class_neff(Z, labels, 1e-4, 20, 0.01)
    late = FS.class_neff(100 * Z, labels, 0.56, 20, 0.01)
    assert early.shape == (2,) and np.all(early > 19.9) and np.all(late < 1.01)


def test_pca_variants_standardised_and_whitened():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(300, 8, generator=g) @ torch.diag(torch.arange(1.0, 9.0))
    v = FS.pca_variants(A, A[:50], 3)
    raw, white = v["raw"][0].double(), v["whitened"][0].double()
    assert torch.allclose(raw.var(0), torch.ones(3, dtype=torch.float64), atol=1e-4)
    ratio = torch.tensor(v["explained_ratio"], dtype=torch.float64)
    assert torch.allclose(white.var(0), 1 / ratio, rtol=1e-4)


def test_feature_net_shapes_and_resume(tmp_path):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 3, 16, 16, generator=g) * 2 - 1
    y = torch.arange(40) % 10
    cfg = dict(seed=0, net_width=4, net_epochs=1, net_lr=1e-3, net_batch=16)
    ckpt = tmp_path / "net.pt"
    model, losses = FS.train_feature_net(x, y, cfg, checkpoint=ckpt, progress=False)
    assert model.features(x).shape == (40, 16) and model(x).shape == (40, 10) and len(losses) == 1
    # A second epoch resumes from the checkpoint: the first epoch's loss is kept, not recomputed.
    _, losses2 = FS.train_feature_net(x, y, {**cfg, "net_epochs": 2}, checkpoint=ckpt, progress=False)
    assert losses2[0] == losses[0] and len(losses2) == 2


def test_scarcity_plugin_side_is_the_exact_field():
    # Identical supports and noise for both fields: a "learned" model that is the plug-in gives ratio 1.
    class PlugIn(conditioner.SupportConditionedVelocity):
        def forward(self, x, t, support):
            return conditioner.support_velocity(x, t, support, 0.01)

    g = torch.Generator().manual_seed(4)
    Z = torch.randn(60, 3, generator=g)
    labels = torch.arange(60) % 2
    cfg = dict(sigma_min=0.01, support_sizes=[2, 5], seed=0, eval_repeats=1, n_generated=12, ode_steps=5)
    rows = FS.scarcity_eval(PlugIn(3, width=8, heads=2, layers=1), Z, labels, cfg)
    assert np.allclose(rows["ratio"], 1.0) and rows["mmd2_learned"] == rows["mmd2_plugin"]


def test_dinov2_loads_a_local_checkpoint_or_says_why(tmp_path, monkeypatch):
    # A state dict with the official keys (random values here) at NWFLOW_DINOV2_WEIGHTS is loaded
    # strictly and reported as pretrained; a broken file gives no model and a message naming the
    # variable (offline machines never reach the hub in this test: a local file always wins).
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(dinov2.vit_small14().state_dict(), path)
    monkeypatch.setenv("NWFLOW_DINOV2_WEIGHTS", str(path))
    model, note = FS._try_dinov2(torch.device("cpu"))
    assert model is not None and model.pretrained and str(path) in note
    path.write_bytes(b"not a checkpoint")
    model, note = FS._try_dinov2(torch.device("cpu"))
    assert model is None and "NWFLOW_DINOV2_WEIGHTS" in note and str(path) in note


@needs_data
def test_smoke_run_writes_results(tmp_path, monkeypatch):
    monkeypatch.setenv("NWFLOW_RESULTS_DIR", str(tmp_path))
    out = FS.main(["--preset", "smoke", "--device", "cpu", "--no-progress",
                   "--checkpoint-dir", str(tmp_path)])
    assert out == tmp_path / "feature_space_smoke.json"
    res = json.loads(out.read_text())
    assert res["provenance"]["device"] == "cpu" and res["features"]["feature_source"] == "trained-cnn"
    assert "NOT DINOv2" in res["features"]["feature_note"]
    row = res["collapse"]["8"]
    assert row["dim"] == 192 and len(row["t_measured"]) == 2 and all(0 < t < 1 for t in row["t_measured"])
    assert len(res["features"]["neff"]["16"]["raw"]) == 10
    for name in ("raw", "whitened"):
        assert len(res["scarcity"][name]["ratio"]) == 2
