r"""Sample-quality and memorisation metrics.

Book: chapter 4 (the exact field memorises: nearest-neighbour distances), chapters 5, 6
and 8 (MMD between sample sets, memorisation of trained fields). The Frechet distance is
here for the planned Part III (at scale); no chapter computes it yet.

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

import torch

from nwflow._checks import (
    check_float_tensor,
    check_int,
    check_optional_positive_int,
    check_points,
    check_positive_real,
    check_real,
    check_same_device,
)
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
    "inception_fid",
]

# Candidates kept per query before the exact re-check: the GEMM form ||a||^2 + ||b||^2 - 2<a, b>
# can swap two training points whose squared distances differ by less than its rounding error
# (about eps * (||a||^2 + ||b||^2)); recomputing a few extra candidates directly repairs the order.
_EXTRA_CANDIDATES = 4


def _flat(x: object, name: str, min_rows: int = 1) -> torch.Tensor:
    """(B, *S) finite floating tensor -> (B, D) view."""
    x = check_float_tensor(x, name)
    if x.dim() < 1 or x.shape[0] < min_rows:
        raise ValueError(f"{name} must have shape (N, *S) with N >= {min_rows}, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def _pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same sample size, "
                         f"got {a.shape[1]} and {b.shape[1]} values per row")
    check_same_device(a, b, name_a, name_b)
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have the dtype of {name_a} ({a.dtype}), got {b.dtype}")


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
    r"""The k nearest training points of each sample: (dist (B, k), index (B, k)), closest first.

    .. math:: d_i(x) = \text{the } i\text{-th smallest of } \|x - x^{(j)}\|, \ j = 1, \dots, n,
        \qquad i = 1, \dots, k

    Flattened, Euclidean; ``x`` (B, *S), ``train`` (n, *S). ``chunk_size`` training rows are
    compared at a time (default: a 256 MiB block); the result does not depend on it.
    Distances are returned in the dtype of ``x``. Chapter 4 (through the functions below).
    """
    xf, tf = _flat(x, "x"), _flat(train, "train")
    _pair(xf, tf, "x", "train")
    check_optional_positive_int(chunk_size, "chunk_size")
    k = check_int(k, "k", 1, tf.shape[0])  # at most the training set size
    dist, idx = _knn(xf, tf, k, chunk_size)
    return dist.to(x.dtype), idx


def nearest_neighbour_distance(x: torch.Tensor, train: torch.Tensor, chunk_size: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Distance to, and index of, the nearest training point: (dist (B,), index (B,)).

    .. math:: d_1(x) = \min_j \|x - x^{(j)}\|, \qquad j^\star(x) = \arg\min_j \|x - x^{(j)}\|

    Flattened Euclidean; ``x`` (B, *S), ``train`` (n, *S). Exact (the winner's distance is
    recomputed directly, never a cancelled GEMM value); streamed over ``train`` in chunks.
    Chapters 4, 6 and 8.
    """
    dist, idx = nearest_neighbours(x, train, k=1, chunk_size=chunk_size)
    return dist[:, 0], idx[:, 0]


