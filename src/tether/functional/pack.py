"""Bit-packed spikes in the public format (spec: docs/spec/lif.md): Triton kernels where they run,
the reference otherwise."""
import torch

from tether._backend import use_triton
from tether._checks import check_tensor
from tether.kernels import pack as kernels
from tether.reference import pack as reference


def pack_spikes(s: torch.Tensor) -> torch.Tensor:
    """s [..., n] (nonzero = spike) -> uint8 [..., ceil(n / 8)], numpy.packbits(bitorder="little") layout."""
    check_tensor("s", s, min_ndim=1)
    return _pack(s) if torch.compiler.is_compiling() else _pack_kernel(s)


def unpack_spikes(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., ceil(n / 8)] -> 0/1 spikes [..., n] in dtype (inverse of pack_spikes)."""
    check_tensor("packed", packed, min_ndim=1, dtypes=(torch.uint8,))
    if not isinstance(n, int) or n < 0 or (n + 7) // 8 != packed.shape[-1]:
        raise ValueError(f"n: expected an int with ceil(n / 8) = packed.shape[-1] = {packed.shape[-1]}, got {n!r}")
    return _unpack(packed, n, dtype) if torch.compiler.is_compiling() else _unpack_kernel(packed, n, dtype)


# Custom ops, so torch.compile(fullgraph=True) keeps the Triton launchers as opaque calls; eager mode calls
# their bodies directly (no autograd to dispatch: the outputs are integer / 0-1 tensors without gradient).
def _pack_kernel(s: torch.Tensor) -> torch.Tensor:
    if s.numel() and use_triton(s):
        return kernels.pack_spikes(s.contiguous())
    return reference.pack_spikes(s)


_pack = torch.library.custom_op("tether::pack_spikes", _pack_kernel, mutates_args=())


@_pack.register_fake
def _(s):
    return s.new_empty((*s.shape[:-1], (s.shape[-1] + 7) // 8), dtype=torch.uint8)


def _unpack_kernel(packed: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    if packed.numel() and use_triton(packed):
        return kernels.unpack_spikes(packed.contiguous(), n, dtype)
    return reference.unpack_spikes(packed, n, dtype)


_unpack = torch.library.custom_op("tether::unpack_spikes", _unpack_kernel, mutates_args=())


@_unpack.register_fake
def _(packed, n, dtype):
    return packed.new_empty((*packed.shape[:-1], n), dtype=dtype)
