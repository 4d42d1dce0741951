"""LayerNorm over the channels, then LIF over time, as one op (design: docs/norm_lif.md).

Where the kernels run, y = LayerNorm(x) is never stored: the forward kernel applies the norm as it reads x,
and keeps for backward only x (which the norm's backward needs anyway), the row statistics and one membrane
checkpoint every tether.kernels.norm_lif.SEG steps; the backward kernel recomputes the membrane from them.
Elsewhere (the CPU, a tensor decay or threshold, a reset differentiated through the spike) it is
``F.layer_norm`` followed by ``tether.functional.lif``, the same function.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tether._backend import use_triton
from tether._checks import FLOAT_DTYPES, check_lif_args, check_real, check_tensor
from tether.functional.lif import lif
from tether.kernels import lif as lif_kernels
from tether.kernels import norm_lif as kernels

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Config(NamedTuple):
    eps: float
    decay: float
    threshold: float
    surrogate: str
    alpha: float
    hard: bool
    v_reset: float


def _stats(x: Tensor, eps: float):
    """LayerNorm's row statistics of x [..., C]: mean, rstd [..., 1] fp32."""
    var, mean = torch.var_mean(x.float(), dim=-1, correction=0, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def _forward(x, weight, bias, v_init, cfg: _Config, out_dtype: torch.dtype, save: bool):
    """-> spikes, v_final, mean, rstd, ckpt (None unless save)."""
    mean, rstd = _stats(x, cfg.eps)
    spikes, v_final, ckpt = kernels.norm_lif_forward(
        x, mean, rstd, weight, bias, v_init, decay=cfg.decay, threshold=cfg.threshold, hard=cfg.hard,
        v_reset=cfg.v_reset, out_dtype=out_dtype, save=save)
    return spikes, v_final, mean, rstd, ckpt


def _backward(grad_spikes, grad_v_final, x, weight, bias, mean, rstd, ckpt, cfg: _Config, needs, norm_backward):
    """-> dL/dx, dL/dweight, dL/dbias, dL/dv_init (None where needs says no); the LIF part by the kernel
    (norm_backward: the launcher, or the custom op while torch.compile traces), the norm's by ATen."""
    if grad_v_final is not None:  # None: zeros, inside the kernel
        grad_v_final = grad_v_final.contiguous()
    grad_y, grad_v_init = norm_backward(grad_spikes.contiguous(), grad_v_final, x, mean, rstd, weight, bias, ckpt,
                                        cfg)
    grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
        grad_y.float(), x.float(), [x.shape[-1]], mean, rstd, weight, bias, [needs[0], needs[1], needs[2]])
    if grad_x is not None:
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_w, grad_b, grad_v_init if needs[3] else None


def _launch_backward(grad_spikes, grad_v_final, x, mean, rstd, weight, bias, ckpt, cfg: _Config):
    return kernels.norm_lif_backward(grad_spikes, grad_v_final, x, mean, rstd, weight, bias, ckpt, decay=cfg.decay,
                                     threshold=cfg.threshold, hard=cfg.hard, v_reset=cfg.v_reset,
                                     surrogate=lif_kernels.SURROGATE_IDS[cfg.surrogate], alpha=cfg.alpha)


# The custom ops torch.compile traces (eager calls go through _NormLIF, without the custom-op dispatch).
@torch.library.custom_op("tether::norm_lif_forward", mutates_args=())
def _norm_lif_forward(x: Tensor, weight: Tensor, bias: Tensor, v_init: Optional[Tensor], eps: float, decay: float,
                      threshold: float, surrogate: str, alpha: float, hard: bool, v_reset: float,
                      out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = _Config(eps, decay, threshold, surrogate, alpha, hard, v_reset)
    return _forward(x, weight, bias, v_init, cfg, out_dtype, True)


@_norm_lif_forward.register_fake
def _(x, weight, bias, v_init, eps, decay, threshold, surrogate, alpha, hard, v_reset, out_dtype):
    rows = x.shape[:-1] + (1,)
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[1:], dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32),
            kernels.checkpoints(x.shape[0], x[0].numel(), x))


@torch.library.custom_op("tether::norm_lif_backward", mutates_args=())
def _norm_lif_backward(grad_spikes: Tensor, grad_v_final: Optional[Tensor], x: Tensor, mean: Tensor, rstd: Tensor,
                       weight: Tensor, bias: Tensor, ckpt: Tensor, decay: float, threshold: float, surrogate: str,
                       alpha: float, hard: bool, v_reset: float) -> tuple[Tensor, Tensor]:
    cfg = _Config(0.0, decay, threshold, surrogate, alpha, hard, v_reset)
    return _launch_backward(grad_spikes, grad_v_final, x, mean, rstd, weight, bias, ckpt, cfg)


@_norm_lif_backward.register_fake
def _(grad_spikes, grad_v_final, x, mean, rstd, weight, bias, ckpt, decay, threshold, surrogate, alpha, hard,
      v_reset):
    return torch.empty_like(grad_spikes), x.new_empty(x.shape[1:], dtype=torch.float32)


