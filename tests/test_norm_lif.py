"""tether.functional.norm_lif (LayerNorm -> LIF, membrane recomputed in backward) against the oracle: the
norm written out in PyTorch ops, then tether.reference.lif; fresh random inputs, outputs and gradients."""
import pytest
import torch
import torch.nn.functional as F

from tether.functional.norm_lif import norm_lif
from tether.kernels import norm_lif as kernels
from tether.reference import lif as reference
from utils import assert_rel_close, count_launches

# Norm-wise relative error allowed on the gradients by the spikes' dtype (dL/dy is stored in it).
# The interpreter rounds fp32 -> bf16 wrongly (not to nearest), so bf16 runs on the GPU only.
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
OUT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.fixture
def kernel_calls(monkeypatch):
    return count_launches(monkeypatch, {"forward": "tether.kernels.norm_lif.norm_lif_forward",
                                        "backward": "tether.kernels.norm_lif.norm_lif_backward"})


def oracle(x, weight, bias, v_init, dtype, eps=1e-5, **lif_kwargs):
    """LayerNorm as the kernels round it (((x - mean) * rstd) * w + b in fp32, then dtype), then the reference."""
    var, mean = torch.var_mean(x.float(), dim=-1, correction=0, keepdim=True)
    y = ((x.float() - mean) * torch.rsqrt(var + eps) * weight + bias).to(dtype)
    return reference.lif(y, 0.5, 1.0, v_init, **lif_kwargs)


def inputs(T, rows, C, x_dtype, device):
    x = (2 * torch.randn(T, rows, C, device=device) + 0.3).to(x_dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(C, device=device)).requires_grad_()
    bias = (0.5 * torch.randn(C, device=device)).requires_grad_()
    v_init = torch.randn(rows, C, device=device).requires_grad_()
    return x, weight, bias, v_init


def spikes_and_grads(fn, x, weight, bias, v_init, grad_spikes, grad_v):
    spikes, v_final = fn(x, weight, bias, v_init)
    loss = (spikes.float() * grad_spikes).sum() + (v_final * grad_v).sum()
    return spikes, v_final, torch.autograd.grad(loss, (x, weight, bias, v_init))


# T: one step, one segment and a partial one, several segments; a channel count the block does not divide
@pytest.mark.parametrize("T,rows,C", [(1, 2, 8), (21, 3, 40), (37, 2, 96)])
@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("x_dtype", ["same", torch.float32])
@pytest.mark.parametrize("reset,surrogate", [("hard", "arctan"), ("soft", "sigmoid")])
def test_matches_oracle(T, rows, C, dtype, x_dtype, reset, surrogate, device, kernel_calls):
    x_dtype = dtype if x_dtype == "same" else x_dtype
    x, weight, bias, v_init = inputs(T, rows, C, x_dtype, device)
    grad_spikes, grad_v = torch.randn(T, rows, C, device=device), torch.randn(rows, C, device=device)
    kw = dict(reset=reset, surrogate=surrogate)
    s_k, v_k, g_k = spikes_and_grads(lambda *a: norm_lif(*a[:3], 0.5, 1.0, a[3], dtype=dtype, **kw),
                                     x, weight, bias, v_init, grad_spikes, grad_v)
    s_r, v_r, g_r = spikes_and_grads(lambda *a: oracle(*a, dtype, **kw), x, weight, bias, v_init, grad_spikes, grad_v)
    assert kernel_calls == {"forward": 1, "backward": 1}
    assert s_k.dtype == dtype and torch.equal(s_k, s_r)
    torch.testing.assert_close(v_k, v_r, rtol=1e-6, atol=1e-6)
    for name, g, e in zip(("x", "weight", "bias", "v_init"), g_k, g_r):
        assert g.dtype == e.dtype, name
        assert_rel_close(g, e, GRAD_TOL[dtype], f"grad {name}", atol=1e-7)


def test_only_v_final_used(device):
    x, weight, bias, v_init = inputs(19, 2, 16, torch.float32, device)
    _, v_final = norm_lif(x, weight, bias, 0.5, 1.0, v_init)
    _, v_ref = oracle(x, weight, bias, v_init, torch.float32)
    for g, e in zip(torch.autograd.grad(v_final.sum(), (x, weight, v_init)),
                    torch.autograd.grad(v_ref.sum(), (x, weight, v_init))):
        assert_rel_close(g, e, 1e-5, "grad", atol=1e-7)


