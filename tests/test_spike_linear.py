"""spike_linear: same outputs and gradients as a plain linear layer, input saved as packed bits."""
import pytest
import torch
import torch.nn.functional as F

from tether.functional.pack import unpack_spikes
from tether.functional.spike_linear import spike_linear
from tether.nn import SpikeLinear
from utils import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _spikes(*shape, dtype=torch.float32):
    return (torch.rand(*shape) < 0.3).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 13), (3, 2, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear(dtype, shape, bias):
    spikes = _spikes(*shape, dtype=dtype)
    weight = torch.randn(7, shape[-1], dtype=dtype, requires_grad=True)
    b = torch.randn(7, dtype=dtype, requires_grad=True) if bias else None
    grad = torch.randn(*shape[:-1], 7, dtype=dtype)

    out = spike_linear(spikes, weight, b)
    got = torch.autograd.grad(out, [spikes, weight] + ([b] if bias else []), grad)
    ref_out = F.linear(spikes, weight, b)
    want = torch.autograd.grad(ref_out, [spikes, weight] + ([b] if bias else []), grad)

    assert out.dtype == ref_out.dtype
    assert_close(out, ref_out, TOL, dtype)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert_close(g, w, TOL, dtype, atol=TOL[dtype] * 4)


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def test_saves_packed_bits_not_floats():
    spikes = _spikes(4, 6, 21)  # 21 inputs -> 3 bytes per row
    weight = torch.randn(5, 21, requires_grad=True)
    out, saved = _saved(lambda: spike_linear(spikes, weight))
    packed = [t for t in saved if t.dtype == torch.uint8]
    assert len(packed) == 1 and packed[0].shape == (4, 6, 3)
    torch.testing.assert_close(unpack_spikes(packed[0], 21, torch.float32), spikes.detach())
    assert not any(t.is_floating_point() and t.numel() == spikes.numel() for t in saved)
    out.sum().backward()  # the packed copy is enough for the weight gradient
    torch.testing.assert_close(weight.grad, spikes.detach().sum((0, 1)).expand(5, 21))

    # plain F.linear (the eager build) keeps the float spikes
    _, saved = _saved(lambda: F.linear(spikes, weight))
    assert any(t.is_floating_point() and t.numel() == spikes.numel() for t in saved)


def test_no_weight_grad_saves_no_bits():
    spikes = _spikes(4, 16)
    weight = torch.randn(3, 16)
    _, saved = _saved(lambda: spike_linear(spikes, weight))
    assert not any(t.dtype == torch.uint8 for t in saved)


@pytest.mark.parametrize("pack", [True, False])
def test_module(pack):
    layer = SpikeLinear(10, 6, pack=pack)
    ref = torch.nn.Linear(10, 6)
    ref.load_state_dict(layer.state_dict())
    spikes = _spikes(3, 5, 10)
    out = layer(spikes)
    out.square().sum().backward()
    ref(spikes.detach()).square().sum().backward()
    torch.testing.assert_close(out, ref(spikes.detach()))
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)
    torch.testing.assert_close(layer.input_rate, spikes.detach().mean())


def test_bad_inputs():
    spikes = _spikes(4, 8)
    with pytest.raises(ValueError, match="weight: expected shape"):
        spike_linear(spikes, torch.randn(3, 9))
    with pytest.raises(ValueError, match="weight: expected a 2-d"):
        spike_linear(spikes, torch.randn(3, 8, 1))
    with pytest.raises(TypeError, match="spikes: expected dtype"):
        spike_linear(spikes.detach().long(), torch.randn(3, 8))
    with pytest.raises(ValueError, match="bias: expected shape"):
        spike_linear(spikes, torch.randn(3, 8), torch.randn(4))


def test_autocast_matches_linear():
    spikes = _spikes(6, 16)
    weight = torch.randn(5, 16, requires_grad=True)
    grads = []
    for fn in (spike_linear, F.linear):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(spikes, weight)
        assert out.dtype == torch.bfloat16
        grads.append((out, *torch.autograd.grad(out.float().square().sum(), [spikes, weight])))
    for got, want in zip(*grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)


def test_compiles_without_graph_break(device):
    spikes = (torch.rand(4, 6, 19, device=device) < 0.3).float()
    weight = torch.randn(7, 19, device=device, requires_grad=True)
    loss = lambda w: spike_linear(spikes, w).square().sum()  # noqa: E731
    torch.compile(loss, fullgraph=True, backend="aot_eager")(weight).backward()
    compiled_grad, weight.grad = weight.grad, None
    loss(weight).backward()
    torch.testing.assert_close(compiled_grad, weight.grad)
