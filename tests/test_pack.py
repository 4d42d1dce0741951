"""Bit-packed spikes: numpy.packbits(bitorder="little") layout, round trip, kernel and reference paths."""
import numpy as np
import pytest
import torch

import tether._backend
from tether._backend import use_triton
from tether.functional.pack import pack_spikes, unpack_spikes
from tether.kernels import pack as kernels
from tether.reference import pack as reference

SHAPES = [(1,), (8,), (13,), (3, 5, 17), (2, 64), (4, 1), (2, 3, 9)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.bool, torch.uint8]


def random_spikes(shape, dtype, device):
    return (torch.rand(shape, device=device) < 0.4).to(dtype)


def numpy_packbits(s):
    return torch.from_numpy(np.packbits(s.cpu().float().numpy() != 0, axis=-1, bitorder="little"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_numpy_and_round_trips(device, shape, dtype):
    s = random_spikes(shape, dtype, device)
    assert use_triton(s)
    packed = kernels.pack_spikes(s)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], (shape[-1] + 7) // 8)
    assert torch.equal(packed.cpu(), numpy_packbits(s))
    assert torch.equal(kernels.unpack_spikes(packed, shape[-1], dtype), s)
    assert torch.equal(pack_spikes(s), packed)
    assert torch.equal(unpack_spikes(packed, shape[-1], dtype), s)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_numpy_and_round_trips(shape):
    s = random_spikes(shape, torch.float32, "cpu")
    packed = reference.pack_spikes(s)
    assert torch.equal(packed, numpy_packbits(s))
    assert torch.equal(reference.unpack_spikes(packed, shape[-1]), s)


def test_without_interpreter_same_result(monkeypatch):
    s = random_spikes((3, 21), torch.float32, "cpu")
    packed = pack_spikes(s)
    monkeypatch.setattr(tether._backend, "interpreting", lambda: False)
    assert not use_triton(s)
    assert torch.equal(pack_spikes(s), packed)
    assert torch.equal(unpack_spikes(packed, 21, torch.float16), s.half())


def test_pack_nonzero_is_spike(device):
    s = torch.tensor([0.0, 2.0, -1.0, 0.0, 0.5, 0, 0, 0, 1.0], device=device)
    assert pack_spikes(s).tolist() == [0b00010110, 0b1]


@pytest.mark.parametrize("call,error,words", [
    (lambda: pack_spikes(torch.tensor(1.0)), ValueError, ["s", "at least 1 dims", "()"]),
    (lambda: unpack_spikes(torch.zeros(2, 3), 20), TypeError, ["packed", "uint8", "float32"]),
    (lambda: unpack_spikes(torch.zeros(2, 3, dtype=torch.uint8), 25), ValueError, ["n", "3", "25"]),
])
def test_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_custom_ops_trace_without_graph_break(device):
    s = random_spikes((3, 5, 19), torch.float32, device)
    torch.library.opcheck(torch.ops.tether.pack_spikes.default, (s,))
    torch.library.opcheck(torch.ops.tether.unpack_spikes.default, (pack_spikes(s), 19, torch.float32))
    round_trip = torch.compile(lambda x: unpack_spikes(pack_spikes(x), 19), fullgraph=True, backend="aot_eager")
    assert torch.equal(round_trip(s), s)
