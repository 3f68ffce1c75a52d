r"""Three sweeps of the support-conditioned flow-matching paper at reduced scale (Part II, chapter 5).

Each trains :class:`nwflow.conditioner.SupportConditionedVelocity` with
:func:`nwflow.experiments.failure_regimes.run_experiment` (or its building blocks) and compares
it with the exact plug-in field, at a small fraction of the paper's training budget (the JSON
records the configuration; the chapter states the fraction):

- ``exact_head``: the exact head switched on and off on Gaussian-mixture tasks in
  d in ``dims`` (the paper's Figure 1a: benefit = (MMD^2 off - MMD^2 on) / MMD^2 off), which
  also gives the learned/plug-in ratio of mixtures at d = 16;
- ``shells``: shells-only tasks in d = ``shells_dim`` (the paper's shells at d = 32);
- ``heads``: the number of heads H (exact head off, mixtures, d = 8) against the support
  size m: each model is trained at m = ``support_size`` and evaluated at every m of
  ``eval_support_sizes`` (the paper trains one model per (H, m); its Figure 1c), with the
  exponent alpha of a fit MMD^2 ~ m^(-alpha).

Presets: ``smoke`` (seconds, tests), ``cpu`` (the book's committed result, tens of minutes on a
2-core CPU), ``gpu``. Run it as

    python -m nwflow.experiments.conditioner_sweeps --preset cpu

which writes ``book/results/conditioner_sweeps_cpu.json`` with a provenance block.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from nwflow.conditioner import (
    SupportConditionedVelocity,
    TaskConfig,
    sample_field,
    sample_tasks,
    support_velocity,
    train_conditioner,
)
from nwflow.experiments import _runner, failure_regimes
from nwflow.metrics import mmd2_unbiased

__all__ = ["PRESETS", "PARTS", "preset", "result_path", "run_experiment", "main"]

STEM = "conditioner_sweeps"

_TRAIN = dict(n_tasks=16, width=64, layers=2, lr=3e-3, eval_tasks=10, n_generated=300, ode_steps=50,
              probe_queries=16)
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=4, dims=[2, 4], shells_dim=8, shells_steps=4, head_counts=[1, 2], heads_steps=4,
                  eval_support_sizes=[5, 10], **{**_TRAIN, "n_tasks": 2, "width": 8, "eval_tasks": 2,
                                                 "n_generated": 16, "ode_steps": 5, "probe_queries": 4}),
    "cpu": dict(steps=300, dims=[2, 4, 8, 16], shells_dim=32, shells_steps=400, head_counts=[1, 4, 16],
                heads_steps=300, eval_support_sizes=[5, 10, 25, 50], **_TRAIN),
    "gpu": dict(steps=20000, dims=[2, 4, 8, 16], shells_dim=32, shells_steps=20000,
                head_counts=[1, 2, 4, 8, 16], heads_steps=20000, eval_support_sizes=[5, 10, 25, 50, 100, 250],
                **{**_TRAIN, "n_tasks": 64, "width": 128, "layers": 3, "lr": 1e-3, "eval_tasks": 100,
                   "n_generated": 500, "ode_steps": 100}),
}
COMMON: dict[str, Any] = dict(support_size=50, query_size=64, sigma_min=0.01, heads=4, seed=0, eval_seed=1000,
                              times=[0.1, 0.5, 0.9])


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The configuration of preset ``name`` ("smoke", "cpu", "gpu") with ``overrides`` applied."""
    return _runner.configure(PRESETS, COMMON, name, overrides)


def result_path(name: str):
    """``book/results/conditioner_sweeps_<name>.json`` (``gpu/`` for the gpu preset)."""
    return _runner.result_path(STEM, name)


