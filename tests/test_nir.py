"""tether.nir: export to and load from NIR (docs/nir.md); snnTorch reads the exported graphs with the same spikes."""
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

nir = pytest.importorskip("nir")

import tether.nir as tnir  # noqa: E402
import tether.nn as tnn  # noqa: E402

T = 300  # time steps


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    """The PyTorch reference rather than the Triton interpreter: the mapping is what is tested, and the
    reference is the spec (the kernels match it bit for bit in their own tests)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _network(decay="scalar", threshold="scalar", reset="hard", v_reset=0.0):
    """Linear(6, 16) -> LIF -> SpikeLinear(16, 8) -> LIF, decay / threshold shared or one per channel."""
    def neurons(channels, base):
        per_channel = decay == "per-channel"
        theta = (torch.rand(channels) * 0.6 + 0.4) * base if threshold == "per-channel" else 0.7 * base
        lif = tnn.LIF(channels, decay=0.9 * base, threshold=theta, per_channel=per_channel, reset=reset,
                      v_reset=v_reset)
        if per_channel:
            lif.decay_per_channel.copy_(torch.rand(channels) * 0.98 + 0.01)  # [C] in (0, 1)
        return lif
    return nn.Sequential(nn.Linear(6, 16), neurons(16, 1.0), tnn.SpikeLinear(16, 8), neurons(8, 0.9))


def _spikes(net, x):
    with torch.no_grad():
        return net(x)


def _input(batch=4, features=6):
    return torch.randn(T, batch, features) * 1.5  # [T, B, in]


def test_decay_mapping_is_exact_in_float32():
    """decay -> tau = dt / (1 - decay) -> 1 - dt / tau gives back every float32 decay exactly after rounding to
    float32 (what tether and snnTorch compute in)."""
    decay = np.random.default_rng(0).uniform(1e-6, 1 - 1e-6, 100_000).astype(np.float32)
    tau = tnir.DT / (1.0 - decay.astype(np.float64))
    assert np.array_equal((1.0 - tnir.DT / tau).astype(np.float32), decay)


@pytest.mark.parametrize("reset,v_reset", [("hard", 0.0), ("hard", -0.25), ("soft", 0.0)])
@pytest.mark.parametrize("threshold", ["scalar", "per-channel"])
@pytest.mark.parametrize("decay", ["scalar", "per-channel"])
def test_round_trip_gives_identical_spikes(decay, threshold, reset, v_reset):
    net = _network(decay, threshold, reset, v_reset)
    graph = tnir.export(net)
    assert [type(n).__name__ for n in graph.nodes.values()] == ["Input", "Affine", "LIF", "Affine", "LIF", "Output"]
    back = tnir.load(graph)
    assert [type(m) for m in back] == [nn.Linear, tnn.LIF, tnn.SpikeLinear, tnn.LIF]
    for original, loaded in ((net[1], back[1]), (net[3], back[3])):
        assert loaded.reset_mode == reset and loaded.v_reset == v_reset
        assert loaded.per_channel == (decay == "per-channel")
        torch.testing.assert_close(torch.as_tensor(loaded.decay), torch.as_tensor(original.decay), rtol=0, atol=0,
                                   check_dtype=False)
    x = _input()
    spikes = _spikes(net, x)
    assert 0.01 < spikes.mean() < 0.5  # the neurons fire, and not always
    assert torch.equal(_spikes(back, x), spikes)


def test_round_trip_through_a_file(tmp_path):
    net = _network("per-channel", "per-channel", "soft")
    path = tmp_path / "net.nir"
    nir.write(path, tnir.export(net))
    graph = nir.read(path)
    assert graph.metadata["dt"] == tnir.DT and graph.nodes["1"].metadata["reset_mechanism"] == "subtract"
    x = _input()
    assert torch.equal(_spikes(tnir.load(graph), x), _spikes(net, x))


def test_threshold_is_reached_exactly():
    """Input in quarters makes the membrane land on the threshold exactly: tether fires there (v >= threshold),
    and so do tether and snnTorch reading the graph, whose v_threshold is the float32 just below (v > it)."""
    layer = tnn.LIF(5, decay=0.5, threshold=1.0)
    x = torch.randint(0, 5, (T, 3, 5)).float() / 4  # [T, B, C] in {0, 1/4, ..., 1}
    spikes = _spikes(layer, x)
    graph = tnir.export(layer)
    assert graph.nodes["0"].v_threshold[0] == np.nextafter(np.float32(1.0), np.float32(0))
    assert tnir.load(graph)[0].threshold == 1.0
    assert torch.equal(_spikes(tnir.load(graph), x), spikes)
    snntorch = pytest.importorskip("snntorch")
    strict = snntorch.Leaky(beta=0.5, threshold=1.0, reset_mechanism="zero", reset_delay=False, init_hidden=True)
    with torch.no_grad():
        assert not torch.equal(torch.stack([strict(x_t) for x_t in x]), spikes)  # ties are frequent here


def _import_into_snntorch(graph):
    import_nir = pytest.importorskip("snntorch.import_nir")
    return import_nir.import_from_nir(graph)


def _run_snntorch(net, x):
    """snnTorch steps one time step per call, carrying the membranes inside its modules."""
    with torch.no_grad():
        return torch.stack([net(x_t)[0] for x_t in x])  # the graph module returns (output, state)


def test_snntorch_reads_the_same_network():
    net = _network()
    x = _input()
    theirs = _run_snntorch(_import_into_snntorch(tnir.export(net)), x)
    spikes = _spikes(net, x)
    assert spikes.mean() > 0.01
    assert torch.equal(theirs, spikes)


def _leaky(node, mechanism, reset_delay, threshold):
    """The snn.Leaky that the node maps to, with the reset named (snnTorch's importer always builds 'zero')."""
    snntorch = pytest.importorskip("snntorch")
    beta = torch.from_numpy(1.0 - tnir.DT / node.tau).float()
    return snntorch.Leaky(beta=beta, threshold=threshold, reset_mechanism=mechanism, reset_delay=reset_delay,
                          init_hidden=True)


@pytest.mark.parametrize("reset_delay", [False, True])
def test_hard_reset_is_snntorch_zero_reset(reset_delay):
    """snnTorch's zero reset, undelayed (the importer's) or delayed (its default), fires as tether's hard reset
    to 0 (docs/nir.md: the delayed one keeps the pre-reset membrane but zeroes it before the next decay)."""
    layer = tnn.LIF(8, decay=0.8)
    x = _input(features=8)
    node = tnir.export(layer).nodes["0"]
    leaky = _leaky(node, "zero", reset_delay, threshold=float(node.v_threshold[0]))  # as the importer does
    with torch.no_grad():
        assert torch.equal(torch.stack([leaky(x_t) for x_t in x]), _spikes(layer, x))


def test_soft_reset_is_snntorch_subtract_while_the_membrane_stays_below_twice_the_threshold():
    """snnTorch's subtract reset (undelayed) fires as tether's soft reset as long as no membrane stays above the
    threshold after its reset, which inputs x <= (2 - decay) * threshold guarantee; above that snnTorch skips
    spikes that tether fires (docs/nir.md). snnTorch subtracts the threshold it fires at, so it is given tether's
    threshold (what tether.nir.load reads), not v_threshold, which is one float32 step lower: the two then differ
    only where the membrane equals the threshold exactly (snnTorch fires on v > threshold), never here."""
    decay, threshold = 0.8, 0.6
    layer = tnn.LIF(8, decay=decay, threshold=threshold, reset="soft")
    graph = tnir.export(layer)
    node, theta = graph.nodes["0"], tnir.load(graph)[0].threshold
    bounded = (torch.rand(T, 4, 8) * 1.8 - 0.8) * (2 - decay) * threshold  # [T, B, C] <= (2 - decay) threshold
    leaky = _leaky(node, "subtract", reset_delay=False, threshold=theta)
    with torch.no_grad():
        assert torch.equal(torch.stack([leaky(x_t) for x_t in bounded]), _spikes(layer, bounded))
    layer.reset()
    strong = bounded * 3
    leaky = _leaky(node, "subtract", reset_delay=False, threshold=theta)
    with torch.no_grad():
        assert not torch.equal(torch.stack([leaky(x_t) for x_t in strong]), _spikes(layer, strong))


def test_refuses_what_nir_cannot_express():
    blocks = nn.Sequential(nn.Sequential(OrderedDict(fc=nn.Linear(8, 8), lif=tnn.LIF(8),
                                                     attn=tnn.SpikingSelfAttention(8, 2))))
    with pytest.raises(TypeError, match=r"^tether\.nir\.export: SpikingSelfAttention \(at blocks\.0\.attn\) has no "
                                        r"NIR primitive; NIR can express tether\.nn\.LIF"):
        tnir.export(nn.Sequential(OrderedDict(blocks=blocks)))
    with pytest.raises(TypeError, match=r"TTTMLP \(at 1\) has no NIR primitive"):
        tnir.export(nn.Sequential(nn.Linear(8, 8), tnn.TTTMLP(8, 2)))
    with pytest.raises(TypeError, match=r"LayerNorm \(at the root\) has no NIR primitive"):
        tnir.export(nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"LIF \(at 1\) has channels=4, but the layer before it gives 8"):
        tnir.export(nn.Sequential(nn.Linear(3, 8), tnn.LIF(4)))
    with pytest.raises(ValueError, match="in_features"):
        tnir.export(tnn.LIF())
    assert tnir.export(tnn.LIF(), in_features=3).nodes["0"].tau.shape == (3,)


def test_load_refuses_what_tether_cannot_run():
    graph = tnir.export(nn.Sequential(nn.Linear(3, 4), tnn.LIF(4)))
    graph.nodes["1"].v_leak = np.full(4, 0.1)
    with pytest.raises(ValueError, match=r"nir\.LIF \(node '1'\) has v_leak"):
        tnir.load(graph)
    graph = tnir.export(tnn.LIF(4))
    graph.nodes["0"].tau = np.full(4, tnir.DT / 2)  # tau < dt
    graph.nodes["0"].r = graph.nodes["0"].tau / tnir.DT
    with pytest.raises(ValueError, match=r"decay 1 - dt / tau"):
        tnir.load(graph)
    scale = nir.NIRGraph.from_list(nir.Input(np.array([4])), nir.Scale(np.ones(4)), nir.Output(np.array([4])))
    with pytest.raises(TypeError, match=r"nir\.Scale .* has no tether module"):
        tnir.load(scale)