def test_without_grad_saves_nothing(device, kernel_calls):
    x, weight, bias, _ = inputs(7, 2, 16, torch.float32, device)
    with torch.no_grad():
        spikes, v_final = norm_lif(x, weight, bias, 0.5, 1.0)
    s_r, v_r = oracle(x.detach(), weight.detach(), bias.detach(), None, torch.float32)
    assert torch.equal(spikes, s_r) and not spikes.requires_grad
    torch.testing.assert_close(v_final, v_r)
    assert kernel_calls == {"forward": 1, "backward": 0}


def test_unfused_cases_are_the_same_function(device):
    """A tensor threshold (or a norm without affine) runs F.layer_norm then lif: same spikes as the fused path."""
    x, weight, bias, v_init = inputs(9, 2, 16, torch.float32, device)
    fused, _ = norm_lif(x, weight, bias, 0.5, 1.0, v_init)
    unfused, _ = norm_lif(x, weight, bias, 0.5, torch.tensor(1.0, device=device), v_init)
    assert (fused != unfused).float().mean() < 0.01  # F.layer_norm may round y differently near threshold
    plain, _ = norm_lif(x, None, None, 0.5, 1.0)
    expected, _ = reference.lif(F.layer_norm(x, (16,)), 0.5, 1.0)
    assert torch.equal(plain, expected)


def test_compile_fullgraph(device, kernel_calls):
    x, weight, bias, v_init = inputs(18, 2, 8, torch.float32, device)

    def step(x, weight, bias, v_init):
        spikes, v = norm_lif(x, weight, bias, 0.5, 1.0, v_init)
        return (spikes * torch.arange(spikes.shape[0], device=x.device)[:, None, None]).sum() + v.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, weight, bias, v_init)
    grads = torch.autograd.grad(out, (x, weight, bias, v_init))
    expected = step(x, weight, bias, v_init)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, torch.autograd.grad(expected, (x, weight, bias, v_init))):
        torch.testing.assert_close(g, e)
    assert kernel_calls["forward"] >= 2 and kernel_calls["backward"] >= 2


def test_norm_lif_module_fused_or_not(device, kernel_calls):
    """tether.nn NormLIF(fuse_norm=True) (the norm_lif kernels) == fuse_norm=False (LayerNorm, then lif): spikes,
    membrane and gradients of x and the norm's affine."""
    from tether.nn.attention import NormLIF

    torch.manual_seed(0)
    plain, fused = NormLIF(16), NormLIF(16, fuse_norm=True)
    fused.load_state_dict(plain.state_dict())
    plain, fused = plain.to(device), fused.to(device)
    x = (2 * torch.randn(12, 3, 16, device=device)).requires_grad_()
    results = []
    for module in (plain, fused):
        spikes, v = module(x)
        (spikes * torch.arange(16, device=device)).sum().add(v.sum()).backward()
        results.append((spikes, v, x.grad.clone(), module.norm.weight.grad, module.norm.bias.grad))
        x.grad = None
    (s_plain, v_plain, *g_plain), (s_fused, v_fused, *g_fused) = results
    torch.testing.assert_close(s_fused, s_plain, atol=0, rtol=0)
    torch.testing.assert_close(v_fused, v_plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_plain):  # the norm's backward from saved statistics: fp32 rounding apart
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert kernel_calls["forward"] == 1 and kernel_calls["backward"] == 1  # only the fused module ran them


def test_opcheck(device):
    x, weight, bias, v_init = (t.detach() for t in inputs(5, 2, 8, torch.float32, device))
    args = (x, weight, bias, v_init, 1e-5, 0.5, 1.0, "arctan", 2.0, True, 0.0, torch.float32, True)
    torch.library.opcheck(torch.ops.tether.norm_lif.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bad,message", [
    (dict(weight="w"), "weight: expected a torch.Tensor"),
    (dict(eps=0.0), "eps: expected a value in (0, inf)"),
    (dict(dtype=torch.int32), "dtype: expected one of"),
    (dict(decay=1.5), "decay"),
])
def test_bad_arguments_are_named(bad, message, device):
    x, weight, bias, _ = inputs(3, 2, 8, torch.float32, device)
    args = dict(weight=weight, bias=bias, decay=0.5, threshold=1.0)
    args.update({k: v for k, v in bad.items() if k in args})
    with pytest.raises((TypeError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        norm_lif(x, args["weight"], args["bias"], args["decay"], args["threshold"],
                 **{k: v for k, v in bad.items() if k not in args})
