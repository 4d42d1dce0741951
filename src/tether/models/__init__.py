"""Language models built from tether.nn."""
import importlib

_EXPORTS = {"LMConfig": "lm", "SpikingLM": "lm", "build_model": "lm"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
