"""Readable LIF oracle (spec: ../shared/spec/lif.md): a Python loop over time, autograd does the backward.

Also the one home of the LIF argument checks and surrogate table, which tether.functional.lif reuses.
"""
import math
from typing import NamedTuple, Optional, Union

import torch

from tether._checks import FLOAT_DTYPES, check_tensor

# name -> (default alpha, peak of sg'(u) as a function of alpha): the peak scales the kernel's uint16 save.
SURROGATES = {
    "arctan": (2.0, lambda alpha: alpha / 2),
    "sigmoid": (4.0, lambda alpha: alpha / 4),
    "fast_sigmoid": (10.0, lambda alpha: 1.0),
}
RESETS = ("hard", "soft")

Param = Union[float, torch.Tensor]


def surrogate_grad(u: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """sg'(u), the stand-in for dH(u)/du (spec table)."""
    if surrogate == "arctan":
        return (alpha / 2) / (1 + (math.pi * alpha / 2 * u) ** 2)
    if surrogate == "sigmoid":
        sig = torch.sigmoid(alpha * u)
        return alpha * sig * (1 - sig)
    return 1 / (1 + alpha * u.abs()) ** 2


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


def resolve_surrogate(surrogate, alpha: Optional[float]):
    """(name, alpha) from a name or a surrogate object (anything with .name and .alpha); alpha given wins."""
    if not isinstance(surrogate, str):
        if not (hasattr(surrogate, "name") and hasattr(surrogate, "alpha")):
            raise TypeError(f"surrogate: expected one of {tuple(SURROGATES)} or a tether.nn.Surrogate, "
                            f"got {type(surrogate).__name__}")
        surrogate, alpha = surrogate.name, surrogate.alpha if alpha is None else alpha
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate: expected one of {tuple(SURROGATES)}, got {surrogate!r}")
    return surrogate, float(SURROGATES[surrogate][0] if alpha is None else alpha)


class LIFArgs(NamedTuple):
    surrogate: str
    alpha: float
    hard: bool


def check_lif_args(x, decay, threshold, v_init, surrogate, alpha, reset) -> LIFArgs:
    """Validate lif's arguments (errors name the argument, what was expected and what came)."""
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES)
    for name, p in (("decay", decay), ("threshold", threshold)):
        if isinstance(p, torch.Tensor):
            check_tensor(name, p, dtypes=FLOAT_DTYPES, device=x.device)
            if p.dim() == 1:
                if x.dim() < 2 or p.shape[0] != x.shape[-1]:
                    raise ValueError(f"{name}: a per-channel tensor must have shape [C] with C = x.shape[-1] "
                                     f"(x is [T, ..., C]), got {name} {tuple(p.shape)} for x {tuple(x.shape)}")
            elif p.dim() != 0:
                raise ValueError(f"{name}: expected a float, a 0-d tensor or a [C] tensor, got shape {tuple(p.shape)}")
        elif not isinstance(p, (int, float)):
            raise TypeError(f"{name}: expected a float or a tensor, got {type(p).__name__}")
    if v_init is not None:
        check_tensor("v_init", v_init, shape=x.shape[1:], dtypes=FLOAT_DTYPES, device=x.device)
    if reset not in RESETS:
        raise ValueError(f"reset: expected one of {RESETS}, got {reset!r}")
    surrogate, alpha = resolve_surrogate(surrogate, alpha)
    return LIFArgs(surrogate, alpha, reset == "hard")


def membrane_dtype(x: torch.Tensor) -> torch.dtype:
    """Membrane arithmetic is fp32, fp64 for fp64 input (so the oracle can be gradchecked)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lif(x: torch.Tensor, decay: Param, threshold: Param, v_init: Optional[torch.Tensor] = None, *,
        surrogate="arctan", alpha: Optional[float] = None, reset: str = "hard", v_reset: float = 0.0,
        detach_reset: bool = True):
    """``x [T, *rest]`` -> (spikes ``[T, *rest]`` in x's dtype, v_final ``[*rest]`` fp32, fp64 for fp64 x)."""
    args = check_lif_args(x, decay, threshold, v_init, surrogate, alpha, reset)
    dtype = membrane_dtype(x)
    v = torch.zeros(x.shape[1:], dtype=dtype, device=x.device) if v_init is None else v_init.to(dtype)
    beta = decay.to(dtype) if isinstance(decay, torch.Tensor) else decay
    theta = threshold.to(dtype) if isinstance(threshold, torch.Tensor) else threshold
    spikes = []
    for x_t in x:
        h = beta * v + x_t.to(dtype)
        s = SurrogateSpike.apply(h - theta, args.surrogate, args.alpha)
        s_reset = s.detach() if detach_reset else s
        v = h * (1 - s_reset) + v_reset * s_reset if args.hard else h - theta * s_reset
        spikes.append(s)
    return torch.stack(spikes).to(x.dtype), v
