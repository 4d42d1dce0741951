"""tether.ttt (the ttt_tk drop-in) vs the reference + autograd: outputs, checkpoints, every gradient."""

import pytest
import torch
from test_ttt_reference import force_reference_path, make_inputs

import tether.ttt as ttt_tk
from tether.functional.ttt_mlp import _kernels
from tether.reference.ttt_mlp import ttt_mlp as reference
from utils import assert_close

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # rtol = atol, by input dtype


def ttt_tk_inputs(B, NH, NC, CS, F, dtype, device):
    """ttt-tk's argument layout: LN params [1, NH, 1, F]; activations in `dtype`, state fp32."""
    xq, xk, xv, lr, ln_w, ln_b, w1, b1, w2, b2 = make_inputs(B, NH, NC, CS, F, dtype=torch.float32, device=device)
    acts = [t.to(dtype) for t in (xq, xk, xv, lr)]
    return acts, ln_w.view(1, NH, 1, F), ln_b.view(1, NH, 1, F), [w1, b1, w2, b2]


def run_forward(acts, ln_w, ln_b, state, G):
    XQ = acts[0]
    B, NH, NC, CS, F = XQ.shape
    NK = -(-NC // G)
    ckpts = [torch.empty(B, NH, NK, *s.shape[2:], device=XQ.device) for s in state]  # [B, NH, NK, ...]
    out = XQ.new_empty(XQ.shape)  # contiguous even when XQ is not
    assert ttt_tk.ttt_forward(*acts, ln_w, ln_b, *state, *ckpts, out, G) is None
    return out, ckpts


def run_backward(acts, ln_w, ln_b, ckpts, out, grad_last, grad_out, G, **change):
    """ttt_backward with ttt-tk's positional order; `change` maps an argument name to a function of it."""
    XQ = acts[0]
    B, NH, NC, CS, F = XQ.shape
    K, dev, adt = 4 * F, XQ.device, XQ.dtype
    args = dict(zip(("XQ", "XK", "XV", "last_eta"), acts), ttt_norm_weight=ln_w, ttt_norm_bias=ln_b)
    args.update(zip(("W1_checkpoints", "b1_checkpoints", "W2_checkpoints", "b2_checkpoints"), ckpts))
    args["XQW_batch"] = out
    # ttt-tk's scratch for one group: states fp32, activations in the activation dtype, stds fp32
    args.update((f"{n}_init_group", torch.empty(B, NH, G, *c.shape[3:], device=dev))
                for n, c in zip(("W1", "b1", "W2", "b2"), ckpts))
    for name, n, dt in (("x_hat_ln", F, adt), ("std_ln", 1, torch.float32), ("X2", K, adt), ("Z1", K, adt),
                        ("Z1_bar", K, adt), ("X2_bar", K, adt), ("grad_l_wrt_Z2", F, adt),
                        ("grad_l_wrt_Z1", K, adt), ("x_hat_fused", F, adt), ("grad_x_hat_fused", F, adt),
                        ("grad_output_fused", F, adt), ("std_fused", 1, torch.float32)):
        args[f"{name}_group"] = torch.empty(B, NH, G, CS, n, dtype=dt, device=dev)
    args.update(zip(("grad_L_W1_last", "grad_L_b1_last", "grad_L_W2_last", "grad_L_b2_last"), grad_last))
    args["grad_L_XQW_batch"] = grad_out
    outputs = dict(grad_L_ttt_norm_weight=torch.empty(B, NH, 1, F, device=dev),  # [B, NH, 1, F] per batch elem
                   grad_L_ttt_norm_bias=torch.empty(B, NH, 1, F, device=dev))
    outputs.update((f"grad_L_{n}_init", c.new_empty(c.shape[:2] + c.shape[3:]))  # NK may be 0
                   for n, c in zip(("W1", "b1", "W2", "b2"), ckpts))
    outputs["grad_L_last_eta"] = torch.empty_like(acts[3])
    outputs.update((f"grad_L_{n}", torch.empty_like(XQ)) for n in ("XQ", "XK", "XV"))
    args.update(outputs, checkpoint_group_size=G)
    args.update({k: f(args[k]) for k, f in change.items()})
    assert ttt_tk.ttt_backward(*args.values()) is None
    return dict(zip(("ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "lr", "xq", "xk", "xv"), outputs.values()))


SHAPES = [  # (B, NH, NC, CS, F, G): G dividing NC, G not dividing NC, G > NC, one mini-batch per group, F=32
    (2, 2, 4, 4, 4, 2), (1, 2, 5, 3, 8, 2), (2, 1, 3, 4, 4, 4), (1, 1, 3, 2, 4, 1), (1, 1, 3, 2, 32, 2)]
KERNEL_SHAPES = [(1, 1, 3, 16, 16, 2), (1, 2, 4, 32, 16, 3)]
# the interpreter's tl.dot on bf16 operands is wrong, so bf16 kernels are checked on the GPU only
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def check_against_reference(path, B, NH, NC, CS, F, G, dtype):
    acts, ln_w, ln_b, state = ttt_tk_inputs(B, NH, NC, CS, F, dtype, "cuda" if torch.cuda.is_available() else "cpu")
    assert (_kernels(acts[0], state[0]) is not None) == (path == "kernel")  # the path under test runs
    out, ckpts = run_forward(acts, ln_w, ln_b, state, G)
    grad_out = torch.randn_like(out)
    grad_last = [0.1 * torch.randn_like(s) for s in state]
    grads = run_backward(acts, ln_w, ln_b, ckpts, out, grad_last, grad_out, G)

    # oracle: the reference without remat, LN params copied per batch element, plain autograd
    leaves = dict(xq=acts[0], xk=acts[1], xv=acts[2], lr=acts[3],
                  ln_weight=ln_w.view(NH, F).expand(B, NH, F), ln_bias=ln_b.view(NH, F).expand(B, NH, F),
                  w1=state[0], b1=state[1], w2=state[2], b2=state[3])
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    out_ref, final_ref, ckpt_ref = reference(*leaves.values(), checkpoint_group_size=G)
    assert_close(out, out_ref, TOL, dtype)
    for c, c_ref in zip(ckpts, ckpt_ref):
        assert_close(c, c_ref, TOL, dtype)
    g_ref = torch.autograd.grad((out_ref, *final_ref), list(leaves.values()), (grad_out, *grad_last))
    for key, g in zip(leaves, g_ref):
        got = grads[key].view(B, NH, F) if key.startswith("ln_") else grads[key]
        assert_close(got.float(), g.float(), TOL, dtype, msg=lambda m: f"grad {key}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dropin_reference_path(shape, dtype, monkeypatch):
    force_reference_path(monkeypatch)
    if torch.cuda.is_available():
        pytest.skip("the reference path is the CPU path")
    check_against_reference("reference", *shape, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
def test_dropin_kernel_path(shape, dtype):
    check_against_reference("kernel", *shape, dtype)


def test_non_contiguous_inputs_are_accepted(monkeypatch):
    force_reference_path(monkeypatch)
    acts, ln_w, ln_b, state = ttt_tk_inputs(2, 2, 3, 4, 4, torch.float32, "cpu")
    out, ckpts = run_forward(acts, ln_w, ln_b, state, 2)
    # the same values laid out transposed in memory
    acts_nc = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in acts]
    state_nc = [s.transpose(-1, -2).contiguous().transpose(-1, -2) for s in state]
    assert not acts_nc[0].is_contiguous() and not state_nc[0].is_contiguous()
    out_nc, ckpts_nc = run_forward(acts_nc, ln_w, ln_b, state_nc, 2)
    torch.testing.assert_close(out_nc, out)
    for a, b in zip(ckpts_nc, ckpts):
        torch.testing.assert_close(a, b)


def test_last_eta_without_its_trailing_unit_dim(monkeypatch):
    """ttt-tk's own forward test passes last_eta as [B, NH, NC, CS]; grad_L_last_eta then has that shape."""
    force_reference_path(monkeypatch)
    acts, ln_w, ln_b, state = ttt_tk_inputs(1, 2, 3, 4, 4, torch.float32, "cpu")
    acts_4d = acts[:3] + [acts[3].squeeze(-1)]
    out, ckpts = run_forward(acts, ln_w, ln_b, state, 2)
    out_4d, ckpts_4d = run_forward(acts_4d, ln_w, ln_b, state, 2)
    torch.testing.assert_close(out_4d, out, rtol=0, atol=0)
    grad_out, grad_last = torch.randn_like(out), [torch.randn_like(s) for s in state]
    grads = run_backward(acts, ln_w, ln_b, ckpts, out, grad_last, grad_out, 2)
    grads_4d = run_backward(acts_4d, ln_w, ln_b, ckpts_4d, out_4d, grad_last, grad_out, 2)
    assert grads_4d["lr"].shape == (1, 2, 3, 4)
    for key in grads:
        torch.testing.assert_close(grads_4d[key].view(grads[key].shape), grads[key], rtol=0, atol=0)


def forward_args(**change):
    acts, ln_w, ln_b, state = ttt_tk_inputs(1, 2, 3, 4, 4, torch.float32, "cpu")
    B, NH, NC, CS, F = acts[0].shape
    args = dict(XQ=acts[0], XK=acts[1], XV=acts[2], last_eta=acts[3], ttt_norm_weight=ln_w, ttt_norm_bias=ln_b,
                W1_init=state[0], b1_init=state[1], W2_init=state[2], b2_init=state[3],
                W1_checkpoints=torch.empty(B, NH, 2, F, 4 * F), b1_checkpoints=torch.empty(B, NH, 2, 1, 4 * F),
                W2_checkpoints=torch.empty(B, NH, 2, 4 * F, F), b2_checkpoints=torch.empty(B, NH, 2, 1, F),
                XQW_batch=torch.empty_like(acts[0]), checkpoint_group_size=2)
    args.update({k: v(args[k]) for k, v in change.items()})
    return args


@pytest.mark.parametrize("name, change, match", [
    ("XK", lambda t: t[:, :, :2], r"XK: expected shape \(1, 2, 3, 4, 4\)"),
    ("XV", lambda t: t.half(), r"XV: expected dtype in \(float32\), got float16"),
    ("last_eta", lambda t: t.to("meta"), r"last_eta: expected a tensor on cpu"),
    ("ttt_norm_weight", lambda t: t.view(2, 4), r"ttt_norm_weight: expected shape \(1, 2, 1, 4\)"),
    ("W2_init", lambda t: t.double(), r"W2_init: expected dtype in \(float32\), got float64"),
    ("b1_checkpoints", lambda t: t[:, :, :1], r"b1_checkpoints: expected shape \(1, 2, 2, 1, 16\)"),
    ("XQW_batch", lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2), r"XQW_batch: expected a contig"),
    ("W1_checkpoints", lambda t: t.to("meta"), r"W1_checkpoints: expected a tensor on cpu"),
    ("checkpoint_group_size", lambda g: 0, r"checkpoint_group_size: expected a positive int, got 0"),
])
def test_forward_bad_inputs_name_the_argument(name, change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ttt_tk.ttt_forward(**forward_args(**{name: change}))


@pytest.mark.parametrize("name, change, match", [
    ("grad_L_XK", lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2), r"grad_L_XK: expected a contig"),
    ("grad_L_ttt_norm_bias", lambda t: t.view(1, 2, 4), r"grad_L_ttt_norm_bias: expected shape \(1, 2, 1, 4\)"),
    ("grad_L_W2_init", lambda t: t.double(), r"grad_L_W2_init: expected dtype in \(float32\), got float64"),
    ("grad_L_last_eta", lambda t: t.to("meta"), r"grad_L_last_eta: expected a tensor on cpu"),
    ("grad_L_XQW_batch", lambda t: t[..., :2], r"grad_L_XQW_batch: expected shape \(1, 2, 3, 4, 4\)"),
    ("grad_L_b1_last", lambda t: t.half(), r"grad_L_b1_last: expected dtype in \(float32\), got float16"),
    ("W2_checkpoints", lambda t: t[:, :, :1], r"W2_checkpoints: expected shape \(1, 2, 2, 16, 4\)"),
])
def test_backward_bad_inputs_name_the_argument(name, change, match, monkeypatch):
    force_reference_path(monkeypatch)
    acts, ln_w, ln_b, state = ttt_tk_inputs(1, 2, 3, 4, 4, torch.float32, "cpu")
    out, ckpts = run_forward(acts, ln_w, ln_b, state, 2)
    grad_last = [torch.zeros_like(s) for s in state]
    with pytest.raises((ValueError, TypeError), match=match):
        run_backward(acts, ln_w, ln_b, ckpts, out, grad_last, torch.randn_like(out), 2, **{name: change})


@pytest.mark.parametrize("path", ["reference", "kernel"])
def test_no_mini_batch(path, monkeypatch):
    """NC = 0: an empty output, no checkpoint; the initial state's gradient is the final state's, the rest
    zero (the kernel path launches nothing)."""
    if path == "reference":
        force_reference_path(monkeypatch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    acts, ln_w, ln_b, state = ttt_tk_inputs(1, 2, 0, 16, 16, torch.float32, device)
    assert (_kernels(acts[0], state[0]) is not None) == (path == "kernel")
    out, ckpts = run_forward(acts, ln_w, ln_b, state, 2)
    assert out.shape == acts[0].shape and all(c.shape[2] == 0 for c in ckpts)
    grad_last = [torch.randn_like(s) for s in state]
    grads = run_backward(acts, ln_w, ln_b, ckpts, out, grad_last, torch.randn_like(out), 2)
    for key, g in zip(("w1", "b1", "w2", "b2"), grad_last):
        assert torch.equal(grads[key], g), key
    assert not grads["ln_weight"].any() and not grads["ln_bias"].any()
