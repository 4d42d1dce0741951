"""TTT-MLP in plain PyTorch: the oracle for the kernels (spec: docs/spec/ttt_mlp.md).

Layout: xq, xk, xv `[B, NH, NC, CS, F]`, lr `[B, NH, NC, CS, 1]`, token_scale `[CS]`, ln_weight/ln_bias
`[NH, F]` (or `[B, NH, F]`, one copy per batch element), state w1 `[B, NH, F, K]`, b1 `[B, NH, 1, K]`,
w2 `[B, NH, K, F]`, b2 `[B, NH, 1, F]`. Low-precision inputs are computed in fp32; fp64 stays fp64.
"""
import math
from typing import Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from tether._checks import default_token_scale
from tether._math import compute_dtype

LN_EPS = 1e-8
_GELU_C = math.sqrt(2.0 / math.pi)  # 0.79788456...

State = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (w1, b1, w2, b2)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(_GELU_C * (x + 0.044715 * x ** 3)))


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d gelu_tanh / dx, written out because the inner gradient is part of the forward."""
    t = torch.tanh(_GELU_C * (x + 0.044715 * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)


def _layer_norm(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
    """LN over the feature dim (biased variance). Returns (LN(z), xh, sigma) for the closed-form grad."""
    mu = z.mean(-1, keepdim=True)
    sigma = torch.sqrt(((z - mu) ** 2).mean(-1, keepdim=True) + LN_EPS)  # [.., CS, 1]
    xh = (z - mu) / sigma
    return gamma * xh + beta, xh, sigma


def _eta(lr: torch.Tensor, token_scale: torch.Tensor, causal: bool) -> torch.Tensor:
    """eta[i, j]: how much of token j's gradient token i reads. lr [B, NH, CS, 1] -> [B, NH, CS, CS]."""
    lr_row = lr.transpose(-1, -2)  # [B, NH, 1, CS]
    cs = lr.shape[-2]
    if not causal:
        return lr_row.expand(*lr.shape[:-2], cs, cs)
    return (token_scale.to(lr.dtype)[:, None] * lr_row).tril()


def ttt_mlp_step(xq, xk, xv, lr, ln_weight, ln_bias, state: State, *, causal: bool,
                 token_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, State]:
    """One mini-batch: xq, xk, xv [B, NH, CS, F], lr [B, NH, CS, 1], state at its start (compute dtype).

    Returns (out [B, NH, CS, F], state after the mini-batch)."""
    w1, b1, w2, b2 = state
    n_feat = xq.shape[-1]
    gamma, beta = ln_weight.unsqueeze(-2), ln_bias.unsqueeze(-2)  # [(B,) NH, 1, F]

    # inner loss and its gradient at the start state
    z1 = xk @ w1 + b1  # [B, NH, CS, K]
    x2 = gelu_tanh(z1)
    z2 = x2 @ w2 + b2  # [B, NH, CS, F]
    _, xh, sigma = _layer_norm(z2, gamma, beta)
    gxh = (gamma * xh + beta - (xv - xk)) * gamma
    g_z2 = (n_feat * gxh - gxh.sum(-1, keepdim=True) - xh * (gxh * xh).sum(-1, keepdim=True)) / (n_feat * sigma)
    g_z1 = (g_z2 @ w2.transpose(-1, -2)) * gelu_tanh_grad(z1)  # [B, NH, CS, K]

    eta = _eta(lr, token_scale, causal)  # [B, NH, CS, CS]
    last = eta[..., -1:, :].transpose(-1, -2)  # [B, NH, CS, 1]: the row that makes the next state
    next_state = (w1 - xk.transpose(-1, -2) @ (last * g_z1), b1 - (last * g_z1).sum(-2, keepdim=True),
                  w2 - x2.transpose(-1, -2) @ (last * g_z2), b2 - (last * g_z2).sum(-2, keepdim=True))

    if causal:
        # dual form: token i reads W_i = W - sum_j eta[i,j] ... without materialising W_i, since
        # xq_i W1_i + b1_i = xq_i W1 + b1 - sum_j eta[i,j] (xq_i . xk_j + 1) g_z1_j
        z1_bar = xq @ w1 + b1 - (eta * (xq @ xk.transpose(-1, -2) + 1.0)) @ g_z1
        x2_bar = gelu_tanh(z1_bar)
        z2_bar = x2_bar @ w2 + b2 - (eta * (x2_bar @ x2.transpose(-1, -2) + 1.0)) @ g_z2
    else:
        # every token reads the fully updated state
        nw1, nb1, nw2, nb2 = next_state
        z2_bar = gelu_tanh(xq @ nw1 + nb1) @ nw2 + nb2
    return xq + _layer_norm(z2_bar, gamma, beta)[0], next_state


