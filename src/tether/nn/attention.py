"""Spiking self-attention over the token axis: LIF neurons, linear spike-driven attention, O(1) state per token."""
from typing import Optional, Tuple

import torch
import torch.nn as nn

from tether._checks import FORMS, VALUES
from tether.functional.lif import lif, lif_eager
from tether.functional.norm_lif import norm_lif
from tether.functional.spike_attention import (output_scale, spike_attention, spike_attention_qkv,
                                               spike_attention_qkv_eager)
from tether.nn.spike_linear import SpikeLinear

# backend -> attention op on packed qkv [T, B, 3, H, D]: "fused" runs the Triton kernels (tether.functional
# picks kernel or reference per device), "eager" is the same math from plain PyTorch ops on every device (the
# benchmark's baseline); NormLIF picks its neurons the same way
def _fused_attention(qkv, gamma, memory, *, binary):
    """binary: which of q, k, v are an LIF's spikes (0/1: True all, "qk" q and k), which the kernels keep for the
    backward as bits."""
    return spike_attention_qkv(qkv, gamma, memory, binary=binary)


def _eager_attention(qkv, gamma, memory, *, binary):
    return spike_attention_qkv_eager(qkv, gamma, memory)


ATTENTION_OPS = {"fused": _fused_attention, "eager": _eager_attention}
BACKENDS = tuple(ATTENTION_OPS)


