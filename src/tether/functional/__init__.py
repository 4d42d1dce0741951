"""Autograd ops: each picks the fused Triton kernel or the pure-PyTorch reference (tether._backend)."""
from tether.functional.lif import lif
from tether.functional.pack import pack_spikes, unpack_spikes
from tether.functional.spike_attention import spike_attention, spike_attention_qkv
from tether.functional.spike_linear import spike_linear
from tether.functional.ttt_mlp import ttt_mlp

__all__ = ["lif", "pack_spikes", "unpack_spikes", "spike_attention", "spike_attention_qkv", "spike_linear", "ttt_mlp"]
