"""LayerNorm -> LIF in one pass, with the membrane recomputed in backward (design: docs/norm_lif.md).

Layout as tether.kernels.lif: x, spikes and their gradients [T, N] contiguous, N = R * C (R rows of C
channels, the channel innermost); mean, rstd [T, R] fp32 (LayerNorm's row statistics, computed by the caller);
weight, bias [C] fp32. The kernels apply the norm themselves, y = ((x - mean) * rstd) * w + b rounded through
the spikes' dtype (what LayerNorm followed by a cast makes), so y is never written.
The forward keeps, instead of a per-step save, the membrane entering every SEG-th step (ckpt [ceil(T/SEG), N]
fp32; SEG from the launch table); the backward walks the segments last to first, recomputes each one's SEG
steps forward from its checkpoint into registers, then runs them in reverse. Only the model's neuron is
fused: float decay and threshold, reset detached from the graph.
Grid: (cdiv(N, BLOCK),); one program owns BLOCK neurons for all T steps. The kernels take the norm's pointers as
one tuple, norm = (mean, rstd, weight, bias); a pointer passed as None (v_init, grad_v_final, ckpt) is a
compile-time constant: zeros in, or nothing saved.
"""
import math

import torch
import triton
import triton.language as tl

from . import Launcher, cdiv
from .lif import _neurons, _reset, _row, _tile, _vector, read_launch_file, surrogate_grad

@triton.jit
def _normed_row(x_tile, k, t, affine, T, R, C, offs, mask, OUT_DTYPE: tl.constexpr, SEG: tl.constexpr):
    """LayerNorm(x) at step t = row k of x_tile ([SEG, BLOCK], a compile-time k): a [BLOCK] fp32 vector rounded
    through OUT_DTYPE; affine = (mean, rstd pointers, weight, bias [BLOCK] vectors). The row statistics are
    read per step as [BLOCK] vectors: gathered as a tile, their layout would spread the tile's time rows over
    threads (a shuffle per row taken)."""
    mean_ptr, rstd_ptr, w, b = affine
    token = tl.cast(t, tl.int64) * R + offs // C  # [BLOCK] into [T, R]
    inside = mask & (tl.zeros_like(offs) + t < T)
    mean = tl.load(mean_ptr + token, mask=inside, other=0.0)
    rstd = tl.load(rstd_ptr + token, mask=inside, other=0.0)
    y = (_row(x_tile, k, SEG).to(tl.float32) - mean) * rstd * w + b
    return y.to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _affine(w_ptr, b_ptr, offs, mask, C):
    """The norm's weight and bias at each neuron's channel: two [BLOCK] fp32 vectors."""
    return (tl.load(w_ptr + offs % C, mask=mask, other=0.0), tl.load(b_ptr + offs % C, mask=mask, other=0.0))


