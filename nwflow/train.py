r"""Training a velocity network by regression, with resumable checkpoints.

Every training objective in the book is a regression of ``model(x, t)`` onto a target:
the conditional target x1 - x0 (CFM), a Monte Carlo estimate of the closed form (EFM),
or a pair's displacement (rectified flows). The chapter supplies

    batch_fn(step, generator) -> (x, t, target)

and :func:`train_velocity` minimises mean ||v_theta(x, t) - target||^2 with Adam.
Checkpoints hold the model, the optimiser, the random state, the loss history and the
run's ``config``; a run restarted with the same checkpoint path and config resumes where
it stopped, and one with another config refuses to overwrite it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nwflow._checks import check_nonnegative_int, check_positive_int, check_positive_real
from nwflow._io import save_torch_atomic
from nwflow._progress import progress_bar

__all__ = ["train_velocity"]

BatchFn = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def train_velocity(
    model: nn.Module,
    batch_fn: BatchFn,
    steps: int,
    lr: float = 1e-3,
    *,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    config: dict[str, Any] | None = None,
    grad_clip: float | None = 1.0,
    progress: bool = True,
    desc: str = "training",
) -> dict[str, list[float]]:
    """Fit ``model`` by minimising mean ||model(x, t) - target||^2 over ``steps`` Adam steps.

    - ``batch_fn(step, generator)`` returns ``(x (B, *S), t (B,), target (B, *S))``; the
      generator (seeded with ``seed``, saved in checkpoints) makes runs reproducible.
    - ``checkpoint``: a file path; written atomically every ``checkpoint_every`` steps and
      at the end. If it exists, training resumes from it (same ``config`` required).
    - Returns ``{"step": [...], "loss": [...]}``, one entry per step (resumed steps included).
    """
    check_nonnegative_int(steps, "steps")
    lr = check_positive_real(lr, "lr")
    check_positive_int(checkpoint_every, "checkpoint_every")
    config = dict(config or {})
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    device = params[0].device
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    history: dict[str, list[float]] = {"step": [], "loss": []}
    start = 0
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = torch.load(path, map_location=device, weights_only=False)
        if state.get("config") != config:
            raise ValueError(
                f"checkpoint {path} was written with config {state.get('config')}, not {config}; "
                "delete it or choose another path"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        history = state["history"]
        start = state["step"]

    def snapshot(step: int) -> None:
        if path is not None:
            save_torch_atomic(path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "generator": gen.get_state(), "history": history, "step": step,
                         "config": config})

    model.train()
    with progress_bar(range(start, steps), enabled=progress, desc=desc, total=steps,
                      initial=start) as bar:
        for step in bar:
            x, t, target = batch_fn(step, gen)
            loss = (model(x, t) - target).square().mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            history["step"].append(step)
            history["loss"].append(loss.item())
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4g}")
            if (step + 1) % checkpoint_every == 0:
                snapshot(step + 1)
    if steps > start:
        snapshot(steps)
    model.eval()
    return history
