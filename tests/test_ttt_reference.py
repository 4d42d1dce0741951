"""The TTT-MLP reference: gradcheck in float64, remat == no remat, causal dual form == explicit weights."""
import pytest
import torch

import tether._backend
from tether.reference.ttt_mlp import (_layer_norm, default_token_scale, gelu_tanh, gelu_tanh_grad, ttt_mlp,
                                      ttt_mlp_step)


def force_reference_path(monkeypatch):
    """Make tether.functional pick the reference on CPU tensors (the backend sees the interpreter off).
    The env var stays: Triton reads it when a jit function is defined, and those must stay interpretable."""
    monkeypatch.setattr(tether._backend, "interpreting", lambda: False)


def make_inputs(B=1, NH=1, NC=3, CS=4, F=4, dtype=torch.float64, device="cpu", state_dtype=None):
    """Fresh random TTT-MLP inputs; xq/xk on the unit sphere per head, as the layer feeds them."""
    K = 4 * F
    sd = state_dtype or dtype
    xq = torch.nn.functional.normalize(torch.randn(B, NH, NC, CS, F, dtype=dtype, device=device), dim=-1)
    xk = torch.nn.functional.normalize(torch.randn(B, NH, NC, CS, F, dtype=dtype, device=device), dim=-1)
    xv = torch.randn(B, NH, NC, CS, F, dtype=dtype, device=device)
    lr = (0.1 + 0.5 * torch.rand(B, NH, NC, CS, 1, device=device)).to(dtype)
    ln_weight = (1.0 + 0.1 * torch.randn(NH, F, device=device)).to(sd)
    ln_bias = (0.1 * torch.randn(NH, F, device=device)).to(sd)
    w1 = (torch.randn(B, NH, F, K, device=device) / F ** 0.5).to(sd)
    b1 = (0.1 * torch.randn(B, NH, 1, K, device=device)).to(sd)
    w2 = (torch.randn(B, NH, K, F, device=device) / K ** 0.5).to(sd)
    b2 = (0.1 * torch.randn(B, NH, 1, F, device=device)).to(sd)
    return [xq, xk, xv, lr, ln_weight, ln_bias, w1, b1, w2, b2]


