"""Autograd ops: each picks the fused Triton kernel or the pure-PyTorch reference (tether._backend)."""
import importlib

# public name -> submodule of tether.functional that defines it (imported on first use)
_EXPORTS = {
    "lif": "lif",
    "pack_spikes": "pack",
    "unpack_spikes": "pack",
    "spike_attention": "spike_attention",
    "spike_linear": "spike_linear",
    "ttt_mlp": "ttt_mlp",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
