"""Fused LIF kernels (spec: docs/spec/lif.md): forward over the whole time window, reverse-time backward.

Layout: x, spikes and their gradients are [T, N] contiguous (N = the flattened trailing dims, the channel
innermost); membrane, v_init and per-neuron parameter gradients are [N] fp32. decay / threshold are either a
float or an fp32 tensor of C values read at channel n % C (C = 1 for a shared 0-d tensor).
The kernels take related arguments as tuples (a None member is a compile-time constant, so `is None` on it
picks the code path): a parameter p = (ptr or None, float value, C); the saves (saved, bits), each None
where SAVE has no such part; the per-neuron state and gradients as named at each kernel. Inside, a neuron is
neuron = (beta, theta, alpha, v_reset): decay and threshold as [BLOCK] fp32 or floats, alpha and v_reset floats.
Grid: (cdiv(N, BLOCK),). One program (WARPS warps) owns BLOCK neurons and walks time with the membrane in
registers.
Loads go CHUNK time steps at a time as one [CHUNK, BLOCK] tile, fetched one chunk ahead, so that CHUNK rows
of loads are in flight while the serial recurrence runs; stores are issued per step.

What the forward saves for backward (SAVE):
  NONE    inference: nothing is written.
  COMPACT sqrt(sg'(h_t - theta) / peak) as 16-bit fixed point (peak: the surrogate's maximum; the square
          root spends the code's precision on the tails), two steps per int32 word (step 2r in the low
          half, 2r+1 in the high half: twice the store width of a uint16 per step) [ceil(T/2), N], + the
          spikes as bits, 32 steps per int32 word [ceil(T/32), N]: 2.125 B/elem.
  MEMBRANE h_t in fp32 (bits kept in an int32 tensor so autograd never builds a gradient for it) [T, N]:
          4 B/elem. Needed when dL/ddecay = sum_t g_h_t v_{t-1} is asked for (v_{t-1} = reset(h_{t-1})),
          or for the hard reset differentiated through the spike (needs h_t - v_reset).
"""
import json
import math
from importlib import resources
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import Launcher, cdiv

SAVE_NONE, SAVE_COMPACT, SAVE_MEMBRANE = 0, 1, 2
SURROGATE_IDS = {"arctan": 0, "sigmoid": 1, "fast_sigmoid": 2}


@triton.jit
def surrogate_grad(u, alpha, SURROGATE: tl.constexpr):
    """sg'(u): 0 arctan, 1 sigmoid, 2 fast_sigmoid (the spec's table)."""
    if SURROGATE == 0:
        z = (1.5707963267948966 * alpha) * u
        return (0.5 * alpha) / (1.0 + z * z)
    elif SURROGATE == 1:
        sig = tl.sigmoid(alpha * u)
        return alpha * sig * (1.0 - sig)
    else:
        d = 1.0 + alpha * tl.abs(u)
        return 1.0 / (d * d)


@triton.jit
def _param(p, offs, mask):
    """A decay / threshold p = (ptr or None, value, C): the float value (ptr None), or [BLOCK] values read at
    channel offs % C."""
    if p[0] is not None:
        return tl.load(p[0] + offs % p[2], mask=mask, other=1.0)
    else:
        return p[1]


@triton.jit
def _vector(ptr, offs, mask, BLOCK: tl.constexpr):
    """A [BLOCK] fp32 per-neuron vector (v_init, dL/dv_final), or zeros when the caller passed none (ptr None)."""
    if ptr is not None:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        return tl.zeros([BLOCK], dtype=tl.float32)


@triton.jit
def _neurons(BLOCK: tl.constexpr, WARPS: tl.constexpr):
    """This program's BLOCK neuron indices; each thread holds BLOCK // (32 WARPS) of them. The contiguity hint
    makes every dtype (fp32, bf16, uint16) use exactly that vector width, so all tiles share one register
    layout with the time rows inside each thread (no shuffles between them)."""
    return tl.max_contiguous(tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), BLOCK // (32 * WARPS))


