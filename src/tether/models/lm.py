"""Character language models: the spiking transformer (default) and same-size non-spiking baselines.

One class, ``SpikingLM``, for every mixer so the trainer and the generator see one API:
- ``mixer="spiking"``: ``SpikingTransformerBlock`` stacks on ``[T, B, C]``; tokens are time steps and
  every state is carried, so ``step`` costs O(1) per token.
- ``mixer="softmax"``: pre-norm GPT block with causal SDPA and a GELU MLP (learned positions).
- ``mixer="ttt-mlp"``: the same block with ``tether.nn.TTTMLP`` as the mixer.
"""
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from tether._checks import SURROGATES
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
    decay: float = 0.5  # LIF membrane decay
    threshold: float = 1.0  # LIF firing threshold
    vocab: str = ""  # the characters of the token ids, in order ("" if unknown): a saved model can generate

    def __post_init__(self):
        for name, allowed in (("mixer", MIXERS), ("backend", BACKENDS), ("surrogate", tuple(SURROGATES))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model: expected a multiple of n_head={self.n_head}, got {self.d_model}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
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

    def __init__(self, cfg: LMConfig):
        super().__init__()
        C = cfg.d_model
        self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
        if cfg.mixer == "softmax":
            self.mixer = CausalSelfAttention(C, cfg.n_head, cfg.dropout)
        else:
            from tether.nn import TTTMLP
            self.mixer = TTTMLP(C, cfg.n_head)
        self.mlp = nn.Sequential(nn.Linear(C, cfg.mlp_ratio * C), nn.GELU(), nn.Linear(cfg.mlp_ratio * C, C))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None):
        h = self.norm1(x)
        x = x + self.dropout(self.mixer(h) if cache is None else self.mixer(h, cache))
        return x + self.dropout(self.mlp(self.norm2(x)))


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


