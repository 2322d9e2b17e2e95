"""aft-timm: the Attention Free Transformer (Zhai et al., 2021) for PyTorch and timm.

Importing the package registers its vision models in timm's model registry.
"""
from . import models  # noqa: F401  (registers the aft_* models with timm)
from .ops import aft_conv1d, aft_conv2d, aft_full, aft_local, aft_simple

__version__ = "0.1.0"
__all__ = ["aft_full", "aft_local", "aft_simple", "aft_conv1d", "aft_conv2d", "__version__"]