@triton.jit
def _tile(ptr, t0, T, N, offs, mask, CHUNK: tl.constexpr):
    """Rows t0 .. t0+CHUNK-1 of a [T, N] tensor as a [CHUNK, BLOCK] tile (rows outside [0, T) read 0)."""
    rows = t0 + tl.arange(0, CHUNK)
    ptrs = ptr + rows.to(tl.int64)[:, None] * N + offs[None, :]
    return tl.load(ptrs, mask=(rows[:, None] >= 0) & (rows[:, None] < T) & mask[None, :], other=0)


@triton.jit
def _row(tile, k, CHUNK: tl.constexpr):
    """Row k (a compile-time constant) of a [CHUNK, BLOCK] tile; the rows sit in one thread, so this folds."""
    return tl.sum(tl.where(tl.arange(0, CHUNK)[:, None] == k, tile, 0), axis=0)


@triton.jit
def _reset(h, fire, theta, v_reset, HARD: tl.constexpr):
    """v_t from h_t: hard reset to v_reset, or soft reset (subtract theta)."""
    if HARD:
        return tl.where(fire, v_reset, h)
    else:
        return h - tl.where(fire, theta, 0.0)


@triton.jit
def _fwd_step(x, t, v, bits, neuron, inv_sg_peak, N, offs, mask, spikes_ptr, saved_ptr,
              SURROGATE: tl.constexpr, HARD: tl.constexpr, SAVE: tl.constexpr):
    """Step t: x, v (= v_{t-1}) [BLOCK] fp32, neuron = (beta, theta, alpha, v_reset) -> (v_t, bits, code):
    stores spikes[t] (and h_t for MEMBRANE); bits gains s_t, code is the COMPACT save (0 otherwise)."""
    beta, theta, alpha, v_reset = neuron
    h = beta * v + x
    fire = h >= theta
    row = tl.cast(t, tl.int64) * N + offs
    tl.store(spikes_ptr + row, fire.to(tl.float32).to(spikes_ptr.dtype.element_ty), mask=mask)
    code = 0  # COMPACT: the 16-bit sg' code, stored in pairs by _fwd_chunk
    if SAVE == 1:
        sg = surrogate_grad(h - theta, alpha, SURROGATE)
        code = tl.minimum(tl.sqrt(sg * inv_sg_peak) * 65535.0 + 0.5, 65535.0).to(tl.int32)
        bits = bits | (fire.to(tl.int32) << (t % 32))
    elif SAVE == 2:
        tl.store(saved_ptr + row, h.to(tl.int32, bitcast=True), mask=mask)
    return _reset(h, fire, theta, v_reset, HARD), bits, code


