r"""Learned versus plug-in support conditioning on held-out tasks (Part II, chapter 5).

Trains a :class:`nwflow.conditioner.SupportConditionedVelocity` by flow matching over random
tasks (Gaussian mixtures with 2-8 components and concentric shells in d = 8, m = 50 support
points, as in the support-conditioned flow-matching paper), then compares it with the exact
plug-in field of each held-out task's support:

- MMD^2 (unbiased, median-heuristic bandwidth) of generated samples to held-out task samples;
- the held-out flow-matching error E ||v - (x1 - (1 - sigma_min) x0)||^2 at several t;
- the Spearman correlation of each attention head's logits with the Nadaraya-Watson logits,
  and the effective number of neighbours of both, across t.

Presets: ``smoke`` (seconds, tests), ``cpu`` (the book's full mode: 1500 steps, minutes on a
laptop CPU), ``gpu`` (20,000 steps of a wider model, for a GPU). Run it as

    python -m nwflow.experiments.failure_regimes --preset gpu --device cuda

which writes :func:`result_path` of the preset (``book/results/gpu/failure_regimes_conditioner_gpu.json``)
and keeps a resumable checkpoint in ``nwflow.settings.cache_dir("failure_regimes")``. The
JSON holds the configuration, the measurements and a provenance block (git commit, command
line, machine, versions, wall time); the chapter displays it when present. With
``--save-weights`` the trained model's weights (no optimiser state) are also written, with the
configuration's hash and a provenance block, to :func:`weights_path`; the chapter's full mode
loads them through :func:`nwflow.experiments._runner.committed_weights` and evaluates instead
of training when they match its configuration.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nwflow._io import save_torch_atomic
from nwflow.conditioner import (
    FAMILIES,
    SupportConditionedVelocity,
    TaskConfig,
    fm_error_over_t,
    rank_correlation,
    sample_field,
    sample_tasks,
    support_logits,
    support_velocity,
    train_conditioner,
)
from nwflow.experiments import _runner
from nwflow.metrics import mmd2_unbiased
from nwflow.path import sample_xt
from nwflow.provenance import provenance
from nwflow.settings import config_hash

__all__ = ["PRESETS", "preset", "result_path", "weights_path", "save_weights", "run_experiment", "main"]

STEM = "failure_regimes_conditioner"

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=40, n_tasks=8, width=64, heads=4, layers=2, eval_tasks=4, n_generated=200,
                  ode_steps=50, probe_queries=32),
    "cpu": dict(steps=1500, n_tasks=16, width=64, heads=4, layers=2, eval_tasks=20, n_generated=500,
                ode_steps=100, probe_queries=64),
    "gpu": dict(steps=20000, n_tasks=64, width=128, heads=4, layers=3, eval_tasks=100, n_generated=500,
                ode_steps=100, probe_queries=128),
}
COMMON: dict[str, Any] = dict(dim=8, support_size=50, query_size=64, sigma_min=0.01, lr=1e-3,
                              exact_head=True, seed=0, eval_seed=1000,
                              times=[0.1, 0.3, 0.5, 0.7, 0.9, 0.97])


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The configuration of preset ``name`` ("smoke", "cpu", "gpu") with ``overrides`` applied.

    ``families`` (a subset of ``nwflow.conditioner.FAMILIES``, trained on and evaluated) is
    stored only when it is not both families, so the configuration, its checkpoint hash and
    the committed results of a two-family run stay what they were before the key existed.
    """
    families = overrides.pop("families", None)
    config = _runner.configure(PRESETS, COMMON, name, overrides)
    if families is not None:
        families = list(families)
        if not families or any(f not in FAMILIES for f in families):
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {families!r}")
        if tuple(sorted(set(families))) != tuple(sorted(FAMILIES)):
            config["families"] = families
    return config


