"""Argument checks, and the constants and defaults they share (surrogate table, resets, forms, TTT-MLP shapes,
token scale): one home for every op and every path. The kernel path and the reference (CPU) path of
tether.functional, the reference itself, the modules of tether.nn and the ttt-tk drop-in all use these.
Errors name the argument, what was expected and what came ("name: expected ..., got ...").

Values are checked where they are Python numbers (no cost); a tensor's values only where a bad one would make
the output all NaN (spike attention's gamma), and only on the CPU: on CUDA reading them waits for the GPU
(see check_positive_values).
"""
import math
import numbers
from typing import Iterable, NamedTuple, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
                 shape: Optional[Sequence[int]] = None,
                 dtypes: Optional[Iterable[torch.dtype]] = None,
                 device: Optional[torch.device] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device} (same device as the input), got {t.device}")


def check_buffer(name: str, t, shape, dtype: torch.dtype, device) -> None:
    """An output buffer the caller passes: exact shape, dtype and device, and contiguous (written in place)."""
    check_tensor(name, t, shape=shape, dtypes=(dtype,), device=device)
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous output buffer, got strides {t.stride()}")


def check_real(name: str, value, *, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False) -> float:
    """A Python number (not a bool) in [low, high], (low, high] when low_open; an infinite end is open, so
    the value is finite. NaN is never in range. Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    low_open, high_open = low_open or low == -math.inf, high == math.inf
    if not ((value > low if low_open else value >= low) and (value < high if high_open else value <= high)):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected a value in {interval}, got {value}")
    return value


def check_positive_values(name: str, t: torch.Tensor) -> None:
    """Every value of t finite and > 0 (NaN is not), for a tensor on the CPU. A CUDA tensor's values are not
    read: that waits for the GPU on every call, which stalls an eager training step or a generation loop
    that would otherwise run ahead of the GPU (the same reason spike_linear does not check its 0/1 input);
    a bad value there shows as NaN outputs. Skipped while torch.compile traces (no values to read)."""
    if t.is_cuda or torch.compiler.is_compiling():
        return
    bad = ~((t > 0) & (t < math.inf))
    if bool(bad.any()):
        raise ValueError(f"{name}: expected finite values > 0, got {t.detach()[bad].flatten()[:4].tolist()} "
                         f"among them")


def check_group_size(checkpoint_group_size) -> None:
    if not isinstance(checkpoint_group_size, int) or checkpoint_group_size < 1:
        raise ValueError(f"checkpoint_group_size: expected a positive int, got {checkpoint_group_size!r}")


# ---- LIF (spec: docs/spec/lif.md) ----------------------------------------------------------------------------

# name -> (default alpha, peak of sg'(u) as a function of alpha): the peak scales the kernel's uint16 save.
SURROGATES = {
    "arctan": (2.0, lambda alpha: alpha / 2),
    "sigmoid": (4.0, lambda alpha: alpha / 4),
    "fast_sigmoid": (10.0, lambda alpha: 1.0),
}
RESETS = ("hard", "soft")


def check_alpha(alpha) -> float:
    """A surrogate's sharpness: a finite float > 0 (at 0 every surrogate gradient is zero or undefined)."""
    return check_real("alpha", alpha, low=0.0, low_open=True)


def check_decay(decay) -> float:
    """A float decay (beta): in [0, 1] (0: no memory; 1: a perfect integrator)."""
    return check_real("decay", decay, low=0.0, high=1.0)


def resolve_surrogate(surrogate, alpha: Optional[float]):
    """(name, alpha) from a name or a surrogate object (anything with .name and .alpha); alpha given wins."""
    if not isinstance(surrogate, str):
        if not (hasattr(surrogate, "name") and hasattr(surrogate, "alpha")):
            raise TypeError(f"surrogate: expected one of {tuple(SURROGATES)} or a tether.nn.Surrogate, "
                            f"got {type(surrogate).__name__}")
        surrogate, alpha = surrogate.name, surrogate.alpha if alpha is None else alpha
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate: expected one of {tuple(SURROGATES)}, got {surrogate!r}")
    return surrogate, check_alpha(SURROGATES[surrogate][0] if alpha is None else alpha)


