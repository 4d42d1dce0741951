"""Stateful LIF layer: carries the membrane across calls (streaming, token-by-token generation)."""
import math
from typing import Optional, Union

import torch
from torch import nn

from tether._checks import RESETS, check_decay, check_real, check_tensor
from tether.functional.lif import lif
from tether.nn.surrogate import Arctan, Surrogate


class LIF(nn.Module):
    """x [T, ..., C] -> spikes (same shape and dtype); the final membrane [..., C] is kept for the next call.

    decay: fixed float in [0, 1], or learnable (PLIF) as sigmoid(w) so that it stays in (0, 1); per_channel
    gives it shape [C]. threshold: a float, or a fixed [C] tensor (one per channel; needs channels). The state is
    detached between calls unless detach_state=False; reset() or a call with a new
    batch shape clears it. firing_rate is the last call's mean spike rate, a device tensor (no sync).
    """

    def __init__(self, channels: Optional[int] = None, decay: float = 0.5,
                 threshold: Union[float, torch.Tensor] = 1.0, *,
                 learnable_decay: bool = False, per_channel: bool = False, surrogate: Optional[Surrogate] = None,
                 reset: str = "hard", v_reset: float = 0.0, detach_reset: bool = True, detach_state: bool = True):
        super().__init__()
        if per_channel and channels is None:
            raise ValueError("channels: per_channel=True needs the channel count, got None")
        check_decay(decay)  # what tether.functional.lif takes
        if learnable_decay and not 0.0 < decay < 1.0:
            raise ValueError(f"decay: expected a value in (0, 1) with learnable_decay (it is sigmoid(logit)), "
                             f"got {decay}")
        if not isinstance(threshold, torch.Tensor):
            check_real("threshold", threshold)
        check_real("v_reset", v_reset)
        if reset not in RESETS:
            raise ValueError(f"reset: expected one of {RESETS}, got {reset!r}")
        self.channels = channels
        if isinstance(threshold, torch.Tensor):
            if channels is None or threshold.shape != (channels,):
                raise ValueError(f"threshold: a per-channel threshold must have shape [channels] = [{channels}], "
                                 f"got {tuple(threshold.shape)}")
            self.register_buffer("threshold", threshold.detach().float().clone())  # [C]
        else:
            self.threshold = float(threshold)
        self.learnable_decay, self.per_channel = learnable_decay, per_channel
        self.surrogate = Arctan() if surrogate is None else surrogate
        self.reset_mode, self.v_reset = reset, float(v_reset)
        self.detach_reset, self.detach_state = detach_reset, detach_state
        shape = (channels,) if per_channel else ()  # [C] or shared
        if learnable_decay:
            self.decay_logit = nn.Parameter(torch.full(shape, math.log(decay / (1.0 - decay))))
        elif per_channel:
            self.register_buffer("decay_per_channel", torch.full(shape, float(decay)))
        else:
            self.decay_value = float(decay)
        self.register_buffer("firing_rate", torch.zeros(()), persistent=False)
        self._v: Optional[torch.Tensor] = None

    @property
    def decay(self):
        """The decay the op sees: a float, or a tensor (learnable: sigmoid of the logit)."""
        if self.learnable_decay:
            return torch.sigmoid(self.decay_logit)
        return self.decay_per_channel if self.per_channel else self.decay_value

    @property
    def state(self) -> Optional[torch.Tensor]:
        """The membrane [..., C] fp32 carried to the next call (None after reset())."""
        return self._v

    @state.setter
    def state(self, v: Optional[torch.Tensor]) -> None:
        self._v = v

    def reset(self) -> None:
        self._v = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, min_ndim=2)
        if self.channels is not None and x.shape[-1] != self.channels:
            raise ValueError(f"x: expected the last dim to be channels={self.channels} ([T, ..., C]), "
                             f"got shape {tuple(x.shape)}")
        v = self._v
        if v is not None and (v.shape != x.shape[1:] or v.device != x.device):
            v = None  # a fresh batch shape starts from rest
        spikes, v_final = lif(x, self.decay, self.threshold, v, surrogate=self.surrogate, reset=self.reset_mode,
                              v_reset=self.v_reset, detach_reset=self.detach_reset)
        self._v = v_final.detach() if self.detach_state else v_final
        self.firing_rate = spikes.detach().mean(dtype=torch.float32)
        return spikes

    def extra_repr(self) -> str:
        decay = "learnable" if self.learnable_decay else ("per-channel" if self.per_channel else self.decay_value)
        threshold = "per-channel" if isinstance(self.threshold, torch.Tensor) else self.threshold
        return (f"channels={self.channels}, decay={decay}, threshold={threshold}, "
                f"surrogate={self.surrogate.name}(alpha={self.surrogate.alpha}), reset={self.reset_mode}, "
                f"v_reset={self.v_reset}, detach_reset={self.detach_reset}, detach_state={self.detach_state}")
