"""Triton kernels for the TTT-MLP scan (math: docs/spec/ttt_mlp.md; derivation: docs/ttt_mlp.md).

Layout: activations `[B, NH, NC, CS, F]` and learning rates `[B, NH, NC, CS, 1]` contiguous; per (batch, head)
the inner state `W1 [F, K]`, `b1 [K]`, `W2 [K, F]`, `b2 [F]` in fp32. Grid: P programs per (batch, head)
(pid = bh * P + p), together scanning the NC mini-batches in order (forward) or, group by group, in reverse
(backward); program p owns the K blocks p, p + P, ... The sums over K are exchanged among the P programs
through global memory (_xput, _xsync, _xsum): a head's matmul chain is latency bound, and P programs on P
SMs shorten it. P = 1 under the interpreter, which runs programs one after another. The backward is one
launch per checkpoint group, in reverse; _ttt_remat_kernel first rebuilds the group's start states from its
checkpoint, and on the GPU the next group's rebuild runs on a side stream beside this group's backward.

The state (and in the backward the carried gradient of the state) stays in global memory, where it is L2
resident, and every pass streams it in blocks of BK columns of K. One code path thus covers head dims up to
128 (K = 512: W1 + W2 = 512 KB fp32, far beyond a program's registers). Matmul operands are cast to the
input dtype (tensor cores; fp32 inputs use IEEE fp32, or TF32 when torch allows it), accumulation, the
state, LayerNorm statistics and all elementwise math are fp32.

A mini-batch needs two passes over K: the reconstruction Z2 = gelu(XK W1 + b1) W2 + b2 is a sum over all
of K, and its LayerNorm gradient gZ2 is needed before any block can be updated. The forward fuses the first
pass of mini-batch n+1 into the update pass of mini-batch n (each updated block is used at once), so the
state is streamed once per mini-batch. Causal outputs use the dual form, Zq1 = XQ W1 + b1 - A1 gZ1 with
A1 = eta * (XQ XK^T + 1) (the backward uses it for both modes); non-causal ones read the updated blocks.

Head dims that are a multiple of 16 but not a power of two (48, 80, 96, 112) run zero-padded to the next power
of two (docs/ttt_padding.md): the launchers pad the features of the tokens, LN parameters and state and crop the
results; the kernels tile with F (padded) and take the LayerNorm statistics over F_REAL (_real_features, which
compiles out when F_REAL == F). K = 4 F_REAL is not padded: a multiple of 64, the default K block.
"""
import ctypes
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import cdiv
from .._backend import interpreting
from .._checks import check_buffer, check_group_size, check_tensor, check_ttt_grads, check_ttt_inputs

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# compiled (not interpreted) kernels: triton.jit made the same choice when this module was imported
_HW_TANH = tl.constexpr(not interpreting())


@triton.jit
def _tanh(x, DT: tl.constexpr):
    """tanh of fp32 x. With 16-bit matmul operands (rounding error ~4e-3) the GPU's tanh.approx.f32 (one MUFU
    instruction, relative error ~5e-4): the exp / reciprocal form and the GELU around it were most of the
    backward's instructions (profile: docs/ttt_mlp.md). fp32 and the interpreter: through
    exp(-2|x|) <= 1 (never overflows)."""
    if _HW_TANH and DT != tl.float32:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        t = tl.exp(-2.0 * tl.abs(x))
        r = (1.0 - t) / (1.0 + t)
        return tl.where(x >= 0, r, -r)


@triton.jit
def _gelu(z, DT: tl.constexpr):
    return 0.5 * z * (1.0 + _tanh(0.79788456 * (z + 0.044715 * z * z * z), DT))


@triton.jit
def _gelu_grads(z, DT: tl.constexpr):
    """gelu_tanh(z) and its first and second derivatives (unused ones are dropped by the compiler); DT: the
    matmul operand dtype (see _tanh)."""
    t = _tanh(0.79788456 * (z + 0.044715 * z * z * z), DT)
    du = 0.79788456 * (1.0 + 3.0 * 0.044715 * z * z)  # d(tanh argument)/dz
    sech2 = 1.0 - t * t
    g1 = 0.5 * (1.0 + t) + 0.5 * z * sech2 * du
    g2 = sech2 * (du - z * t * du * du + 0.5 * z * (0.79788456 * 6.0 * 0.044715 * z))
    return 0.5 * z * (1.0 + t), g1, g2


@triton.jit
def _dot(a, b, DT: tl.constexpr, PREC: tl.constexpr, acc=None):
    return tl.dot(a.to(DT), b.to(DT), acc=acc, input_precision=PREC)


@triton.jit
def _real_features(x, F: tl.constexpr, F_REAL: tl.constexpr):
    """x [CS, F] with the padded feature columns F_REAL..F-1 zeroed (see the launchers: F is the head dim
    padded to a power of two); compiled out when F_REAL == F."""
    if F_REAL != F:
        x = tl.where((tl.arange(0, F) < F_REAL)[None, :], x, 0.0)
    return x


@triton.jit
def _ln_stats(z, F: tl.constexpr, F_REAL: tl.constexpr):
    """Normalised rows xh [CS, F] and 1/sigma [CS] (biased variance, eps 1e-8) over the F_REAL real features
    (z is 0 on the padded ones, xh is made 0 there)."""
    d = _real_features(z - (tl.sum(z, 1) / F_REAL)[:, None], F, F_REAL)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / F_REAL + 1e-8)
    return d * rstd[:, None], rstd


@triton.jit
def _ln_bwd(gxh, xh, rstd, F: tl.constexpr, F_REAL: tl.constexpr):
    """Gradient w.r.t. the LayerNorm input, given the gradient gxh w.r.t. its normalised output xh (both 0 on
    the padded features; the result is made 0 there)."""
    mean_gxh = tl.sum(gxh, 1) / F_REAL
    return _real_features((gxh - mean_gxh[:, None] - xh * (tl.sum(gxh * xh, 1) / F_REAL)[:, None]) * rstd[:, None],
                          F, F_REAL)


@triton.jit
def _inner_loss_grad_bwd(u, xh, rstd, gz2, gamma, beta, target, F: tl.constexpr, F_REAL: tl.constexpr):
    """Backward of gZ2 = _ln_bwd((gamma * xh + beta - target) * gamma, xh, rstd) for an upstream u = dL/dgZ2.

    Returns dL/dZ2 [CS, F], dL/dgamma and dL/dbeta summed over rows [F], dL/dtarget [CS, F] (all 0 on the
    padded features).
    """
    go = gamma[None, :] * xh + beta[None, :] - target
    gxh = go * gamma[None, :]
    v = u * rstd[:, None]
    v_xh = tl.sum(v * xh, 1) / F_REAL
    dgxh = _real_features(v - (tl.sum(v, 1) / F_REAL)[:, None] - xh * v_xh[:, None], F, F_REAL)
    dxh = (dgxh * gamma[None, :] * gamma[None, :] - v * (tl.sum(gxh * xh, 1) / F_REAL)[:, None]
           - gxh * v_xh[:, None])
    dsigma = -tl.sum(u * gz2, 1) * rstd  # gZ2 carries an explicit 1/sigma
    dz2 = _ln_bwd(dxh, xh, rstd, F, F_REAL) + (dsigma / F_REAL)[:, None] * xh
    return dz2, tl.sum(dgxh * (go + gamma[None, :] * xh), 0), tl.sum(dgxh * gamma[None, :], 0), -dgxh * gamma[None, :]


@triton.jit
def _eta(lr_p, ts_p, CAUSAL: tl.constexpr, CS: tl.constexpr):
    """eta [CS, CS] (row i reads, column j writes; non-causal: the [1, CS] row all rows equal), its last row
    e [CS] and the rates lr [CS], fp32."""
    rows = tl.arange(0, CS)
    lr = tl.load(lr_p + rows).to(tl.float32)
    if CAUSAL:
        ts = tl.load(ts_p + rows)
        eta = tl.where(rows[None, :] <= rows[:, None], ts[:, None] * lr[None, :], 0.0)
        e = tl.load(ts_p + CS - 1) * lr
    else:
        eta = lr[None, :]  # [1, CS]: a row that broadcasts, not a [CS, CS] tile held in registers
        e = lr
    return eta, e, lr


@triton.jit
def _load_tokens(p, CS: tl.constexpr, F: tl.constexpr):
    return tl.load(p + tl.arange(0, CS)[:, None] * F + tl.arange(0, F)[None, :])


@triton.jit
def _store_tokens(p, x, CS: tl.constexpr, F: tl.constexpr, mask=None):
    tl.store(p + tl.arange(0, CS)[:, None] * F + tl.arange(0, F)[None, :], x.to(p.dtype.element_ty), mask=mask)