def test_gelu_tanh_grad_matches_autograd():
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(gelu_tanh(x).sum(), x)
    torch.testing.assert_close(gelu_tanh_grad(x), g)
    torch.testing.assert_close(gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"))


def test_closed_form_inner_gradient_matches_autograd():
    """The step's g_z2 (closed-form LN backward) equals autograd of the spec's loss."""
    xq, xk, xv, lr, ln_w, ln_b, w1, b1, w2, b2 = make_inputs(B=2, NH=3, NC=1, CS=5, F=8)
    xk, xv = xk[:, :, 0], xv[:, :, 0]
    z2 = (gelu_tanh(xk @ w1 + b1) @ w2 + b2).requires_grad_()
    loss = 0.5 * ((_layer_norm(z2, ln_w.unsqueeze(-2), ln_b.unsqueeze(-2))[0] - (xv - xk)) ** 2).sum()
    (g_auto,) = torch.autograd.grad(loss, z2)
    # a step with lr = 1 on one token shows g_z2 through b2: b2_next = b2 - sum_j g_z2_j
    lr1 = torch.zeros(2, 3, 5, 1, dtype=torch.float64)
    lr1[:, :, 2] = 1.0
    _, (_, _, _, b2_next) = ttt_mlp_step(xq[:, :, 0], xk, xv, lr1, ln_w, ln_b, (w1, b1, w2, b2),
                                         causal=False, token_scale=None)
    torch.testing.assert_close(b2 - b2_next, g_auto[:, :, 2:3])


def explicit_causal(xq, xk, xv, lr, ln_w, ln_b, w1, b1, w2, b2, token_scale):
    """Causal TTT-MLP with the per-token weights W_i materialised, straight from the spec, via autograd."""
    B, NH, NC, CS, F = xq.shape
    state, outs = (w1, b1, w2, b2), []
    for c in range(NC):
        out_c = torch.empty_like(xq[:, :, c])
        next_state = [torch.empty_like(s) for s in state]
        for b in range(B):
            for h in range(NH):
                p = [s[b, h].detach().clone().requires_grad_() for s in state]
                gam, bet = ln_w[h], ln_b[h]
                k, v, q = xk[b, h, c], xv[b, h, c], xq[b, h, c]
                per_token_grads = []
                for j in range(CS):  # gradient of token j's loss at the start state
                    z2 = gelu_tanh(k[j:j + 1] @ p[0] + p[1]) @ p[2] + p[3]
                    lj = 0.5 * ((_layer_norm(z2, gam, bet)[0] - (v[j] - k[j])) ** 2).sum()
                    per_token_grads.append(torch.autograd.grad(lj, p))
                for i in range(CS):
                    wi = [p[n] - sum(token_scale[i] * lr[b, h, c, j, 0] * per_token_grads[j][n]
                                     for j in range(i + 1)) for n in range(4)]
                    z2 = gelu_tanh(q[i:i + 1] @ wi[0] + wi[1]) @ wi[2] + wi[3]
                    out_c[b, h, i] = q[i] + _layer_norm(z2, gam, bet)[0][0]
                for n in range(4):  # the next state is the last token's weights
                    next_state[n][b, h] = wi[n].detach()
        outs.append(out_c)
        state = tuple(next_state)
    return torch.stack(outs, dim=2), state


def test_causal_dual_form_matches_explicit_per_token_weights():
    args = make_inputs(B=1, NH=2, NC=2, CS=4, F=4)
    ts = default_token_scale(4, "cpu").double() + 0.05 * torch.rand(4, dtype=torch.float64)
    out, final, _ = ttt_mlp(*args, causal=True, token_scale=ts)
    out_ref, final_ref = explicit_causal(*args, ts)
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(final, final_ref):
        torch.testing.assert_close(a, b)


def test_non_causal_equals_causal_with_full_eta():
    """Non-causal = every token reads the last row of eta; with CS=1 the two modes coincide."""
    args = make_inputs(B=2, NH=2, NC=3, CS=1, F=4)
    out_nc, fin_nc, _ = ttt_mlp(*args, causal=False)
    out_c, fin_c, _ = ttt_mlp(*args, causal=True)
    torch.testing.assert_close(out_nc, out_c)
    for a, b in zip(fin_nc, fin_c):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_remat_matches_plain_and_checkpoints(causal):
    args = make_inputs(B=2, NH=2, NC=5, CS=3, F=4)
    out, final, ck = ttt_mlp(*args, causal=causal, checkpoint_group_size=None)
    assert ck[0].shape == (2, 2, 1, 4, 16)
    out_g, final_g, ck_g = ttt_mlp(*args, causal=causal, checkpoint_group_size=2)
    torch.testing.assert_close(out_g, out)
    for a, b in zip(final_g, final):
        torch.testing.assert_close(a, b)
    # checkpoints: state at the start of mini-batches 0, 2, 4 = final states of prefixes of length 0, 2, 4
    assert ck_g[0].shape == (2, 2, 3, 4, 16)
    for k, n in enumerate([0, 2, 4]):
        pre = [t[:, :, :n] for t in args[:4]]
        state = ttt_mlp(*pre, *args[4:], causal=causal)[1] if n else tuple(args[6:])
        for a, b in zip(ck_g, state):
            torch.testing.assert_close(a[:, :, k], b)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_and_remat_gradients(causal):
    """gradcheck in float64 (B=1, NH=1, NC=3, CS=4, F=4), with remat; remat grads == plain grads."""
    args = [t.requires_grad_() for t in make_inputs()]
    ts = (default_token_scale(4).double() + 0.05 * torch.rand(4, dtype=torch.float64)).requires_grad_()

    def f(group, *a):
        out, final, _ = ttt_mlp(*a[:10], causal=causal, token_scale=a[10], checkpoint_group_size=group)
        return (out, *final)

    inputs = (*args, ts)
    assert torch.autograd.gradcheck(lambda *a: f(2, *a), inputs, fast_mode=True)
    outs_r, outs_p = f(2, *inputs), f(None, *inputs)
    cot = [torch.randn_like(o) for o in outs_p]
    g_r = torch.autograd.grad(outs_r, inputs, cot, allow_unused=True, materialize_grads=True)
    g_p = torch.autograd.grad(outs_p, inputs, cot, allow_unused=True, materialize_grads=True)
    for a, b in zip(g_r, g_p):
        torch.testing.assert_close(a, b)
    assert g_p[10].abs().sum() > 0 if causal else g_p[10].abs().sum() == 0


def test_low_precision_inputs_computed_in_fp32():
    args = make_inputs(B=1, NH=2, NC=2, CS=8, F=8, dtype=torch.float32)
    out32, fin32, _ = ttt_mlp(*args, causal=True)
    half = [t.half() for t in args[:4]] + args[4:]
    out16, fin16, ck16 = ttt_mlp(*half, causal=True)
    assert out16.dtype == torch.float16 and fin16[0].dtype == torch.float32 and ck16[0].dtype == torch.float32
    torch.testing.assert_close(out16.float(), out32, atol=2e-2, rtol=2e-2)
