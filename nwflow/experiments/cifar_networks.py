r"""U-Nets on 32 x 32 CIFAR-10 against the closed form: approximation, memorisation, sample quality.

Book: Part III, chapter 10 (``book/part3_scale/10_cifar10_closed_form``), sections 5-8, after
Bertrand et al. (arXiv 2506.03719), Figures 2, 3 and 4; chapter 6 runs the same measurements
at 8 x 8. Per training-set size n, a preconditioned U-Net (``nwflow.models.UNet``) trained
with the CFM target, plus EFM-M models (``nwflow.efm.TargetSampler(m=M)``, the paper's
Algorithm 2) at one n; then, for every model, from the same noise:

1. the error to the closed form over t (``nwflow.efm.field_error``; paper Figure 2, left);
2. the distance of its samples to their nearest training image beside the training set's
   leave-one-out spacing, and the memorisation rate (paper Figure 2, right);
3. sample quality against held-out images: the Frechet distance and the squared MMD in the
   features of a CIFAR-10 classifier that this runner trains itself (``FeatureNet`` of
   ``nwflow.experiments.feature_space``; "FD in our classifier's features", not FID), with
   the classifier's accuracy on the CIFAR-10 test split, and reference rows (training
   images, Gaussian noise) measured the same way (paper Figure 4 uses FID);
4. the hybrid sampler (closed form on [0, tau), the CFM network after) for the largest n
   (paper Figure 3).

Presets: ``smoke`` (seconds: tests and the chapter's fast mode); ``cpu`` (what the chapter's
committed results and weights come from: n in {10, 100, 1000}, EFM-128/256/1000 at n = 1000,
small U-Nets of 1,000 steps at lr 1e-3; the committed run took 36 minutes on one CPU thread
shared with other jobs, plus 3.5 minutes for the classifier); ``gpu`` (n up to 50,000, wider
U-Nets, 5,000 steps each, sized for 10 minutes from the flop count but not yet run or timed on
a GPU). Run it as

    python -m nwflow.experiments.cifar_networks --preset cpu

It writes :func:`result_path` of the preset (``book/results/cifar_networks_cpu.json``, with a
provenance block) and, with ``--save-weights``, every trained network in float16 with the
hash of the training configuration (:func:`weights_path`), which the chapter loads instead of
training (:func:`load_weights`). Training checkpoints are resumable, in
``nwflow.settings.cache_dir("cifar_networks")`` by default.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nwflow.data import load_cifar10
from nwflow.efm import TargetSampler, field_error, hybrid_samples
from nwflow.empirical import EmpiricalField
from nwflow.experiments import _runner
from nwflow.experiments.feature_space import FeatureNet, train_feature_net
from nwflow.metrics import (
    frechet_distance,
    leave_one_out_distance,
    median_distance,
    memorisation_rate,
    mmd2_unbiased,
    nearest_neighbour_distance,
)
from nwflow.models import PreconditionedVelocity, UNet
from nwflow.provenance import git_commit
from nwflow.settings import config_hash
from nwflow.solvers import integrate
from nwflow.train import train_velocity

__all__ = ["PRESETS", "preset", "result_path", "weights_path", "training_config", "run_names",
           "load_weights", "run_experiment", "plot_results", "main"]

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(n_list=[10, 100], n_efm=100, efm_m=[16], steps=12, batch=16, unet_base=8,
                  unet_mults=[1, 2], clf_train=500, net_epochs=1, test_limit=100, n_generated=32,
                  err_pairs=16, err_times=[0.05, 0.2, 0.5, 0.9], taus=[0.0, 0.5, 1.0], ode_steps=10),
    "cpu": dict(n_list=[10, 100, 1000], n_efm=1000, efm_m=[128, 256, 1000], steps=1000, batch=64, lr=1e-3,
                unet_base=8, unet_mults=[1, 2], clf_train=15000, net_epochs=3, test_limit=2000,
                n_generated=256, err_pairs=256,
                err_times=[0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 0.9, 0.95],
                taus=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0], ode_steps=40),
    # Sized, not timed (no GPU was at hand): a base-64 U-Net step at batch 128 is 446 GFLOP
    # forward and backward (torch's flop counter), a few ms on an H100/H200 with TF32
    # convolutions; eight networks of 5,000 steps then take about 4-8 minutes of the 10.
    "gpu": dict(n_list=[10, 100, 1000, 10000, 50000], n_efm=50000, efm_m=[128, 256, 1000], steps=5000,
                batch=128, unet_base=64, unet_mults=[1, 2, 2], clf_train=50000, net_epochs=15,
                test_limit=10000, n_generated=2048, err_pairs=512,
                err_times=[0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
                taus=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], ode_steps=100),
}
COMMON: dict[str, Any] = dict(lr=2e-4, seed=0, eval_seed=1000, precondition=True, net_width=32,
                              net_lr=2e-3, net_batch=128)
_TRAIN_KEYS = ("n_list", "n_efm", "efm_m", "steps", "batch", "unet_base", "unet_mults", "lr", "seed",
               "precondition", "clf_train", "net_epochs", "net_width", "net_lr", "net_batch")


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The configuration of preset ``name`` ("smoke", "cpu", "gpu") with ``overrides`` applied."""
    return _runner.configure(PRESETS, COMMON, name, overrides)


