"""tether.nn.LIF and the surrogate objects."""
import pytest
import torch

import tether.nn as tnn
from tether.reference import lif as reference


def test_state_carried_across_calls(device):
    x = torch.randn(12, 2, 5, device=device)  # [T, B, C]
    layer = tnn.LIF(channels=5, decay=0.6)
    full = layer(x)
    layer.reset()
    assert layer.state is None
    chunks = torch.cat([layer(x[:7]), layer(x[7:8]), layer(x[8:])])  # includes a T = 1 call
    assert torch.equal(chunks, full)
    expected, v = reference.lif(x, 0.6, 1.0)
    assert torch.equal(full, expected)
    torch.testing.assert_close(layer.state, v)


def test_fresh_batch_shape_resets(device):
    layer = tnn.LIF(channels=3)
    layer(torch.randn(4, 2, 3, device=device))
    x = torch.randn(4, 5, 3, device=device)
    assert torch.equal(layer(x), reference.lif(x, 0.5, 1.0)[0])
    assert layer.state.shape == (5, 3)


def test_state_detached_unless_asked(device):
    x = torch.randn(6, 2, 4, device=device, requires_grad=True)
    layer = tnn.LIF(4)
    layer(x)
    assert not layer.state.requires_grad
    layer = tnn.LIF(4, detach_state=False)
    layer(x[:3])
    assert layer.state.requires_grad
    layer(x[3:]).sum().backward()
    assert x.grad[:3].abs().sum() > 0  # the second window's loss reached the first through the state


def test_learnable_decay_in_unit_interval(device):
    layer = tnn.LIF(4, decay=0.9, learnable_decay=True, per_channel=True).to(device)
    assert layer.decay_logit.shape == (4,)
    torch.testing.assert_close(layer.decay, torch.full((4,), 0.9, device=device))
    opt = torch.optim.SGD(layer.parameters(), lr=5.0)
    for _ in range(3):
        layer.reset()
        opt.zero_grad()
        layer(torch.randn(8, 3, 4, device=device) + 0.5).sum().backward()
        opt.step()
        assert ((layer.decay > 0) & (layer.decay < 1)).all()
    assert not torch.allclose(layer.decay, torch.full((4,), 0.9, device=device))


def test_per_channel_fixed_decay_and_grads_match_reference(device):
    layer = tnn.LIF(3, decay=0.7, per_channel=True, surrogate=tnn.FastSigmoid(5.0), reset="soft").to(device)
    assert layer.decay.shape == (3,) and not layer.decay.requires_grad
    x = torch.randn(10, 2, 3, device=device, requires_grad=True)
    layer(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference.lif(x_ref, torch.full((3,), 0.7, device=device), 1.0, surrogate="fast_sigmoid", alpha=5.0,
                  reset="soft")[0].sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


def test_per_channel_threshold_matches_reference(device):
    threshold = torch.tensor([0.5, 1.0, 2.0])
    layer = tnn.LIF(3, decay=0.8, threshold=threshold).to(device)
    assert "threshold=per-channel" in repr(layer) and "threshold" in layer.state_dict()
    x = torch.randn(20, 2, 3, device=device)
    assert torch.equal(layer(x), reference.lif(x, 0.8, threshold.to(device))[0])
    with pytest.raises(ValueError, match=r"threshold: a per-channel threshold must have shape \[channels\] = \[4\]"):
        tnn.LIF(4, threshold=threshold)


def test_firing_rate_is_a_device_tensor(device):
    layer = tnn.LIF(4)
    x = torch.randn(5, 3, 4, device=device, dtype=torch.float16)
    spikes = layer(x)
    assert isinstance(layer.firing_rate, torch.Tensor) and layer.firing_rate.device == spikes.device
    assert spikes.dtype == torch.float16
    torch.testing.assert_close(layer.firing_rate, spikes.float().mean())


def test_surrogate_objects():
    for cls, name, alpha in ((tnn.Arctan, "arctan", 2.0), (tnn.Sigmoid, "sigmoid", 4.0),
                             (tnn.FastSigmoid, "fast_sigmoid", 10.0)):
        sg = cls()
        assert isinstance(sg, tnn.Surrogate) and sg.name == name and sg.alpha == alpha
        u = torch.randn(20, requires_grad=True)
        spikes = sg(u)
        assert torch.equal(spikes, (u >= 0).float())
        (grad,) = torch.autograd.grad(spikes.sum(), u)
        torch.testing.assert_close(grad, reference.surrogate_grad(u.detach(), name, alpha))


def test_repr_and_bad_arguments():
    text = repr(tnn.LIF(8, learnable_decay=True, reset="soft"))
    assert "channels=8" in text and "decay=learnable" in text and "reset=soft" in text
    with pytest.raises(ValueError, match="channels"):
        tnn.LIF(per_channel=True)
    with pytest.raises(ValueError, match="decay"):
        tnn.LIF(4, decay=1.5)
    with pytest.raises(ValueError, match="reset"):
        tnn.LIF(4, reset="zero")
    tnn.LIF(4, decay=1.0)  # a fixed decay takes what tether.functional.lif takes: [0, 1]
    with pytest.raises(ValueError, match=r"decay: expected a value in \(0, 1\) with learnable_decay"):
        tnn.LIF(4, decay=1.0, learnable_decay=True)
    with pytest.raises(ValueError, match="threshold: expected a value in"):
        tnn.LIF(4, threshold=float("nan"))
    with pytest.raises(ValueError, match=r"alpha: expected a value in \(0, inf\), got 0.0"):
        tnn.Arctan(0.0)
    with pytest.raises(ValueError, match="channels=4"):
        tnn.LIF(4)(torch.randn(3, 2, 5))
