"""NIR (Neuromorphic Intermediate Representation) export and import: ``export(module) -> nir.NIRGraph`` for an
``nn.Sequential`` of ``tether.nn.LIF``, ``torch.nn.Linear`` and ``tether.nn.SpikeLinear``, and
``load(graph) -> nn.Sequential`` for a chain of NIR ``LIF``, ``Affine`` and ``Linear`` nodes.

tether's LIF is discrete-time, NIR's is continuous (``tau dv/dt = (v_leak - v) + r I``). The mapping, derived
in docs/nir.md, is forward Euler at a step ``dt`` (the graph's ``metadata["dt"]``, default 1e-4, the step
snnTorch's importer assumes):
    tau = dt / (1 - decay),  r = tau / dt,  v_leak = 0,
    v_threshold = the largest float32 below the threshold (NIR fires on v > v_threshold, tether on v >= it),
    v_reset = v_reset (hard reset), or 0 and ``metadata["reset_mechanism"] = "subtract"`` (soft reset).
Needs the optional extra: ``pip install "tether[nir]"``.
"""
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch
from torch import nn

try:
    import nir  # absolute import: the PyPI package, not this module
except ImportError as error:  # pragma: no cover - depends on the install
    raise ImportError('tether.nir needs the NIR package: pip install "tether[nir]"') from error

from tether.nn.lif import LIF
from tether.nn.spike_linear import SpikeLinear

DT = 1e-4  # snnTorch's importer discretises every NIR LIF with this step, so graphs default to it
EXPRESSIBLE = ("tether.nn.LIF (as nir.LIF), torch.nn.Linear and tether.nn.SpikeLinear (as nir.Affine, or nir.Linear "
               "without a bias), in an nn.Sequential")
READABLE = "nir.Input, nir.Output, nir.Affine, nir.Linear and nir.LIF"
RESET_KEY = "reset_mechanism"  # LIF node metadata: "reset" (to v_reset, NIR's own rule) or "subtract" (soft)


def export(module: nn.Module, *, dt: float = DT, in_features: Optional[int] = None) -> "nir.NIRGraph":
    """module: an nn.Sequential (nested ones are flattened; each node is named by its module path) of LIF and
    linear layers, or one such layer -> the chain input -> layers -> output as a nir.NIRGraph.

    in_features: the input width, needed only when the first layer is an LIF without ``channels``.
    Decay, threshold and reset are mapped as the module docstring says; the surrogate, detach options and the
    carried state have no NIR counterpart and are not written.
    """
    if not dt > 0:
        raise ValueError(f"dt: expected a positive time step, got {dt}")
    layers = list(_layers(module, ""))  # [(path, layer)]
    if not layers:
        raise ValueError("module: expected at least one LIF or linear layer, got an empty nn.Sequential")
    first_path, first = layers[0]
    width = in_features if in_features is not None else (
        first.in_features if isinstance(first, nn.Linear) else first.channels)
    if width is None:
        raise ValueError(f"in_features: the first layer, LIF (at {_where(first_path)}), has no channel count; "
                         "pass in_features=")
    nodes = OrderedDict(input=nir.Input(input_type=np.array([width])))
    for path, layer in layers:
        key = path or "0"
        if key in nodes:
            raise ValueError(f"module: a layer at {key!r} clashes with the graph's own {key!r} node; rename it")
        if isinstance(layer, nn.Linear):
            if layer.in_features != width:
                raise ValueError(f"tether.nir.export: {type(layer).__name__} (at {_where(path)}) takes "
                                 f"in_features={layer.in_features}, but the layer before it gives {width}")
            nodes[key], width = _linear_node(layer), layer.out_features
        else:
            nodes[key] = _lif_node(path, layer, width, dt)
    nodes["output"] = nir.Output(output_type=np.array([width]))
    keys = list(nodes)
    return nir.NIRGraph(nodes=dict(nodes), edges=list(zip(keys, keys[1:])),
                        metadata={"dt": float(dt), "producer": "tether"})