def _traced_backward(grad_spikes, grad_v_final, x, mean, rstd, weight, bias, ckpt, cfg: _Config):
    return torch.ops.tether.norm_lif_backward(grad_spikes, grad_v_final, x, mean, rstd, weight, bias, ckpt,
                                              cfg.decay, cfg.threshold, cfg.surrogate, cfg.alpha, cfg.hard,
                                              cfg.v_reset)


def _setup_context(ctx, inputs, output):
    x, weight, bias, v_init, *config, _out_dtype = inputs
    _, _, mean, rstd, ckpt = output
    ctx.save_for_backward(x, weight, bias, mean, rstd, ckpt)
    ctx.cfg, ctx.spikes_shape, ctx.spikes_dtype = _Config(*config), x.shape, _out_dtype


def _grads(ctx, grad_spikes, grad_v_final, norm_backward, needs):
    x, weight, bias, mean, rstd, ckpt = ctx.saved_tensors
    if grad_spikes is None:  # only v_final was used
        grad_spikes = torch.zeros(ctx.spikes_shape, device=x.device, dtype=ctx.spikes_dtype)
    return _backward(grad_spikes, grad_v_final, x, weight, bias, mean, rstd, ckpt, ctx.cfg, needs, norm_backward)


def _op_backward(ctx, grad_spikes, grad_v_final, _grad_mean, _grad_rstd, _grad_ckpt):
    needs = ctx.needs_input_grad
    grads = _grads(ctx, grad_spikes, grad_v_final, _traced_backward, needs[:4])
    return *grads, None, None, None, None, None, None, None, None


_norm_lif_forward.register_autograd(_op_backward, setup_context=_setup_context)


class _NormLIF(torch.autograd.Function):
    """Eager mode: the custom op's forward and backward, calling the launchers directly."""

    @staticmethod
    def forward(ctx, x, weight, bias, v_init, cfg, out_dtype):
        spikes, v_final, mean, rstd, ckpt = _forward(x, weight, bias, v_init, cfg, out_dtype, True)
        ctx.save_for_backward(x, weight, bias, mean, rstd, ckpt)
        ctx.cfg, ctx.spikes_shape, ctx.spikes_dtype = cfg, x.shape, out_dtype
        ctx.set_materialize_grads(False)
        return spikes, v_final

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_final):
        return *_grads(ctx, grad_spikes, grad_v_final, _launch_backward, ctx.needs_input_grad[:4]), None, None


def fused(x: Tensor, weight, bias, decay, threshold, detach_reset: bool, dtype: torch.dtype) -> bool:
    """The kernels take this case: a Triton device, kernel dtypes, an affine norm, float decay and threshold,
    and the reset detached (the model's neuron). Other cases run the two ops one after the other."""
    return (use_triton(x) and x.numel() > 0 and x.dtype in KERNEL_DTYPES and dtype in KERNEL_DTYPES
            and isinstance(weight, Tensor) and isinstance(bias, Tensor)
            and not isinstance(decay, Tensor) and not isinstance(threshold, Tensor) and detach_reset)


def norm_lif(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], decay, threshold,
             v_init: Optional[Tensor] = None, *, eps: float = 1e-5, surrogate="arctan", alpha: Optional[float] = None,
             reset: str = "hard", v_reset: float = 0.0, detach_reset: bool = True,
             dtype: Optional[torch.dtype] = None):
    """``lif(F.layer_norm(x, (C,), weight, bias, eps).to(dtype), decay, threshold, v_init, ...)`` for
    ``x [T, *rest, C]``: (spikes ``[T, *rest, C]`` in dtype (default x's), v_final ``[*rest, C]`` fp32).
    weight / bias: ``[C]`` (the norm's affine) or None; the other arguments as ``tether.functional.lif``.
    On a Triton device the normalized input is never stored (see the module's docstring)."""
    check_tensor("x", x, min_ndim=2, dtypes=FLOAT_DTYPES)
    C = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, shape=(C,), dtypes=FLOAT_DTYPES, device=x.device)
    check_real("eps", eps, low=0.0, low_open=True)
    dtype = x.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
    if not fused(x, weight, bias, decay, threshold, detach_reset, dtype):
        y = F.layer_norm(x, (C,), weight, bias, eps).to(dtype)
        return lif(y, decay, threshold, v_init, surrogate=surrogate, alpha=alpha, reset=reset, v_reset=v_reset,
                   detach_reset=detach_reset)
    args = check_lif_args(x, decay, threshold, v_init, surrogate, alpha, reset, v_reset)
    cfg = _Config(float(eps), float(decay), float(threshold), args.surrogate, args.alpha, args.hard, float(v_reset))
    x = x.contiguous()  # [T, *rest, C]
    weight, bias = weight.float().contiguous(), bias.float().contiguous()
    v0 = None if v_init is None else v_init.float().contiguous()  # [*rest, C]
    if torch.compiler.is_compiling():
        spikes, v_final, *_ = torch.ops.tether.norm_lif_forward(x, weight, bias, v0, *cfg, dtype)
        return spikes, v_final
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, v0))):
        spikes, v_final, *_ = _forward(x, weight, bias, v0, cfg, dtype, False)  # no autograd node, no checkpoints
        return spikes, v_final
    return _NormLIF.apply(x, weight, bias, v0, cfg, dtype)
