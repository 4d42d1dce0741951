"""One place that decides between the Triton kernels and the pure-PyTorch reference."""
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, and on CPU tensors when the Triton interpreter is on."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())
