"""Bit-packed spikes in the public layout: numpy.packbits(bitorder="little") along the last dim.

Bit j of byte b holds element 8*b + j; the last byte is zero-padded.
"""
import torch


def pack_spikes(s: torch.Tensor) -> torch.Tensor:
    """s [..., n] (nonzero = spike) -> uint8 [..., ceil(n / 8)]."""
    n = s.shape[-1]
    bits = torch.nn.functional.pad((s != 0).to(torch.uint8), (0, -n % 8))  # [..., 8 * ceil(n/8)]
    bits = bits.unflatten(-1, (-1, 8))  # [..., ceil(n/8), 8]
    weights = 2 ** torch.arange(8, device=s.device, dtype=torch.uint8)  # [8], little-endian bit order
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_spikes(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., ceil(n / 8)] -> 0/1 spikes [..., n] in dtype."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)  # [8]
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [..., ceil(n/8), 8]
    return bits.flatten(-2)[..., :n].to(dtype)