def leave_one_out_distance(train: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    r"""Each training point's distance to its nearest *other* training point, (n,).

    .. math:: d_{\rm loo}(x^{(i)}) = \min_{j \ne i} \|x^{(i)} - x^{(j)}\|

    ``train`` (n, *S), n >= 2. The typical spacing of the data: a generated sample much
    closer to the training set than these distances is suspicious. Duplicated training
    points give 0. Chapters 3 and 4 (also 6 and 8).
    """
    tf = _flat(train, "train", min_rows=2)
    check_optional_positive_int(chunk_size, "chunk_size")
    dist, idx = _knn(tf, tf, 2, chunk_size)
    # The point itself is at distance exactly 0 and sorts first unless a duplicate ties with
    # it; either way the other of the two is at the leave-one-out distance.
    own = idx[:, 0] == torch.arange(tf.shape[0], device=tf.device)
    return torch.where(own, dist[:, 1], dist[:, 0]).to(train.dtype)


def nn_distance_ratio(samples: torch.Tensor, train: torch.Tensor, chunk_size: int | None = None
                      ) -> torch.Tensor:
    r"""Nearest over second-nearest training distance, (B,) for ``samples`` (B, *S), in [0, 1].

    .. math:: r(x) = \frac{d_1(x)}{d_2(x)}, \qquad r(x) = 0 \ \text{when } d_1(x) = 0

    Near 0 for a copy of one training point; near 1 for a sample far from all of them.
    Defined as 0 when d_1 = 0 (an exact copy, even of a duplicated training point). The
    quantity that :func:`memorised` thresholds (chapters 4, 6 and 8).
    """
    dist, _ = nearest_neighbours(samples, train, k=2, chunk_size=chunk_size)
    d1, d2 = dist[:, 0].to(WIDE), dist[:, 1].to(WIDE)
    return torch.where(d1 == 0, torch.zeros_like(d1), d1 / d2).to(samples.dtype)


def memorised(samples: torch.Tensor, train: torch.Tensor, ratio: float = 1 / 3,
              chunk_size: int | None = None) -> torch.Tensor:
    r"""Which samples are copies, (B,) bool for ``samples`` (B, *S), ``train`` (n, *S), n >= 2.

    .. math:: \text{copy}(x) = \big[d_1(x) < \rho\, d_2(x)\big] \lor \big[d_1(x) = 0\big],
        \qquad \rho = \text{ratio}

    The criterion of Yoon et al. (2023) and Gu et al. (2023), with ratio = 1/3: the nearest
    training point is at least three times closer than the second nearest. Chapters 6 and 8.
    """
    ratio = check_real(ratio, "ratio", 0.0, 1.0, low_open=True)
    dist, _ = nearest_neighbours(samples, train, k=2, chunk_size=chunk_size)
    d1, d2 = dist[:, 0].to(WIDE), dist[:, 1].to(WIDE)
    return (d1 < ratio * d2) | (d1 == 0)


def memorisation_rate(samples: torch.Tensor, train: torch.Tensor, ratio: float = 1 / 3,
                      chunk_size: int | None = None) -> float:
    r"""Fraction of samples that copy a training point, mean over x of 1[d_1(x) < ratio d_2(x)].

    .. math:: \frac{1}{B} \sum_{b=1}^B \text{copy}(x_b)

    with copy(x) of :func:`memorised`; ``samples`` (B, *S), ``train`` (n, *S). d_1, d_2:
    distances to the nearest and second-nearest training points (flattened, Euclidean).
    ratio = 1/3 is the standard threshold (Yoon et al. 2023, "Diffusion probabilistic models
    generalize when they fail to memorize"; Gu et al. 2023, "On memorization in diffusion
    models"). An exact copy (d_1 = 0) always counts. The training set needs at least two
    points. Chapters 4, 6 and 8.
    """
    return float(memorised(samples, train, ratio=ratio, chunk_size=chunk_size).to(WIDE).mean())


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    r"""Per-row cosine of flattened rows, (B,) for ``a`` and ``b`` (B, *S), in the dtype of ``a``.

    .. math:: \cos(a_i, b_i) = \frac{\langle a_i, b_i \rangle}{\|a_i\|\, \|b_i\|}

    Computed in float64. A row with norm below ``eps`` gives 0 (its direction is undefined).
    Chapter 6 (:func:`nwflow.efm.alignment`).
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
    r"""Median of the pairwise distances of the rows of ``z`` (n, *S) (flattened), a number.

    .. math:: h = \operatorname{median}\{\|z_i - z_j\| : i < j\}

    The median of the n(n-1)/2 distinct-pair distances (numpy's median: the mean of the two
    middle values when their count is even). With more than ``max_points`` rows it uses
    ``max_points`` evenly spaced rows (deterministic) to bound memory at O(max_points^2).
    The median heuristic for the MMD bandwidth, chapter 5.
    """
    zf = _flat(z, "z", min_rows=2)
    check_int(max_points, "max_points", minimum=2)
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

    .. math:: \mathrm{MMD}_u^2 = \frac{1}{m(m-1)} \sum_{i \ne j} k(x_i, x_j)
        + \frac{1}{n(n-1)} \sum_{i \ne j} k(y_i, y_j) - \frac{2}{m n} \sum_{i, j} k(x_i, y_j),
        \qquad k(a, b) = e^{-\|a - b\|^2 / (2 h^2)}

    (Gretton et al. 2012, eq. 3). It is an unbiased estimate of MMD^2, so it can be
    negative when the two distributions are equal. ``bandwidth`` h > 0; when None, the
    median heuristic: h = median of the pairwise distances of the pooled sample [x; y]
    (see :func:`median_distance`). Rows are flattened; computed in float64, ``chunk_size``
    rows at a time (default: blocks of 32 MiB). x: (m, *S), y: (n, *S) with m, n >= 2.
    Chapters 5, 6 and 8.
    """
    xf, yf = _flat(x, "x", min_rows=2), _flat(y, "y", min_rows=2)
    _pair(xf, yf, "x", "y")
    check_optional_positive_int(chunk_size, "chunk_size")
    x64, y64 = xf.to(WIDE), yf.to(WIDE)
    if bandwidth is None:
        h = median_distance(torch.cat([x64, y64]))
        if h == 0.0:
            raise ValueError("the median pairwise distance is 0 (mostly identical points): pass bandwidth")
    else:
        h = check_positive_real(bandwidth, "bandwidth")
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

    .. math:: d^2 = \|\mu_a - \mu_b\|^2 + \operatorname{tr}\Big(\Sigma_a + \Sigma_b
        - 2 \big(\Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2}\big)^{1/2}\Big)

    (Dowson and Landau 1982). tr((Sigma_a Sigma_b)^{1/2}) is computed as the sum of the
    square roots of the eigenvalues of the symmetric PSD matrix Sigma_a^{1/2} Sigma_b
    Sigma_a^{1/2}, in float64: real by construction, so there is no imaginary part to
    discard (unlike scipy.linalg.sqrtm of the non-symmetric product). Shapes: (D,), (D, D).
    No chapter computes it yet (chapter 6 quotes the paper's FID); the planned Part III will.
    """
    mus, covs = [], []
    for name, mu, cov in (("mu_a", mu_a, cov_a), ("mu_b", mu_b, cov_b)):
        check_float_tensor(mu, name)
        check_float_tensor(cov, "cov" + name[2:])
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

    .. math:: \mu = \frac{1}{N} \sum_i f_i, \qquad
        \Sigma = \frac{1}{N - 1} \sum_i (f_i - \mu)(f_i - \mu)^\top, \qquad
        d^2 = d^2_{\rm Frechet}\big(N(\mu_a, \Sigma_a), N(\mu_b, \Sigma_b)\big)

    Fits mu = mean and Sigma = unbiased covariance (divisor N - 1, as numpy.cov and the
    reference FID code) to each set of rows, in float64, then applies
    :func:`gaussian_frechet_distance`. ``feats_a`` (N_a, D), ``feats_b`` (N_b, D), N >= 2.
    With features from an image network this is FID (Heusel et al. 2017); with raw pixels
    or toy coordinates it is the same distance in that space. No chapter computes it yet
    (chapter 6 quotes the paper's FID); the planned Part III (at scale) will.
    """
    fa = check_points(feats_a, "feats_a", min_rows=2, rows="N")
    fb = check_points(feats_b, "feats_b", min_rows=2, rows="N")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature size, got {fa.shape[1]} "
                         f"and {fb.shape[1]}")
    stats = []
    for f in (fa.to(WIDE), fb.to(WIDE)):
        mu = f.mean(dim=0)
        c = f - mu
        stats += [mu, (c.T @ c) / (f.shape[0] - 1)]
    return gaussian_frechet_distance(*stats)


