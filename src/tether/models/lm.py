"""Character language models: the spiking transformer (default) and same-size non-spiking baselines.

One class per mixer, one interface (``LanguageModel``: embedding, final norm, head, loss, ``step``,
``generate``, energy and the Hub format); ``build_model(cfg)`` picks the class from ``cfg.mixer``:
- ``SpikingLM`` (``"spiking"``): ``SpikingTransformerBlock`` stacks on ``[T, B, C]``; tokens are time steps
  and every state is carried, so ``step`` costs O(1) per token and a forward reads any length.
- ``SoftmaxLM`` (``"softmax"``): pre-norm GPT blocks with causal SDPA and a GELU MLP (learned positions),
  generating from a KV cache.
- ``TTTMLPLM`` (``"ttt-mlp"``): the same blocks with ``tether.nn.TTTMLP`` as the mixer.
"""
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tether._checks import FORMS, SURROGATES, VALUES
from tether.nn.attention import BACKENDS, NormLIF
from tether.nn.transformer import SpikingTransformerBlock

MIXERS = ("spiking", "softmax", "ttt-mlp")
PJ_PER_MAC, PJ_PER_AC = 4.6, 0.9  # 32-bit float multiply-accumulate / accumulate, 45 nm (Horowitz 2014)


@dataclass
class LMConfig:
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 8
    d_model: int = 384
    block_size: int = 256
    mixer: str = "spiking"
    surrogate: str = "arctan"
    backend: str = "fused"
    mlp_ratio: int = 4
    dropout: float = 0.2
    decay: float = 0.25  # LIF membrane decay (better than 0.5 on the GPU runs: docs/model.md#ablations-2026-12-04)
    threshold: float = 1.0  # LIF firing threshold
    attention: str = "elementwise"  # spiking attention form: "elementwise" ([D] memory a head) or "matrix" ([D, D])
    values: str = "real"  # what the spiking attention accumulates: "real" or "spikes" (q and k spike either way)
    ttt_mini_batch: int = 16  # tokens per TTT-MLP inner gradient step (ttt-mlp mixer)
    vocab: str = ""  # the characters of the token ids, in order ("" if unknown): a saved model can generate

    def __post_init__(self):
        for name, allowed in (("mixer", MIXERS), ("backend", BACKENDS), ("surrogate", tuple(SURROGATES)),
                              ("attention", FORMS), ("values", VALUES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.ttt_mini_batch, int) or self.ttt_mini_batch < 1:
            raise ValueError(f"ttt_mini_batch: expected a positive int, got {self.ttt_mini_batch!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model: expected a multiple of n_head={self.n_head}, got {self.d_model}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        d = {"values": "spikes", **d}  # a config saved before `values` existed: its model accumulated spikes
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**d)


class KVCache:
    """The softmax baseline's generation state, updated in place: keys and values of the last ``L =
    block_size`` tokens, ``k, v [n_layer, B, H, L, D]``, the tokens themselves ``[B, L]`` (to rebuild the
    window when it is full), ``length`` (host int) and ``position`` (the same as a 0-d device long, which a
    CUDA graph of ``step`` reads and advances)."""

    def __init__(self, n_layer: int, batch_size: int, n_heads: int, block_size: int, head_dim: int, device,
                 dtype=torch.float32):
        shape = (n_layer, batch_size, n_heads, block_size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.tokens = torch.zeros(batch_size, block_size, dtype=torch.long, device=device)  # [B, L]
        self.length = 0
        self.position = torch.zeros((), dtype=torch.long, device=device)

    def tensors(self):
        return [self.k, self.v, self.tokens, self.position]

    def reset(self) -> None:
        self.length = 0
        self.position.zero_()


class CausalSelfAttention(nn.Module):
    """Softmax baseline mixer: ``[B, T, C] -> [B, T, C]`` with PyTorch SDPA (causal).

    With ``cache = (k, v [B, H, L, D], positions [T])`` the new tokens' keys and values are written into the
    cache at ``positions`` and the queries attend to every cached key at or before their own position
    (static shapes: a CUDA graph of one generated token captures it)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # [B, H, T, D]
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            k_cache, v_cache, positions = cache
            k_cache.index_copy_(2, positions, k.to(k_cache.dtype))
            v_cache.index_copy_(2, positions, v.to(v_cache.dtype))
            keys = torch.arange(k_cache.shape[2], device=x.device)  # [L]
            mask = keys[None, :] <= positions[:, None]  # [T, L]
            y = F.scaled_dot_product_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm non-spiking block ``[B, T, C]``: ``x + mixer(ln(x))``, ``x + mlp(ln(x))``."""

    def __init__(self, cfg: LMConfig, mixer: nn.Module):
        super().__init__()
        C = cfg.d_model
        self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(C, cfg.mlp_ratio * C), nn.GELU(), nn.Linear(cfg.mlp_ratio * C, C))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None):
        h = self.norm1(x)
        x = x + self.dropout(self.mixer(h) if cache is None else self.mixer(h, cache))
        return x + self.dropout(self.mlp(self.norm2(x)))


