r"""DINOv2 ViT-S/14 image features in plain PyTorch, with the official parameter names.

Book: Part II, chapter 5 (when kernel smoothing fails: the feature-space experiment); the
planned Part III reuses it for Imagenette in DINOv2 feature space.

The support-conditioned flow-matching paper runs its ImageNet experiment on DINOv2 ViT-S/14
CLS features reduced by PCA. This module rebuilds that backbone without the DINOv2 package
(and without xFormers, timm or torchvision): a 12-block pre-norm vision transformer,

    tokens  z_0 = [cls; P x_patches] + pos            (patch size 14, width 384, 6 heads)
    block   z <- z + gamma_1 * Attn(LN(z)),   z <- z + gamma_2 * MLP(LN(z))   (LayerScale)
    output  f(x) = LN(z_12)[CLS]                      the 384-d image feature,

whose ``state_dict`` keys and shapes are exactly those of the official checkpoint
(``cls_token``, ``pos_embed`` (1, 1370, 384) for the 518-pixel training grid of 37 x 37
patches, ``mask_token``, ``patch_embed.proj.*``, ``blocks.{i}.norm1.*``, ``blocks.{i}.attn.qkv.*``,
``blocks.{i}.attn.proj.*``, ``blocks.{i}.ls1.gamma``, ``blocks.{i}.mlp.fc1.*``, ...,
``norm.*``), so the published weights load with ``strict=True``. Other input sizes use the
official bicubic interpolation of the position embedding (with its +0.1 offset), so
features agree with the reference implementation at every resolution.

Weights are not downloadable everywhere (the machines that build this book are offline):
:func:`load_dinov2` takes ``weights="hub"`` (the official checkpoint through torch.hub's
download cache), a local file path, or ``None`` for a randomly initialised network, which is
flagged by ``model.pretrained == False`` and ``model.weights_source``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nwflow._checks import (
    check_float_tensor,
    check_int,
    check_nonnegative_int,
    check_points,
    check_positive_int,
)

__all__ = [
    "DINOV2_VITS14_URL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DinoVisionTransformer",
    "vit_small14",
    "find_local_weights",
    "load_dinov2",
    "preprocess",
    "extract_features",
    "PCA",
    "fit_pca",
]

# The file torch.hub's ``facebookresearch/dinov2`` entry point ``dinov2_vits14`` downloads.
DINOV2_VITS14_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- the network --------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> width-D tokens: one strided convolution ``proj``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h w, D), row-major


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # softmax(q k^T / sqrt(d_h)) v
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf form) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale ``gamma`` (CaiT's LayerScale)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: z + ls1(attn(norm1 z)), then + ls2(mlp(norm2 z))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_value: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_value)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    r"""A DINOv2 vision transformer (no registers unless ``num_register_tokens`` > 0).

    ``DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6,
    mlp_ratio=4.0, init_value=1.0, num_register_tokens=0)``; the defaults are ViT-S/14, whose
    position embedding covers the (518 / 14)^2 = 37 x 37 training grid plus the CLS token.

    ``forward(images)`` takes normalised images (B, 3, H, W) with H and W multiples of the
    patch size and returns the CLS feature LN(z_L)[CLS], (B, embed_dim).
    :meth:`forward_features` returns the normalised CLS and patch tokens.
    """

    def __init__(self, img_size: int = 518, patch_size: int = 14, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, init_value: float = 1.0,
                 num_register_tokens: int = 0, in_chans: int = 3) -> None:
        super().__init__()
        for name, value in (("img_size", img_size), ("patch_size", patch_size), ("embed_dim", embed_dim),
                            ("depth", depth), ("num_heads", num_heads), ("in_chans", in_chans)):
            check_positive_int(value, name)
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        check_nonnegative_int(num_register_tokens, "num_register_tokens")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, embed_dim))
        # Registers are extra learned tokens of the *_reg models; the base ViT-S/14 has none,
        # and then no parameter exists (the official checkpoint has no such key).
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, init_value)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # Used only by DINOv2's masked-image training; kept so the official state dict loads strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.pretrained = False
        self.weights_source = "random initialisation (NOT pretrained DINOv2 weights)"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: N(0, 0.02^2) weights and position embedding, zero biases.

        The reference draws a normal truncated at +-2 in absolute value, i.e. at 100 standard
        deviations: the same distribution as a plain normal, which is several times faster.
        """
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an h x w patch grid, (1, 1 + h w, D).

        The stored M x M grid is resized bicubically with scale factor (h + 0.1) / M, the
        official implementation's convention (the offset guards the output size against
        rounding, and it also sets the sampling positions: using ``size=`` instead would
        give slightly different values).
        """
        if h == self.grid and w == self.grid:
            return self.pos_embed
        pos = self.pos_embed.float()
        M = self.grid
        patch_pos = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic",
                                  antialias=False)
        if patch_pos.shape[-2:] != (h, w):  # the offset keeps floor(M * (h + 0.1) / M) = h
            raise RuntimeError(f"position-embedding interpolation gave {tuple(patch_pos.shape[-2:])}, "
                               f"not {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1).to(self.pos_embed.dtype)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(f"images must have shape (B, {self.patch_embed.proj.in_channels}, H, W), "
                             f"got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image height and width must be multiples of {self.patch_size}, got {H} x {W}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)
        if self.register_tokens is not None:  # registers sit after CLS and take no position embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"cls": (B, D), "patch": (B, h w, D)}``, both after the final LayerNorm."""
        x = self._tokens(images)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return {"cls": x[:, 0], "patch": x[:, 1 + self.num_register_tokens:]}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)["cls"]


