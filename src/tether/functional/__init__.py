"""Autograd ops: each picks the fused Triton kernel or the pure-PyTorch reference (tether._backend)."""
from tether.functional.lif import lif, lif_eager
from tether.functional.norm_lif import norm_lif
from tether.functional.pack import pack_spikes, unpack_spikes
from tether.functional.spike_attention import spike_attention, spike_attention_qkv, spike_attention_qkv_eager
from tether.functional.spike_linear import spike_linear
from tether.functional.ttt_mlp import ttt_mlp

__all__ = ["lif", "lif_eager", "norm_lif", "pack_spikes", "unpack_spikes", "spike_attention", "spike_attention_qkv",
           "spike_attention_qkv_eager", "spike_linear", "ttt_mlp"]