def result_path(name: str, **overrides: Any) -> Path:
    """Where the results of ``preset(name, **overrides)`` are written and read, e.g.
    ``book/results/failure_regimes_conditioner_cpu.json`` (``_no_exact_head`` appended without
    the exact head, ``_shells`` for a shells-only run)."""
    config = preset(name, **overrides)
    variant = "" if config["exact_head"] else "_no_exact_head"
    if "families" in config:
        variant += "_" + "_".join(config["families"])
    return _runner.result_path(STEM, name, variant)


def weights_path(name: str, **overrides: Any) -> Path:
    """Where the trained weights of ``preset(name, **overrides)`` are committed: the
    :func:`result_path` with ``_weights.pt`` in place of ``.json``."""
    path = result_path(name, **overrides)
    return path.with_name(path.stem + "_weights.pt")


def save_weights(path: str | os.PathLike, model: SupportConditionedVelocity, config: dict[str, Any],
                 device: str = "cpu", **extra: Any) -> Path:
    """Write ``model``'s weights (its ``state_dict``, no optimiser state) for ``config`` to ``path``.

    The file (``torch.save``, readable with ``weights_only=True``) holds ``state_dict``,
    ``config``, ``config_hash`` (what :func:`nwflow.experiments._runner.committed_weights`
    matches), a ``provenance`` block and any JSON-ready ``extra`` fields (e.g. the training
    time).
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # Plain JSON types only (the torch version is a str subclass), so weights_only=True loads it.
    meta = json.loads(json.dumps({"config": config, "config_hash": config_hash(config),
                                  "provenance": provenance(device=device), **extra}, default=str))
    return save_torch_atomic(path, {"state_dict": state, **meta})


def run_experiment(config: dict[str, Any], device: str | torch.device = "cpu",
                   checkpoint: str | os.PathLike | None = None, progress: bool = True,
                   weights: dict[str, torch.Tensor] | None = None,
                   ) -> tuple[SupportConditionedVelocity, dict[str, Any]]:
    """Train (or resume) the conditioner of ``config`` and evaluate it on held-out tasks.

    With ``weights`` (a state dict of the model ``config`` builds, e.g. from
    :func:`nwflow.experiments._runner.committed_weights`) nothing is trained: the model is
    loaded and evaluated, ``train_seconds`` is 0, ``loss_every_10`` is empty and
    ``"weights_loaded"`` is True.

    Returns ``(model, results)``; ``results`` is JSON-ready: the loss curve (every 10th
    step), and per family of ``config["families"]`` (trained on and evaluated; both
    "mixture" and "shells" by default) the per-task MMD^2 of learned and plug-in
    samples, the flow-matching error at ``config["times"]``, and per layer and head the mean
    Spearman rho with the NW logits and the mean n_eff of attention and NW weights.
    """
    device = torch.device(device)
    start = time.time()
    # Results written before ``families`` existed trained and evaluated both families.
    families_used = tuple(config.get("families", FAMILIES))
    task = TaskConfig(dim=config["dim"], support_size=config["support_size"], query_size=config["query_size"],
                      families=families_used)
    torch.manual_seed(config["seed"])
    model = SupportConditionedVelocity(task.dim, width=config["width"], heads=config["heads"],
                                       layers=config["layers"], exact_head=config["exact_head"],
                                       sigma_min=config["sigma_min"]).to(device)
    if weights is None:
        history = train_conditioner(model, task, config["steps"], n_tasks=config["n_tasks"], lr=config["lr"],
                                    seed=config["seed"], checkpoint=checkpoint, progress=progress)
    else:
        model.load_state_dict(weights)
        history = {"loss": []}
    train_s = time.time() - start
    model.eval()
    sm = config["sigma_min"]

    def plug_in(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return support_velocity(x, t, s, sm)

    families: dict[str, Any] = {}
    for k, family in enumerate(FAMILIES):
        if family not in families_used:
            continue
        g = torch.Generator().manual_seed(config["eval_seed"] + k)
        n_gen = config["n_generated"]
        support, heldout, _ = sample_tasks(task, config["eval_tasks"], n_gen, g, family=family)
        support, heldout = support.to(device), heldout.to(device)
        noise_seed, err_seed = config["eval_seed"] + 10 + k, config["eval_seed"] + 20 + k
        learned = sample_field(model, support, n_gen, torch.Generator().manual_seed(noise_seed),
                               steps=config["ode_steps"])
        plugin = sample_field(plug_in, support, n_gen, torch.Generator().manual_seed(noise_seed),
                              steps=config["ode_steps"])
        mmd_l = [mmd2_unbiased(learned[i].cpu(), heldout[i].cpu()) for i in range(len(support))]
        mmd_p = [mmd2_unbiased(plugin[i].cpu(), heldout[i].cpu()) for i in range(len(support))]
        times = config["times"]
        fm_l = fm_error_over_t(model, support, heldout, times, torch.Generator().manual_seed(err_seed), sm)
        fm_p = fm_error_over_t(plug_in, support, heldout, times, torch.Generator().manual_seed(err_seed), sm)
        probe = _attention_probe(model, support, heldout[:, :config["probe_queries"]], config["times"], sm,
                                 torch.Generator().manual_seed(config["eval_seed"] + 30 + k))
        families[family] = {"mmd2_learned": mmd_l, "mmd2_plugin": mmd_p, "fm_error_learned": fm_l.tolist(),
                            "fm_error_plugin": fm_p.tolist(), **probe}
    loss = history["loss"]
    results = {"config": config, "task": asdict(task), "train_seconds": train_s if weights is None else 0.0,
               "weights_loaded": weights is not None,
               "loss_every_10": [float(np.mean(loss[i:i + 10])) for i in range(0, len(loss), 10)],
               "families": families, "wall_seconds": time.time() - start}
    return model, results


@torch.no_grad()
def _attention_probe(model: SupportConditionedVelocity, support: torch.Tensor, x1: torch.Tensor,
                     times: list[float], sigma_min: float, generator: torch.Generator) -> dict[str, Any]:
    """Spearman rho (attention logits vs NW logits over the support) and n_eff, per t, layer, head."""
    rho, neff_heads, neff_nw = [], [], []
    for t in times:
        x0 = torch.randn(x1.shape, generator=generator).to(x1.device)
        xt = sample_xt(x0, x1, t, sigma_min)
        nw = support_logits(xt, t, support, sigma_min)                       # (T, N, m)
        logits = model.attention_logits(xt, t, support)                      # layers x (T, H, N, m)
        nw_np = nw[:, None].cpu().numpy()
        rho.append([np.nanmean(rank_correlation(nw_np, lg.double().cpu().numpy()), axis=(0, 2)).tolist()
                    for lg in logits])
        neff_heads.append([(1.0 / torch.softmax(lg.double(), -1).square().sum(-1)).mean((0, 2)).cpu().tolist()
                           for lg in logits])
        neff_nw.append(float((1.0 / torch.softmax(nw, -1).square().sum(-1)).mean()))
    return {"spearman": rho, "neff_heads": neff_heads, "neff_nw": neff_nw}


def main(argv: list[str] | None = None) -> Path:
    """Command-line entry point; returns the path of the written JSON."""
    parser = _runner.parser(__doc__.split("\n", 1)[0], "failure_regimes")
    parser.add_argument("--no-exact-head", action="store_true", help="train without the exact NW input")
    parser.add_argument("--save-weights", action="store_true",
                        help="also write the trained weights (no optimiser state) to weights_path(preset)")
    args = parser.parse_args(argv)
    config = preset(args.preset, exact_head=not args.no_exact_head)
    checkpoint = _runner.checkpoint_file(args.checkpoint_dir, "failure_regimes", "conditioner", config)
    model, results = run_experiment(config, device=args.device, checkpoint=checkpoint,
                                    progress=not args.no_progress)
    out = args.out or result_path(args.preset, exact_head=config["exact_head"])
    if args.save_weights:
        save_weights(Path(out).with_name(Path(out).stem + "_weights.pt"), model, config, args.device,
                     train_seconds=results["train_seconds"])
    return _runner.write_results(out, results, args.device)


if __name__ == "__main__":
    print(main())
