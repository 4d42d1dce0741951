"""Readable LIF oracle (spec: docs/spec/lif.md): a Python loop over time, autograd does the backward.

Its argument checks and the surrogate table are tether._checks', the surrogate derivative tether._math's (shared
with the other paths).
"""
from typing import Optional, Union

import torch

from tether._checks import check_lif_args, resolve_surrogate
from tether._math import membrane_dtype, surrogate_grad

Param = Union[float, torch.Tensor]


class SurrogateSpike(torch.autograd.Function):
    """Heaviside forward (H(0) = 1), surrogate derivative backward."""

    @staticmethod
    def forward(ctx, u, surrogate, alpha):
        ctx.save_for_backward(u)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad * surrogate_grad(u, ctx.surrogate, ctx.alpha), None, None


def spike(u: torch.Tensor, surrogate: str = "arctan", alpha: Optional[float] = None) -> torch.Tensor:
    """H(u) with the named surrogate gradient."""
    surrogate, alpha = resolve_surrogate(surrogate, alpha)
    return SurrogateSpike.apply(u, surrogate, alpha)


def lif(x: torch.Tensor, decay: Param, threshold: Param, v_init: Optional[torch.Tensor] = None, *,
        surrogate="arctan", alpha: Optional[float] = None, reset: str = "hard", v_reset: float = 0.0,
        detach_reset: bool = True):
    """``x [T, *rest]`` -> (spikes ``[T, *rest]`` in x's dtype, v_final ``[*rest]`` fp32, fp64 for fp64 x).

    T = 0 (or an empty neuron dim): empty spikes, v_final = v_init (zeros when None). Non-finite input: h_t =
    NaN never fires (NaN >= theta is false) and stays NaN; +inf fires, and the hard reset brings it back to
    v_reset (the spec's h (1 - s) + v_reset s, computed so that inf * 0 makes no NaN), the soft
    reset leaves it at +inf; -inf never fires. Gradients through non-finite membranes are not specified.
    """
    args = check_lif_args(x, decay, threshold, v_init, surrogate, alpha, reset, v_reset)
    dtype = membrane_dtype(x)
    v = torch.zeros(x.shape[1:], dtype=dtype, device=x.device) if v_init is None else v_init.to(dtype)
    beta = decay.to(dtype) if isinstance(decay, torch.Tensor) else decay
    theta = threshold.to(dtype) if isinstance(threshold, torch.Tensor) else threshold
    spikes = []
    for x_t in x:
        h = beta * v + x_t.to(dtype)
        s = SurrogateSpike.apply(h - theta, args.surrogate, args.alpha)
        if not args.hard:
            v = h - theta * (s.detach() if detach_reset else s)
        elif detach_reset:
            v = torch.where(s > 0, v_reset, h)  # h (1 - s) + v_reset s, also for h = +inf; dv/dh = 1 - s
        else:  # through the spike too, dv/ds = v_reset - h; the clamp keeps h = +inf from making inf * 0
            v = h.clamp(max=torch.finfo(dtype).max) * (1 - s) + v_reset * s
        spikes.append(s)
    if not spikes:  # T = 0: no step
        return x.clone(), v.clone()
    return torch.stack(spikes).to(x.dtype), v
