"""A time-conditioned MLP velocity field v_theta(x, t) for low-dimensional data.

Used where a chapter trains a model against a closed-form or conditional target
(Part II: EFM, rectified-flow memorisation). Inputs are flattened; the output has the
shape of ``x``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nwflow._checks import check_int, check_positive_int, check_time

__all__ = ["TimeEmbedding", "VelocityMLP"]


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1]: [sin(2 pi f_k t), cos(2 pi f_k t)], k < dim / 2.

    Frequencies f_k are geometric from 1 to ``max_freq``, so both the slow global trend in
    t and the fast change near t = 1 are representable. Shapes: t (B,) -> (B, dim).
    """

    def __init__(self, dim: int = 32, max_freq: float = 100.0) -> None:
        super().__init__()
        if check_int(dim, "dim", minimum=2) % 2:
            raise ValueError(f"dim must be an even int >= 2, got {dim!r}")
        # float64 so that 2 pi f t is accurate for the highest frequencies.
        freqs = torch.logspace(0.0, math.log10(max_freq), dim // 2, dtype=torch.float64)
        self.register_buffer("freqs", 2.0 * math.pi * freqs)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] * self.freqs.to(t.dtype)
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class VelocityMLP(nn.Module):
    """v_theta(x, t): an MLP on [x, embed(t)] with SiLU activations.

    ``VelocityMLP(dim, hidden=256, depth=3, time_dim=32)``: ``depth`` hidden layers of
    width ``hidden``. ``forward(x, t)`` takes x of shape (B, *S) with prod(S) = dim and t a
    number, a 0-d tensor or a (B,) tensor; it returns a tensor shaped like x.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 32) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            check_positive_int(value, name)
        self.dim = dim
        self.embed = TimeEmbedding(time_dim)
        layers: list[nn.Module] = []
        width = dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x must have {self.dim} features per sample, got shape {tuple(x.shape)}")
        # path.time_per_row's layout rule (models sit below the path in the import layers); the
        # values are not read, so that the forward also runs under torch.func.vmap.
        tt = check_time(t, flat.shape[0], flat.dtype, flat.device, values=False)
        out = self.net(torch.cat([flat, self.embed(tt)], dim=1))
        return out.reshape(x.shape)
