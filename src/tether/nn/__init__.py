"""Modules built on tether.functional."""
import importlib

# public name -> submodule of tether.nn that defines it (imported on first use)
_EXPORTS = {
    "Surrogate": "surrogate",
    "Arctan": "surrogate",
    "Sigmoid": "surrogate",
    "FastSigmoid": "surrogate",
    "LIF": "lif",
    "SpikeLinear": "spike_linear",
    "SpikingSelfAttention": "attention",
    "SpikingMLP": "transformer",
    "SpikingTransformerBlock": "transformer",
    "TTTMLP": "ttt",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
