"""TTT-MLP as an autograd op with rematerialisation built in (spec: docs/spec/ttt_mlp.md).

`forward` / `backward` pick the Triton kernels (tether.kernels.ttt_mlp) or the reference; the drop-in
`tether.ttt` and the op `tether::ttt_mlp` (tether.functional._op) both go through them, so the choice is made
here only. The op saves its inputs and the group-start checkpoints; the backward recomputes each group.
"""
from typing import NamedTuple, Optional

import torch

from tether._backend import use_triton, warn_fallback
from tether._checks import check_group_size, check_ttt_inputs, default_token_scale
from tether._math import compute_dtype
from tether.functional._op import Op
from tether.reference.ttt_mlp import ttt_mlp as reference_ttt_mlp, ttt_mlp_scan

GRAD_KEYS = ("xq", "xk", "xv", "lr", "token_scale", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2")


def _kernels(xq: torch.Tensor, state: torch.Tensor):
    """The Triton launcher module when it handles this case, else None (-> reference).
    On the CPU without the Triton interpreter the reference is the path by design: silent. Where the kernels
    could run (CUDA, or the interpreter), a case they cannot take is warned about once per reason, except
    fp64 on the CPU (gradcheck runs on the reference)."""
    if not use_triton(xq):
        return None
    # imported on first use: triton is only a dependency on Linux, the CPU path needs none
    from tether.kernels import ttt_mlp as kernels
    reason = kernels.unsupported(xq.shape[-1], xq.shape[-2], xq.dtype, state.dtype)
    if reason is None:
        return kernels
    fp64_on_cpu = not xq.is_cuda and torch.float64 in (xq.dtype, state.dtype)
    if not fp64_on_cpu:
        warn_fallback("ttt_mlp", reason)
    return None


def forward(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1, b1, w2, b2, *, causal: bool,
            checkpoint_group_size: int, out=None, w1_ckpt=None, b1_ckpt=None, w2_ckpt=None, b2_ckpt=None):
    """Same contract as tether.kernels.ttt_mlp.ttt_mlp_fwd: returns (out, checkpoints, final state)."""
    args = [t.contiguous() for t in (xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1, b1, w2, b2)]
    kernels = _kernels(xq, w1)
    if kernels is not None:
        return kernels.ttt_mlp_fwd(*args, causal=causal, checkpoint_group_size=checkpoint_group_size, out=out,
                                   w1_ckpt=w1_ckpt, b1_ckpt=b1_ckpt, w2_ckpt=w2_ckpt, b2_ckpt=b2_ckpt)
    xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1, b1, w2, b2 = args
    with torch.no_grad():
        o, final, ckpts = reference_ttt_mlp(xq, xk, xv, lr, ln_weight, ln_bias, w1, b1, w2, b2, causal=causal,
                                            token_scale=token_scale, checkpoint_group_size=checkpoint_group_size)
    # the reference allocates its own results: copy them into the caller's buffers where given
    o = o if out is None else out.copy_(o)
    ckpts = tuple(c if buf is None else buf.copy_(c) for c, buf in zip(ckpts, (w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt)))
    return o, ckpts, final


def backward(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt, grad_out,
             grad_w1_last, grad_b1_last, grad_w2_last, grad_b2_last, *, causal: bool, checkpoint_group_size: int,
             grads: Optional[dict] = None) -> dict:
    """Same contract as tether.kernels.ttt_mlp.ttt_mlp_bwd: a dict of gradients keyed like GRAD_KEYS,
    ln_weight/ln_bias per batch element [B, NH, F], token_scale [CS] (None when not causal)."""
    args = [t.contiguous() for t in (xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1_ckpt, b1_ckpt, w2_ckpt,
                                     b2_ckpt, grad_out, grad_w1_last, grad_b1_last, grad_w2_last, grad_b2_last)]
    kernels = _kernels(xq, w1_ckpt)
    if kernels is not None:
        return kernels.ttt_mlp_bwd(*args, causal=causal, checkpoint_group_size=checkpoint_group_size, grads=grads)
    result = _reference_backward(*args, causal=causal, group=checkpoint_group_size)
    if grads is not None:
        for key, buf in grads.items():
            buf.copy_(result[key])
        result.update(grads)
    return result


def _reference_backward(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt,
                        grad_out, gw1_last, gb1_last, gw2_last, gb2_last, *, causal: bool, group: int) -> dict:
    """Reverse scan over groups: recompute a group from its checkpoint with the reference and take its
    gradients with autograd, carrying the state gradient into the previous group (one group's graph alive)."""
    B, NH, NC, CS, F = xq.shape
    cdt = compute_dtype(xq, w1_ckpt)
    # one LN copy per batch element, so its gradient comes out per batch element like the kernel's
    ln_w = ln_weight.detach().to(cdt).expand(B, NH, F).clone().requires_grad_()  # [B, NH, F]
    ln_b = ln_bias.detach().to(cdt).expand(B, NH, F).clone().requires_grad_()
    ts = token_scale.detach().to(cdt).requires_grad_()  # [CS]
    acts = (xq, xk, xv, lr)
    g_acts = [torch.empty_like(t) for t in acts]
    g_ln_w, g_ln_b, g_ts = torch.zeros_like(ln_w), torch.zeros_like(ln_b), torch.zeros_like(ts)
    g_state = [g.to(cdt) for g in (gw1_last, gb1_last, gw2_last, gb2_last)]
    for k in reversed(range(w1_ckpt.shape[2])):
        sl = slice(k * group, min(NC, (k + 1) * group))
        leaves = [t[:, :, sl].detach().to(cdt).requires_grad_() for t in acts]
        state = [c[:, :, k].detach().to(cdt).requires_grad_() for c in (w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt)]
        with torch.enable_grad():
            out, end = ttt_mlp_scan(*leaves, ln_w, ln_b, tuple(state), causal=causal, token_scale=ts)
            wrt = [*leaves, ln_w, ln_b, *state] + ([ts] if causal else [])
            g = torch.autograd.grad((out, *end), wrt, (grad_out[:, :, sl].to(cdt), *g_state))
        for buf, gi in zip(g_acts, g[:4]):
            buf[:, :, sl] = gi
        g_ln_w += g[4]
        g_ln_b += g[5]
        g_state = list(g[6:10])
        if causal:
            g_ts += g[10]
    g_ts = g_ts.to(token_scale.dtype) if causal else None
    return dict(zip(GRAD_KEYS, (*g_acts, g_ts, g_ln_w.to(ln_weight.dtype), g_ln_b.to(ln_bias.dtype),
                                *(s.to(w1_ckpt.dtype) for s in g_state))))


class _Config(NamedTuple):
    causal: bool
    checkpoint_group_size: int


def _forward(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1, b1, w2, b2, cfg: _Config):
    """-> (out, w1, b1, w2, b2 final, w1, b1, w2, b2 checkpoints)."""
    out, ckpts, final = forward(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1, b1, w2, b2, causal=cfg.causal,
                                checkpoint_group_size=cfg.checkpoint_group_size)
    return (out, *final, *ckpts)


def _fake_forward(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1, b1, w2, b2, cfg: _Config):
    B, NH, NC = xq.shape[:3]
    n_ckpt = -(-NC // cfg.checkpoint_group_size)
    ckpts = [s.new_empty(B, NH, n_ckpt, *s.shape[2:]) for s in (w1, b1, w2, b2)]  # [B, NH, NK, ...]
    # new_empty, not empty_like: the real op returns contiguous tensors whatever the inputs' strides
    return (xq.new_empty(xq.shape), *(s.new_empty(s.shape) for s in (w1, b1, w2, b2)), *ckpts)


def _save(ctx, tensors, cfg: _Config, outputs):
    xq, xk, xv, lr, token_scale, ln_weight, ln_bias = tensors[:7]
    ctx.save_for_backward(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, *outputs[5:])
    ctx.cfg = cfg


def _grad_specs(xq, lr, token_scale, ln_weight, w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt, causal):
    """(shape, dtype) of each gradient the backward op returns, in GRAD_KEYS order: the inputs' own, LN
    parameters per batch element [B, NH, F], token_scale [CS] or [0] when not causal, states without the
    checkpoint axis."""
    B, NH, F = xq.shape[0], xq.shape[1], xq.shape[-1]
    states = [(c.shape[:2] + c.shape[3:], c.dtype) for c in (w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt)]
    return [(xq.shape, xq.dtype)] * 3 + [(lr.shape, lr.dtype), (token_scale.shape if causal else (0,),
                                                                 token_scale.dtype)] + \
        [((B, NH, F), ln_weight.dtype)] * 2 + states


def _backward(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt, grad_out,
              gw1, gb1, gw2, gb2, cfg: _Config):
    """The launchers' backward (an op of its own while tracing: AOT autograd traces the registered backward,
    and must not trace into the launchers, which read data pointers) -> the gradients in GRAD_KEYS order."""
    g = backward(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt, grad_out,
                 gw1, gb1, gw2, gb2, causal=cfg.causal, checkpoint_group_size=cfg.checkpoint_group_size)
    specs = _grad_specs(xq, lr, token_scale, ln_weight, w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt, cfg.causal)
    return tuple(xq.new_empty(shape, dtype=dtype) if g[key] is None else g[key].to(dtype).contiguous()
                 for key, (shape, dtype) in zip(GRAD_KEYS, specs))


def _fake_backward(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt, grad_out,
                   gw1, gb1, gw2, gb2, cfg: _Config):
    specs = _grad_specs(xq, lr, token_scale, ln_weight, w1_ckpt, b1_ckpt, w2_ckpt, b2_ckpt, cfg.causal)
    return tuple(xq.new_empty(shape, dtype=dtype) for shape, dtype in specs)


def _grads(ctx, grad_outputs, needs, run_backward):
    # the checkpoints are internal (not returned by tether.functional.ttt_mlp): their gradients are unused
    xq, xk, xv, lr, token_scale, ln_weight, ln_bias, *ckpts = ctx.saved_tensors
    args = (xq, xk, xv, lr, token_scale, ln_weight, ln_bias, *ckpts, *grad_outputs[:5])
    if _kernels(xq, ckpts[0]) is not None:  # the launchers
        g = dict(zip(GRAD_KEYS, run_backward(*args, ctx.cfg)))
    else:  # the reference takes autograd inside, which an op's body has not: plain (traceable) PyTorch
        g = backward(*args, causal=ctx.cfg.causal, checkpoint_group_size=ctx.cfg.checkpoint_group_size)
    return (g["xq"], g["xk"], g["xv"], g["lr"], g["token_scale"] if ctx.cfg.causal else None,
            g["ln_weight"].sum(0), g["ln_bias"].sum(0), g["w1"], g["b1"], g["w2"], g["b2"])


_TENSORS = "Tensor xq, Tensor xk, Tensor xv, Tensor lr, Tensor token_scale, Tensor ln_weight, Tensor ln_bias"
_ttt_mlp = Op("tether::ttt_mlp", tensors=_TENSORS + ", Tensor w1, Tensor b1, Tensor w2, Tensor b2", config=_Config,
              returns=9, outputs=5, forward=_forward, fake=_fake_forward, save=_save, grads=_grads,
              backward=_backward, fake_backward=_fake_backward, materialize_grads=True,
              backward_tensors=_TENSORS + ", Tensor w1_ckpt, Tensor b1_ckpt, Tensor w2_ckpt, Tensor b2_ckpt, "
                                          "Tensor grad_out, Tensor gw1, Tensor gb1, Tensor gw2, Tensor gb2",
              backward_config=_Config, backward_returns=11)


def ttt_mlp(xq, xk, xv, lr, ln_weight, ln_bias, w1, b1, w2, b2, *, causal: bool = False,
            token_scale: Optional[torch.Tensor] = None, checkpoint_group_size: Optional[int] = None):
    """TTT-MLP scan over xq, xk, xv [B, NH, NC, CS, F] with per-token learning rates lr [B, NH, NC, CS, 1],
    LN params [NH, F] and initial state w1 [B, NH, F, K], b1 [B, NH, 1, K], w2 [B, NH, K, F], b2 [B, NH, 1, F].

    causal: token i reads only the updates of tokens <= i, scaled by token_scale[i] (default 1/(i+1)).
    checkpoint_group_size: mini-batches per remat group (default: the whole sequence is one group).
    Returns (out [B, NH, NC, CS, F], final state (w1, b1, w2, b2)); differentiable w.r.t. every tensor.
    Arguments are checked by tether._checks.check_ttt_inputs. B, NH or NC = 0: empty out, the final state is
    the initial one (NC = 0), zero gradients; F = 0 or CS = 0 is refused.
    """
    check_ttt_inputs(xq, xk, xv, lr, ln_weight, ln_bias, (w1, b1, w2, b2), token_scale)
    n_chunks = xq.shape[2]
    group = max(n_chunks, 1) if checkpoint_group_size is None else checkpoint_group_size
    check_group_size(group)
    if token_scale is None:
        token_scale = default_token_scale(xq.shape[3], xq.device).to(w1.dtype)
    out, w1f, b1f, w2f, b2f = _ttt_mlp(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1, b1, w2, b2,
                                       cfg=_Config(causal, group))
    return out, (w1f, b1f, w2f, b2f)
