"""Bit-packed spikes in the public format (spec: docs/spec/lif.md): Triton kernels where they run,
the reference otherwise."""
from typing import NamedTuple

import torch

from tether._backend import use_triton
from tether._checks import check_tensor
from tether.functional._op import Op
from tether.kernels import pack as kernels
from tether.reference import pack as reference


def pack_spikes(s: torch.Tensor) -> torch.Tensor:
    """s [..., n] (nonzero = spike) -> uint8 [..., ceil(n / 8)], numpy.packbits(bitorder="little") layout."""
    check_tensor("s", s, min_ndim=1)
    return _pack(s)


def unpack_spikes(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., ceil(n / 8)] -> 0/1 spikes [..., n] in dtype (inverse of pack_spikes)."""
    check_tensor("packed", packed, min_ndim=1, dtypes=(torch.uint8,))
    if not isinstance(n, int) or n < 0 or (n + 7) // 8 != packed.shape[-1]:
        raise ValueError(f"n: expected an int with ceil(n / 8) = packed.shape[-1] = {packed.shape[-1]}, got {n!r}")
    return _unpack(packed, cfg=_UnpackConfig(n, dtype))


# Ops (tether.functional._op), so torch.compile(fullgraph=True) keeps the Triton launchers as opaque calls; no
# autograd: the outputs are integer / 0-1 tensors without gradient.
def _pack_kernel(s: torch.Tensor) -> torch.Tensor:
    if s.numel() and use_triton(s):
        return kernels.pack_spikes(s.contiguous())
    return reference.pack_spikes(s)


class _UnpackConfig(NamedTuple):
    n: int
    dtype: torch.dtype


def _unpack_kernel(packed: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    if packed.numel() and use_triton(packed):
        return kernels.unpack_spikes(packed.contiguous(), n, dtype)
    return reference.unpack_spikes(packed, n, dtype)


_pack = Op("tether::pack_spikes", tensors="Tensor s", returns=1, outputs=1,
           forward=lambda s, cfg: (_pack_kernel(s),),
           fake=lambda s, cfg: (s.new_empty((*s.shape[:-1], (s.shape[-1] + 7) // 8), dtype=torch.uint8),))
_unpack = Op("tether::unpack_spikes", tensors="Tensor packed", config=_UnpackConfig, returns=1, outputs=1,
             forward=lambda packed, cfg: (_unpack_kernel(packed, cfg.n, cfg.dtype),),
             fake=lambda packed, cfg: (packed.new_empty((*packed.shape[:-1], cfg.n), dtype=cfg.dtype),))