def pick(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator=None) -> torch.Tensor:
    """logits [B, V] -> sampled token ids [B]: softmax at ``temperature`` over the ``top_k`` likeliest."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).view(-1)  # [B]


class _Stepper:
    """A model's own decoder for ``generate``: its ``prefill`` / ``step`` over one state, eagerly (see
    ``tether.generate.Decoder`` for the CUDA-graphed one with the same two methods)."""

    def __init__(self, model: "LanguageModel", batch_size: int, device):
        self.model, self.state = model, model.init_state(batch_size, device)

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        logits, self.state = self.model.prefill(idx, self.state)
        return logits

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        logits, self.state = self.model.step(idx, self.state)
        return logits


def _check_idx(idx: torch.Tensor, dims: int) -> None:
    if idx.dim() != dims or idx.dtype != torch.long:
        shape = "[B, T]" if dims == 2 else "[B]"
        raise ValueError(f"idx: expected a {shape} long tensor, got shape {tuple(idx.shape)} {idx.dtype}")


try:  # Hugging Face Hub format (optional extra "hub"): save_pretrained / from_pretrained / push_to_hub
    from huggingface_hub import PyTorchModelHubMixin

    _HUB_BASES = (PyTorchModelHubMixin,)
    _HUB_OPTIONS = dict(library_name="tether",
                        coders={LMConfig: (LMConfig.to_dict, LMConfig.from_dict)})
except ImportError:
    _HUB_BASES, _HUB_OPTIONS = (), {}


class _NoHub:
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise ImportError("from_pretrained needs huggingface_hub: pip install 'tether[hub]'")

    def save_pretrained(self, *args, **kwargs):
        raise ImportError("save_pretrained needs huggingface_hub: pip install 'tether[hub]'")


class LanguageModel(nn.Module, *(_HUB_BASES or (_NoHub,)), **_HUB_OPTIONS):
    """What every mixer's model shares: token embedding, blocks (``_build_blocks``), final LayerNorm, linear
    head, the loss, ``step`` as a one-token ``prefill``, ``generate`` and the energy estimate.

    ``save_pretrained(dir)`` / ``from_pretrained(dir or hub id)`` (with ``huggingface_hub``): ``config.json``
    (the ``LMConfig``, vocabulary included) and ``model.safetensors``. ``LanguageModel.from_pretrained``
    builds the class of the saved ``cfg.mixer``; a subclass's loads only its own mixer.
    """

    mixer = None  # the LMConfig.mixer of a subclass
    max_tokens = None  # a forward's longest input (None: any length)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**{**_HUB_OPTIONS, **kwargs})  # the mixin keeps its coders per class

    def __init__(self, cfg: LMConfig):
        super().__init__()
        if cfg.mixer != self.mixer:
            raise ValueError(f"cfg.mixer: expected {self.mixer!r} for {type(self).__name__}, got {cfg.mixer!r} "
                             f"(build_model(cfg) picks the class)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self._build_blocks(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)
        self._init_weights()

    def _build_blocks(self, cfg: LMConfig) -> None:
        raise NotImplementedError

    def _init_weights(self) -> None:
        raise NotImplementedError

    @classmethod
    def _from_pretrained(cls, *, cfg: LMConfig, **kwargs):
        model_cls = MODELS[cfg.mixer]
        if not issubclass(model_cls, cls):
            raise ValueError(f"cfg.mixer: expected {cls.mixer!r} for {cls.__name__}, got {cfg.mixer!r} "
                             f"(LanguageModel.from_pretrained loads any mixer)")
        return super(LanguageModel, model_cls)._from_pretrained(cfg=cfg, **kwargs)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    def _output(self, x: torch.Tensor, targets: Optional[torch.Tensor]):
        """Final hidden states ``x [B, T, C]`` -> (logits ``[B, T, V]``, mean cross-entropy or None)."""
        logits = self._logits(x)  # [B, T, V]
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def forward(self, idx: torch.Tensor, targets: torch.Tensor = None):
        """idx ``[B, T]`` long -> (logits ``[B, T, V]``, mean cross-entropy or None); every state starts at 0."""
        raise NotImplementedError

    def init_state(self, batch_size: int, device):
        """The generation state before the first token."""
        raise NotImplementedError

    def prefill(self, idx: torch.Tensor, state):
        """Tokens ``idx [B, T]`` continuing ``state`` -> (logits of the last token ``[B, V]``, state): a prompt
        in one call, the same as T calls of ``step``."""
        raise NotImplementedError

    def step(self, idx: torch.Tensor, state):
        """One token ``idx [B]`` -> (logits ``[B, V]``, state)."""
        _check_idx(idx, 1)
        return self.prefill(idx[:, None], state)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None, decoder=None,
                 on_token: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """Prompts ``idx [B, T]`` followed by ``max_new_tokens`` sampled tokens ``[B, T + max_new_tokens]``, in
        eval mode. ``decoder``: an object with ``prefill(idx)`` / ``step(idx)`` holding the state (default one
        over ``init_state``); ``on_token(token [B])`` sees each sampled token."""
        _check_idx(idx, 2)
        was_training = self.training
        self.eval()
        decoder = decoder or _Stepper(self, idx.shape[0], idx.device)
        logits = decoder.prefill(idx)  # [B, V]
        out = [idx]
        for i in range(max_new_tokens):
            token = pick(logits, temperature, top_k, generator)  # [B]
            out.append(token[:, None])
            if on_token is not None:
                on_token(token)
            if i + 1 < max_new_tokens:
                logits = decoder.step(token)
        self.train(was_training)
        return torch.cat(out, dim=1)

    def firing_rate(self) -> Optional[torch.Tensor]:
        """Mean firing rate over the neuron groups in the last forward (0-d device tensor), None if none."""
        return None

    def synapses(self) -> list:
        """(linear layer, fed by spikes) for every linear layer: the energy estimate's inputs."""
        return [(self.head, False)] + [(m, False) for m in self.blocks.modules() if isinstance(m, nn.Linear)]

    def energy_per_token(self) -> dict:
        """Synaptic operations per token of the linear layers, from the last forward's firing rates.

        A spike-fed layer does ``rate * in * out`` accumulates (AC); a layer with real input ``in * out``
        multiply-accumulates (MAC). ``mac_ann``: the MACs of the same network without spikes (every layer
        dense). Joules with 4.6 pJ per MAC and 0.9 pJ per AC. Syncs (reads the rates).
        """
        mac = ac = mac_ann = 0.0
        for layer, spike_fed in self.synapses():
            n = layer.in_features * layer.out_features
            mac_ann += n
            if spike_fed and layer.input_rate is not None:
                ac += float(layer.input_rate) * n
            else:
                mac += n
        return dict(mac=mac, ac=ac, mac_ann=mac_ann, energy_ann_j=mac_ann * PJ_PER_MAC * 1e-12,
                    energy_spiking_j=(mac * PJ_PER_MAC + ac * PJ_PER_AC) * 1e-12)


