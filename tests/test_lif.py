"""LIF: the reference against autograd (float64 gradcheck), the fused kernels against the reference."""
import math

import pytest
import torch

import tether._backend
from tether._backend import use_triton
from tether._checks import SURROGATES
from tether.functional.lif import lif
from tether.kernels import lif as kernels
from tether.reference import lif as reference
from utils import assert_rel_close, count_launches

# relative (norm-wise) error allowed on gradients, by input dtype: fp32 is the 1e-4 target of issue 2
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Launches of the forward / backward kernels, so a test proves the kernel ran."""
    return count_launches(monkeypatch, {"forward": "tether.kernels.lif.lif_forward",
                                        "backward": "tether.kernels.lif.lif_backward"})


def make_param(form, C, device, low, high):
    """A decay / threshold in one of the spec's forms: float, 0-d tensor with grad, [C] tensor with grad."""
    if form == "float":
        return (low + high) / 2
    shape = () if form == "0d" else (C,)
    return (torch.rand(shape, device=device) * (high - low) + low).requires_grad_()


def run(fn, x, decay, threshold, v_init, grad_spikes, grad_v, **kw):
    """Forward + backward of one implementation on copies of the inputs: outputs and input gradients."""
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.requires_grad else t
              for t in (x, decay, threshold, v_init)]
    spikes, v_final = fn(*leaves, **kw)
    ((spikes.float() * grad_spikes).sum() + (v_final * grad_v).sum()).backward()
    grads = [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
    return spikes, v_final, grads


def check_kernel(device, T, rest, dtype=torch.float32, decay_form="float", threshold_form="float", **kw):
    """Kernel vs reference on fresh random inputs: spikes equal (fp32 membrane in both), v_final and grads."""
    assert use_triton(torch.empty(0, device=device))
    C = rest[-1]
    x = (torch.randn(T, *rest, device=device) * 1.5).to(dtype).requires_grad_()  # [T, *rest]
    v_init = torch.randn(rest, device=device).requires_grad_()  # [*rest]
    decay = make_param(decay_form, C, device, 0.3, 0.9)
    threshold = make_param(threshold_form, C, device, 0.5, 1.5)
    grad_spikes = torch.randn(T, *rest, device=device)  # fp32 upstream gradient, cast by autograd
    grad_v = torch.randn(rest, device=device)
    s_k, v_k, g_k = run(lif, x, decay, threshold, v_init, grad_spikes, grad_v, **kw)
    s_r, v_r, g_r = run(reference.lif, x, decay, threshold, v_init, grad_spikes, grad_v, **kw)
    assert s_k.dtype == dtype and s_k.shape == x.shape and v_k.dtype == torch.float32
    assert torch.equal(s_k, s_r), f"{(s_k != s_r).sum()} spikes differ"
    torch.testing.assert_close(v_k, v_r, rtol=1e-5, atol=1e-5)
    for name, a, e in zip(("x", "decay", "threshold", "v_init"), g_k, g_r):
        if e is not None:
            rtol = GRAD_RTOL[dtype] if name == "x" else 1e-4
            assert_rel_close(a, e, rtol, f"grad {name}")


@pytest.mark.parametrize("surrogate", tuple(SURROGATES))
@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("detach_reset", [True, False])
def test_kernel_matches_reference(device, kernel_calls, surrogate, reset, detach_reset):
    # threshold as a 0-d tensor with grad (compact save, unless the hard reset needs the membrane)
    check_kernel(device, 37, (3, 5), threshold_form="0d", surrogate=surrogate, reset=reset,
                 detach_reset=detach_reset)
    assert kernel_calls == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("decay_form,threshold_form",
                         [("float", "float"), ("0d", "0d"), ("C", "C"), ("C", "float"), ("float", "C")])
@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_kernel_parameter_forms(device, kernel_calls, decay_form, threshold_form, reset):
    check_kernel(device, 21, (2, 7), decay_form=decay_form, threshold_form=threshold_form, reset=reset,
                 alpha=3.0)
    assert kernel_calls["backward"] == 1


@pytest.mark.parametrize("T,rest", [(1, (1,)), (1, (67,)), (37, (67,)), (64, (1,)), (70, (2, 3))])
def test_kernel_odd_sizes(device, kernel_calls, T, rest):
    check_kernel(device, T, rest, decay_form="C", reset="soft", surrogate="sigmoid")
    check_kernel(device, T, rest)  # compact save: spike words complete at 32 and partial at the end
    assert kernel_calls == {"forward": 2, "backward": 2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_low_precision_input(device, dtype):
    check_kernel(device, 19, (2, 9), dtype=dtype, threshold_form="C")


def test_chunked_equals_full(device, kernel_calls):
    """Calling on consecutive chunks, carrying v, gives the same spikes and (through the state) gradients."""
    T, N = 40, 13
    x = torch.randn(T, N, device=device, requires_grad=True)  # [T, N]
    threshold = torch.tensor(0.8, device=device, requires_grad=True)
    grad_spikes = torch.randn(T, N, device=device)
    spikes, v_final = lif(x, 0.6, threshold)
    (spikes * grad_spikes).sum().backward()
    grads = x.grad.clone(), threshold.grad.clone()
    x.grad = threshold.grad = None
    v, parts = None, []
    for lo, hi in ((0, 17), (17, 18), (18, T)):
        s, v = lif(x[lo:hi], 0.6, threshold, v)
        parts.append(s)
    assert torch.equal(torch.cat(parts), spikes)
    assert torch.equal(v, v_final)
    (torch.cat(parts) * grad_spikes).sum().backward()
    torch.testing.assert_close(x.grad, grads[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(threshold.grad, grads[1], rtol=1e-6, atol=1e-6)
    assert kernel_calls == {"forward": 4, "backward": 4}


def test_saved_bytes_and_inference(device, kernel_calls, monkeypatch):
    """Default training forward saves 2.125 B/elem (uint16 sg' + spike bits); learnable decay saves fp32 h;
    a forward that needs no gradient saves and writes nothing."""
    T, N = 64, 32
    x = torch.randn(T, N, device=device, requires_grad=True)
    saves = []
    forward = kernels.lif_forward
    monkeypatch.setattr(kernels, "lif_forward", lambda *a, **kw: saves.append(kw["save"]) or forward(*a, **kw))

    def saved_bytes(decay):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            lif(x, decay, 1.0)
        return sum(total) / (T * N)

    assert saved_bytes(0.5) == 2.125
    assert saved_bytes(torch.tensor(0.5, device=device, requires_grad=True)) == 4 + 4 / (T * N)
    with torch.no_grad():
        lif(x, 0.5, 1.0)
    lif(x.detach(), 0.5, 1.0)
    assert saves == [kernels.SAVE_COMPACT, kernels.SAVE_MEMBRANE, kernels.SAVE_NONE, kernels.SAVE_NONE]


def test_reference_path_without_interpreter(monkeypatch):
    """CPU tensors without the interpreter go through the reference and compute the same function."""
    x = torch.randn(23, 2, 6)
    decay = torch.rand(6, requires_grad=True)
    kw = dict(surrogate="fast_sigmoid", reset="soft")
    grad_spikes, grad_v = torch.randn(23, 2, 6), torch.randn(2, 6)
    s_k, v_k, g_k = run(lif, x, decay, 1.0, None, grad_spikes, grad_v, **kw)
    monkeypatch.setattr(tether._backend, "interpreting", lambda: False)
    assert not use_triton(x)
    s_r, v_r, g_r = run(lif, x, decay, 1.0, None, grad_spikes, grad_v, **kw)
    assert torch.equal(s_k, s_r)
    torch.testing.assert_close(v_k, v_r)
    assert_rel_close(g_k[1], g_r[1], 1e-5, "grad decay")


def test_compile_fullgraph(device, kernel_calls):
    """The custom op traces (fake impl + registered backward) without a graph break."""
    x = torch.randn(9, 2, 4, device=device, requires_grad=True)
    threshold = torch.tensor(1.1, device=device, requires_grad=True)

    def step(x, threshold):
        spikes, v = lif(x, 0.5, threshold, surrogate="sigmoid")
        return (spikes * torch.arange(9.0, device=x.device)[:, None, None]).sum() + v.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, threshold)
    grads = torch.autograd.grad(out, (x, threshold))
    expected = step(x, threshold)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, torch.autograd.grad(expected, (x, threshold))):
        torch.testing.assert_close(g, e)
    assert kernel_calls["forward"] >= 2 and kernel_calls["backward"] >= 2


@pytest.mark.parametrize("with_v_init", [True, False])
def test_opcheck(device, with_v_init):
    x = torch.randn(5, 6, device=device)  # [T, N]
    v_init = torch.randn(6, device=device) if with_v_init else None  # None: zeros inside the kernel
    args = (x, v_init, None, None, 0.5, 1.0, "arctan", 2.0, True, 0.0, True, kernels.SAVE_COMPACT, [])
    torch.library.opcheck(torch.ops.tether.lif.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ---- the reference itself -------------------------------------------------------------------------------

@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_reference_gradcheck(reset, per_channel):
    """float64 gradcheck of v_final (with detach_reset the spikes enter v only through the detached reset,
    so the finite differences see the true derivative) w.r.t. x, v_init, decay and threshold."""
    T, rest = 6, (2, 3)
    x = torch.randn(T, *rest, dtype=torch.float64, requires_grad=True) * 1.5
    v_init = torch.randn(rest, dtype=torch.float64, requires_grad=True)
    shape = (3,) if per_channel else ()
    decay = (torch.rand(shape, dtype=torch.float64) * 0.5 + 0.3).requires_grad_()
    threshold = (torch.rand(shape, dtype=torch.float64) + 0.5).requires_grad_()

    def v_final(x, v_init, decay, threshold):
        return reference.lif(x, decay, threshold, v_init, reset=reset)[1]

    assert torch.autograd.gradcheck(v_final, (x.detach().requires_grad_(), v_init, decay, threshold))


# primitives whose derivative is the spec's sg'(u): the surrogate table checked by autograd
PRIMITIVES = {
    "arctan": lambda u, a: 0.5 + torch.atan(math.pi * a * u / 2) / math.pi,
    "sigmoid": lambda u, a: torch.sigmoid(a * u),
    "fast_sigmoid": lambda u, a: u / (1 + a * u.abs()),
}


@pytest.mark.parametrize("surrogate", tuple(SURROGATES))
def test_surrogate_spike(surrogate):
    u = torch.randn(50, dtype=torch.float64, requires_grad=True)
    alpha = SURROGATES[surrogate][0]
    (expected,) = torch.autograd.grad(PRIMITIVES[surrogate](u, alpha).sum(), u)
    spikes = reference.spike(u, surrogate)
    (grad,) = torch.autograd.grad(spikes.sum(), u)
    torch.testing.assert_close(grad, expected)
    assert torch.equal(spikes, (u >= 0).double())
    peak = SURROGATES[surrogate][1](alpha)
    torch.testing.assert_close(reference.surrogate_grad(torch.zeros(1, dtype=torch.float64), surrogate, alpha),
                               torch.full((1,), peak, dtype=torch.float64))


def test_reference_dynamics():
    """A hand-worked trace: decay 0.5, threshold 1, x = 0.6 each step (h: 0.6, 0.9, 1.05 fires, ...)."""
    x = torch.full((4, 1), 0.6)
    spikes, v = reference.lif(x, 0.5, 1.0)
    assert spikes.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(v, torch.tensor([0.6]))
    spikes, v = reference.lif(x, 0.5, 1.0, reset="soft")
    assert spikes.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(v, torch.tensor([0.625]))


# ---- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [lif, reference.lif])
@pytest.mark.parametrize("kwargs,error,words", [
    (dict(x=torch.tensor(1.0)), ValueError, ["x", "at least 1 dims", "()"]),
    (dict(x=torch.ones(4, 3, dtype=torch.int32)), TypeError, ["x", "dtype", "int32"]),
    (dict(decay=torch.full((5,), 0.5)), ValueError, ["decay", "[C]", "(5,)", "(4, 3)"]),
    (dict(threshold=torch.ones(2, 3)), ValueError, ["threshold", "[C]", "(2, 3)"]),
    (dict(decay=torch.tensor(0.5, device="meta")), ValueError, ["decay", "device", "meta"]),
    (dict(v_init=torch.zeros(3, device="meta")), ValueError, ["v_init", "device", "meta"]),
    (dict(v_init=torch.zeros(4)), ValueError, ["v_init", "shape", "(3,)", "(4,)"]),
    (dict(surrogate="relu"), ValueError, ["surrogate", "arctan", "relu"]),
    (dict(reset="zero"), ValueError, ["reset", "hard", "zero"]),
    (dict(decay="0.5"), TypeError, ["decay", "float", "str"]),
    (dict(decay=1.5), ValueError, ["decay", "[0, 1]", "1.5"]),
    (dict(decay=math.nan), ValueError, ["decay", "[0, 1]", "nan"]),
    (dict(threshold=math.inf), ValueError, ["threshold", "inf"]),
    (dict(alpha=0.0), ValueError, ["alpha", "(0, inf)", "0.0"]),
    (dict(alpha=-1.0), ValueError, ["alpha", "(0, inf)", "-1.0"]),
    (dict(v_reset=torch.zeros(3)), TypeError, ["v_reset", "float", "Tensor"]),
])
def test_bad_input(impl, kwargs, error, words):
    args = dict(x=torch.randn(4, 3), decay=0.5, threshold=1.0, v_init=None)
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("surrogate", "reset", "alpha", "v_reset") if k in args}
    with pytest.raises(error) as info:
        impl(args["x"], args["decay"], args["threshold"], args["v_init"], **extra)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("only", ["spikes", "v_final"])
def test_gradient_through_one_output_only(device, kernel_calls, only):
    """The other output's gradient is None (never materialised by autograd); the kernel treats it as zero."""
    x = torch.randn(21, 3, 9, device=device)
    grads = []
    for fn in (lif, reference.lif):
        xi = x.clone().requires_grad_()
        spikes, v_final = fn(xi, 0.5, 1.0)
        (spikes.sum() if only == "spikes" else (v_final * v_final).sum()).backward()
        grads.append(xi.grad)
    assert kernel_calls == {"forward": 1, "backward": 1}
    assert_rel_close(grads[0], grads[1], GRAD_RTOL[torch.float32], f"grad x through {only} only")


def test_float64_on_cuda_says_it_runs_the_reference(monkeypatch):
    """fp64 (gradcheck's dtype) has no kernel: on CUDA that is said once; on the CPU the reference is the path."""
    monkeypatch.setattr(tether._backend, "_WARNED", set())
    x = torch.randn(4, 3, dtype=torch.float64)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.warns(UserWarning, match="tether.functional.lif: float64 input"):
        spikes, _ = lif(x, 0.5, 1.0)
    torch.testing.assert_close(spikes, reference.lif(x, 0.5, 1.0)[0])


@pytest.mark.parametrize("impl", [lif, reference.lif])
@pytest.mark.parametrize("shape", [(0, 3), (0,), (4, 0), (3, 0, 2)], ids=str)
def test_empty_input(impl, shape):
    """No step or no neuron: empty spikes, v_final = v_init, gradient of v_init = that of v_final."""
    x = torch.randn(shape, requires_grad=True)
    v_init = torch.randn(shape[1:], requires_grad=True)
    spikes, v_final = impl(x, 0.5, 1.0, v_init)
    assert spikes.shape == x.shape and v_final.shape == v_init.shape
    torch.testing.assert_close(v_final, v_init.detach())
    (spikes.sum() + (2 * v_final).sum()).backward()
    assert x.grad.shape == x.shape and torch.equal(v_init.grad, torch.full_like(v_init, 2.0))


@pytest.mark.parametrize("save", [kernels.SAVE_COMPACT, kernels.SAVE_MEMBRANE])
@pytest.mark.parametrize("T, N", [(0, 70), (5, 0)])
def test_launchers_take_empty_inputs(device, save, T, N):
    """No launch on an empty grid or with no step (the backward with T = 0 read bits never written)."""
    x = torch.randn(T, N, device=device)
    spikes, v_final, saved, bits = kernels.lif_forward(x, None, 0.5, 1.0, surrogate=0, alpha=2.0, hard=True,
                                                       v_reset=0.0, save=save, inv_sg_peak=1.0)
    assert spikes.shape == (T, N) and torch.equal(v_final, torch.zeros(N, device=device))
    grad_v_final = torch.randn(N, device=device)
    grad_x, grad_v_init, grad_decay, grad_threshold = kernels.lif_backward(
        torch.randn(T, N, device=device), grad_v_final, saved, bits, None, 0.5, 1.0, surrogate=0, alpha=2.0,
        hard=True, v_reset=0.0, detach_reset=True, save=save, sg_peak=1.0, grad_v_init=True, grad_decay=True,
        grad_threshold=True)
    assert grad_x.shape == (T, N)
    assert torch.equal(grad_v_init, grad_v_final if T == 0 else torch.zeros(0, device=device))
    assert not grad_decay.any() and not grad_threshold.any()
