r"""Empirical Flow Matching: regress on a Monte Carlo estimate of the closed-form velocity.

Book: Part II, chapter 6 (``book/part2_papers/06_empirical_flow_matching``), after
Bertrand, Gagneux, Massias and Emonet, "On the Closed-Form of Flow Matching: Generalization
Does Not Arise from Target Stochasticity" (arXiv 2506.03719), eqs. (7)-(8) and Algorithm 2.

Conditional flow matching (CFM) regresses v_theta(x_t, t) on the conditional target

.. math:: u_{\rm cond} = x_1 - (1 - \sigma_{\min})\, x_0 = \frac{x_1 - (1 - \sigma_{\min})\, x_t}{\sigma_t},

an unbiased but noisy estimate of the closed-form velocity u(x_t, t) = E[u_cond | x_t]
(:func:`nwflow.velocity`). EFM-M replaces it by a self-normalised average over M reference
points b^(1..M), of which the FIRST is the point x1 that generated x_t (eq. (EFM)):

.. math::

    u_M(x, t) = \sum_{j=1}^M \lambda_j\, \frac{b^{(j)} - (1 - \sigma_{\min})\, x}{\sigma_t}, \qquad
    \lambda_j = \operatorname{softmax}_j\Big(-\frac{\|x - t b^{(j)}\|^2}{2\sigma_t^2}\Big),

    b^{(1)} = x_1, \qquad b^{(2)}, \dots, b^{(M)} \ \text{i.i.d. uniform over the training set.}

(The paper writes sigma_min = 0, sigma_t = 1 - t; its eq. (8) prints the softmax over all n
training points, but Algorithm 2 and Appendix B.1 take it over the M references, as here.)
Proposition 2 of the paper: given x_t = x, b^(1) is a draw from the posterior
w_j(x, t) (:func:`nwflow.posterior_weights`), and then, for every M >= 1 (unbiased, and
never noisier than CFM),

.. math::

    E[u_M(x, t)] = u(x, t), \qquad
    \operatorname{Var}[u_M(x, t)] \le \operatorname{Var}[u_{\rm cond} \mid x_t = x].

Drawing b^(1) uniformly instead gives a plain self-normalised importance-sampling estimate,
which is biased. M = 1 is CFM exactly: the softmax over one point is 1.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nwflow._checks import (
    check_callable,
    check_choice,
    check_float_tensor,
    check_optional_positive_int,
    check_positive_int,
    check_probability,
    check_real,
    check_same_device,
    check_same_shape,
    check_sigma_min,
    check_support,
)
from nwflow._precision import WIDE, exact_matmul
from nwflow._stream import softmax_mean
from nwflow.empirical import EmpiricalField
from nwflow.path import conditional_target, conditional_velocity, sample_xt, sigma, time_per_row
from nwflow.solvers import VelocityFn, integrate

__all__ = [
    "efm_target",
    "TargetSampler",
    "hybrid_field",
    "hybrid_samples",
    "alignment",
    "field_error",
]

def efm_target(
    x: torch.Tensor,
    t: float | torch.Tensor,
    x1: torch.Tensor,
    references: torch.Tensor,
    sigma_min: float = 0.0,
) -> torch.Tensor:
    r"""The EFM-M target u_M(x, t) of eq. (EFM) (module docstring; paper eq. (8)).

    .. math:: u_M(x, t) = \sum_{j=1}^M \lambda_j\, \frac{b^{(j)} - (1 - \sigma_{\min})\, x}{\sigma_t},
        \quad \lambda_j = \operatorname{softmax}_j\Big(-\frac{\|x - t b^{(j)}\|^2}{2\sigma_t^2}\Big)

    with b^(1) = x1 and b^(2..M) the references. It is computed as
    (m - (1 - sigma_min) x) / sigma_t with m = lambda_1 x1 + (1 - lambda_1) m_ref, m_ref the
    kernel mean of the references alone.

    Shapes: ``x`` = x_t and ``x1`` (B, *S); ``t`` a number, 0-d or (B,) tensor in [0, 1]
    (t = 1 needs sigma_min > 0); ``references`` either (K, *S), shared by every row (the
    cheap form used in training: one (B, K) matrix product), or (B, K, *S), one set per row;
    M = K + 1 and K = 0 gives the conditional target. Returns (B, *S) in the dtype of ``x``,
    computed in float64. For an unbiased estimate of :func:`nwflow.velocity`, ``x1`` must be
    the point that generated ``x`` (a posterior draw) and the references uniform draws from
    the training set, independent of ``x``. Chapter 6.
    """
    check_float_tensor(x, "x")
    check_float_tensor(x1, "x1")
    check_same_shape(x, x1, "x", "x1")
    check_float_tensor(references, "references")
    sigma_min = check_sigma_min(sigma_min)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, *S) with at least 2 dimensions, got {tuple(x.shape)}")
    B, S = x.shape[0], tuple(x.shape[1:])
    if references.dim() == x.dim() and tuple(references.shape[1:]) == S:
        shared = True
    elif references.dim() == x.dim() + 1 and references.shape[0] == B and tuple(references.shape[2:]) == S:
        shared = False
    else:
        raise ValueError(
            f"references must have shape (K, {', '.join(map(str, S))}) (shared) or "
            f"({B}, K, {', '.join(map(str, S))}) (per row), got {tuple(references.shape)}"
        )
    for name, other in (("x1", x1), ("references", references)):
        check_same_device(x, other, "x", name)
        if other.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {other.dtype}")
    # The estimator is formed in the wide dtype: near t = 1 the logits scale like
    # 1 / sigma_t^2 and (m - x) / sigma_t cancels, so fp32 would lose the target there.
    tt = time_per_row(t, x, sigma_min=sigma_min, dtype=WIDE)
    xf = x.reshape(B, -1).to(WIDE)
    b1 = x1.reshape(B, -1).to(WIDE)
    inv2s2 = 1.0 / (2.0 * sigma(tt, sigma_min).square())
    # The generating point's logit in the direct form: no cancellation even as t -> 1.
    l1 = -(xf - tt[:, None] * b1).square().sum(dim=1) * inv2s2  # (B,)
    if references.shape[0 if shared else 1] == 0:
        m = b1                                                   # M = 1: the conditional target
    else:
        with exact_matmul():
            if shared:
                R = references.reshape(references.shape[0], xf.shape[1]).to(WIDE)     # (K, D)
                # ||x - t b||^2 = ||x||^2 - 2 t <x, b> + t^2 ||b||^2; the ||x||^2 term is constant
                # in j but kept so that l1 and lk share one scale (l1 is not a GEMM entry).
                d2 = (xf.square().sum(1)[:, None] - 2.0 * tt[:, None] * (xf @ R.T)
                      + tt.square()[:, None] * R.square().sum(1)[None, :]).clamp_min(0.0)
            else:
                R = references.reshape(B, references.shape[1], xf.shape[1]).to(WIDE)  # (B, K, D)
                d2 = (xf[:, None, :] - tt[:, None, None] * R).square().sum(dim=2)
            lk = -d2 * inv2s2[:, None]                                                # (B, K)
            # softmax_j over [l1, lk] is [lambda_1, (1 - lambda_1) softmax_k(lk)]: the kernel mean
            # of the references, mixed with the generating point b^(1) by its weight lambda_1.
            lse = torch.logsumexp(lk, dim=1)
            # Per-row references: each row is its own task, logits (B, 1, K) and values (B, K, D).
            m_refs = softmax_mean(lk, R) if shared else softmax_mean(lk[:, None, :], R)[:, 0]
            m = torch.sigmoid(l1 - lse)[:, None] * b1 + torch.sigmoid(lse - l1)[:, None] * m_refs
    u = conditional_target(xf, m, tt, sigma_min)
    return u.reshape(x.shape).to(x.dtype)


class TargetSampler:
    r"""Training batches for CFM or EFM-M: ``sampler(step, generator) -> (x_t, t, target)``.

    ``TargetSampler(support, batch_size, m=None, sigma_min=0.0, t_max=1.0, references="uniform")``

    .. math:: x_t = \sigma_t x_0 + t x_1, \qquad
        \text{target} = x_1 - (1 - \sigma_{\min})\, x_0 \ \text{(CFM)} \ \text{or} \ u_M(x_t, t)
        \ \text{(EFM-M)}

    Each call draws x0 ~ N(0, I), x1 uniform from ``support`` (n, *S), t ~ U[0, t_max) and
    x_t = sigma_t x0 + t x1 (:func:`nwflow.sample_xt`); it returns x_t (B, *S), t (B,) and the
    target (B, *S), B = ``batch_size``. The target is

    - ``m=None``: the CFM target x1 - (1 - sigma_min) x0 (paper Algorithm 1);
    - ``m=M``, ``references="uniform"``: the EFM-M target :func:`efm_target` with b^(1) = x1
      and M - 1 references drawn uniformly with replacement, shared by the batch (paper
      Algorithm 2): M references per row.
    - ``m=M``, ``references="batch"``: the scheme of the authors' released training code
      (``src/train_cifar10.py`` of github.com/generativemodels/closedformfm: the reference set
      is the whole batch's x1 concatenated with M uniform draws): one shared set
      R = [x1^(1), ..., x1^(B), b^(1), ..., b^(M)] of B + M points, the M draws uniform with
      replacement, and the target is the closed form of R,

      .. math:: \text{target}_i = \sum_{r \in R} \operatorname{softmax}_r\Big(
          -\frac{\|x_t^i - t_i r\|^2}{2\sigma_{t_i}^2}\Big)\,
          \frac{r - (1 - \sigma_{\min})\, x_t^i}{\sigma_{t_i}}.

      Row i's own x1^(i) is in R once and the other B - 1 + M points are uniform draws
      independent of x_t^i, so this is the estimator of :func:`efm_target` with B + M
      references (unbiased, Proposition 2); here M counts the extra draws only.

    Random numbers come from ``generator`` (on the CPU; tensors are moved to the support's
    device), so a seeded generator reproduces the batches. This is the ``batch_fn`` of
    :func:`nwflow.train.train_velocity`. Chapter 6.
    """

    def __init__(self, support: torch.Tensor, batch_size: int, m: int | None = None,
                 sigma_min: float = 0.0, t_max: float = 1.0, references: str = "uniform") -> None:
        self.support = check_support(support)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.m = check_optional_positive_int(m, "m")  # None: CFM, M: EFM-M
        self.sigma_min = check_sigma_min(sigma_min)
        self.t_max = check_real(t_max, "t_max", 0.0, 1.0, low_open=True)
        self.references = check_choice(references, "references", ("uniform", "batch"))

    def __repr__(self) -> str:
        kind = ("CFM" if self.m is None else f"EFM-{self.m}"
                + (" (batch + M references)" if self.references == "batch" else ""))
        return (f"TargetSampler({kind}, n={self.support.shape[0]}, batch_size={self.batch_size}, "
                f"sigma_min={self.sigma_min})")

    def __call__(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
        sup = self.support
        n, B, dev = sup.shape[0], self.batch_size, sup.device
        idx = torch.randint(n, (B,), generator=generator).to(dev)
        x1 = sup[idx]
        x0 = torch.randn(x1.shape, generator=generator, dtype=sup.dtype).to(dev)
        t = (self.t_max * torch.rand(B, generator=generator, dtype=torch.float64)).to(dev, sup.dtype)
        # t ~ U[0, 1) can round to 1.0 in fp32; keep it strictly inside when sigma_min = 0.
        if self.sigma_min == 0.0:
            t = t.clamp_max(torch.nextafter(torch.ones((), dtype=t.dtype), torch.zeros((), dtype=t.dtype)))
        xt = sample_xt(x0, x1, t, self.sigma_min)
        if self.m is None:
            target = conditional_velocity(x0, x1, self.sigma_min)
        elif self.references == "batch":
            ref = torch.randint(n, (self.m,), generator=generator).to(dev)
            target = _batch_set_target(xt, t, torch.cat([x1, sup[ref]]), self.sigma_min)
        else:
            ref = torch.randint(n, (self.m - 1,), generator=generator).to(dev)
            target = efm_target(xt, t, x1, sup[ref], self.sigma_min)
        return xt, t, target


def _batch_set_target(x: torch.Tensor, t: torch.Tensor, points: torch.Tensor,
                      sigma_min: float) -> torch.Tensor:
    r"""The closed form of one small set R shared by the batch, whose first B rows are the rows' own x1.

    .. math:: \text{target}_i = \sum_{r \in R} \operatorname{softmax}_r\Big(
        -\frac{\|x^i - t_i r\|^2}{2\sigma_{t_i}^2}\Big)\, \frac{r - (1 - \sigma_{\min})\, x^i}{\sigma_{t_i}}

    In float64, like :func:`efm_target`: the squared distances from one (B, |R|) matrix
    product, except row i's distance to its own x1 (column i), formed directly so that it
    keeps its precision as t -> 1 (it is the one that carries the weight there). Shapes:
    ``x`` (B, *S), ``t`` (B,), ``points`` (B + M, *S); returns (B, *S) in the dtype of ``x``.
    """
    B = x.shape[0]
    tt = time_per_row(t, x, sigma_min=sigma_min, dtype=WIDE)
    xf = x.reshape(B, -1).to(WIDE)
    R = points.reshape(points.shape[0], -1).to(WIDE)
    with exact_matmul():
        d2 = (xf.square().sum(1)[:, None] - 2.0 * tt[:, None] * (xf @ R.T)
              + tt.square()[:, None] * R.square().sum(1)[None, :]).clamp_min(0.0)
    rows = torch.arange(B, device=x.device)
    d2[rows, rows] = (xf - tt[:, None] * R[:B]).square().sum(1)
    m = softmax_mean(-d2 / (2.0 * sigma(tt, sigma_min).square())[:, None], R)
    return conditional_target(xf, m, tt, sigma_min).reshape(x.shape).to(x.dtype)


def hybrid_field(first: VelocityFn, second: VelocityFn, tau: float) -> VelocityFn:
    r"""The switched field of the paper's Figure 3: ``first`` on [0, tau), ``second`` on [tau, 1].

    .. math:: u_\tau(x, t) = \begin{cases} u_{\rm first}(x, t), & t < \tau, \\
        u_{\rm second}(x, t), & t \ge \tau \end{cases}

    Shapes: ``x`` (B, *S) and the result (B, *S); ``t`` is the solver's 0-d time
    (:func:`nwflow.solvers.integrate`); put tau on the solver's grid so that the switch
    happens exactly at a step boundary. tau = 0 is ``second`` alone,
    tau = 1 is ``first`` alone. Chapter 6.
    """
    check_callable(first, "first")
    check_callable(second, "second")
    tau = check_probability(tau, "tau")

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.numel() != 1:
            raise ValueError("hybrid_field needs one time for the whole batch (a number or 0-d tensor)")
        return first(x, t) if float(t) < tau else second(x, t)

    return field


@torch.no_grad()
def hybrid_samples(first: VelocityFn, second: VelocityFn, x0: torch.Tensor, taus: list[float],
                   steps: int = 50) -> torch.Tensor:
    r"""End points of the hybrid sampler for several switching times (paper Figure 3).

    .. math:: x_{k+1} = x_k + h\, u_\tau(x_k, t_k), \qquad t_k = k h, \quad h = 1 / \text{steps}

    For each tau: Euler on the grid t_k = k / steps, following ``first`` on [0, tau) and
    ``second`` on [tau, 1] (:func:`hybrid_field`), from the same ``x0`` (B, *S). The path of
    ``first`` is integrated once and shared by all tau. Every tau must be a multiple of
    1 / steps. Returns (len(taus), B, *S). Chapter 6.
    """
    steps = check_positive_int(steps, "steps")
    ks = []
    for i, tau in enumerate(taus):
        tau = check_probability(tau, f"taus[{i}]")
        k = round(tau * steps)
        if abs(k - tau * steps) > 1e-9:
            raise ValueError(f"tau = {tau} is not on the grid k / {steps}: choose steps so that it is")
        ks.append(k)
    k_max = max(ks)
    if k_max > 0:
        _, path, _ = integrate(first, x0, 0.0, k_max / steps, steps=k_max, return_trajectory=True)
    else:
        path = x0[None]
    out = []
    for k in ks:
        x = path[k]
        if k < steps:
            x = integrate(second, x, k / steps, 1.0, steps=steps - k)
        out.append(x)
    return torch.stack(out)


def _on_paths(support: torch.Tensor, times: torch.Tensor, x0: torch.Tensor, index: torch.Tensor,
              sigma_min: float) -> tuple[torch.Tensor, Iterator[tuple[float, torch.Tensor, torch.Tensor]]]:
    """x1 = support[index] (checked against x0) and, lazily, (t_k, x_t, u(x_t, t_k)) for each
    t_k of ``times``, x_t = sigma_t x0 + t_k x1, from one field of the support."""
    field = EmpiricalField(support, sigma_min=sigma_min)
    x1 = support[index]
    check_same_shape(x0, x1, "x0", "support[index]")

    def points() -> Iterator[tuple[float, torch.Tensor, torch.Tensor]]:
        for t in times.tolist():
            xt = sample_xt(x0, x1, t, sigma_min)
            yield t, xt, field.velocity(xt, t)

    return x1, points()


def alignment(support: torch.Tensor, times: torch.Tensor, x0: torch.Tensor, index: torch.Tensor,
              sigma_min: float = 0.0) -> torch.Tensor:
    r"""Cosine similarity between the closed-form velocity and the conditional target (paper Fig. 1a).

    .. math:: c_{k i} = \cos\big(u(x_t, t_k),\ x_1^i - (1 - \sigma_{\min})\, x_0^i\big), \qquad
        x_t = \sigma_{t_k} x_0^i + t_k x_1^i

    with x1_i = support[index_i].

    Shapes: ``support`` (n, *S), ``times`` (T,) in [0, 1) (t = 1 needs sigma_min > 0),
    ``x0`` (B, *S), ``index`` (B,) integer rows of the support. Returns (T, B) in float64.
    Near 1 once the posterior has collapsed onto the generating point: from then on CFM's
    target is (nearly) deterministic. Chapter 6.
    """
    from nwflow.metrics import cosine_similarity

    x1, points = _on_paths(support, times, x0, index, sigma_min)
    u_cond = conditional_velocity(x0, x1, sigma_min)
    return torch.stack([cosine_similarity(u, u_cond).to(WIDE) for _, _, u in points])


@torch.no_grad()
def field_error(model: VelocityFn, support: torch.Tensor, times: torch.Tensor, x0: torch.Tensor,
                index: torch.Tensor, sigma_min: float = 0.0) -> torch.Tensor:
    r"""Mean squared error between a learned field and the closed form over t (paper Fig. 2 left).

    .. math:: e(t_k) = \frac{1}{B D} \sum_{i=1}^B \|v_\theta(x_t, t_k) - u(x_t, t_k)\|^2, \qquad
        x_t = \sigma_{t_k} x_0^i + t_k x_1^i

    with v_theta = ``model``, x1_i = support[index_i] and D the number of values per sample (a per-coordinate
    error, comparable across image sizes). Shapes: ``support`` (n, *S), ``times`` (T,),
    ``x0`` (B, *S), ``index`` (B,). Returns (T,) in float64. Chapter 6.
    """
    _, points = _on_paths(support, times, x0, index, sigma_min)
    out = []
    for t, xt, u in points:
        tt = torch.full((xt.shape[0],), t, dtype=xt.dtype, device=xt.device)
        out.append((model(xt, tt) - u).to(WIDE).square().mean())
    return torch.stack(out)