def _autocast_dtype(x: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """The dtype autocast computes in on x's device, else default."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else default


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


class NormLIF(nn.Module):
    """LayerNorm, then LIF neurons over time: turns a real signal into spikes at a rate the norm keeps steady.

    Every group of neurons sits behind a norm so that its input has unit scale whatever the firing rates and
    weights upstream (a fixed threshold of 1 then fires at a useful rate from the first step on).
    ``backend="fused"``: nn.LayerNorm, then ``tether.functional.lif`` (the LIF kernels); with
    ``fuse_norm=True``, ``tether.functional.norm_lif`` (norm and neurons in one pair of Triton kernels: less
    memory, but slower in the training step on the H200 so far, benchmarks/results/block_ops.md);
    ``"eager"``: nn.LayerNorm, then the reference Python loop.
    forward(x ``[T, B, channels]``, membrane ``[B, channels]`` or None) -> (spikes like x, membrane fp32).
    ``rate``: mean of the last spikes (0-d device tensor, no sync).
    """

    def __init__(self, channels: int, *, decay: float = 0.5, threshold: float = 1.0,
                 surrogate: str = "arctan", backend: str = "fused", fuse_norm: bool = False):
        super().__init__()
        _check_backend(backend)
        self.norm = nn.LayerNorm(channels)
        self.decay, self.threshold, self.surrogate, self.backend = decay, threshold, surrogate, backend
        self.fuse_norm = fuse_norm
        self.rate = None

    def forward(self, x: torch.Tensor, membrane: Optional[torch.Tensor] = None):
        # spikes in the autocast dtype: half the traffic, and what the next layer reads or saves is half too
        dtype = _autocast_dtype(x, x.dtype)
        if self.backend == "fused" and self.fuse_norm:  # one op: the normalized input is never stored
            spikes, membrane = norm_lif(x, self.norm.weight, self.norm.bias, self.decay, self.threshold, membrane,
                                        eps=self.norm.eps, surrogate=self.surrogate, dtype=dtype)
        else:
            x = self.norm(x).to(dtype)  # the norm runs in fp32 even under autocast
            neurons = lif if self.backend == "fused" else lif_eager
            spikes, membrane = neurons(x, self.decay, self.threshold, membrane, surrogate=self.surrogate)
        self.rate = spikes.detach().mean(dtype=torch.float32)
        return spikes, membrane

    def extra_repr(self) -> str:
        return (f"decay={self.decay}, threshold={self.threshold}, surrogate={self.surrogate!r}, "
                f"backend={self.backend!r}" + (", fuse_norm=True" if self.fuse_norm else ""))


# Expected share of firing inputs at init (P(z >= 1) for a unit normal z: a LayerNorm'd input crossing threshold 1).
INIT_RATE = 0.15


def init_spike_fed(layer: nn.Linear) -> None:
    """Spike-fed layer that feeds a NormLIF: weights sized so its output has about unit scale.

    The norm behind it would fix the forward scale anyway, but its backward multiplies gradients by
    1 / (input scale): with GPT's std 0.02 that gain is large per norm and compounds per block (gradients
    explode towards the input). Unit scale keeps that gain near 1.
    """
    nn.init.normal_(layer.weight, std=(INIT_RATE * layer.in_features) ** -0.5)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_residual_out(layer: nn.Linear) -> None:
    """Last layer of a residual branch: small (GPT-2's std 0.02), so each block starts near the identity."""
    nn.init.normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def default_gammas(n_heads: int) -> torch.Tensor:
    """Per-head memory decays 1 - 2^-(1..8) spread over the heads: time scales from 2 to 256 tokens."""
    return 1.0 - torch.exp2(-torch.linspace(1.0, 8.0, n_heads))  # [H]


class SpikingSelfAttention(nn.Module):
    """Causal spiking self-attention; tokens are time steps.

    ``x [T, B, d_model]`` (real) -> LayerNorm + LIF -> spikes -> Q, K, V projection (``SpikeLinear``, input
    kept as bits) -> LayerNorm + LIF -> spikes ``q, k, v [T, B, H, D]`` -> linear spike-driven attention
    ``C_t = gamma C_{t-1} + k_t v_t``, ``o_t = q_t C_t`` (elementwise form) -> times ``1 - gamma`` (the
    counts in ``C`` grow up to ``1 / (1 - gamma)``: this keeps ``o`` in [0, 1] for any T) -> output
    projection (real input).

    ``values="real"``: only q and k spike; v is the LayerNorm'd projection itself, so the memory holds a
    decayed sum of real features gated by k spikes and the output is that sum gated by q spikes (|o| <= the
    largest |v|). Every linear layer still reads spikes (q, k, v come out of the same spike-fed
    projection); only the attention's elementwise products see real values.

    ``form="matrix"``: ``S_t = gamma S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t / D`` (a ``[D, D]`` memory per head
    that mixes channels; chunked PyTorch, no Triton kernel) -> times ``1 - gamma``, also in [0, 1].

    ``gamma``: None (per-head spread, ``default_gammas``), a float for every head, or ``[H]``; learnable
    (kept in (0, 1) as ``sigmoid(logit)``) unless ``learnable_gamma=False``.
    forward(x, state=None) -> (y ``[T, B, d_model]``, state); state = (input membrane ``[B, C]``,
    q/k/v membrane ``[B, 3C]`` (``[B, 2C]`` with real values), attention memory ``[B, H, D]`` or
    ``[B, H, D, D]`` (matrix)), all fp32; None starts from zeros.
    """

    def __init__(self, d_model: int, n_heads: int, *, gamma=None, learnable_gamma: bool = True,
                 decay: float = 0.5, threshold: float = 1.0, surrogate: str = "arctan", backend: str = "fused",
                 form: str = "elementwise", values: str = "spikes"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={n_heads}, got {d_model}")
        _check_backend(backend)
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        if values not in VALUES:
            raise ValueError(f"values: expected one of {VALUES}, got {values!r}")
        self.d_model, self.n_heads, self.backend, self.form, self.values = d_model, n_heads, backend, form, values
        neurons = dict(decay=decay, threshold=threshold, surrogate=surrogate, backend=backend)
        self.input_neurons = NormLIF(d_model, **neurons)
        self.qkv = SpikeLinear(d_model, 3 * d_model, bias=False, pack=backend == "fused")
        self.n_spiking = 3 * d_model if values == "spikes" else 2 * d_model  # q, k (and v) spike
        self.qkv_neurons = NormLIF(self.n_spiking, **neurons)
        self.v_norm = nn.LayerNorm(d_model) if values == "real" else None
        self.proj = nn.Linear(d_model, d_model)
        init_spike_fed(self.qkv)
        init_residual_out(self.proj)

        if gamma is None:
            gamma = default_gammas(n_heads)
        gamma = torch.as_tensor(gamma, dtype=torch.float32).expand(n_heads).clone()  # [H]
        if not ((gamma > 0) & (gamma < 1)).all():
            raise ValueError(f"gamma: expected values in (0, 1), got {gamma.tolist()}")
        logit = torch.log(gamma) - torch.log1p(-gamma)
        if learnable_gamma:
            self.gamma_logit = nn.Parameter(logit)
        else:
            self.register_buffer("gamma_logit", logit)

    @property
    def gamma(self) -> torch.Tensor:
        return torch.sigmoid(self.gamma_logit)  # [H]

    def forward(self, x: torch.Tensor, state: Optional[Tuple[torch.Tensor, ...]] = None):
        T, B, C = x.shape
        H, D = self.n_heads, C // self.n_heads
        v_input, v_qkv, memory = state if state is not None else (None, None, None)
        spikes, v_input = self.input_neurons(x, v_input)  # [T, B, C]
        projected = self.qkv(spikes)  # [T, B, 3C]
        if self.v_norm is None:
            qkv, v_qkv = self.qkv_neurons(projected, v_qkv)  # [T, B, 3C] spikes
            binary = True
        else:
            binary = "qk"
            qk, v_qkv = self.qkv_neurons(projected[..., :2 * C], v_qkv)  # [T, B, 2C] spikes
            v = self.v_norm(projected[..., 2 * C:]).to(qk.dtype)  # [T, B, C] real
            qkv = torch.cat((qk, v), dim=-1)  # [T, B, 3C]
        gamma = self.gamma  # [H]
        qkv = qkv.view(T, B, 3, H, D)
        if self.form == "matrix":  # plain PyTorch on both backends
            out, memory = spike_attention(*qkv.unbind(2), gamma, memory, form="matrix")
        else:
            out, memory = ATTENTION_OPS[self.backend](qkv, gamma, memory, binary=binary)  # out [T, B, H, D] fp32
        # [T, B, H, D] (in [0, 1] for spikes); in the autocast dtype (what proj reads), the only copy kept for
        # backward
        dtype = _autocast_dtype(x, out.dtype)
        out = output_scale(out, gamma, dtype)
        return self.proj(out.reshape(T, B, C)), (v_input, v_qkv, memory)

    def init_state(self, batch_size: int, device) -> Tuple[torch.Tensor, ...]:
        C, H = self.d_model, self.n_heads
        memory = (batch_size, H, C // H) + ((C // H,) if self.form == "matrix" else ())
        shapes = [(batch_size, C), (batch_size, self.n_spiking), memory]  # membranes, attention memory
        return tuple(torch.zeros(shape, device=device) for shape in shapes)

    def synapses(self):
        """(layer, spike-fed) for each linear layer, for the energy estimate."""
        return [(self.qkv, True), (self.proj, False)]

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, backend={self.backend!r}, form={self.form!r}, "
                f"values={self.values!r}")
