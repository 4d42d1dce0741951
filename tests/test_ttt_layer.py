"""The autograd op tether.functional.ttt_mlp vs the reference, and tether.nn.TTTMLP: shapes, gradients to
every parameter, no leak from the future in causal mode."""
import copy
import importlib
import warnings

import pytest
import torch
from test_ttt_reference import force_reference_path, make_inputs

import tether._backend
from tether._backend import use_triton
from tether.functional.ttt_mlp import _kernels, _ttt_mlp, ttt_mlp
from tether.nn.ttt import TTTMLP
from tether.reference.ttt_mlp import default_token_scale
from tether.reference.ttt_mlp import ttt_mlp as reference

functional = importlib.import_module("tether.functional.ttt_mlp")  # the module (tether.functional.ttt_mlp is the op)


def op_vs_reference(B, NH, NC, CS, F, G, causal, dtype, tol):
    """Outputs, final state and the gradient of every input (initial state broadcast from per-head
    parameters, as the layer does) of the custom op vs the reference with plain autograd."""
    xq, xk, xv, lr, ln_w, ln_b, w1, b1, w2, b2 = make_inputs(B, NH, NC, CS, F, dtype=torch.float32,
                                                             device="cuda" if torch.cuda.is_available() else "cpu")
    params = [p[0].detach().clone().requires_grad_() for p in (w1, b1, w2, b2)]  # [NH, ...]
    leaves = [t.to(dtype).requires_grad_() for t in (xq, xk, xv, lr)] + [ln_w.requires_grad_(),
                                                                         ln_b.requires_grad_()]
    ts = (default_token_scale(CS, xq.device) + 0.1 * torch.rand(CS, device=xq.device)).requires_grad_()
    wrt = leaves + params + ([ts] if causal else [])

    def run(fn, **kw):
        state = [p.expand(B, *p.shape) for p in params]  # [B, NH, ...]
        out, final = fn(*leaves, *state, causal=causal, token_scale=ts, **kw)[:2]
        return (out, *final)

    got = run(ttt_mlp, checkpoint_group_size=G)
    want = run(reference)
    cot = [torch.randn_like(t) for t in want]
    g_got = torch.autograd.grad(got, wrt, cot)
    g_want = torch.autograd.grad(want, wrt, cot)
    for a, b in zip(got + g_got, want + g_want):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("G", [None, 2, 3])
def test_op_reference_path_matches_reference(causal, G, monkeypatch):
    force_reference_path(monkeypatch)
    if torch.cuda.is_available():
        pytest.skip("the reference path is the CPU path")
    op_vs_reference(2, 2, 5, 4, 4, G, causal, torch.float32, dict(atol=1e-5, rtol=1e-5))


@pytest.mark.parametrize("causal", [False, True])
def test_op_kernel_path_matches_reference(causal):
    x = torch.empty(1, 1, 3, 16, 16, device="cuda" if torch.cuda.is_available() else "cpu")
    assert _kernels(x, x.new_empty(1, 1, 16, 64)) is not None  # proves the kernel path is the one under test
    op_vs_reference(1, 1, 3, 16, 16, 2, causal, torch.float32, dict(atol=1e-4, rtol=1e-4))


def run_op(F, CS, dtype, device):
    """Forward and backward of the op on one tiny mini-batch (both pick the kernels or the reference)."""
    args = [t.requires_grad_() for t in make_inputs(1, 1, 1, CS, F, dtype=dtype, device=device)]
    out, _ = ttt_mlp(*args, causal=True)
    out.sum().backward()


