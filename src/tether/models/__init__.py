"""Language models built from tether.nn."""
from tether.models.lm import MODELS, LanguageModel, LMConfig, SoftmaxLM, SpikingLM, TTTMLPLM, build_model

__all__ = ["LMConfig", "LanguageModel", "MODELS", "SoftmaxLM", "SpikingLM", "TTTMLPLM", "build_model"]
