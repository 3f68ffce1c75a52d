r"""Kernel smoothing in feature space: Imagenette pixels at 8 to 64 pixels a side, then image features.

Book: Part III, chapter 11. Three measurements, each of the exact (plug-in) field
u(x, t | S) of chapter 5 on real images:

- ``collapse``: the collapse time t* (the first t where the median effective number of
  neighbours n_eff = 1 / sum_j w_j^2 of queries on the flow's own path, x = sigma_t x0 + t s_j,
  falls below 2; bisection) of Imagenette training images at each side length of ``sizes``
  (dimension d = 3 s^2) and each support size of ``collapse_n``, beside chapter 5's prediction
  t* = 1 / (1 - sigma_min + sqrt(tr Sigma / (2 log n))); and the median n_eff along t.
- ``features``: image features. When ``dinov2`` is set and DINOv2 ViT-S/14 weights load
  (``NWFLOW_DINOV2_WEIGHTS``, torch.hub's cache, or a torch.hub download), the 384-d CLS
  features of :mod:`nwflow.data.dinov2`; otherwise (always offline) the 128-d penultimate
  features of :class:`FeatureNet`, a small CNN this runner trains on Imagenette's training
  images (checkpointed per epoch, resumable, progress bar), labelled ``"feature_source":
  "trained-cnn"`` and never called DINOv2. PCA (fit on the training features) to each d of
  ``pca_dims``, standardised per component ("raw", as the paper's ImageNet features), and the
  paper's public code's "whitened" variant, the standardised coordinates times
  1/sqrt(explained-variance ratio). n_eff at t = 0.56 of m = 50 points of one class.
- ``scarcity``: support scarcity in d = ``scarcity_dim``: for m in ``support_sizes`` support
  points of a class (validation images), samples of the plug-in field and of chapter 5's
  learned conditioner (:class:`nwflow.conditioner.SupportConditionedVelocity`, with its exact head
  unless ``exact_head`` is False; the paper's Figure 3 shows the model without it; trained here by
  flow matching on feature tasks: a task is one class of the training features, m drawn from
  ``support_sizes`` at each step), MMD^2 to the class's other validation features, and the
  plug-in/learned ratio of mean MMD^2 (above 1: learned better), per variant.

Presets: ``smoke`` (seconds, tests), ``cpu`` (the book's committed result, minutes on a 2-core
CPU), ``gpu`` (larger, and DINOv2 when its weights load). Run it as

    python -m nwflow.experiments.feature_space --preset cpu

which writes ``book/results/feature_space_cpu.json`` with a provenance block. Imagenette comes
from ``NWFLOW_DATA_DIR`` (see :mod:`nwflow.data.imagenette` for the download route).
"""

from __future__ import annotations

import math
import socket
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nwflow._io import save_torch_atomic
from nwflow._progress import progress_bar
from nwflow.conditioner import (
    PackedTasks,
    SupportConditionedVelocity,
    sample_field,
    support_posterior,
    support_velocity,
)
from nwflow.data import dinov2
from nwflow.data.imagenette import load_imagenette
from nwflow.empirical import EmpiricalField
from nwflow.experiments import _runner
from nwflow.metrics import mmd2_unbiased
from nwflow.path import conditional_velocity, sample_xt
from nwflow.train import train_velocity

__all__ = ["PRESETS", "COMMON", "PARTS", "preset", "result_path", "FeatureNet", "train_feature_net",
           "image_features", "collapse_sweep", "predicted_collapse", "class_neff", "pca_variants",
           "train_feature_conditioner", "scarcity_eval", "run_experiment", "main"]

