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
from tether.functional._op import Op
from tether.functional.pack import pack_spikes, unpack_spikes


def _forward(spikes, weight, bias, cfg):
    """-> out [..., out], what the backward keeps of spikes: packed bits [..., ceil(in / 8)] uint8 (the CPU: spikes
    as they are; nothing unless weight needs a gradient)."""
    # under autocast F.linear computes in the autocast dtype; the backward repeats it in the same dtype
    out = F.linear(spikes, weight, bias)
    saved = None
    if weight.requires_grad:
        saved = pack_spikes(spikes) if use_triton(spikes) else spikes
    return out, saved


def _save(ctx, tensors, cfg, outputs):
    spikes, weight, _ = tensors
    ctx.save_for_backward(outputs[1], weight)
    ctx.in_features, ctx.spikes_dtype = spikes.shape[-1], spikes.dtype


def _grads(ctx, grad_outputs, needs, backward):
    (grad_out,) = grad_outputs
    saved, weight = ctx.saved_tensors
    grad_spikes = grad_weight = grad_bias = None
    grad_rows = grad_out.flatten(0, -2)  # [N, out]
    if needs[0]:
        grad_spikes = (grad_out @ weight.to(grad_out.dtype)).to(ctx.spikes_dtype)
    if needs[1]:
        spikes = saved if saved.dtype != torch.uint8 else unpack_spikes(saved, ctx.in_features, grad_out.dtype)
        spikes = spikes.to(grad_out.dtype).flatten(0, -2)  # [N, in]
        grad_weight = (grad_rows.t() @ spikes).to(weight.dtype)  # [out, in]
    if needs[2]:  # False when bias is None
        grad_bias = grad_rows.sum(0).to(weight.dtype)
    return grad_spikes, grad_weight, grad_bias


_spike_linear = Op("tether::spike_linear", outputs=1, kernel=False, forward=_forward, save=_save, grads=_grads)


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
    return _spike_linear(spikes, weight, bias)