_FID_INSTALL = ("pip install 'torchmetrics[image]'  (torchmetrics with torch-fidelity, which provides the "
                "Inception-v3 FID network; its weights, pt_inception-2015-12-05-6726825d.pth, download "
                "from github.com/toshas/torch-fidelity/releases on first use into torch's hub cache)")


def inception_fid(samples: torch.Tensor, reference: torch.Tensor, batch_size: int = 100,
                  device: torch.device | str | None = None, feature: int = 2048) -> float:
    r"""FID (Heusel et al. 2017): the Frechet distance between Inception-v3 features of two image sets.

    .. math:: \mathrm{FID} = \|\mu_s - \mu_r\|^2 + \operatorname{tr}\big(\Sigma_s + \Sigma_r
        - 2 (\Sigma_s \Sigma_r)^{1/2}\big)

    with (mu, Sigma) fitted to the ``feature``-dimensional pool features of the standard FID
    Inception network. Computed by a maintained implementation, torchmetrics'
    ``FrechetInceptionDistance`` (imported here, lazily): ``samples`` (N, 3, H, W) and
    ``reference`` (M, 3, H, W) in [-1, 1] are mapped to [0, 1] and passed in batches of
    ``batch_size``. Raises ``ImportError`` naming the package to install when torchmetrics (or
    torch-fidelity) is missing, and ``RuntimeError`` naming the weights file when the Inception
    weights cannot be loaded (e.g. offline). Chapter 6 quotes the paper's FID; chapter 10
    computes it where it loads, and otherwise
    :func:`frechet_distance` in the features of a classifier it trains itself.
    """
    for name, x in (("samples", samples), ("reference", reference)):
        check_float_tensor(x, name)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must be RGB images (N, 3, H, W), got {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 images, got {x.shape[0]}")
    check_positive_real(batch_size, "batch_size")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as err:
        raise ImportError(f"inception_fid needs torchmetrics' image metrics ({err}); install them with "
                          f"{_FID_INSTALL}") from err
    try:
        fid = FrechetInceptionDistance(feature=feature, normalize=True)
    except ImportError as err:
        raise ImportError(f"inception_fid: torchmetrics' FrechetInceptionDistance could not import its "
                          f"backend ({err}); install it with {_FID_INSTALL}") from err
    except Exception as err:  # the weights download or load failed
        raise RuntimeError(f"inception_fid: the Inception-v3 FID weights could not be loaded "
                           f"({type(err).__name__}: {err}); they are fetched by {_FID_INSTALL}. Offline, "
                           f"copy that file into torch.hub.get_dir()/checkpoints/.") from err
    if device is not None:
        fid = fid.to(device)
    dev = device if device is not None else "cpu"
    for x, real in ((reference, True), (samples, False)):
        for i in range(0, x.shape[0], int(batch_size)):
            fid.update(((x[i:i + int(batch_size)].clamp(-1, 1) + 1) / 2).to(dev), real=real)
    return float(fid.compute())
