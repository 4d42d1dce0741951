"""TTT-MLP layer (as in the TTT papers' TTT-MLP): a sequence mixer whose per-head hidden state is a
two-layer MLP trained on the fly by tether.functional.ttt_mlp."""
import torch
from torch import nn
from torch.nn import functional as F

from tether._checks import check_tensor, default_token_scale
from tether.functional.ttt_mlp import ttt_mlp


class TTTMLP(nn.Module):
    """[B, T, d_model] -> [B, T, d_model].

    Q/K/V projections; Q and K L2-normalised per head; per-token learning rate
    lr = base_lr * sigmoid(x W_lr + b_lr) / head_dim per head; inner model per head with learnable initial
    weights and LayerNorm; then a post-norm and the output projection. T is padded at the end to a multiple
    of mini_batch; padded tokens get lr = 0, so they write nothing into the state, and in causal mode
    no token reads a later one.
    """

    def __init__(self, d_model: int, n_heads: int, *, mini_batch: int = 16, causal: bool = True,
                 checkpoint_group_size: int = 4, base_lr: float = 1.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={d_model}, got {n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.mini_batch, self.causal = mini_batch, causal
        self.checkpoint_group_size, self.base_lr = checkpoint_group_size, base_lr
        nh, f, k = n_heads, self.head_dim, 4 * self.head_dim
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.lr_gate = nn.Linear(d_model, n_heads)  # one learning-rate logit per head and token
        # learnable offset on token_scale[i] = 1/(i+1): how much token i trusts its mini-batch's gradients
        self.token_scale_offset = nn.Parameter(torch.zeros(mini_batch)) if causal else None
        self.ln_weight = nn.Parameter(torch.ones(nh, f))
        self.ln_bias = nn.Parameter(torch.zeros(nh, f))
        self.w1 = nn.Parameter(0.02 * torch.randn(nh, f, k))  # initial inner state, shared by the batch
        self.b1 = nn.Parameter(torch.zeros(nh, 1, k))
        self.w2 = nn.Parameter(0.02 * torch.randn(nh, k, f))
        self.b2 = nn.Parameter(torch.zeros(nh, 1, f))
        self.post_norm = nn.LayerNorm(d_model)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=3)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last dim d_model={self.d_model}, got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        nh, f, cs = self.n_heads, self.head_dim, self.mini_batch
        n_chunks = -(-T // cs)
        pad = n_chunks * cs - T
        x_pad = F.pad(x, (0, 0, 0, pad))  # [B, NC * CS, d_model]

        def heads(t):  # [B, NC * CS, NH * n] -> [B, NH, NC, CS, n] (n spelled out: B or T may be 0)
            return t.reshape(B, n_chunks, cs, nh, t.shape[-1] // nh).permute(0, 3, 1, 2, 4)

        q, k, v = heads(self.qkv(x_pad)).chunk(3, dim=-1)  # each [B, NH, NC, CS, F]
        q, k = F.normalize(q, dim=-1).to(v.dtype), F.normalize(k, dim=-1).to(v.dtype)  # autocast: norm is fp32
        keep = (torch.arange(n_chunks * cs, device=x.device) < T).to(x.dtype)  # [NC * CS]: 0 on padding
        lr = self.base_lr / f * torch.sigmoid(self.lr_gate(x_pad)) * keep[:, None]  # [B, NC * CS, NH]
        lr = heads(lr)  # [B, NH, NC, CS, 1]

        # the inner state and LN statistics stay fp32 (fp64 for a float64 model) whatever the activations
        sdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        state = [p.to(sdt).expand(B, *p.shape) for p in (self.w1, self.b1, self.w2, self.b2)]  # [B, NH, ...]
        token_scale = None
        if self.causal:
            token_scale = (default_token_scale(cs, x.device).to(sdt) + self.token_scale_offset.to(sdt)).clamp(min=0)
        out, _ = ttt_mlp(q, k, v, lr, self.ln_weight.to(sdt), self.ln_bias.to(sdt), *state, causal=self.causal,
                         token_scale=token_scale, checkpoint_group_size=self.checkpoint_group_size)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, n_chunks * cs, self.d_model)[:, :T]  # [B, T, d_model]
        return self.out_proj(self.post_norm(out))
