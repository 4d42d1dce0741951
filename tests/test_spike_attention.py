"""Linear spike-driven attention: reference oracle, cumsum formulation, Triton kernels, argument checks."""
import pytest
import torch

from tether.reference.spike_attention import spike_attention as reference
from tether.reference.spike_attention import spike_attention_cumsum

H = 3  # heads in every test shape


def spikes(*shape, dtype=torch.float32, device="cpu", rate=0.5):
    return (torch.rand(*shape, device=device) < rate).to(dtype)


def qkv(T, B, D, dtype=torch.float32, device="cpu"):
    return [spikes(T, B, H, D, dtype=dtype, device=device) for _ in range(3)]


def close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


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


def test_reference_matches_spec_by_hand():
    # one head, one channel: C = [1, 0.5 + 0, 0.25 + 1] with gamma 0.5, k*v = [1, 0, 1]
    one = torch.ones(3, 1, 1, 1)
    k = torch.tensor([1.0, 1.0, 1.0]).view(3, 1, 1, 1)
    v = torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1, 1)
    out, state = reference(one, k, v, 0.5)
    close(out.flatten(), torch.tensor([1.0, 0.5, 1.25]), 0)
    close(state.flatten(), torch.tensor([1.25]), 0)


@pytest.mark.parametrize("gamma", [1.0, 0.9, "per_head", 0.05])
def test_cumsum_formulation_matches_reference(gamma):
    T, B, D = 41, 2, 5  # T spans three chunks of 16, the last one partial
    q, k, v = qkv(T, B, D)
    gamma = torch.tensor([0.3, 0.9, 1.0], requires_grad=True) if gamma == "per_head" else gamma
    state = torch.randn(B, H, D, requires_grad=True)
    out, final = spike_attention_cumsum(q, k, v, gamma, state)
    ref_out, ref_final = reference(q, k, v, gamma, state)
    close(out, ref_out, 1e-5)
    close(final, ref_final, 1e-5)
    grad = torch.randn_like(out)
    inputs = [state] + ([gamma] if isinstance(gamma, torch.Tensor) else [])
    got = torch.autograd.grad((out * grad).sum() + final.sum(), inputs)
    want = torch.autograd.grad((ref_out * grad).sum() + ref_final.sum(), inputs)
    for a, b in zip(got, want):
        close(a, b, 1e-4)
