r"""Support-conditioned velocity fields: the exact plug-in head and a learned cross-attention net.

Book: Part II, chapter 5 (when kernel smoothing fails).

A *task* is a distribution P; its *support* is a set of m points drawn from it. A
support-conditioned field v(x, t | S) maps a query (x, t) and a support S = {s_1..s_m}
to a velocity. Two of them here:

- the exact (plug-in) field of the support, batched over tasks: the Nadaraya-Watson
  smoother of chapter 3,

  .. math:: w_j = \operatorname{softmax}_j\left(-\frac{\lVert x - t s_j\rVert^2}{2\sigma_t^2}\right),
      \qquad m_{\text{NW}} = \sum_j w_j s_j, \qquad
      u_{\text{NW}}(x, t \mid S) = \frac{m_{\text{NW}} - (1 - \sigma_{\min})\, x}{\sigma_t};

- :class:`SupportConditionedVelocity`, learned: queries [x, embed(t)] attend to encoded
  support tokens through L cross-attention layers (softmax(q k^T / sqrt(d_head)) v per head);
  optionally the exact head's bounded numerator sigma_t u_NW = m_NW - (1 - sigma_min) x is
  an extra input of the output MLP.

The learned field is trained by flow matching over many random tasks (Gaussian mixtures
with 2-8 components, concentric spherical shells): for each task a support S and fresh
points x1 ~ P, x_t = sigma_t x0 + t x1, and the regression target x1 - (1 - sigma_min) x0.
Training reuses :func:`nwflow.train.train_velocity` (atomic, resumable checkpoints, progress
bar) through :class:`PackedTasks`, which carries queries and support in one tensor.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nwflow._checks import (
    check_choice,
    check_float_tensor,
    check_instance,
    check_nonnegative_real,
    check_positive_int,
    check_real,
)
from nwflow._precision import WIDE, exact_matmul
from nwflow._stream import softmax_mean
from nwflow.data.toy import gaussian_mixture, spherical_shells
from nwflow.models.mlp import TimeEmbedding
from nwflow.path import conditional_velocity, sample_xt, sigma, time_per_row
from nwflow.solvers import integrate
from nwflow.train import train_velocity

__all__ = [
    "TaskConfig",
    "sample_tasks",
    "support_logits",
    "support_posterior",
    "support_velocity",
    "SupportConditionedVelocity",
    "PackedTasks",
    "flow_matching_batch",
    "train_conditioner",
    "sample_field",
    "fm_error_over_t",
    "rank_correlation",
]

FAMILIES = ("mixture", "shells")


# -- tasks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskConfig:
    r"""The distribution over tasks (a "meta-distribution") and the sizes of one training task.

    .. math:: P_{\text{mixture}} = \frac{1}{k} \sum_{c=1}^{k} N(\mu_c, \Sigma_c), \quad
        \lVert \mu_c \rVert = r; \qquad
        P_{\text{shells}}: \ x = r_c u + \sigma \varepsilon, \quad u \sim \mathcal{U}(S^{d-1}), \quad
        \varepsilon \sim N(0, I_d)

    (:func:`nwflow.data.toy.gaussian_mixture` with random means, and
    :func:`nwflow.data.toy.spherical_shells` with the shell c uniform). Shapes: a task's support
    is (m, d) = (``support_size``, ``dim``), its queries per step (``query_size``, ``dim``).
    Chapter 5, section 4.

    - ``dim``: ambient dimension d; ``support_size``: m; ``query_size``: points x1 ~ P per
      task and training step.
    - ``families``: task kinds drawn uniformly: ``"mixture"`` (k ~ U{min..max_components}
      components, means uniform on a sphere of radius ~ U[mean_radius], per-component scale
      ~ U[component_scale], anisotropy ~ U[1, max_anisotropy] with random orientation) and
      ``"shells"`` (k ~ U{min..max_shells} concentric spheres with radii ~ U[shell_radius],
      isotropic noise ``shell_noise``).
    """

    dim: int = 8
    support_size: int = 50
    query_size: int = 64
    families: tuple[str, ...] = FAMILIES
    min_components: int = 2
    max_components: int = 8
    mean_radius: tuple[float, float] = (2.0, 5.0)
    component_scale: tuple[float, float] = (0.3, 1.0)
    max_anisotropy: float = 4.0
    min_shells: int = 2
    max_shells: int = 5
    shell_radius: tuple[float, float] = (1.0, 5.0)
    shell_noise: float = 0.3

    def __post_init__(self) -> None:
        for name in ("dim", "support_size", "query_size", "min_components", "max_components",
                     "min_shells", "max_shells"):
            check_positive_int(getattr(self, name), name)
        if self.min_components > self.max_components or self.min_shells > self.max_shells:
            raise ValueError("min_components/min_shells must not exceed max_components/max_shells")
        fams = tuple(self.families)
        if not fams or any(f not in FAMILIES for f in fams):
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {self.families!r}")
        object.__setattr__(self, "families", fams)
        for name in ("mean_radius", "component_scale", "shell_radius"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
            object.__setattr__(self, name, (float(lo), float(hi)))
        check_real(self.max_anisotropy, "max_anisotropy", low=1.0)
        check_nonnegative_real(self.shell_noise, "shell_noise")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _one_task(config: TaskConfig, family: str, n: int, g: torch.Generator) -> torch.Tensor:
    d = config.dim
    if family == "mixture":
        k = _randint(g, config.min_components, config.max_components)
        return gaussian_mixture(n, d, k=k, layout="random", radius=_uniform(g, *config.mean_radius),
                                scales=_uniform(g, *config.component_scale),
                                anisotropy=_uniform(g, 1.0, config.max_anisotropy), generator=g)
    k = _randint(g, config.min_shells, config.max_shells)
    radii = sorted(_uniform(g, *config.shell_radius) for _ in range(k))
    return spherical_shells(n, d, radii=radii, noise=config.shell_noise, generator=g)


def sample_tasks(config: TaskConfig, n_tasks: int, n_heldout: int, generator: torch.Generator,
                 family: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    r"""Draw ``n_tasks`` tasks; from each, a support and ``n_heldout`` fresh points.

    .. math:: P_k \sim \mathcal{P}, \qquad S_k = \{s_{k,1}, \dots, s_{k,m}\} \overset{\text{iid}}{\sim} P_k,
        \qquad x_{k,1}, \dots, x_{k,n_{\text{heldout}}} \overset{\text{iid}}{\sim} P_k

    with the meta-distribution of :class:`TaskConfig`. Shapes: returns
    ``(support (T, m, d), heldout (T, n_heldout, d), families)`` in float32, T = ``n_tasks``.
    The family of each task is drawn uniformly from ``config.families`` unless ``family``
    fixes it. Deterministic given the generator's state. Chapter 5.
    """
    check_instance(config, "config", TaskConfig)
    check_positive_int(n_tasks, "n_tasks")
    check_positive_int(n_heldout, "n_heldout")
    check_choice(family, "family", (*FAMILIES, None))
    m = config.support_size
    supports, heldouts, fams = [], [], []
    for _ in range(n_tasks):
        fam = family or config.families[_randint(generator, 0, len(config.families) - 1)]
        pts = _one_task(config, fam, m + n_heldout, generator)
        supports.append(pts[:m])
        heldouts.append(pts[m:])
        fams.append(fam)
    return torch.stack(supports), torch.stack(heldouts), fams


# -- the exact head, batched over tasks ----------------------------------------------------
def _time(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t as a (T, N) float64 tensor for queries x of shape (T, N, d)."""
    # The path's rule with one more layout: per query (T, N) as well as per task (T,), so the
    # (T, N) form is checked as the flattened queries' per-row time.
    T, N = x.shape[:2]
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape not in ((T,), (T, N)):
        raise ValueError(f"t must be a number, or have shape ({T},) or ({T}, {N}), "
                         f"got shape {tuple(t.shape)}")
    if isinstance(t, torch.Tensor) and t.dim() == 2:
        return time_per_row(t.reshape(-1), x.reshape(T * N, -1), dtype=WIDE).reshape(T, N)
    return time_per_row(t, x, dtype=WIDE)[:, None].expand(T, N)


