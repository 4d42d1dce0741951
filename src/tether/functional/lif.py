"""The LIF op (spec: docs/spec/lif.md): fused Triton kernels (tether.kernels.lif) as torch.library
custom ops with fake impls and a registered backward (what torch.compile traces; eager mode calls the launchers
through a plain autograd.Function, half the Python time per call), or the pure-PyTorch reference where no kernel
runs."""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from tether._backend import use_triton, warn_fallback
from tether._checks import SURROGATES, check_lif_args
from tether.functional import _cpu
from tether.kernels import lif as kernels
from tether.reference import lif as reference

# H(u) with a surrogate gradient, for modules that spike outside an LIF (tether.nn.Surrogate.__call__)
spike = reference.spike


def _sg_peak(surrogate: str, alpha: float) -> float:
    """max of sg'(u): the COMPACT save stores sqrt(sg' / peak) in 16 bits."""
    return SURROGATES[surrogate][1](alpha)


def _param(p):
    """A decay / threshold as (fp32 [C] tensor or None, float value)."""
    if isinstance(p, Tensor):
        return p.reshape(-1).float().contiguous(), 0.0  # [C], C = 1 for a 0-d tensor
    return None, float(p)


class _Config(NamedTuple):
    """lif's non-tensor arguments, as the kernels and the backward take them."""
    decay_value: float  # used when decay is None (a float decay)
    threshold_value: float
    surrogate: str
    alpha: float
    hard: bool
    v_reset: float
    detach_reset: bool  # only matters to the backward
    save: int  # kernels.SAVE_*


def _forward(x: Tensor, v_init: Optional[Tensor], decay: Optional[Tensor], threshold: Optional[Tensor],
             cfg: _Config):
    """x [T, N], v_init [N] fp32 or None (zeros) -> spikes [T, N], v_final [N] fp32, saved, bits (see
    tether.kernels.lif for what is saved; None where a save has no such part)."""
    return kernels.lif_forward(
        x, v_init, cfg.decay_value if decay is None else decay,
        cfg.threshold_value if threshold is None else threshold, surrogate=kernels.SURROGATE_IDS[cfg.surrogate],
        alpha=cfg.alpha, hard=cfg.hard, v_reset=cfg.v_reset, save=cfg.save,
        inv_sg_peak=1.0 / _sg_peak(cfg.surrogate, cfg.alpha))


def _backward(grad_spikes: Tensor, grad_v_final: Optional[Tensor], saved: Optional[Tensor], bits: Optional[Tensor],
              v_init: Optional[Tensor], decay: Optional[Tensor], threshold: Optional[Tensor], cfg: _Config,
              needs: tuple[bool, bool, bool]):
    """-> grad_x [T, N], then grad_v_init [N], per-neuron grad_decay [N], grad_threshold [N], each None unless
    needs (v_init, decay, threshold) asks for it. grad_v_final / v_init None: zeros."""
    return kernels.lif_backward(
        grad_spikes, grad_v_final, saved, bits, v_init, cfg.decay_value if decay is None else decay,
        cfg.threshold_value if threshold is None else threshold,
        surrogate=kernels.SURROGATE_IDS[cfg.surrogate], alpha=cfg.alpha, hard=cfg.hard, v_reset=cfg.v_reset,
        detach_reset=cfg.detach_reset, save=cfg.save, sg_peak=_sg_peak(cfg.surrogate, cfg.alpha),
        grad_v_init=needs[0], grad_decay=needs[1], grad_threshold=needs[2])


def _empty_if_none(tensors, like: Tensor):
    """A custom op returns tensors: the parts a kernel did not make become empty ones."""
    return tuple(like.new_empty(0, dtype=torch.int32) if t is None else t for t in tensors)


