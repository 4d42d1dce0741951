"""Spiking MLP and transformer block (pre-norm, real-valued residual stream, spikes into every linear layer
except the attention output projection)."""
from typing import Optional, Tuple

import torch
import torch.nn as nn

from tether.nn.attention import NormLIF, SpikingSelfAttention, _check_backend, init_residual_out, init_spike_fed
from tether.nn.spike_linear import SpikeLinear


class SpikingMLP(nn.Module):
    """``x [T, B, d_model]`` -> LayerNorm + LIF -> SpikeLinear(d_model, hidden) -> LayerNorm + LIF ->
    SpikeLinear(hidden, d_model). Both linear layers are fed spikes (kept as bits for backward).

    forward(x, state=None) -> (y ``[T, B, d_model]``, state = (input membrane ``[B, d_model]``,
    hidden membrane ``[B, hidden]``)).
    """

    def __init__(self, d_model: int, hidden: Optional[int] = None, *, decay: float = 0.5, threshold: float = 1.0,
                 surrogate: str = "arctan", backend: str = "fused"):
        super().__init__()
        _check_backend(backend)
        hidden = hidden or 4 * d_model
        self.d_model, self.hidden = d_model, hidden
        neurons = dict(decay=decay, threshold=threshold, surrogate=surrogate, backend=backend)
        self.input_neurons = NormLIF(d_model, **neurons)
        self.fc1 = SpikeLinear(d_model, hidden, pack=backend == "fused")
        self.hidden_neurons = NormLIF(hidden, **neurons)
        self.fc2 = SpikeLinear(hidden, d_model, pack=backend == "fused")
        init_spike_fed(self.fc1)
        init_residual_out(self.fc2)

    def forward(self, x: torch.Tensor, state: Optional[Tuple[torch.Tensor, ...]] = None):
        v_input, v_hidden = state if state is not None else (None, None)
        spikes, v_input = self.input_neurons(x, v_input)  # [T, B, d_model]
        spikes, v_hidden = self.hidden_neurons(self.fc1(spikes), v_hidden)  # [T, B, hidden]
        return self.fc2(spikes), (v_input, v_hidden)

    def init_state(self, batch_size: int, device) -> Tuple[torch.Tensor, ...]:
        return (torch.zeros(batch_size, self.d_model, device=device),
                torch.zeros(batch_size, self.hidden, device=device))

    def synapses(self):
        return [(self.fc1, True), (self.fc2, True)]


class SpikingTransformerBlock(nn.Module):
    """``x + attn(x)``, then ``+ mlp(.)``, on a real-valued residual stream ``[T, B, d_model]``; each branch
    starts with its own LayerNorm + LIF (pre-norm). forward(x, state=None) -> (x, (attn state, mlp state))."""

    def __init__(self, d_model: int, n_heads: int, *, mlp_ratio: int = 4, dropout: float = 0.0,
                 decay: float = 0.5, threshold: float = 1.0, surrogate: str = "arctan", backend: str = "fused",
                 gamma=None, learnable_gamma: bool = True, attention: str = "elementwise", values: str = "spikes"):
        super().__init__()
        neurons = dict(decay=decay, threshold=threshold, surrogate=surrogate, backend=backend)
        self.attn = SpikingSelfAttention(d_model, n_heads, gamma=gamma, learnable_gamma=learnable_gamma,
                                         form=attention, values=values, **neurons)
        self.mlp = SpikingMLP(d_model, mlp_ratio * d_model, **neurons)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, state=None):
        attn_state, mlp_state = state if state is not None else (None, None)
        y, attn_state = self.attn(x, attn_state)
        x = x + self.dropout(y)
        y, mlp_state = self.mlp(x, mlp_state)
        return x + self.dropout(y), (attn_state, mlp_state)

    def init_state(self, batch_size: int, device):
        return self.attn.init_state(batch_size, device), self.mlp.init_state(batch_size, device)

    def synapses(self):
        return self.attn.synapses() + self.mlp.synapses()
