"""Linear spike-driven attention as an autograd op (spec: docs/spec/spike_attention.md).

Elementwise form: the fused Triton kernels (tether.kernels.spike_attention) behind the torch.library
custom op `tether::spike_attention_elementwise` (fake impl for torch.compile, autograd registered; eager
mode calls the same launchers through a plain autograd.Function, half the Python time per call), or,
where Triton does not run, the one-node time loop of tether.functional._cpu. Matrix form: chunked
PyTorch (intra-chunk decay-masked matmul + state carried across chunks), autograd through it.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from tether._backend import use_triton
from tether._checks import check_spike_attention_args
from tether._math import cast, compute_dtype, decay_matrix, gamma_per_head
from tether.reference.spike_attention import spike_attention_cumsum
from tether.functional import _cpu
from tether.functional._op import Op
from tether.functional.pack import _pack_kernel, unpack_spikes

MATRIX_CHUNK = 64


class _Config(NamedTuple):
    binary: int  # how many of q, k, v (from the front) hold only 0/1: 0, 2 (q and k) or 3; kept as bits
    need_dgamma: bool = False  # the backward's


BINARY_PARTS = {False: 0, "qk": 2, True: 3}  # spike_attention_qkv's binary -> _Config.binary


def _forward(qkv: Tensor, gamma: Tensor, state: Tensor, cfg: _Config):
    """qkv [T, B, 3, H, D] -> out, final state, state entering each chunk, the binary parts of qkv as packed bits
    [T * B, parts * H * D / 8] uint8 and the other parts as a copy [T, B, 3 - parts, H, D] (empty where there is
    no such part, or where no bits are kept and the backward reads qkv itself): what the backward keeps."""
    # kernels are imported on first use: triton is only a dependency on Linux, the CPU path needs none
    from tether.kernels.spike_attention import spike_attention_forward

    out, final, entering = spike_attention_forward(qkv, gamma, state)
    T, B = qkv.shape[:2]
    parts = cfg.binary
    bits = _pack_kernel(qkv[:, :, :parts].reshape(T * B, -1)) if parts else qkv.new_empty(0, dtype=torch.uint8)
    real = qkv[:, :, parts:].contiguous() if 0 < parts < 3 else qkv.new_empty(0)
    return out, final, entering, bits, real


def _fake_forward(qkv, gamma, state, cfg: _Config):
    from tether.kernels import cdiv
    from tether.kernels.spike_attention import CHUNK

    T, B, _, H, D = qkv.shape
    parts = cfg.binary
    bits = qkv.new_empty((T * B, cdiv(parts * H * D, 8)) if parts else 0, dtype=torch.uint8)
    real = qkv.new_empty((T, B, 3 - parts, H, D) if 0 < parts < 3 else 0)
    return (qkv.new_empty(T, B, H, D, dtype=torch.float32), qkv.new_empty(B, H, D, dtype=torch.float32),
            qkv.new_empty(cdiv(T, CHUNK), B, H, D, dtype=torch.float32), bits, real)


def _backward(qkv, gamma, entering, dout, dfinal, cfg: _Config):
    """-> dqkv, dstate, dgamma (empty-shaped zeros unless cfg.need_dgamma)."""
    from tether.kernels.spike_attention import spike_attention_backward

    return spike_attention_backward(qkv, gamma, entering, dout, dfinal, cfg.need_dgamma)


def _fake_backward(qkv, gamma, entering, dout, dfinal, cfg: _Config):
    return torch.empty_like(qkv), torch.empty_like(dfinal), torch.empty_like(gamma)


def _save(ctx, tensors, cfg: _Config, outputs):
    qkv, gamma, _ = tensors
    # saved: qkv's binary parts as bits (1/8 B/elem), the others as they came (2 B/elem in bf16; qkv itself when
    # nothing is binary), and the fp32 chunk-entry states (4 / CHUNK B/elem)
    bits, real = outputs[3:5]
    ctx.save_for_backward(None if cfg.binary else qkv, bits if cfg.binary else None,
                          real if 0 < cfg.binary < 3 else None, gamma, outputs[2])
    ctx.qkv_shape, ctx.qkv_dtype, ctx.parts = qkv.shape, qkv.dtype, cfg.binary


def _grads(ctx, grad_outputs, needs, backward):
    """dqkv, dgamma, dstate."""
    dout, dfinal = grad_outputs
    qkv, bits, real, gamma, entering = ctx.saved_tensors
    T, B, _, H, D = ctx.qkv_shape
    if qkv is None:  # 0/1 parts from the bits, then the real ones
        qkv = unpack_spikes(bits, ctx.parts * H * D, ctx.qkv_dtype).view(T, B, ctx.parts, H, D)
        if real is not None:
            qkv = torch.cat((qkv, real), dim=2)
    if dout is None:  # only the final state was used
        dout = entering.new_zeros(T, B, H, D)
    if dfinal is None:  # only out was used
        dfinal = entering.new_zeros(entering.shape[1:])  # [B, H, D]
    dqkv, dstate, dgamma = backward(qkv, gamma, entering, dout, dfinal, _Config(0, needs[1]))
    return dqkv, dgamma if needs[1] else None, dstate


_elementwise = Op("tether::spike_attention_elementwise", tensors="Tensor qkv, Tensor gamma, Tensor state",
                  config=_Config, returns=5, outputs=2, forward=_forward, fake=_fake_forward, save=_save,
                  grads=_grads, backward=_backward, fake_backward=_fake_backward,
                  backward_tensors="Tensor qkv, Tensor gamma, Tensor entering, Tensor dout, Tensor dfinal",
                  backward_config=_Config, backward_returns=3)


def _matrix_chunked(q, k, v, gamma, state, scale, chunk=MATRIX_CHUNK):
    """Matrix form, chunk by chunk: o = scale * (masked (q k^T) v + decayed q S_entering)."""
    T, B, H, D = q.shape
    dtype = compute_dtype(q, k, v, state, gamma)
    log_g = torch.log(gamma_per_head(gamma, H, dtype, q.device))[:, None, None]  # [H, 1, 1]
    q, k, v = (t.to(dtype).permute(1, 2, 0, 3) for t in (q, k, v))  # [B, H, T, D]
    S = torch.zeros(B, H, D, D, dtype=dtype, device=q.device) if state is None else state.to(dtype)
    outs = []
    for start in range(0, T, chunk):
        qc, kc, vc = (t[:, :, start:start + chunk] for t in (q, k, v))  # [B, H, n, D]
        n = qc.shape[2]
        i = torch.arange(n, device=q.device, dtype=dtype)[:, None]  # [n, 1]
        intra = ((qc @ kc.transpose(-1, -2)) * decay_matrix(log_g[:, 0, 0], n)) @ vc  # [B, H, n, D]
        inter = (qc * torch.exp((i + 1) * log_g)) @ S  # gamma^(i+1) q_i S_entering
        outs.append(scale * (intra + inter))
        S = torch.exp(n * log_g) * S + (kc * torch.exp((n - 1 - i) * log_g)).transpose(-1, -2) @ vc
    if not outs:  # T = 0: no step
        return q.permute(2, 0, 1, 3) * 0, S.clone()
    return torch.cat(outs, dim=2).permute(2, 0, 1, 3), S


def spike_attention(q, k, v, gamma=1.0, state=None, *, form="elementwise"):
    """Causal linear attention over time on spikes. q, k, v: [T, B, H, D] spikes (bf16/fp16/fp32).

    gamma: decay in (0, 1], a float, 0-d tensor or [H] tensor (may require grad). A tensor's values are
    checked to be finite and > 0 on the CPU (tether._checks.check_gamma); on CUDA they are not read (that
    would wait for the GPU on every call).
    state: [B, H, D] (elementwise) or [B, H, D, D] (matrix, scale 1/D) to continue a sequence.
    T, B or H = 0: empty out, the state as it came (zeros when None), zero gradients; D = 0 is refused.
    q, k, v are spikes: NaN and inf are outside the contract. The kernels, the CPU time loop and the reference
    loop carry them forward in time only; the cumsum formulation (``spike_attention_qkv_eager``, gamma < 1)
    can also spread a NaN to earlier steps of its sequence (its across-chunk matmul multiplies it by 0).
    Returns (out [T, B, H, D] fp32, final state fp32). The kernels read q, k, v packed: a projection that
    makes them as one tensor calls ``spike_attention_qkv`` and saves the copy into that layout.
    """
    check_spike_attention_args(q, k, v, gamma, state, form)
    if form == "matrix":
        return _matrix_chunked(q, k, v, gamma, state, 1.0 / q.shape[-1])
    if not use_triton(q) and q.numel() == 0:  # no step, batch or head: nothing to loop over
        return spike_attention_cumsum(q, k, v, gamma, state)
    if not use_triton(q):
        T, B, H, D = q.shape
        dtype = compute_dtype(q, k, v, state, gamma)
        state = torch.zeros(B, H, D, dtype=dtype, device=q.device) if state is None else state
        return _cpu.spike_attention(q, k, v, gamma_per_head(gamma, H, dtype, q.device), state)
    return _elementwise_op(torch.stack((q, k, v), dim=2), gamma, state)


def spike_attention_qkv(qkv, gamma=1.0, state=None, *, binary=False):
    """``spike_attention(q, k, v, gamma, state)`` (elementwise form) with ``q, k, v = qkv.unbind(2)`` for
    ``qkv [T, B, 3, H, D]``: the kernels read the packed tensor as it is, and its gradient comes back packed.
    ``binary=True`` promises that qkv holds only 0 and 1 (spikes from an LIF), ``binary="qk"`` that q and k do
    (v real): the kernels' path then keeps those parts for the backward as bits (1/16 of a bf16 copy). Not
    checked (that would wait for the GPU): other values get wrong gradients. The CPU path keeps qkv as it is."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected a [T, B, 3, H, D] tensor, got shape {tuple(qkv.shape)}")
    if not (isinstance(binary, bool) or binary == "qk"):
        raise ValueError(f"binary: expected True, False or 'qk', got {binary!r}")
    if not use_triton(qkv):
        return spike_attention(*qkv.unbind(2), gamma, state)
    check_spike_attention_args(*qkv.unbind(2), gamma, state, "elementwise")
    return _elementwise_op(qkv, gamma, state, binary)


