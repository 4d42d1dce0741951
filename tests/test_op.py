"""tether.functional._op.Op: one definition gives the custom op (schema, fake, autograd), the eager twin and
the switch between them; checked on a toy op, y = x * scale (+ the saved x as a second output)."""
from typing import NamedTuple

import pytest
import torch

from tether.functional._op import Op, _schema


class Cfg(NamedTuple):
    scale: float
    needs: tuple[bool, ...] = ()


CALLS = []


def forward(x, cfg):
    CALLS.append("forward")
    return x * cfg.scale, x.clone()


def backward(grad, x, cfg):
    CALLS.append("backward")
    return (grad * cfg.scale,)


def grads(ctx, grad_outputs, needs, run_backward):
    (x,) = ctx.saved_tensors
    return run_backward(grad_outputs[0], x, ctx.cfg)[0] if needs[0] else None,


def save(ctx, tensors, cfg, outputs):
    ctx.save_for_backward(outputs[1])
    ctx.cfg = cfg


toy = Op("tether_test::toy", tensors="Tensor x", config=Cfg, returns=2, outputs=1, forward=forward,
         fake=lambda x, cfg: (torch.empty_like(x), torch.empty_like(x)), save=save, grads=grads,
         backward=backward, fake_backward=lambda grad, x, cfg: (torch.empty_like(grad),),
         backward_tensors="Tensor grad, Tensor x", backward_config=Cfg, backward_returns=1)


def test_schema_from_config():
    assert _schema("Tensor x, Tensor? v", Cfg, 2) == "(Tensor x, Tensor? v, float scale, bool[] needs) -> (Tensor, Tensor)"
    assert _schema("Tensor x", Cfg, 1).endswith("-> Tensor")


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_paths_give_the_same_function(path):
    x = torch.randn(3, 4, requires_grad=True)
    op = toy if path == "eager" else torch.compile(lambda x, cfg: toy(x, cfg=cfg), fullgraph=True,
                                                   backend="aot_eager")
    CALLS.clear()
    y = op(x, cfg=Cfg(2.5))
    y.sum().backward()
    torch.testing.assert_close(y, x.detach() * 2.5)
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.5))
    assert CALLS == ["forward", "backward"]  # each body ran once on either path


def test_no_grad_makes_no_node():
    x = torch.randn(3)
    assert toy(x, cfg=Cfg(2.0)).grad_fn is None
    with torch.no_grad():
        assert toy(x.requires_grad_(), cfg=Cfg(2.0)).grad_fn is None


def test_opcheck():
    x = torch.randn(3, 4, requires_grad=True)
    torch.library.opcheck(toy._op, (x, 2.0, []), test_utils=("test_schema", "test_faketensor",
                                                          "test_autograd_registration"))


@pytest.mark.parametrize("op", ["lif", "output_scale"])
def test_aten_ops_compile_with_their_gradients(op, monkeypatch):
    """The CPU ops (Op kernel=False) traced by torch.compile give eager's gradients, also where their output
    dtype is the input's (a no-op .to lost the gradient under torch 2.11: tether._math.cast)."""
    import tether._backend
    from tether.functional.lif import lif
    from tether.functional.spike_attention import output_scale

    monkeypatch.setattr(tether._backend, "interpreting", lambda: False)  # the CPU path, not the kernels
    x = torch.randn(6, 2, 4, 8, requires_grad=True)  # [T, B, H, D]
    weights = torch.randn(8)
    gamma = torch.rand(4).requires_grad_()
    if op == "lif":
        def f(x, gamma):
            return (lif(2 * x, 0.5, 1.0, None)[0] * weights).sum()
    else:
        def f(x, gamma):
            return (output_scale(x, gamma, torch.float32) * weights).sum()
    want = torch.autograd.grad(f(x, gamma), (x, gamma), allow_unused=True)
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(x, gamma), (x, gamma),
                              allow_unused=True)
    assert want[0].abs().sum() > 0
    for w, g in zip(want, got):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w)