def ttt_mlp_scan(xq, xk, xv, lr, ln_weight, ln_bias, state: State, *, causal: bool,
                 token_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, State]:
    """Scan ttt_mlp_step over the NC mini-batches of xq [B, NH, NC, CS, F]; everything in one dtype."""
    outs = []
    for c in range(xq.shape[2]):
        out, state = ttt_mlp_step(xq[:, :, c], xk[:, :, c], xv[:, :, c], lr[:, :, c], ln_weight, ln_bias,
                                  state, causal=causal, token_scale=token_scale)
        outs.append(out)
    return torch.stack(outs, dim=2), state


def ttt_mlp(xq, xk, xv, lr, ln_weight, ln_bias, w1, b1, w2, b2, *, causal: bool = False,
            token_scale: Optional[torch.Tensor] = None, checkpoint_group_size: Optional[int] = None):
    """The TTT-MLP scan. Returns (out, final (w1, b1, w2, b2), checkpoints (w1, b1, w2, b2)).

    out has xq's dtype, states w1's. Checkpoints `[B, NH, NK, ...]` are the states at the start of
    mini-batches 0, G, 2G, ... (NK = ceil(NC / G)). With checkpoint_group_size=None there is one group
    (NK = 1) and no remat; with G given, each group runs under torch.utils.checkpoint so autograd keeps
    only the group-start states and recomputes the group in the backward.
    """
    n_chunks, mini_batch = xq.shape[2], xq.shape[3]
    group = max(n_chunks, 1) if checkpoint_group_size is None else checkpoint_group_size
    if token_scale is None:
        token_scale = default_token_scale(mini_batch, xq.device)
    cdt = compute_dtype(xq, w1)
    xq_c, xk_c, xv_c, lr_c = (t.to(cdt) for t in (xq, xk, xv, lr))
    ln_w, ln_b, ts = ln_weight.to(cdt), ln_bias.to(cdt), token_scale.to(cdt)
    state = tuple(t.to(cdt) for t in (w1, b1, w2, b2))

    def run_group(start, state):
        sl = slice(start, min(start + group, n_chunks))
        out, end = ttt_mlp_scan(xq_c[:, :, sl], xk_c[:, :, sl], xv_c[:, :, sl], lr_c[:, :, sl], ln_w, ln_b,
                                state, causal=causal, token_scale=ts)
        return (out, *end)

    outs, ckpts = [], []
    for start in range(0, n_chunks, group):
        ckpts.append(state)
        if checkpoint_group_size is None:
            out, *state = run_group(start, state)
        else:
            out, *state = checkpoint(run_group, start, state, use_reentrant=False)
        outs.append(out)
        state = tuple(state)
    if not outs:  # NC = 0: no mini-batch, no checkpoint; the state comes out as it went in
        return (xq.clone(), tuple(t.clone() for t in (w1, b1, w2, b2)),
                tuple(t.new_empty(*t.shape[:2], 0, *t.shape[2:]) for t in (w1, b1, w2, b2)))
    out = torch.cat(outs, dim=2).to(xq.dtype)  # [B, NH, NC, CS, F]
    final = tuple(s.to(w1.dtype) for s in state)
    checkpoints = tuple(torch.stack(c, dim=2).to(w1.dtype) for c in zip(*ckpts))  # each [B, NH, NK, ...]
    return out, final, checkpoints
