"""Triton kernels for the elementwise linear spike-driven attention (spec: docs/spec/spike_attention.md).

    C_t = gamma_h * C_{t-1} + k_t * v_t,   o_t = q_t * C_t        per (b, h, d) channel

Layout: q, k, v and their grads are packed as one contiguous qkv [T, B, 3, H, D] (the projection's output as it
comes, any float dtype; fp32 math); out and dout are contiguous [T, B, H, D]; state and per-chunk states are
[B, H, D] / [n_chunks, B, H, D] fp32; gamma is [H] fp32.

Time is cut into chunks of CHUNK steps and every pass but one runs all chunks in parallel:
  1. `_chunk_sums_kernel`, grid (n_chunks, B*H, D blocks): what each chunk adds to the state it hands on;
  2. `_carry_kernel`, grid (channel blocks,): the short scan over chunks -> the state entering each chunk;
  3. `_chunk_forward_kernel` / `_chunk_backward_kernel`, grid as 1: inside a chunk the scan is a parallel
     prefix scan (tl.associative_scan on (decay, value) pairs, fp32) plus the entering state.
The backward is the same three passes on the adjoint G_t = dout_t * q_t + gamma * G_{t+1}, run from the
end; it recomputes C from the entering states that the forward saved (4 / CHUNK bytes per element).
Nothing divides by gamma: every decay factor is gamma^n with n >= 0.
"""
import torch
import triton
import triton.language as tl

from . import cdiv

CHUNK = 32  # time steps a program scans (why: docs/attention_kernels.md)
CARRY_BLOCK = 128  # channels a program of the carry scan walks


@triton.jit
def _powers(exponent, log2_gamma):
    """gamma^exponent where exponent >= 0, else 0 (rows past the end of the sequence)."""
    return tl.where(exponent >= 0, tl.exp2(tl.maximum(exponent, 0).to(tl.float32) * log2_gamma), 0.0)


@triton.jit
def _decay_then_add(decay_a, value_a, decay_b, value_b):
    """Composition of two stretches of C -> gamma^n C + value: first a, then b."""
    return decay_a * decay_b, value_a * decay_b + value_b


@triton.jit
def _scan(x, gamma, powers, carry, REVERSE: tl.constexpr):
    """One chunk of the scan along rows, [CHUNK, BLOCK_D] fp32: sum_{j<=i} gamma^(i-j) x_j (j >= i when
    REVERSE) by a parallel prefix scan, plus powers * carry (the state carried in from the other chunks)."""
    _, local = tl.associative_scan((tl.zeros_like(x) + gamma, x), 0, _decay_then_add, reverse=REVERSE)
    return local + powers[:, None] * carry[None, :]