def result_path(name: str) -> Path:
    """Where the results of preset ``name`` are written and read
    (``book/results/cifar_networks_cpu.json``; the gpu preset's in ``gpu/``)."""
    return _runner.result_path("cifar_networks", name)


def weights_path(name: str) -> Path:
    """Where the trained weights of preset ``name`` are committed: the results file's name with
    ``_weights.pt`` (``book/results/cifar_networks_cpu_weights.pt``)."""
    p = result_path(name)
    return p.with_name(p.stem + "_weights.pt")


def training_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of ``config`` that determines the trained weights (its hash names checkpoints and
    is stored with committed weights): sizes, targets, networks, optimiser, seeds."""
    return {k: config[k] for k in _TRAIN_KEYS}


def run_names(config: dict[str, Any]) -> list[tuple[int, int | None, str]]:
    """``(n, M or None, name)`` of every network of ``config``: ``CFM_n<n>`` per n, then
    ``EFM-<M>_n<n_efm>``."""
    runs = [(n, None, f"CFM_n{n}") for n in config["n_list"]]
    return runs + [(config["n_efm"], m, f"EFM-{m}_n{config['n_efm']}") for m in config["efm_m"]]


def _velocity_net(config: dict[str, Any], support: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(config["seed"])
    net = UNet(channels=support.shape[1], base=config["unet_base"], mults=tuple(config["unet_mults"]))
    if config["precondition"]:
        return PreconditionedVelocity(net, float(support.mean()), float(support.std()))
    return net


def load_weights(path: str | os.PathLike, config: dict[str, Any]
                 ) -> dict[str, dict[str, torch.Tensor]] | None:
    """The committed weights at ``path`` for ``config`` as ``{name: state_dict}`` (the names of
    :func:`run_names` and ``"classifier"``), or None when the file is missing or was written for
    another training configuration (:func:`training_config`), so the caller retrains."""
    flat = _runner.committed_weights(path, training_config(config))
    if flat is None:
        return None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, param = key.split("/", 1)
        out.setdefault(name, {})[param] = value
    return out


def _save_weights(path: str | os.PathLike, nets: dict[str, torch.nn.Module], config: dict[str, Any]) -> Path:
    from nwflow._io import save_torch_atomic

    flat = {}
    for name, net in nets.items():
        for param, value in net.state_dict().items():
            value = value.detach().cpu()
            flat[f"{name}/{param}"] = value.half() if value.is_floating_point() else value
    payload = {"state_dict": flat, "config_hash": config_hash(training_config(config)),
               "training_config": training_config(config), "git_commit": git_commit(),
               "steps": config["steps"], "net_epochs": config["net_epochs"],
               "dtype": "float16 (cast back to float32 on load)"}
    path = Path(path)
    save_torch_atomic(path, payload)
    return path


def _load_into(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    ref = net.state_dict()
    net.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()})
    return net


@torch.no_grad()
def _features(net: FeatureNet, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([net.features(images[i:i + batch].clamp(-1, 1)).double()
                      for i in range(0, len(images), batch)])


def run_experiment(config: dict[str, Any], device: str | torch.device = "cpu", root: str | None = None,
                   checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
                   weights: dict[str, dict[str, torch.Tensor]] | None = None,
                   save_weights: str | os.PathLike | None = None,
                   artifacts: dict[str, Any] | None = None,
                   data: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Train (or load) the networks of ``config`` and measure them; returns JSON-ready results.

    ``weights``: ``{name: state_dict}`` from :func:`load_weights`; a network found there is
    loaded instead of trained (its ``train_seconds`` is then None). ``checkpoint_dir``: the
    folder of the resumable training checkpoints (None: ``cache_dir("cifar_networks")``),
    named after the hash of the training configuration. ``save_weights``: a path where every
    network is written in float16 with that hash. ``artifacts``: a dict that receives what is
    not JSON (``"nets"``: the networks and the classifier; ``"samples"``: each network's samples;
    ``"support"``: the training images; ``"hybrid"``: the hybrid end points). ``data``:
    ``{"train": (images, labels), "test": (images, labels)}`` already loaded (the first images
    of each split are used, as when read here), to save reading them again. ``root``: the data folder (None:
    ``NWFLOW_DATA_DIR``); CIFAR-10's train and test splits are read with
    ``nwflow.data.load_cifar10``.
    """
    device = torch.device(device)
    start = time.time()
    weights = weights or {}
    tcfg = training_config(config)
    n_max = max(max(config["n_list"]), config["n_efm"])
    n_read = n_max if "classifier" in weights else max(n_max, config["clf_train"])
    n_read = max(n_read, config["n_generated"])
    if data is None:
        data = {"train": load_cifar10(root, limit=n_read, progress=progress),
                "test": load_cifar10(root, split="test", limit=config["test_limit"], progress=progress)}
    for split, k in (("train", n_read), ("test", config["test_limit"])):
        if len(data[split][0]) < k:
            raise ValueError(f"data[{split!r}] holds {len(data[split][0])} images, "
                             f"the configuration needs {k}")
    train_x, train_y = (v[:n_read] for v in data["train"])
    test_x, test_y = (v[:config["test_limit"]] for v in data["test"])
    train_x, test_x = train_x.to(device), test_x.to(device)
    results: dict[str, Any] = {"config": config, "training_config_hash": config_hash(tcfg)}
    nets: dict[str, torch.nn.Module] = {}

    # the classifier whose features the sample-quality distances use
    t0 = time.time()
    if "classifier" in weights:
        torch.manual_seed(config["seed"])
        clf = _load_into(FeatureNet(config["net_width"]).to(device), weights["classifier"]).eval()
        clf_losses: list[float] = []
        clf_seconds = None
    else:
        ckpt = _runner.checkpoint_file(checkpoint_dir, "cifar_networks", "classifier", tcfg)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        k = config["clf_train"]
        clf, clf_losses = train_feature_net(train_x[:k].cpu(), train_y[:k], config, checkpoint=ckpt,
                                            progress=progress, device=device)
        clf_seconds = time.time() - t0
    nets["classifier"] = clf
    with torch.no_grad():
        pred = torch.cat([clf(test_x[i:i + 256]).argmax(1).cpu() for i in range(0, len(test_x), 256)])
    results["classifier"] = {"train_images": config["clf_train"], "epochs": config["net_epochs"],
                             "test_images": len(test_x),
                             "test_accuracy": float((pred == test_y).double().mean()),
                             "loss_per_epoch": clf_losses, "train_seconds": clf_seconds}
    f_test = _features(clf, test_x)
    bandwidth = median_distance(f_test)

    def quality(images: torch.Tensor) -> dict[str, float]:
        f = _features(clf, images)
        return {"fd": frechet_distance(f, f_test), "mmd2": mmd2_unbiased(f, f_test, bandwidth=bandwidth)}

    g = torch.Generator().manual_seed(config["eval_seed"])
    shape = tuple(train_x.shape[1:])
    noise = torch.randn((config["n_generated"],) + shape, generator=g).to(device)
    err_times = torch.tensor(config["err_times"], dtype=torch.float64)
    ng = config["n_generated"]
    results["reference"] = {
        "train_images": {"n": ng, **quality(train_x[:ng])},
        "noise": {"n": ng, **quality(noise)},
        "feature_bandwidth": bandwidth,
    }
    rows = []
    for n, m, name in run_names(config):
        sup = train_x[:n].contiguous()
        model = _velocity_net(config, sup).to(device)
        t0 = time.time()
        if name in weights:
            _load_into(model, weights[name])
            loss_curve, train_s = [], None
        else:
            ckpt = _runner.checkpoint_file(checkpoint_dir, "cifar_networks", name, tcfg)
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            sampler = TargetSampler(sup, config["batch"], m=m)
            hist = train_velocity(model, sampler, config["steps"], lr=config["lr"], seed=config["seed"],
                                  checkpoint=ckpt, progress=progress, desc=name, config=tcfg | {"run": name})
            loss = hist["loss"]
            loss_curve = [float(np.mean(loss[i:i + 10])) for i in range(0, len(loss), 10)]
            train_s = time.time() - t0
        model.eval()
        nets[name] = model
        with torch.no_grad():
            t1 = time.time()
            samples = integrate(model, noise, steps=config["ode_steps"])
            sample_s = time.time() - t1
            d1, _ = nearest_neighbour_distance(samples, sup)
            x0 = torch.randn((config["err_pairs"],) + shape, generator=g).to(device)
            idx = torch.randint(n, (config["err_pairs"],), generator=g).to(device)
            err = field_error(model, sup, err_times, x0, idx)
        loo = leave_one_out_distance(sup) if n > 1 else torch.full((1,), float("nan"))
        if artifacts is not None:
            artifacts.setdefault("samples", {})[name] = samples.cpu()
        rows.append({"name": name, "n": n, "target": "CFM" if m is None else f"EFM-{m}", "m": m,
                     "train_seconds": train_s, "sample_seconds": sample_s, "loss_every_10": loss_curve,
                     "field_error": err.tolist(), "d1_mean": float(d1.mean()), "loo_mean": float(loo.mean()),
                     "memorisation_rate": memorisation_rate(samples, sup), **quality(samples)})
    results["networks"] = rows

    n_h = max(config["n_list"])
    sup = train_x[:n_h].contiguous()
    field = EmpiricalField(sup)
    with torch.no_grad():
        hyb = hybrid_samples(field.velocity, nets[f"CFM_n{n_h}"], noise, config["taus"],
                             steps=config["ode_steps"])
    _, idx_cf = nearest_neighbour_distance(hyb[-1], sup)
    hybrid = {"n": n_h, "taus": config["taus"], "d1_mean": [], "decided": [], "fd": [], "mmd2": [],
              "memorisation_rate": [], "loo_mean": float(leave_one_out_distance(sup).mean())}
    for k in range(len(config["taus"])):
        d, i = nearest_neighbour_distance(hyb[k], sup)
        q = quality(hyb[k])
        hybrid["d1_mean"].append(float(d.mean()))
        hybrid["decided"].append(float((i == idx_cf).double().mean()))
        hybrid["memorisation_rate"].append(memorisation_rate(hyb[k], sup))
        hybrid["fd"].append(q["fd"])
        hybrid["mmd2"].append(q["mmd2"])
    results["hybrid"] = hybrid
    if artifacts is not None:
        artifacts.update(nets=nets, support=train_x[:n_max].cpu(), hybrid=hyb.cpu(), noise=noise.cpu())
    if save_weights is not None:
        results["weights_file"] = str(_save_weights(save_weights, nets, config))
    results["wall_seconds"] = time.time() - start
    return results