@triton.jit
def norm_lif_fwd_kernel(x_ptr, norm, v_init_ptr, spikes_ptr, v_final_ptr, ckpt_ptr, T, N, C, decay, threshold,
                        v_reset, HARD: tl.constexpr, BLOCK: tl.constexpr, SEG: tl.constexpr, WARPS: tl.constexpr):
    """spikes[t] = H(h_t - threshold), h_t = decay v_{t-1} + y_t, y = LayerNorm(x); v_final = v_{T-1};
    ckpt (None: no save) gets ckpt[s] = v_{s SEG - 1} (v_init for s = 0). v_init None: zeros."""
    mean_ptr, rstd_ptr, w_ptr, b_ptr = norm
    offs = _neurons(BLOCK, WARPS)
    mask = offs < N
    w, b = _affine(w_ptr, b_ptr, offs, mask, C)
    v = _vector(v_init_ptr, offs, mask, BLOCK)
    out_dtype = spikes_ptr.dtype.element_ty
    R, affine = N // C, (mean_ptr, rstd_ptr, w, b)
    tile = _tile(x_ptr, 0, T, N, offs, mask, SEG)
    for t0 in range(0, T, SEG):
        ahead = _tile(x_ptr, t0 + SEG, T, N, offs, mask, SEG)
        if ckpt_ptr is not None:
            tl.store(ckpt_ptr + tl.cast(t0 // SEG, tl.int64) * N + offs, v, mask=mask)
        for k in tl.static_range(SEG):
            t = t0 + k
            h = decay * v + _normed_row(tile, k, t, affine, T, R, C, offs, mask, out_dtype, SEG)
            fire = h >= threshold
            tl.store(spikes_ptr + tl.cast(t, tl.int64) * N + offs, fire.to(tl.float32).to(out_dtype), mask=mask & (tl.zeros_like(offs) + t < T))
            v = tl.where(t < T, _reset(h, fire, threshold, v_reset, HARD), v)
        tile = ahead
    tl.store(v_final_ptr + offs, v, mask=mask)


@triton.jit
def _recompute(tile, t0, v, affine, T, R, C, offs, mask, decay, threshold, v_reset, OUT_DTYPE: tl.constexpr,
               HARD: tl.constexpr, SEG: tl.constexpr):
    """A segment's SEG steps forward from its x tile and entering membrane v: h_t (the membrane before the
    reset, from which the reverse walk takes the spike and sg'(h_t - threshold)) as a [SEG, BLOCK] fp32 tile."""
    rows = tl.arange(0, SEG)[:, None]
    h_tile = tl.zeros(tile.shape, dtype=tl.float32)
    for k in tl.static_range(SEG):
        y = _normed_row(tile, k, t0 + k, affine, T, R, C, offs, mask, OUT_DTYPE, SEG)
        h = decay * v + y
        h_tile = tl.where(rows == k, h[None, :], h_tile)
        v = _reset(h, h >= threshold, threshold, v_reset, HARD)
    return h_tile


@triton.jit
def norm_lif_bwd_kernel(grad_spikes_ptr, grad_v_final_ptr, x_ptr, norm, ckpt_ptr, grad_y_ptr, grad_v_init_ptr,
                        T, N, C, decay, threshold, v_reset, alpha,
                        SURROGATE: tl.constexpr, HARD: tl.constexpr, BLOCK: tl.constexpr, SEG: tl.constexpr,
                        WARPS: tl.constexpr):
    """Reverse time: dL/dy [T, N] (grad_spikes' dtype) and dL/dv_init [N] fp32 (the reset detached:
    dL/dh_t = dL/ds_t sg'_t + dL/dv_t (1 - s_t) for the hard reset, + dL/dv_t for the soft one;
    dL/dv_{t-1} = decay dL/dh_t). grad_v_final None: zeros."""
    mean_ptr, rstd_ptr, w_ptr, b_ptr = norm
    offs = _neurons(BLOCK, WARPS)
    mask = offs < N
    w, b = _affine(w_ptr, b_ptr, offs, mask, C)
    gv = _vector(grad_v_final_ptr, offs, mask, BLOCK)
    out_dtype = grad_spikes_ptr.dtype.element_ty
    R, affine = N // C, (mean_ptr, rstd_ptr, w, b)
    n_seg = tl.cdiv(T, SEG)
    t0 = (n_seg - 1) * SEG
    tile = _tile(x_ptr, t0, T, N, offs, mask, SEG)
    grads = _tile(grad_spikes_ptr, t0, T, N, offs, mask, SEG)
    for i in range(n_seg):
        t0 = (n_seg - 1 - i) * SEG
        v = tl.load(ckpt_ptr + tl.cast(t0 // SEG, tl.int64) * N + offs, mask=mask, other=0.0)
        # the next segment down (t0 - SEG < 0 at the end: masked rows, never used)
        ahead = _tile(x_ptr, t0 - SEG, T, N, offs, mask, SEG)
        ahead_grads = _tile(grad_spikes_ptr, t0 - SEG, T, N, offs, mask, SEG)
        h_tile = _recompute(tile, t0, v, affine, T, R, C, offs, mask, decay, threshold, v_reset,
                            out_dtype, HARD, SEG)
        for j in tl.static_range(SEG):
            k = SEG - 1 - j
            t = t0 + k
            h = _row(h_tile, k, SEG)
            g_u = _row(grads, k, SEG).to(tl.float32) * surrogate_grad(h - threshold, alpha, SURROGATE)
            if HARD:
                g_h = g_u + tl.where(h >= threshold, 0.0, gv)
            else:
                g_h = g_u + gv
            tl.store(grad_y_ptr + tl.cast(t, tl.int64) * N + offs, g_h.to(out_dtype), mask=mask & (tl.zeros_like(offs) + t < T))
            gv = tl.where(t < T, decay * g_h, gv)  # steps past T (the last segment's tail) leave gv alone
        tile, grads = ahead, ahead_grads
    tl.store(grad_v_init_ptr + offs, gv, mask=mask)


# (min N, BLOCK, WARPS, SEG), first row with N >= min N wins; both kernels launch the same. BLOCK = 32 x WARPS
# x neurons per thread, at least 2 of them: with one, Triton lays a tile's time rows across threads and every
# row taken is a shuffle. SEG: steps per membrane checkpoint and rows per loaded tile (registers grow with it).
# The rows live under "norm_lif" in launch_lif.json, the LIF kernels' shipped launch file, which
# `python -m benchmarks.bench_norm_lif --write-table` writes from its sweep at the LM's shapes
# (benchmarks/results/norm_lif.md; docs/norm_lif.md).
def read_launch_table(path=None) -> list:
    """norm_lif's rows in launch_lif.json (or path): [(min N, BLOCK, WARPS, SEG)], min N decreasing to 0."""
    return [tuple(row) for row in read_launch_file(path)["norm_lif"]]


LAUNCH = read_launch_table()


def launch_config(N: int):
    """(BLOCK, WARPS, SEG) for N neurons, from LAUNCH (the shipped table)."""
    for min_n, *config in LAUNCH:
        if N >= min_n:
            return tuple(config)


def checkpoints(T: int, N: int, like) -> torch.Tensor:
    """The empty [ceil(T / SEG), N] fp32 membrane checkpoints the forward fills (also the fake's shape)."""
    return like.new_empty(cdiv(T, launch_config(N)[2]), N, dtype=torch.float32)


_forward_kernel, _backward_kernel = Launcher(norm_lif_fwd_kernel), Launcher(norm_lif_bwd_kernel)


def norm_lif_forward(x, mean, rstd, weight, bias, v_init, *, decay: float, threshold: float, hard: bool,
                     v_reset: float, out_dtype: torch.dtype, save: bool):
    """x [T, *rest, C] contiguous, mean / rstd [T, *rest] fp32 contiguous, weight / bias [C] fp32, v_init
    [*rest, C] fp32 or None (zeros) -> spikes [T, *rest, C] in out_dtype, v_final [*rest, C] fp32, ckpt
    (see checkpoints; None unless save)."""
    T, N, C = x.shape[0], math.prod(x.shape[1:]), x.shape[-1]
    spikes = torch.empty(x.shape, device=x.device, dtype=out_dtype)  # [T, *rest, C]
    v_final = x.new_empty(x.shape[1:], dtype=torch.float32)  # [*rest, C]
    ckpt = checkpoints(T, N, x) if save else None
    block, warps, seg = launch_config(N)
    _forward_kernel[(cdiv(N, block),)](
        x, (mean, rstd, weight, bias), v_init, spikes, v_final, ckpt, T, N, C, decay, threshold, v_reset,
        HARD=hard, BLOCK=block, SEG=seg, WARPS=warps, num_warps=warps,
        enable_fp_fusion=False)  # rounded op by op, as PyTorch does: spikes equal the reference's
    return spikes, v_final, ckpt


def norm_lif_backward(grad_spikes, grad_v_final, x, mean, rstd, weight, bias, ckpt, *, decay: float,
                      threshold: float, hard: bool, v_reset: float, surrogate: int, alpha: float):
    """grad_spikes [T, *rest, C] contiguous, grad_v_final [*rest, C] fp32 or None (zeros), the forward's
    inputs and ckpt -> dL/dy [T, *rest, C] (y = LayerNorm(x) in grad_spikes' dtype), dL/dv_init fp32."""
    T, N, C = x.shape[0], math.prod(x.shape[1:]), x.shape[-1]
    grad_y = torch.empty_like(grad_spikes)  # [T, *rest, C]
    grad_v_init = x.new_empty(x.shape[1:], dtype=torch.float32)  # [*rest, C]
    block, warps, seg = launch_config(N)
    _backward_kernel[(cdiv(N, block),)](
        grad_spikes, grad_v_final, x, (mean, rstd, weight, bias), ckpt, grad_y, grad_v_init,
        T, N, C, decay, threshold, v_reset, alpha,
        SURROGATE=surrogate, HARD=hard, BLOCK=block, SEG=seg, WARPS=warps, num_warps=warps,
        enable_fp_fusion=False)
    return grad_y, grad_v_init
