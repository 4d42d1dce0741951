"""Linear spike-driven attention: reference oracle, cumsum formulation, Triton kernels, argument checks."""
import math
import re

import pytest
import torch

from tether._backend import use_triton
from tether.functional.spike_attention import spike_attention
from tether.reference.spike_attention import spike_attention as reference
from tether.reference.spike_attention import spike_attention_cumsum
from utils import assert_close, count_launches

H = 3  # heads in every test shape


def spikes(*shape, dtype=torch.float32, device="cpu", rate=0.5):
    return (torch.rand(*shape, device=device) < rate).to(dtype)


def qkv(T, B, D, dtype=torch.float32, device="cpu"):
    return [spikes(T, B, H, D, dtype=dtype, device=device) for _ in range(3)]


# ---------------------------------------------------------------- reference
@pytest.mark.parametrize("form", ["elementwise", "matrix"])
def test_reference_gradcheck(form):
    T, B, D = 5, 2, 3
    q, k, v = [torch.rand(T, B, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    state_shape = (B, H, D) if form == "elementwise" else (B, H, D, D)
    state = torch.randn(*state_shape, dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor([0.5, 0.8, 1.0], dtype=torch.float64, requires_grad=True)

    def f(q, k, v, gamma, state):
        return reference(q, k, v, gamma, state, form=form)

    assert torch.autograd.gradcheck(f, (q, k, v, gamma, state))


@pytest.mark.parametrize("gamma", [1.0, 0.9, "per_head", 0.05])
def test_cumsum_formulation_matches_reference(gamma):
    T, B, D = 41, 2, 5  # T spans three chunks of 16, the last one partial
    q, k, v = qkv(T, B, D)
    gamma = torch.tensor([0.3, 0.9, 1.0], requires_grad=True) if gamma == "per_head" else gamma
    q, k, v = [t.requires_grad_() for t in (q, k, v)]
    state = torch.randn(B, H, D, requires_grad=True)
    out, final = spike_attention_cumsum(q, k, v, gamma, state)
    ref_out, ref_final = reference(q, k, v, gamma, state)
    assert_close(out, ref_out, 1e-5)
    assert_close(final, ref_final, 1e-5)
    inputs = [q, k, v, state] + ([gamma] if isinstance(gamma, torch.Tensor) else [])
    assert_same_grads((out, final), (ref_out, ref_final), inputs, 1e-4)


def test_matrix_form_chunked_matches_loop_reference():
    T, B, D = 70, 2, 4  # two chunks of 64, the second partial
    q, k, v = [t.requires_grad_() for t in qkv(T, B, D)]
    gamma = torch.tensor([0.6, 0.95, 1.0], requires_grad=True)
    state = torch.randn(B, H, D, D, requires_grad=True)
    out, final = spike_attention(q, k, v, gamma, state, form="matrix")
    ref_out, ref_final = reference(q, k, v, gamma, state, form="matrix")
    assert_close(out, ref_out, 1e-5)
    assert_close(final, ref_final, 1e-5)
    assert_same_grads((out, final), (ref_out, ref_final), [q, k, v, gamma, state], 1e-4)


# ---------------------------------------------------------------- Triton kernels (interpreter on CPU)
def assert_same_grads(outputs, ref_outputs, inputs, tol):
    seeds = [torch.randn_like(o) for o in outputs]
    loss = sum((o * s).sum() for o, s in zip(outputs, seeds))
    ref_loss = sum((o * s).sum() for o, s in zip(ref_outputs, seeds))
    got = torch.autograd.grad(loss, inputs)
    want = torch.autograd.grad(ref_loss, inputs)
    for x, a, b in zip(inputs, got, want):
        assert a.dtype == x.dtype and a.shape == x.shape
        assert_close(a, b, tol)


@pytest.fixture
def launches(monkeypatch):
    """Calls of the Triton launchers, to prove the kernels (not a fallback) ran."""
    return count_launches(monkeypatch, {name: f"tether.kernels.spike_attention.spike_attention_{name}"
                                        for name in ("forward", "backward")})


def test_forward_launcher_matches_reference(device):
    from tether.kernels.spike_attention import CHUNK, spike_attention_forward

    T, B, D = 2 * CHUNK + 5, 1, 40  # a partial chunk; D = 40 spans two blocks of 32, the second partial
    q, k, v = qkv(T, B, D, device=device)
    gamma = torch.tensor([0.5, 0.9, 1.0], device=device)
    state = torch.randn(B, H, D, device=device)
    out, final, entering = spike_attention_forward(torch.stack((q, k, v), 2), gamma, state)
    ref_out, ref_final = reference(q, k, v, gamma, state)
    assert_close(out, ref_out, 1e-5)
    assert_close(final, ref_final, 1e-5)
    assert entering.shape == (3, B, H, D)
    assert_close(entering[0], state, 0)
    for c in (1, 2):
        assert_close(entering[c], reference(q[:c * CHUNK], k[:c * CHUNK], v[:c * CHUNK], gamma, state)[1], 1e-5)


# spikes are exact in any float dtype and the kernels compute in fp32 (no tl.dot), so bf16 runs in the
# interpreter too; input gradients come back rounded to the input dtype
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [1.0, 0.8, "scalar_tensor", "per_head"])
def test_kernel_matches_reference(device, launches, dtype, gamma):
    T, B, D = 67, 1, 5  # odd T (three chunks of 32, the last partial) and odd D
    q, k, v = [t.requires_grad_() for t in qkv(T, B, D, dtype=dtype, device=device)]
    assert use_triton(q)
    if gamma == "scalar_tensor":
        gamma = torch.tensor(0.7, device=device, requires_grad=True)
    elif gamma == "per_head":
        gamma = torch.tensor([0.5, 0.9, 1.0], device=device, requires_grad=True)
    state = torch.randn(B, H, D, device=device, requires_grad=True)
    out, final = spike_attention(q, k, v, gamma, state)
    ref_out, ref_final = reference(q, k, v, gamma, state)
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    assert_close(out, ref_out, 1e-5)
    assert_close(final, ref_final, 1e-5)
    inputs = [q, k, v, state] + ([gamma] if isinstance(gamma, torch.Tensor) else [])
    assert_same_grads((out, final), (ref_out, ref_final), inputs, TOL[dtype])
    assert launches == {"forward": 1, "backward": 1}


def test_chunked_and_token_by_token_match_full(device, launches):
    T, B, D = 37, 1, 4  # the full sequence spans two chunks of 32
    q, k, v = [t.requires_grad_() for t in qkv(T, B, D, device=device)]
    gamma = torch.tensor([0.5, 0.9, 1.0], device=device, requires_grad=True)
    state = torch.randn(B, H, D, device=device, requires_grad=True)

    def run(bounds):
        outs, carried = [], state
        for start, stop in zip(bounds[:-1], bounds[1:]):
            out, carried = spike_attention(q[start:stop], k[start:stop], v[start:stop], gamma, carried)
            outs.append(out)
        return torch.cat(outs), carried

    tokens = 12  # one token at a time over a prefix: the interpreter is slow
    for bounds in ([0, 9, 10, T], list(range(tokens + 1))):  # chunks with the state carried; token by token
        full, split = run([0, bounds[-1]]), run(bounds)
        assert_close(split[0], full[0], 1e-5)
        assert_close(split[1], full[1], 1e-5)
        assert_same_grads(split, full, [q, k, v, gamma, state], 1e-4)
    assert launches["forward"] == 2 + 3 + tokens


def test_custom_op_registration(device):
    """Schema, fake impl and autograd registration (torch.library.opcheck), and torch.compile fullgraph."""
    from tether.functional.spike_attention import _elementwise

    T, B, D = 9, 1, 4
    q, k, v = [t.requires_grad_() for t in qkv(T, B, D, device=device)]
    gamma = torch.tensor([0.5, 0.9, 1.0], device=device, requires_grad=True)
    state = torch.randn(B, H, D, device=device, requires_grad=True)
    packed = torch.stack((q, k, v), 2).detach().requires_grad_()  # [T, B, 3, H, D], the op's layout
    for binary_parts in (0, 2, 3):  # nothing, q and k, all three kept as bits
        torch.library.opcheck(_elementwise._op, (packed, gamma, state, binary_parts, False),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))

    compiled = torch.compile(spike_attention, fullgraph=True, backend="aot_eager")
    out, final = compiled(q, k, v, gamma, state)
    ref_out, ref_final = reference(q, k, v, gamma, state)
    assert_close(out, ref_out, 1e-5)
    assert_same_grads((out, final), (ref_out, ref_final), [q, k, v, gamma, state], 1e-4)


@pytest.mark.parametrize("binary", [False, True, "qk"])
def test_packed_qkv_is_the_same_op(device, binary):
    """spike_attention_qkv on the packed [T, B, 3, H, D] tensor == spike_attention on its three views, outputs
    and gradients (the gradient of the packed input comes back packed); binary: the same numbers from qkv (or q
    and k, with a real v) kept as bits, eager and compiled."""
    from tether.functional import spike_attention_qkv

    T, B, D = 2 * 32 + 3, 2, 8
    q, k, v = qkv(T, B, D, device=device)
    if binary == "qk":
        v = torch.randn_like(v)
    packed = torch.stack((q, k, v), 2).requires_grad_()
    gamma = torch.tensor([0.5, 0.9, 1.0], device=device, requires_grad=True)
    state = torch.randn(B, H, D, device=device, requires_grad=True)
    compiled = torch.compile(spike_attention_qkv, fullgraph=True, backend="aot_eager")
    for op in (spike_attention_qkv, compiled):
        ref_out, ref_final = reference(*packed.unbind(2), gamma, state)
        out, final = op(packed, gamma, state, binary=binary)
        assert_close(out, ref_out, 1e-5)
        assert_close(final, ref_final, 1e-5)
        assert_same_grads((out, final), (ref_out, ref_final), [packed, gamma, state], 1e-4)
    with pytest.raises(ValueError, match=r"qkv: expected a \[T, B, 3, H, D\] tensor"):
        spike_attention_qkv(q, gamma, state)
    with pytest.raises(ValueError, match="binary: expected True, False or 'qk', got 1"):
        spike_attention_qkv(packed, gamma, state, binary=1)


def test_binary_qkv_is_saved_as_bits(device):
    """binary=True on the kernels' path: the backward keeps qkv as uint8 bits, no float copy of it; binary="qk":
    q and k as bits, a copy of v alone."""
    from tether.functional import spike_attention_qkv

    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("the CPU path keeps qkv as it is")
    T, B, D = 40, 2, 8
    packed = torch.stack(qkv(T, B, D, device=device), 2).to(torch.bfloat16).requires_grad_()
    gamma = torch.tensor([0.5, 0.9, 1.0], device=device, requires_grad=True)
    n = packed.numel()
    for binary, kept in ((False, [(torch.bfloat16, n)]), (True, [(torch.uint8, n // 8)]),
                         ("qk", [(torch.uint8, n * 2 // 3 // 8), (torch.bfloat16, n // 3)])):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            spike_attention_qkv(packed, gamma, binary=binary)
        big = [t for t in saved if t.numel() >= T * B * 2 * H * D // 8]  # qkv-sized, not the [H] or chunk states
        assert [(t.dtype, t.numel()) for t in big] == kept


def test_reference_path_without_interpreter(monkeypatch, launches):
    import tether._backend

    monkeypatch.setattr(tether._backend, "interpreting", lambda: False)
    T, B, D = 21, 2, 3
    q, k, v = [t.requires_grad_() for t in qkv(T, B, D)]
    assert not use_triton(q)
    gamma = torch.tensor([0.5, 0.9, 1.0], requires_grad=True)
    state = torch.randn(B, H, D, requires_grad=True)
    out, final = spike_attention(q, k, v, gamma, state)
    ref_out, ref_final = reference(q, k, v, gamma, state)
    assert_close(out, ref_out, 1e-5)
    assert_same_grads((out, final), (ref_out, ref_final), [q, k, v, gamma, state], 1e-4)
    assert launches == {"forward": 0, "backward": 0}


# ---------------------------------------------------------------- argument checks
def _bad_inputs():
    q = spikes(4, 2, H, 5)
    good = dict(q=q, k=q.clone(), v=q.clone(), gamma=1.0, state=None, form="elementwise")
    return [
        (dict(good, q=q[0]), ValueError, "q: expected a 4-d tensor"),
        (dict(good, k=q[:, :1]), ValueError, "k: expected shape"),
        (dict(good, v=q.long()), TypeError, "v: expected dtype"),
        (dict(good, q=q.long(), k=q.long(), v=q.long()), TypeError, "q: expected dtype"),
        (dict(good, k=q.to("meta")), ValueError, "k: expected a tensor on cpu"),
        (dict(good, gamma=torch.ones(H + 1)), ValueError, "gamma: expected a float, a 0-d tensor or a tensor of shape"),
        (dict(good, gamma=1.5), ValueError, "gamma: expected a decay in (0, 1], got 1.5"),
        (dict(good, gamma="0.5"), TypeError, "gamma: expected a float or a tensor, got str"),
        (dict(good, gamma=torch.tensor(0.0)), ValueError, "gamma: expected finite values > 0, got [0.0]"),
        (dict(good, gamma=torch.tensor([0.5, -0.5, 1.0])), ValueError, "gamma: expected finite values > 0, got [-0.5]"),
        (dict(good, gamma=torch.tensor(math.nan)), ValueError, "gamma: expected finite values > 0, got [nan]"),
        (dict(good, q=q[..., :0], k=q[..., :0], v=q[..., :0]), ValueError, "q: expected a head dim D >= 1"),
        (dict(good, q=q[..., :0], k=q[..., :0], v=q[..., :0], form="matrix"), ValueError,
         "q: expected a head dim D >= 1"),
        (dict(good, state=torch.zeros(2, H, 5, 5)), ValueError, "state: expected shape (2, 3, 5)"),
        (dict(good, state=torch.zeros(2, H, 5), form="matrix"), ValueError, "state: expected shape (2, 3, 5, 5)"),
        (dict(good, form="softmax"), ValueError, "form: expected one of"),
    ]


@pytest.mark.parametrize("kwargs,error,message", _bad_inputs())
@pytest.mark.parametrize("impl", ["functional", "reference"])
def test_bad_inputs(kwargs, error, message, impl):
    fn = spike_attention if impl == "functional" else reference
    kwargs = dict(kwargs)
    with pytest.raises(error, match=re.escape(message)):
        fn(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


@pytest.mark.parametrize("only", ["out", "state"])
def test_gradient_through_one_output_only(device, launches, only):
    """The other output's gradient is None (never materialised by autograd); the kernel treats it as zero."""
    inputs = qkv(37, 2, 6, device=device)
    grads = []
    for fn in (spike_attention, reference):
        q, k, v = [t.clone().requires_grad_() for t in inputs]
        out, state = fn(q, k, v, 0.9)
        (out.square().sum() if only == "out" else state.square().sum()).backward()
        grads.append([torch.zeros_like(t) if t.grad is None else t.grad for t in (q, k, v)])  # q: no path to state
    assert launches == {"forward": 1, "backward": 1}
    for got, want in zip(*grads):
        assert_close(got, want, 1e-4)


# the cumsum formulation is the elementwise form only
@pytest.mark.parametrize("impl, form", [("functional", "elementwise"), ("functional", "matrix"),
                                        ("reference", "elementwise"), ("reference", "matrix"),
                                        ("cumsum", "elementwise")])
@pytest.mark.parametrize("shape", [(0, 2, H, 4), (5, 0, H, 4), (5, 2, 0, 4)], ids=str)
def test_empty_input(device, shape, impl, form):
    """No step, batch or head: an empty out, the state as it came, the state's gradient = the final one's."""
    fn = {"functional": spike_attention, "reference": reference}[impl] if impl != "cumsum" else None
    T, B, heads, D = shape
    q, k, v = (spikes(*shape, device=device).requires_grad_() for _ in range(3))
    state = torch.randn((B, heads, D) if form == "elementwise" else (B, heads, D, D), device=device,
                        requires_grad=True)
    gamma = torch.full((heads,), 0.9, device=device, requires_grad=True)
    out, final = (spike_attention_cumsum(q, k, v, gamma, state) if fn is None else
                  fn(q, k, v, gamma, state, form=form))
    assert out.shape == shape and final.shape == state.shape
    (out.sum() + (2 * final).sum()).backward()
    if T == 0:
        torch.testing.assert_close(final, state.detach())
        assert torch.equal(state.grad, torch.full_like(state, 2.0))
    assert gamma.grad is None or not gamma.grad.any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_output_scale_matches_the_plain_product(dtype):
    """output_scale saves only the product (in dtype), yet gives the plain expression's value and gradients."""
    from tether.functional.spike_attention import output_scale

    torch.manual_seed(0)
    in_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.rand(5, 2, 3, 4, dtype=in_dtype, requires_grad=True)
    gamma = torch.rand(3, dtype=in_dtype).mul(0.9).add(0.05).requires_grad_()
    grad = torch.randn(5, 2, 3, 4, dtype=dtype)
    got = output_scale(out, gamma, dtype)
    got_grads = torch.autograd.grad(got, (out, gamma), grad)
    assert got.dtype == dtype and torch.equal(got, (out * (1 - gamma)[:, None]).to(dtype))
    out64, gamma64 = out.detach().double().requires_grad_(), gamma.detach().double().requires_grad_()
    want_grads = torch.autograd.grad(out64 * (1 - gamma64)[:, None], (out64, gamma64), grad.double())
    assert [g.dtype for g in got_grads] == [in_dtype, in_dtype]
    if dtype == torch.float64:
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    else:  # dgamma is summed from the product rounded to bf16: at most 2^-8 of each term
        torch.testing.assert_close(got_grads[0].double(), want_grads[0], rtol=1e-6, atol=1e-6)
        bound = 2.0 ** -8 * (grad.double() * out64).abs().sum(dim=(0, 1, 3)) + 1e-6
        assert ((got_grads[1].double() - want_grads[1]).abs() <= bound).all()


def test_output_scale_bad_shapes_are_named():
    from tether.functional.spike_attention import output_scale

    with pytest.raises(ValueError, match="out, gamma: expected"):
        output_scale(torch.zeros(2, 1, 3, 4), torch.zeros(2))