@triton.jit
def _chunk_tile(T, H, D, N, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's chunk c, channels [BLOCK_D], [CHUNK, BLOCK_D] offsets into [T, B, H, D] (offs) and into
    the packed [T, B, 3, H, D] (packed, of q; k and v are H * D further each), mask, index of its last row."""
    c = tl.program_id(0)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.arange(0, CHUNK)
    bh = tl.program_id(1)  # b * H + h
    channel = bh * D + d
    t = c * CHUNK + rows
    offs = t.to(tl.int64)[:, None] * N + channel[None, :]
    packed = t.to(tl.int64)[:, None] * (3 * N) + ((bh // H) * (3 * H * D) + (bh % H) * D + d)[None, :]
    d_mask = d < D
    mask = (t < T)[:, None] & d_mask[None, :]
    last = tl.minimum(T - c * CHUNK, CHUNK) - 1
    return c, rows, channel, d_mask, offs, packed, mask, last


@triton.jit
def _load(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _chunk_sums_kernel(a_ptr, b_ptr, gamma_ptr, sums_ptr, T, H, D, N,
                       CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, TO_START: tl.constexpr):
    """sums[c] = sum_i w_i a_i b_i over the chunk's rows: w_i = gamma^(last - i) (forward, x = k v, both
    packed, what the chunk adds to the state at its end) or gamma^(i + 1) (backward, g = dout q with q
    packed, what it adds to the adjoint of the state before it)."""
    c, rows, channel, d_mask, offs, packed, mask, last = _chunk_tile(T, H, D, N, CHUNK, BLOCK_D)
    log2_gamma = tl.log2(tl.load(gamma_ptr + tl.program_id(1) % H))
    x = _load(a_ptr, packed, mask) * _load(b_ptr, offs if TO_START else packed, mask)
    weights = _powers(rows + 1 if TO_START else last - rows, log2_gamma)
    tl.store(sums_ptr + c.to(tl.int64) * N + channel, tl.sum(weights[:, None] * x, axis=0), mask=d_mask)


@triton.jit
def _carry_kernel(sums_ptr, gamma_ptr, init_ptr, entering_ptr, final_ptr, T, H, D, N,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Scan over chunks, per channel: entering[c] = carry; carry = gamma^len(c) * carry + sums[c].
    Forward: carry is the state (init = initial state, final = final state). Backward (REVERSE):
    carry is the adjoint of a chunk's last state (init = grad of the final state, final = grad of the
    initial state)."""
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # channel (b * H + h) * D + d
    mask = n < N
    log2_gamma = tl.log2(tl.load(gamma_ptr + (n // D) % H, mask=mask, other=1.0))
    carry = tl.load(init_ptr + n, mask=mask, other=0.0)
    n_chunks = tl.cdiv(T, CHUNK)
    for r in range(0, n_chunks):
        c = n_chunks - 1 - r if REVERSE else r
        offs = c.to(tl.int64) * N + n
        tl.store(entering_ptr + offs, carry, mask=mask)
        length = tl.minimum(T - c * CHUNK, CHUNK)
        carry = tl.exp2(length.to(tl.float32) * log2_gamma) * carry + tl.load(sums_ptr + offs, mask=mask)
    tl.store(final_ptr + n, carry, mask=mask)


@triton.jit
def _chunk_forward_kernel(q_ptr, k_ptr, v_ptr, gamma_ptr, entering_ptr, out_ptr, T, H, D, N,
                          CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = q * C over one chunk, C = scan of k v + gamma^(i+1) * entering state."""
    c, rows, channel, d_mask, offs, packed, mask, last = _chunk_tile(T, H, D, N, CHUNK, BLOCK_D)
    gamma = tl.load(gamma_ptr + tl.program_id(1) % H)
    entering = tl.load(entering_ptr + c.to(tl.int64) * N + channel, mask=d_mask, other=0.0)
    x = _load(k_ptr, packed, mask) * _load(v_ptr, packed, mask)
    C = _scan(x, gamma, _powers(rows + 1, tl.log2(gamma)), entering, False)
    tl.store(out_ptr + offs, _load(q_ptr, packed, mask) * C, mask=mask)


@triton.jit
def _chunk_backward_kernel(q_ptr, k_ptr, v_ptr, gamma_ptr, entering_ptr, adjoint_ptr, dout_ptr,
                           dq_ptr, dk_ptr, dv_ptr, dgamma_ptr, T, H, D, N,
                           CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, NEED_DGAMMA: tl.constexpr):
    """dq = dout C, dk = G v, dv = G k over one chunk, with G = reverse scan of dout q + gamma^(last-i) * adjoint
    (same code as the forward scan); per-program partial sums of dgamma = sum_t G_t C_{t-1}."""
    c, rows, channel, d_mask, offs, packed, mask, last = _chunk_tile(T, H, D, N, CHUNK, BLOCK_D)
    gamma = tl.load(gamma_ptr + tl.program_id(1) % H)
    log2_gamma = tl.log2(gamma)
    entering = tl.load(entering_ptr + c.to(tl.int64) * N + channel, mask=d_mask, other=0.0)
    adjoint = tl.load(adjoint_ptr + c.to(tl.int64) * N + channel, mask=d_mask, other=0.0)
    q, k, v, dout = _load(q_ptr, packed, mask), _load(k_ptr, packed, mask), _load(v_ptr, packed, mask), \
        _load(dout_ptr, offs, mask)
    C = _scan(k * v, gamma, _powers(rows + 1, log2_gamma), entering, False)  # recomputed states
    G = _scan(dout * q, gamma, _powers(last - rows, log2_gamma), adjoint, True)  # padded rows: G = 0
    tl.store(dq_ptr + packed, (dout * C).to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptr + packed, (G * v).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + packed, (G * k).to(dv_ptr.dtype.element_ty), mask=mask)
    if NEED_DGAMMA:
        # C_{t-1}: the same scan over k v shifted down one row (rows come from cache), not (C_t - k_t v_t) / gamma
        shifted = mask & (rows > 0)[:, None]
        C_prev = _scan(_load(k_ptr, packed - 3 * N, shifted) * _load(v_ptr, packed - 3 * N, shifted), gamma,
                       _powers(rows, log2_gamma), entering, False)
        program = (c * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        tl.store(dgamma_ptr + program, tl.sum(tl.sum(G * C_prev, axis=0), axis=0))


def _grids(T: int, B: int, H: int, D: int):
    # 32 keeps the [CHUNK, BLOCK_D] tiles in registers and the grid large (docs/attention_kernels.md)
    block_d = min(32, triton.next_power_of_2(max(D, 1)))  # D = 0: no launch, but a grid to size
    n_chunks = cdiv(T, CHUNK)
    return block_d, (n_chunks, B * H, cdiv(D, block_d)), (cdiv(B * H * D, CARRY_BLOCK),)


def spike_attention_forward(qkv, gamma, state):
    """qkv [T, B, 3, H, D] (q, k, v packed, contiguous); gamma [H] fp32; state [B, H, D] fp32.

    Returns out [T, B, H, D] fp32, final state [B, H, D] fp32 and the state entering each chunk
    [cdiv(T, CHUNK), B, H, D] fp32 (what the backward recomputes from).
    """
    T, B, _, H, D = qkv.shape
    qkv, gamma, state = (t.contiguous() for t in (qkv, gamma, state))
    q, k, v = qkv.unbind(2)  # views: the kernels address them through the packed layout
    N = B * H * D
    block_d, chunk_grid, carry_grid = _grids(T, B, H, D)
    sums = torch.empty(chunk_grid[0], B, H, D, device=qkv.device, dtype=torch.float32)
    entering = torch.empty_like(sums)
    final = torch.empty(B, H, D, device=qkv.device, dtype=torch.float32)
    out = torch.empty(T, B, H, D, device=qkv.device, dtype=torch.float32)
    if T == 0 or N == 0:  # nothing to launch (an empty grid or no step): the state comes out as it went in
        return out, final.copy_(state), entering
    _chunk_sums_kernel[chunk_grid](k, v, gamma, sums, T, H, D, N, CHUNK=CHUNK, BLOCK_D=block_d, TO_START=False)
    _carry_kernel[carry_grid](sums, gamma, state, entering, final, T, H, D, N,
                              CHUNK=CHUNK, BLOCK=CARRY_BLOCK, REVERSE=False)
    _chunk_forward_kernel[chunk_grid](q, k, v, gamma, entering, out, T, H, D, N, CHUNK=CHUNK, BLOCK_D=block_d)
    return out, final, entering


def spike_attention_backward(qkv, gamma, entering, dout, dfinal, need_dgamma: bool):
    """Gradients of (out, final state) -> dqkv [T, B, 3, H, D] (qkv's dtype), dstate [B, H, D] fp32, dgamma [H]
    fp32. dgamma is zeros unless need_dgamma (its partial sums cost a third scan per chunk).
    """
    T, B, _, H, D = qkv.shape
    qkv, gamma, entering, dout, dfinal = (t.contiguous() for t in (qkv, gamma, entering, dout, dfinal))
    q, k, v = qkv.unbind(2)
    N = B * H * D
    block_d, chunk_grid, carry_grid = _grids(T, B, H, D)
    sums = torch.empty_like(entering)
    adjoint = torch.empty_like(entering)  # adjoint of each chunk's last state, from the chunks after it
    dstate = torch.empty(B, H, D, device=qkv.device, dtype=torch.float32)
    dqkv = torch.empty_like(qkv)
    dq, dk, dv = dqkv.unbind(2)
    dgamma_parts = torch.zeros(chunk_grid[0], B, H, chunk_grid[2], device=qkv.device, dtype=torch.float32)
    if T == 0 or N == 0:  # nothing to launch (an empty grid or no step): dstate = dfinal, dgamma = 0
        return dqkv, dstate.copy_(dfinal), dgamma_parts.sum(dim=(0, 1, 3))
    _chunk_sums_kernel[chunk_grid](q, dout, gamma, sums, T, H, D, N, CHUNK=CHUNK, BLOCK_D=block_d, TO_START=True)
    _carry_kernel[carry_grid](sums, gamma, dfinal, adjoint, dstate, T, H, D, N,
                              CHUNK=CHUNK, BLOCK=CARRY_BLOCK, REVERSE=True)
    _chunk_backward_kernel[chunk_grid](q, k, v, gamma, entering, adjoint, dout, dq, dk, dv, dgamma_parts,
                                       T, H, D, N, CHUNK=CHUNK, BLOCK_D=block_d, NEED_DGAMMA=need_dgamma)
    return dqkv, dstate, dgamma_parts.sum(dim=(0, 1, 3))
