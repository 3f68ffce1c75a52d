r"""The accuracy policy of the exact engine: when a streamed row is trusted, refined or redone.

Book: Part I, chapter 3 (why the last digits of the closed form need care near t = 1).

The engine (:mod:`nwflow.empirical`) streams each row's logits
l_j = <q, x^(j)> - a ||x^(j) - c||^2 in the compute dtype (fp32 or fp64). Three rules, with
every constant they use here and nowhere else (the carried screen's too):

1. An a-priori bound on each row's logit rounding error (:func:`logit_error_bound`):
   |<q, x^(j)>| <= ||q|| max_j ||x^(j)|| and a ||x^(j) - c||^2 <= a max_j ||x^(j) - c||^2, each
   rounded to a few eps of its size.
2. Candidate refinement. Logits scale like 1 / sigma_t^2: near t = 1 the bound is many units,
   enough to reweigh two nearly equidistant points, but there the weight sits on a handful of
   points. Each row keeps its :data:`CANDIDATES` largest logits; a row is *covered*
   (:func:`covered`) when every other logit lies so far below the maximum (twice the bound plus
   log n + log(1/eps)) that their total weight is below eps at any rounding; it is then
   recomputed from its candidates alone in float64 with explicit differences.
3. Float64 fallback. Where the weights stay spread, a logit error delta_j moves the mean by
   sum_j w_j delta_j (x^(j) - m): at most (bound) x (weighted standard deviation of the support)
   (:func:`relative_error`). Where that estimate of an fp32 row exceeds :data:`FALLBACK_TOL`,
   the rounding actually made is measured on the row's top :data:`OBSERVED` candidates (with a
   margin :data:`OBSERVED_SAFETY`, capped by the bound); a row still above it gets its
   :data:`CANDIDATES` largest terms weighed exactly (:func:`top_corrected`), which leaves only
   the tail's rounding, and is tested again; a row still above the tolerance is recomputed in
   float64 from the keys it keeps, or by a float64 pass over the support (rare: low-dimensional
   data with soft weights).

Which keys a row keeps (Part III, chapter 9): those within :func:`screen_margin` of its largest
logit, or, where the logits are at hand, the fewer that the a-posteriori :func:`tail_cut` needs
(:func:`kept_keys`); either way the keys left out weigh less than eps e^-2 at any rounding, or,
where the engine's full pass cuts for a mean output, move that output by at most eps of its size.
"""

from __future__ import annotations

import math

import torch

from nwflow._precision import ERROR_FACTOR, WIDE
from nwflow._stream import take_rows

__all__ = ["CANDIDATES", "FALLBACK_TOL", "OBSERVED", "OBSERVED_SAFETY", "SCREEN_MAX", "CARRY_SLACK",
           "REFINE_MAX",
           "logit_error_bound", "tracks_candidates", "covered", "refine", "observed_error", "relative_error",
           "span_fit", "sq_distances", "screen_margin", "tail_cut", "kept_keys", "screened", "carried_floor",
           "exact_logits",
           "top_corrected"]

# Candidates per row kept for the exact refinement.
CANDIDATES = 64
# Rows whose logit error bound is below this many eps are accurate as streamed.
REFINE_FROM = 16.0
# An fp32 row whose estimated relative error exceeds this is recomputed in float64.
FALLBACK_TOL = 5e-5
# Logits whose rounding is measured before a float64 fallback, and the margin put on the
# largest error seen among them.
OBSERVED = 8
OBSERVED_SAFETY = 8.0
# The carried screen (nwflow.empirical, Part III, performance): candidates a screened row may
# keep (more: the full pass), and the largest logit slack a carried row may have.
SCREEN_MAX = 128
CARRY_SLACK = 64.0
# A float32 row that fails the accuracy test but keeps at most this many keys under the covering
# margin is redone from them in float64 (a float64 pass over the whole support otherwise).
REFINE_MAX = 2048


