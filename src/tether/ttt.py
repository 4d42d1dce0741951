"""Drop-in for ttt_tk (`import tether.ttt as ttt_tk`): ttt_forward / ttt_backward with ttt-tk's argument
names, order, shapes and buffer semantics (spec: docs/spec/ttt_mlp.md, non-causal TTT-MLP).

Both write their results into the caller's buffers and return None. Beyond ttt-tk: fp32/fp16/bf16
activations, any head dim F (K = 4F), any mini-batch size, NC not a multiple of the group size, CPU tensors.
"""
import torch

from tether._checks import (check_buffer, check_group_size, check_tensor, check_ttt_grads, check_ttt_inputs,
                            default_token_scale, ttt_state_shapes)
from tether.functional.ttt_mlp import backward, forward

_ACT_NAMES = ("XQ", "XK", "XV", "last_eta", "ttt_norm_weight", "ttt_norm_bias")
_INIT_NAMES = ("W1_init", "b1_init", "W2_init", "b2_init")
_CKPT_NAMES = ("W1_checkpoints", "b1_checkpoints", "W2_checkpoints", "b2_checkpoints")


def _check_group(XQ, checkpoint_group_size) -> int:
    """XQ's rank and the group size; returns the number of checkpoints NK = ceil(NC / G)."""
    check_tensor("XQ", XQ, ndim=5)
    check_group_size(checkpoint_group_size)
    return -(-XQ.shape[2] // checkpoint_group_size)


def _inputs(XQ, XK, XV, last_eta, ttt_norm_weight, ttt_norm_bias, state, names, lead=()):
    """Check ttt-tk's inputs (state: the initial state, or the checkpoints with lead = (NK,), named by
    names); returns the op's lr [B, NH, NC, CS, 1] and LN params [NH, F].

    last_eta may also come as [B, NH, NC, CS] (ttt-tk's own forward test passes it so; same memory)."""
    NH, F = XQ.shape[1], XQ.shape[4]
    if isinstance(last_eta, torch.Tensor) and last_eta.shape == XQ.shape[:4]:
        last_eta = last_eta.unsqueeze(-1)
    for name, t in (("ttt_norm_weight", ttt_norm_weight), ("ttt_norm_bias", ttt_norm_bias)):
        check_tensor(name, t, shape=(1, NH, 1, F))
    ln_weight, ln_bias = ttt_norm_weight.reshape(NH, F), ttt_norm_bias.reshape(NH, F)
    check_ttt_inputs(XQ, XK, XV, last_eta, ln_weight, ln_bias, state, names=_ACT_NAMES + tuple(names), lead=lead)
    return last_eta, ln_weight, ln_bias


def ttt_forward(XQ, XK, XV, last_eta, ttt_norm_weight, ttt_norm_bias, W1_init, b1_init, W2_init, b2_init,
                W1_checkpoints, b1_checkpoints, W2_checkpoints, b2_checkpoints, XQW_batch, checkpoint_group_size):
    """Writes the outputs into XQW_batch [B, NH, NC, CS, F] and the state at the start of every
    checkpoint_group_size-th mini-batch into W1/b1/W2/b2_checkpoints [B, NH, NK, ...]."""
    n_ckpt = _check_group(XQ, checkpoint_group_size)
    lr, ln_weight, ln_bias = _inputs(XQ, XK, XV, last_eta, ttt_norm_weight, ttt_norm_bias,
                                     (W1_init, b1_init, W2_init, b2_init), _INIT_NAMES)
    ckpts = (W1_checkpoints, b1_checkpoints, W2_checkpoints, b2_checkpoints)
    B, NH, _, _, F = XQ.shape
    for name, t, shape in zip(_CKPT_NAMES, ckpts, ttt_state_shapes(B, NH, F, (n_ckpt,))):
        check_buffer(name, t, shape, W1_init.dtype, XQ.device)
    check_buffer("XQW_batch", XQW_batch, XQ.shape, XQ.dtype, XQ.device)
    token_scale = default_token_scale(XQ.shape[3], XQ.device).to(W1_init.dtype)  # unused: non-causal
    with torch.no_grad():
        forward(XQ, XK, XV, lr, token_scale, ln_weight, ln_bias, W1_init, b1_init, W2_init, b2_init,
                causal=False, checkpoint_group_size=checkpoint_group_size, out=XQW_batch, w1_ckpt=W1_checkpoints,
                b1_ckpt=b1_checkpoints, w2_ckpt=W2_checkpoints, b2_ckpt=b2_checkpoints)


def ttt_backward(XQ, XK, XV, last_eta, ttt_norm_weight, ttt_norm_bias, W1_checkpoints, b1_checkpoints,
                 W2_checkpoints, b2_checkpoints, XQW_batch, W1_init_group, b1_init_group, W2_init_group,
                 b2_init_group, x_hat_ln_group, std_ln_group, X2_group, Z1_group, Z1_bar_group, X2_bar_group,
                 grad_l_wrt_Z2_group, grad_l_wrt_Z1_group, x_hat_fused_group, grad_x_hat_fused_group,
                 grad_output_fused_group, std_fused_group, grad_L_W1_last, grad_L_b1_last, grad_L_W2_last,
                 grad_L_b2_last, grad_L_XQW_batch, grad_L_ttt_norm_weight, grad_L_ttt_norm_bias, grad_L_W1_init,
                 grad_L_b1_init, grad_L_W2_init, grad_L_b2_init, grad_L_last_eta, grad_L_XQ, grad_L_XK, grad_L_XV,
                 checkpoint_group_size):
    """Rematerialises each group from the checkpoints and writes every grad_L_* buffer:
    grad_L_ttt_norm_weight/bias per batch element [B, NH, 1, F] (the caller sums over B).
    The *_group scratch buffers (ttt-tk's shared-memory spill) are accepted and not needed."""
    n_ckpt = _check_group(XQ, checkpoint_group_size)
    B, NH, NC, CS, F = XQ.shape
    ckpts = (W1_checkpoints, b1_checkpoints, W2_checkpoints, b2_checkpoints)
    lr, ln_weight, ln_bias = _inputs(XQ, XK, XV, last_eta, ttt_norm_weight, ttt_norm_bias, ckpts, _CKPT_NAMES,
                                     lead=(n_ckpt,))
    state_dtype, dev = W1_checkpoints.dtype, XQ.device
    grad_last = (grad_L_W1_last, grad_L_b1_last, grad_L_W2_last, grad_L_b2_last)
    check_ttt_grads(grad_L_XQW_batch, grad_last, XQ, state_dtype,
                    names=("grad_L_XQW_batch", "grad_L_W1_last", "grad_L_b1_last", "grad_L_W2_last", "grad_L_b2_last"))
    check_tensor("grad_L_XQW_batch", grad_L_XQW_batch, dtypes=(XQ.dtype,))
    state_shapes = ttt_state_shapes(B, NH, F)

    outputs = {"ln_weight": ("grad_L_ttt_norm_weight", grad_L_ttt_norm_weight, (B, NH, 1, F), ln_weight.dtype),
               "ln_bias": ("grad_L_ttt_norm_bias", grad_L_ttt_norm_bias, (B, NH, 1, F), ln_bias.dtype),
               "lr": ("grad_L_last_eta", grad_L_last_eta, last_eta.shape, last_eta.dtype),
               "xq": ("grad_L_XQ", grad_L_XQ, XQ.shape, XQ.dtype),
               "xk": ("grad_L_XK", grad_L_XK, XQ.shape, XQ.dtype),
               "xv": ("grad_L_XV", grad_L_XV, XQ.shape, XQ.dtype)}
    for key, name, t, shape in zip(("w1", "b1", "w2", "b2"), ("grad_L_W1_init", "grad_L_b1_init", "grad_L_W2_init",
                                   "grad_L_b2_init"), (grad_L_W1_init, grad_L_b1_init, grad_L_W2_init,
                                                       grad_L_b2_init), state_shapes):
        outputs[key] = (name, t, shape, state_dtype)
    # the op writes LN grads as [B, NH, F] and lr grads as [B, NH, NC, CS, 1]: views of the caller's buffers
    views = {"ln_weight": (B, NH, F), "ln_bias": (B, NH, F), "lr": lr.shape}
    grads = {}
    for key, (name, t, shape, dtype) in outputs.items():
        check_buffer(name, t, shape, dtype, dev)
        grads[key] = t.view(views[key]) if key in views else t

    token_scale = default_token_scale(CS, dev).to(state_dtype)  # unused: non-causal
    with torch.no_grad():
        backward(XQ, XK, XV, lr, token_scale, ln_weight, ln_bias, *ckpts, grad_L_XQW_batch, *grad_last,
                 causal=False, checkpoint_group_size=checkpoint_group_size, grads=grads)
