"""Tether: fused Triton kernels for linear-time sequence models (spiking transformers and TTT-MLP)."""
__version__ = "0.1.0"

from tether import functional, nn  # noqa: E402,F401