class LIFArgs(NamedTuple):
    surrogate: str
    alpha: float
    hard: bool


def check_lif_args(x, decay, threshold, v_init, surrogate, alpha, reset, v_reset=0.0) -> LIFArgs:
    """lif's arguments. A float decay is in [0, 1], a float threshold and v_reset finite; a tensor decay or
    threshold is taken as given (its values are not read: no wait for the GPU)."""
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
        elif not isinstance(p, (int, float)) or isinstance(p, bool):
            raise TypeError(f"{name}: expected a float or a tensor, got {type(p).__name__}")
    if not isinstance(decay, torch.Tensor):
        check_decay(decay)
    if not isinstance(threshold, torch.Tensor):
        check_real("threshold", threshold)
    check_real("v_reset", v_reset)
    if v_init is not None:
        check_tensor("v_init", v_init, shape=x.shape[1:], dtypes=FLOAT_DTYPES, device=x.device)
    if reset not in RESETS:
        raise ValueError(f"reset: expected one of {RESETS}, got {reset!r}")
    surrogate, alpha = resolve_surrogate(surrogate, alpha)
    return LIFArgs(surrogate, alpha, reset == "hard")


# ---- spike attention (spec: docs/spec/spike_attention.md) ----------------------------------------------------

FORMS = ("elementwise", "matrix")
VALUES = ("spikes", "real")  # what spiking attention accumulates: v as spikes, or v as the normalized projection


def check_gamma(gamma, H: int, device) -> None:
    """A decay: a float in (0, 1] (the spec's range), or a 0-d / [H] tensor whose values are checked to be
    finite and > 0, what the op is defined for (gamma <= 0 made the whole output NaN). A tensor may step over
    1 (the memory then grows): finite differences probe gamma = 1 from both sides, and a learnable gamma that
    an optimizer moves past 1 should not stop a run. The values of a CUDA tensor are not read
    (check_positive_values says why)."""
    if isinstance(gamma, torch.Tensor):
        check_tensor("gamma", gamma, dtypes=FLOAT_DTYPES, device=device)
        if gamma.dim() > 1 or (gamma.dim() == 1 and gamma.shape[0] != H):
            raise ValueError(f"gamma: expected a float, a 0-d tensor or a tensor of shape ({H},) "
                             f"(one decay per head), got shape {tuple(gamma.shape)}")
        check_positive_values("gamma", gamma)
    elif isinstance(gamma, numbers.Real) and not isinstance(gamma, bool):
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma: expected a decay in (0, 1], got {gamma}")
    else:
        raise TypeError(f"gamma: expected a float or a tensor, got {type(gamma).__name__}")


def check_spike_attention_args(q, k, v, gamma, state, form, scale=None) -> None:
    """spike_attention's arguments: q, k, v [T, B, H, D] with D >= 1 (T, B, H may be 0), gamma (check_gamma),
    state [B, H, D] (elementwise) or [B, H, D, D] (matrix)."""
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, shape=q.shape, dtypes=FLOAT_DTYPES, device=q.device)
    T, B, H, D = q.shape
    if D == 0:
        raise ValueError(f"q: expected a head dim D >= 1 (q is [T, B, H, D]), got shape {tuple(q.shape)}")
    check_gamma(gamma, H, q.device)
    if state is not None:
        shape = (B, H, D) if form == "elementwise" else (B, H, D, D)
        check_tensor("state", state, shape=shape, dtypes=FLOAT_DTYPES, device=q.device)
    if scale is not None and (form != "matrix" or not isinstance(scale, numbers.Real)):
        raise ValueError(f"scale: expected None, or a float with form='matrix', got {scale!r} with form={form!r}")