def _regimes_config(config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    keys = ("support_size", "query_size", "sigma_min", "seed", "eval_seed", "times", "steps", "n_tasks",
            "width", "heads", "layers", "lr", "eval_tasks", "n_generated", "ode_steps", "probe_queries")
    return failure_regimes.preset("smoke", **{**{k: config[k] for k in keys}, **overrides})


def _mmd_summary(res: dict[str, Any], family: str) -> dict[str, Any]:
    v = res["families"][family]
    ml, mp = np.array(v["mmd2_learned"]), np.array(v["mmd2_plugin"])
    return {"mmd2_learned": ml.tolist(), "mmd2_plugin": mp.tolist(), "mean_learned": float(ml.mean()),
            "mean_plugin": float(mp.mean()), "ratio": float(mp.mean() / ml.mean()),
            "wins": float((ml < mp).mean()), "fm_error_learned": v["fm_error_learned"],
            "fm_error_plugin": v["fm_error_plugin"], "train_seconds": res["train_seconds"]}


PARTS = ("exact_head", "shells", "heads")


def run_experiment(config: dict[str, Any], device: str | torch.device = "cpu", progress: bool = True,
                   parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Run the sweeps of ``config`` named in ``parts`` (default all three: ``"exact_head"``,
    ``"shells"``, ``"heads"``); JSON-ready results with ``"config"``, ``"wall_seconds"`` and
    one key per part run. A chapter runs one part at a small configuration this way."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts!r}")
    start = time.time()
    out: dict[str, Any] = {"config": config}
    if "exact_head" in parts:
        out["exact_head"] = _exact_head_sweep(config, device, progress)
    if "shells" in parts:
        cfg = _regimes_config(config, dim=config["shells_dim"], steps=config["shells_steps"], exact_head=True,
                              families=["shells"])
        _, res = failure_regimes.run_experiment(cfg, device=device, progress=progress)
        out["shells"] = {"dim": config["shells_dim"], **_mmd_summary(res, "shells")}
    if "heads" in parts:
        out["heads"] = _heads_sweep(config, device, progress)
    out["wall_seconds"] = time.time() - start
    return out


def _exact_head_sweep(config: dict[str, Any], device: str | torch.device, progress: bool) -> dict[str, Any]:
    exact: dict[str, Any] = {}
    for d in config["dims"]:
        row = {}
        for on in (True, False):
            cfg = _regimes_config(config, dim=d, exact_head=on, families=["mixture"])
            _, res = failure_regimes.run_experiment(cfg, device=device, progress=progress)
            row["on" if on else "off"] = _mmd_summary(res, "mixture")
        row["benefit"] = (row["off"]["mean_learned"] - row["on"]["mean_learned"]) / row["off"]["mean_learned"]
        exact[str(d)] = row
    return exact


@torch.no_grad()
def _eval_at_sizes(model: SupportConditionedVelocity, config: dict[str, Any], device: torch.device
                   ) -> tuple[list[float], list[float]]:
    learned, plugin = [], []
    sm = config["sigma_min"]
    for k, m in enumerate(config["eval_support_sizes"]):
        g = torch.Generator().manual_seed(config["eval_seed"] + 100 + k)
        support, heldout, _ = sample_tasks(TaskConfig(dim=8, support_size=m), config["eval_tasks"],
                                           config["n_generated"], g, family="mixture")
        support = support.to(device)
        noise = config["eval_seed"] + 200 + k
        xl = sample_field(model, support, config["n_generated"], torch.Generator().manual_seed(noise),
                          steps=config["ode_steps"]).cpu()
        xp = sample_field(lambda x, t, s: support_velocity(x, t, s, sm), support, config["n_generated"],
                          torch.Generator().manual_seed(noise), steps=config["ode_steps"]).cpu()
        learned.append(float(np.mean([mmd2_unbiased(xl[i], heldout[i]) for i in range(len(xl))])))
        plugin.append(float(np.mean([mmd2_unbiased(xp[i], heldout[i]) for i in range(len(xp))])))
    return learned, plugin


def _alpha(sizes: list[int], values: list[float]) -> float:
    """alpha of a least-squares fit log MMD^2 = c - alpha log m (values clipped at 1e-6)."""
    return float(-np.polyfit(np.log(sizes), np.log(np.maximum(values, 1e-6)), 1)[0])


def _heads_sweep(config: dict[str, Any], device: str | torch.device, progress: bool) -> dict[str, Any]:
    device = torch.device(device)
    task = TaskConfig(dim=8, support_size=config["support_size"], query_size=config["query_size"],
                      families=("mixture",))
    rows: dict[str, Any] = {}
    plugin = None
    for h in config["head_counts"]:
        torch.manual_seed(config["seed"])
        model = SupportConditionedVelocity(8, width=config["width"], heads=h, layers=config["layers"],
                                           exact_head=False, sigma_min=config["sigma_min"]).to(device)
        t0 = time.time()
        train_conditioner(model, task, config["heads_steps"], n_tasks=config["n_tasks"], lr=config["lr"],
                          seed=config["seed"], progress=progress)
        model.eval()
        learned, plugin = _eval_at_sizes(model, config, device)
        rows[str(h)] = {"d_k": config["width"] // h, "mmd2_learned": learned,
                        "alpha": _alpha(config["eval_support_sizes"], learned),
                        "train_seconds": time.time() - t0}
    return {"support_sizes": config["eval_support_sizes"], "by_heads": rows, "mmd2_plugin": plugin,
            "alpha_plugin": _alpha(config["eval_support_sizes"], plugin)}


def main(argv: list[str] | None = None):
    """Command-line entry point; returns the path of the written JSON."""
    parser = _runner.parser(__doc__.split("\n", 1)[0], "conditioner_sweeps")
    args = parser.parse_args(argv)
    config = preset(args.preset)
    results = run_experiment(config, device=args.device, progress=not args.no_progress)
    return _runner.write_results(args.out or result_path(args.preset), results, args.device)


if __name__ == "__main__":
    print(main())
