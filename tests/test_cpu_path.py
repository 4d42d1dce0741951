"""The CPU paths (tether.functional._cpu: one autograd node per call) against the references, in float32 and
float64, and torch.autograd.gradcheck in float64; and that the CPU training path never runs Triton."""
import itertools

import pytest
import torch

from tether.functional import _cpu
from tether.reference import lif as lif_reference
from tether.reference import spike_attention as attention_reference

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _leaves(tensors, dtype):
    """Fresh leaf copies in dtype; None and floats pass through."""
    return [t.detach().to(dtype).requires_grad_() if isinstance(t, torch.Tensor) else t for t in tensors]


def _outputs_and_grads(fn, inputs, out_grads):
    outs = fn(*inputs)
    torch.autograd.backward([o for o, g in zip(outs, out_grads) if g is not None],
                            [g for g in out_grads if g is not None])
    return [o.detach() for o in outs], [t.grad if isinstance(t, torch.Tensor) else None for t in inputs]


def _assert_same(fn, ref, inputs, out_grads, dtype):
    outs, grads = _outputs_and_grads(fn, _leaves(inputs, dtype), out_grads)
    ref_outs, ref_grads = _outputs_and_grads(ref, _leaves(inputs, dtype), out_grads)
    for name, a, b in itertools.chain(zip(("out", "state"), outs, ref_outs),
                                      zip(("grad %d" % i for i in range(len(grads))), grads, ref_grads)):
        if b is None:  # autograd found no path (e.g. threshold -> v_final with a detached reset): zero
            assert a is None or not a.any(), name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOLERANCE[dtype], msg=name)


def _param(form, C, low, high):
    if form == "float":
        return (low + high) / 2
    return torch.rand(() if form == "0d" else (C,)) * (high - low) + low


LIF_CASES = [  # (reset, v_reset, detach_reset, decay form, threshold form, surrogate)
    ("hard", 0.0, True, "float", "float", "arctan"),  # the model's neuron
    ("hard", 0.0, True, "0d", "channel", "arctan"),
    ("hard", 0.3, True, "channel", "0d", "sigmoid"),
    ("hard", 0.0, False, "float", "channel", "fast_sigmoid"),
    ("hard", -0.2, False, "channel", "channel", "arctan"),
    ("soft", 0.0, True, "0d", "float", "arctan"),
    ("soft", 0.0, False, "channel", "channel", "sigmoid"),
]


def _lif_pair(reset, v_reset, detach_reset, surrogate):
    cfg = _cpu.LIFConfig(*lif_reference.resolve_surrogate(surrogate, None), reset == "hard", v_reset, detach_reset)

    def fast(x, decay, threshold, v_init):
        return _cpu.lif(x, decay, threshold, v_init, cfg)

    def ref(x, decay, threshold, v_init):
        return lif_reference.lif(x, decay, threshold, v_init, surrogate=surrogate, reset=reset, v_reset=v_reset,
                                 detach_reset=detach_reset)
    return fast, ref


