"""CPU paths of the LIF op (spec: docs/spec/lif.md) and of the elementwise spike attention (spec:
docs/spec/spike_attention.md): one autograd node per call instead of several per time step.

The references (tether.reference) build an autograd graph of ~10 nodes per time step; on a CPU that graph,
not the arithmetic, is most of a training step. Here the forward runs the time loop outside autograd, with
out= ops on one [*rest] slice per step, and saves the membrane and the spikes; the backward runs the reverse loop,
which for both ops is a first-order linear recurrence (one fused multiply-add per step):

    LIF:        G_t = a_t + beta k_t G_{t+1}          G = dL/dh_t, a = dL/ds_t sg'_t, k = dv_t/dh_t
    attention:  E_t = q_t dout_t + gamma E_{t+1}      E = dL/dC_t

Everything else (surrogate, masks, parameter gradients) is computed for all time steps at once. Pure
PyTorch, so they run on any device; tether.functional sends CPU tensors here, where no Triton kernel runs.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from tether._math import cast, compute_dtype, membrane_dtype, surrogate_grad
from tether.functional._op import Op


class LIFConfig(NamedTuple):
    """lif's non-tensor arguments (checked by tether._checks.check_lif_args)."""
    surrogate: str
    alpha: float
    hard: bool
    v_reset: float
    detach_reset: bool


def _as(p, dtype):
    """A decay / threshold in the membrane dtype; a float stays a float (a scalar operand costs nothing)."""
    return p.to(dtype) if isinstance(p, Tensor) else float(p)


def _reset(h: Tensor, keep: Tensor, theta, cfg: LIFConfig) -> Tensor:
    """v from the charged membrane h and keep = 1 - s (0/1 floats), any shape: the spec's hard or soft reset,
    rounded as the reference rounds it."""
    if not cfg.hard:
        return h - (1 - keep) * theta
    return h * keep if cfg.v_reset == 0.0 else torch.where(keep.bool(), h, cfg.v_reset)


def _sum_to(grad: Tensor, p: Tensor) -> Tensor:
    """Per-neuron [T, *rest] gradient -> a 0-d or [C] parameter's shape and dtype."""
    grad = grad.sum() if p.dim() == 0 else grad.reshape(-1, p.shape[0]).sum(0)
    return grad.to(p.dtype)


