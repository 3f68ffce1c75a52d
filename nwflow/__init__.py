"""nwflow: the exact flow-matching velocity of a finite data set.

Under the Gaussian OT path the marginal velocity of an empirical distribution is a
Nadaraya-Watson kernel smoother, computed exactly by one Gaussian-kernel attention head.
The book (``book/``) derives every formula here; the docstrings point at its chapters.
"""

from nwflow import data, metrics
from nwflow._version import __version__
from nwflow.attention import GaussianKernelAttention
from nwflow.empirical import (
    EmpiricalField,
    effective_neighbours,
    posterior_mean,
    posterior_weights,
    score,
    velocity,
)
from nwflow.path import bandwidth, conditional_target, conditional_velocity, sample_xt, sigma
from nwflow.solvers import integrate, integrate_adaptive

__all__ = [
    "__version__",
    "EmpiricalField",
    "GaussianKernelAttention",
    "bandwidth",
    "conditional_target",
    "conditional_velocity",
    "data",
    "effective_neighbours",
    "integrate",
    "integrate_adaptive",
    "metrics",
    "posterior_mean",
    "posterior_weights",
    "sample_xt",
    "score",
    "sigma",
    "velocity",
]