def test_fallback_from_the_kernel_path_warns_once_per_reason(device, monkeypatch):
    """Where the kernels could run (CUDA, or the interpreter), a case they cannot take says so, once."""
    monkeypatch.setattr(tether._backend, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            run_op(40, 16, torch.float32, device)
        run_op(48, 8, torch.float32, device)
    assert [str(w.message) for w in caught if "tether.functional.ttt_mlp" in str(w.message)] == [
        "tether.functional.ttt_mlp: head dim 40 is not a multiple of 16 (kernels take 16..128); running the "
        "PyTorch reference (slow)",
        "tether.functional.ttt_mlp: mini-batch size 8 is not 16, 32 or 64; running the PyTorch reference (slow)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU paths")
def test_cpu_reference_path_and_float64_stay_silent(monkeypatch):
    monkeypatch.setattr(tether._backend, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tether.functional.ttt_mlp")
        run_op(40, 16, torch.float64, "cpu")  # gradcheck's dtype, under the interpreter
        force_reference_path(monkeypatch)
        run_op(40, 16, torch.float32, "cpu")  # the CPU path: the reference by design


class _Reached(Exception):
    pass


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_lm_head_dim_48_reaches_the_kernels(device, autocast, monkeypatch):
    """TTTMLP(384, 8), the LM's mixer (head dim 48), calls the kernel launcher, also under bf16 autocast (bf16
    tokens, fp32 learning rates and state). The spy stops at the call; the numbers are the kernel tests'."""
    from tether.kernels import ttt_mlp as kernels
    calls = []

    def spy(xq, xk, xv, lr, token_scale, ln_weight, ln_bias, w1, *args, **kwargs):
        calls.append((tuple(xq.shape), xq.dtype, lr.dtype, w1.dtype))
        raise _Reached

    monkeypatch.setattr(kernels, "ttt_mlp_fwd", spy)
    layer = TTTMLP(384, 8).to(device)
    x = torch.randn(1, 32, 384, device=device)
    with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=autocast), pytest.raises(_Reached):
        layer(x)
    tokens = torch.bfloat16 if autocast else torch.float32
    assert calls == [((1, 8, 2, 16, 48), tokens, torch.float32, torch.float32)]


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_op_registration_opcheck(layout, monkeypatch):
    """Schema, fake (meta) implementation and autograd registration agree with the real op, also for
    inputs laid out as the layer passes them (heads permuted, initial state expanded over the batch)
    (test_aot_dispatch_dynamic left out: 40 s on the CI CPU)."""
    force_reference_path(monkeypatch)
    xq, xk, xv, lr, ln_w, ln_b, w1, b1, w2, b2 = make_inputs(2, 2, 3, 2, 4, dtype=torch.float32)
    acts, state = [xq, xk, xv, lr], [w1, b1, w2, b2]
    if layout == "strided":
        acts = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in acts]  # [B, NH, NC, ..] over [B, NC, NH, ..]
        state = [s[:1].expand_as(s) for s in state]
    args = [*acts, default_token_scale(2), ln_w, ln_b, *state]
    args = [t.detach().clone() if layout == "contiguous" else t for t in args]
    args = [t.requires_grad_() if t.is_leaf else t for t in args] + [True, 2]
    result = torch.library.opcheck(_ttt_mlp._op, args, test_utils=("test_schema", "test_autograd_registration",
                                                                  "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}


@pytest.mark.parametrize("name, index, change, match", [
    ("lr", 3, lambda t: t[..., :1, :], r"lr: expected shape \(1, 2, 3, 2, 1\)"),
    ("w1", 6, lambda t: t.half(), r"w1: expected dtype in \(float32, float64\), got float16"),
    ("ln_bias", 5, lambda t: t.to("meta"), r"ln_bias: expected a tensor on cpu"),
    ("xq", 0, lambda t: t.int(), r"xq: expected dtype in"),
])
def test_op_bad_inputs_name_the_argument(name, index, change, match):
    args = make_inputs(1, 2, 3, 2, 4, dtype=torch.float32)
    args[index] = change(args[index])
    with pytest.raises((ValueError, TypeError), match=match):
        ttt_mlp(*args, causal=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [8, 11])  # a multiple of the mini-batch, and one that needs padding
def test_shapes_and_gradients_reach_every_parameter(causal, T):
    layer = TTTMLP(16, 2, mini_batch=4, causal=causal, checkpoint_group_size=2)
    x = torch.randn(2, T, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, T, 16) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert (layer.token_scale_offset is not None) == causal


def test_causal_mode_leaks_nothing_from_the_future():
    torch.manual_seed(1)
    layer = TTTMLP(16, 2, mini_batch=4, causal=True, checkpoint_group_size=2).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    y = layer(x)
    for t in (0, 2, 3, 5, 8):  # first, middle and last token of a mini-batch, and in the padded one
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        y2 = layer(x2)
        torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1], atol=1e-12, rtol=0)
        assert (y2[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-6  # the perturbation does reach later tokens
        xg = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(layer(xg)[:, t].sum(), xg)
        assert g[:, t + 1:].abs().max() == 0 and g[:, :t + 1].abs().max() > 0


def test_non_causal_padding_writes_nothing():
    """Non-causal: tokens of the last mini-batch read its full update, so padding must carry lr = 0;
    the output equals a run where the padding positions hold other values."""
    layer = TTTMLP(16, 2, mini_batch=4, causal=False).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    y = layer(x)
    # the layer on 8 tokens whose last two are random, their learning-rate logits set to -inf by hand
    x8 = torch.cat([x, torch.randn(1, 2, 16, dtype=torch.float64)], dim=1)
    layer.lr_gate.register_forward_hook(lambda mod, inp, logit: logit.index_fill(1, torch.tensor([6, 7]), -torch.inf))
    torch.testing.assert_close(layer(x8)[:, :6], y)


def test_layer_kernel_path_matches_reference_path(device, monkeypatch):
    layer = TTTMLP(32, 2, mini_batch=16, causal=True, checkpoint_group_size=2).to(device)  # head dim 16
    x = torch.randn(1, 40, 32, device=device, requires_grad=True)
    assert _kernels(x.new_empty(1, 2, 3, 16, 16), layer.w1) is not None
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    force_reference_path(monkeypatch)
    layer_ref, x_ref = copy.deepcopy(layer).cpu(), x.detach().cpu().requires_grad_()
    y_ref = layer_ref(x_ref)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x_ref, *layer_ref.parameters()])
    torch.testing.assert_close(y.cpu(), y_ref, atol=1e-4, rtol=1e-4)
    # fp32 parameter gradients are sums over every token, reduced in another order by the kernels than by the
    # reference's BLAS (which differs between CPUs): 1e-3 relative, seen at 4.4e-4 on a [16] one
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.cpu(), g_ref, atol=1e-4, rtol=1e-3)


