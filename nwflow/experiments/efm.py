r"""Empirical flow matching at scale: the runs of chapter 6 on real images, for a GPU.

Book: Part II, chapter 6 (``book/part2_papers/06_empirical_flow_matching``), after
Bertrand et al. (arXiv 2506.03719), Figures 1a, 1c, 2, 3 and 4. The chapter runs a small
CPU version itself; this entry point runs the same measurements at the paper's image size:

1. alignment of the closed-form velocity with the conditional target (cosine over t) on
   CIFAR-10 (all 50,000 training images) and on Imagenette at several resolutions;
2. per training-set size n, a (preconditioned) U-Net trained with CFM, plus EFM-M models at
   one n (``efm_m``: the paper's Algorithm 2, M references per row; ``efm_batch_m``: the
   authors' released scheme, the batch's x1 plus M draws, ``TargetSampler(references="batch")``,
   named ``EFM-<M>b``): loss curve, error to the closed form over t, nearest-training-image distances of
   generated samples against the training set's leave-one-out spacing, memorisation rate;
3. the hybrid sampler (closed form on [0, tau), the CFM network after) for the largest n.

Presets: ``smoke`` (seconds on a CPU: tests); ``cpu`` (a reduced run, not the paper's: 8 x 8
images, n up to 1,000, five small U-Nets of 2,000 steps each, about 0.1-0.16 s a step on one
CPU thread, so 20-30 minutes of training; the alignment on 5,000 CIFAR-10 and 1,000 Imagenette
images); ``gpu`` (the paper's scale: all 50,000 CIFAR-10 images at 32 x 32, n up to 50,000,
20,000 steps per model). Run it as

    python -m nwflow.experiments.efm --preset gpu --device cuda

which writes :func:`result_path` of the preset (``book/results/gpu/efm_gpu.json``) and keeps
resumable checkpoints in ``nwflow.settings.cache_dir("efm")``. It needs the CIFAR-10 and
Imagenette copies of ``NWFLOW_DATA_DIR`` (see ``nwflow.data``). The JSON holds the
configuration, the measurements and a provenance block (git commit, command line, machine,
versions, wall time); the chapter displays it with :func:`plot_results` when present.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nwflow.data import load_cifar10, load_imagenette
from nwflow.efm import TargetSampler, alignment, field_error, hybrid_samples
from nwflow.empirical import EmpiricalField
from nwflow.experiments import _runner
from nwflow.metrics import leave_one_out_distance, memorisation_rate, nearest_neighbour_distance
from nwflow.models import PreconditionedVelocity, UNet
from nwflow.solvers import integrate
from nwflow.train import train_velocity

__all__ = ["PRESETS", "preset", "result_path", "run_experiment", "plot_results", "main"]

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(cifar_limit=400, align_pairs=16, align_times=[0.0, 0.2, 0.6], nette_sizes=[8, 16],
                  nette_limit=200, resolution=8, n_list=[10, 40], n_efm=40, efm_m=[4], efm_batch_m=[4],
                  steps=6, batch=8,
                  unet_base=8, unet_mults=[1, 2], n_generated=12, err_pairs=16,
                  err_times=[0.1, 0.5, 0.9], taus=[0.0, 0.5, 1.0], ode_steps=10),
    "cpu": dict(cifar_limit=5000, align_pairs=256,
                align_times=[0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9],
                nette_sizes=[8, 16, 32, 64], nette_limit=1000, resolution=8, n_list=[10, 100, 1000],
                n_efm=1000, efm_m=[16, 128], efm_batch_m=[], steps=2000, batch=128, unet_base=16,
                unet_mults=[1, 2],
                n_generated=256, err_pairs=512, err_times=[0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95],
                taus=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0], ode_steps=50),
    "gpu": dict(cifar_limit=None, align_pairs=256,
                align_times=[0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
                nette_sizes=[8, 16, 32, 64], nette_limit=None, resolution=32,
                n_list=[10, 100, 1000, 10000, 50000], n_efm=50000, efm_m=[16, 128], efm_batch_m=[128],
                steps=20000, batch=128,
                unet_base=64, unet_mults=[1, 2, 2], n_generated=256, err_pairs=512,
                err_times=[0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98],
                taus=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], ode_steps=100),
}
COMMON: dict[str, Any] = dict(lr=2e-4, seed=0, eval_seed=1000, precondition=True)


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The configuration of preset ``name`` ("smoke", "cpu", "gpu") with ``overrides`` applied."""
    return _runner.configure(PRESETS, COMMON, name, overrides)