@triton.jit
def _load_block(w1_p, b1_p, w2_p, k0, F: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """Columns k0:k0+BK of the K dim: W1 [F, BK], b1 [BK], W2 [BK, F]."""
    f = tl.arange(0, F)
    k = k0 + tl.arange(0, BK)
    return (tl.load(w1_p + f[:, None] * K + k[None, :]), tl.load(b1_p + k),
            tl.load(w2_p + k[:, None] * F + f[None, :]))


@triton.jit
def _store_w1(w1_p, b1_p, k0, w1, b1, F: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    k = k0 + tl.arange(0, BK)
    tl.store(w1_p + tl.arange(0, F)[:, None] * K + k[None, :], w1)
    tl.store(b1_p + k, b1)


@triton.jit
def _store_w2(w2_p, k0, w2, F: tl.constexpr, BK: tl.constexpr):
    tl.store(w2_p + (k0 + tl.arange(0, BK))[:, None] * F + tl.arange(0, F)[None, :], w2)


@triton.jit
def _store_block(w1_p, b1_p, w2_p, k0, w1, b1, w2, F: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    _store_w1(w1_p, b1_p, k0, w1, b1, F, K, BK)
    _store_w2(w2_p, k0, w2, F, BK)


@triton.jit
def _copy_state(w1_s, b1_s, w2_s, w1_d, b1_d, w2_d, p,
                F: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, P: tl.constexpr):
    """Copy this program's K blocks of W1, b1, W2 (b2 is the callers': it is held in registers)."""
    for k0 in range(p * BK, K, P * BK):
        w1, b1, w2 = _load_block(w1_s, b1_s, w2_s, k0, F, K, BK)
        _store_block(w1_d, b1_d, w2_d, k0, w1, b1, w2, F, K, BK)


# the regions of a program's exchange slot, in order: three [CS, F] tiles, a [CS, CS] tile, a [CS] vector
_XT0, _XT1, _XT2, _XSQ, _XVEC, _XEND = (tl.constexpr(i) for i in range(6))


@triton.jit
def _xoff(R: tl.constexpr, CS: tl.constexpr, F: tl.constexpr):
    """Element offset of region R (_XT0.._XVEC) of an exchange slot; R = _XEND: the slot's size (_xslot_size)."""
    off = R * CS * F
    if R > 3:
        off = 3 * CS * F + CS * CS + (R - 4) * CS
    return off


def _xslot_size(CS: int, F: int) -> int:
    """The launcher's side of _xoff(_XEND, CS, F)."""
    return 3 * CS * F + CS * CS + CS


# The backward's scratch. `work` per head: [CS, K] fp32 tiles, columns by owner, in this order: Z1, gelu'(Z1),
# gZ1, gelu'(Zq1), dL/dZq1, dL/dG1, the early part of dL/dZ1; the tile of region R starts at R * CS * K.
_W_Z1, _W_GP, _W_GZ1, _W_GQP, _W_DZQ1, _W_DG1, _W_DZ1, _W_END = (tl.constexpr(i) for i in range(8))
# `small` per program, in order: xh, gZ2, target [CS, F], dL/deta [CS, CS], the program's b2 gradient [F] (kept
# from launch to launch), dXK's parked partial [CS, F]
_S_XH, _S_GZ2, _S_TARGET, _S_DETA, _S_DB2, _S_DXK, _S_END = (tl.constexpr(i) for i in range(7))
# `acts` per head: [CS, K] tiles in the input dtype (matmul operands only), in order: gelu(Z1), gelu(Zq1)
_A_X2, _A_XQ2, _A_END = (tl.constexpr(i) for i in range(3))


@triton.jit
def _soff(R: tl.constexpr, CS: tl.constexpr, F: tl.constexpr):
    """Element offset of region R (_S_XH.._S_DXK) of a program's `small` scratch; R = _S_END: its size
    (_small_size)."""
    off = R * CS * F
    if R > 3:
        off = 3 * CS * F + CS * CS + (R - 4) * F
    if R > 4:
        off = 3 * CS * F + CS * CS + F + (R - 5) * CS * F
    return off


def _small_size(CS: int, F: int) -> int:
    """The launcher's side of _soff(_S_END, CS, F)."""
    return 4 * CS * F + CS * CS + F


@triton.jit
def _xslot(xb, ex, q, P: tl.constexpr, CS: tl.constexpr, F: tl.constexpr):
    """Program q's partials of exchange ex in the head's buffer xb [2, P, XSZ]: two slots alternating by
    exchange parity (a slot is rewritten two exchanges later, when every program has read it: each has
    arrived at the exchange in between, after its reads). Regions of a slot: _xoff."""
    return xb + ((ex % 2) * P + q) * _xoff(_XEND, CS, F)


@triton.jit
def _xput(xb, ex, p, offs, x, P: tl.constexpr, CS: tl.constexpr, F: tl.constexpr):
    """Store this program's partial x at the element offsets offs (of x's shape) of its slot."""
    tl.store(_xslot(xb, ex, p, P, CS, F) + offs, x)


@triton.jit
def _xsync(cnt, ex, P: tl.constexpr):
    """Exchange ex among the P programs of a head: arrive (release: this program's partials are visible at
    gpu scope), then wait until all P have arrived (the counter counts the arrivals of every exchange)."""
    tl.debug_barrier()  # every thread's stores happen before the arrive (P = 1: before the loads)
    if P > 1:  # compiled out for one program: nobody to wait for
        tl.atomic_add(cnt, 1, sem="release", scope="gpu")
        while tl.atomic_add(cnt, 0, sem="acquire", scope="gpu") < P * (ex + 1):
            pass
        tl.debug_barrier()


@triton.jit
def _xsum(xb, ex, offs, P: tl.constexpr, CS: tl.constexpr, F: tl.constexpr):
    """The sum of the P partials at offs, in the order p = 0..P-1 in every program: all P hold bit-identical
    totals, so the values they compute from them redundantly agree. .cg: read from L2, not from an SM's
    L1 (not coherent with the other SMs' stores)."""
    acc = tl.load(_xslot(xb, ex, 0, P, CS, F) + offs, cache_modifier=".cg")
    for q in tl.static_range(1, P):
        acc += tl.load(_xslot(xb, ex, q, P, CS, F) + offs, cache_modifier=".cg")
    return acc


@triton.jit
def _kblock(p, k0, CS: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """Pointers to columns k0:k0+BK of a [CS, K] scratch tile."""
    return p + tl.arange(0, CS)[:, None] * K + (k0 + tl.arange(0, BK))[None, :]


@triton.jit
def _z2_pass(xk, w1_p, b1_p, w2_p, z1_p, xb, cnt, ex, p, DT: tl.constexpr, PREC: tl.constexpr,
             CS: tl.constexpr, F: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, P: tl.constexpr):
    """First pass over K: gelu(XK W1 + b1) W2 (Z2 without b2), summed over the P programs' blocks (one
    exchange; returns the next exchange's index). Z1 is kept in the scratch z1_p [CS, K] (L1/L2) for the
    later passes: a load instead of a matmul."""
    z2 = tl.zeros([CS, F], tl.float32)
    for k0 in range(p * BK, K, P * BK):
        w1, b1, w2 = _load_block(w1_p, b1_p, w2_p, k0, F, K, BK)
        z1 = _dot(xk, w1, DT, PREC) + b1[None, :]
        tl.store(_kblock(z1_p, k0, CS, K, BK), z1)
        z2 = _dot(_gelu(z1, DT), w2, DT, PREC, z2)
    tile = _tile_offs(CS, F)
    _xput(xb, ex, p, tile, z2, P, CS, F)
    _xsync(cnt, ex, P)
    return _xsum(xb, ex, tile, P, CS, F), ex + 1


@triton.jit
def _inner_loss_grad(z2, xk, xv, gamma, beta, F: tl.constexpr, F_REAL: tl.constexpr):
    """gZ2 = d loss / d Z2 (closed form of the spec) and the LN values xh, 1/sigma, target."""
    xh, rstd = _ln_stats(z2, F, F_REAL)
    target = xv.to(tl.float32) - xk.to(tl.float32)
    gz2 = _ln_bwd((gamma[None, :] * xh + beta[None, :] - target) * gamma[None, :], xh, rstd, F, F_REAL)
    return gz2, xh, rstd, target


@triton.jit
def _forward_update_pass(x, eta, e, gz2, egz2, src, dst, z1, ckpt, p, WITH_OUTPUT: tl.constexpr,
                         CAUSAL: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, CS: tl.constexpr,
                         F: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, P: tl.constexpr):
    """The update pass over K of a mini-batch (x = (xq, xk, xk_next) tokens; gZ2 and e gZ2 in the input
    dtype): gZ1 = (gZ2 W2^T) gelu'(Z1), each block of the state src = (w1, b1, w2) updated into dst (may
    alias src), copied to the checkpoint ckpt = (w1_c, b1_c, w2_c, b2_c, save) when save, and used at once:
    for the outputs (causal: the dual form's Xq2 W2 and Xq2 X2^T; non-causal: the updated block) and, when
    z1 = (z1_p, xk_next_p, z1_next_p, has_next) has a next mini-batch, for its first pass (its Z1 to
    z1_next_p). Returns this program's partials of Zq2, A2raw (causal outputs only) and the next Z2."""
    xq, xk, xk_next = x
    w1_s, b1_s, w2_s = src
    w1_d, b1_d, w2_d = dst
    z1_p, _z1_unused, z1_next_p, has_next = z1
    w1_c, b1_c, w2_c, _ckpt_unused, save_ckpt = ckpt
    a2raw = tl.zeros([CS, CS], tl.float32)  # Xq2 X2^T, summed over K blocks (causal outputs only)
    if WITH_OUTPUT and CAUSAL:
        a1 = (eta * (_dot(xq, tl.trans(xk), DT, PREC) + 1.0)).to(DT)  # [CS, CS]
    zq2 = tl.zeros([CS, F], tl.float32)
    z2_next = tl.zeros([CS, F], tl.float32)
    for k0 in range(p * BK, K, P * BK):
        w1, b1, w2 = _load_block(w1_s, b1_s, w2_s, k0, F, K, BK)
        x2, gp, _ = _gelu_grads(tl.load(_kblock(z1_p, k0, CS, K, BK)), DT)
        gz1 = _dot(gz2, tl.trans(w2), DT, PREC) * gp
        if WITH_OUTPUT and CAUSAL:
            xq2 = _gelu(_dot(a1, -gz1, DT, PREC, _dot(xq, w1, DT, PREC) + b1[None, :]), DT)
            zq2 = _dot(xq2, w2, DT, PREC, zq2)
            a2raw = _dot(xq2, tl.trans(x2), DT, PREC, a2raw)
        egz1 = e[:, None] * gz1
        tl.debug_barrier()  # every thread has read the block before it is overwritten in place
        w1, b1, w2 = _load_block(w1_s, b1_s, w2_s, k0, F, K, BK)  # fp32 again: not held through the block
        w1 = _dot(tl.trans(xk), -egz1, DT, PREC, w1)
        b1 -= tl.sum(egz1, 0)
        w2 = _dot(tl.trans(x2), -egz2, DT, PREC, w2)
        _store_block(w1_d, b1_d, w2_d, k0, w1, b1, w2, F, K, BK)
        if save_ckpt:
            _store_block(w1_c, b1_c, w2_c, k0, w1, b1, w2, F, K, BK)
        if WITH_OUTPUT and not CAUSAL:
            zq2 = _dot(_gelu(_dot(xq, w1, DT, PREC) + b1[None, :], DT), w2, DT, PREC, zq2)
        if has_next:
            z1_next = _dot(xk_next, w1, DT, PREC) + b1[None, :]
            tl.store(_kblock(z1_next_p, k0, CS, K, BK), z1_next)
            z2_next = _dot(_gelu(z1_next, DT), w2, DT, PREC, z2_next)
    return zq2, a2raw, z2_next


@triton.jit
def _forward_exchange(z2_next, zq2, a2raw, xch, ex, p, WITH_OUTPUT: tl.constexpr, CAUSAL: tl.constexpr,
                      CS: tl.constexpr, F: tl.constexpr, P: tl.constexpr):
    """The forward step's exchange between the P programs of a head: the sums over K of the next Z2 and, with
    the outputs, of Zq2 and (causal) A2raw."""
    xb, cnt = xch
    tile = _tile_offs(CS, F)
    _xput(xb, ex, p, tile, z2_next, P, CS, F)
    if WITH_OUTPUT:
        _xput(xb, ex, p, _xoff(_XT1, CS, F) + tile, zq2, P, CS, F)
        if CAUSAL:
            _xput(xb, ex, p, _xoff(_XSQ, CS, F) + _tile_offs(CS, CS), a2raw, P, CS, F)
    _xsync(cnt, ex, P)
    z2_next = _xsum(xb, ex, tile, P, CS, F)
    if WITH_OUTPUT:
        zq2 = _xsum(xb, ex, _xoff(_XT1, CS, F) + tile, P, CS, F)
        if CAUSAL:
            a2raw = _xsum(xb, ex, _xoff(_XSQ, CS, F) + _tile_offs(CS, CS), P, CS, F)
    return z2_next, zq2, a2raw


@triton.jit
def _forward_outputs(xq, zq2, a2raw, gz2, b2, b2_next, ln, rates, out_p, p, CAUSAL: tl.constexpr,
                     DT: tl.constexpr, PREC: tl.constexpr, CS: tl.constexpr, F: tl.constexpr, F_REAL: tl.constexpr):
    """The outputs out = XQ + LN(Zq2) (program 0 stores them) from the summed Zq2: causal in the dual form,
    Zq2 + b2 - (eta * (A2raw + 1)) gZ2; non-causal Zq2 + b2' (the updated state's)."""
    gamma, beta = ln
    if CAUSAL:
        eta, e, lr = _eta(rates[0], rates[1], CAUSAL, CS)
        zq2 = _dot(eta * (a2raw + 1.0), -gz2, DT, PREC, zq2 + b2[None, :])
    else:
        zq2 += b2_next[None, :]
    xhq, _ = _ln_stats(zq2, F, F_REAL)
    if p == 0:
        _store_tokens(out_p, xq.to(tl.float32) + gamma[None, :] * xhq + beta[None, :], CS, F)


@triton.jit
def _forward_step(tok, rates, ln, carry, src, dst, z1, ckpt, xch, p, WITH_OUTPUT: tl.constexpr,
                  CAUSAL: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, CS: tl.constexpr, F: tl.constexpr,
                  F_REAL: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, P: tl.constexpr):
    """One mini-batch: state (src = (w1, b1, w2) pointers, b2) -> next state (dst, may alias src; returned
    b2), optionally the outputs. tok = (xq, xk, xv, out) pointers of its tokens, rates = (lr, ts), ln =
    (gamma, beta) [F] values, carry = (z2, b2, ex): z2 (full) from the first pass over K of this mini-batch,
    whose Z1 tiles are in z1[0] [CS, K], and the next exchange's index. Each block of the next state is used at
    once for the next mini-batch's first pass when it has one (z1 = (z1_p, xk_next_p, z1_next_p, has_next);
    returns its z2), and copied into the checkpoint ckpt = (w1_c, b1_c, w2_c, b2_c, save) when save: one pass
    over the state per mini-batch instead of two. Outputs: causal in the dual form; non-causal tokens read the
    updated state, so each updated block is used right away (Zq1 = XQ W1' + b1', Zq2 = gelu(Zq1) W2' + b2':
    two matmuls a block instead of four). The sums over K (Zq2, A2raw, the next z2) take one exchange
    (xch = (xbuf, cnt)); program 0 writes the outputs and b2. Returns the next carry."""
    xq_p, xk_p, xv_p, out_p = tok
    lr_p, ts_p = rates
    gamma, beta = ln
    z2, b2, ex = carry
    fc = tl.arange(0, F)
    xq = _load_tokens(xq_p, CS, F)  # [CS, F] input dtype
    xk = _load_tokens(xk_p, CS, F)
    xk_next = _load_tokens(z1[1], CS, F)
    eta, e, lr = _eta(lr_p, ts_p, CAUSAL, CS)
    gz2, xh, rstd, target = _inner_loss_grad(z2 + b2[None, :], xk, _load_tokens(xv_p, CS, F), gamma, beta, F,
                                             F_REAL)
    b2_next = b2 - tl.sum(e[:, None] * gz2, 0)
    # matmul operands live through the K loop in the input dtype: half the registers of fp32
    egz2 = (e[:, None] * gz2).to(DT)
    gz2 = gz2.to(DT)
    zq2, a2raw, z2_next = _forward_update_pass(
        x=(xq, xk, xk_next), eta=eta, e=e, gz2=gz2, egz2=egz2, src=src, dst=dst, z1=z1, ckpt=ckpt, p=p,
        WITH_OUTPUT=WITH_OUTPUT, CAUSAL=CAUSAL, DT=DT, PREC=PREC, CS=CS, F=F, K=K, BK=BK, P=P)
    if ckpt[4] & (p == 0):
        tl.store(ckpt[3] + fc, b2_next)
    z2_next, zq2, a2raw = _forward_exchange(z2_next, zq2, a2raw, xch, ex, p, WITH_OUTPUT, CAUSAL, CS, F, P)
    if WITH_OUTPUT:
        _forward_outputs(xq, zq2, a2raw, gz2, b2, b2_next, ln, rates, out_p, p, CAUSAL, DT, PREC, CS, F, F_REAL)
    return z2_next, b2_next, ex + 1


@triton.jit
def _program(NH, NC, G, P: tl.constexpr):
    """This program's K share p, its (batch, head) row bh (int64, for offsets) and head h, and the number
    of checkpoints NK = ceil(NC / G). Programs pid = bh * P + p: a head's P programs are launched together."""
    pid = tl.program_id(0)
    bh = (pid // P).to(tl.int64)
    return pid % P, bh, bh % NH, tl.cdiv(NC, G)


@triton.jit
def _ttt_fwd_kernel(tokens, rates, ln, state, ckpt, out, work, xch, dims, CAUSAL: tl.constexpr,
                    PREC: tl.constexpr, CS: tl.constexpr, F: tl.constexpr, F_REAL: tl.constexpr, K: tl.constexpr,
                    BK: tl.constexpr, P: tl.constexpr):
    """Forward scan; program pid = bh * P + p owns the K blocks p*BK, (p+P)*BK, ... of head bh.
    tokens = (xq, xk, xv), rates = (lr, ts), ln = (ln_w, ln_b), dims = (NH, NC, G).
    state = (w1, b1, w2, b2) holds the initial state on entry and the final state on exit (updated in
    place); checkpoint k (ckpt = (w1_c, b1_c, w2_c, b2_c) [B*NH, NK, ...]) is the state at the start of
    mini-batch k*G. work: [B*NH, 2, CS, K] fp32 scratch (Z1 of this and of the next mini-batch; columns by
    owner). xch = (xbuf [B*NH, 2, P, XSZ] fp32, cnt [B*NH] int32 zeros): the exchanges of the sums over K."""
    xq, xk, xv = tokens
    lr, ts = rates
    w1, b1, w2, b2 = state
    w1_c, b1_c, w2_c, b2_c = ckpt
    NH, NC, G = dims
    p, bh, h, NK = _program(NH, NC, G, P)
    fc = tl.arange(0, F)
    gamma = tl.load(ln[0] + h * F + fc)
    beta = tl.load(ln[1] + h * F + fc)
    w1 += bh * F * K
    b1 += bh * K
    w2 += bh * K * F
    b2 += bh * F
    work += bh * 2 * CS * K
    xb = xch[0] + bh * 2 * P * _xoff(_XEND, CS, F)
    cnt = xch[1] + bh
    c = bh * NK
    _copy_state(w1, b1, w2, w1_c + c * F * K, b1_c + c * K, w2_c + c * K * F, p, F, K, BK, P)
    b2v = tl.load(b2 + fc)  # [F]: every program holds b2 (its update is a full [F] value)
    if p == 0:
        tl.store(b2_c + c * F + fc, b2v)
    ex = p * 0  # index of the next exchange (a tensor: it is carried through the loops)
    z2, ex = _z2_pass(_load_tokens(xk + bh * NC * CS * F, CS, F), w1, b1, w2, work, xb, cnt, ex, p,
                      xq.dtype.element_ty, PREC, CS, F, K, BK, P)
    for n in range(NC):
        tok = (bh * NC + n) * CS * F
        has_next = n + 1 < NC
        c = bh * NK + (n + 1) // G
        tl.debug_barrier()  # the previous step's stores are visible to every thread
        z2, b2v, ex = _forward_step(
            tok=(xq + tok, xk + tok, xv + tok, out + tok), rates=(lr + (bh * NC + n) * CS, ts), ln=(gamma, beta),
            carry=(z2, b2v, ex), src=(w1, b1, w2), dst=(w1, b1, w2),
            z1=(work + (n % 2) * CS * K, xk + tok + has_next.to(tl.int64) * CS * F, work + ((n + 1) % 2) * CS * K,
                has_next),
            ckpt=(w1_c + c * F * K, b1_c + c * K, w2_c + c * K * F, b2_c + c * F, has_next & ((n + 1) % G == 0)),
            xch=(xb, cnt), p=p, WITH_OUTPUT=True, CAUSAL=CAUSAL, DT=xq.dtype.element_ty, PREC=PREC, CS=CS, F=F,
            F_REAL=F_REAL, K=K, BK=BK, P=P)
    if p == 0:
        tl.store(b2 + fc, b2v)


@triton.jit
def _first(x, p):
    """A mask of x's shape, true in program p == 0: the full-width values (token and rate gradients, sums) are
    program 0's to store. A predicate, not a branch around the stores: the branch made the compiler spill the
    tiles live across it (docs/ttt_mlp.md#register-pressure-what-the-source-edits-bought)."""
    return (tl.zeros(x.shape, tl.int32) + p) == 0


@triton.jit
def _tile_offs(R: tl.constexpr, C: tl.constexpr):
    """Element offsets of a row-major [R, C] tile."""
    return tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]


@triton.jit
def _tile_ptrs(p, R: tl.constexpr, C: tl.constexpr):
    return p + _tile_offs(R, C)


@triton.jit
def _wtile(scratch_p, R: tl.constexpr, k0, CS: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """Pointers to columns k0:k0+BK of region R of a head's [R, CS, K] scratch (work: _W_*, acts: _A_*)."""
    return _kblock(scratch_p + R * CS * K, k0, CS, K, BK)


@triton.jit
def _stile(small_p, R: tl.constexpr, CS: tl.constexpr, F: tl.constexpr):
    """Pointers to the [CS, F] tile of region R (_S_XH, _S_GZ2, _S_TARGET, _S_DXK) of a program's `small`."""
    return _tile_ptrs(small_p + _soff(R, CS, F), CS, F)


@triton.jit
def _bwd_recompute_inner_loss(xk, xv_p, state, ln, work, small, xch, ex, p, DT: tl.constexpr, PREC: tl.constexpr,
                              CS: tl.constexpr, F: tl.constexpr, F_REAL: tl.constexpr, K: tl.constexpr,
                              BK: tl.constexpr, P: tl.constexpr):
    """Recompute of the inner forward, pass 1 over K: Z1 (to work), Z2 (exchange), then the inner-loss gradient
    gZ2 and its LN values; xh, target and gZ2 are parked in `small`. Returns gZ2, 1/sigma, the next exchange."""
    w1_p, b1_p, w2_p, b2_p = state
    lnw_p, lnb_p = ln
    fc = tl.arange(0, F)
    z2, ex = _z2_pass(xk, w1_p, b1_p, w2_p, work + _W_Z1 * CS * K, xch[0], xch[1], ex, p, DT, PREC, CS, F, K, BK, P)
    gz2, xh, rstd, target = _inner_loss_grad(z2 + tl.load(b2_p + fc)[None, :], xk, _load_tokens(xv_p, CS, F),
                                             tl.load(lnw_p + fc), tl.load(lnb_p + fc), F, F_REAL)
    tl.store(_stile(small, _S_XH, CS, F), xh)
    tl.store(_stile(small, _S_TARGET, CS, F), target)
    tl.store(_stile(small, _S_GZ2, CS, F), gz2)
    return gz2, rstd, ex


@triton.jit
def _bwd_recompute_outputs(xq, a1, gz2, state, work, acts, xch, ex, p, DT: tl.constexpr, PREC: tl.constexpr,
                           CS: tl.constexpr, F: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, P: tl.constexpr):
    """Recompute of the outputs in the dual form, pass 2 over K (gZ2 in the input dtype): the only place GELU is
    evaluated. Stores gelu(Z1), gelu(Zq1) (acts), gelu'(Z1), G1 gelu''(Z1), gZ1, gelu'(Zq1) (work); returns
    the exchanged sums Zq2 (without b2 and the A2 gZ2 term) and A2raw = Xq2 X2^T, and the next exchange."""
    w1_p, b1_p, w2_p, _b2_unused = state
    xb, cnt = xch
    zq2 = tl.zeros([CS, F], tl.float32)
    a2raw = tl.zeros([CS, CS], tl.float32)
    for k0 in range(p * BK, K, P * BK):
        w1, b1, w2 = _load_block(w1_p, b1_p, w2_p, k0, F, K, BK)
        x2, gp, gpp = _gelu_grads(tl.load(_wtile(work, _W_Z1, k0, CS, K, BK)), DT)
        x2 = x2.to(DT)
        tl.store(_wtile(acts, _A_X2, k0, CS, K, BK), x2)
        tl.store(_wtile(work, _W_GP, k0, CS, K, BK), gp)
        g1pre = _dot(gz2, tl.trans(w2), DT, PREC)
        tl.store(_wtile(work, _W_DZ1, k0, CS, K, BK), g1pre * gpp)  # (b1) multiplies it by dL/dgZ1
        gz1 = g1pre * gp
        tl.store(_wtile(work, _W_GZ1, k0, CS, K, BK), gz1)
        zq1 = _dot(a1, -gz1, DT, PREC, _dot(xq, w1, DT, PREC) + b1[None, :])  # dual form
        xq2, gqp, _ = _gelu_grads(zq1, DT)
        xq2 = xq2.to(DT)
        tl.store(_wtile(acts, _A_XQ2, k0, CS, K, BK), xq2)
        tl.store(_wtile(work, _W_GQP, k0, CS, K, BK), gqp)
        zq2 = _dot(xq2, w2, DT, PREC, zq2)
        a2raw = _dot(xq2, tl.trans(x2), DT, PREC, a2raw)
    tile = _tile_offs(CS, F)
    _xput(xb, ex, p, _xoff(_XT1, CS, F) + tile, zq2, P, CS, F)
    _xput(xb, ex, p, _xoff(_XSQ, CS, F) + _tile_offs(CS, CS), a2raw, P, CS, F)
    _xsync(cnt, ex, P)
    zq2 = _xsum(xb, ex, _xoff(_XT1, CS, F) + tile, P, CS, F)
    a2raw = _xsum(xb, ex, _xoff(_XSQ, CS, F) + _tile_offs(CS, CS), P, CS, F)
    return zq2, a2raw, ex + 1


@triton.jit
def _bwd_output_ln(dout_p, zq2, a2, gz2, b2_p, lnw_p, dsums, p, DT: tl.constexpr, PREC: tl.constexpr,
                   CS: tl.constexpr, F: tl.constexpr, F_REAL: tl.constexpr):
    """Reverse through the output LayerNorm: Zq2 = (Zq2 sum) + b2 - A2 gZ2 normalised, out = XQ + gamma xhq +
    beta. Program 0 adds to the gamma and beta sums (dsums); returns dout (fp32) and dL/dZq2."""
    fc = tl.arange(0, F)
    dlnw_p, dlnb_p, _dsums_unused = dsums
    xhq, rstdq = _ln_stats(_dot(a2, -gz2, DT, PREC, zq2 + tl.load(b2_p + fc)[None, :]), F, F_REAL)
    dout = _load_tokens(dout_p, CS, F).to(tl.float32)
    tl.store(dlnw_p + fc, tl.load(dlnw_p + fc) + tl.sum(dout * xhq, 0), mask=_first(fc, p))
    tl.store(dlnb_p + fc, tl.load(dlnb_p + fc) + tl.sum(dout, 0), mask=_first(fc, p))
    return dout, _ln_bwd(dout * tl.load(lnw_p + fc)[None, :], xhq, rstdq, F, F_REAL)


@triton.jit
def _bwd_outputs_to_zq1(da2raw, dzq2, dxq, state, work, acts, xch, ex, p, DT: tl.constexpr, PREC: tl.constexpr,
                        CS: tl.constexpr, F: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, P: tl.constexpr):
    """Pass 3a, reverse through the outputs' inner MLP (second layer, GELU, first layer in the dual form):
    dZq1 = (dZq2 W2^T + dA2raw X2) gelu'(Zq1) (to work), the partials of dXQ (dxq: program 0's full term on
    entry) and dA1, which go to the next exchange's slot (not live through 3b)."""
    w1_p, b1_p, w2_p, _b2_unused = state
    da1 = tl.zeros([CS, CS], tl.float32)
    tl.debug_barrier()
    for k0 in range(p * BK, K, P * BK):
        w1, _, w2 = _load_block(w1_p, b1_p, w2_p, k0, F, K, BK)
        x2 = tl.load(_wtile(acts, _A_X2, k0, CS, K, BK))
        gqp = tl.load(_wtile(work, _W_GQP, k0, CS, K, BK))
        dzq1 = _dot(da2raw, x2, DT, PREC, _dot(dzq2, tl.trans(w2), DT, PREC)) * gqp
        dxq = _dot(dzq1, tl.trans(w1), DT, PREC, dxq)
        da1 = _dot(-dzq1, tl.trans(tl.load(_wtile(work, _W_GZ1, k0, CS, K, BK))), DT, PREC, da1)
        tl.store(_wtile(work, _W_DZQ1, k0, CS, K, BK), dzq1)
    _xput(xch[0], ex, p, _xoff(_XT2, CS, F) + _tile_offs(CS, F), dxq, P, CS, F)
    _xput(xch[0], ex, p, _xoff(_XSQ, CS, F) + _tile_offs(CS, CS), da1, P, CS, F)


@triton.jit
def _bwd_state_update_w1(xq, xk, e, a1, dgz2, de, state, dstate, work, small, xch, ex, p, DT: tl.constexpr,
                         PREC: tl.constexpr, CS: tl.constexpr, F: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                         P: tl.constexpr):
    """Pass 3b1, reverse through W1' = W1 - XK^T (e gZ1) and gZ1 = (gZ2 W2^T) gelu'(Z1): H1 = XK dW1' + db1',
    de, dXK's state term, dL/dgZ1 = -A1^T dZq1 - e H1, dL/dG1 (to work), dgZ2 += dG1 W2, the gelu'' part of
    dZ1 (work); the carry dW1' += XQ^T dZq1, db1' += sum dZq1 in place. dgZ2 and de (program 0's full terms
    on entry) go to the exchange slot, dXK's partial to `small` (not live through 3b2)."""
    w1_p, b1_p, w2_p, _b2_unused = state
    dw1_p, db1_p, dw2_p, _db2_unused = dstate
    dxk = tl.zeros([CS, F], tl.float32)
    tl.debug_barrier()
    for k0 in range(p * BK, K, P * BK):
        _, _, w2 = _load_block(w1_p, b1_p, w2_p, k0, F, K, BK)
        dw1, db1, _ = _load_block(dw1_p, db1_p, dw2_p, k0, F, K, BK)
        gz1 = tl.load(_wtile(work, _W_GZ1, k0, CS, K, BK))
        h1 = _dot(xk, dw1, DT, PREC) + db1[None, :]
        de -= tl.sum(h1 * gz1, 1)
        dxk = _dot(e[:, None] * gz1, tl.trans(-dw1), DT, PREC, dxk)
        dzq1 = tl.load(_wtile(work, _W_DZQ1, k0, CS, K, BK))
        dgz1 = _dot(tl.trans(a1), -dzq1, DT, PREC) - e[:, None] * h1
        dg1pre = dgz1 * tl.load(_wtile(work, _W_GP, k0, CS, K, BK))
        dgz2 = _dot(dg1pre, w2, DT, PREC, dgz2)
        tl.store(_wtile(work, _W_DG1, k0, CS, K, BK), dg1pre)
        dz1 = dgz1 * tl.load(_wtile(work, _W_DZ1, k0, CS, K, BK))  # the gelu'' part: dL/dgZ1 G1 gelu''(Z1)
        tl.debug_barrier()  # every thread has read the carried block and G1 gelu'' before they are overwritten
        tl.store(_wtile(work, _W_DZ1, k0, CS, K, BK), dz1)
        dw1, db1, _ = _load_block(dw1_p, db1_p, dw2_p, k0, F, K, BK)
        _store_w1(dw1_p, db1_p, k0, _dot(tl.trans(xq), dzq1, DT, PREC, dw1), db1 + tl.sum(dzq1, 0), F, K, BK)
    _xput(xch[0], ex, p, _xoff(_XT1, CS, F) + _tile_offs(CS, F), dgz2, P, CS, F)
    _xput(xch[0], ex, p, _xoff(_XVEC, CS, F) + tl.arange(0, CS), de, P, CS, F)
    tl.store(_stile(small, _S_DXK, CS, F), dxk)


@triton.jit
def _bwd_state_update_w2(egz2, da2raw, gz2, dzq2, dstate, work, acts, p, DT: tl.constexpr, PREC: tl.constexpr,
                         CS: tl.constexpr, F: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, P: tl.constexpr):
    """Pass 3b2, reverse through X2 (in Zq2's dual form and in W2' = W2 - X2^T (e gZ2)) and W2' (gZ2, dZq2,
    e gZ2 in the input dtype): dZ1 += (dA2raw^T Xq2 - (e gZ2) dW2'^T) gelu'(Z1) (work), the carry
    dW2' += Xq2^T dZq2 + dG1^T gZ2 in place. Returns this program's partial of H2 = X2 dW2'."""
    dw1_p, db1_p, dw2_p, _db2_unused = dstate
    h2 = tl.zeros([CS, F], tl.float32)  # X2 dW2', summed over K blocks
    tl.debug_barrier()
    for k0 in range(p * BK, K, P * BK):
        _, _, dw2 = _load_block(dw1_p, db1_p, dw2_p, k0, F, K, BK)
        x2 = tl.load(_wtile(acts, _A_X2, k0, CS, K, BK))
        xq2 = tl.load(_wtile(acts, _A_XQ2, k0, CS, K, BK))
        h2 = _dot(x2, dw2, DT, PREC, h2)
        dx2 = _dot(egz2, tl.trans(-dw2), DT, PREC, _dot(tl.trans(da2raw), xq2, DT, PREC))
        dz1 = tl.load(_wtile(work, _W_DZ1, k0, CS, K, BK)) + dx2 * tl.load(_wtile(work, _W_GP, k0, CS, K, BK))
        dg1pre = tl.load(_wtile(work, _W_DG1, k0, CS, K, BK))
        tl.debug_barrier()  # every thread has read the carried block and dz1 before they are overwritten
        tl.store(_wtile(work, _W_DZ1, k0, CS, K, BK), dz1)
        _, _, dw2 = _load_block(dw1_p, db1_p, dw2_p, k0, F, K, BK)
        _store_w2(dw2_p, k0, _dot(tl.trans(xq2), dzq2, DT, PREC, _dot(tl.trans(dg1pre), gz2, DT, PREC, dw2)),
                  F, BK)
    return h2


@triton.jit
def _bwd_exchange(h2, xch, ex, p, P: tl.constexpr, CS: tl.constexpr, F: tl.constexpr):
    """The exchange of pass 3 between the P programs of a head (h2 joins the partials 3a and 3b1 parked in the
    slot): returns the sums H2, dL/dgZ2 (without -e H2), de (without -rowsum(H2 gZ2)), dA1 and dXQ (without
    dA1raw XK)."""
    xb, cnt = xch
    tile = _tile_offs(CS, F)
    _xput(xb, ex, p, tile, h2, P, CS, F)
    _xsync(cnt, ex, P)
    h2 = _xsum(xb, ex, tile, P, CS, F)
    dgz2 = _xsum(xb, ex, _xoff(_XT1, CS, F) + tile, P, CS, F)
    de = _xsum(xb, ex, _xoff(_XVEC, CS, F) + tl.arange(0, CS), P, CS, F)
    da1 = _xsum(xb, ex, _xoff(_XSQ, CS, F) + _tile_offs(CS, CS), P, CS, F)
    dxq = _xsum(xb, ex, _xoff(_XT2, CS, F) + tile, P, CS, F)
    return h2, dgz2, de, da1, dxq


@triton.jit
def _bwd_inner_loss(h2, dgz2, de, e, rstd, small, ln, dsums, db2s_p, p, CS: tl.constexpr, F: tl.constexpr,
                    F_REAL: tl.constexpr):
    """Reverse through the inner loss gradient gZ2 (its LN values from `small`), after the H2 terms of dgZ2 and
    de: program 0 adds to the gamma and beta sums, every program to its b2 gradient copy (db2s_p). Returns
    dL/dZ2, de and dL/dtarget."""
    fc = tl.arange(0, F)
    lnw_p, lnb_p = ln
    dlnw_p, dlnb_p, _dsums_unused = dsums
    gz2 = tl.load(_stile(small, _S_GZ2, CS, F))
    de -= tl.sum(h2 * gz2, 1)
    dgz2 -= e[:, None] * h2
    dz2, dgm, dbt, dtarget = _inner_loss_grad_bwd(dgz2, tl.load(_stile(small, _S_XH, CS, F)), rstd, gz2,
                                                  tl.load(lnw_p + fc), tl.load(lnb_p + fc),
                                                  tl.load(_stile(small, _S_TARGET, CS, F)), F, F_REAL)
    tl.store(dlnw_p + fc, tl.load(dlnw_p + fc) + dgm, mask=_first(fc, p))
    tl.store(dlnb_p + fc, tl.load(dlnb_p + fc) + dbt, mask=_first(fc, p))
    tl.store(db2s_p + fc, tl.load(db2s_p + fc) + tl.sum(dz2, 0))
    return dz2, de, dtarget


@triton.jit
def _bwd_rates_and_tokens(xq, xk, eta, lr, da1, dxq, de, dtarget, ts_p, dtok, dts_p, small, p,
                          CAUSAL: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, CS: tl.constexpr,
                          F: tl.constexpr):
    """The learning-rate gradients (deta from `small` and dA1, de folded into eta's last row: dlr, and program
    0's sum of dts when causal) and the token gradients dXV, dXQ (program 0's stores). Returns dXK so far
    (this program's parked partial plus program 0's full terms dA1raw^T XQ - dtarget)."""
    rows = tl.arange(0, CS)
    first = p == 0
    dxq_p, _dxk_unused, dxv_p, dlr_p = dtok
    tile = _tile_offs(CS, F)
    deta = tl.load(_tile_ptrs(small + _soff(_S_DETA, CS, F), CS, CS)) + da1 * (_dot(xq, tl.trans(xk), DT, PREC) + 1.0)
    da1raw = da1 * eta
    dxk = tl.load(_stile(small, _S_DXK, CS, F)) + tl.where(first, _dot(tl.trans(da1raw), xq, DT, PREC) - dtarget,
                                                           0.0)  # full terms: program 0
    if CAUSAL:  # eta[i, j] = ts[i] lr[j] (j <= i), e = ts[CS-1] lr
        ts = tl.load(ts_p + rows)
        deta = tl.where(rows[None, :] <= rows[:, None], deta, 0.0)
        dlr = tl.sum(deta * ts[:, None], 0) + de * tl.load(ts_p + CS - 1)
        tl.store(dts_p + rows, tl.load(dts_p + rows) + tl.sum(deta * lr[None, :], 1)
                 + tl.where(rows == CS - 1, tl.sum(de * lr, 0), 0.0), mask=_first(rows, p))
    else:  # eta[i, j] = e[j] = lr[j]
        dlr = tl.sum(deta, 0) + de
    _store_tokens(dxv_p, dtarget, CS, F, _first(tile, p))
    _store_tokens(dxq_p, _dot(da1raw, xk, DT, PREC, dxq), CS, F, _first(tile, p))
    tl.store(dlr_p + rows, dlr.to(dlr_p.dtype.element_ty), mask=_first(rows, p))
    return dxk


@triton.jit
def _bwd_inner_mlp(dz2, xk, dxk, state, dstate, work, acts, xch, ex, dxk_p, p, DT: tl.constexpr,
                   PREC: tl.constexpr, CS: tl.constexpr, F: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                   P: tl.constexpr):
    """Pass 4, reverse through the inner MLP from dL/dZ2: its second layer (dX2 = dZ2 W2^T, dW2 += X2^T dZ2),
    the GELU (dZ1 completes the scratch's part) and its first layer (dXK += dZ1 W1^T, dW1 += XK^T dZ1,
    db1); the carry becomes the gradient of the start state. dXK is exchanged and program 0 stores it.
    Returns the next exchange."""
    w1_p, b1_p, w2_p, _b2_unused = state
    dw1_p, db1_p, dw2_p, _db2_unused = dstate
    xb, cnt = xch
    tl.debug_barrier()  # the dz1 scratch and carried blocks are visible to every thread
    dz2 = dz2.to(DT)
    for k0 in range(p * BK, K, P * BK):
        w1, b1, w2 = _load_block(w1_p, b1_p, w2_p, k0, F, K, BK)
        dz1 = (tl.load(_wtile(work, _W_DZ1, k0, CS, K, BK))
               + _dot(dz2, tl.trans(w2), DT, PREC) * tl.load(_wtile(work, _W_GP, k0, CS, K, BK)))
        dxk = _dot(dz1, tl.trans(w1), DT, PREC, dxk)
        tl.debug_barrier()
        dw1, db1, dw2 = _load_block(dw1_p, db1_p, dw2_p, k0, F, K, BK)
        _store_block(dw1_p, db1_p, dw2_p, k0, _dot(tl.trans(xk), dz1, DT, PREC, dw1), db1 + tl.sum(dz1, 0),
                     _dot(tl.trans(tl.load(_wtile(acts, _A_X2, k0, CS, K, BK))), dz2, DT, PREC, dw2), F, K, BK)
    tile = _tile_offs(CS, F)
    _xput(xb, ex, p, tile, dxk, P, CS, F)
    _xsync(cnt, ex, P)
    dxk = _xsum(xb, ex, tile, P, CS, F)
    _store_tokens(dxk_p, dxk, CS, F, _first(tile, p))
    return ex + 1


@triton.jit
def _backward_step(tok, dtok, rates, ln, dsums, state, dstate, scratch, xch, ex, p, CAUSAL: tl.constexpr,
                   DT: tl.constexpr, PREC: tl.constexpr, CS: tl.constexpr, F: tl.constexpr, F_REAL: tl.constexpr,
                   K: tl.constexpr, BK: tl.constexpr, P: tl.constexpr):
    """Reverse of one mini-batch from its start state, in stages (passes over K: docs/ttt_mlp.md). Pointers:
    tok = (xq, xk, xv, dout) its tokens, dtok = (dxq, dxk, dxv, dlr) their gradients (program 0 writes them),
    rates = (lr, ts), ln = (gamma, beta), dsums = (dgamma, dbeta, dts) running sums (program 0 adds to them),
    state = (w1, b1, w2, b2) the start state, dstate = (dw1, db1, dw2, db2s): the carried gradient of the next
    state, which each program turns in place into that of the start state in its own blocks (db2s: its own
    [F] copy of the b2 gradient), scratch = (work, acts, small) (regions _W_*, _A_*, _S_*), xch = (xbuf, cnt)
    the head's exchanges (four per mini-batch). Returns the next exchange's index. The [F] vectors (LN
    weights, b2 and the sums) are loaded where they are used, not held: in the matmul layouts each takes ~16
    registers a thread, which spilled. GELU and its derivatives are evaluated once per mini-batch, in pass 2."""
    xq_p, xk_p, xv_p, dout_p = tok
    lr_p, ts_p = rates
    work, acts, small = scratch
    db2s_p = dstate[3]
    fc = tl.arange(0, F)
    first = p == 0
    xq = _load_tokens(xq_p, CS, F)  # [CS, F] input dtype
    xk = _load_tokens(xk_p, CS, F)
    eta, e, lr = _eta(lr_p, ts_p, CAUSAL, CS)
    gz2, rstd, ex = _bwd_recompute_inner_loss(xk, xv_p, state, ln, work, small, xch, ex, p, DT, PREC, CS, F, F_REAL,
                                              K, BK, P)
    a1 = (eta * (_dot(xq, tl.trans(xk), DT, PREC) + 1.0)).to(DT)  # [CS, CS]
    gz2_dt = gz2.to(DT)
    zq2, a2raw, ex = _bwd_recompute_outputs(xq, a1, gz2_dt, state, work, acts, xch, ex, p, DT, PREC, CS, F, K, BK,
                                            P)
    eta, e, lr = _eta(lr_p, ts_p, CAUSAL, CS)  # reloaded (L1): not held through pass 2 (fewer spills)
    a2 = (eta * (a2raw + 1.0)).to(DT)
    dout, dzq2 = _bwd_output_ln(dout_p, zq2, a2, gz2_dt, state[3], ln[0], dsums, p, DT, PREC, CS, F, F_REAL)
    # the dual-form product A2 gZ2
    da2 = -_dot(dzq2, tl.trans(gz2_dt), DT, PREC)  # [CS, CS]
    tl.store(_tile_ptrs(small + _soff(_S_DETA, CS, F), CS, CS), da2 * (a2raw + 1.0))
    da2raw = (da2 * eta).to(DT)
    # the partial sums over K start with the full terms in program 0 only, so that the exchange adds them once
    de = tl.where(first, -tl.sum(gz2 * tl.load(db2s_p + fc)[None, :], 1), 0.0)  # d L / d e, e = last row of eta
    egz2 = (e[:, None] * gz2).to(DT)
    dzq2_dt = dzq2.to(DT)
    _bwd_outputs_to_zq1(da2raw=da2raw, dzq2=dzq2_dt, dxq=tl.where(first, dout, 0.0), state=state, work=work,
                        acts=acts, xch=xch, ex=ex, p=p, DT=DT, PREC=PREC, CS=CS, F=F, K=K, BK=BK, P=P)
    db2n = tl.load(db2s_p + fc)
    dgz2 = tl.where(first, -_dot(tl.trans(a2), dzq2, DT, PREC) - e[:, None] * db2n[None, :], 0.0)
    tl.store(db2s_p + fc, db2n + tl.sum(dzq2, 0))
    _bwd_state_update_w1(xq=xq, xk=xk, e=e, a1=a1, dgz2=dgz2, de=de, state=state, dstate=dstate, work=work,
                         small=small, xch=xch, ex=ex, p=p, DT=DT, PREC=PREC, CS=CS, F=F, K=K, BK=BK, P=P)
    h2 = _bwd_state_update_w2(egz2=egz2, da2raw=da2raw, gz2=gz2_dt, dzq2=dzq2_dt, dstate=dstate, work=work,
                              acts=acts, p=p, DT=DT, PREC=PREC, CS=CS, F=F, K=K, BK=BK, P=P)
    h2, dgz2, de, da1, dxq = _bwd_exchange(h2, xch, ex, p, P, CS, F)
    ex += 1
    dz2, de, dtarget = _bwd_inner_loss(h2, dgz2, de, e, rstd, small, ln, dsums, db2s_p, p, CS, F, F_REAL)
    eta, e, lr = _eta(lr_p, ts_p, CAUSAL, CS)
    xq = _load_tokens(xq_p, CS, F)  # reloaded: not held through pass 3 (fewer spills)
    xk = _load_tokens(xk_p, CS, F)
    dxk = _bwd_rates_and_tokens(xq, xk, eta, lr, da1, dxq, de, dtarget, ts_p, dtok, dsums[2], small, p, CAUSAL, DT,
                                PREC, CS, F)
    return _bwd_inner_mlp(dz2=dz2, xk=xk, dxk=dxk, state=state, dstate=dstate, work=work, acts=acts, xch=xch,
                          ex=ex, dxk_p=dtok[1], p=p, DT=DT, PREC=PREC, CS=CS, F=F, K=K, BK=BK, P=P)


@triton.jit
def _ttt_remat_kernel(tokens, rates, ln, ckpt, states, work, xch, ck, dims, CAUSAL: tl.constexpr,
                      PREC: tl.constexpr, CS: tl.constexpr, F: tl.constexpr, F_REAL: tl.constexpr, K: tl.constexpr,
                      BK: tl.constexpr, P: tl.constexpr):
    """The start states of checkpoint group ck's mini-batches, rematerialised from checkpoint ck (ckpt =
    (w1_c, b1_c, w2_c, b2_c)) into the scratch states = (w1_s, b1_s, w2_s, b2_s) [B*NH, G, ...] by the
    state-only forward step. tokens, rates, ln, dims, xch: as in the forward kernel; work [B*NH, 2, CS, K]:
    Z1 of two mini-batches."""
    xq, xk, xv = tokens
    lr, ts = rates
    w1_c, b1_c, w2_c, b2_c = ckpt
    w1_s, b1_s, w2_s, b2_s = states
    NH, NC, G = dims
    p, bh, h, NK = _program(NH, NC, G, P)
    fc = tl.arange(0, F)
    gamma = tl.load(ln[0] + h * F + fc)
    beta = tl.load(ln[1] + h * F + fc)
    n0 = ck * G
    glen = tl.minimum(G, NC - n0)
    c = bh * NK + ck
    w1_s += bh * G * F * K
    b1_s += bh * G * K
    w2_s += bh * G * K * F
    b2_s += bh * G * F
    work += bh * 2 * CS * K
    xb = xch[0] + bh * 2 * P * _xoff(_XEND, CS, F)
    cnt = xch[1] + bh
    w1 = w1_c + c * F * K
    b1 = b1_c + c * K
    w2 = w2_c + c * K * F
    _copy_state(w1, b1, w2, w1_s, b1_s, w2_s, p, F, K, BK, P)
    b2v = tl.load(b2_c + c * F + fc)
    if p == 0:
        tl.store(b2_s + fc, b2v)
    ex = p * 0  # index of the next exchange (a tensor: it is carried through the loop)
    z2, ex = _z2_pass(_load_tokens(xk + (bh * NC + n0) * CS * F, CS, F), w1, b1, w2, work, xb, cnt, ex, p,
                      xq.dtype.element_ty, PREC, CS, F, K, BK, P)
    for t in range(1, glen):
        tok = (bh * NC + n0 + t - 1) * CS * F
        has_next = t + 1 < glen
        tl.debug_barrier()  # the previous step's stores are visible to every thread
        z2, b2v, ex = _forward_step(
            tok=(xq + tok, xk + tok, xv + tok, xq), rates=(lr + (bh * NC + n0 + t - 1) * CS, ts), ln=(gamma, beta),
            carry=(z2, b2v, ex), src=(w1_s + (t - 1) * F * K, b1_s + (t - 1) * K, w2_s + (t - 1) * K * F),
            dst=(w1_s + t * F * K, b1_s + t * K, w2_s + t * K * F),
            z1=(work + ((t - 1) % 2) * CS * K, xk + tok + has_next.to(tl.int64) * CS * F, work + (t % 2) * CS * K,
                has_next),
            ckpt=(w1_c, b1_c, w2_c, b2_c, False), xch=(xb, cnt), p=p, WITH_OUTPUT=False, CAUSAL=CAUSAL,
            DT=xq.dtype.element_ty, PREC=PREC, CS=CS, F=F, F_REAL=F_REAL, K=K, BK=BK, P=P)
        if p == 0:
            tl.store(b2_s + t * F + fc, b2v)


@triton.jit
def _ttt_bwd_kernel(tokens, rates, ln, dout, states, scratch, xch, dstate, dtokens, dsums, ck, dims,
                    CAUSAL: tl.constexpr, PREC: tl.constexpr, CS: tl.constexpr, F: tl.constexpr,
                    F_REAL: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, P: tl.constexpr):
    """Backward of checkpoint group ck (the launcher goes through the groups in reverse), from its start
    states states = (w1_s, b1_s, w2_s, b2_s) [B*NH, G, ...] (_ttt_remat_kernel); program pid = bh * P + p owns
    the K blocks p*BK, (p+P)*BK, ... of head bh. tokens = (xq, xk, xv), rates = (lr, ts), ln = (ln_w, ln_b),
    dout; dims = (NH, NC, G). dstate = (dw1, db1, dw2, db2) holds the gradient of the state after the group on
    entry and that of the state before it on exit (the last group: of the final state; group 0: of the
    initial state). dtokens = (dxq, dxk, dxv, dlr); dsums = (dln_w, dln_b [B*NH, F], dts [B*NH, CS]): per
    (batch, head) sums over the mini-batches (program 0 zeroes them in the first launch and adds to them).
    scratch = (work [B*NH, _W_END, CS, K] fp32, acts [B*NH, _A_END, CS, K] input dtype, small
    [B*NH*P, _soff(_S_END)]) (regions: _W_*, _A_*, _S_*); small also holds the program's copy of the b2
    gradient from launch to launch. xch = (xbuf [B*NH, 2, P, XSZ], cnt [B*NH] int32 zeros): the exchanges."""
    xq, xk, xv = tokens
    lr, ts = rates
    ln_w, ln_b = ln
    w1_s, b1_s, w2_s, b2_s = states
    work, acts, small = scratch
    dw1, db1, dw2, db2 = dstate
    dxq, dxk, dxv, dlr = dtokens
    dln_w, dln_b, dts = dsums
    NH, NC, G = dims
    p, bh, h, NK = _program(NH, NC, G, P)
    fc = tl.arange(0, F)
    ln_w += h * F
    ln_b += h * F
    w1_s += bh * G * F * K
    b1_s += bh * G * K
    w2_s += bh * G * K * F
    b2_s += bh * G * F
    work += bh * _W_END * CS * K
    acts += bh * _A_END * CS * K
    small += (bh * P + p) * _soff(_S_END, CS, F)
    xb = xch[0] + bh * 2 * P * _xoff(_XEND, CS, F)
    cnt = xch[1] + bh
    dw1 += bh * F * K
    db1 += bh * K
    dw2 += bh * K * F
    db2 += bh * F
    db2s = small + _soff(_S_DB2, CS, F)  # [F]: every program carries the b2 gradient (a full [F] value)
    dln_w += bh * F
    dln_b += bh * F
    dts += bh * CS
    if ck == NK - 1:  # the first launch
        tl.store(db2s + fc, tl.load(db2 + fc))
        if p == 0:
            tl.store(dln_w + fc, tl.zeros([F], tl.float32))
            tl.store(dln_b + fc, tl.zeros([F], tl.float32))
            tl.store(dts + tl.arange(0, CS), tl.zeros([CS], tl.float32))
    n0 = ck * G
    glen = tl.minimum(G, NC - n0)
    ex = p * 0  # index of the next exchange (a tensor: it is carried through the loop)
    for tt in range(glen):
        t = glen - 1 - tt
        tok = (bh * NC + n0 + t) * CS * F
        rate = (bh * NC + n0 + t) * CS
        tl.debug_barrier()
        ex = _backward_step(
            tok=(xq + tok, xk + tok, xv + tok, dout + tok), dtok=(dxq + tok, dxk + tok, dxv + tok, dlr + rate),
            rates=(lr + rate, ts), ln=(ln_w, ln_b), dsums=(dln_w, dln_b, dts),
            state=(w1_s + t * F * K, b1_s + t * K, w2_s + t * K * F, b2_s + t * F), dstate=(dw1, db1, dw2, db2s),
            scratch=(work, acts, small), xch=(xb, cnt), ex=ex, p=p, CAUSAL=CAUSAL, DT=xq.dtype.element_ty,
            PREC=PREC, CS=CS, F=F, F_REAL=F_REAL, K=K, BK=BK, P=P)
    if ck == 0:  # the last launch
        tl.debug_barrier()  # the last step's stores of the b2 gradient are visible to every thread
        if p == 0:
            tl.store(db2 + fc, tl.load(db2s + fc))


# ---------------------------------------------------------------------------------------------- launchers

def unsupported(F: int, CS: int, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32):
    """Why the kernels cannot take head dim F, mini-batch size CS, activations of dtype and a state of
    state_dtype, or None when they can. tl.dot needs every matmul dim >= 16 and a power of two: CS is one,
    F is padded to one (_padded), K = 4F is a multiple of the K block (64 or 16)."""
    if F % 16 or F < 16:
        return f"head dim {F} is not a multiple of 16 (kernels take 16..128)"
    if F > 128:
        return f"head dim {F} is over 128 (kernels take multiples of 16 up to 128)"
    if CS not in (16, 32, 64):
        return f"mini-batch size {CS} is not 16, 32 or 64"
    if dtype not in _DTYPES:
        return f"activation dtype {dtype} is not float32, float16 or bfloat16"
    if state_dtype != torch.float32:
        return f"state dtype {state_dtype} is not float32"
    return None


def supports(F: int, CS: int, dtype: torch.dtype) -> bool:
    """Shapes and dtypes the kernels handle (see unsupported)."""
    return unsupported(F, CS, dtype) is None


def _padded(F: int) -> int:
    """The head dim the kernels run at: F rounded up to a power of two (tl.arange and tl.dot need one)."""
    return 1 << (F - 1).bit_length()


# the dims of each kernel argument (and gradient) that hold the F features: padded to _padded(F) for the
# kernels, cropped back after them (b1, lr: none)
_F_DIMS = {"xq": (-1,), "xk": (-1,), "xv": (-1,), "grad_out": (-1,), "ln_weight": (-1,), "ln_bias": (-1,),
           "w1": (-2,), "b1": (), "w2": (-1,), "b2": (-1,), "lr": ()}


_STATE, _ACTS, _LN = ("w1", "b1", "w2", "b2"), ("xq", "xk", "xv"), ("ln_weight", "ln_bias")


def _padded_shape(name, shape, FP):
    shape = list(shape)
    for d in _F_DIMS[name]:
        shape[d] = FP
    return shape


def _crop(name, t, F):
    """The first F features of t along its feature dims (a view)."""
    for d in _F_DIMS[name]:
        t = t.narrow(d, 0, F)
    return t


def _pad(name, t, F, FP):
    """t with its F features zero-padded to FP along its feature dims (a new contiguous tensor)."""
    padded = t.new_zeros(_padded_shape(name, t.shape, FP))
    _crop(name, padded, F).copy_(t)
    return padded


def _sequential(device: torch.device) -> bool:
    """Programs run one after another: the Triton interpreter."""
    return device.type != "cuda" or interpreting()


class LaunchOptions(NamedTuple):
    """The launch configuration of ttt_mlp_fwd / ttt_mlp_bwd (their `launch=`); None: the default (_config)."""
    block_k: Optional[int] = None  # K block: a power of two >= 16 dividing K = 4F
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None  # software-pipelining stages
    split: Optional[int] = None  # programs per head P: a divisor of K // block_k


def _config(K: int, launch, heads: int, device: torch.device, backward: bool):
    """K block, warps, software-pipelining stages and programs per head (split): the caller's LaunchOptions (a
    benchmark's sweep) or, for launch None or a field None, the defaults chosen by bench_ttt's sweep
    (benchmarks/results/ttt.md; why: docs/ttt_mlp.md): the forward is fastest with one warp group, the backward,
    with far more live tiles, with two. One stage: pipelined K loops multiply the shared memory (the backward then
    needs more than the 227 KB an H100 block can have). split P: the P programs of a head exchange their partial
    sums through global memory and wait for each other. The interpreter runs programs one after another: P = 1. On
    the GPU a head's chain of small matmuls is latency bound and P programs shorten it, but only while they have SMs
    of their own: the default is the largest P (a divisor of the block count) with heads * P programs resident at
    once. Both kernels use all 255 registers a thread may have, so an SM holds 2 programs of 4 warps, 1 of 8. A
    head's programs must all be resident at once: CTAs start in pid order, so at most one head is partly resident
    and the others finish and make room (the tests launch more programs than fit)."""
    block_k, num_warps, num_stages, split = launch or LaunchOptions()
    block_k = block_k or min(K, 64)  # K = 4F: a multiple of 64 for every head dim the kernels take
    if block_k < 16 or block_k & (block_k - 1) or K % block_k:
        raise ValueError(f"block_k: expected a power of two >= 16 dividing K = {K}, got {block_k}")
    num_warps = num_warps or (8 if backward else 4)
    blocks = K // block_k
    sequential = _sequential(device)
    if split is None:
        split = 1
        if not sequential:
            per_sm = max(1, 65536 // (255 * 32 * num_warps))  # an SM has 64K registers
            slots = torch.cuda.get_device_properties(device).multi_processor_count * per_sm
            split = max(d for d in range(1, blocks + 1) if blocks % d == 0 and (d == 1 or heads * d <= slots))
    if not isinstance(split, int) or split < 1 or blocks % split:
        raise ValueError(f"split: expected a divisor of the K block count K // block_k = {blocks}, got {split!r}")
    if split > 1 and sequential:
        raise ValueError(f"split: expected 1 under the Triton interpreter (it runs programs one after another, "
                         f"so programs waiting for each other never finish), got {split}")
    return block_k, num_warps, num_stages or 1, split


_L1_SET = set()  # CUfunction handles whose shared-memory carveout is already set


def _prefer_l1(kernel):
    """Give the SM's unified L1 / shared memory to L1 beyond what the resident programs' shared memory needs.
    Triton asks for the largest carveout (228 KB shared on an H100) for kernels over 48 KB, which leaves
    ~20 KB of L1 for the backward's register spills (its effect: docs/ttt_mlp.md). A CUfunction
    attribute: it holds for the later launches of this compiled kernel."""
    if kernel.function in _L1_SET:
        return
    _L1_SET.add(kernel.function)
    per_sm = max(1, 65536 // (kernel.n_regs * 32 * kernel.metadata.num_warps))  # programs an SM holds
    percent = min(100, -(-100 * per_sm * (kernel.metadata.shared + 1024) // (228 * 1024)))  # of H100's 228 KB
    try:  # a hint (a small gain, docs/ttt_mlp.md): where the driver or the attribute is missing, skip it
        # 9: CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT (the driver rounds up to a valid split)
        ctypes.CDLL("libcuda.so.1").cuFuncSetAttribute(ctypes.c_void_p(kernel.function), 9, ctypes.c_int(percent))
    except (OSError, AttributeError):
        pass


def _exchange(B, NH, CS, F, P, device, launches=1):
    """A head's exchange buffers: [B*NH, 2, P, XSZ] fp32 partials (two slots, P programs, three [CS, F]
    tiles, a [CS, CS] tile and a [CS] vector) and [launches, B*NH] int32 arrival counters, zero at launch
    (row i for the i-th launch of a kernel that shares the partials buffer)."""
    xbuf = torch.empty(B * NH, 2, P, _xslot_size(CS, F), dtype=torch.float32, device=device)
    return xbuf, torch.zeros(launches, B * NH, dtype=torch.int32, device=device)


def _precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _check_inputs(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, state, causal, checkpoint_group_size,
                  checkpoints=False):
    """The op's argument checks (tether._checks, as on every path), after what only the kernels need: F and
    CS they take, and fp32 LN parameters, token_scale and state (state: (w1, b1, w2, b2), or the checkpoints,
    [B, NH, NK, ...], when checkpoints)."""
    check_tensor("xq", xq, ndim=5, dtypes=_DTYPES)
    B, NH, NC, CS, F = xq.shape
    if unsupported(F, CS, xq.dtype) is not None:
        raise ValueError(f"xq: expected head dim F a multiple of 16 in 16..128 and mini-batch size CS in "
                         f"(16, 32, 64), got F={F}, CS={CS}")
    check_group_size(checkpoint_group_size)
    lead = (cdiv(NC, checkpoint_group_size),) if checkpoints else ()
    names = ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias") + tuple(f"{n}_ckpt" if lead else n for n in _STATE)
    check_ttt_inputs(xq, xk, xv, lr, ln_weight, ln_bias, state, token_scale if causal else None,
                     names=names + ("token_scale",), lead=lead)
    fp32_args = [("ln_weight", ln_weight), ("ln_bias", ln_bias), (names[6], state[0])]  # the state: one dtype
    if causal:
        fp32_args.append(("token_scale", token_scale))
    for name, t in fp32_args:
        check_tensor(name, t, dtypes=(torch.float32,))
    return B, NH, NC, CS, F


def _state_shapes(B, NH, F, K, lead=()):
    return ((B, NH, *lead, F, K), (B, NH, *lead, 1, K), (B, NH, *lead, K, F), (B, NH, *lead, 1, F))


def _buffer(name, buf, shape, dtype, device):
    """A caller's output buffer, checked, or a new one."""
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_buffer(name, buf, shape, dtype, device)
    return buf


_SIDE_STREAMS = {}  # device index -> the stream the rematerialisation runs on


def _backward_groups(NK, remat, backward, device):
    """Run the checkpoint groups in reverse: remat(ck) fills states[ck % 2], backward(ck) reads them. On the
    GPU the rematerialisation of group ck - 1 runs on a side stream while group ck's backward runs: the
    backward (B=1, ttt-tk's shape) fills 96 of 132 SMs with one program each, the remat's 48 programs fit
    beside it. Its programs never wait for each other (one per head), so the backward's programs, which do
    wait for their partners, are held up by them at most until they finish (no deadlock). Events order
    remat(ck) before backward(ck), and backward(ck + 1) before remat(ck - 1) (same state buffer); the
    caller's stream waits for everything (backward(0) comes after the last remat)."""
    if _sequential(device):
        for ck in reversed(range(NK)):
            remat(ck)
            backward(ck)
        return
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.setdefault(device.index, torch.cuda.Stream(device))
    side.wait_stream(main)  # the inputs and buffers are ready
    with torch.cuda.stream(side):
        remat(NK - 1)
    remat_done = {NK - 1: side.record_event()}
    backward_done = {}
    for ck in reversed(range(NK)):
        main.wait_event(remat_done[ck])
        backward(ck)
        backward_done[ck] = main.record_event()
        if ck > 0:
            with torch.cuda.stream(side):
                if ck + 1 < NK:
                    side.wait_event(backward_done[ck + 1])
                remat(ck - 1)
            remat_done[ck - 1] = side.record_event()


def ttt_mlp_fwd(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1, b1, w2, b2, *, causal,
                checkpoint_group_size, out=None, w1_ckpt=None, b1_ckpt=None, w2_ckpt=None, b2_ckpt=None,
                launch: Optional[LaunchOptions] = None):
    """Forward scan. Returns (out, (w1, b1, w2, b2) checkpoints [B, NH, NK, ...], final state)."""
    B, NH, NC, CS, F = _check_inputs(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, (w1, b1, w2, b2), causal,
                                     checkpoint_group_size)
    G = checkpoint_group_size
    NK = cdiv(NC, G)
    K, FP = 4 * F, _padded(F)
    dev = xq.device
    state = [t.contiguous() for t in (w1, b1, w2, b2)]
    out = _buffer("out", out, xq.shape, xq.dtype, dev)
    ckpt = [_buffer(f"{n}_ckpt", buf, s, torch.float32, dev) for n, buf, s in
            zip(_STATE, (w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt), _state_shapes(B, NH, F, K, (NK,)))]
    if NC == 0 or B * NH == 0:  # nothing to launch: no mini-batch (or no head), the state comes out as it went in
        return out, tuple(ckpt), tuple(t.clone() for t in state)
    xq, xk, xv, lr, lnw, lnb = (t.contiguous() for t in (xq, xk, xv, lr, ln_weight, ln_bias))
    ts = token_scale.contiguous() if causal else lr  # not read when non-causal
    if FP == F:
        last = [t.clone() for t in state]  # updated in place by the kernel: initial -> final state
        k_out, k_ckpt = out, ckpt
    else:  # the kernel runs on zero-padded copies (docs/ttt_padding.md); its results are cropped after it
        xq, xk, xv, lnw, lnb = (_pad(n, t, F, FP) for n, t in zip(_ACTS + _LN, (xq, xk, xv, lnw, lnb)))
        last = [_pad(n, t, F, FP) for n, t in zip(_STATE, state)]
        k_out = torch.empty_like(xq)  # [B, NH, NC, CS, FP]
        k_ckpt = [torch.empty(s, dtype=torch.float32, device=dev) for s in _state_shapes(B, NH, FP, K, (NK,))]
    BK, warps, stages, P = _config(K, launch, B * NH, dev, backward=False)
    work = torch.empty(B * NH, 2, CS, K, dtype=torch.float32, device=dev)  # per head: Z1 of 2 mini-batches
    _ttt_fwd_kernel[(B * NH * P,)]((xq, xk, xv), (lr, ts), (lnw, lnb), tuple(last), tuple(k_ckpt), k_out, work,
                                   _exchange(B, NH, CS, FP, P, dev), (NH, NC, G), CAUSAL=bool(causal),
                                   PREC=_precision(xq), CS=CS, F=FP, F_REAL=F, K=K, BK=BK, P=P, num_warps=warps,
                                   num_stages=stages)
    if FP != F:
        out.copy_(_crop("xq", k_out, F))
        for n, c, kc in zip(_STATE, ckpt, k_ckpt):
            c.copy_(_crop(n, kc, F))
        last = [_crop(n, t, F).contiguous() for n, t in zip(_STATE, last)]
    return out, tuple(ckpt), tuple(last)


def _grad_buffers(grads, xq, lr, B, NH, F, K, device):
    """The caller's gradient buffers (grads), checked, and new ones for the others (token_scale: _finish_grads);
    the ln_weight/ln_bias gradients are per batch element, [B, NH, F]. Returns the dict and the names of the
    gradients the backward kernel writes, in order."""
    grads = dict(grads or {})
    specs = {"xq": (xq.shape, xq.dtype), "xk": (xq.shape, xq.dtype), "xv": (xq.shape, xq.dtype),
             "lr": (lr.shape, lr.dtype), "ln_weight": ((B, NH, F), torch.float32),
             "ln_bias": ((B, NH, F), torch.float32),
             **{n: (s, torch.float32) for n, s in zip(_STATE, _state_shapes(B, NH, F, K))}}
    for name, (shape, dtype) in specs.items():
        grads[name] = _buffer(f"grads['{name}']", grads.get(name), shape, dtype, device)
    return grads, tuple(specs)


def _grads_without_launch(grads, grad_last, causal, CS, device):
    """Nothing to launch: no mini-batch (or no head) between the state and the output, so the gradients are
    zero and the initial state's is the final state's."""
    if causal and grads.get("token_scale") is None:
        grads["token_scale"] = torch.empty(CS, dtype=torch.float32, device=device)
    for g in grads.values():
        g.zero_()
    for name, g in zip(_STATE, grad_last):
        grads[name].copy_(g)  # the initial state is the final one
    if not causal:
        grads["token_scale"] = None
    return grads


def _bwd_operands(inputs, grad_out, ckpt, grad_last, k_grads, causal, F, FP):
    """The backward kernels' operands from inputs = (xq, xk, xv, lr, token_scale, ln_weight, ln_bias):
    contiguous, and where F is not a power of two zero-padded to FP features, with padded gradient buffers
    in k_grads that _finish_grads crops (docs/ttt_padding.md). The carried state gradient starts as that of
    the final state. Returns (xq, xk, xv), (lr, ts), (ln_weight, ln_bias), grad_out, the checkpoints and the
    kernel's gradient buffers."""
    xq, xk, xv, lr, token_scale, ln_weight, ln_bias = inputs
    xq, xk, xv, lr, grad_out = (t.contiguous() for t in (xq, xk, xv, lr, grad_out.to(xq.dtype)))
    lnw, lnb = ln_weight.contiguous(), ln_bias.contiguous()
    ts = token_scale.contiguous() if causal else lr  # not read when non-causal
    if FP != F:
        xq, xk, xv, lnw, lnb, grad_out = (_pad(n, t, F, FP) for n, t in
                                          zip(_ACTS + _LN + ("grad_out",), (xq, xk, xv, lnw, lnb, grad_out)))
        ckpt = [_pad(n, t, F, FP) for n, t in zip(_STATE, ckpt)]
        grad_last = [_pad(n, t, F, FP) for n, t in zip(_STATE, grad_last)]
        k_grads = {n: g.new_empty(_padded_shape(n, g.shape, FP)) if _F_DIMS[n] else g for n, g in k_grads.items()}
    for name, g in zip(_STATE, grad_last):
        k_grads[name].copy_(g)  # the carried state gradient starts as that of the final state
    return (xq, xk, xv), (lr, ts), (lnw, lnb), grad_out, ckpt, k_grads


def _bwd_scratch(B, NH, G, NK, CS, FP, K, P, dtype, device):
    """The backward's scratch (docs/ttt_mlp.md#scratch-layout-backward): two sets of a group's start states
    (W1, b1, W2, b2 per head, blocks by owner: the next group's are rematerialised while this group's are
    read), the remat's Z1 of 2 mini-batches, (work, acts, small) (regions _W_*, _A_*, _S_*), the per-head
    token_scale gradient sums, and the exchanges of the remat (one program per head) and of the backward (one
    counter row per launch)."""
    states = [tuple(torch.empty(s, dtype=torch.float32, device=device) for s in _state_shapes(B, NH, FP, K, (G,)))
              for _ in range(2)]
    rwork = torch.empty(B * NH, 2, CS, K, dtype=torch.float32, device=device)
    work = torch.empty(B * NH, _W_END.value, CS, K, dtype=torch.float32, device=device)  # per head, by owner
    acts = torch.empty(B * NH, _A_END.value, CS, K, dtype=dtype, device=device)  # gelu(Z1), gelu(Zq1)
    small = torch.empty(B * NH * P, _small_size(CS, FP), dtype=torch.float32, device=device)  # per program
    dts = torch.empty(B * NH, CS, dtype=torch.float32, device=device)
    return (states, rwork, (work, acts, small), dts, _exchange(B, NH, CS, FP, 1, device, NK),
            _exchange(B, NH, CS, FP, P, device, NK))


def _finish_grads(grads, k_grads, dts, causal, F):
    """The padded gradients cropped into the caller's buffers; token_scale's summed over batch and heads."""
    for name, g in k_grads.items():
        if g is not grads[name]:
            grads[name].copy_(_crop(name, g, F))
    if not causal:
        grads["token_scale"] = None
    elif grads.get("token_scale") is None:
        grads["token_scale"] = dts.sum(0)  # [CS]: summed over batch and heads
    else:
        grads["token_scale"].copy_(dts.sum(0))
    return grads


def ttt_mlp_bwd(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt, grad_out,
                grad_w1_last, grad_b1_last, grad_w2_last, grad_b2_last, *, causal, checkpoint_group_size,
                grads=None, launch: Optional[LaunchOptions] = None):
    """Backward scan with rematerialisation from the checkpoints. Returns a dict of gradients (see module
    tether.functional.ttt_mlp); ln_weight/ln_bias gradients are per batch element, [B, NH, F]."""
    B, NH, NC, CS, F = _check_inputs(xq, xk, xv, lr, token_scale, ln_weight, ln_bias,
                                     (w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt), causal, checkpoint_group_size,
                                     checkpoints=True)
    G = checkpoint_group_size
    NK = cdiv(NC, G)
    K, FP = 4 * F, _padded(F)
    dev = xq.device
    ckpt = [t.contiguous() for t in (w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt)]
    grad_last = (grad_w1_last, grad_b1_last, grad_w2_last, grad_b2_last)
    check_ttt_grads(grad_out, grad_last, xq, torch.float32,
                    names=("grad_out",) + tuple(f"grad_{n}_last" for n in _STATE))
    grad_last = [t.contiguous() for t in grad_last]
    grads, names = _grad_buffers(grads, xq, lr, B, NH, F, K, dev)
    if NK == 0 or B * NH == 0:
        return _grads_without_launch(grads, grad_last, causal, CS, dev)
    tokens, rates, ln, grad_out, ckpt, k_grads = _bwd_operands((xq, xk, xv, lr, token_scale, ln_weight, ln_bias),
                                                               grad_out, ckpt, grad_last,
                                                               {n: grads[n] for n in names}, causal, F, FP)
    BK, warps, stages, P = _config(K, launch, B * NH, dev, backward=True)
    # rematerialisation: one program per head, which waits for no other program (see _backward_groups)
    rBK, rwarps, _, _ = _config(K, LaunchOptions(split=1), B * NH, dev, backward=False)
    states, rwork, scratch, dts, rxch, (xbuf, cnt) = _bwd_scratch(B, NH, G, NK, CS, FP, K, P, tokens[0].dtype, dev)
    common = dict(CAUSAL=bool(causal), PREC=_precision(tokens[0]), CS=CS, F=FP, F_REAL=F, K=K, num_stages=stages)
    g = k_grads

    def remat(ck):
        _ttt_remat_kernel[(B * NH,)](tokens, rates, ln, tuple(ckpt), states[ck % 2], rwork, (rxch[0], rxch[1][ck]),
                                     ck, (NH, NC, G), BK=rBK, P=1, num_warps=rwarps, **common)

    def backward(ck):
        kernel = _ttt_bwd_kernel[(B * NH * P,)](
            tokens, rates, ln, grad_out, states[ck % 2], scratch, (xbuf, cnt[ck]), (g["w1"], g["b1"], g["w2"], g["b2"]),
            (g["xq"], g["xk"], g["xv"], g["lr"]), (g["ln_weight"], g["ln_bias"], dts), ck, (NH, NC, G), BK=BK, P=P,
            num_warps=warps, **common)
        if not _sequential(dev):
            _prefer_l1(kernel)

    _backward_groups(NK, remat, backward, dev)
    return _finish_grads(grads, k_grads, dts, causal, F)
