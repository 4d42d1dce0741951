"""The LIF op (spec: ../shared/spec/lif.md): fused Triton kernels (tether.kernels.lif) as torch.library
custom ops with fake impls and a registered backward (what torch.compile traces; eager mode calls the launchers
through a plain autograd.Function, half the Python time per call), or the pure-PyTorch reference where no kernel
runs."""
import math
from typing import Optional

import torch
from torch import Tensor

from tether._backend import use_triton
from tether.kernels import lif as kernels
from tether.reference import lif as reference

# H(u) with a surrogate gradient, for modules that spike outside an LIF (tether.nn.Surrogate.__call__)
spike = reference.spike


def _sg_peak(surrogate: str, alpha: float) -> float:
    """max of sg'(u): the COMPACT save stores sqrt(sg' / peak) in 16 bits."""
    return reference.SURROGATES[surrogate][1](alpha)


def _param(p):
    """A decay / threshold as (fp32 [C] tensor or None, float value)."""
    if isinstance(p, Tensor):
        return p.reshape(-1).float().contiguous(), 0.0  # [C], C = 1 for a 0-d tensor
    return None, float(p)


def _lif_forward_kernel(x: Tensor, v_init: Optional[Tensor], decay: Optional[Tensor], decay_value: float,
                      threshold: Optional[Tensor], threshold_value: float, surrogate: str, alpha: float, hard: bool,
                      v_reset: float, detach_reset: bool, save: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [T, N], v_init [N] fp32 or None (zeros) -> spikes [T, N], v_final [N] fp32, saved, bits (see
    tether.kernels.lif for what is saved).
    detach_reset only matters to the backward; it is an input so that setup_context can keep it."""
    return kernels.lif_forward(
        x, v_init, decay_value if decay is None else decay, threshold_value if threshold is None else threshold,
        surrogate=kernels.SURROGATE_IDS[surrogate], alpha=alpha, hard=hard, v_reset=v_reset, save=save,
        inv_sg_peak=1.0 / _sg_peak(surrogate, alpha))


# the op torch.compile traces; eager calls go through _LIF to the launcher without the custom-op dispatch
_lif_forward = torch.library.custom_op("tether::lif_forward", _lif_forward_kernel, mutates_args=())


@_lif_forward.register_fake
def _(x, v_init, decay, decay_value, threshold, threshold_value, surrogate, alpha, hard, v_reset, detach_reset,
      save):
    saved, bits = kernels.saved_buffers(x.shape[0], math.prod(x.shape[1:]), save, x)
    return torch.empty_like(x), x.new_empty(x.shape[1:], dtype=torch.float32), saved, bits


def _lif_backward_kernel(grad_spikes: Tensor, grad_v_final: Optional[Tensor], saved: Tensor, bits: Tensor,
                         v_init: Optional[Tensor], decay: Optional[Tensor], decay_value: float,
                         threshold: Optional[Tensor], threshold_value: float, surrogate: str, alpha: float,
                         hard: bool, v_reset: float, detach_reset: bool, save: int, grad_decay: bool,
                         grad_threshold: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> grad_x [T, N], grad_v_init [N], per-neuron grad_decay [N], grad_threshold [N] (empty unless asked).
    grad_v_final / v_init None: zeros."""
    return kernels.lif_backward(
        grad_spikes, grad_v_final, saved, bits, v_init, decay_value if decay is None else decay,
        threshold_value if threshold is None else threshold, surrogate=kernels.SURROGATE_IDS[surrogate],
        alpha=alpha, hard=hard, v_reset=v_reset, detach_reset=detach_reset, save=save,
        sg_peak=_sg_peak(surrogate, alpha), grad_decay=grad_decay, grad_threshold=grad_threshold)


_lif_backward = torch.library.custom_op("tether::lif_backward", _lif_backward_kernel, mutates_args=())


@_lif_backward.register_fake
def _(grad_spikes, grad_v_final, saved, bits, v_init, decay, decay_value, threshold, threshold_value, surrogate,
      alpha, hard, v_reset, detach_reset, save, grad_decay, grad_threshold):
    N = math.prod(grad_spikes.shape[1:])
    f32 = grad_spikes.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(grad_spikes), f32.new_empty(grad_spikes.shape[1:]),
            f32.new_empty(N if grad_decay else 0), f32.new_empty(N if grad_threshold else 0))