# ---- TTT-MLP (spec: docs/spec/ttt_mlp.md) --------------------------------------------------------------------

TTT_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TTT_STATE_DTYPES = (torch.float32, torch.float64)
TTT_NAMES = ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "token_scale")


def ttt_state_shapes(B: int, NH: int, F: int, lead: tuple = ()):
    """Shapes of (w1, b1, w2, b2), with `lead` dims after [B, NH] (the checkpoints' (NK,))."""
    K = 4 * F
    return ((B, NH, *lead, F, K), (B, NH, *lead, 1, K), (B, NH, *lead, K, F), (B, NH, *lead, 1, F))


def default_token_scale(mini_batch: int, device=None) -> torch.Tensor:
    """token_scale[i] = 1 / (i + 1): token i of a mini-batch averages the gradients of tokens 0..i."""
    return 1.0 / torch.arange(1, mini_batch + 1, dtype=torch.float32, device=device)  # [CS]


def check_ttt_inputs(xq, xk, xv, lr, ln_weight, ln_bias, state, token_scale=None, *,
                     names: Sequence[str] = TTT_NAMES, lead: tuple = ()):
    """TTT-MLP's inputs: xq, xk, xv [B, NH, NC, CS, F] (F >= 1 and CS >= 1; B, NH, NC may be 0), lr
    [B, NH, NC, CS, 1], LN params [NH, F], state (w1, b1, w2, b2) of the shapes ttt_state_shapes(.., lead)
    (lead: the checkpoints' (NK,)), all of one dtype, token_scale [CS] of that dtype; `names` lets the
    drop-in report its own names. Returns (B, NH, NC, CS, F)."""
    n = dict(zip(TTT_NAMES, names))
    check_tensor(n["xq"], xq, ndim=5, dtypes=TTT_ACT_DTYPES)
    B, NH, NC, CS, F = xq.shape
    if F == 0 or CS == 0:
        raise ValueError(f"{n['xq']}: expected a head dim F >= 1 and a mini-batch size CS >= 1 "
                         f"([B, NH, NC, CS, F]), got shape {tuple(xq.shape)}")
    dev = xq.device
    for name, t in (("xk", xk), ("xv", xv)):
        check_tensor(n[name], t, shape=xq.shape, dtypes=(xq.dtype,), device=dev)
    check_tensor(n["lr"], lr, shape=(B, NH, NC, CS, 1), dtypes=TTT_ACT_DTYPES, device=dev)
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_tensor(n[name], t, shape=(NH, F), dtypes=TTT_STATE_DTYPES, device=dev)
    check_tensor(n["w1"], state[0], dtypes=TTT_STATE_DTYPES)
    dtype = state[0].dtype
    for name, t, shape in zip(("w1", "b1", "w2", "b2"), state, ttt_state_shapes(B, NH, F, lead)):
        check_tensor(n[name], t, shape=shape, dtypes=(dtype,), device=dev)
    if token_scale is not None:
        check_tensor(n["token_scale"], token_scale, shape=(CS,), dtypes=(dtype,), device=dev)
    return B, NH, NC, CS, F


def check_ttt_grads(grad_out, grad_last, xq, state_dtype: torch.dtype, *,
                    names: Sequence[str] = ("grad_out", "grad_w1_last", "grad_b1_last", "grad_w2_last",
                                            "grad_b2_last")) -> None:
    """TTT-MLP's upstream gradients: of the outputs, grad_out like xq (any activation dtype), and of the
    final state, grad_last (w1, b1, w2, b2) in state_dtype."""
    B, NH, _, _, F = xq.shape
    check_tensor(names[0], grad_out, shape=xq.shape, dtypes=TTT_ACT_DTYPES, device=xq.device)
    for name, t, shape in zip(names[1:], grad_last, ttt_state_shapes(B, NH, F)):
        check_tensor(name, t, shape=shape, dtypes=(state_dtype,), device=xq.device)
