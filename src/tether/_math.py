"""Math shared by every path of an op: the reference (the oracle), the CPU path and the kernel launchers of
tether.functional. The reference imports it, so nothing takes helpers from the reference."""
import math

import torch


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, a new tensor only where the dtype changes. An autograd.Function output made by a no-op
    ``.to`` (t itself) gets no gradient under torch.compile with torch 2.11 (dynamo traces its backward with
    zeros); tests/test_lm.py::test_torch_compile_fullgraph caught it."""
    return t if t.dtype == dtype else t.to(dtype)


def compute_dtype(*args) -> torch.dtype:
    """float64 when any tensor among args is float64 (gradcheck), else float32: spike counts, membranes and the
    TTT-MLP state accumulate in fp32. Non-tensors (a float gamma, a None state) are skipped."""
    fp64 = any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in args)
    return torch.float64 if fp64 else torch.float32


def membrane_dtype(x: torch.Tensor) -> torch.dtype:
    """Membrane arithmetic is fp32, fp64 for fp64 input (so the oracle can be gradchecked)."""
    return compute_dtype(x)


def surrogate_grad(u: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """sg'(u), the stand-in for dH(u)/du (spec table: docs/spec/lif.md)."""
    if surrogate == "arctan":
        return (alpha / 2) / (1 + (math.pi * alpha / 2 * u) ** 2)
    if surrogate == "sigmoid":
        sig = torch.sigmoid(alpha * u)
        return alpha * sig * (1 - sig)
    return 1 / (1 + alpha * u.abs()) ** 2


def gamma_per_head(gamma, H: int, dtype: torch.dtype, device) -> torch.Tensor:
    """gamma as a [H] tensor (a float or 0-d tensor is expanded; autograd sums the expansion back)."""
    if not isinstance(gamma, torch.Tensor):
        return torch.full((H,), float(gamma), dtype=dtype, device=device)
    return gamma.to(dtype).expand(H)


def decay_matrix(log_gamma: torch.Tensor, n: int, strict: bool = False) -> torch.Tensor:
    """[H, n, n] causal decays: gamma^(i - j) for j <= i, or gamma^(i - 1 - j) for j < i when strict; else 0.

    Built from exp of non-positive numbers, so no gamma^-k ever appears (safe for any gamma in (0, 1]).
    The exponent is clamped before exp so masked entries never hold inf (inf * 0 = nan in backward).
    """
    i = torch.arange(n, device=log_gamma.device)
    steps = (i[:, None] - i[None, :] - int(strict)).clamp(min=0)  # [n, n]
    mask = i[:, None] > i[None, :] if strict else i[:, None] >= i[None, :]
    return torch.where(mask, torch.exp(steps * log_gamma[:, None, None]), 0.0)