def _setup_context(ctx, inputs, output):
    x, v_init, decay, decay_value, threshold, threshold_value, surrogate, alpha, hard, v_reset, detach_reset, \
        save = inputs
    _, _, saved, bits = output
    # v_init only feeds dL/ddecay, which only the MEMBRANE save computes
    ctx.save_for_backward(saved, bits, v_init if save == kernels.SAVE_MEMBRANE else None, decay, threshold)
    ctx.args = (decay_value, threshold_value, surrogate, alpha, hard, v_reset, detach_reset, save)
    ctx.spikes_dtype, ctx.shape = x.dtype, x.shape


def _backward_with(lif_backward, ctx, grad_spikes, grad_v_final):
    """The 12 input gradients; lif_backward: the custom op (traced) or its kernel body (eager)."""
    saved, bits, v_init, decay, threshold = ctx.saved_tensors
    decay_value, threshold_value, surrogate, alpha, hard, v_reset, detach_reset, save = ctx.args
    need_decay, need_threshold = ctx.needs_input_grad[2], ctx.needs_input_grad[4]
    if grad_spikes is None:  # only v_final was used
        grad_spikes = torch.zeros(ctx.shape, device=saved.device, dtype=ctx.spikes_dtype)  # [T, N]
    if grad_v_final is not None:  # None: zeros, inside the kernel
        grad_v_final = grad_v_final.contiguous()
    grad_x, grad_v_init, grad_decay, grad_threshold = lif_backward(
        grad_spikes.contiguous(), grad_v_final, saved, bits, v_init, decay, decay_value, threshold,
        threshold_value, surrogate, alpha, hard, v_reset, detach_reset, save, need_decay, need_threshold)
    # per-neuron sums -> the parameter's [C] (neuron n reads channel n % C)
    grad_decay = grad_decay.view(-1, decay.numel()).sum(0) if need_decay else None
    grad_threshold = grad_threshold.view(-1, threshold.numel()).sum(0) if need_threshold else None
    grad_v_init = grad_v_init if ctx.needs_input_grad[1] else None  # v_init may be None
    return grad_x, grad_v_init, grad_decay, None, grad_threshold, None, None, None, None, None, None, None


def _backward(ctx, grad_spikes, grad_v_final, _grad_saved, _grad_bits):
    return _backward_with(torch.ops.tether.lif_backward, ctx, grad_spikes, grad_v_final)


_lif_forward.register_autograd(_backward, setup_context=_setup_context)


class _LIF(torch.autograd.Function):
    """Eager mode: the same forward / backward as the custom op's, calling the launchers directly. The
    custom-op + register_autograd dispatch cost about 2x the Python time of this path per call."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _lif_forward_kernel(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to allocate
        return output[0], output[1]

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_final):
        return _backward_with(_lif_backward_kernel, ctx, grad_spikes, grad_v_final)


def lif(x: Tensor, decay, threshold, v_init: Optional[Tensor] = None, *, surrogate="arctan",
        alpha: Optional[float] = None, reset: str = "hard", v_reset: float = 0.0, detach_reset: bool = True):
    """x [T, *rest] -> (spikes [T, *rest] in x's dtype, v_final [*rest] fp32). decay / threshold: float, 0-d
    tensor or per-channel [C] (C = x.shape[-1]); gradients to x, v_init, decay, threshold as they require."""
    args = reference.check_lif_args(x, decay, threshold, v_init, surrogate, alpha, reset)
    if x.dtype == torch.float64 or not use_triton(x):
        return reference.lif(x, decay, threshold, v_init, surrogate=args.surrogate, alpha=args.alpha, reset=reset,
                             v_reset=v_reset, detach_reset=detach_reset)
    # the kernels take [T, *rest] as [T, N] (N = prod(rest)) and return x's shapes: no reshapes, no views
    x2 = x.contiguous()  # [T, *rest]
    v0 = None if v_init is None else v_init.float().contiguous()  # [*rest]; None: zeros in the kernel
    decay_t, decay_value = _param(decay)
    threshold_t, threshold_value = _param(threshold)
    inputs = (x, v_init, decay_t, threshold_t)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        save = kernels.SAVE_NONE
    elif (decay_t is not None and decay_t.requires_grad) or (args.hard and not detach_reset):
        save = kernels.SAVE_MEMBRANE
    else:
        save = kernels.SAVE_COMPACT
    inputs = (x2, v0, decay_t, decay_value, threshold_t, threshold_value, args.surrogate, args.alpha, args.hard,
              float(v_reset), detach_reset, save)
    if torch.compiler.is_compiling():
        spikes, v_final, _, _ = torch.ops.tether.lif_forward(*inputs)
    elif save == kernels.SAVE_NONE:  # nothing needs a gradient: no autograd node
        spikes, v_final, _, _ = _lif_forward_kernel(*inputs)
    else:
        spikes, v_final = _LIF.apply(*inputs)
    return spikes, v_final