def load(graph: "nir.NIRGraph", *, dt: Optional[float] = None) -> nn.Sequential:
    """A chain input -> nodes -> output of nir.Affine / nir.Linear / nir.LIF -> nn.Sequential of torch.nn.Linear,
    tether.nn.SpikeLinear (a linear layer fed by an LIF) and tether.nn.LIF, named by the node keys ('.' -> '_').

    dt: the step to discretise at; default the graph's metadata["dt"], else 1e-4. The modules take time-major
    input [T, ..., features] and their parameters are fixed (not learnable) copies of the graph's.
    """
    dt = float(graph.metadata.get("dt", DT) if dt is None else dt)
    if not dt > 0:
        raise ValueError(f"dt: expected a positive time step, got {dt}")
    modules = OrderedDict()
    fed_spikes = False
    for key in _chain(graph):
        node = graph.nodes[key]
        if isinstance(node, nir.LIF):
            module = _lif_module(key, node, dt)
        elif isinstance(node, (nir.Affine, nir.Linear)):
            module = _linear_module(key, node, fed_spikes)
        else:
            raise TypeError(f"tether.nir.load: nir.{type(node).__name__} (node {key!r}) has no tether module; "
                            f"tether.nir.load reads {READABLE}")
        fed_spikes = isinstance(node, nir.LIF)
        modules[key.replace(".", "_")] = module
    return nn.Sequential(modules)


# --- export -------------------------------------------------------------------------------------------------

def _where(path: str) -> str:
    return path or "the root"


def _layers(module: nn.Module, path: str):
    """(path, layer) for each LIF / linear layer in order; anything else is refused, named by its path."""
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _layers(child, f"{path}.{name}" if path else name)
    elif isinstance(module, (LIF, nn.Linear)):  # SpikeLinear is an nn.Linear
        yield path, module
    else:
        raise TypeError(f"tether.nir.export: {type(module).__name__} (at {_where(path)}) has no NIR primitive; "
                        f"NIR can express {EXPRESSIBLE}")


def _numpy(t: torch.Tensor) -> np.ndarray:
    """float64 stays float64, every other float dtype (fp32, bf16, fp16) is written as float32."""
    t = t.detach().cpu()
    return t.numpy() if t.dtype == torch.float64 else t.float().numpy()


def _linear_node(layer: nn.Linear) -> "nir.NIRNode":
    if layer.bias is None:
        return nir.Linear(weight=_numpy(layer.weight))  # [out, in]
    return nir.Affine(weight=_numpy(layer.weight), bias=_numpy(layer.bias))


def _per_neuron(name: str, value, path: str, width: int) -> np.ndarray:
    """A decay / threshold (float, 0-d or [C] tensor) as float32 [width]: what tether's fp32 arithmetic uses."""
    array = np.asarray(value.detach().cpu().float() if isinstance(value, torch.Tensor) else value, np.float32)
    if array.ndim == 1 and array.shape[0] != width:
        raise ValueError(f"tether.nir.export: LIF (at {_where(path)}) has a per-channel {name} of {array.shape[0]} "
                         f"channels, but the layer before it gives {width} features")
    return np.broadcast_to(array, (width,)).copy()


def _lif_node(path: str, layer: LIF, width: int, dt: float) -> "nir.LIF":
    if layer.channels is not None and layer.channels != width:
        raise ValueError(f"tether.nir.export: LIF (at {_where(path)}) has channels={layer.channels}, but the layer "
                         f"before it gives {width} features")
    decay = _per_neuron("decay", layer.decay, path, width).astype(np.float64)  # float32 values, exact in float64
    threshold = _per_neuron("threshold", layer.threshold, path, width)
    tau = dt / (1.0 - decay)  # forward Euler: decay = 1 - dt / tau
    soft = layer.reset_mode == "soft"
    return nir.LIF(
        tau=tau, r=tau / dt, v_leak=np.zeros(width),  # r dt / tau = 1: the input is added unscaled
        v_threshold=np.nextafter(threshold, np.float32(-np.inf)).astype(np.float64),  # v > this <=> v >= threshold
        v_reset=np.full(width, 0.0 if soft else layer.v_reset),
        metadata={RESET_KEY: "subtract" if soft else "reset"})


# --- load ---------------------------------------------------------------------------------------------------

