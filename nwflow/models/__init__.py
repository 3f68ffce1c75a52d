"""Small velocity networks used by the chapters that train models."""

from nwflow.models.mlp import TimeEmbedding, VelocityMLP

__all__ = ["TimeEmbedding", "VelocityMLP"]