def spike_attention_qkv_eager(qkv, gamma=1.0, state=None):
    """``spike_attention_qkv`` from plain PyTorch ops on every device (the reference's cumsum formulation): the
    attention of tether.nn's ``backend="eager"``, the baseline the kernels are measured against."""
    return spike_attention_cumsum(*qkv.unbind(2), gamma, state)


class _ScaleConfig(NamedTuple):
    dtype: torch.dtype  # p's


def _scale_forward(out, gamma, cfg: _ScaleConfig):
    return (cast(out * (1 - gamma)[:, None], cfg.dtype),)  # [T, B, H, D]


def _scale_save(ctx, tensors, cfg: _ScaleConfig, outputs):
    out, gamma = tensors
    ctx.save_for_backward(outputs[0], gamma)  # out = p / (1 - gamma): no copy of out
    ctx.out_dtype = out.dtype


def _scale_grads(ctx, grad_outputs, needs, backward):
    (grad_p,) = grad_outputs
    p, gamma = ctx.saved_tensors
    compute = torch.promote_types(torch.promote_types(grad_p.dtype, gamma.dtype), torch.float32)
    grad_p = grad_p.to(compute)
    keep = 1 - gamma.to(compute)  # [H]
    grad_out = (grad_p * keep[:, None]).to(ctx.out_dtype) if needs[0] else None
    grad_gamma = None
    if needs[1]:  # d p / d gamma = -out = -p / (1 - gamma)
        grad_gamma = (-(grad_p * p.to(compute)).sum(dim=(0, 1, 3)) / keep).to(gamma.dtype)
    return grad_out, grad_gamma