class SpikingLM(LanguageModel):
    """Spiking transformer blocks on ``[T, B, C]``: no position embedding (order comes from the recurrence),
    every block's membranes and attention memory carried from token to token."""

    mixer = "spiking"

    def _build_blocks(self, cfg: LMConfig) -> None:
        self.blocks = nn.ModuleList(
            SpikingTransformerBlock(cfg.d_model, cfg.n_head, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
                                    decay=cfg.decay, threshold=cfg.threshold, surrogate=cfg.surrogate,
                                    backend=cfg.backend, attention=cfg.attention, values=cfg.values)
            for _ in range(cfg.n_layer))
        # found once: the trainer reads their rates every step, and a module walk is host time on every step
        self._neuron_groups = [m for m in self.blocks.modules() if isinstance(m, NormLIF)]

    def _init_weights(self) -> None:
        # unit-scale embedding, head untied: a std-0.02 residual stream would make the first block's
        # norm multiply gradients by ~50 (the spiking blocks init themselves, see nn.attention)
        nn.init.normal_(self.tok_emb.weight, std=1.0)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor = None):
        _check_idx(idx, 2)
        x = self.tok_emb(idx).transpose(0, 1)  # [T, B, C]
        for block in self.blocks:
            x, _ = block(x)
        return self._output(x.transpose(0, 1), targets)  # x [B, T, C]

    def init_state(self, batch_size: int, device):
        """Every block's membranes and attention memory (zeros): O(1) per generated token."""
        return [block.init_state(batch_size, device) for block in self.blocks]

    def prefill(self, idx: torch.Tensor, state):
        _check_idx(idx, 2)
        x = self.tok_emb(idx).transpose(0, 1)  # [T, B, C]
        new_state = []
        for block, block_state in zip(self.blocks, state):
            x, block_state = block(x, block_state)
            new_state.append(block_state)
        return self._logits(x[-1]), new_state

    def firing_rate(self) -> Optional[torch.Tensor]:
        rates = [m.rate for m in self._neuron_groups if m.rate is not None]
        if not rates:
            return None
        return torch.stack(rates).mean()

    def synapses(self) -> list:
        return [(self.head, False)] + [s for block in self.blocks for s in block.synapses()]


