"""Linear spike-driven attention, pure PyTorch: the oracle (spec: docs/spec/spike_attention.md).

Elementwise form (default):  C_t = gamma * C_{t-1} + k_t * v_t,  o_t = q_t * C_t        (C: [B, H, D])
Matrix form:                 S_t = gamma * S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t  (S: [B, H, D, D])

`spike_attention` is the readable loop over time; `spike_attention_cumsum` is the same elementwise
function vectorised over time (the "PyTorch cumsum formulation", the eager peer of the Triton kernel).
Arguments are checked by tether._checks.check_spike_attention_args, as on every other path.
T = 0 gives an empty out and the state as it came (zeros when None).
"""
import math

import torch

from tether._checks import check_spike_attention_args
from tether._math import compute_dtype, decay_matrix, gamma_per_head


def spike_attention(q, k, v, gamma=1.0, state=None, *, form="elementwise", scale=None):
    """Loop over time. q, k, v: [T, B, H, D]. Returns (out [T, B, H, D], final state), both fp32 (fp64 in)."""
    check_spike_attention_args(q, k, v, gamma, state, form, scale)
    T, B, H, D = q.shape
    dtype = compute_dtype(q, k, v, state, gamma)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    g = gamma_per_head(gamma, H, dtype, q.device)
    outs = []
    if form == "elementwise":
        decay = g[:, None]  # [H, 1], broadcasts over [B, H, D]
        C = torch.zeros(B, H, D, dtype=dtype, device=q.device) if state is None else state.to(dtype)
        for t in range(T):
            C = decay * C + k[t] * v[t]
            outs.append(q[t] * C)
        return _finish(outs, q, C)
    scale = 1.0 / D if scale is None else scale
    decay = g[:, None, None]  # [H, 1, 1], broadcasts over [B, H, D, D]
    S = torch.zeros(B, H, D, D, dtype=dtype, device=q.device) if state is None else state.to(dtype)
    for t in range(T):
        S = decay * S + k[t][..., :, None] * v[t][..., None, :]  # outer product k_t^T v_t: [B, H, D, D]
        outs.append(scale * (q[t][..., None, :] @ S)[..., 0, :])
    return _finish(outs, q, S)


def _finish(outs, q, state):
    """(out [T, B, H, D], final state); T = 0: an empty out that autograd connects to q, and a copy of the
    state (no step)."""
    return (torch.stack(outs), state) if outs else (q * 0, state.clone())


def spike_attention_cumsum(q, k, v, gamma=1.0, state=None, chunk: int = 16):
    """Elementwise form vectorised over time with cumsum and gamma powers. Returns (out, final state).

    gamma == 1 (the seed): C = state + cumsum(k * v). Otherwise, in chunks of `chunk` steps:
    inside a chunk C_i = gamma^i * cumsum_j(gamma^-j x_j) (x = k * v), where the inverse powers stop at
    gamma^-(chunk-1), finite in fp32 for gamma > 0.004 (chunk 16); across chunks the carried states
    come from a [n_chunks, n_chunks] decay-masked matmul, which only holds powers <= 1.
    """
    check_spike_attention_args(q, k, v, gamma, state, "elementwise")
    T, B, H, D = q.shape
    dtype = compute_dtype(q, k, v, state, gamma)
    x = k.to(dtype) * v.to(dtype)  # [T, B, H, D]
    C0 = torch.zeros(B, H, D, dtype=dtype, device=q.device) if state is None else state.to(dtype)
    if not isinstance(gamma, torch.Tensor) and gamma == 1.0:
        C = C0 + torch.cumsum(x, dim=0)  # [T, B, H, D]
        return q.to(dtype) * C, C[-1] if T else C0.clone()
    log_g = torch.log(gamma_per_head(gamma, H, dtype, q.device))  # [H]
    n = math.ceil(T / chunk)
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 0, 0, n * chunk - T)).view(n, chunk, B, H, D)
    i = torch.arange(chunk, device=q.device, dtype=dtype)
    power = torch.exp(i[:, None] * log_g)  # [chunk, H]: gamma^i
    power = power[:, None, :, None]  # [chunk, 1, H, 1]
    local = power * torch.cumsum(x / power, dim=1)  # [n, chunk, B, H, D]: sum_{j<=i} gamma^(i-j) x_j
    # state entering chunk c: gamma^(chunk * c) C0 + sum_{m<c} gamma^(chunk (c-1-m)) local_end_m
    across = decay_matrix(chunk * log_g, n, strict=True)  # [H, n, n]
    c = torch.arange(n, device=q.device, dtype=dtype)
    entering = torch.einsum("hcm,mbhd->cbhd", across, local[:, -1]) \
        + torch.exp(chunk * c[:, None] * log_g)[:, None, :, None] * C0  # [n, B, H, D]
    C = local + (power * torch.exp(log_g)[:, None]).unsqueeze(0) * entering[:, None]  # + gamma^(i+1) entering
    C = C.view(n * chunk, B, H, D)[:T]
    return q.to(dtype) * C, C[-1] if T else C0.clone()