def _lif_inputs(T, rest, decay_form, threshold_form, v_init=True):
    C = rest[-1]
    x = torch.randn(T, *rest) * 1.5 + 0.5  # [T, *rest]: fires often, resets often
    return [x, _param(decay_form, C, 0.3, 0.9), _param(threshold_form, C, 0.8, 1.2),
            torch.randn(rest) * 0.5 if v_init else None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reset,v_reset,detach_reset,decay_form,threshold_form,surrogate", LIF_CASES)
def test_lif_matches_reference(dtype, reset, v_reset, detach_reset, decay_form, threshold_form, surrogate):
    fast, ref = _lif_pair(reset, v_reset, detach_reset, surrogate)
    T, rest = 37, (3, 11)
    inputs = _lif_inputs(T, rest, decay_form, threshold_form)
    out_grads = [torch.randn(T, *rest, dtype=dtype), torch.randn(rest, dtype=dtype)]
    _assert_same(fast, ref, inputs, out_grads, dtype)


@pytest.mark.parametrize("which", ["spikes", "v_final"])
def test_lif_one_output_used(which):
    fast, ref = _lif_pair("hard", 0.0, True, "arctan")
    inputs = _lif_inputs(9, (4, 6), "0d", "channel", v_init=False)
    grads = [torch.randn(9, 4, 6), None] if which == "spikes" else [None, torch.randn(4, 6)]
    _assert_same(fast, ref, inputs, grads, torch.float32)


def test_lif_no_grad_and_low_precision_input():
    fast, ref = _lif_pair("hard", 0.0, True, "arctan")
    x = torch.randn(20, 2, 8).to(torch.bfloat16)
    with torch.no_grad():
        spikes, v_final = fast(x, 0.5, 1.0, None)
        ref_spikes, ref_v = ref(x, 0.5, 1.0, None)
    assert spikes.dtype == torch.bfloat16 and v_final.dtype == torch.float32
    assert torch.equal(spikes, ref_spikes) and torch.equal(v_final, ref_v)


def test_lif_chunks_carry_the_state():
    """Whole sequence == two chunks with the membrane carried (spikes bit-exact in fp32)."""
    fast, _ = _lif_pair("hard", 0.0, True, "arctan")
    x = torch.randn(30, 2, 5) + 0.5
    spikes, v_final = fast(x, 0.5, 1.0, None)
    first, v_mid = fast(x[:13], 0.5, 1.0, None)
    second, v_end = fast(x[13:], 0.5, 1.0, v_mid)
    assert torch.equal(spikes, torch.cat((first, second))) and torch.equal(v_final, v_end)


@pytest.mark.parametrize("reset,v_reset,detach_reset,decay_form,threshold_form,surrogate",
                         [case for case in LIF_CASES if case[2]])
def test_lif_gradcheck(reset, v_reset, detach_reset, decay_form, threshold_form, surrogate):
    """float64 gradcheck of v_final w.r.t. x, decay, threshold and v_init: with a detached reset the spikes
    enter v only through that reset, so finite differences see the true derivative (the surrogate part of
    the backward is checked against the reference above)."""
    fast, _ = _lif_pair(reset, v_reset, detach_reset, surrogate)
    leaves = _leaves(_lif_inputs(6, (2, 3), decay_form, threshold_form), torch.float64)
    assert torch.autograd.gradcheck(lambda *a: fast(*a)[1], leaves)


def _attention_inputs(T, B, H, D, gamma_form):
    q, k, v = ((torch.rand(T, B, H, D) < 0.3).float() for _ in range(3))  # spikes [T, B, H, D]
    gamma = {"float": 0.9, "0d": torch.tensor(0.8), "heads": torch.rand(H) * 0.5 + 0.45}[gamma_form]
    return [q, k, v, gamma, torch.randn(B, H, D)]


def _attention_fast(q, k, v, gamma, state):
    return _cpu.spike_attention(q, k, v, attention_reference.gamma_per_head(
        gamma, q.shape[2], attention_reference.compute_dtype(q, k, v, state, gamma), q.device), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma_form", ["float", "0d", "heads"])
def test_attention_matches_reference(dtype, gamma_form):
    T, B, H, D = 29, 2, 3, 5
    inputs = _attention_inputs(T, B, H, D, gamma_form)
    out_grads = [torch.randn(T, B, H, D, dtype=dtype), torch.randn(B, H, D, dtype=dtype)]
    _assert_same(_attention_fast, attention_reference.spike_attention, inputs, out_grads, dtype)


def test_attention_gradcheck():
    leaves = _leaves(_attention_inputs(7, 2, 3, 4, "heads"), torch.float64)
    assert torch.autograd.gradcheck(_attention_fast, leaves)


def test_training_path_runs_no_triton(monkeypatch):
    """Without TRITON_INTERPRET a CPU forward + backward of the spiking LM calls no Triton launcher."""
    import tether.kernels.lif as lif_kernels
    import tether.kernels.norm_lif as norm_lif_kernels
    import tether.kernels.pack as pack_kernels
    import tether.kernels.spike_attention as attention_kernels
    from tether.models import LMConfig, build_model

    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton launcher ran on the CPU training path")

    for module, names in ((lif_kernels, ("lif_forward", "lif_backward")),
                          (norm_lif_kernels, ("norm_lif_forward", "norm_lif_backward")),
                          (pack_kernels, ("pack_spikes", "unpack_spikes")),
                          (attention_kernels, ("spike_attention_forward", "spike_attention_backward"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)
    model = build_model(LMConfig(vocab_size=11, d_model=16, n_layer=1, block_size=8))
    idx = torch.randint(0, 11, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_functional_cpu_lif_keeps_the_reference_rules_for_non_finite_input(monkeypatch, reset):
    """NaN never fires, +inf fires (a hard reset brings it back), -inf never fires: as the reference says."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from tether.functional import lif

    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 2.0]]).repeat(3, 1)  # [T, N]
    spikes, v = lif(x, 0.5, 1.0, reset=reset)
    want_spikes, want_v = lif_reference.lif(x, 0.5, 1.0, reset=reset)
    assert torch.equal(spikes, want_spikes)
    assert torch.equal(v.nan_to_num(7.0), want_v.nan_to_num(7.0))


@pytest.mark.parametrize("shape", [(0, 2, 2, 4), (3, 0, 2, 4), (3, 2, 0, 4)], ids=str)
def test_functional_cpu_paths_take_empty_input(monkeypatch, shape):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from tether.functional import lif, spike_attention

    q = torch.zeros(shape, requires_grad=True)
    out, state = spike_attention(q, q, q, 0.9)
    out.sum().backward()
    assert out.shape == shape and state.shape == (shape[1], shape[2], shape[3]) and q.grad.shape == shape
    spikes, v = lif(torch.zeros(shape[0], 5), 0.5, 1.0)
    assert spikes.shape == (shape[0], 5) and torch.equal(v, torch.zeros(5))