def plot_results(results: dict[str, Any], title: str = ""):
    """Four panels: error to the closed form over t per network (paper Fig. 2 left), nearest-
    training-image distance against n (Fig. 2 right), FD in the classifier's features per
    network and reference (Fig. 4's role), and the hybrid sweep (Fig. 3). Returns the figure."""
    import matplotlib.pyplot as plt

    cfg = results["config"]
    rows = results["networks"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for r in rows:
        axes[0].plot(cfg["err_times"], r["field_error"], "o-" if r["m"] is None else "--", ms=3,
                     label=f"{r['target']}, n = {r['n']:,}")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("$t$")
    axes[0].set_ylabel(r"$e(t)$: mean squared error per pixel")
    axes[0].set_title("Learned field vs closed form")
    axes[0].legend(fontsize=7)
    cfm = [r for r in rows if r["m"] is None]
    axes[1].plot([r["n"] for r in cfm], [r["d1_mean"] for r in cfm], "o-", color="black",
                 label="CFM samples: nearest training image")
    axes[1].plot([r["n"] for r in cfm], [r["loo_mean"] for r in cfm], "s--", color="grey",
                 label="training set: leave-one-out NN")
    for r in rows:
        if r["m"] is not None:
            axes[1].plot([r["n"]], [r["d1_mean"]], "*", ms=9, label=f"{r['target']} samples")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("training-set size $n$")
    axes[1].set_ylabel("mean Euclidean distance (pixels in [-1, 1])")
    axes[1].set_title("Memorisation against $n$")
    axes[1].legend(fontsize=7)
    ref = results["reference"]
    labels = [r["name"].replace("_", "\n") for r in rows] + ["train\nimages", "noise"]
    fds = [r["fd"] for r in rows] + [ref["train_images"]["fd"], ref["noise"]["fd"]]
    colors = ["tab:blue" if r["m"] is None else "tab:orange" for r in rows] + ["grey", "lightgrey"]
    axes[2].bar(range(len(fds)), fds, color=colors)
    axes[2].set_xticks(range(len(fds)), labels, fontsize=6)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("FD in our classifier's features (to test set)")
    axes[2].set_title("Sample quality (not FID)")
    hy = results["hybrid"]
    axes[3].plot(hy["taus"], hy["d1_mean"], "o-", color="black", label="nearest training image")
    axes[3].axhline(hy["loo_mean"], color="grey", ls="--", label="training set LOO NN")
    axes[3].set_xlabel(r"switching time $\tau$")
    axes[3].set_ylabel("mean distance")
    ax2 = axes[3].twinx()
    ax2.plot(hy["taus"], hy["decided"], "s:", color="tab:red", label="decided")
    ax2.set_ylabel("share decided (same image as closed form)", color="tab:red")
    ax2.set_ylim(-0.05, 1.05)
    axes[3].set_title(f"Hybrid sampler, CFM n = {hy['n']:,}")
    axes[3].legend(fontsize=7, loc="center left")
    if title:
        fig.suptitle(title, y=1.02)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> Path:
    """Command-line entry point; returns the path of the written JSON."""
    parser = _runner.parser(__doc__.split("\n", 1)[0], "cifar_networks")
    parser.add_argument("--root", default=None, help="data folder (default: NWFLOW_DATA_DIR)")
    parser.add_argument("--save-weights", action="store_true",
                        help="write the trained networks in float16 to weights_path(preset)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    results = run_experiment(preset(args.preset), device=args.device, root=args.root,
                             checkpoint_dir=args.checkpoint_dir, progress=not args.no_progress,
                             save_weights=weights_path(args.preset) if args.save_weights else None)
    return _runner.write_results(args.out or result_path(args.preset), results, args.device)


if __name__ == "__main__":
    print(main())