class _GPTLM(LanguageModel):
    """nanoGPT's shape: learned positions, pre-norm ``Block``s around the mixer of ``_make_mixer``, GPT-2
    init, head tied to the embedding; a forward reads at most ``block_size`` tokens."""

    def _build_blocks(self, cfg: LMConfig) -> None:
        self.max_tokens = cfg.block_size
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, self._make_mixer(cfg)) for _ in range(cfg.n_layer))

    def _make_mixer(self, cfg: LMConfig) -> nn.Module:
        raise NotImplementedError

    def _init_weights(self) -> None:
        self.apply(self._gpt_init)
        self.head.weight = self.tok_emb.weight

    @staticmethod
    def _gpt_init(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor = None):
        _check_idx(idx, 2)
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"idx: expected at most block_size={self.cfg.block_size} tokens, got {T}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))  # [B, T, C]
        for block in self.blocks:
            x = block(x)
        return self._output(x, targets)


class SoftmaxLM(_GPTLM):
    """The softmax-attention baseline; generates from a ``KVCache``."""

    mixer = "softmax"

    def _make_mixer(self, cfg: LMConfig) -> nn.Module:
        return CausalSelfAttention(cfg.d_model, cfg.n_head, cfg.dropout)

    def init_state(self, batch_size: int, device) -> KVCache:
        """An empty ``KVCache``: a step is one query against it (the cache is updated in place)."""
        cfg = self.cfg
        return KVCache(cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.d_model // cfg.n_head, device)

    def prefill(self, idx: torch.Tensor, cache: KVCache):
        """``idx [B, T]`` appended to the cache -> (logits of the last token ``[B, V]``, cache). When the window
        of ``block_size`` tokens is full (learned positions end there), it restarts from the last
        ``block_size // 2`` tokens (or the last ``block_size`` of a longer input), as nanoGPT's crop does."""
        _check_idx(idx, 2)
        T, L = idx.shape[1], self.cfg.block_size
        if cache.length + T > L:
            context = torch.cat([cache.tokens[:, :cache.length], idx], dim=1)[:, -max(min(T, L), L // 2):]
            cache.reset()
            return self.prefill(context, cache)
        positions = cache.position + torch.arange(T, device=idx.device)  # [T]
        cache.tokens.index_copy_(1, positions, idx)
        x = self.tok_emb(idx) + self.pos_emb(positions)  # [B, T, C]
        for i, block in enumerate(self.blocks):
            x = block(x, (cache.k[i], cache.v[i], positions))
        cache.length += T
        cache.position += T
        return self._logits(x[:, -1]), cache


class TTTMLPLM(_GPTLM):
    """The TTT-MLP baseline (``tether.nn.TTTMLP`` as the mixer); generates by rerunning the last
    ``block_size`` tokens (correct, not O(1))."""

    mixer = "ttt-mlp"

    def _make_mixer(self, cfg: LMConfig) -> nn.Module:
        from tether.nn import TTTMLP

        return TTTMLP(cfg.d_model, cfg.n_head, mini_batch=cfg.ttt_mini_batch)

    def init_state(self, batch_size: int, device) -> torch.Tensor:
        """The token context ``[B, 0]``."""
        return torch.zeros(batch_size, 0, dtype=torch.long, device=device)

    def prefill(self, idx: torch.Tensor, context: torch.Tensor):
        _check_idx(idx, 2)
        context = torch.cat([context, idx], dim=1)[:, -self.cfg.block_size:]  # [B, <= block_size]
        logits, _ = self(context)
        return logits[:, -1], context


MODELS = {cls.mixer: cls for cls in (SpikingLM, SoftmaxLM, TTTMLPLM)}


def build_model(cfg: LMConfig) -> LanguageModel:
    """The model of ``cfg.mixer``."""
    return MODELS[cfg.mixer](cfg)
