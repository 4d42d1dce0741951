"""One place that decides between the Triton kernels and the pure-PyTorch reference."""
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, and on CPU tensors when the Triton interpreter is on."""
    t = tensors[0]
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpreting()
