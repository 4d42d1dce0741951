"""Triton kernels for the elementwise linear spike-driven attention (spec: shared/spec/spike_attention.md).

    C_t = gamma_h * C_{t-1} + k_t * v_t,   o_t = q_t * C_t        per (b, h, d) channel

Layout: q, k, v, out, grads are contiguous [T, B, H, D] (any float dtype in, fp32 math); state and
checkpoints are [B, H, D] / [n_chunks, B, H, D] fp32; gamma is [H] fp32.
Grid: (B * H, cdiv(D, BLOCK_D)); a program owns one head (so one decay) and a block of channels and walks
time in chunks of CHUNK steps. Inside a chunk the scan is a decay-masked matmul (fp32, ieee: tf32 would
round the decays), so all the chunk's loads are in flight at once; across chunks one state row is carried.

Backward (a reverse scan of the adjoint G_t = dout_t * q_t + gamma * G_{t+1}) walks the chunks in reverse
and recomputes C from the states that entered each chunk, saved by the forward (4 / CHUNK bytes per element).
Nothing divides by gamma: every decay factor is gamma^n with n >= 0.
"""
import torch
import triton
import triton.language as tl

CHUNK = 64


@triton.jit
def _decays(first, second, log2_gamma, strict: tl.constexpr):
    """[len(first), len(second)] matrix gamma^(first_i - second_j - strict) where first_i - second_j >= strict, else 0."""
    steps = first[:, None] - second[None, :] - strict
    return tl.where(steps >= 0, tl.exp2(tl.maximum(steps, 0).to(tl.float32) * log2_gamma), 0.0)


@triton.jit
def _powers(exponent, log2_gamma):
    """gamma^exponent where exponent >= 0, else 0 (rows past the end of the sequence)."""
    return tl.where(exponent >= 0, tl.exp2(tl.maximum(exponent, 0).to(tl.float32) * log2_gamma), 0.0)


@triton.jit
def _scan(decays, x, powers, carry):
    """decays @ x + powers * carry: a chunk of the scan, [CHUNK, BLOCK_D] fp32."""
    return tl.dot(decays, x, input_precision="ieee") + powers[:, None] * carry[None, :]


@triton.jit
def _row(tile, rows, index):
    """Row `index` of a [CHUNK, BLOCK_D] tile."""
    return tl.sum(tl.where(rows[:, None] == index, tile, 0.0), axis=0)


