r"""Sample-quality and memorisation metrics.

Book: Part II (failure regimes, rectified-flow memorisation) and Part III (scale).

- Nearest-neighbour distance to a training set, exact and streamed over the training set
  (memory O(B chunk), never (B, n, D)).
- Memorisation: a sample x is a copy when its nearest training point is much closer than
  the second nearest, d_1(x) < ratio * d_2(x) with ratio = 1/3 (Yoon et al. 2023; Gu et
  al. 2023).
- Cosine similarity per row, the unbiased squared MMD with a Gaussian kernel, and the
  Frechet distance between Gaussian fits of two feature sets (the FID formula).

Samples of any trailing shape are flattened: images (B, C, H, W) are compared as vectors
in R^{CHW} with the Euclidean norm.
"""

from __future__ import annotations

import numbers

import torch

from nwflow._precision import DEFAULT_CHUNK_BYTES, WIDE, WIDE_BYTES, chunk_rows, compute_dtype, exact_matmul

__all__ = [
    "nearest_neighbours",
    "nearest_neighbour_distance",
    "leave_one_out_distance",
    "nn_distance_ratio",
    "memorised",
    "memorisation_rate",
    "cosine_similarity",
    "mmd2_unbiased",
    "median_distance",
    "frechet_distance",
    "gaussian_frechet_distance",
]

# Candidates kept per query before the exact re-check: the GEMM form ||a||^2 + ||b||^2 - 2<a, b>
# can swap two training points whose squared distances differ by less than its rounding error
# (about eps * (||a||^2 + ||b||^2)); recomputing a few extra candidates directly repairs the order.
_EXTRA_CANDIDATES = 4


def _flat(x: object, name: str, min_rows: int = 1) -> torch.Tensor:
    """(B, *S) finite floating tensor -> (B, D) view."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (N, *S), got a 0-d tensor")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} row(s), got {x.shape[0]}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x.reshape(x.shape[0], -1)


def _pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same sample size, "
                         f"got {a.shape[1]} and {b.shape[1]} values per row")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} has dtype {a.dtype} but {name_b} has dtype {b.dtype}")


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _knn(xf: torch.Tensor, tf: torch.Tensor, k: int, chunk_size: int | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of ``tf`` for each row of ``xf``: (dist (B, k) float64, index (B, k)).

    Candidates are selected chunk by chunk on squared distances in the GEMM form (two matrix
    products, no (B, n, D) block), keeping a running top-(k + extra); their distances are then
    recomputed directly as ||x - y|| in float64, which is exact up to rounding and never
    negative, and the best k are returned in increasing order.
    """
    B, n = xf.shape[0], tf.shape[0]
    dtype = compute_dtype(xf.dtype)
    x, t = xf.to(dtype), tf.to(dtype)
    m = min(n, k + _EXTRA_CANDIDATES)
    chunk = chunk_size or chunk_rows(DEFAULT_CHUNK_BYTES, B * x.element_size())
    best_d = torch.full((B, 0), torch.inf, dtype=dtype, device=x.device)
    best_i = torch.zeros((B, 0), dtype=torch.long, device=x.device)
    with exact_matmul():
        x_sq = torch.linalg.vector_norm(x, dim=1).square()
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            tc = t[start:stop]
            # ||x||^2 is constant per row, but kept so the values are comparable across chunks.
            d2 = torch.addmm(x_sq[:, None] + torch.linalg.vector_norm(tc, dim=1).square()[None, :],
                             x, tc.T, alpha=-2.0)
            cand_d = torch.cat([best_d, d2], dim=1)
            cand_i = torch.cat([best_i, torch.arange(start, stop, device=x.device).expand(B, -1)], dim=1)
            top = torch.topk(cand_d, min(m, cand_d.shape[1]), dim=1, largest=False)
            best_d, best_i = top.values, torch.gather(cand_i, 1, top.indices)
    # Direct recomputation, a block of queries at a time: (b, m, D) wide blocks of WIDE_BYTES.
    exact = torch.empty(best_i.shape, dtype=WIDE, device=x.device)
    block = chunk_rows(WIDE_BYTES, m * xf.shape[1] * exact.element_size())
    for start in range(0, B, block):
        stop = min(start + block, B)
        diff = xf[start:stop, None, :].to(WIDE) - tf[best_i[start:stop]].to(WIDE)
        exact[start:stop] = torch.linalg.vector_norm(diff, dim=2)
    order = torch.argsort(exact, dim=1, stable=True)[:, :k]
    return torch.gather(exact, 1, order), torch.gather(best_i, 1, order)


