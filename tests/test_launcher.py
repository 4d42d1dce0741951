"""tether.kernels.Launcher keys its compiled-kernel cache on what Triton specializes an argument on; if two
arguments get the same key, Triton must specialize them the same way (else a kernel compiled for one would be
launched for the other)."""
import itertools

import torch
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from tether.kernels import _hooked, _spec


def _triton_spec(arg):
    return native_specialize_impl(BaseBackend, arg, False, True, True)


def _samples():
    base = torch.zeros(64)
    ints = [0, 1, 2, 15, 16, 17, 32, 1000, 2**31 - 16, 2**31, 2**31 + 1, 2**40, 2**63, 2**64 - 16, -1, -16, -2**31, -2**31 - 1]
    tensors = [base, base[1:], base[4:], base.to(torch.bfloat16), base.to(torch.bfloat16)[8:],
               base.to(torch.int32), base.to(torch.int32)[3:], base.to(torch.float16)[1:], torch.zeros(0)]
    return ints + tensors + [None, 0.5, 1.0, -3.0, True, False]


def test_keys_tell_apart_what_triton_does():
    samples = _samples()
    for a, b in itertools.combinations(samples, 2):
        if _triton_spec(a) != _triton_spec(b):
            assert _spec(a) != _spec(b), (a, b)


def test_launch_hooks_send_calls_through_triton():
    assert not _hooked(knobs.runtime.launch_enter_hook)  # triton's default: an empty chain
    assert not _hooked(None)
    assert _hooked(print)
