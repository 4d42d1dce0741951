"""tether.nn.TTTMLP: shapes, gradients to every parameter, no leak from the future in causal mode."""
import pytest
import torch

from tether.nn.ttt import TTTMLP


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
