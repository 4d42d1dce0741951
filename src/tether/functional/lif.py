"""The LIF op (spec: docs/spec/lif.md): fused Triton kernels (tether.kernels.lif) as the op `tether::lif`
(tether.functional._op: a custom op while torch.compile traces, an autograd.Function in eager mode), a CPU
time loop (tether.functional._cpu), or the pure-PyTorch reference where neither takes the case."""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from tether._backend import use_triton, warn_fallback
from tether._checks import SURROGATES, check_lif_args
from tether.functional import _cpu
from tether.functional._op import Op
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
    needs: tuple[bool, ...] = ()  # the backward's: gradients of (v_init, decay, threshold) asked for


def _empty_if_none(tensors, like: Tensor):
    """An op returns tensors: the parts a kernel did not make become empty ones."""
    return tuple(like.new_empty(0, dtype=torch.int32) if t is None else t for t in tensors)


def _forward(x: Tensor, v_init: Optional[Tensor], decay: Optional[Tensor], threshold: Optional[Tensor],
             cfg: _Config):
    """x [T, N], v_init [N] fp32 or None (zeros) -> spikes [T, N], v_final [N] fp32, saved, bits (see
    tether.kernels.lif for what is saved; empty where a save has no such part)."""
    return _empty_if_none(kernels.lif_forward(
        x, v_init, cfg.decay_value if decay is None else decay,
        cfg.threshold_value if threshold is None else threshold, surrogate=kernels.SURROGATE_IDS[cfg.surrogate],
        alpha=cfg.alpha, hard=cfg.hard, v_reset=cfg.v_reset, save=cfg.save,
        inv_sg_peak=1.0 / _sg_peak(cfg.surrogate, cfg.alpha)), x)


def _fake_forward(x, v_init, decay, threshold, cfg: _Config):
    parts = kernels.saved_buffers(x.shape[0], math.prod(x.shape[1:]), cfg.save, x)
    return torch.empty_like(x), x.new_empty(x.shape[1:], dtype=torch.float32), *_empty_if_none(parts, x)


def _backward(grad_spikes: Tensor, grad_v_final: Optional[Tensor], saved: Tensor, bits: Tensor,
              v_init: Optional[Tensor], decay: Optional[Tensor], threshold: Optional[Tensor], cfg: _Config):
    """-> grad_x [T, N], then grad_v_init [N], per-neuron grad_decay [N], grad_threshold [N], each empty unless
    cfg.needs (v_init, decay, threshold) asks for it. grad_v_final / v_init None: zeros."""
    return _empty_if_none(kernels.lif_backward(
        grad_spikes, grad_v_final, saved, bits, v_init, cfg.decay_value if decay is None else decay,
        cfg.threshold_value if threshold is None else threshold,
        surrogate=kernels.SURROGATE_IDS[cfg.surrogate], alpha=cfg.alpha, hard=cfg.hard, v_reset=cfg.v_reset,
        detach_reset=cfg.detach_reset, save=cfg.save, sg_peak=_sg_peak(cfg.surrogate, cfg.alpha),
        grad_v_init=cfg.needs[0], grad_decay=cfg.needs[1], grad_threshold=cfg.needs[2]), grad_spikes)


def _fake_backward(grad_spikes, grad_v_final, saved, bits, v_init, decay, threshold, cfg: _Config):
    N = math.prod(grad_spikes.shape[1:])
    f32 = grad_spikes.new_empty(0, dtype=torch.float32)
    grad_v_init, grad_decay, grad_threshold = cfg.needs
    return (torch.empty_like(grad_spikes), f32.new_empty(grad_spikes.shape[1:] if grad_v_init else 0),
            f32.new_empty(N if grad_decay else 0), f32.new_empty(N if grad_threshold else 0))


def _save(ctx, tensors, cfg: _Config, outputs):
    x, v_init, decay, threshold = tensors
    saved, bits = outputs[2:]
    # v_init only feeds dL/ddecay, which only the MEMBRANE save computes
    ctx.save_for_backward(saved, bits, v_init if cfg.save == kernels.SAVE_MEMBRANE else None, decay, threshold)
    ctx.cfg, ctx.spikes_dtype, ctx.shape = cfg, x.dtype, x.shape


def _grads(ctx, grad_outputs, needs, backward):
    """(grad_x, grad_v_init, grad_decay [C], grad_threshold [C]), each None unless needs asks for it."""
    grad_spikes, grad_v_final = grad_outputs
    saved, bits, v_init, decay, threshold = ctx.saved_tensors
    if grad_spikes is None:  # only v_final was used
        grad_spikes = torch.zeros(ctx.shape, device=saved.device, dtype=ctx.spikes_dtype)  # [T, N]
    if grad_v_final is not None:  # None: zeros, inside the kernel
        grad_v_final = grad_v_final.contiguous()
    grad_x, grad_v_init, grad_decay, grad_threshold = backward(
        grad_spikes.contiguous(), grad_v_final, saved, bits, v_init, decay, threshold,
        ctx.cfg._replace(needs=tuple(needs[1:])))
    # per-neuron sums -> the parameter's [C] (neuron n reads channel n % C)
    grad_decay = grad_decay.view(-1, decay.numel()).sum(0) if needs[2] else None
    grad_threshold = grad_threshold.view(-1, threshold.numel()).sum(0) if needs[3] else None
    return grad_x, grad_v_init if needs[1] else None, grad_decay, grad_threshold


_lif = Op("tether::lif", tensors="Tensor x, Tensor? v_init, Tensor? decay, Tensor? threshold", config=_Config,
          returns=4, outputs=2, forward=_forward, fake=_fake_forward, save=_save, grads=_grads,
          backward=_backward, fake_backward=_fake_backward,
          backward_tensors="Tensor grad_spikes, Tensor? grad_v_final, Tensor saved, Tensor bits, Tensor? v_init, "
                           "Tensor? decay, Tensor? threshold", backward_config=_Config, backward_returns=4)


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
    return _lif(x2, v0, decay_t, threshold_t, cfg=cfg)


def lif_eager(x: Tensor, decay, threshold, v_init: Optional[Tensor] = None, **kwargs):
    """``lif`` from plain PyTorch ops on every device (the reference loop, autograd for the backward): the
    LIF of tether.nn's ``backend="eager"``, the baseline the kernels are measured against."""
    return reference.lif(x, decay, threshold, v_init, **kwargs)
