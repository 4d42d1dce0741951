"""Surrogate-gradient objects: which sg'(u) an LIF uses in backward, and a spike function on their own."""
import torch
from torch import nn

from tether._checks import SURROGATES, check_alpha
from tether.functional.lif import spike


class Surrogate(nn.Module):
    """Base: `name` is one of tether._checks.SURROGATES; sg(u) = H(u) forward, sg'(u) backward; alpha > 0."""

    name: str

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = check_alpha(alpha)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return spike(u, self.name, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Arctan(Surrogate):
    """sg'(u) = (alpha / 2) / (1 + (pi alpha u / 2)^2)."""

    name = "arctan"

    def __init__(self, alpha: float = SURROGATES["arctan"][0]):
        super().__init__(alpha)


class Sigmoid(Surrogate):
    """sg'(u) = alpha sig(alpha u) (1 - sig(alpha u))."""

    name = "sigmoid"

    def __init__(self, alpha: float = SURROGATES["sigmoid"][0]):
        super().__init__(alpha)


class FastSigmoid(Surrogate):
    """sg'(u) = 1 / (1 + alpha |u|)^2 (SuperSpike)."""

    name = "fast_sigmoid"

    def __init__(self, alpha: float = SURROGATES["fast_sigmoid"][0]):
        super().__init__(alpha)