STEM = "feature_space"
PARTS = ("collapse", "features", "scarcity")

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(sizes=[8, 16], collapse_n=[100, 300], collapse_queries=8, curve_points=5,
                  train_limit=400, val_limit=400, net_size=16, net_width=8, net_epochs=1, pca_dims=[16],
                  cond_steps=3, cond_width=16, cond_tasks=2, query_size=16, support_sizes=[1, 5],
                  eval_repeats=1, n_generated=16, ode_steps=4, dinov2=False, neff_m=20),
    "cpu": dict(sizes=[8, 16, 32, 64], collapse_n=[1000, 9469], collapse_queries=32, curve_points=25,
                train_limit=None, val_limit=None, net_size=32, net_width=32, net_epochs=5, pca_dims=[16, 64],
                cond_steps=400, cond_width=64, cond_tasks=16, query_size=64, support_sizes=[1, 5, 10, 25, 50],
                eval_repeats=2, n_generated=200, ode_steps=40, dinov2=False),
    "gpu": dict(sizes=[8, 16, 32, 64], collapse_n=[1000, 9469], collapse_queries=128, curve_points=49,
                train_limit=None, val_limit=None, net_size=64, net_width=64, net_epochs=20, pca_dims=[16, 64],
                cond_steps=8000, cond_width=128, cond_tasks=64, query_size=64,
                support_sizes=[1, 5, 10, 25, 50], eval_repeats=10, n_generated=500, ode_steps=100,
                dinov2=True),
}
COMMON: dict[str, Any] = dict(sigma_min=0.01, seed=0, neff_t=0.56, neff_m=50, scarcity_dim=16, heads=4,
                              layers=2, lr=1e-3, net_lr=2e-3, net_batch=128, exact_head=True)


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The configuration of preset ``name`` ("smoke", "cpu", "gpu") with ``overrides`` applied."""
    return _runner.configure(PRESETS, COMMON, name, overrides)


def result_path(name: str):
    """``book/results/feature_space_<name>.json`` (``gpu/`` for the gpu preset)."""
    return _runner.result_path(STEM, name)


# -- collapse time in pixel space ----------------------------------------------------------
def predicted_collapse(support: torch.Tensor, sigma_min: float) -> float:
    """Chapter 5's collapse time t* = 1 / (1 - sigma_min + sqrt(tr Sigma / (2 log n))) of ``support``
    (n, D): tr Sigma is the sum of the per-coordinate variances."""
    n = support.shape[0]
    trace = float(support.double().var(0).sum())
    return 1.0 / (1.0 - sigma_min + math.sqrt(trace / (2.0 * math.log(n))))


def _median_neff(field: EmpiricalField, own: torch.Tensor, x0: torch.Tensor, t: float, sm: float) -> float:
    x = (1.0 - (1.0 - sm) * t) * x0 + t * own
    return float(field.effective_neighbours(x, t).median())


def _bisect(field, own, x0, sm, lo=0.0, hi=0.999, iters=10) -> float:
    if _median_neff(field, own, x0, hi, sm) >= 2:
        return float("nan")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _median_neff(field, own, x0, mid, sm) >= 2 else (lo, mid)
    return 0.5 * (lo + hi)


def collapse_sweep(images: dict[int, torch.Tensor], sizes_n: list[int], queries: int, curve_points: int,
                   sigma_min: float, seed: int = 0, progress: bool = True,
                   device: str | torch.device = "cpu") -> dict[str, Any]:
    """Measured and predicted collapse time per side length (``images[s]`` (N, 3, s, s)) and support
    size; the median n_eff on a t grid for the largest support. Queries sit on the flow's path
    x = sigma_t x0 + t s_j at ``queries`` support points s_j with fresh noise x0."""
    rows: dict[str, Any] = {}
    grid = np.linspace(0.02, 0.98, curve_points)
    bar = progress_bar(total=len(images) * len(sizes_n), enabled=progress, desc="collapse")
    for s, imgs in images.items():
        flat = imgs.reshape(imgs.shape[0], -1)
        row: dict[str, Any] = {"dim": flat.shape[1], "n": [], "t_measured": [], "t_predicted": [],
                               "trace": []}
        for n in sizes_n:
            n = min(n, flat.shape[0])
            g = torch.Generator().manual_seed(seed + n)
            X = flat[:n]
            field = EmpiricalField(X.to(device), sigma_min=sigma_min)
            own = X[torch.randint(0, n, (queries,), generator=g)]
            x0 = torch.randn(own.shape, generator=g)
            own, x0 = own.to(device), x0.to(device)
            row["n"].append(n)
            row["t_measured"].append(_bisect(field, own, x0, sigma_min))
            row["t_predicted"].append(predicted_collapse(X, sigma_min))
            row["trace"].append(float(X.double().var(0).sum()))
            if n == min(max(sizes_n), flat.shape[0]):
                row["t_grid"] = grid.tolist()
                row["median_neff"] = [_median_neff(field, own, x0, float(t), sigma_min) for t in grid]
            bar.update(1)
        rows[str(s)] = row
    bar.close()
    return rows


# -- the book's own feature network --------------------------------------------------------
class FeatureNet(nn.Module):
    """A small CNN classifier: three conv-BatchNorm-GELU-maxpool stages (widths w, 2w, 4w), global
    average pooling to the 4w-d feature, a linear map to the class logits. ``features(x)``
    returns the pooled feature (B, 4w); ``forward(x)`` the logits (B, classes)."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.GELU(), nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.classify = nn.Linear(4 * width, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature (B, 4 width) of images (B, 3, H, W) in [-1, 1]."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def train_feature_net(images: torch.Tensor, labels: torch.Tensor, config: dict[str, Any],
                      checkpoint=None, progress: bool = True, device: str | torch.device = "cpu"
                      ) -> tuple[FeatureNet, list[float]]:
    """Train :class:`FeatureNet` (cross-entropy, Adam, random horizontal flips) for
    ``config["net_epochs"]`` epochs; the checkpoint (model, optimiser, generator, epoch, losses)
    is written atomically after each epoch and resumed when it exists. Returns the model in eval
    mode and the mean loss per epoch."""
    device = torch.device(device)
    torch.manual_seed(config["seed"])
    model = FeatureNet(config["net_width"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config["net_lr"])
    gen = torch.Generator().manual_seed(config["seed"])
    losses: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        losses, start = state["losses"], state["epoch"]
    n, batch = images.shape[0], config["net_batch"]
    epochs = config["net_epochs"]
    steps_per_epoch = math.ceil(n / batch)
    bar = progress_bar(total=epochs * steps_per_epoch, initial=start * steps_per_epoch, enabled=progress,
                       desc="feature net")
    for epoch in range(start, epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            x = images[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            bar.update(1)
        losses.append(total / n)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if checkpoint is not None:
            save_torch_atomic(checkpoint, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                           "generator": gen.get_state(), "epoch": epoch + 1,
                                           "losses": losses})
    bar.close()
    return model.eval(), losses


@torch.no_grad()
def _net_features(model: FeatureNet, images: torch.Tensor, batch: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    feats, logits = [], []
    for i in range(0, images.shape[0], batch):
        f = model.features(images[i:i + batch].to(device))
        feats.append(f.float().cpu())
        logits.append(model.classify(f).float().cpu())
    return torch.cat(feats), torch.cat(logits)


def _try_dinov2(device: torch.device) -> tuple[torch.nn.Module | None, str]:
    """DINOv2 ViT-S/14 with real weights (a local file, torch.hub's cache, then a hub download),
    or None and the reason it did not load."""
    local = dinov2.find_local_weights()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a machine without a route fails in a minute, not never
    try:
        model = dinov2.load_dinov2(local if local is not None else "hub", device=device)
        return model, model.weights_source
    except Exception as err:  # offline: URLError, or an HTTP or file error; the run says why
        where = local or dinov2.DINOV2_VITS14_URL
        return None, (f"DINOv2 ViT-S/14 weights did not load from {where} ({type(err).__name__}: {err}); "
                      "set NWFLOW_DINOV2_WEIGHTS to a local copy of dinov2_vits14_pretrain.pth")
    finally:
        socket.setdefaulttimeout(previous)


def image_features(config: dict[str, Any], device: str | torch.device = "cpu", checkpoint_dir=None,
                   progress: bool = True) -> dict[str, Any]:
    """Features of Imagenette's training and validation images (the runner's ``features`` input).

    Returns ``{"train", "val"}`` (N, D) float32 features, ``"train_labels"``, ``"val_labels"``,
    ``"feature_source"`` ("dinov2" or "trained-cnn"), ``"feature_note"`` (which weights, or why
    DINOv2 did not load) and, for the CNN, its ``"val_accuracy"`` and ``"net_losses"``.
    """
    device = torch.device(device)
    out: dict[str, Any] = {}
    note = "DINOv2 not requested by this preset"
    if config["dinov2"]:
        model, note = _try_dinov2(device)
        if model is not None:
            for split, limit in (("train", config["train_limit"]), ("val", config["val_limit"])):
                imgs, labels = load_imagenette(split=split, size=64, limit=limit, progress=progress)
                out[split] = dinov2.extract_features(imgs, model, batch_size=128, size=224)
                out[f"{split}_labels"] = labels
            out.update(feature_source="dinov2",
                       feature_note=f"{note}; CLS features of the 64x64 Imagenette images resized to 224x224")
            return out
    s = config["net_size"]
    xtr, ytr = load_imagenette(split="train", size=s, limit=config["train_limit"], progress=progress)
    xva, yva = load_imagenette(split="val", size=s, limit=config["val_limit"], progress=progress)
    net_cfg = {k: config[k] for k in ("seed", "net_width", "net_epochs", "net_lr", "net_batch", "net_size",
                                      "train_limit")}
    ckpt = _runner.checkpoint_file(checkpoint_dir, STEM, "featurenet", net_cfg)
    t0 = time.time()
    model, losses = train_feature_net(xtr, ytr, net_cfg, checkpoint=ckpt, progress=progress, device=device)
    ftr, _ = _net_features(model, xtr)
    fva, logits = _net_features(model, xva)
    out.update(train=ftr, val=fva, train_labels=ytr, val_labels=yva, feature_source="trained-cnn",
               feature_note=(f"NOT DINOv2: the penultimate features of the book's own CNN (FeatureNet, width "
                             f"{config['net_width']}) trained on Imagenette {s}x{s} training images; {note}"),
               val_accuracy=float((logits.argmax(1) == yva).float().mean()), net_losses=losses,
               net_seconds=time.time() - t0)
    return out


# -- PCA variants and n_eff -----------------------------------------------------------------
def pca_variants(train: torch.Tensor, val: torch.Tensor, k: int) -> dict[str, Any]:
    """PCA to k dimensions fit on ``train``: ``"raw"`` (standardised components) and ``"whitened"``
    (standardised, times 1/sqrt(explained-variance ratio), the paper's public code's variant), each
    as ``(train (N, k), val (M, k))`` float32, and the explained-variance ratios."""
    pca = dinov2.fit_pca(train, k=k, whiten=True)
    scale = 1.0 / pca.explained_ratio.sqrt()
    raw = (pca.transform(train).float(), pca.transform(val).float())
    white = tuple((z * scale).float() for z in raw)
    return {"raw": raw, "whitened": white, "explained_ratio": pca.explained_ratio.tolist()}


def class_neff(Z: torch.Tensor, labels: torch.Tensor, t: float, m: int, sigma_min: float, seed: int = 70
               ) -> np.ndarray:
    """Mean n_eff at time t per class: the support is m random points of the class, the queries
    x = sigma_t x0 + t x1 at every other point x1 of the class; one value per class."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(int(labels.max()) + 1):
        pts = Z[labels == c]
        pts = pts[torch.randperm(len(pts), generator=g)]
        support, held = pts[None, :m], pts[None, m:]
        x = (1 - (1 - sigma_min) * t) * torch.randn(held.shape, generator=g) + t * held
        out.append(float((1 / support_posterior(x, t, support, sigma_min).square().sum(-1)).mean()))
    return np.array(out)


# -- support scarcity: plug-in against the learned conditioner on feature tasks -------------
def train_feature_conditioner(Z: torch.Tensor, labels: torch.Tensor, config: dict[str, Any], checkpoint=None,
                              progress: bool = True, device: str | torch.device = "cpu"
                              ) -> tuple[SupportConditionedVelocity, list[float]]:
    """Chapter 5's conditioner trained by flow matching on feature tasks: each step draws
    ``cond_tasks`` classes, m from ``support_sizes`` (one m per step), a support of m points and
    ``query_size`` other points x1 of the class, x_t = sigma_t x0 + t x1, the target
    x1 - (1 - sigma_min) x0. Returns the model (eval mode) and the loss history."""
    device = torch.device(device)
    sm, d = config["sigma_min"], Z.shape[1]
    by_class = [Z[labels == c] for c in range(int(labels.max()) + 1)]
    sizes, T, N = config["support_sizes"], config["cond_tasks"], config["query_size"]

    def batch_fn(step: int, g: torch.Generator):
        m = sizes[int(torch.randint(len(sizes), (), generator=g))]
        sup, x1 = [], []
        for c in torch.randint(len(by_class), (T,), generator=g).tolist():
            pts = by_class[c]
            idx = torch.randperm(len(pts), generator=g)[:m + N]
            sup.append(pts[idx[:m]])
            x1.append(pts[idx[m:]])
        sup, x1 = torch.stack(sup), torch.stack(x1)
        x0 = torch.randn(x1.shape, generator=g)
        t = torch.rand(x1.shape[:2], generator=g)
        xt = sample_xt(x0.flatten(0, 1), x1.flatten(0, 1), t.flatten(), sm).reshape(x1.shape)
        packed = torch.cat([xt, sup], dim=1)
        return packed.to(device), t.to(device), conditional_velocity(x0, x1, sm).to(device)

    torch.manual_seed(config["seed"])
    model = SupportConditionedVelocity(d, width=config["cond_width"], heads=config["heads"],
                                       layers=config["layers"], exact_head=config["exact_head"],
                                       sigma_min=sm).to(device)
    run_config = {k: config[k] for k in ("seed", "cond_width", "heads", "layers", "lr", "cond_tasks",
                                         "query_size", "support_sizes", "sigma_min", "exact_head")}
    run_config["data"] = [list(Z.shape), float(Z.double().sum())]
    hist = train_velocity(PackedTasks(model), batch_fn, config["cond_steps"], lr=config["lr"],
                          seed=config["seed"], checkpoint=checkpoint, config=run_config, progress=progress,
                          desc="conditioner")
    return model.eval(), hist["loss"]


@torch.no_grad()
def scarcity_eval(model: SupportConditionedVelocity, Z: torch.Tensor, labels: torch.Tensor,
                  config: dict[str, Any], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Per m of ``support_sizes``: mean MMD^2 (median-heuristic bandwidth) between ``n_generated``
    samples of each field and a class's held-out points, over every class and ``eval_repeats``
    draws; the plug-in and the learned field get the same supports and the same noise."""
    device = torch.device(device)
    sm = config["sigma_min"]
    by_class = [Z[labels == c] for c in range(int(labels.max()) + 1)]
    rows = {"support_sizes": config["support_sizes"], "mmd2_learned": [], "mmd2_plugin": [], "ratio": [],
            "wins": []}
    for k, m in enumerate(config["support_sizes"]):
        learned, plugin = [], []
        g = torch.Generator().manual_seed(config["seed"] + 1000 + k)
        for _ in range(config["eval_repeats"]):
            # Every class at once: one (classes, m, d) batch of supports, each field integrated once.
            supports, held = [], []
            for pts in by_class:
                idx = torch.randperm(len(pts), generator=g)
                supports.append(pts[idx[:m]])
                held.append(pts[idx[m:]])
            support = torch.stack(supports).to(device)
            noise = int(torch.randint(2**31 - 1, (), generator=g))
            xl = sample_field(model, support, config["n_generated"], torch.Generator().manual_seed(noise),
                              steps=config["ode_steps"]).cpu()
            xp = sample_field(lambda x, t, s: support_velocity(x, t, s, sm), support, config["n_generated"],
                              torch.Generator().manual_seed(noise), steps=config["ode_steps"]).cpu()
            learned += [mmd2_unbiased(xl[c], held[c]) for c in range(len(held))]
            plugin += [mmd2_unbiased(xp[c], held[c]) for c in range(len(held))]
        ml, mp = float(np.mean(learned)), float(np.mean(plugin))
        rows["mmd2_learned"].append(ml)
        rows["mmd2_plugin"].append(mp)
        rows["ratio"].append(mp / ml)
        rows["wins"].append(float(np.mean(np.array(learned) < np.array(plugin))))
    return rows


def run_experiment(config: dict[str, Any], device: str | torch.device = "cpu", progress: bool = True,
                   parts: tuple[str, ...] = PARTS, checkpoint_dir=None) -> dict[str, Any]:
    """Run the parts of ``config`` named in ``parts`` (``"collapse"``, ``"features"``, ``"scarcity"``;
    ``"scarcity"`` needs ``"features"``); JSON-ready results with ``"config"``, ``"wall_seconds"``,
    ``"seconds"`` per part, and one key per part run."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts or ("scarcity" in parts and "features" not in parts):
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, with 'features' if 'scarcity'; "
                         f"got {parts!r}")
    start = time.time()
    out: dict[str, Any] = {"config": config, "seconds": {}}
    sm = config["sigma_min"]
    if "collapse" in parts:
        t0 = time.time()
        limit = max(config["collapse_n"])
        images = {s: load_imagenette(split="train", size=s, limit=limit, progress=progress)[0]
                  for s in config["sizes"]}
        out["collapse"] = collapse_sweep(images, config["collapse_n"], config["collapse_queries"],
                                         config["curve_points"], sm, config["seed"], progress, device)
        out["seconds"]["collapse"] = time.time() - t0
    if "features" in parts:
        t0 = time.time()
        feats = image_features(config, device, checkpoint_dir, progress)
        info = {k: feats[k] for k in ("feature_source", "feature_note") if k in feats}
        for k in ("val_accuracy", "net_losses", "net_seconds"):
            if k in feats:
                info[k] = feats[k]
        info["feature_dim"] = int(feats["train"].shape[1])
        info["n_train"], info["n_val"] = int(feats["train"].shape[0]), int(feats["val"].shape[0])
        info["neff"] = {}
        variants = {}
        for k in config["pca_dims"]:
            v = pca_variants(feats["train"], feats["val"], k)
            variants[k] = v
            info["neff"][str(k)] = {
                "explained_ratio_total": float(sum(v["explained_ratio"])),
                **{name: class_neff(v[name][1], feats["val_labels"], config["neff_t"], config["neff_m"],
                                    sm).tolist() for name in ("raw", "whitened")}}
        out["features"] = info
        out["seconds"]["features"] = time.time() - t0
        if "scarcity" in parts:
            t0 = time.time()
            d = config["scarcity_dim"]
            v = variants[d] if d in variants else pca_variants(feats["train"], feats["val"], d)
            out["scarcity"] = {"dim": d}
            for name in ("raw", "whitened"):
                t1 = time.time()
                ckpt = _runner.checkpoint_file(checkpoint_dir, STEM, f"conditioner-{name}",
                                               {**config, "variant": name,
                                                "feature_source": info["feature_source"]})
                model, losses = train_feature_conditioner(v[name][0], feats["train_labels"], config, ckpt,
                                                          progress, device)
                train_s = time.time() - t1
                res = scarcity_eval(model, v[name][1], feats["val_labels"], config, device)
                out["scarcity"][name] = {**res, "final_loss": float(np.mean(losses[-20:])),
                                         "train_seconds": train_s}
            out["seconds"]["scarcity"] = time.time() - t0
    out["wall_seconds"] = time.time() - start
    return out


def main(argv: list[str] | None = None):
    """Command-line entry point; returns the path of the written JSON."""
    parser = _runner.parser(__doc__.split("\n", 1)[0], STEM)
    args = parser.parse_args(argv)
    config = preset(args.preset)
    results = run_experiment(config, device=args.device, progress=not args.no_progress,
                             checkpoint_dir=args.checkpoint_dir)
    return _runner.write_results(args.out or result_path(args.preset), results, args.device)


if __name__ == "__main__":
    print(main())
