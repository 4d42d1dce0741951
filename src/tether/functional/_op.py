"""One way to define an op: ``Op`` owns the torch.library custom op, its fake, the backward op, the autograd
registration and the switch between torch.compile's path and eager mode.

An op is written as plain functions of ``(*tensors, cfg)``, cfg a NamedTuple of its non-tensor arguments:

- ``forward(*tensors, cfg)`` -> a tuple: the op's outputs, then what only the backward reads (a tensor in
  every place: an empty one stands for a part the kernels did not make);
- ``fake(*tensors, cfg)``: the same outputs as empty tensors of the right shapes (what torch.compile traces);
- ``save(ctx, tensors, cfg, outputs)``: keeps on ctx what ``grads`` reads;
- ``grads(ctx, grad_outputs, needs, backward)`` -> one gradient or None per tensor input (needs: which are
  asked for; a grad_output is None where that output was not used); the kernel part goes through
  ``backward(*tensors, cfg)``, which is ``backward`` itself in eager mode and its custom op while tracing;
- ``backward`` / ``fake_backward``, with their own tensor schema and config type.

``materialize_grads=True``: grads gets zeros, not None, for an unused output (as a custom op's registered
backward does).

Ops that launch Triton kernels (``kernel=True``) become custom ops, so torch.compile keeps the launches opaque;
eager mode calls the same functions through a plain autograd.Function (the custom-op dispatch costs host
time on every call). Ops made of ATen calls (``kernel=False``) are that autograd.Function on both paths:
torch.compile traces through it, and autocast applies inside as it does to the ATen calls themselves.
"""
import inspect
from typing import Callable, NamedTuple, Optional, Union, get_args, get_origin

import torch
from torch._subclasses.fake_tensor import is_fake

_SCHEMA_TYPES = {float: "float", int: "int", bool: "bool", str: "str", torch.dtype: "ScalarType"}


class _NoConfig(NamedTuple):
    pass


NO_CONFIG = _NoConfig()


def _schema_type(annotation) -> str:
    if get_origin(annotation) is Union and type(None) in get_args(annotation):  # Optional[X]
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return _schema_type(inner) + "?"
    if get_origin(annotation) is tuple:  # tuple[bool, ...]
        return _schema_type(get_args(annotation)[0]) + "[]"
    return _SCHEMA_TYPES[annotation]


def _schema(tensors: str, config: type, returns: int) -> str:
    """'(Tensor x, Tensor? v_init, float decay, ...) -> (Tensor, Tensor)' from the tensor part and cfg's
    annotations."""
    fields = [f"{_schema_type(t)} {name}" for name, t in inspect.get_annotations(config).items()]
    args = ", ".join(p for p in (tensors, *fields) if p)
    return f"({args}) -> ({', '.join(['Tensor'] * returns)})" if returns != 1 else f"({args}) -> Tensor"


def _tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _n_tensors(tensors: str) -> int:
    return len([p for p in tensors.split(",") if p.strip()])


def _custom_op(name: str, tensors: str, config: type, returns: int, impl: Callable, fake: Callable):
    """A torch.library custom op whose flat arguments are impl's (*tensors, cfg) spelled out."""
    k = _n_tensors(tensors)

    def flat(fn):
        def run(*args):
            result = tuple(fn(*args[:k], config(*args[k:])))
            return result[0] if returns == 1 else result  # a one-Tensor schema returns the tensor
        return run

    op = torch.library.custom_op(name, flat(impl), mutates_args=(), schema=_schema(tensors, config, returns))
    op.register_fake(flat(fake))
    return op


class Op:
    """See the module's docstring. ``op(*tensors, cfg=cfg)`` -> the first ``outputs`` outputs of forward (one
    tensor when outputs is 1). A kernel op's schema: ``tensors`` (its tensor arguments, as schema text) and
    ``returns`` (how many tensors forward returns); an ATen op (kernel=False) needs neither."""

    def __init__(self, name: str, *, outputs: int, tensors: str = "", config: type = _NoConfig, returns: int = 0,
                 forward: Callable, fake: Optional[Callable] = None, save: Optional[Callable] = None,
                 grads: Optional[Callable] = None, kernel: bool = True, backward: Optional[Callable] = None,
                 fake_backward: Optional[Callable] = None, backward_tensors: str = "",
                 backward_config: type = _NoConfig, backward_returns: int = 0, materialize_grads: bool = False):
        self.name, self.forward, self.outputs, self.kernel = name, forward, outputs, kernel
        self.materialize_grads = materialize_grads
        self.differentiable = grads is not None
        self._k = _n_tensors(tensors)
        self._eager = self._autograd_function(save, grads, backward)
        if not kernel:
            return
        self._op = _custom_op(name, tensors, config, returns, forward, fake)
        traced_backward = None
        if backward is not None:
            backward_op = _custom_op(name + "_backward", backward_tensors, backward_config, backward_returns,
                                     backward, fake_backward)
            traced_backward = lambda *args: _tuple(backward_op(*args[:-1], *args[-1]))  # noqa: E731
        if self.differentiable:
            def setup_context(ctx, inputs, output):
                save(ctx, inputs[:self._k], config(*inputs[self._k:]), _tuple(output))

            def op_backward(ctx, *grad_outputs):
                needs = ctx.needs_input_grad[:self._k]
                grad_inputs = grads(ctx, grad_outputs[:outputs], needs, traced_backward)
                return *grad_inputs, *[None] * len(config._fields)

            self._op.register_autograd(op_backward, setup_context=setup_context)

    def _autograd_function(self, save, grads, backward):
        if not self.differentiable:
            return None
        outputs = self.outputs

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                *tensors, cfg = args
                result = self.forward(*tensors, cfg)
                save(ctx, tensors, cfg, result)
                # an unused output's gradient stays None (no zeros to allocate) unless the op asks for zeros
                ctx.set_materialize_grads(self.materialize_grads)
                return result[0] if outputs == 1 else tuple(result[:outputs])

            @staticmethod
            def backward(ctx, *grad_outputs):
                return *grads(ctx, grad_outputs, ctx.needs_input_grad[:-1], backward), None

        Function.__name__ = Function.__qualname__ = "".join(p.title() for p in self.name.split("::")[-1].split("_"))
        return Function

    def __call__(self, *tensors, cfg=NO_CONFIG):
        if self.kernel and (torch.compiler.is_compiling() or any(is_fake(t) for t in tensors)):
            result = _tuple(self._op(*tensors, *cfg))
        elif self.differentiable and torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
            return self._eager.apply(*tensors, cfg)
        else:  # nothing asks for a gradient: no autograd node
            result = self.forward(*tensors, cfg)
        return result[0] if self.outputs == 1 else tuple(result[:self.outputs])