def vit_small14(num_register_tokens: int = 0) -> DinoVisionTransformer:
    """DINOv2 ViT-S/14: width 384, 12 blocks, 6 heads, 518-pixel position grid (37 x 37 + CLS)."""
    return DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6,
                                 mlp_ratio=4.0, init_value=1.0, num_register_tokens=num_register_tokens)


def find_local_weights() -> Path | None:
    """A DINOv2 ViT-S/14 checkpoint already on this machine, without touching the network.

    Looks at the file named by the environment variable ``NWFLOW_DINOV2_WEIGHTS``, then at
    torch.hub's download cache (``torch.hub.get_dir()/checkpoints/dinov2_vits14_pretrain.pth``,
    where ``load_dinov2("hub")`` stores it). Returns the path, or None when neither exists.
    """
    named = os.environ.get("NWFLOW_DINOV2_WEIGHTS", "").strip()
    candidates = [Path(named).expanduser()] if named else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / DINOV2_VITS14_URL.rsplit("/", 1)[1])
    return next((c for c in candidates if c.is_file()), None)


def load_dinov2(weights: str | os.PathLike | None = "hub", device: torch.device | str = "cpu",
                seed: int = 0) -> DinoVisionTransformer:
    """A ViT-S/14 in eval mode with DINOv2 weights, or randomly initialised.

    - ``weights="hub"``: the official checkpoint (:data:`DINOV2_VITS14_URL`, the file behind
      ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vits14')``), through torch.hub's
      download cache (``torch.hub.get_dir()/checkpoints``); needs the network once.
    - a path: a local copy of that state dict (``torch.save(model.state_dict(), path)``).
    - ``None``: random initialisation with ``seed``; ``model.pretrained`` is False and
      ``model.weights_source`` says so. Features of such a model are NOT DINOv2 features.

    Weights load with ``strict=True``: a missing or unexpected key raises. Returns the model
    on ``device`` with ``pretrained`` and ``weights_source`` set.
    """
    check_int(seed, "seed")
    hub = isinstance(weights, str) and weights == "hub"
    if weights is not None and not hub:
        if not isinstance(weights, (str, os.PathLike)):
            raise TypeError(f"weights must be 'hub', a path or None, got {type(weights).__name__}")
        if not Path(weights).is_file():
            raise ValueError(f"weights: no checkpoint file at {weights} (pass 'hub', a file path or None)")
    with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG untouched
        torch.manual_seed(seed)
        model = vit_small14()
    if weights is None:
        model.weights_source = f"random initialisation, seed {seed} (NOT pretrained DINOv2 weights)"
    else:
        if hub:
            state = torch.hub.load_state_dict_from_url(DINOV2_VITS14_URL, map_location="cpu", progress=False)
            source = f"official DINOv2 ViT-S/14 weights ({DINOV2_VITS14_URL})"
        else:
            state = torch.load(Path(weights), map_location="cpu", weights_only=True)
            source = f"DINOv2 ViT-S/14 weights from {weights}"
        model.load_state_dict(state, strict=True)
        model.pretrained = True
        model.weights_source = source
    return model.to(device).eval()