_output_scale = Op("tether::output_scale", outputs=1, kernel=False, forward=_scale_forward, save=_scale_save,
                   grads=_scale_grads)


def output_scale(out, gamma, dtype=None):
    """``(out * (1 - gamma)[:, None]).to(dtype)`` for the attention's ``out [T, B, H, D]`` and ``gamma [H]``
    (dtype: default out's): what keeps the output in [0, 1] for any length. Saves for backward only the
    product in dtype (the next layer's input, which it saves anyway), not out."""
    if gamma.dim() != 1 or out.dim() != 4 or out.shape[2] != gamma.shape[0]:
        raise ValueError(f"out, gamma: expected [T, B, H, D] and [H], got shapes {tuple(out.shape)} and "
                         f"{tuple(gamma.shape)}")
    return _output_scale(out, gamma, cfg=_ScaleConfig(out.dtype if dtype is None else dtype))


def _elementwise_op(qkv, gamma, state, binary=False):
    T, B, _, H, D = qkv.shape
    gamma = gamma_per_head(gamma, H, torch.float32, qkv.device)  # [H]
    state = torch.zeros(B, H, D, device=qkv.device, dtype=torch.float32) if state is None else state.float()
    # bits only where a backward will read them
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, gamma, state))
    return _elementwise(qkv, gamma, state, cfg=_Config(BINARY_PARTS[binary] if grad else 0))
