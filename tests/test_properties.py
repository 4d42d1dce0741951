"""Property-based tests (hypothesis): tether.functional (the Triton kernels: compiled on CUDA, under the
interpreter on the CPU) against the pure-PyTorch reference, over random shapes (0 and 1 included), dtypes and
parameters; outputs and gradients, tolerances by dtype.

On the CPU the interpreter is slow: tiny shapes and a few examples per property (the file runs in well under
two minutes on 2 cores); on CUDA each property runs many more examples. bf16 only on CUDA (the interpreter's
tl.dot on bf16 is not trusted).
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether._backend import use_triton
from tether._checks import SURROGATES
from tether.functional.lif import lif
from tether.functional.pack import pack_spikes, unpack_spikes
from tether.functional.spike_attention import spike_attention
from tether.functional.ttt_mlp import ttt_mlp
from tether.kernels import ttt_mlp as ttt_kernels
from tether.reference import lif as lif_reference
from tether.reference import pack as pack_reference
from tether.reference.spike_attention import spike_attention as attention_reference
from tether.reference.ttt_mlp import ttt_mlp as ttt_reference
from utils import TTT_TOL, assert_rel_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def examples(cpu: int) -> settings:
    """cpu examples under the interpreter, 20x as many on CUDA; no deadline (the first call of a kernel
    compiles), no example database written into the checkout."""
    return settings(max_examples=cpu * 20 if CUDA else cpu, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def floats(low: float, high: float):
    """Floats that an fp32 kernel argument holds as they are: fp32 values, no fp32 subnormals (the Triton
    interpreter types a Python float below 2**-126 as fp64, compiled Triton as fp32)."""
    return st.floats(float(np.float32(low)), float(np.float32(high)), width=32, allow_subnormal=False)


def generator(seed: int) -> torch.Generator:
    """Tensor contents come from a seed that hypothesis draws: a failing example is reproduced whole."""
    return torch.Generator().manual_seed(seed)


def rand(g, *shape, low=0.0, high=1.0):
    return (torch.rand(shape, generator=g) * (high - low) + low).to(DEVICE)


def randn(g, *shape):
    return torch.randn(shape, generator=g).to(DEVICE)


def leaves(tensors):
    """Fresh leaves that ask for a gradient where the original did (one copy per implementation)."""
    return [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
            for t in tensors]


def grads_of(tensors):
    """Each leaf's gradient, zeros where autograd gave none (an input the output does not depend on: an
    empty sequence reaches no parameter on the reference path); None for what asked for none."""
    return [(torch.zeros_like(t) if t.grad is None else t.grad) if isinstance(t, torch.Tensor) and t.requires_grad
            else None for t in tensors]


def test_kernels_run_here():
    assert use_triton(torch.empty(0, device=DEVICE))


# ---- LIF ------------------------------------------------------------------------------------------------------

# gradients: per element of x / v_init, relative to the norm; the kernels' COMPACT save keeps sg' in 16 bits
LIF_GRAD = {torch.float32: (1e-3, 1e-4), torch.float16: (4e-3, 1e-3), torch.bfloat16: (3e-2, 1e-2)}


@st.composite
def lif_cases(draw):
    T = draw(st.integers(0, 9))
    rest = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))
    forms = ["float", "0d"] + (["channel"] if rest else [])
    g = generator(draw(st.integers(0, 2**31 - 1)))

    def param(low, high):
        form = draw(st.sampled_from(forms))
        if form == "float":
            return draw(floats(low, high))
        p = rand(g, *((rest[-1],) if form == "channel" else ()), low=low, high=high)
        return p.requires_grad_(draw(st.booleans()))

    decay, threshold = param(0.0, 1.0), param(0.2, 1.5)
    dtype = draw(st.sampled_from(DTYPES))
    x = (randn(g, T, *rest) * draw(floats(0.1, 4.0))).to(dtype).requires_grad_()
    v_init = randn(g, *rest).requires_grad_() if draw(st.booleans()) else None
    kw = dict(surrogate=draw(st.sampled_from(tuple(SURROGATES))),
              alpha=draw(st.none() | floats(0.5, 8.0)), reset=draw(st.sampled_from(("hard", "soft"))),
              v_reset=draw(floats(-0.5, 0.5)), detach_reset=draw(st.booleans()))
    grad_spikes, grad_v = randn(g, T, *rest), randn(g, *rest)
    return x, decay, threshold, v_init, kw, grad_spikes, grad_v


def _run_lif(fn, inputs, kw, grad_spikes, grad_v):
    inputs = leaves(inputs)
    spikes, v_final = fn(*inputs, **kw)
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        ((spikes.float() * grad_spikes).sum() + (v_final * grad_v).sum()).backward()
    return spikes, v_final, grads_of(inputs)


@examples(100)
@given(lif_cases())
def test_lif_matches_reference(case):
    x, decay, threshold, v_init, kw, grad_spikes, grad_v = case
    inputs = (x, decay, threshold, v_init)
    s_k, v_k, g_k = _run_lif(lif, inputs, kw, grad_spikes, grad_v)
    s_r, v_r, g_r = _run_lif(lif_reference.lif, inputs, kw, grad_spikes, grad_v)
    assert s_k.shape == x.shape and s_k.dtype == x.dtype and v_k.shape == x.shape[1:] and v_k.dtype == torch.float32
    assert torch.equal(s_k, s_r), f"{(s_k != s_r).sum()} spikes differ"  # the same fp32 membrane arithmetic
    torch.testing.assert_close(v_k, v_r, rtol=1e-6, atol=1e-6)
    rtol, atol = LIF_GRAD[x.dtype]
    per_neuron = max(1, x.shape[0]) * max(1, math.prod(x.shape[1:]))  # terms summed into a shared parameter's gradient
    for name, a, e in zip(("x", "decay", "threshold", "v_init"), g_k, g_r):
        if e is not None:
            terms = per_neuron // max(1, e.numel()) if name in ("decay", "threshold") else max(1, x.shape[0])
            assert_rel_close(a, e, rtol, f"grad {name}", atol * terms)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
@examples(40)
@given(lif_cases(), st.data())
def test_lif_nonfinite_inputs_agree(case, data):
    """NaN never fires and stays NaN; +inf fires (a hard reset brings it back to v_reset); -inf never fires:
    the same spikes and membranes on both paths."""
    x, decay, threshold, v_init, kw, _, _ = case
    if x.numel() == 0:
        return
    x = x.detach().clone()
    flat = x.view(-1)
    for _ in range(data.draw(st.integers(1, 3))):
        flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(st.sampled_from((math.nan, math.inf, -math.inf)))
    params = [p.detach() if isinstance(p, torch.Tensor) else p for p in (decay, threshold)]
    v0 = None if v_init is None else v_init.detach()
    s_k, v_k = lif(x, *params, v0, **kw)
    s_r, v_r = lif_reference.lif(x, *params, v0, **kw)
    assert torch.equal(s_k, s_r), f"{(s_k != s_r).sum()} spikes differ"
    torch.testing.assert_close(v_k, v_r, rtol=1e-6, atol=1e-6, equal_nan=True)


# ---- pack / unpack --------------------------------------------------------------------------------------------

@examples(50)
@given(lead=st.lists(st.integers(0, 3), max_size=2), n=st.integers(0, 20),
       dtype=st.sampled_from((torch.float32, torch.float16, torch.bool, torch.uint8)),
       seed=st.integers(0, 2**31 - 1), odd_values=st.booleans())
def test_pack_unpack_match_reference(lead, n, dtype, seed, odd_values):
    """Any nonzero (NaN, inf, negative) is a spike; the public format is numpy.packbits(bitorder='little')."""
    g = generator(seed)
    s = (torch.rand((*lead, n), generator=g) < 0.5).float()
    if odd_values and dtype.is_floating_point:
        s = s * torch.tensor([1.0, -2.0, math.nan, math.inf])[torch.randint(0, 4, s.shape, generator=g)]
    s = s.to(DEVICE).to(dtype)
    packed = pack_spikes(s)
    assert torch.equal(packed, pack_reference.pack_spikes(s))
    want = np.packbits((s != 0).cpu().numpy(), axis=-1, bitorder="little") if n else np.zeros((*lead, 0), np.uint8)
    assert np.array_equal(packed.cpu().numpy(), want)
    for out_dtype in (torch.float32, torch.float16, torch.bool):
        unpacked = unpack_spikes(packed, n, out_dtype)
        assert torch.equal(unpacked, pack_reference.unpack_spikes(packed, n, out_dtype))
        assert torch.equal(unpacked, (s != 0).to(out_dtype))


# ---- spike attention ------------------------------------------------------------------------------------------

ATTENTION_GRAD = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@examples(60)
@given(T=st.integers(0, 40), B=st.integers(0, 2), H=st.integers(0, 3), D=st.integers(1, 5),
       dtype=st.sampled_from(DTYPES), gamma_form=st.sampled_from(("float", "one", "0d", "head")),
       gamma_grad=st.booleans(), with_state=st.booleans(), rate=floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_spike_attention_matches_reference(T, B, H, D, dtype, gamma_form, gamma_grad, with_state, rate, seed):
    """The kernels (fp32 accumulation, spikes in dtype) against the fp64 loop: out, final state, gradients of
    q, k, v, gamma and the state. T up to 40 crosses the kernels' chunk of 32."""
    g = generator(seed)
    q, k, v = ((rand(g, T, B, H, D) < rate).to(dtype).requires_grad_() for _ in range(3))
    if gamma_form in ("float", "one"):
        gamma = 1.0 if gamma_form == "one" else float(rand(g, low=0.05, high=1.0))
    else:
        gamma = rand(g, *((H,) if gamma_form == "head" else ()), low=0.05, high=1.0).requires_grad_(gamma_grad)
    state = randn(g, B, H, D).requires_grad_() if with_state else None
    grad_out, grad_final = randn(g, T, B, H, D), randn(g, B, H, D)

    def run(fn, inputs, dtype_in=None):
        inputs = leaves(inputs)
        cast = [t.to(dtype_in) if dtype_in and isinstance(t, torch.Tensor) else t for t in inputs]
        out, final = fn(*cast)
        (out * grad_out.to(out.dtype)).sum().add((final * grad_final.to(final.dtype)).sum()).backward()
        return out, final, grads_of(inputs)

    out_k, final_k, g_k = run(spike_attention, (q, k, v, gamma, state))
    out_r, final_r, g_r = run(attention_reference, (q, k, v, gamma, state), torch.float64)
    assert out_k.dtype == final_k.dtype == torch.float32 and out_k.shape == q.shape
    assert_rel_close(out_k, out_r, 1e-6, "out", 1e-6)
    assert_rel_close(final_k, final_r, 1e-6, "final state", 1e-6)
    for name, a, e in zip(("q", "k", "v", "gamma", "state"), g_k, g_r):
        if e is not None:
            terms = max(1, T * B * D) if name == "gamma" else 1
            rtol = ATTENTION_GRAD[dtype] if name in ("q", "k", "v") else 1e-5
            assert_rel_close(a, e, rtol, f"grad {name}", 1e-6 * terms)


