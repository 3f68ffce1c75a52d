"""Small velocity networks used by the chapters that train models."""

from nwflow.models.mlp import TimeEmbedding, VelocityMLP
from nwflow.models.preconditioned import PreconditionedVelocity
from nwflow.models.unet import UNet

__all__ = ["PreconditionedVelocity", "TimeEmbedding", "UNet", "VelocityMLP"]