def test_layer_gradcheck_float64():
    layer = TTTMLP(8, 2, mini_batch=2, causal=True, checkpoint_group_size=1).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


def test_bad_input_names_the_argument():
    layer = TTTMLP(16, 2, mini_batch=4)
    with pytest.raises(ValueError, match=r"x: expected last dim d_model=16, got shape \(1, 4, 8\)"):
        layer(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match=r"x: expected a 3-d tensor, got shape \(4, 16\)"):
        layer(torch.randn(4, 16))
    with pytest.raises(ValueError, match="n_heads: expected a divisor of d_model=16, got 3"):
        TTTMLP(16, 3)


@pytest.mark.parametrize("B, T", [(2, 0), (0, 5)])
def test_layer_empty_input(B, T):
    """No token (or no sequence): an empty output, zero gradients to every parameter (head dim 16,
    mini-batch 16: the kernel path where kernels run)."""
    layer = TTTMLP(32, 2, mini_batch=16, causal=True)
    x = torch.randn(B, T, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == (B, T, 32)
    grads = torch.autograd.grad(y.sum(), [x, *layer.parameters()], allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_op_refuses_head_dim_0():
    args = make_inputs(1, 2, 3, 4, 4, dtype=torch.float32)
    args = [t[..., :0] if t.dim() == 5 and t.shape[-1] == 4 else t for t in args]
    with pytest.raises(ValueError, match=r"xq: expected a head dim F >= 1"):
        ttt_mlp(*args)


def assert_compiles_like_eager(layer, x):
    """torch.compile(fullgraph=True) of layer: the same output and gradients (x and parameters) as eager."""
    y = layer(x)
    grads = torch.autograd.grad(y.sum(), [x, *layer.parameters()])
    y_c = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    grads_c = torch.autograd.grad(y_c.sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y_c, y)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g)


def test_layer_compiles_with_fullgraph(monkeypatch):
    """torch.compile traces through the custom op (fake impl with the real op's strides) in one graph."""
    force_reference_path(monkeypatch)
    layer = TTTMLP(16, 2, mini_batch=4, causal=True, checkpoint_group_size=2)
    assert_compiles_like_eager(layer, torch.randn(2, 10, 16, requires_grad=True))


def test_layer_compiles_with_fullgraph_on_the_kernels():
    """The same on the kernel path (the interpreter on a CPU): the backward is an op of its own, so AOT
    autograd does not trace into the launchers (which read data pointers)."""
    if not use_triton(torch.empty(0)) and not torch.cuda.is_available():
        pytest.skip("needs the kernels: a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = TTTMLP(32, 2, mini_batch=16, causal=True).to(device)
    assert_compiles_like_eager(layer, torch.randn(1, 32, 32, device=device, requires_grad=True))