def _check_pair(x: torch.Tensor, support: torch.Tensor) -> None:
    for name, v in (("x", x), ("support", support)):
        if check_float_tensor(v, name).dim() != 3:
            raise ValueError(f"{name} must have shape (T, *, d), got shape {tuple(v.shape)}")
    if x.shape[0] != support.shape[0] or x.shape[2] != support.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} and support {tuple(support.shape)} must share T and d")
    if support.shape[1] == 0:
        raise ValueError("support is empty (m = 0)")


def support_logits(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
                   sigma_min: float = 0.0) -> torch.Tensor:
    r"""Posterior logits of each task's support, (T, N, m), float64.

    .. math:: l_j(x, t \mid S) = -\frac{\lVert x - t s_j \rVert^2}{2\sigma_t^2}
        = \frac{2t \langle x, s_j \rangle - t^2 \lVert s_j \rVert^2 - \lVert x \rVert^2}{2\sigma_t^2}

    (for t > 0 the chapter's -||x/t - s_j||^2 / (2 h(t)^2), h = sigma_t / t). Computed in the
    expanded form in float64, so the value is accurate even where 1 / sigma_t^2 is large.
    Requires sigma_t > 0. Shapes: ``x`` (T, N, d) queries, ``support`` (T, m, d), ``t`` a
    number, (T,) or (T, N). Chapter 5, eq. (nw-field).
    """
    _check_pair(x, support)
    tt = _time(t, x)
    s = sigma(tt, sigma_min)
    if float(s.min()) <= 0:
        raise ValueError("sigma_t = 0 (t = 1 with sigma_min = 0): the posterior is singular")
    x64, s64 = x.to(WIDE), support.to(WIDE)
    with exact_matmul():
        cross = torch.bmm(x64, s64.transpose(1, 2))                          # (T, N, m)
    sq = (2 * tt[..., None] * cross - tt[..., None] ** 2 * s64.square().sum(-1)[:, None, :]
          - x64.square().sum(-1)[..., None])
    return sq / (2 * s[..., None] ** 2)


