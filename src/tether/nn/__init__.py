"""Modules built on tether.functional."""
from tether.nn.surrogate import Arctan, FastSigmoid, Sigmoid, Surrogate
from tether.nn.lif import LIF
from tether.nn.spike_linear import SpikeLinear
from tether.nn.attention import SpikingSelfAttention
from tether.nn.transformer import SpikingMLP, SpikingTransformerBlock
from tether.nn.ttt import TTTMLP

__all__ = ["Surrogate", "Arctan", "Sigmoid", "FastSigmoid", "LIF", "SpikeLinear", "SpikingSelfAttention",
           "SpikingMLP", "SpikingTransformerBlock", "TTTMLP"]