@triton.jit
def _store_codes(saved_ptr, t, N, offs, mask, low, high):
    """The codes of steps t - 1 (low half) and t (high half) into word (t // 2) of the [ceil(T/2), N] save."""
    tl.store(saved_ptr + tl.cast(t // 2, tl.int64) * N + offs, low | (high << 16), mask=mask)


@triton.jit
def _fwd_chunk(tile, t0, T, N, offs, mask, v, bits, neuron, inv_sg_peak, spikes_ptr, save,
               SURROGATE: tl.constexpr, HARD: tl.constexpr, SAVE: tl.constexpr,
               CHUNK: tl.constexpr, FULL: tl.constexpr):
    """Steps t0 .. t0+CHUNK-1 (FULL) or those below T (the last, partial chunk). t0 and CHUNK are even, so
    the COMPACT codes pair up inside the chunk (an odd T stores its last code alone). save = (saved, bits)."""
    saved_ptr, bits_ptr = save
    low = tl.zeros_like(bits)
    for k in tl.static_range(CHUNK):
        x = _row(tile, k, CHUNK).to(tl.float32)
        if FULL:
            v, bits, code = _fwd_step(x, t0 + k, v, bits, neuron, inv_sg_peak, N, offs, mask, spikes_ptr,
                                      saved_ptr, SURROGATE, HARD, SAVE)
            if SAVE == 1:
                if k % 2 == 0:
                    low = code
                else:
                    _store_codes(saved_ptr, t0 + k, N, offs, mask, low, code)
        else:
            if t0 + k < T:
                v, bits, code = _fwd_step(x, t0 + k, v, bits, neuron, inv_sg_peak, N, offs, mask, spikes_ptr,
                                          saved_ptr, SURROGATE, HARD, SAVE)
                if SAVE == 1:
                    if k % 2 == 0:
                        low = code
                        if t0 + k == T - 1:
                            _store_codes(saved_ptr, t0 + k, N, offs, mask, low, 0)
                    else:
                        _store_codes(saved_ptr, t0 + k, N, offs, mask, low, code)
    if SAVE == 1 and FULL:
        # CHUNK divides 32, so a word is complete exactly when a chunk ends on a multiple of 32
        if (t0 + CHUNK) % 32 == 0:
            tl.store(bits_ptr + tl.cast((t0 + CHUNK) // 32 - 1, tl.int64) * N + offs, bits, mask=mask)
            bits = tl.zeros_like(bits)
    return v, bits


@triton.jit
def lif_fwd_kernel(x_ptr, state, decay, threshold, spikes_ptr, save, T, N, alpha, v_reset, inv_sg_peak,
                   SURROGATE: tl.constexpr, HARD: tl.constexpr, SAVE: tl.constexpr,
                   BLOCK: tl.constexpr, CHUNK: tl.constexpr, WARPS: tl.constexpr):
    """spikes[t] = H(h_t - theta), h_t = beta v_{t-1} + x[t], v reset; v_final = v_{T-1}; saved per SAVE.
    state = (v_init [N] fp32 or None (zeros: no tensor to allocate and fill), v_final [N] fp32); decay /
    threshold = (ptr or None, value, C); save = (saved, bits)."""
    v_init_ptr, v_final_ptr = state
    offs = _neurons(BLOCK, WARPS)
    mask = offs < N
    neuron = (_param(decay, offs, mask), _param(threshold, offs, mask), alpha, v_reset)
    v = _vector(v_init_ptr, offs, mask, BLOCK)
    bits = tl.zeros([BLOCK], dtype=tl.int32)
    n_full = T // CHUNK * CHUNK
    tile = _tile(x_ptr, 0, T, N, offs, mask, CHUNK)
    for t0 in range(0, n_full, CHUNK):
        ahead = _tile(x_ptr, t0 + CHUNK, T, N, offs, mask, CHUNK)
        v, bits = _fwd_chunk(tile, t0, T, N, offs, mask, v, bits, neuron, inv_sg_peak, spikes_ptr, save,
                             SURROGATE, HARD, SAVE, CHUNK, True)
        tile = ahead
    if n_full < T:
        v, bits = _fwd_chunk(tile, n_full, T, N, offs, mask, v, bits, neuron, inv_sg_peak, spikes_ptr, save,
                             SURROGATE, HARD, SAVE, CHUNK, False)
    if SAVE == 1:
        if T % 32 != 0:
            tl.store(save[1] + tl.cast((T - 1) // 32, tl.int64) * N + offs, bits, mask=mask)
    tl.store(v_final_ptr + offs, v, mask=mask)


@triton.jit
def _bwd_tiles(grad_spikes_ptr, save, t0, T, N, offs, mask,
               SAVE: tl.constexpr, DETACH_RESET: tl.constexpr, CHUNK: tl.constexpr):
    """One chunk's tiles (a, aux) and its spike word: a = dL/ds [CHUNK, BLOCK] fp32; aux = the code pairs
    [CHUNK / 2, BLOCK] int32 (COMPACT, decoded per step by _bwd_chunk) or h [CHUNK, BLOCK] fp32 (MEMBRANE).
    save = (saved, bits)."""
    saved_ptr, bits_ptr = save
    grad_spikes = _tile(grad_spikes_ptr, t0, T, N, offs, mask, CHUNK).to(tl.float32)
    if SAVE == 1:
        pairs = _tile(saved_ptr, t0 // 2, (T + 1) // 2, N, offs, mask, CHUNK // 2)
        word_row = tl.maximum(t0, 0) // 32  # t0 < 0 only for the look-ahead past step 0, which is never used
        word = tl.load(bits_ptr + tl.cast(word_row, tl.int64) * N + offs, mask=mask, other=0)
        return grad_spikes, pairs, word
    else:
        saved = _tile(saved_ptr, t0, T, N, offs, mask, CHUNK)
        return grad_spikes, saved.to(tl.float32, bitcast=True), 0


@triton.jit
def _bwd_step(a, aux, word, t, carry, neuron, N, offs, mask, grad_x_ptr,
              SURROGATE: tl.constexpr, HARD: tl.constexpr, DETACH_RESET: tl.constexpr, SAVE: tl.constexpr,
              GRAD_DECAY: tl.constexpr, GRAD_THRESHOLD: tl.constexpr):
    """One reverse step (a, aux: rows of _bwd_tiles); writes dL/dx_t. carry = (gv, g_h_next, g_decay,
    g_threshold), [BLOCK] fp32 each: gv = dL/dv_t in, dL/dv_{t-1} out; returns the four updated."""
    gv, g_h_next, g_decay, g_threshold = carry
    beta, theta, alpha, v_reset = neuron
    if SAVE == 1:
        fire = ((word >> (t % 32)) & 1) != 0
        g_u = a  # dL/du_t, u_t = h_t - theta
        if not DETACH_RESET:
            # soft reset through the spike: dv_t/ds_t = -theta (COMPACT is never chosen for the hard one)
            g_u -= gv * theta * aux
    else:
        h = aux
        fire = h >= theta
        sg = surrogate_grad(h - theta, alpha, SURROGATE)
        if GRAD_DECAY:
            g_decay += g_h_next * _reset(h, fire, theta, v_reset, HARD)  # dL/dh_{t+1} * v_t
        grad_s = a
        if not DETACH_RESET:
            # the reset also depends on s_t: dv_t/ds_t = v_reset - h_t (hard) or -theta (soft)
            if HARD:
                grad_s += gv * (v_reset - h)
            else:
                grad_s -= gv * theta
        g_u = grad_s * sg
    if HARD:
        g_h = g_u + tl.where(fire, 0.0, gv)
    else:
        g_h = g_u + gv
    if GRAD_THRESHOLD:
        g_threshold -= g_u
        if not HARD:
            g_threshold -= tl.where(fire, gv, 0.0)  # v_t = h_t - theta s_t
    tl.store(grad_x_ptr + tl.cast(t, tl.int64) * N + offs, g_h.to(grad_x_ptr.dtype.element_ty), mask=mask)
    return beta * g_h, g_h, g_decay, g_threshold


@triton.jit
def _bwd_chunk(tiles, t0, T, N, offs, mask, carry, neuron, sg_peak, grad_x_ptr,
               SURROGATE: tl.constexpr, HARD: tl.constexpr, DETACH_RESET: tl.constexpr, SAVE: tl.constexpr,
               GRAD_DECAY: tl.constexpr, GRAD_THRESHOLD: tl.constexpr, CHUNK: tl.constexpr,
               FULL: tl.constexpr):
    """Steps t0+CHUNK-1 down to t0 (FULL), or only those below T (the last, partial chunk); tiles = (a_tile,
    aux_tile, word) from _bwd_tiles, carry as _bwd_step's; returns (gv, g_h_next, g_decay, g_threshold) updated.
    COMPACT: a = dL/ds * sg' (all a detached reset needs), aux = sg' (soft reset through the spike)."""
    a_tile, aux_tile, word = tiles
    # separate names across the runtime `if` below (a tuple is only built for each call)
    gv, g_h_next, g_decay, g_threshold = carry
    for j in tl.static_range(CHUNK):
        k = CHUNK - 1 - j
        a = _row(a_tile, k, CHUNK)
        aux = aux_tile
        if SAVE == 1:
            code = ((_row(aux_tile, k // 2, CHUNK // 2) >> (16 * (k % 2))) & 0xFFFF).to(tl.float32)
            aux = code * code * (sg_peak / (65535.0 * 65535.0))  # code = sqrt(sg' / peak) * 65535
            a = a * aux
        else:
            aux = _row(aux_tile, k, CHUNK)
        if FULL:
            gv, g_h_next, g_decay, g_threshold = _bwd_step(
                a, aux, word, t0 + k, (gv, g_h_next, g_decay, g_threshold), neuron, N, offs, mask, grad_x_ptr,
                SURROGATE, HARD, DETACH_RESET, SAVE, GRAD_DECAY, GRAD_THRESHOLD)
        else:
            if t0 + k < T:
                gv, g_h_next, g_decay, g_threshold = _bwd_step(
                    a, aux, word, t0 + k, (gv, g_h_next, g_decay, g_threshold), neuron, N, offs, mask,
                    grad_x_ptr, SURROGATE, HARD, DETACH_RESET, SAVE, GRAD_DECAY, GRAD_THRESHOLD)
    return gv, g_h_next, g_decay, g_threshold


@triton.jit
def lif_bwd_kernel(grad_spikes_ptr, grad_v_final_ptr, save, v_init_ptr, decay, threshold, grads,
                   T, N, alpha, v_reset, sg_peak,
                   SURROGATE: tl.constexpr, HARD: tl.constexpr, DETACH_RESET: tl.constexpr, SAVE: tl.constexpr,
                   BLOCK: tl.constexpr, CHUNK: tl.constexpr, WARPS: tl.constexpr):
    """Reverse time: grads = (dL/dx [T, N], dL/dv_init [N], per-neuron dL/ddecay and dL/dthreshold [N] (summed
    over t)), each but dL/dx None unless asked for. grad_v_final: [N] fp32, or None (zeros); v_init (read for
    dL/ddecay): likewise. save = (saved, bits) and decay / threshold = (ptr or None, value, C) as the
    forward's."""
    grad_x_ptr, grad_v_init_ptr, grad_decay_ptr, grad_threshold_ptr = grads
    offs = _neurons(BLOCK, WARPS)
    mask = offs < N
    neuron = (_param(decay, offs, mask), _param(threshold, offs, mask), alpha, v_reset)
    gv = _vector(grad_v_final_ptr, offs, mask, BLOCK)
    g_h_next = tl.zeros([BLOCK], dtype=tl.float32)
    g_decay = tl.zeros([BLOCK], dtype=tl.float32)
    g_threshold = tl.zeros([BLOCK], dtype=tl.float32)
    n_full = T // CHUNK * CHUNK
    t_top = n_full - CHUNK
    if n_full < T:
        t_top = n_full
    # the loops carry the tiles and gradients as separate names (tuples are only built for each call)
    a_tile, aux_tile, word = _bwd_tiles(grad_spikes_ptr, save, t_top, T, N, offs, mask, SAVE, DETACH_RESET, CHUNK)
    if n_full < T:
        ahead_a, ahead_aux, ahead_word = _bwd_tiles(grad_spikes_ptr, save, n_full - CHUNK, T, N, offs, mask,
                                                    SAVE, DETACH_RESET, CHUNK)
        gv, g_h_next, g_decay, g_threshold = _bwd_chunk(
            (a_tile, aux_tile, word), n_full, T, N, offs, mask, (gv, g_h_next, g_decay, g_threshold), neuron,
            sg_peak, grad_x_ptr, SURROGATE, HARD, DETACH_RESET, SAVE, grad_decay_ptr is not None,
            grad_threshold_ptr is not None, CHUNK, False)
        a_tile, aux_tile, word = ahead_a, ahead_aux, ahead_word
    for i in range(0, n_full // CHUNK):
        t0 = n_full - CHUNK - i * CHUNK
        ahead_a, ahead_aux, ahead_word = _bwd_tiles(grad_spikes_ptr, save, t0 - CHUNK, T, N, offs, mask,
                                                    SAVE, DETACH_RESET, CHUNK)
        gv, g_h_next, g_decay, g_threshold = _bwd_chunk(
            (a_tile, aux_tile, word), t0, T, N, offs, mask, (gv, g_h_next, g_decay, g_threshold), neuron,
            sg_peak, grad_x_ptr, SURROGATE, HARD, DETACH_RESET, SAVE, grad_decay_ptr is not None,
            grad_threshold_ptr is not None, CHUNK, True)
        a_tile, aux_tile, word = ahead_a, ahead_aux, ahead_word
    if grad_v_init_ptr is not None:
        tl.store(grad_v_init_ptr + offs, gv, mask=mask)
    if grad_decay_ptr is not None:
        g_decay += g_h_next * _vector(v_init_ptr, offs, mask, BLOCK)  # dL/dh_0 * v_init
        tl.store(grad_decay_ptr + offs, g_decay, mask=mask)
    if grad_threshold_ptr is not None:
        tl.store(grad_threshold_ptr + offs, g_threshold, mask=mask)


# (min N, BLOCK, CHUNK, WARPS) per (kernel, bytes per element of x), first match wins. BLOCK = 32 x WARPS x
# neurons per thread: small enough that several programs share an SM; CHUNK (even, dividing 32) rows in flight per
# tile, bounded by registers. The values live in launch_lif.json, shipped with the package, which the sweep of
# `python -m benchmarks.bench_lif --write-table` writes (results: benchmarks/results/lif.md; why these shapes:
# docs/lif_kernels.md).
LAUNCH_FILE = "launch_lif.json"


def read_launch_file(path=None) -> dict:
    """The shipped launch file launch_lif.json (or path) as parsed JSON: the LIF kernels' rows under "forward" /
    "backward" and the fused LayerNorm -> LIF kernels' under "norm_lif" (read by tether.kernels.norm_lif)."""
    source = resources.files(__package__).joinpath(LAUNCH_FILE) if path is None else Path(path)
    return json.loads(source.read_text())


def read_launch_table(path=None) -> dict:
    """The LIF launch table in launch_lif.json (or path): {(kernel, element bytes): [(min N, BLOCK, CHUNK, WARPS)]}."""
    data = read_launch_file(path)
    return {(kernel, int(size)): [tuple(row) for row in rows]
            for kernel in ("forward", "backward") for size, rows in data[kernel].items()}


LAUNCH = read_launch_table()


def launch_config(kernel: str, N: int, element_size: int):
    """(BLOCK, CHUNK, WARPS) for kernel "forward" or "backward" on N neurons of element_size-byte x."""
    for min_n, block, chunk, warps in LAUNCH[kernel, 4 if element_size == 4 else 2]:
        if N >= min_n:
            return block, chunk, warps


def _param_args(p):
    """The kernels' (pointer or None, float value, channel count) for a decay / threshold given as float or
    [C] fp32."""
    if isinstance(p, float):
        return None, p, 1
    return p, 0.0, p.numel()


def saved_buffers(T: int, N: int, save: int, like):
    """Empty (saved, bits) tensors, on like's device, that the forward fills for backward (also the fake
    impl's shapes); None where the save has no such part."""
    if save == SAVE_COMPACT:
        saved = like.new_empty((T + 1) // 2, N, dtype=torch.int32)  # [T/2, N] 2 sg' codes a word
        bits = like.new_empty(cdiv(T, 32), N, dtype=torch.int32)  # [T/32, N] 32 steps a word
        return saved, bits
    if save == SAVE_MEMBRANE:
        return like.new_empty(T, N, dtype=torch.int32), None  # [T, N] fp32 h_t, bit for bit
    return None, None


_forward_kernel, _backward_kernel = Launcher(lif_fwd_kernel), Launcher(lif_bwd_kernel)


def lif_forward(x, v_init, decay, threshold, *, surrogate: int, alpha: float, hard: bool, v_reset: float,
                save: int, inv_sg_peak: float):
    """x [T, *rest] contiguous (fp32/bf16/fp16; N = prod(rest) neurons), v_init [*rest] fp32 or None (zeros)
    -> spikes [T, *rest], v_final [*rest], saved, bits (see saved_buffers). Outputs keep x's shape: no views
    for autograd."""
    T, N = x.shape[0], math.prod(x.shape[1:])
    spikes = torch.empty_like(x)  # [T, *rest]
    v_final = x.new_empty(x.shape[1:], dtype=torch.float32)  # [*rest]
    saved, bits = saved_buffers(T, N, save, x)
    if T == 0 or N == 0:  # nothing to launch (an empty grid or no step): v_final = v_init
        return spikes, v_final.zero_() if v_init is None else v_final.copy_(v_init), saved, bits
    block, chunk, warps = launch_config("forward", N, x.element_size())
    _forward_kernel[(cdiv(N, block),)](
        x, (v_init, v_final), _param_args(decay), _param_args(threshold), spikes, (saved, bits),
        T, N, alpha, v_reset, inv_sg_peak,
        SURROGATE=surrogate, HARD=hard, SAVE=save, BLOCK=block, CHUNK=chunk, WARPS=warps, num_warps=warps,
        enable_fp_fusion=False)  # h = beta * v + x rounded as PyTorch does: spikes equal the reference's
    return spikes, v_final, saved, bits


def lif_backward(grad_spikes, grad_v_final, saved, bits, v_init, decay, threshold, *, surrogate: int, alpha: float,
                 hard: bool, v_reset: float, detach_reset: bool, save: int, sg_peak: float,
                 grad_v_init: bool, grad_decay: bool, grad_threshold: bool):
    """grad_spikes [T, *rest] contiguous, grad_v_final [*rest] fp32 or None (zeros), v_init [*rest] fp32 or
    None (zeros; read only for grad_decay) -> grad_x [T, *rest] (grad_spikes' dtype), and, each None unless
    asked for: grad_v_init [*rest], per-neuron grad_decay [N] and grad_threshold [N]."""
    T, N = grad_spikes.shape[0], math.prod(grad_spikes.shape[1:])
    grad_x = torch.empty_like(grad_spikes)  # [T, *rest]
    f32 = torch.float32
    g_v_init = grad_spikes.new_empty(grad_spikes.shape[1:], dtype=f32) if grad_v_init else None  # [*rest]
    g_decay = grad_spikes.new_empty(N, dtype=f32) if grad_decay else None  # [N]
    g_threshold = grad_spikes.new_empty(N, dtype=f32) if grad_threshold else None  # [N]
    if T == 0 or N == 0:  # nothing to launch (the kernel would read bits that were never written)
        if g_v_init is not None:  # no step: v_final = v_init
            g_v_init.zero_() if grad_v_final is None else g_v_init.copy_(grad_v_final)
        for g in (g_decay, g_threshold):
            if g is not None:
                g.zero_()
        return grad_x, g_v_init, g_decay, g_threshold
    block, chunk, warps = launch_config("backward", N, grad_spikes.element_size())
    _backward_kernel[(cdiv(N, block),)](
        grad_spikes, grad_v_final, (saved, bits), v_init, _param_args(decay), _param_args(threshold),
        (grad_x, g_v_init, g_decay, g_threshold), T, N, alpha, v_reset, sg_peak,
        SURROGATE=surrogate, HARD=hard, DETACH_RESET=detach_reset, SAVE=save, BLOCK=block, CHUNK=chunk,
        WARPS=warps, num_warps=warps)
    return grad_x, g_v_init, g_decay, g_threshold