def support_posterior(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
                      sigma_min: float = 0.0) -> torch.Tensor:
    r"""Posterior weights of each task's support, (T, N, m) float64.

    .. math:: w_j(x, t \mid S) = \operatorname{softmax}_j\big(l_j(x, t \mid S)\big)
        = \frac{e^{l_j}}{\sum_{k=1}^{m} e^{l_k}}

    with the logits of :func:`support_logits`. Shapes: ``x`` (T, N, d), ``support`` (T, m, d),
    ``t`` a number, (T,) or (T, N). Chapter 5, eq. (nw-field).
    """
    return torch.softmax(support_logits(x, t, support, sigma_min), dim=-1)


def _plug_in_numerator(x: torch.Tensor, tt: torch.Tensor, support: torch.Tensor,
                       sigma_min: float) -> torch.Tensor:
    """sigma_t u_NW = m_NW - (1 - sigma_min) x per task, (T, N, d) in the wide dtype."""
    # One call for all tasks: (T, N, m) logits with each task's own (T, m, d) support as values.
    m = softmax_mean(support_logits(x, tt, support, sigma_min), support.to(WIDE))
    return m - (1.0 - sigma_min) * x.to(WIDE)


def support_velocity(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
                     sigma_min: float = 0.0) -> torch.Tensor:
    r"""The exact (plug-in) field of each task's support.

    .. math:: m_{\text{NW}}(x, t \mid S) = \sum_j w_j(x, t \mid S)\, s_j, \qquad
        u_{\text{NW}}(x, t \mid S) = \frac{m_{\text{NW}} - (1 - \sigma_{\min})\, x}{\sigma_t}

    The batched form of :func:`nwflow.velocity` (one support per task). Shapes: ``x``
    (T, N, d), ``support`` (T, m, d), ``t`` a number, (T,) or (T, N). Returns (T, N, d) in x's
    dtype. Chapter 5, eq. (nw-field).
    """
    tt = _time(t, x)
    return (_plug_in_numerator(x, tt, support, sigma_min) / sigma(tt, sigma_min)[..., None]).to(x.dtype)