def _chain(graph: "nir.NIRGraph") -> list:
    """The keys of the nodes between the graph's one Input and one Output, in order; refuses anything but a
    chain (a fork, a merge, a loop), naming the node."""
    ends = {kind: [k for k, n in graph.nodes.items() if isinstance(n, kind)] for kind in (nir.Input, nir.Output)}
    for kind, keys in ends.items():
        if len(keys) != 1:
            raise ValueError(f"tether.nir.load: expected one nir.{kind.__name__} node, got {len(keys)} {keys}")
    after = {}
    for source, target in graph.edges:
        if source in after:
            raise ValueError(f"tether.nir.load: node {source!r} feeds {after[source]!r} and {target!r}; "
                             "tether.nir.load reads chains input -> ... -> output only")
        after[source] = target
    key, keys = ends[nir.Input][0], []
    while key != ends[nir.Output][0]:
        if key not in after:
            raise ValueError(f"tether.nir.load: node {key!r} feeds nothing before the output is reached")
        key = after[key]
        if key in keys or key == ends[nir.Input][0]:
            raise ValueError(f"tether.nir.load: node {key!r} is on a loop; tether.nir.load reads chains only")
        keys.append(key)
    if len(keys) + 1 != len(graph.nodes) or len(graph.edges) != len(keys):
        raise ValueError("tether.nir.load: the graph has nodes or edges off its input -> output chain; "
                         "tether.nir.load reads chains only")
    return keys[:-1]


def _linear_module(key: str, node, fed_spikes: bool) -> nn.Linear:
    weight = torch.from_numpy(np.array(node.weight))  # [out, in]
    if weight.dim() != 2:
        raise ValueError(f"tether.nir.load: nir.{type(node).__name__} (node {key!r}): expected a 2-d weight "
                         f"[out, in], got shape {tuple(weight.shape)}")
    bias = torch.from_numpy(np.array(node.bias)) if isinstance(node, nir.Affine) else None
    layer = (SpikeLinear if fed_spikes else nn.Linear)(weight.shape[1], weight.shape[0], bias is not None,
                                                       dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _uniform(array: np.ndarray):
    """The one value of an array whose entries are all equal, else None."""
    values = np.unique(array)
    return values[0] if values.size == 1 else None


def _lif_module(key: str, node: "nir.LIF", dt: float) -> LIF:
    where = f"tether.nir.load: nir.LIF (node {key!r})"
    tau, r = np.asarray(node.tau, np.float64), np.asarray(node.r, np.float64)
    if tau.ndim > 1:
        raise ValueError(f"{where} has neurons of shape {tau.shape}; tether.nn.LIF takes one channel axis [C]")
    if not np.allclose(node.v_leak, 0.0):
        raise ValueError(f"{where} has v_leak {node.v_leak}; tether.nn.LIF has no leak potential (expected 0)")
    if not np.allclose(r * dt / tau, 1.0):
        raise ValueError(f"{where}: r * dt / tau scales its input by {r * dt / tau}; tether.nn.LIF adds its input "
                         f"unscaled (expected r = tau / dt, dt = {dt})")
    decay = (1.0 - dt / tau).astype(np.float32)  # forward Euler, in the fp32 that tether computes in
    if not ((decay > 0) & (decay < 1)).all():
        raise ValueError(f"{where}: tau {tau} at dt = {dt} gives a decay 1 - dt / tau of {decay}; "
                         "expected it in (0, 1) (tau > dt)")
    v_threshold = np.asarray(node.v_threshold, np.float64)
    threshold = v_threshold.astype(np.float32)  # the smallest float32 above v_threshold: v > v_threshold in fp32
    threshold = np.where(threshold.astype(np.float64) > v_threshold, threshold,
                         np.nextafter(threshold, np.float32(np.inf)))
    mechanism = node.metadata.get(RESET_KEY, "reset")
    mechanism = mechanism.decode() if isinstance(mechanism, bytes) else str(mechanism)
    if mechanism not in ("reset", "subtract"):
        raise ValueError(f"{where}: metadata {RESET_KEY}: expected 'reset' or 'subtract', got {mechanism!r}")
    v_reset = _uniform(np.asarray(node.v_reset, np.float64))
    if mechanism == "reset" and v_reset is None:
        raise ValueError(f"{where} has per-neuron v_reset {node.v_reset}; tether.nn.LIF takes one v_reset")
    channels = int(tau.shape[0]) if tau.ndim == 1 else None
    decay_value, threshold_value = _uniform(decay), _uniform(threshold)
    layer = LIF(channels, decay=0.5 if decay_value is None else float(decay_value),
                threshold=torch.from_numpy(threshold) if threshold_value is None else float(threshold_value),
                per_channel=decay_value is None, reset="soft" if mechanism == "subtract" else "hard",
                v_reset=0.0 if mechanism == "subtract" else float(v_reset))
    if decay_value is None:
        layer.decay_per_channel.copy_(torch.from_numpy(decay))  # [C]
    return layer