@triton.jit
def _spike_attention_fwd_kernel(q_ptr, k_ptr, v_ptr, gamma_ptr, state_ptr, out_ptr, final_ptr, checkpoint_ptr,
                                T, H, D, N,  # N = B * H * D, the stride of one time step
                                CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, SAVE_CHECKPOINTS: tl.constexpr):
    bh = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.arange(0, CHUNK)
    channel = bh * D + d  # [BLOCK_D]
    d_mask = d < D
    log2_gamma = tl.log2(tl.load(gamma_ptr + bh % H))
    decays = _decays(rows, rows, log2_gamma, 0)  # [CHUNK, CHUNK]: gamma^(i-j), j <= i
    powers = _powers(rows + 1, log2_gamma)  # [CHUNK]: gamma^(i+1), how the entering state reaches row i
    carry = tl.load(state_ptr + channel, mask=d_mask, other=0.0)  # [BLOCK_D] fp32
    for c in range(0, tl.cdiv(T, CHUNK)):
        if SAVE_CHECKPOINTS:
            tl.store(checkpoint_ptr + c * N + channel, carry, mask=d_mask)
        t = c * CHUNK + rows
        offs = t.to(tl.int64)[:, None] * N + channel[None, :]
        mask = (t < T)[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        C = _scan(decays, k * v, powers, carry)
        tl.store(out_ptr + offs, q * C, mask=mask)
        carry = _row(C, rows, tl.minimum(T - c * CHUNK, CHUNK) - 1)
    tl.store(final_ptr + channel, carry, mask=d_mask)


@triton.jit
def _spike_attention_bwd_kernel(q_ptr, k_ptr, v_ptr, gamma_ptr, checkpoint_ptr, dout_ptr, dfinal_ptr,
                                dq_ptr, dk_ptr, dv_ptr, dstate_ptr, dgamma_ptr,
                                T, H, D, N,
                                CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, NEED_DGAMMA: tl.constexpr):
    bh = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.arange(0, CHUNK)
    channel = bh * D + d
    d_mask = d < D
    gamma = tl.load(gamma_ptr + bh % H)
    log2_gamma = tl.log2(gamma)
    decays = _decays(rows, rows, log2_gamma, 0)  # [CHUNK, CHUNK]: forward, gamma^(i-j), j <= i
    powers = _powers(rows + 1, log2_gamma)
    # adjoint flowing into the chunk's last state from the future (starts as the final state's gradient)
    adjoint = tl.load(dfinal_ptr + channel, mask=d_mask, other=0.0)  # [BLOCK_D]
    dgamma = tl.zeros([BLOCK_D], dtype=tl.float32)
    n_chunks = tl.cdiv(T, CHUNK)
    for r in range(0, n_chunks):
        c = n_chunks - 1 - r
        t = c * CHUNK + rows
        offs = t.to(tl.int64)[:, None] * N + channel[None, :]
        mask = (t < T)[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        entering = tl.load(checkpoint_ptr + c * N + channel, mask=d_mask, other=0.0)
        C = _scan(decays, k * v, powers, entering)  # recomputed forward states
        last = tl.minimum(T - c * CHUNK, CHUNK) - 1
        # G_i = sum_{j >= i} gamma^(j-i) dout_j q_j + gamma^(last-i) adjoint: the reverse scan, same code
        G = _scan(tl.trans(decays), dout * q, _powers(last - rows, log2_gamma), adjoint)
        tl.store(dq_ptr + offs, (dout * C).to(dq_ptr.dtype.element_ty), mask=mask)
        tl.store(dk_ptr + offs, (G * v).to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + offs, (G * k).to(dv_ptr.dtype.element_ty), mask=mask)
        if NEED_DGAMMA:
            # dL/dgamma = sum_t G_t * C_{t-1}; C_{t-1} from the strictly causal decays, not (C_t - x_t) / gamma
            C_prev = _scan(_decays(rows, rows, log2_gamma, 1), k * v, _powers(rows, log2_gamma), entering)
            dgamma += tl.sum(G * C_prev, axis=0)  # padded rows and channels have G = 0
        adjoint = gamma * _row(G, rows, 0)
    tl.store(dstate_ptr + channel, adjoint, mask=d_mask)
    if NEED_DGAMMA:
        tl.store(dgamma_ptr + bh * tl.num_programs(1) + tl.program_id(1), tl.sum(dgamma, axis=0))


def _block_d(D: int) -> int:
    # tl.dot needs >= 16 columns; 32 gives B*H*2 programs at D=64, enough to fill an H100
    return max(16, min(32, triton.next_power_of_2(D)))


def spike_attention_forward(q, k, v, gamma, state, save_checkpoints: bool):
    """q, k, v [T, B, H, D]; gamma [H] fp32; state [B, H, D] fp32.

    Returns out [T, B, H, D] fp32, final state [B, H, D] fp32 and the states entering each chunk
    [cdiv(T, CHUNK), B, H, D] fp32 (empty unless save_checkpoints), which the backward needs.
    """
    T, B, H, D = q.shape
    q, k, v, gamma, state = (t.contiguous() for t in (q, k, v, gamma, state))
    out = torch.empty(T, B, H, D, device=q.device, dtype=torch.float32)
    final = torch.empty(B, H, D, device=q.device, dtype=torch.float32)
    n_checkpoints = triton.cdiv(T, CHUNK) if save_checkpoints else 0
    checkpoints = torch.empty(n_checkpoints, B, H, D, device=q.device, dtype=torch.float32)
    block_d = _block_d(D)
    _spike_attention_fwd_kernel[(B * H, triton.cdiv(D, block_d))](
        q, k, v, gamma, state, out, final, checkpoints, T, H, D, B * H * D,
        CHUNK=CHUNK, BLOCK_D=block_d, SAVE_CHECKPOINTS=save_checkpoints)
    return out, final, checkpoints


def spike_attention_backward(q, k, v, gamma, checkpoints, dout, dfinal, need_dgamma: bool):
    """Gradients of (out, final state) -> dq, dk, dv (dtypes of q, k, v), dstate [B, H, D] fp32, dgamma [H] fp32.

    dgamma is zeros unless need_dgamma (its reduction costs a third matmul per chunk).
    """
    T, B, H, D = q.shape
    q, k, v, gamma, checkpoints, dout, dfinal = (
        t.contiguous() for t in (q, k, v, gamma, checkpoints, dout, dfinal))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dstate = torch.empty(B, H, D, device=q.device, dtype=torch.float32)
    block_d = _block_d(D)
    n_blocks = triton.cdiv(D, block_d)
    dgamma_parts = torch.zeros(B, H, n_blocks, device=q.device, dtype=torch.float32)  # one per program
    _spike_attention_bwd_kernel[(B * H, n_blocks)](
        q, k, v, gamma, checkpoints, dout, dfinal, dq, dk, dv, dstate, dgamma_parts, T, H, D, B * H * D,
        CHUNK=CHUNK, BLOCK_D=block_d, NEED_DGAMMA=need_dgamma)
    return dq, dk, dv, dstate, dgamma_parts.sum(dim=(0, 2))