# The custom ops torch.compile traces (eager calls go through _LIF, without the custom-op dispatch). Their
# arguments are _Config's fields spelled out, which torch.library's schema needs.
@torch.library.custom_op("tether::lif_forward", mutates_args=())
def _lif_forward(x: Tensor, v_init: Optional[Tensor], decay: Optional[Tensor], decay_value: float,
                 threshold: Optional[Tensor], threshold_value: float, surrogate: str, alpha: float, hard: bool,
                 v_reset: float, detach_reset: bool, save: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = _Config(decay_value, threshold_value, surrogate, alpha, hard, v_reset, detach_reset, save)
    return _empty_if_none(_forward(x, v_init, decay, threshold, cfg), x)


@_lif_forward.register_fake
def _(x, v_init, decay, decay_value, threshold, threshold_value, surrogate, alpha, hard, v_reset, detach_reset,
      save):
    parts = kernels.saved_buffers(x.shape[0], math.prod(x.shape[1:]), save, x)
    return torch.empty_like(x), x.new_empty(x.shape[1:], dtype=torch.float32), *_empty_if_none(parts, x)


@torch.library.custom_op("tether::lif_backward", mutates_args=())
def _lif_backward(grad_spikes: Tensor, grad_v_final: Optional[Tensor], saved: Tensor, bits: Tensor,
                  v_init: Optional[Tensor], decay: Optional[Tensor], decay_value: float, threshold: Optional[Tensor],
                  threshold_value: float, surrogate: str, alpha: float, hard: bool, v_reset: float,
                  detach_reset: bool, save: int, grad_v_init: bool, grad_decay: bool,
                  grad_threshold: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = _Config(decay_value, threshold_value, surrogate, alpha, hard, v_reset, detach_reset, save)
    return _empty_if_none(_backward(grad_spikes, grad_v_final, saved, bits, v_init, decay, threshold, cfg,
                                    (grad_v_init, grad_decay, grad_threshold)), grad_spikes)


@_lif_backward.register_fake
def _(grad_spikes, grad_v_final, saved, bits, v_init, decay, decay_value, threshold, threshold_value, surrogate,
      alpha, hard, v_reset, detach_reset, save, grad_v_init, grad_decay, grad_threshold):
    N = math.prod(grad_spikes.shape[1:])
    f32 = grad_spikes.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(grad_spikes), f32.new_empty(grad_spikes.shape[1:] if grad_v_init else 0),
            f32.new_empty(N if grad_decay else 0), f32.new_empty(N if grad_threshold else 0))


def _save(ctx, x, v_init, decay, threshold, cfg: _Config, saved, bits):
    # v_init only feeds dL/ddecay, which only the MEMBRANE save computes
    ctx.save_for_backward(saved, bits, v_init if cfg.save == kernels.SAVE_MEMBRANE else None, decay, threshold)
    ctx.cfg, ctx.spikes_dtype, ctx.shape = cfg, x.dtype, x.shape


def _grads(ctx, grad_spikes, grad_v_final, backward, needs):
    """(grad_x, grad_v_init, grad_decay [C], grad_threshold [C]), each None unless needs (v_init, decay,
    threshold) asks for it; backward: _backward (eager) or the custom op's call (traced)."""
    saved, bits, v_init, decay, threshold = ctx.saved_tensors
    if grad_spikes is None:  # only v_final was used
        grad_spikes = torch.zeros(ctx.shape, device=saved.device, dtype=ctx.spikes_dtype)  # [T, N]
    if grad_v_final is not None:  # None: zeros, inside the kernel
        grad_v_final = grad_v_final.contiguous()
    grad_x, grad_v_init, grad_decay, grad_threshold = backward(
        grad_spikes.contiguous(), grad_v_final, saved, bits, v_init, decay, threshold, ctx.cfg, needs)
    # per-neuron sums -> the parameter's [C] (neuron n reads channel n % C)
    grad_decay = grad_decay.view(-1, decay.numel()).sum(0) if needs[1] else None
    grad_threshold = grad_threshold.view(-1, threshold.numel()).sum(0) if needs[2] else None
    return grad_x, grad_v_init if needs[0] else None, grad_decay, grad_threshold


def _setup_context(ctx, inputs, output):
    x, v_init, decay, decay_value, threshold, threshold_value, surrogate, alpha, hard, v_reset, detach_reset, \
        save = inputs
    cfg = _Config(decay_value, threshold_value, surrogate, alpha, hard, v_reset, detach_reset, save)
    _save(ctx, x, v_init, decay, threshold, cfg, *output[2:])


def _traced_backward(grad_spikes, grad_v_final, saved, bits, v_init, decay, threshold, cfg, needs):
    return torch.ops.tether.lif_backward(grad_spikes, grad_v_final, saved, bits, v_init, decay, cfg.decay_value,
                                         threshold, cfg.threshold_value, cfg.surrogate, cfg.alpha, cfg.hard,
                                         cfg.v_reset, cfg.detach_reset, cfg.save, *needs)


def _op_backward(ctx, grad_spikes, grad_v_final, _grad_saved, _grad_bits):
    needs = ctx.needs_input_grad
    grad_x, grad_v_init, grad_decay, grad_threshold = _grads(ctx, grad_spikes, grad_v_final, _traced_backward,
                                                             (needs[1], needs[2], needs[4]))
    return grad_x, grad_v_init, grad_decay, None, grad_threshold, None, None, None, None, None, None, None


_lif_forward.register_autograd(_op_backward, setup_context=_setup_context)


class _LIF(torch.autograd.Function):
    """Eager mode: the custom op's forward and backward, calling the launchers directly with the non-tensor
    arguments in one _Config (the custom-op + register_autograd dispatch, and each extra input of apply, cost
    host time on every call)."""

    @staticmethod
    def forward(ctx, x, v_init, decay, threshold, cfg):
        spikes, v_final, saved, bits = _forward(x, v_init, decay, threshold, cfg)
        _save(ctx, x, v_init, decay, threshold, cfg, saved, bits)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to allocate
        return spikes, v_final

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_final):
        return *_grads(ctx, grad_spikes, grad_v_final, _backward, ctx.needs_input_grad[1:4]), None


