"""One place that decides between the Triton kernels and the pure-PyTorch reference."""
import os
import warnings

import torch

_WARNED = set()  # (op, reason) pairs already warned about: once each per process


def interpreting() -> bool:
    """True when Triton runs kernels under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, and on CPU tensors when the Triton interpreter is on."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def warn_fallback(op: str, reason: str) -> None:
    """Say once per (op, reason) that a case the kernels cannot take runs the PyTorch reference instead."""
    if (op, reason) not in _WARNED:
        _WARNED.add((op, reason))
        warnings.warn(f"tether.functional.{op}: {reason}; running the PyTorch reference (slow)", stacklevel=4)