# -- the learned field ---------------------------------------------------------------------
class CrossAttention(nn.Module):
    r"""Multi-head cross-attention of queries (T, N, W) on support tokens (T, m, W).

    .. math:: \ell_{ij} = \frac{\langle q_i, k_j \rangle}{\sqrt{d_{\text{head}}}}, \qquad
        a_i = \sum_j \operatorname{softmax}_j(\ell_{ij})\, v_j

    per head, with q, k, v linear maps of the queries and tokens; the heads' a_i are
    concatenated and mapped by a linear layer. ``forward`` returns those values (T, N, W) and
    the logits (T, heads, N, m), so the chapter can compare them with the Nadaraya-Watson
    logits. Chapter 5, section 6.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T, N, W = h.shape
        dh = W // self.heads

        def split(a: torch.Tensor) -> torch.Tensor:
            return a.reshape(T, a.shape[1], self.heads, dh).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(s)), split(self.v(s))
        logits = q @ k.transpose(-1, -2) / math.sqrt(dh)                   # (T, H, N, m)
        attended = torch.softmax(logits, dim=-1) @ v                         # (T, H, N, dh)
        return self.out(attended.transpose(1, 2).reshape(T, N, W)), logits


class _Layer(nn.Module):
    """Pre-norm residual block: h + attn(LN h, S), then h + FFN(LN h)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CrossAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, logits = self.attn(self.norm1(h), s)
        h = h + a
        return h + self.ffn(self.norm2(h)), logits