def lif(x: Tensor, decay, threshold, v_init: Optional[Tensor] = None, *, surrogate="arctan",
        alpha: Optional[float] = None, reset: str = "hard", v_reset: float = 0.0, detach_reset: bool = True):
    """``x [T, *rest]`` -> (spikes ``[T, *rest]`` in x's dtype, v_final ``[*rest]`` fp32). decay / threshold: float, 0-d
    tensor or per-channel [C] (C = x.shape[-1]); gradients to x, v_init, decay, threshold as they require.
    Arguments are checked by tether._checks.check_lif_args; empty and non-finite inputs give what
    tether.reference.lif says, on every path."""
    args = check_lif_args(x, decay, threshold, v_init, surrogate, alpha, reset, v_reset)
    if x.dtype == torch.float64 and x.is_cuda:
        warn_fallback("lif", "float64 input (the kernels take float32, float16 and bfloat16)")
    def run_reference():
        return reference.lif(x, decay, threshold, v_init, surrogate=args.surrogate, alpha=args.alpha, reset=reset,
                             v_reset=v_reset, detach_reset=detach_reset)

    if x.numel() == 0:  # nothing to launch or loop over
        return run_reference()
    if not use_triton(x):
        spikes, v_final = _cpu.lif(x, decay, threshold, v_init, _cpu.LIFConfig(args.surrogate, args.alpha, args.hard,
                                                                               float(v_reset), detach_reset))
        # A non-finite input leaves a non-finite final membrane on the CPU loop, which folds the hard reset
        # into a multiply (a firing +inf becomes NaN): then the reference's rules. One [N] check, not [T, N];
        # skipped while torch.compile traces (it cannot branch on values).
        if torch.compiler.is_compiling() or torch.isfinite(v_final).all():
            return spikes, v_final
        return run_reference()
    if x.dtype == torch.float64:
        return run_reference()
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
    cfg = _Config(decay_value, threshold_value, args.surrogate, args.alpha, args.hard, float(v_reset), detach_reset,
                  save)
    if torch.compiler.is_compiling():
        spikes, v_final, _, _ = torch.ops.tether.lif_forward(x2, v0, decay_t, decay_value, threshold_t,
                                                             threshold_value, *cfg[2:])
    elif save == kernels.SAVE_NONE:  # nothing needs a gradient: no autograd node
        spikes, v_final, _, _ = _forward(x2, v0, decay_t, threshold_t, cfg)
    else:
        spikes, v_final = _LIF.apply(x2, v0, decay_t, threshold_t, cfg)
    return spikes, v_final


def lif_eager(x: Tensor, decay, threshold, v_init: Optional[Tensor] = None, **kwargs):
    """``lif`` from plain PyTorch ops on every device (the reference loop, autograd for the backward): the
    LIF of tether.nn's ``backend="eager"``, the baseline the kernels are measured against."""
    return reference.lif(x, decay, threshold, v_init, **kwargs)