def logit_error_bound(q: torch.Tensor, a: torch.Tensor, eps: float, raw_max: float,
                      centred_max2: float) -> torch.Tensor:
    r"""A-priori bound on each row's logit rounding error, (B,) float64.

    .. math:: |\delta_j| \le 4 \epsilon \big(\|q\| \max_j \|x^{(j)}\| + a \max_j \|x^{(j)} - c\|^2\big)

    Shapes: ``q`` (B, D), ``a`` (B,); ``raw_max`` = max_j ||x^(j)||, ``centred_max2`` =
    max_j ||x^(j) - c||^2. Chapter 3.
    """
    q_norm = torch.linalg.vector_norm(q, dim=1).to(WIDE)
    return ERROR_FACTOR * eps * (q_norm * raw_max + a.to(WIDE) * centred_max2)


def tracks_candidates(error: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows (B,) whose logits can be off by more than a few eps: candidates are kept for them."""
    return error > REFINE_FROM * eps


def covered(error: torch.Tensor, top: torch.Tensor, n: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Rows whose weight provably sits on their candidates (B,), and how many each needs (B,).

    .. math:: l_k < \max_j l_j - (2 \bar\delta + \log n + \log(1/\epsilon) + 2)
        \;\Rightarrow\; \textstyle\sum_{k \notin \text{candidates}} w_k < \epsilon

    Shapes: ``error`` (B,) the bound, ``top`` (B, K) each row's largest logits, descending.
    Chapter 3.
    """
    inside = (top.to(WIDE) >= (top[:, 0].to(WIDE) - screen_margin(error, n, eps))[:, None]).sum(dim=1)
    # With all n points among the candidates every row is covered.
    return ((inside < top.shape[1]) | (top.shape[1] == n)) & tracks_candidates(error, eps), inside


def sq_distances(x: torch.Tensor, t: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    r"""Squared distances ||x - t x^(k)||^2 (r, k), from explicit differences (no cancellation).

    .. math:: d_k^2 = \|x - t x^{(k)}\|^2 = t^2 \|x / t - x^{(k)}\|^2 \quad (t > 0), \qquad
        d_k^2 = \|x\|^2 \quad (t = 0)

    Formed as t^2 times ``torch.cdist`` of x / t against the candidates in its explicit-difference
    mode: no (r, k, D) temporary (three of them made the refinement cost more than the row's
    share of the matrix products at D = 3,072). Rounding x / t moves each coordinate by at most
    eps |x_i|, as rounding t x^(k) would. Shapes: ``x`` (r, D), ``t`` (r,), ``candidates``
    (r, k, D), float64. Chapter 3.
    """
    scale = torch.where(t > 0, t, torch.ones_like(t))
    d = torch.cdist((x / scale[:, None])[:, None, :], candidates, compute_mode="donot_use_mm_for_euclid_dist")
    return torch.where((t > 0)[:, None], (scale[:, None] * d[:, 0]).square_(), x.square().sum(dim=1)[:, None])


def refine(x: torch.Tensor, t: torch.Tensor, candidates: torch.Tensor, sigma_t: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Exact weights over each row's candidates, with explicit differences (no cancellation).

    .. math:: w_k = \operatorname{softmax}_k\Big(-\frac{\|x - t x^{(k)}\|^2}{2\sigma_t^2}\Big), \quad
        m = \sum_k w_k x^{(k)}, \quad n_{\rm eff} = 1 / \textstyle\sum_k w_k^2

    The distances from :func:`sq_distances`. Shapes: ``x`` (r, D), ``t`` and ``sigma_t`` (r,),
    ``candidates`` (r, k, D), all float64; returns the mean (r, D), n_eff (r,) and the weights
    (r, k). Chapter 3.
    """
    w = torch.softmax(sq_distances(x, t, candidates).div_(-2.0 * sigma_t.square()[:, None]), dim=1)
    return torch.bmm(w[:, None, :], candidates)[:, 0], 1.0 / w.square().sum(dim=1), w


def exact_logits(x: torch.Tensor, t: torch.Tensor, candidates: torch.Tensor, center: torch.Tensor,
                 sigma_t: torch.Tensor) -> torch.Tensor:
    r"""The streamed logits of candidate keys, recomputed in float64 with explicit differences, (r, k).

    The streamed logits are l_k = (t <y, x^(k)> - t^2 ||x^(k) - c||^2 / 2) / sigma_t^2 with
    y = x - t c, that is, written with explicit differences,

    .. math::

        l_k = \frac{\|y\|^2 - \|y - t (x^{(k)} - c)\|^2}{2 \sigma_t^2}
            + \frac{t \langle y, c\rangle}{\sigma_t^2}.

    Shapes: ``x`` (r, D), ``t`` and ``sigma_t`` (r,), ``candidates`` (r, k, D), ``center``
    (D,), float64. Chapter 3.
    """
    y = x - t[:, None] * center
    z2 = sq_distances(x, t, candidates)  # = ||y - t (x^(k) - c)||^2
    shift = y.square().sum(dim=1) + 2.0 * t * (y @ center)
    return (shift[:, None] - z2) / (2.0 * sigma_t.square()[:, None])


def observed_error(logits: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Largest rounding error of streamed ``logits`` (r, k) against :func:`exact_logits` (r, k), (r,)."""
    return (logits.to(WIDE) - exact).abs().amax(dim=1)


def top_corrected(total: torch.Tensor, mean: torch.Tensor, row_max: torch.Tensor, top: torch.Tensor,
                  exact: torch.Tensor, candidates: torch.Tensor, slack: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""A streamed row's mean with its K largest terms weighed exactly, and a bound on the weight
    of the terms left as streamed, (r, D) and (r,).

    .. math::

        \Delta_k = e^{l_k - M} - e^{\tilde l_k - M}, \qquad
        m = \frac{Z \tilde m + \sum_k \Delta_k x^{(k)}}{Z + \sum_k \Delta_k}, \qquad
        W_{\rm tail} \le \frac{e^{s} (Z - \sum_k e^{\tilde l_k - M} + 4 \epsilon Z)}{\sum_k e^{l_k - M}}

    with Z, M and m~ the pass's normaliser, maximum and mean, l~_k its logits of the candidates
    and l_k the exact ones (:func:`exact_logits`). Only the tail's logits are still off by up to
    s, so the mean's first-order error sum_j w_j delta_j (x^(j) - m) shrinks from
    s sd_w to s sqrt(W_tail) sd_w (Cauchy-Schwarz over the tail): a row whose weight sits on a few
    points but whose tail is long needs no float64 pass. Shapes: ``total``, ``row_max``, ``slack``
    (r,); ``mean`` (r, D); ``top``, ``exact`` (r, K); ``candidates`` (r, K, D); float64. Part III,
    performance.
    """
    streamed = torch.exp(top - row_max[:, None])
    weighed = torch.exp(exact - row_max[:, None])
    delta = weighed - streamed
    corrected = (total[:, None] * mean + torch.bmm(delta[:, None, :], candidates)[:, 0]) / (
        total + delta.sum(dim=1))[:, None]
    rest = (total - streamed.sum(dim=1) + ERROR_FACTOR * eps * total).clamp_min(0.0)
    return corrected, (torch.exp(slack) * rest / weighed.sum(dim=1)).clamp_max(1.0)


def relative_error(error: torch.Tensor, eps: float, m: torch.Tensor, x: torch.Tensor, spread: torch.Tensor,
                   center: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Estimated relative error (B,) of a streamed output y = (a m - b x) / c.

    .. math:: \frac{\|\Delta y\|}{\|y\|} \lesssim
        \frac{a(\bar\delta\, \mathrm{sd}_w + 4\epsilon(\|m\| + \mathrm{sd}_w)) + \epsilon (a \|m\| + b \|x\|)}
             {\|a m - b x\|}

    sd_w is the weighted standard deviation of the support, from ``spread`` =
    sum_j w_j ||x^(j) - c||^2. The errors need not average out: near a zero of the velocity,
    correlated errors over a cluster were seen not to. c cancels. Shapes: ``error``, ``spread``,
    ``a``, ``b`` (B,); ``m``, ``x`` (B, D) float64; ``center`` (D,). Chapter 3.
    """
    sd = (spread - (m - center).square().sum(dim=1)).clamp_min(0.0).sqrt()
    m_norm = m.norm(dim=1)
    dm = error * sd + ERROR_FACTOR * eps * (m_norm + sd)
    y = a[:, None] * m - b[:, None] * x
    return (a * dm + eps * (a * m_norm + b * x.norm(dim=1))) / y.norm(dim=1)


def span_fit(x: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Coefficients of each row of ``x`` on its basis vectors, and the residual's norm, computed
    explicitly (the screen's bound holds for any coefficients; least squares makes it tight).

    .. math:: \gamma = \arg\min_\gamma \|x - V^\top \gamma\|, \qquad \rho = \|x - V^\top \gamma\|

    Shapes: ``x`` (r, D), ``basis`` V (r, k, D), float64; returns gamma (r, k) and rho (r,).
    Part III, performance.
    """
    gram = torch.bmm(basis, basis.transpose(1, 2))
    gamma = (torch.linalg.pinv(gram, hermitian=True) @ torch.bmm(basis, x[:, :, None]))[:, :, 0]
    return gamma, (x - torch.bmm(gamma[:, None, :], basis)[:, 0]).norm(dim=1)


def screen_margin(slack: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    r"""How far below the largest approximate logit a key may lie and still be kept, (r,).

    .. math:: |\tilde l_j - l_j| \le s \;\forall j, \quad
        \tilde l_k < \max_j \tilde l_j - (2 s + \log n + \log(1/\epsilon) + 2)
        \;\Rightarrow\; l_k < \max_j l_j - \log(n/\epsilon) - 2,

    so the keys left out weigh less than eps e^{-2} in total. Shapes: ``slack`` s (r,). Part III,
    performance.
    """
    return 2.0 * slack + math.log(n) + math.log(1.0 / eps) + 2.0


def tail_cut(logits: torch.Tensor, slack: torch.Tensor, eps: float, room: torch.Tensor | None = None
             ) -> torch.Tensor:
    r"""Which keys each row must keep so that the others provably weigh less than eps e^-2, (r, n),
    or with ``room``, so that leaving them out moves the row's output by at most eps of its size.

    .. math:: |\tilde l_j - l_j| \le s, \quad
        4 e^{2s} \sum_{k \notin K} e^{\tilde l_k} \le \alpha \sum_j e^{\tilde l_j}
        \;\Rightarrow\; W = \sum_{k \notin K} w_k < \alpha, \qquad \alpha = \epsilon e^{-2}

    The a-posteriori form of :func:`screen_margin`, which assumes that all n keys sit at the
    cut: here the weight actually below each candidate cut is summed, so a row whose logits fall
    off fast keeps far fewer keys (at t = 0.1 on 20,000 Gaussian points in 3,072 dimensions, a
    median of about 300 instead of 820). Cuts are whole nats below the row's maximum: the keys
    are binned by floor(max - l) (the last bin, log 64 below the margin, takes every key below
    it, each counted at the bin's upper edge), and K
    is the keys above the first bin from which the weight down to the end fits the allowance
    (every key when none fits). The factor 4 covers the float32 rounding of the weights and of
    their sums (each within a factor 2 while n eps < 1/2; larger supports are summed in float64).

    ``room`` (r,) is, for a mean output y = (a m - b x) / c (a > 0), h = ||a x^(b) - b x|| / (2 a R)
    with b the row's largest computed logit and R = max_j ||x^(j) - c|| (:meth:`EmpiricalField._room`).
    Leaving out K's complement moves the mean by m - m_K = sum_{k not in K} w_k (x^(k) - m_K), at
    most 2 R W, and the output by 2 a R W / c; and ||a m - b x|| >= 2 a R (h - (1 - w_b)), since
    ||m - x^(b)|| <= 2 R (1 - w_b), with 1 - w_b <= e^{2s} rho, rho = sum_{j != b} e^{l~_j - l~_b}
    (the binned sum less the maximum's 1, plus its float32 rounding). So

    .. math:: \alpha = \max\big(\epsilon e^{-2},\ \epsilon\, (h - e^{2s} \rho)\big)
        \;\Rightarrow\; \|\Delta y\| \le \epsilon \|y\|,

    the size of the output's own float32 rounding (capped at 1/2: the largest key is always kept).
    Shapes: ``logits`` (r, n), ``slack`` s (r,), ``room`` (r,) float64. Part III, performance.
    """
    r, n = logits.shape
    # The last bin starts far enough down that its keys, counted at its upper edge, leave 15/16
    # of the allowance (the total is at least the largest key's e^0 = 1).
    last = int(math.ceil(float(screen_margin(slack.max(), n, eps)) + math.log(64.0)))
    # Work along whichever axis is contiguous: the engine's logits are a transposed (n, r) block.
    keys = 0 if not logits.is_contiguous() and logits.T.is_contiguous() else 1
    lay = logits.T if keys == 0 else logits
    gaps = (lay.amax(dim=keys, keepdim=True) - lay).clamp_(max=last)
    bins = gaps.to(torch.int64)                     # truncation is the floor: gaps >= 0
    # In place (the gaps are not needed again); the clamp keeps exp away from denormals and
    # counts each key of the last bin at e^-last, above its weight.
    weights = gaps.neg_().exp_()
    if n * torch.finfo(weights.dtype).eps > 0.5:
        weights = weights.to(WIDE)
    shape = (last + 1, r) if keys == 0 else (r, last + 1)
    mass = weights.new_zeros(shape).scatter_add_(keys, bins, weights).to(WIDE)
    mass = mass.T if keys == 0 else mass                # (r, last + 1)
    below = mass.flip(1).cumsum(1).flip(1)          # the weight in bins >= b
    grow = torch.exp(2.0 * slack.to(WIDE))
    alpha = torch.full((r,), eps * math.exp(-2.0), dtype=WIDE, device=logits.device)
    if room is not None:
        # rho from the binned total: each weight within (last + 2) eps of its value, each bin's sum
        # within n eps of its own (twice that, for slack).
        total, tiny = below[:, 0], torch.finfo(weights.dtype).eps
        rho = (total - 1.0 + 2.0 * (n + last + 2) * tiny * total).clamp_min(0.0)
        alpha = torch.maximum(alpha, eps * (room.to(WIDE) - grow * rho)).clamp_max(0.5)
    allowed = alpha * mass[:, :last].sum(dim=1) / (4.0 * grow)
    fits = below <= allowed[:, None]
    cut = torch.where(fits.any(dim=1), fits.to(torch.int8).argmax(dim=1), last + 1)
    return (bins < cut[None, :]).T if keys == 0 else bins < cut[:, None]


def kept_keys(logits: torch.Tensor, slack: torch.Tensor, n: int, eps: float, low: int, high: int,
              room: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys each row keeps (r, n) and how many (r,): those within :func:`screen_margin` of its
    maximum, or for a row with more than ``low`` and at most ``high`` of them, those of its
    :func:`tail_cut` (never more, and as safe: two passes over a row for the margin, about ten
    for the cut, spent only where fewer keys would change what the row costs). ``logits`` (r,
    n), each within ``slack`` (r,) of the exact one; ``room`` (r,): the cut's allowance for a mean
    output (:func:`tail_cut`). Part III, performance."""
    # Along whichever axis is contiguous, as in tail_cut (the mask comes back in the same layout).
    keys = 0 if not logits.is_contiguous() and logits.T.is_contiguous() else 1
    lay = logits.T if keys == 0 else logits
    best = lay.amax(dim=keys, keepdim=True)
    cut = best.to(WIDE) - (screen_margin(slack, n, eps)[None, :] if keys == 0
                                 else screen_margin(slack, n, eps)[:, None])
    keep = lay >= cut.to(logits.dtype)
    # int32 counts (n < 2^31): summing the bools into int64 took twice as long (58 ms against
    # 32 ms for a (50,000, 256) mask on two threads).
    count = keep.sum(dim=keys, dtype=torch.int32)
    keep = keep.T if keys == 0 else keep
    rows = ((count > low) & (count <= high)).nonzero().squeeze(1)
    if rows.numel():
        cut = tail_cut(take_rows(logits, rows), slack[rows], eps, None if room is None else room[rows])
        if keys == 0:
            keep.T[:, rows] = cut.T             # columns of the (n, r) mask: one read, not strided rows
        else:
            keep[rows] = cut
        count[rows] = cut.sum(dim=1, dtype=count.dtype)
    return keep, count


def carried_floor(previous: torch.Tensor, mu: torch.Tensor, residual: torch.Tensor, reach: torch.Tensor,
                  rounding: torch.Tensor) -> torch.Tensor:
    r"""A lower bound on min_{i not in C} Gamma_i(y) off the candidates C, carried from the previous
    query's bound F' (the floor screen of :class:`nwflow.EmpiricalField`), (r,).

    .. math::

        \Gamma_i(y) = \|y - x^{(i)}\|^2 - \|y - x^{(b)}\|^2, \qquad
        y - x^{(b)} = \mu (y' - x^{(b)}) + r,\; 0 \le \mu \le 1

        \Rightarrow\; \Gamma_i(y) = \mu \Gamma_i(y') + (1 - \mu) \|x^{(b)} - x^{(i)}\|^2
            - 2 \langle r, x^{(i)} - x^{(b)}\rangle
            \ge \mu F' - 2 \|r\| \max_i \|x^{(i)} - x^{(b)}\| - \delta = F,

    since Gamma_i is affine in y. ``reach`` bounds max_i ||x^(i) - x^(b)||, ``rounding`` delta
    covers the float64 rounding of y and r; an infinite F' (every key a candidate) stays so.
    Shapes: all (r,), float64. Part III, chapter 9.
    """
    tiny = torch.finfo(WIDE).eps
    return torch.where(torch.isinf(previous), previous,
                       mu * previous * (1.0 - 8.0 * tiny) - 2.0 * reach * residual - rounding)


def screened(logits: torch.Tensor, slack: torch.Tensor, n: int, eps: float, limit: int) -> torch.Tensor:
    """Keys each row keeps under :func:`kept_keys`, the tail cut tried where the margin keeps
    more than ``limit``, (r,): the carried screen's count. Part III, performance."""
    return kept_keys(logits, slack, n, eps, limit, n)[1]


def candidate_floor(top: torch.Tensor, count: torch.Tensor, slack: torch.Tensor, t: torch.Tensor,
                    sigma_t: torch.Tensor, n: int) -> torch.Tensor:
    r"""The floor screen's bound for rows whose candidates C are their ``count`` largest computed
    logits, each within ``slack`` s of the exact one, (r,): with b the largest,

    .. math::

        \min_{i \notin C} \Gamma_i(y) = \frac{2\sigma_t^2}{t^2} \min_{i \notin C} (l_b - l_i)
            \ge \frac{2\sigma_t^2}{t^2} \big(\tilde l_b - \max_{i \notin C} \tilde l_i - 2s\big),

    lowered by 8 float64 eps of its size for its own rounding. ``top`` (r, k) the largest computed
    logits, descending (any float dtype; a logit of the streamed form, which differs from the exact
    one by a constant per row, gives the same differences); ``count``, ``slack``, ``t`` and
    ``sigma_t`` (r,). +inf where every key is a candidate (count = n), -inf where the largest key
    left out is not in ``top`` (count >= k < n). Part III, chapter 9.
    """
    value = top.to(WIDE)
    left = value.gather(1, count.clamp(max=value.shape[1] - 1)[:, None]).squeeze(1)
    left = torch.where(count >= n, -torch.inf, left)
    floor = (2.0 * sigma_t.square() / t.square()) * (value[:, 0] - left - 2.0 * slack)
    floor = floor - 8.0 * torch.finfo(WIDE).eps * floor.abs().nan_to_num(posinf=0.0)   # inf stays inf
    return torch.where((count < value.shape[1]) | (count >= n), floor, -torch.inf)