class SupportConditionedVelocity(nn.Module):
    r"""A learned support-conditioned velocity v_theta(x, t | S) built from cross-attention.

    .. math::

        h_0 = \mathrm{MLP}\big([x, \mathrm{embed}(t)]\big), \qquad
        h_l' = h_{l-1} + \mathrm{Attn}_l\big(\mathrm{LN}(h_{l-1}), \{\mathrm{MLP}(s_j)\}_j\big), \qquad
        h_l = h_l' + \mathrm{FFN}_l\big(\mathrm{LN}(h_l')\big),

        v_\theta(x, t \mid S) = \mathrm{MLP}\big([\mathrm{LN}(h_L), e]\big), \qquad
        e = \sigma_t u_{\text{NW}} = m_{\text{NW}} - (1 - \sigma_{\min})\, x

    ``SupportConditionedVelocity(dim, width=64, heads=4, layers=2, time_dim=32,
    exact_head=True, sigma_min=0.01)``

    - queries: h_0 = MLP([x, embed(t)]) (width ``width``); support tokens: MLP(s_j);
    - ``layers`` pre-norm blocks of ``heads``-head cross-attention (queries attend to the
      support) and a feed-forward layer;
    - output: MLP([LN(h_L), e]) -> R^d, where e = sigma_t u_NW(x, t | S) = m_NW - (1 - sigma_min) x
      is the exact head's bounded numerator when ``exact_head`` is True (else absent).

    ``forward(x, t, support)``: ``x`` (T, N, d), ``t`` a number, (T,) or (T, N) in [0, 1],
    ``support`` (T, m, d) -> velocity (T, N, d). :meth:`attention_logits` returns each
    layer's logits (T, heads, N, m). Chapter 5, section 4.
    """

    def __init__(self, dim: int, width: int = 64, heads: int = 4, layers: int = 2, time_dim: int = 32,
                 exact_head: bool = True, sigma_min: float = 0.01) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("width", width), ("heads", heads), ("layers", layers)):
            check_positive_int(value, name)
        # sigma_min > 0 keeps the exact head finite at t = 1, where samplers end.
        check_real(sigma_min, "sigma_min", 0.0, 1.0, low_open=True, high_open=True)
        self.dim, self.exact_head, self.sigma_min = dim, bool(exact_head), float(sigma_min)
        self.embed = TimeEmbedding(time_dim)
        self.query_in = nn.Sequential(nn.Linear(dim + time_dim, width), nn.GELU(), nn.Linear(width, width))
        self.support_in = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList([_Layer(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        extra = dim if self.exact_head else 0
        self.head = nn.Sequential(nn.Linear(width + extra, width), nn.GELU(), nn.Linear(width, dim))

    def _run(self, x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        _check_pair(x, support)
        if x.shape[2] != self.dim:
            raise ValueError(f"x must have {self.dim} features, got shape {tuple(x.shape)}")
        tt = _time(t, x)
        T, N, d = x.shape
        temb = self.embed(tt.reshape(-1).to(x.dtype)).reshape(T, N, -1)
        h = self.query_in(torch.cat([x, temb], dim=-1))
        s = self.support_in(support)
        all_logits = []
        for block in self.blocks:
            h, logits = block(h, s)
            all_logits.append(logits)
        feats = self.norm(h)
        if self.exact_head:
            with torch.no_grad():  # the head has no parameters; its input x needs no gradient
                e = _plug_in_numerator(x, tt, support, self.sigma_min).to(x.dtype)
            feats = torch.cat([feats, e], dim=-1)
        return self.head(feats), all_logits

    def forward(self, x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        r"""The learned velocity (the class equation; without e when ``exact_head`` is False).

        .. math:: v_\theta(x, t \mid S) = \mathrm{MLP}\big([\mathrm{LN}(h_L), e]\big)

        Shapes: ``x`` (T, N, d), ``t`` a number, (T,) or (T, N) in [0, 1], ``support``
        (T, m, d); returns (T, N, d). Chapter 5.
        """
        return self._run(x, t, support)[0]

    def attention_logits(self, x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor
                         ) -> list[torch.Tensor]:
        r"""Cross-attention logits of every layer, each (T, heads, N, m).

        .. math:: \ell^{(l)}_{ij} = \frac{\langle q^{(l)}_i, k^{(l)}_j \rangle}{\sqrt{d_{\text{head}}}}

        per head, for query i and support point j: what the chapter compares (by rank
        correlation) with the Nadaraya-Watson logits of :func:`support_logits`. Shapes: as
        :meth:`forward`; returns a list of ``layers`` tensors. Chapter 5, section 6.
        """
        return self._run(x, t, support)[1]


class PackedTasks(nn.Module):
    r"""``model(x, t)`` form of a support-conditioned field, for :func:`nwflow.train.train_velocity`.

    .. math:: \text{packed}_k = [x_{k,1}, \dots, x_{k,N}, s_{k,1}, \dots, s_{k,m}]
        \;\mapsto\; v_\theta(x_{k,n}, t_{k,n} \mid S_k), \quad n = 1, \dots, N

    ``forward(packed, t)``: ``packed`` (T, N + m, d) holds the N queries of each task followed
    by its m support points; ``t`` is (T, N), which fixes N. Returns the velocity (T, N, d).
    Chapter 5.
    """

    def __init__(self, field: SupportConditionedVelocity) -> None:
        super().__init__()
        self.field = field

    def forward(self, packed: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r"""The field on the unpacked queries and support.

        .. math:: v_\theta(x_{k,n}, t_{k,n} \mid S_k)

        Shapes: ``packed`` (T, N + m, d), ``t`` (T, N); returns (T, N, d). Chapter 5.
        """
        n = t.shape[1]
        return self.field(packed[:, :n], t, packed[:, n:])


def flow_matching_batch(config: TaskConfig, n_tasks: int, generator: torch.Generator,
                        sigma_min: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""One flow-matching batch over ``n_tasks`` random tasks, packed for :class:`PackedTasks`.

    .. math:: x_t = \sigma_t x_0 + t x_1, \qquad \sigma_t = 1 - (1 - \sigma_{\min})\, t, \qquad
        \text{target} = x_1 - (1 - \sigma_{\min})\, x_0

    Per task: a support S (m points) and N = ``config.query_size`` fresh x1 ~ P, x0 ~ N(0, I),
    t ~ U[0, 1). Shapes: returns ``(packed (T, N + m, d) = [x_t; S], t (T, N),
    target (T, N, d))``, T = ``n_tasks``. Chapter 5, section 4.
    """
    support, x1, _ = sample_tasks(config, n_tasks, config.query_size, generator)
    x0 = torch.randn(x1.shape, generator=generator)
    t = torch.rand(x1.shape[:2], generator=generator)
    xt = sample_xt(x0.flatten(0, 1), x1.flatten(0, 1), t.flatten(), sigma_min).reshape(x1.shape)
    return torch.cat([xt, support], dim=1), t, conditional_velocity(x0, x1, sigma_min)


# Training batches drawn by train_conditioner, keyed by all that determines them: the task
# configuration, the number of tasks, sigma_min and the generator's state before the draw. A sweep
# that trains several models with one seed (the exact head on and off, several numbers of heads) so
# draws its tasks once; the batch and the generator's state after the draw are those of a fresh
# draw, so results do not change. Bounded in bytes (least recently used first out); the batches
# are read, never modified in place.
_BATCH_CACHE: OrderedDict[tuple, tuple[tuple[torch.Tensor, ...], torch.Tensor, int]] = OrderedDict()
_BATCH_CACHE_LIMIT = 64 * 2**20
_batch_cache_bytes = 0


def _cached_batch(config: TaskConfig, n_tasks: int, generator: torch.Generator, sigma_min: float
                  ) -> tuple[torch.Tensor, ...]:
    """:func:`flow_matching_batch`, drawn once per (config, n_tasks, sigma_min, generator state)."""
    global _batch_cache_bytes
    key = (repr(asdict(config)), n_tasks, float(sigma_min), generator.get_state().numpy().tobytes())
    hit = _BATCH_CACHE.get(key)
    if hit is not None:
        _BATCH_CACHE.move_to_end(key)
        generator.set_state(hit[1])
        return hit[0]
    batch = flow_matching_batch(config, n_tasks, generator, sigma_min)
    size = sum(a.numel() * a.element_size() for a in batch)
    _BATCH_CACHE[key] = (batch, generator.get_state(), size)
    _batch_cache_bytes += size
    while _batch_cache_bytes > _BATCH_CACHE_LIMIT and _BATCH_CACHE:
        _batch_cache_bytes -= _BATCH_CACHE.popitem(last=False)[1][2]
    return batch


def train_conditioner(model: SupportConditionedVelocity, config: TaskConfig, steps: int,
                      n_tasks: int = 16, lr: float = 1e-3, seed: int = 0,
                      checkpoint: str | os.PathLike | None = None, progress: bool = True,
                      ) -> dict[str, list[float]]:
    r"""Train ``model`` by flow matching over random tasks with :func:`nwflow.train.train_velocity`.

    .. math:: L(\theta) = \frac{1}{T N d} \sum_{k=1}^{T} \sum_{n=1}^{N}
        \big\lVert v_\theta(x_{t,kn}, t_{kn} \mid S_k)
        - (x_{1,kn} - (1 - \sigma_{\min})\, x_{0,kn}) \big\rVert^2

    Each step draws T = ``n_tasks`` tasks from ``config`` (:func:`flow_matching_batch`, N =
    ``config.query_size`` queries per task) and takes one Adam step on L. The checkpoint
    (atomic, resumable) records the task and model configuration, so a resumed run must use
    the same ones. Shapes: the model's d = ``config.dim``. Returns the loss history
    ``{"step": [...], "loss": [...]}``. Chapter 5, section 4.
    """
    check_instance(model, "model", SupportConditionedVelocity)
    if model.dim != config.dim:
        raise ValueError(f"model.dim = {model.dim} but config.dim = {config.dim}")
    run_config: dict[str, Any] = {"task": asdict(config), "n_tasks": n_tasks, "lr": lr, "seed": seed,
                                  "exact_head": model.exact_head, "sigma_min": model.sigma_min,
                                  "parameters": sum(p.numel() for p in model.parameters())}

    device = next(model.parameters()).device

    def batch_fn(step: int, generator: torch.Generator):
        # Tasks are drawn on the CPU (reproducible for any device), then moved.
        return tuple(a.to(device) for a in _cached_batch(config, n_tasks, generator, model.sigma_min))

    return train_velocity(PackedTasks(model), batch_fn, steps, lr=lr, seed=seed, checkpoint=checkpoint,
                          config=run_config, progress=progress, desc="conditioner")


# -- evaluation ----------------------------------------------------------------------------
@torch.no_grad()
def sample_field(field, support: torch.Tensor, n: int, generator: torch.Generator, steps: int = 100
                 ) -> torch.Tensor:
    r"""Samples of a support-conditioned field: Euler from x0 ~ N(0, I) at t = 0 to t = 1.

    .. math:: x_{k+1} = x_k + \frac{1}{K}\, v(x_k, t_k \mid S), \qquad t_k = \frac{k}{K}, \quad
        k = 0, \dots, K - 1

    with K = ``steps``, so the field is never evaluated at t = 1.
    ``field(x (T, n, d), t (0-d), support (T, m, d))`` is a learned model or
    ``lambda x, t, s: support_velocity(x, t, s, sigma_min)``. Shapes: support (T, m, d);
    returns (T, n, d). Chapter 5.
    """
    x0 = torch.randn((support.shape[0], n, support.shape[2]), generator=generator).to(support.device)
    return integrate(lambda x, t: field(x, t, support), x0, steps=steps, method="euler")


@torch.no_grad()
def fm_error_over_t(field, support: torch.Tensor, heldout: torch.Tensor, times: list[float],
                    generator: torch.Generator, sigma_min: float = 0.01) -> np.ndarray:
    r"""Held-out flow-matching error per time.

    .. math:: E(t) = \mathbb{E} \big\lVert v(x_t, t \mid S) - (x_1 - (1 - \sigma_{\min})\, x_0) \big\rVert^2,
        \qquad x_t = \sigma_t x_0 + t x_1

    x1 are held-out points of each task (not in the support), x0 fresh noise. Its excess over
    the population field's value is E ||v - u_P||^2 (the conditional target's variance does
    not depend on v), so differences between fields are differences in velocity error.
    Shapes: support (T, m, d), heldout (T, n, d); returns (len(times),) averaged over tasks
    and points (sum over coordinates). Chapter 5, section 4.
    """
    out = []
    for t in times:
        x0 = torch.randn(heldout.shape, generator=generator).to(heldout.device)
        xt = sample_xt(x0, heldout, t, sigma_min)
        target = conditional_velocity(x0, heldout, sigma_min)
        v = field(xt, torch.tensor(t, device=heldout.device), support)
        out.append(float((v - target).square().sum(-1).mean()))
    return np.array(out)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..m along the last axis, tied values given the mean of their ranks (what
    ``scipy.stats.rankdata(x, axis=-1)`` returns for finite x; numpy only, so importing this
    module does not import scipy.stats)."""
    m = x.shape[-1]
    order = np.argsort(x, axis=-1, kind="stable")
    flat = np.take_along_axis(x, order, axis=-1).reshape(-1, m)
    starts = np.ones(flat.shape, dtype=bool)           # a new group of ties at every row start ...
    starts[:, 1:] = flat[:, 1:] != flat[:, :-1]         # ... and wherever the sorted value changes
    group = np.cumsum(starts.ravel()) - 1
    position = np.tile(np.arange(1, m + 1, dtype=np.float64), flat.shape[0])
    mean_rank = np.bincount(group, weights=position) / np.bincount(group)
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, mean_rank[group].reshape(x.shape), axis=-1)
    return ranks


def rank_correlation(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    r"""Spearman's rho between the last axes of ``a`` and ``b`` (broadcast), row by row.

    .. math:: \rho = \frac{\sum_j (r_j - \bar r)(q_j - \bar q)}
        {\sqrt{\sum_j (r_j - \bar r)^2 \sum_j (q_j - \bar q)^2}}

    with r and q the ranks of a and b along the last axis, ties averaged (as
    :func:`scipy.stats.spearmanr`): the Pearson correlation of the ranks. Shapes: a (*L, m),
    b (*L, m) broadcast; returns the broadcast leading shape *L; rows with constant ranks give
    NaN. Chapter 5, section 6.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ra = _average_ranks(a)
    rb = _average_ranks(b)
    ra, rb = np.broadcast_arrays(ra, rb)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    den = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(-1) / den
