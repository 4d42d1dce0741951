"""Linear layer fed by spikes that keeps its input for backward as packed bits, not as a float copy.

``y = spikes @ weight^T + bias``. Backward needs the input only for ``grad_weight = grad_y^T @ spikes``;
since spikes are 0/1 they are saved as 1 bit each (``pack_spikes``) and unpacked in backward: 1/16 of a
bf16 copy, 1/32 of an fp32 one. Where no Triton kernel runs (the CPU) the spikes are saved as they are:
there packing costs more time than the memory it saves.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from tether._backend import use_triton
from tether._checks import FLOAT_DTYPES, check_tensor
from tether.functional.pack import pack_spikes, unpack_spikes


class _SpikeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spikes, weight, bias):
        # under autocast F.linear computes in the autocast dtype; backward repeats it in the same dtype
        out = F.linear(spikes, weight, bias)
        ctx.in_features = spikes.shape[-1]
        ctx.spikes_dtype = spikes.dtype
        saved = None
        if ctx.needs_input_grad[1]:
            saved = pack_spikes(spikes) if use_triton(spikes) else spikes  # [..., ceil(in / 8)] uint8 or [..., in]
        ctx.save_for_backward(saved, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, weight = ctx.saved_tensors
        grad_spikes = grad_weight = grad_bias = None
        grad_rows = grad_out.flatten(0, -2)  # [N, out]
        if ctx.needs_input_grad[0]:
            grad_spikes = (grad_out @ weight.to(grad_out.dtype)).to(ctx.spikes_dtype)
        if ctx.needs_input_grad[1]:
            spikes = saved if saved.dtype != torch.uint8 else unpack_spikes(saved, ctx.in_features, grad_out.dtype)
            spikes = spikes.to(grad_out.dtype).flatten(0, -2)  # [N, in]
            grad_weight = (grad_rows.t() @ spikes).to(weight.dtype)  # [out, in]
        if ctx.needs_input_grad[2]:  # False when bias is None
            grad_bias = grad_rows.sum(0).to(weight.dtype)
        return grad_spikes, grad_weight, grad_bias


def spike_linear(spikes: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` for 0/1 inputs ``spikes [..., in]`` that saves them for backward as packed bits.

    weight ``[out, in]``, bias ``[out]`` or None; returns ``[..., out]``. The values are not checked to be
    0/1 (that would need a device sync): a non-binary input gets a wrong ``grad_weight``.
    """
    check_tensor("spikes", spikes, min_ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=spikes.device)
    if weight.shape[1] != spikes.shape[-1]:
        raise ValueError(f"weight: expected shape (out, {spikes.shape[-1]}) to match spikes' last dim, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],), dtypes=FLOAT_DTYPES, device=spikes.device)
    if not torch.is_grad_enabled():  # inference (generation): nothing to save
        return F.linear(spikes, weight, bias)
    return _SpikeLinear.apply(spikes, weight, bias)