def nearest_neighbours(x: torch.Tensor, train: torch.Tensor, k: int = 1, chunk_size: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest training points of each sample: (dist (B, k), index (B, k)), closest first.

    d_i(x) = i-th smallest ||x - x^(j)|| over the training set (flattened, Euclidean).
    ``chunk_size`` training rows are compared at a time (default: a 256 MiB block);
    the result does not depend on it. Distances are returned in the dtype of ``x``.
    """
    xf, tf = _flat(x, "x"), _flat(train, "train")
    _pair(xf, tf, "x", "train")
    _check_chunk(chunk_size)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= tf.shape[0]:
        raise ValueError(f"k must be an int in [1, {tf.shape[0]}] (the training set size), got {k!r}")
    dist, idx = _knn(xf, tf, int(k), chunk_size)
    return dist.to(x.dtype), idx


def nearest_neighbour_distance(x: torch.Tensor, train: torch.Tensor, chunk_size: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to, and index of, the nearest training point: (dist (B,), index (B,)).

    d_1(x) = min_j ||x - x^(j)||, flattened Euclidean. Exact (the winner's distance is
    recomputed directly, never a cancelled GEMM value); streamed over ``train`` in chunks.
    """
    dist, idx = nearest_neighbours(x, train, k=1, chunk_size=chunk_size)
    return dist[:, 0], idx[:, 0]


def leave_one_out_distance(train: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Each training point's distance to its nearest *other* training point, (n,).

    The typical spacing of the data: a generated sample much closer to the training set
    than these distances is suspicious. Duplicated training points give 0.
    """
    tf = _flat(train, "train", min_rows=2)
    _check_chunk(chunk_size)
    dist, idx = _knn(tf, tf, 2, chunk_size)
    # The point itself is at distance exactly 0 and sorts first unless a duplicate ties with
    # it; either way the other of the two is at the leave-one-out distance.
    own = idx[:, 0] == torch.arange(tf.shape[0], device=tf.device)
    return torch.where(own, dist[:, 1], dist[:, 0]).to(train.dtype)


def nn_distance_ratio(samples: torch.Tensor, train: torch.Tensor, chunk_size: int | None = None
                      ) -> torch.Tensor:
    """d_1(x) / d_2(x): nearest over second-nearest training distance, (B,), in [0, 1].

    Near 0 for a copy of one training point; near 1 for a sample far from all of them.
    Defined as 0 when d_1 = 0 (an exact copy, even of a duplicated training point).
    """
    dist, _ = nearest_neighbours(samples, train, k=2, chunk_size=chunk_size)
    d1, d2 = dist[:, 0].to(WIDE), dist[:, 1].to(WIDE)
    return torch.where(d1 == 0, torch.zeros_like(d1), d1 / d2).to(samples.dtype)


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


def memorised(samples: torch.Tensor, train: torch.Tensor, ratio: float = 1 / 3,
              chunk_size: int | None = None) -> torch.Tensor:
    """Which samples are copies: d_1(x) < ratio * d_2(x) (or d_1(x) = 0); (B,) bool.

    The criterion of Yoon et al. (2023) and Gu et al. (2023), with ratio = 1/3: the nearest
    training point is at least three times closer than the second nearest.
    """
    ratio = _check_ratio(ratio)
    dist, _ = nearest_neighbours(samples, train, k=2, chunk_size=chunk_size)
    d1, d2 = dist[:, 0].to(WIDE), dist[:, 1].to(WIDE)
    return (d1 < ratio * d2) | (d1 == 0)


def memorisation_rate(samples: torch.Tensor, train: torch.Tensor, ratio: float = 1 / 3,
                      chunk_size: int | None = None) -> float:
    r"""Fraction of samples that copy a training point, mean over x of 1[d_1(x) < ratio d_2(x)].

    d_1, d_2: distances to the nearest and second-nearest training points (flattened,
    Euclidean). ratio = 1/3 is the standard threshold (Yoon et al. 2023, "Diffusion
    probabilistic models generalize when they fail to memorize"; Gu et al. 2023, "On
    memorization in diffusion models"). An exact copy (d_1 = 0) always counts. The
    training set needs at least two points. Book: Part II, memorisation chapters.
    """
    return float(memorised(samples, train, ratio=ratio, chunk_size=chunk_size).to(WIDE).mean())


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-row cosine <a_i, b_i> / (||a_i|| ||b_i||) of flattened rows, (B,), in the dtype of ``a``.

    Computed in float64. A row with norm below ``eps`` gives 0 (its direction is undefined).
    """
    af, bf = _flat(a, "a"), _flat(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    _pair(af, bf, "a", "b")
    a64, b64 = af.to(WIDE), bf.to(WIDE)
    na, nb = torch.linalg.vector_norm(a64, dim=1), torch.linalg.vector_norm(b64, dim=1)
    ok = (na > eps) & (nb > eps)
    cos = (a64 * b64).sum(dim=1) / torch.where(ok, na * nb, torch.ones_like(na))
    return torch.where(ok, cos, torch.zeros_like(cos)).clamp(-1.0, 1.0).to(a.dtype)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances (float64 inputs), clamped at 0 against cancellation."""
    d2 = torch.addmm(torch.linalg.vector_norm(a, dim=1).square()[:, None]
                     + torch.linalg.vector_norm(b, dim=1).square()[None, :], a, b.T, alpha=-2.0)
    return d2.clamp_min_(0.0)


def median_distance(z: torch.Tensor, max_points: int = 2048) -> float:
    """Median of the pairwise distances ||z_i - z_j||, i < j, of the rows of ``z`` (flattened).

    The median of the n(n-1)/2 distinct-pair distances (numpy's median: the mean of the two
    middle values when their count is even). With more than ``max_points`` rows it uses
    ``max_points`` evenly spaced rows (deterministic) to bound memory at O(max_points^2).
    """
    zf = _flat(z, "z", min_rows=2)
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"max_points must be an int >= 2, got {max_points!r}")
    if zf.shape[0] > max_points:
        zf = zf[torch.linspace(0, zf.shape[0] - 1, max_points).round().long()]
    z64 = zf.to(WIDE)
    iu = torch.triu_indices(z64.shape[0], z64.shape[0], offset=1, device=z64.device)
    d = _sq_dists(z64, z64)[iu[0], iu[1]].sqrt()
    return float(torch.quantile(d, 0.5))


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, gamma: float, same: bool, chunk: int) -> float:
    """sum_{i, j} exp(-gamma ||a_i - b_j||^2), leaving out i = j when ``same``."""
    total = torch.zeros((), dtype=WIDE, device=a.device)
    for start in range(0, a.shape[0], chunk):
        stop = min(start + chunk, a.shape[0])
        k = torch.exp(-gamma * _sq_dists(a[start:stop], b))
        if same:
            # The diagonal is excluded exactly (k(x, x) = 1 would bias the U-statistic).
            r = torch.arange(stop - start, device=a.device)
            k[r, r + start] = 0.0
        total += k.sum()
    return float(total)


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None,
                  chunk_size: int | None = None) -> float:
    r"""Unbiased squared maximum mean discrepancy with a Gaussian kernel.

    MMD_u^2 = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
              - 2/(m n) sum_{i, j} k(x_i, y_j),    k(a, b) = exp(-||a - b||^2 / (2 h^2))

    (Gretton et al. 2012, eq. 3). It is an unbiased estimate of MMD^2, so it can be
    negative when the two distributions are equal. ``bandwidth`` h > 0; when None, the
    median heuristic: h = median of the pairwise distances of the pooled sample [x; y]
    (see :func:`median_distance`). Rows are flattened; computed in float64, ``chunk_size``
    rows at a time (default: blocks of 32 MiB). x: (m, *S), y: (n, *S) with m, n >= 2.
    """
    xf, yf = _flat(x, "x", min_rows=2), _flat(y, "y", min_rows=2)
    _pair(xf, yf, "x", "y")
    _check_chunk(chunk_size)
    x64, y64 = xf.to(WIDE), yf.to(WIDE)
    if bandwidth is None:
        h = median_distance(torch.cat([x64, y64]))
        if h == 0.0:
            raise ValueError("the median pairwise distance is 0 (mostly identical points): pass bandwidth")
    else:
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, numbers.Real) \
                or not 0.0 < float(bandwidth) < float("inf"):
            raise ValueError(f"bandwidth must be a positive finite number or None, got {bandwidth!r}")
        h = float(bandwidth)
    gamma = 1.0 / (2.0 * h * h)
    # Default: (chunk, max(m, n)) wide kernel blocks of WIDE_BYTES.
    m, n = x64.shape[0], y64.shape[0]
    chunk = chunk_size or chunk_rows(WIDE_BYTES, max(m, n) * x64.element_size())
    kxx = _kernel_sum(x64, x64, gamma, True, chunk) / (m * (m - 1))
    kyy = _kernel_sum(y64, y64, gamma, True, chunk) / (n * (n - 1))
    kxy = _kernel_sum(x64, y64, gamma, False, chunk) / (m * n)
    return kxx + kyy - 2.0 * kxy


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix by eigen-decomposition (negative
    rounding-level eigenvalues clamped to 0)."""
    w, v = torch.linalg.eigh(0.5 * (c + c.T))
    return (v * w.clamp_min(0.0).sqrt()) @ v.T


def gaussian_frechet_distance(mu_a: torch.Tensor, cov_a: torch.Tensor,
                              mu_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    r"""Frechet (2-Wasserstein squared) distance between N(mu_a, Sigma_a) and N(mu_b, Sigma_b).

    d^2 = ||mu_a - mu_b||^2 + tr(Sigma_a + Sigma_b - 2 (Sigma_a^{1/2} Sigma_b Sigma_a^{1/2})^{1/2})

    (Dowson and Landau 1982). tr((Sigma_a Sigma_b)^{1/2}) is computed as the sum of the
    square roots of the eigenvalues of the symmetric PSD matrix Sigma_a^{1/2} Sigma_b
    Sigma_a^{1/2}, in float64: real by construction, so there is no imaginary part to
    discard (unlike scipy.linalg.sqrtm of the non-symmetric product). Shapes: (D,), (D, D).
    """
    mus, covs = [], []
    for name, mu, cov in (("mu_a", mu_a, cov_a), ("mu_b", mu_b, cov_b)):
        if not isinstance(mu, torch.Tensor) or not isinstance(cov, torch.Tensor):
            raise TypeError(f"{name} and its covariance must be torch.Tensors")
        if mu.dim() != 1 or cov.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{name} must be (D,) with a (D, D) covariance, got {tuple(mu.shape)} "
                             f"and {tuple(cov.shape)}")
        mus.append(mu.to(WIDE))
        covs.append(cov.to(WIDE))
    if mus[0].shape != mus[1].shape:
        raise ValueError(f"the two Gaussians must have the same dimension, got {mus[0].shape[0]} "
                         f"and {mus[1].shape[0]}")
    sa = _psd_sqrt(covs[0])
    inner = sa @ covs[1] @ sa
    tr_sqrt = torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp_min(0.0).sqrt().sum()
    diff = mus[0] - mus[1]
    return float(diff @ diff + torch.trace(covs[0]) + torch.trace(covs[1]) - 2.0 * tr_sqrt)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    r"""Frechet distance between Gaussian fits of two feature sets (the FID formula).

    Fits mu = mean and Sigma = unbiased covariance (divisor N - 1, as numpy.cov and the
    reference FID code) to each set of rows, in float64, then applies
    :func:`gaussian_frechet_distance`. ``feats_a`` (N_a, D), ``feats_b`` (N_b, D), N >= 2.
    With features from an image network this is FID (Heusel et al. 2017); with raw pixels
    or toy coordinates it is the same distance in that space. Book: Part III.
    """
    fa, fb = _flat(feats_a, "feats_a", min_rows=2), _flat(feats_b, "feats_b", min_rows=2)
    if feats_a.dim() != 2 or feats_b.dim() != 2:
        raise ValueError(f"feats_a and feats_b must be 2-D (N, D), got {tuple(feats_a.shape)} and "
                         f"{tuple(feats_b.shape)}")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature size, got {fa.shape[1]} "
                         f"and {fb.shape[1]}")
    stats = []
    for f in (fa.to(WIDE), fb.to(WIDE)):
        mu = f.mean(dim=0)
        c = f - mu
        stats += [mu, (c.T @ c) / (f.shape[0] - 1)]
    return gaussian_frechet_distance(*stats)