class SpikingLM(nn.Module, *(_HUB_BASES or (_NoHub,)), **_HUB_OPTIONS):
    """Embedding, blocks, final LayerNorm, linear head. See the module docstring.

    ``save_pretrained(dir)`` / ``SpikingLM.from_pretrained(dir or hub id)`` (with ``huggingface_hub``):
    ``config.json`` (the ``LMConfig``, vocabulary included) and ``model.safetensors``.
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.spiking = cfg.mixer == "spiking"
        if self.spiking:  # order comes from the recurrence: no position embedding
            self.blocks = nn.ModuleList(
                SpikingTransformerBlock(C, cfg.n_head, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, decay=cfg.decay,
                                        threshold=cfg.threshold, surrogate=cfg.surrogate, backend=cfg.backend)
                for _ in range(cfg.n_layer))
        else:
            self.pos_emb = nn.Embedding(cfg.block_size, C)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # found once: the trainer reads their rates every step, and a module walk costs ~0.1 ms
        self._neuron_groups = [m for m in self.blocks.modules() if isinstance(m, NormLIF)] if self.spiking else []
        self.norm = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)
        if self.spiking:
            # unit-scale embedding, head untied: a std-0.02 residual stream would make the first block's
            # norm multiply gradients by ~50 (the spiking blocks init themselves, see nn.attention)
            nn.init.normal_(self.tok_emb.weight, std=1.0)
        else:  # nanoGPT: GPT-2 init, tied head
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

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _logits(self, x):
        return self.head(self.norm(x))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor = None):
        """idx ``[B, T]`` long -> (logits ``[B, T, V]``, mean cross-entropy or None); every state starts at 0."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx: expected a [B, T] long tensor, got shape {tuple(idx.shape)} {idx.dtype}")
        B, T = idx.shape
        if self.spiking:
            x = self.tok_emb(idx).transpose(0, 1)  # [T, B, C]
            for block in self.blocks:
                x, _ = block(x)
            x = x.transpose(0, 1)  # [B, T, C]
        else:
            if T > self.cfg.block_size:
                raise ValueError(f"idx: expected at most block_size={self.cfg.block_size} tokens, got {T}")
            x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))  # [B, T, C]
            for block in self.blocks:
                x = block(x)
        logits = self._logits(x)  # [B, T, V]
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def init_state(self, batch_size: int, device):
        """Spiking: every block's membranes and attention memory (zeros). Softmax: an empty ``KVCache``.
        TTT-MLP: the token context ``[B, 0]``."""
        if self.spiking:
            return [block.init_state(batch_size, device) for block in self.blocks]
        cfg = self.cfg
        if cfg.mixer == "softmax":
            return KVCache(cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.d_model // cfg.n_head, device)
        return torch.zeros(batch_size, 0, dtype=torch.long, device=device)

    def step(self, idx: torch.Tensor, state):
        """One token ``idx [B]`` -> (logits ``[B, V]``, state). Spiking: O(1) per token. Softmax: one query
        against the KV cache (the cache is updated in place). TTT-MLP: a rerun of the last ``block_size``
        tokens (correct, not O(1))."""
        if idx.dim() != 1 or idx.dtype != torch.long:
            raise ValueError(f"idx: expected a [B] long tensor, got shape {tuple(idx.shape)} {idx.dtype}")
        return self.prefill(idx[:, None], state)

    def prefill(self, idx: torch.Tensor, state):
        """Tokens ``idx [B, T]`` continuing ``state`` -> (logits of the last token ``[B, V]``, state): a prompt
        in one call, the same as T calls of ``step``."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx: expected a [B, T] long tensor, got shape {tuple(idx.shape)} {idx.dtype}")
        if isinstance(state, KVCache):
            return self._prefill_cached(idx, state), state
        if not self.spiking:
            context = torch.cat([state, idx], dim=1)[:, -self.cfg.block_size:]  # [B, <= block_size]
            logits, _ = self(context)
            return logits[:, -1], context
        x = self.tok_emb(idx).transpose(0, 1)  # [T, B, C]
        new_state = []
        for block, block_state in zip(self.blocks, state):
            x, block_state = block(x, block_state)
            new_state.append(block_state)
        return self._logits(x[-1]), new_state

    def _prefill_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Softmax mixer: ``idx [B, T]`` appended to the cache -> logits of the last token ``[B, V]``. When the
        window of ``block_size`` tokens is full (learned positions end there), it restarts from the last
        ``block_size // 2`` tokens (or the last ``block_size`` of a longer input), as nanoGPT's crop does."""
        T, L = idx.shape[1], self.cfg.block_size
        if cache.length + T > L:
            context = torch.cat([cache.tokens[:, :cache.length], idx], dim=1)[:, -max(min(T, L), L // 2):]
            cache.reset()
            return self._prefill_cached(context, cache)
        positions = cache.position + torch.arange(T, device=idx.device)  # [T]
        cache.tokens.index_copy_(1, positions, idx)
        x = self.tok_emb(idx) + self.pos_emb(positions)  # [B, T, C]
        for i, block in enumerate(self.blocks):
            x = block(x, (cache.k[i], cache.v[i], positions))
        cache.length += T
        cache.position += T
        return self._logits(x[:, -1])

    def firing_rate(self):
        """Mean firing rate over the neuron groups in the last forward (0-d device tensor), None if not spiking."""
        rates = [m.rate for m in self._neuron_groups if m.rate is not None]
        if not rates:
            return None
        return torch.stack(rates).mean()

    def energy_per_token(self) -> dict:
        """Synaptic operations per token of the linear layers, from the last forward's firing rates.

        A spike-fed layer does ``rate * in * out`` accumulates (AC); a layer with real input ``in * out``
        multiply-accumulates (MAC). ``mac_ann``: the MACs of the same network without spikes (every layer
        dense). Joules with 4.6 pJ per MAC and 0.9 pJ per AC. Syncs (reads the rates).
        """
        mac = ac = mac_ann = 0.0
        synapses = [(self.head, False)]
        if self.spiking:
            synapses += [s for block in self.blocks for s in block.synapses()]
        else:
            synapses += [(m, False) for m in self.blocks.modules() if isinstance(m, nn.Linear)]
        for layer, spike_fed in synapses:
            n = layer.in_features * layer.out_features
            mac_ann += n
            if spike_fed and layer.input_rate is not None:
                ac += float(layer.input_rate) * n
            else:
                mac += n
        return dict(mac=mac, ac=ac, mac_ann=mac_ann, energy_ann_j=mac_ann * PJ_PER_MAC * 1e-12,
                    energy_spiking_j=(mac * PJ_PER_MAC + ac * PJ_PER_AC) * 1e-12)


def build_model(cfg: LMConfig) -> SpikingLM:
    return SpikingLM(cfg)
