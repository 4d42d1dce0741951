"""LayerNorm over the channels, then LIF over time, as one op (design: docs/norm_lif.md).

Where the kernels run, y = LayerNorm(x) is never stored: the forward kernel applies the norm as it reads x,
and keeps for backward only x (which the norm's backward needs anyway), the row statistics and one membrane
checkpoint every SEG steps (tether.kernels.norm_lif.launch_config); the backward kernel recomputes the
membrane from them.
Elsewhere (the CPU, a tensor decay or threshold, a reset differentiated through the spike) it is
``F.layer_norm`` followed by ``tether.functional.lif``, the same function.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tether._backend import use_triton
from tether._checks import FLOAT_DTYPES, check_lif_args, check_real, check_tensor
from tether.functional._op import Op
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
    out_dtype: torch.dtype  # the spikes'
    save: bool  # keep the checkpoints for a backward


def _stats(x: Tensor, eps: float):
    """LayerNorm's row statistics of x [..., C]: mean, rstd [..., 1] fp32."""
    var, mean = torch.var_mean(x.float(), dim=-1, correction=0, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def _forward(x, weight, bias, v_init, cfg: _Config):
    """-> spikes, v_final, mean, rstd, ckpt (empty unless cfg.save)."""
    mean, rstd = _stats(x, cfg.eps)
    spikes, v_final, ckpt = kernels.norm_lif_forward(
        x, mean, rstd, weight, bias, v_init, decay=cfg.decay, threshold=cfg.threshold, hard=cfg.hard,
        v_reset=cfg.v_reset, out_dtype=cfg.out_dtype, save=cfg.save)
    return spikes, v_final, mean, rstd, x.new_empty(0, dtype=torch.float32) if ckpt is None else ckpt


def _fake_forward(x, weight, bias, v_init, cfg: _Config):
    rows = x.shape[:-1] + (1,)
    ckpt = kernels.checkpoints(x.shape[0], x[0].numel(), x) if cfg.save else x.new_empty(0, dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=cfg.out_dtype), x.new_empty(x.shape[1:], dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32), ckpt)


def _backward(grad_spikes, grad_v_final, x, mean, rstd, weight, bias, ckpt, cfg: _Config):
    """The LIF part of the backward (the kernel): -> dL/dy, dL/dv_init."""
    return kernels.norm_lif_backward(grad_spikes, grad_v_final, x, mean, rstd, weight, bias, ckpt, decay=cfg.decay,
                                     threshold=cfg.threshold, hard=cfg.hard, v_reset=cfg.v_reset,
                                     surrogate=lif_kernels.SURROGATE_IDS[cfg.surrogate], alpha=cfg.alpha)


def _fake_backward(grad_spikes, grad_v_final, x, mean, rstd, weight, bias, ckpt, cfg: _Config):
    return torch.empty_like(grad_spikes), x.new_empty(x.shape[1:], dtype=torch.float32)


def _save(ctx, tensors, cfg: _Config, outputs):
    x, weight, bias, _ = tensors
    _, _, mean, rstd, ckpt = outputs
    ctx.save_for_backward(x, weight, bias, mean, rstd, ckpt)
    ctx.cfg = cfg


def _grads(ctx, grad_outputs, needs, backward):
    """-> dL/dx, dL/dweight, dL/dbias, dL/dv_init (None where needs says no); the LIF part by the kernel, the
    norm's by ATen."""
    grad_spikes, grad_v_final = grad_outputs
    x, weight, bias, mean, rstd, ckpt = ctx.saved_tensors
    if grad_spikes is None:  # only v_final was used
        grad_spikes = torch.zeros(x.shape, device=x.device, dtype=ctx.cfg.out_dtype)
    if grad_v_final is not None:  # None: zeros, inside the kernel
        grad_v_final = grad_v_final.contiguous()
    grad_y, grad_v_init = backward(grad_spikes.contiguous(), grad_v_final, x, mean, rstd, weight, bias, ckpt, ctx.cfg)
    grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
        grad_y.float(), x.float(), [x.shape[-1]], mean, rstd, weight, bias, list(needs[:3]))
    if grad_x is not None:
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_w, grad_b, grad_v_init if needs[3] else None


_norm_lif = Op("tether::norm_lif", tensors="Tensor x, Tensor weight, Tensor bias, Tensor? v_init", config=_Config,
               returns=5, outputs=2, forward=_forward, fake=_fake_forward, save=_save, grads=_grads,
               backward=_backward, fake_backward=_fake_backward,
               backward_tensors="Tensor grad_spikes, Tensor? grad_v_final, Tensor x, Tensor mean, Tensor rstd, "
                                "Tensor weight, Tensor bias, Tensor ckpt", backward_config=_Config,
               backward_returns=2)


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
    x = x.contiguous()  # [T, *rest, C]
    weight, bias = weight.float().contiguous(), bias.float().contiguous()
    v0 = None if v_init is None else v_init.float().contiguous()  # [*rest, C]
    # checkpoints only for a backward (while tracing, grad mode and requires_grad are known)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, v0))
    cfg = _Config(float(eps), float(decay), float(threshold), args.surrogate, args.alpha, args.hard, float(v_reset),
                  dtype, save)
    return _norm_lif(x, weight, bias, v0, cfg=cfg)
