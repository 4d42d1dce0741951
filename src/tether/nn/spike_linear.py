"""nn.Linear for spike inputs: saves its input for backward as packed bits and records its firing rate."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from tether.functional.spike_linear import spike_linear


class SpikeLinear(nn.Linear):
    """``nn.Linear`` whose input is spikes (0/1).

    ``pack=True`` (default): the input is kept for backward as packed bits (``tether.functional.spike_linear``);
    ``pack=False``: plain ``F.linear``, which keeps a float copy (the eager baseline).
    ``input_rate`` (0-d device tensor, no sync) is the mean of the last input: its share of ones is the share
    of synapses that did an accumulate, used for the energy estimate.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, pack: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.pack = pack
        self.input_rate = None

    def forward(self, spikes: torch.Tensor) -> torch.Tensor:
        self.input_rate = spikes.detach().mean(dtype=torch.float32)
        if self.pack:
            return spike_linear(spikes, self.weight, self.bias)
        return F.linear(spikes, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pack={self.pack}"