# -- images -> features -------------------------------------------------------------------
def preprocess(images: torch.Tensor, size: int = 224, value_range: tuple[float, float] = (-1.0, 1.0),
               patch_size: int = 14) -> torch.Tensor:
    r"""Images -> the network's input: rescale to [0, 1], resize, ImageNet-normalise.

    ``images``: (B, 3, H, W) floats in ``value_range`` (the book's loaders give [-1, 1]).
    They are resized (bicubic, antialiased, as in the reference resize-and-crop pipeline) to
    ``size`` x ``size`` with ``size`` a multiple of ``patch_size``, clamped back to [0, 1],
    then normalised channel-wise, (x - mean) / std with the ImageNet statistics
    :data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`. Returns (B, 3, size, size) float32.
    """
    check_float_tensor(images, "images")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if check_int(size, "size") < patch_size or size % patch_size:
        raise ValueError(f"size must be a positive multiple of {patch_size}, got {size!r}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    x = (images.float() - lo) / (hi - lo)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0.0, 1.0)  # bicubic overshoots slightly at edges
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


@torch.no_grad()
def extract_features(images: torch.Tensor, model: nn.Module, batch_size: int = 64, size: int = 224,
                     value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """CLS features of ``images`` (N, 3, H, W) through ``model``, in batches: (N, 384) float32.

    Each batch is moved to the model's device, :func:`preprocess`-ed (resize to ``size``,
    a multiple of 14; ImageNet normalisation) and passed through the network in eval mode
    without gradients. The result is on the CPU.
    """
    check_positive_int(batch_size, "batch_size")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(preprocess(images[i:i + batch_size].to(device), size=size, value_range=value_range))
           .float().cpu() for i in range(0, images.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(out, dim=0)


# -- PCA ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PCA:
    r"""A fitted principal-component projection z = (x - mean) V_k (optionally / sqrt(lambda)).

    Fields: ``mean`` (D,), ``components`` (k, D) orthonormal rows (the top right-singular
    vectors, sign-fixed so each row's largest-magnitude entry is positive), ``variances``
    (k,) the eigenvalues lambda of the sample covariance (denominator N - 1),
    ``explained_ratio`` (k,) lambda / total variance, ``whiten``.
    """

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor
    explained_ratio: torch.Tensor
    whiten: bool = False

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, k): coordinates along the components (unit variance when ``whiten``)."""
        z = (x.to(self.mean.dtype) - self.mean) @ self.components.T
        return z / self.variances.sqrt() if self.whiten else z


def fit_pca(features: torch.Tensor, k: int, whiten: bool = False) -> PCA:
    """Fit a k-component PCA to ``features`` (N, D) in float64 through an SVD of the centred data.

    Singular values s give the covariance eigenvalues s^2 / (N - 1). Needs 1 <= k <= min(N - 1, D).
    """
    N, D = check_points(features, "features", min_rows=2).shape
    check_int(k, "k", 1, min(N - 1, D))  # N centred points span at most N - 1 directions
    x = features.double()
    mean = x.mean(dim=0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vh[:k]
    # Fix the SVD's sign ambiguity so a refit gives the same projection.
    flip = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    comps = comps * flip
    var = s.square() / (N - 1)
    return PCA(mean=mean, components=comps, variances=var[:k], explained_ratio=var[:k] / var.sum(),
               whiten=bool(whiten))
