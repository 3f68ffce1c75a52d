"""A small time-conditioned U-Net velocity field v_theta(x, t) for small images.

Used by chapter 6 (Empirical Flow Matching) to train on downsampled CIFAR-10 on a CPU.
The architecture is the usual diffusion U-Net in miniature: residual blocks with group
normalisation and SiLU, the time embedding added to every block (a per-channel shift), one
stride-2 convolution per level going down, nearest-neighbour upsampling and skip connections
coming up. Convolutions give the network the translation-equivariant inductive bias that
the closed-form field lacks, which is what lets a learned field produce new images.
"""

from __future__ import annotations

import torch
from torch import nn

from nwflow._checks import check_instance, check_positive_int, check_time
from nwflow.models.mlp import TimeEmbedding

__all__ = ["UNet"]


def _groups(channels: int) -> int:
    # As many groups as divide the channel count, at most 8.
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class _ResBlock(nn.Module):
    """GN-SiLU-conv, + time shift, GN-SiLU-conv, plus a (1x1 when widths differ) skip."""

    def __init__(self, c_in: int, c_out: int, t_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """v_theta(x, t) for images (B, C, H, W) with H and W divisible by 2**(len(mults) - 1).

    ``UNet(channels=3, base=32, mults=(1, 2, 2), time_dim=64)``: level k works at
    resolution H / 2**k with ``base * mults[k]`` channels and one residual block (two going
    up, the second taking the skip connection). ``forward(x, t)`` takes t as a number, a 0-d
    tensor or a (B,) tensor in [0, 1] and returns a tensor shaped like x. The output
    convolution starts at zero, so an untrained network is the zero field.
    """

    def __init__(self, channels: int = 3, base: int = 32, mults: tuple[int, ...] = (1, 2, 2),
                 time_dim: int = 64) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("base", base), ("time_dim", time_dim)):
            check_positive_int(value, name)
        check_instance(mults, "mults", tuple, "a non-empty tuple of positive ints")
        if not mults:
            raise ValueError(f"mults must be a non-empty tuple of positive ints, got {mults!r}")
        for k, m in enumerate(mults):
            check_positive_int(m, f"mults[{k}]")
        if time_dim % 2:
            raise ValueError(f"time_dim must be even, got {time_dim}")
        self.channels = channels
        self.factor = 2 ** (len(mults) - 1)
        widths = [base * m for m in mults]
        self.embed = nn.Sequential(TimeEmbedding(time_dim), nn.Linear(time_dim, time_dim), nn.SiLU(),
                                   nn.Linear(time_dim, time_dim))
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = widths[0]
        for k, w in enumerate(widths):
            self.down_blocks.append(_ResBlock(c, w, time_dim))
            c = w
            if k < len(widths) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = _ResBlock(c, c, time_dim)
        self.up_blocks = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for k in reversed(range(len(widths))):
            w = widths[k]
            self.up_blocks.append(_ResBlock(c + w, w, time_dim))
            c = w
            if k > 0:
                self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                   nn.Conv2d(c, widths[k - 1], 3, padding=1)))
                c = widths[k - 1]
        self.out = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must have shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"H and W must be divisible by {self.factor}, got {tuple(x.shape[2:])}")
        emb = self.embed(check_time(t, x.shape[0], x.dtype, x.device, values=False))  # as in VelocityMLP
        h = self.inp(x)
        skips = []
        for k, block in enumerate(self.down_blocks):
            h = block(h, emb)
            skips.append(h)
            if k < len(self.downsample):
                h = self.downsample[k](h)
        h = self.mid(h, emb)
        for k, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if k < len(self.upsample):
                h = self.upsample[k](h)
        return self.out(h)