def result_path(name: str) -> Path:
    """Where the results of preset ``name`` are written and read, e.g. ``book/results/gpu/efm_gpu.json``."""
    return _runner.result_path("efm", name)


def _frac(cos: torch.Tensor) -> list[float]:
    return (cos > 0.9).double().mean(1).tolist()


def _model(config: dict[str, Any], support: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(config["seed"])
    net = UNet(channels=support.shape[1], base=config["unet_base"], mults=tuple(config["unet_mults"]))
    if config["precondition"]:
        return PreconditionedVelocity(net, float(support.mean()), float(support.std()))
    return net


def run_experiment(config: dict[str, Any], device: str | torch.device = "cpu", root: str | None = None,
                   checkpoint_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the measurements of ``config`` on ``device``; returns the JSON-ready results.

    ``root``: the data folder (None: ``NWFLOW_DATA_DIR``). ``checkpoint_dir``: the folder of
    each model's training checkpoint, ``efm_<n>_<target>-<config hash>.pt``, written atomically
    and resumed from on a rerun (None: ``nwflow.settings.cache_dir("efm")``).
    """
    device = torch.device(device)
    start = time.time()
    g = torch.Generator().manual_seed(config["eval_seed"])
    times = torch.tensor(config["align_times"], dtype=torch.float64)
    cifar, _ = load_cifar10(root, limit=config["cifar_limit"], progress=progress)
    cifar = cifar.to(device)
    B = config["align_pairs"]
    idx = torch.randint(len(cifar), (B,), generator=g).to(device)
    cos = alignment(cifar, times, torch.randn((B,) + tuple(cifar.shape[1:]), generator=g).to(device), idx)
    results: dict[str, Any] = {"config": config, "alignment": {
        "cifar10": {"n": len(cifar), "times": config["align_times"], "frac_above_0.9": _frac(cos),
                    "mean_cos": cos.mean(1).tolist()}, "imagenette": {}}}
    for side in config["nette_sizes"]:
        imgs, _ = load_imagenette(root, size=side, limit=config["nette_limit"], progress=progress)
        imgs = imgs.to(device)
        idx = torch.randint(len(imgs), (B,), generator=g).to(device)
        cos = alignment(imgs, times, torch.randn((B, 3, side, side), generator=g).to(device), idx)
        results["alignment"]["imagenette"][str(side)] = {"n": len(imgs), "d": 3 * side * side,
                                                          "frac_above_0.9": _frac(cos)}

    pool = 32 // config["resolution"]
    images = F.avg_pool2d(cifar, pool) if pool > 1 else cifar
    runs = ([(n, None, "uniform") for n in config["n_list"]]
            + [(config["n_efm"], m, "uniform") for m in config["efm_m"]]
            + [(config["n_efm"], m, "batch") for m in config["efm_batch_m"]])
    err_times = torch.tensor(config["err_times"], dtype=torch.float64)
    noise = torch.randn((config["n_generated"],) + tuple(images.shape[1:]), generator=g).to(device)
    training, models = [], {}
    for n, m, scheme in runs:
        sup = images[:n].contiguous()
        kind = "CFM" if m is None else f"EFM-{m}" + ("b" if scheme == "batch" else "")
        model = _model(config, sup).to(device)
        train_config = {k: config[k] for k in ("steps", "batch", "lr", "seed", "unet_base", "unet_mults",
                                               "resolution", "precondition")}
        ckpt = _runner.checkpoint_file(checkpoint_dir, "efm", f"efm_{n}_{kind}", train_config)
        t0 = time.time()
        sampler = TargetSampler(sup, config["batch"], m=m, references=scheme)
        hist = train_velocity(model, sampler, config["steps"], lr=config["lr"], seed=config["seed"],
                              checkpoint=ckpt, progress=progress, desc=f"{kind} n={n}", config=train_config)
        train_s = time.time() - t0
        with torch.no_grad():
            samples = integrate(model, noise, steps=config["ode_steps"])
        d1, _ = nearest_neighbour_distance(samples, sup)
        pairs = config["err_pairs"]
        x0 = torch.randn((pairs,) + tuple(sup.shape[1:]), generator=g).to(device)
        err = field_error(model, sup, err_times, x0, torch.randint(n, (pairs,), generator=g).to(device))
        loss = hist["loss"]
        training.append({"n": n, "target": kind, "train_seconds": train_s,
                         "loss_every_10": [float(np.mean(loss[i:i + 10])) for i in range(0, len(loss), 10)],
                         "field_error": err.tolist(), "d1_mean": float(d1.mean()),
                         "loo_mean": float(leave_one_out_distance(sup).mean()),
                         "memorisation_rate": memorisation_rate(samples, sup)})
        models[(n, kind)] = model
    results["training"] = training

    n_h = max(config["n_list"])
    sup = images[:n_h].contiguous()
    field = EmpiricalField(sup)
    with torch.no_grad():
        hyb = hybrid_samples(field.velocity, models[(n_h, "CFM")], noise, config["taus"],
                             steps=config["ode_steps"])
    _, idx_cf = nearest_neighbour_distance(hyb[-1], sup)
    d_tau, decided = [], []
    for k in range(len(config["taus"])):
        d, i = nearest_neighbour_distance(hyb[k], sup)
        d_tau.append(float(d.mean()))
        decided.append(float((i == idx_cf).double().mean()))
    results["hybrid"] = {"n": n_h, "taus": config["taus"], "d1_mean": d_tau, "decided": decided,
                         "loo_mean": float(leave_one_out_distance(sup).mean())}
    results["wall_seconds"] = time.time() - start
    return results


def plot_results(results: dict[str, Any]):
    """The four panels of a results JSON: alignment (CIFAR-10 and Imagenette), error to the
    closed form over t, memorisation against n, and the hybrid sweep. Returns the figure."""
    import matplotlib.pyplot as plt

    cfg = results["config"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    al = results["alignment"]
    axes[0].plot(al["cifar10"]["times"], al["cifar10"]["frac_above_0.9"], "o-", color="tab:red",
                 label=f"CIFAR-10 (n = {al['cifar10']['n']:,})")
    for side, rec in al["imagenette"].items():
        axes[0].plot(al["cifar10"]["times"], rec["frac_above_0.9"], ".--", label=f"Imagenette {side}x{side}")
    axes[0].set_xlabel("$t$")
    axes[0].set_ylabel(r"fraction with $\cos_t > 0.9$")
    axes[0].set_title("Closed form vs conditional target")
    axes[0].legend(fontsize=7)
    for rec in results["training"]:
        axes[1].plot(cfg["err_times"], rec["field_error"], "o-" if rec["target"] == "CFM" else "--",
                     label=f"{rec['target']}, n = {rec['n']:,}")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("$t$")
    axes[1].set_ylabel("$e(t)$")
    axes[1].set_title("Learned field vs closed form")
    axes[1].legend(fontsize=7)
    cfm = [r for r in results["training"] if r["target"] == "CFM"]
    axes[2].plot([r["n"] for r in cfm], [r["d1_mean"] for r in cfm], "o-", color="black",
                 label="generated: $d_1$")
    axes[2].plot([r["n"] for r in cfm], [r["loo_mean"] for r in cfm], "s--", color="grey",
                 label="training set: LOO NN distance")
    for r in results["training"]:
        if r["target"] != "CFM":
            axes[2].plot([r["n"]], [r["d1_mean"]], "*", ms=10, label=f"{r['target']} samples")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("training-set size $n$")
    axes[2].set_ylabel("mean Euclidean distance")
    axes[2].set_title("Memorisation against $n$")
    axes[2].legend(fontsize=7)
    hy = results["hybrid"]
    axes[3].plot(hy["taus"], hy["d1_mean"], "o-", color="black", label="distance to nearest training image")
    axes[3].axhline(hy["loo_mean"], color="grey", ls="--", label="training set LOO NN distance")
    ax2 = axes[3].twinx()
    ax2.plot(hy["taus"], hy["decided"], "s:", color="tab:red")
    ax2.set_ylabel("decided (share)", color="tab:red")
    axes[3].set_xlabel(r"switching time $\tau$")
    axes[3].set_ylabel("mean distance")
    axes[3].set_title(f"Hybrid sampler, n = {hy['n']:,}")
    axes[3].legend(fontsize=7)
    prov = results.get("provenance", {})
    fig.suptitle(f"EFM runs, preset {cfg['preset']!r}, {cfg['resolution']}x{cfg['resolution']} images, "
                 f"device {prov.get('device_name', '?')}", y=1.03)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> Path:
    """Command-line entry point; returns the path of the written JSON."""
    parser = _runner.parser(__doc__.split("\n", 1)[0], "efm")
    parser.add_argument("--root", default=None, help="data folder (default: NWFLOW_DATA_DIR)")
    args = parser.parse_args(argv)
    results = run_experiment(preset(args.preset), device=args.device, root=args.root,
                             checkpoint_dir=args.checkpoint_dir, progress=not args.no_progress)
    return _runner.write_results(args.out or result_path(args.preset), results, args.device)


if __name__ == "__main__":
    print(main())