def _lif_loop(x: Tensor, v: Tensor, beta, theta, cfg: LIFConfig) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, *rest], v_init [*rest], both in the membrane dtype -> h [T, *rest] (the membrane before each
    reset), keep [T, *rest] (1 - s_t as 0/1 floats), v_final [*rest]: h and keep are all the backward needs."""
    h, keep = torch.empty_like(x), torch.empty_like(x)  # [T, *rest]
    hs, keeps, xs = h.unbind(0), keep.unbind(0), x.unbind(0)  # views of every step, made in one call
    # The default neuron (hard reset to 0, float decay) folds v_{t-1} = h_{t-1} keep_{t-1} into the next
    # charge: two ops a step.
    fold = cfg.hard and cfg.v_reset == 0.0 and not isinstance(beta, Tensor)
    for t in range(len(hs)):
        if fold and t > 0:
            torch.addcmul(xs[t], hs[t - 1], keeps[t - 1], value=beta, out=hs[t])  # h_t = beta v_{t-1} + x_t
        elif isinstance(beta, Tensor):
            torch.addcmul(xs[t], beta, v, out=hs[t])
        else:
            torch.add(xs[t], v, alpha=beta, out=hs[t])
        torch.lt(hs[t], theta, out=keeps[t])
        if not fold:
            v = _reset(hs[t], keeps[t], theta, cfg)
    return h, keep, hs[-1] * keeps[-1] if fold else v


def _lif_forward(x, v_init, decay, threshold, cfg: LIFConfig):
    """-> spikes, v_final, then h, keep, v0 for the backward."""
    dtype = membrane_dtype(x)
    beta, theta = _as(decay, dtype), _as(threshold, dtype)
    v0 = torch.zeros(x.shape[1:], dtype=dtype, device=x.device) if v_init is None else v_init.to(dtype)
    h, keep, v_final = _lif_loop(x.to(dtype), v0, beta, theta, cfg)  # h, keep [T, *rest]
    return cast(torch.rsub(keep, 1), x.dtype), v_final, h, keep, v0


def _lif_save(ctx, tensors, cfg: LIFConfig, outputs):
    x, v_init, decay, threshold = tensors
    ctx.save_for_backward(*outputs[2:], *(p if isinstance(p, Tensor) else None for p in (decay, threshold)))
    ctx.floats = tuple(None if isinstance(p, Tensor) else float(p) for p in (decay, threshold))
    ctx.cfg, ctx.x_dtype, ctx.v_dtype = cfg, x.dtype, None if v_init is None else v_init.dtype


def _lif_grads(ctx, grad_outputs, needs, backward):
    """The reverse time loop: one fused multiply-add a step (the module's docstring)."""
    grad_spikes, grad_v_final = grad_outputs
    h, keep, v0, decay, threshold = ctx.saved_tensors
    cfg, (needs_x, needs_v, needs_decay, needs_threshold) = ctx.cfg, needs
    beta = ctx.floats[0] if decay is None else decay.to(h.dtype)
    theta = ctx.floats[1] if threshold is None else threshold.to(h.dtype)
    sg = surrogate_grad(h - theta, cfg.surrogate, cfg.alpha)  # [T, *rest] sg'(h_t - theta)
    dv_dh = keep if cfg.hard else torch.ones_like(h)  # dv_t/dh_t with s_t held
    if not cfg.detach_reset:  # the reset is differentiated through s_t too
        dv_ds = (cfg.v_reset - h) if cfg.hard else -theta  # dv_t/ds_t
        dv_dh = dv_dh + dv_ds * sg
    spike_part = torch.zeros_like(h) if grad_spikes is None else grad_spikes.to(h.dtype) * sg  # a_t
    grad_h = spike_part.clone() if needs_threshold else spike_part  # [T, *rest] G, built in place
    if grad_v_final is not None:
        grad_h[-1] += dv_dh[-1] * grad_v_final.to(h.dtype)
    # dL/dh_t gets beta k_t dL/dh_{t+1}; a float beta rides on the fused multiply-add
    scale, coef = (1.0, beta * dv_dh) if isinstance(beta, Tensor) else (beta, dv_dh)  # coef [T, *rest]
    steps, coefs = grad_h.unbind(0), coef.unbind(0)
    for t in range(len(steps) - 2, -1, -1):
        torch.addcmul(steps[t], coefs[t], steps[t + 1], value=scale, out=steps[t])

    grad_x = grad_v = grad_decay = grad_threshold = None
    if needs_x:
        grad_x = grad_h.to(ctx.x_dtype)
    if needs_v:
        grad_v = (beta * grad_h[0]).to(ctx.v_dtype)
    if needs_decay:  # dL/dbeta = sum_t G_t v_{t-1}
        v_before = torch.cat((v0[None], _reset(h[:-1], keep[:-1], theta, cfg)))  # [T, *rest]
        grad_decay = _sum_to(grad_h * v_before, decay)
    if needs_threshold:
        grad_v_after = torch.zeros_like(h)  # [T, *rest] dL/dv_t = beta G_{t+1}, and dL/dv_T
        grad_v_after[:-1] = beta * grad_h[1:]
        if grad_v_final is not None:
            grad_v_after[-1] = grad_v_final
        grad = -spike_part  # through s_t = H(h_t - theta): ds/dtheta = -sg'
        if not cfg.detach_reset:
            grad = grad - sg * dv_ds * grad_v_after
        if not cfg.hard:  # v_t = h_t - theta s_t
            grad = grad - (1 - keep) * grad_v_after
        grad_threshold = _sum_to(grad, threshold)
    return grad_x, grad_v, grad_decay, grad_threshold


_lif = Op("tether::cpu_lif", outputs=2, kernel=False, forward=_lif_forward, save=_lif_save,
          grads=_lif_grads)


def lif(x: Tensor, decay, threshold, v_init, cfg: LIFConfig) -> tuple[Tensor, Tensor]:
    """x [T, *rest] -> (spikes [T, *rest] in x's dtype, v_final [*rest] in the membrane dtype); decay /
    threshold: float, 0-d or [C] tensor; arguments as tether.functional.lif takes them, already checked."""
    return _lif(x, v_init, decay, threshold, cfg=cfg)


def _attention_forward(q, k, v, gamma, state, cfg):
    """Elementwise form C_t = gamma C_{t-1} + k_t v_t, o_t = q_t C_t -> out, final state, then what the
    backward keeps: q, k, v in the compute dtype, decay [H, 1], C [T, B, H, D]."""
    dtype = compute_dtype(q, k, v, state, gamma)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    decay = gamma.to(dtype)[:, None]  # [H, 1], broadcasts over [B, H, D]
    memory = k * v  # [T, B, H, D], then C_t in place
    steps = memory.unbind(0)
    steps[0].addcmul_(decay, state.to(dtype))
    for t in range(1, len(steps)):
        torch.addcmul(steps[t], decay, steps[t - 1], out=steps[t])
    return q * memory, memory[-1].clone(), q, k, v, decay, memory


def _attention_save(ctx, tensors, cfg, outputs):
    q, k, v, decay, memory = outputs[2:]
    ctx.save_for_backward(q, k, v, decay, tensors[4], memory)
    ctx.dtypes = tuple(t.dtype for t in tensors)


def _attention_grads(ctx, grad_outputs, needs, backward):
    """The reverse time loop E_t = q_t dout_t + gamma E_{t+1}, then every gradient at once."""
    grad_out, grad_final = grad_outputs
    q, k, v, decay, state, memory = ctx.saved_tensors
    grad_memory = torch.zeros_like(memory) if grad_out is None else grad_out.to(memory.dtype) * q  # E
    if grad_final is not None:
        grad_memory[-1] += grad_final.to(memory.dtype)
    steps = grad_memory.unbind(0)
    for t in range(len(steps) - 2, -1, -1):
        torch.addcmul(steps[t], decay, steps[t + 1], out=steps[t])
    grads = [None] * 5
    if needs[0]:
        grads[0] = (torch.zeros_like(q) if grad_out is None else grad_out.to(memory.dtype) * memory)
    if needs[1]:
        grads[1] = grad_memory * v
    if needs[2]:
        grads[2] = grad_memory * k
    if needs[3]:  # dL/dgamma_h = sum E_t C_{t-1} over t, b, d
        before = torch.cat((state.to(memory.dtype)[None], memory[:-1]))  # [T, B, H, D]
        grads[3] = (grad_memory * before).sum((0, 1, 3))
    if needs[4]:
        grads[4] = decay * grad_memory[0]
    return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))


_attention = Op("tether::cpu_spike_attention", outputs=2, kernel=False,
                forward=_attention_forward, save=_attention_save, grads=_attention_grads)


def spike_attention(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Elementwise form. q, k, v [T, B, H, D], gamma [H], state [B, H, D] (checked by the caller) ->
    (out [T, B, H, D], final state [B, H, D]), fp32 (fp64 if any input is)."""
    return _attention(q, k, v, gamma, state)
