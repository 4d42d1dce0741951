"""Bit-pack kernels for the public spike format (numpy.packbits(bitorder="little") along the last dim).

Layout: spikes [R, n] contiguous <-> packed uint8 [R, nb], nb = ceil(n / 8); bit j of byte b is element
8*b + j, the last byte zero-padded. Grid: (cdiv(R * nb, BLOCK),), one byte per lane, its 8 elements as a
[BLOCK, 8] tile.
"""
import triton
import triton.language as tl

from . import cdiv


@triton.jit
def _byte_tile(b, n, nb, total):
    """For flat byte indices b [BLOCK]: element offsets [BLOCK, 8], their mask, bit positions [8]."""
    bit = tl.arange(0, 8)
    col = (b % nb)[:, None] * 8 + bit[None, :]  # element index within the row
    offs = (b // nb)[:, None] * n + col
    return offs, (b < total)[:, None] & (col < n), bit


@triton.jit
def pack_kernel(s_ptr, packed_ptr, n, nb, total, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs, mask, bit = _byte_tile(b, n, nb, total)
    s = tl.load(s_ptr + offs, mask=mask, other=0)
    byte = tl.sum((s != 0).to(tl.int32) << bit[None, :], axis=1)
    tl.store(packed_ptr + b, byte.to(tl.uint8), mask=b < total)


@triton.jit
def unpack_kernel(packed_ptr, s_ptr, n, nb, total, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs, mask, bit = _byte_tile(b, n, nb, total)
    byte = tl.load(packed_ptr + b, mask=b < total, other=0).to(tl.int32)
    s = (byte[:, None] >> bit[None, :]) & 1
    tl.store(s_ptr + offs, s.to(tl.float32).to(s_ptr.dtype.element_ty), mask=mask)


BLOCK = 256


def pack_spikes(s):
    """s [..., n] contiguous (any dtype, nonzero = spike) -> uint8 [..., ceil(n / 8)]."""
    import torch

    n = s.shape[-1]
    nb = cdiv(n, 8)
    packed = torch.empty(*s.shape[:-1], nb, device=s.device, dtype=torch.uint8)  # [..., nb]
    total = packed.numel()
    if s.dtype == torch.bool:
        s = s.view(torch.uint8)
    pack_kernel[(cdiv(total, BLOCK),)](s, packed, n, nb, total, BLOCK=BLOCK)
    return packed


def unpack_spikes(packed, n: int, dtype):
    """uint8 [..., ceil(n / 8)] contiguous -> 0/1 spikes [..., n] in dtype."""
    import torch

    s = torch.empty(*packed.shape[:-1], n, device=packed.device, dtype=dtype)  # [..., n]
    total = packed.numel()
    out = s.view(torch.uint8) if dtype == torch.bool else s
    unpack_kernel[(cdiv(total, BLOCK),)](packed, out, n, packed.shape[-1], total, BLOCK=BLOCK)
    return s
