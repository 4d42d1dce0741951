"""Language models built from tether.nn."""
from tether.models.lm import LMConfig, SpikingLM, build_model

__all__ = ["LMConfig", "SpikingLM", "build_model"]
