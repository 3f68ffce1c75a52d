"""Data sets: toy distributions (``toy``) and real images (``cifar10``, ``imagenette``).

Toy samplers return float tensors and are deterministic given ``seed`` or ``generator``.
Image loaders return ``(images (N, C, H, W) float32 in [-1, 1], labels (N,) int64)``;
``root=None`` means the folder named by ``NWFLOW_DATA_DIR``.
"""

from nwflow.data.toy import (
    GaussianMixture,
    circle,
    gaussian_mixture,
    random_rotation,
    spherical_shells,
    two_moons,
)

__all__ = [
    "GaussianMixture",
    "circle",
    "gaussian_mixture",
    "random_rotation",
    "spherical_shells",
    "two_moons",
]