# ---- TTT-MLP --------------------------------------------------------------------------------------------------

TTT_NAMES = ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "token_scale")


@examples(16)
@given(B=st.integers(0, 1 if not CUDA else 2), NH=st.integers(0, 2), NC=st.integers(0, 3),
       CS=st.sampled_from((16,) if not CUDA else (16, 32)), F=st.sampled_from((16,) if not CUDA else (16, 32, 48)),
       dtype=st.sampled_from(DTYPES), causal=st.booleans(), group=st.none() | st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_ttt_mlp_matches_reference(B, NH, NC, CS, F, dtype, causal, group, seed):
    """The kernels against the fp64 reference: out, final state, and every input's gradient for random
    upstream gradients of both."""
    assert ttt_kernels.unsupported(F, CS, dtype) is None  # these shapes run the kernels
    g = generator(seed)
    K = 4 * F
    inputs = [(randn(g, B, NH, NC, CS, F)).to(dtype) for _ in range(3)]
    inputs.append((0.1 * rand(g, B, NH, NC, CS, 1)).to(dtype))  # lr
    inputs += [1.0 + 0.2 * randn(g, NH, F), 0.2 * randn(g, NH, F)]  # LN weight, bias
    inputs += [randn(g, B, NH, F, K) / F ** 0.5, 0.1 * randn(g, B, NH, 1, K), randn(g, B, NH, K, F) / K ** 0.5,
               0.1 * randn(g, B, NH, 1, F)]
    inputs.append(1.0 / torch.arange(1, CS + 1, device=DEVICE) + 0.05 * rand(g, CS))  # token_scale
    inputs = [t.requires_grad_() for t in inputs]
    grad_out = randn(g, B, NH, NC, CS, F)
    grad_final = [0.1 * randn(g, *t.shape) for t in inputs[6:10]]

    def run(fn, inputs, to=None):
        inputs = leaves(inputs)
        cast = [t.to(to) if to else t for t in inputs]
        result = fn(*cast[:10], causal=causal, token_scale=cast[10], checkpoint_group_size=group)
        out, final = result[0], result[1]
        loss = (out.double() * grad_out.double()).sum() + sum((f.double() * gf.double()).sum()
                                                                for f, gf in zip(final, grad_final))
        loss.backward()
        return out, final, grads_of(inputs)

    out_k, final_k, g_k = run(ttt_mlp, inputs)
    out_r, final_r, g_r = run(ttt_reference, inputs, torch.float64)
    out_tol, grad_tol = TTT_TOL[dtype]
    assert out_k.dtype == dtype and out_k.shape == inputs[0].shape
    assert_rel_close(out_k, out_r, out_tol, "out", 1e-7)
    for name, a, e in zip(("w1", "b1", "w2", "b2"), final_k, final_r):
        assert_rel_close(a, e, out_tol, f"final {name}", 1e-7)
    for name, a, e in zip(TTT_NAMES, g_k, g_r):
        if name == "token_scale" and not causal:
            assert not a.any(), "token_scale: no gradient when not causal"
            continue
        assert_rel_close(a, e, grad_tol, f"grad {name}", 1e-7)
