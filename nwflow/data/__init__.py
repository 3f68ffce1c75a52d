"""Data sets: toy distributions (``toy``) and real images (``cifar10``, ``imagenette``).

Toy samplers return float tensors and are deterministic given ``seed`` or ``generator``.
Image loaders return ``(images (N, C, H, W) float32 in [-1, 1], labels (N,) int64)``;
``root=None`` means the folder named by ``NWFLOW_DATA_DIR`` (else ``~/.cache/nwflow/data``).
"""

from nwflow.data import dinov2
from nwflow.data.cifar10 import CIFAR10_CLASSES, load_cifar10
from nwflow.data.imagenette import IMAGENETTE_NAMES, IMAGENETTE_WNIDS, load_imagenette
from nwflow.data.toy import (
    GaussianMixture,
    circle,
    gaussian_mixture,
    random_rotation,
    spherical_shells,
    two_moons,
)

__all__ = [
    "CIFAR10_CLASSES",
    "IMAGENETTE_NAMES",
    "IMAGENETTE_WNIDS",
    "GaussianMixture",
    "circle",
    "dinov2",
    "gaussian_mixture",
    "load_cifar10",
    "load_imagenette",
    "random_rotation",
    "spherical_shells",
    "two_moons",
]
