"""nwflow.experiments._runner: what every experiment shares (presets, CLI, checkpoints, results)."""

import json

import pytest

from nwflow.experiments import _runner as R
from nwflow.experiments import efm, failure_regimes
from nwflow.settings import checkpoint_path, config_hash

PRESETS = {"smoke": {"steps": 1}, "cpu": {"steps": 10}, "gpu": {"steps": 100}}


@pytest.mark.parametrize("module", [efm, failure_regimes])
def test_every_experiment_has_the_three_presets(module):
    assert tuple(module.PRESETS) == R.PRESET_NAMES == ("smoke", "cpu", "gpu")
    assert module.result_path("cpu").parent == module.result_path("gpu").parent.parent


def test_configure_layers_common_preset_overrides():
    config = R.configure(PRESETS, {"lr": 1e-3, "steps": 0}, "cpu", {"lr": 2e-3})
    assert config == {"preset": "cpu", "lr": 2e-3, "steps": 10}
    with pytest.raises(ValueError, match="preset must be one of"):
        R.configure(PRESETS, {}, "fast", {})
    with pytest.raises(ValueError, match=r"unknown configuration keys: \['stepz'\]"):
        R.configure(PRESETS, {}, "cpu", {"stepz": 3})


def test_results_and_checkpoints_are_found_one_way(tmp_path, monkeypatch):
    monkeypatch.setenv("NWFLOW_RESULTS_DIR", str(tmp_path / "res"))
    monkeypatch.setenv("NWFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NWFLOW_FAST", raising=False)
    assert R.result_path("x", "smoke") == tmp_path / "res" / "x_smoke.json"
    assert R.result_path("x", "cpu", "_v") == tmp_path / "res" / "x_cpu_v.json"
    assert R.result_path("x", "gpu") == tmp_path / "res" / "gpu" / "x_gpu.json"
    with pytest.raises(ValueError, match="preset"):
        R.result_path("x", "fast")
    config = {"steps": 3}
    name = f"m-{config_hash(config)}.pt"
    assert R.checkpoint_file(None, "exp", "m", config) == tmp_path / "cache" / "exp" / name
    assert R.checkpoint_file(None, "exp", "m", config) == checkpoint_path("exp", "m", config)
    assert R.checkpoint_file(tmp_path / "ck", "exp", "m", config) == tmp_path / "ck" / name
    assert R.checkpoint_file(None, "exp", "m", {"steps": 4}).name != name   # never stale


def test_parser_and_write_results(tmp_path, monkeypatch):
    args = R.parser("demo", "exp").parse_args(["--preset", "gpu", "--device", "cpu", "--no-progress",
                                               "--checkpoint-dir", "ck", "--out", "o.json"])
    assert (args.preset, args.device, args.no_progress, args.checkpoint_dir, args.out) == (
        "gpu", "cpu", True, "ck", "o.json")
    with pytest.raises(SystemExit):
        R.parser("demo", "exp").parse_args(["--preset", "fast"])
    monkeypatch.setattr("sys.argv", ["python -m nwflow.experiments.demo", "--preset", "smoke"])
    results = {"config": {"preset": "smoke"}, "wall_seconds": 2.0, "value": [1, 2]}
    out = R.write_results(tmp_path / "r.json", results, "cpu")
    data = json.loads(out.read_text())
    assert data["config"] == {"preset": "smoke"} and data["value"] == [1, 2]
    prov = data["provenance"]
    assert "config" not in prov and prov["wall_time_s"] == 2.0 and prov["device"] == "cpu"
    assert prov["command"] == ["python -m nwflow.experiments.demo", "--preset", "smoke"]
    with pytest.raises(ValueError, match="config"):
        R.write_results(tmp_path / "s.json", {"wall_seconds": 1.0}, "cpu")
    assert not (tmp_path / "s.json").exists()


def test_committed_weights_match_the_config_hash(tmp_path):
    import torch

    config = {"steps": 3}
    path = tmp_path / "w.pt"
    assert R.committed_weights(path, config) is None                       # missing
    torch.save({"state_dict": {"a": torch.ones(2)}, "config_hash": config_hash(config)}, path)
    assert torch.equal(R.committed_weights(path, config)["a"], torch.ones(2))
    assert R.committed_weights(path, {"steps": 4}) is None                 # another configuration
