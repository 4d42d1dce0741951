"""TTT-MLP Triton kernels vs the fp64 reference: outputs, checkpoints, final state and every gradient.

The launchers in tether.kernels.ttt_mlp are called directly, so the kernels run (on CPU under the Triton
interpreter: tiny shapes; bf16 only on the GPU, where the interpreter's bf16 tl.dot is not trusted).
"""
import pytest
import torch

from tether._backend import use_triton
from tether.kernels import ttt_mlp as kernels
from tether.reference.ttt_mlp import ttt_mlp as reference
from utils import TTT_TOL, assert_rel_close

GRAD_NAMES = ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "token_scale")
# (B, NH, NC, CS, F, G): ttt-tk's CS = F = 64 case, G not dividing NC, CS 16, F 32, several heads and batches
SHAPES = [(1, 1, 2, 64, 64, 1), (1, 2, 3, 16, 32, 2), (2, 1, 3, 32, 16, 2), (1, 1, 2, 16, 128, 2)]
# bf16 only where tl.dot on bf16 is trustworthy: compiled, on the GPU
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
if torch.cuda.is_available():
    DTYPES.append(pytest.param(torch.bfloat16, id="bf16"))


def make_inputs(B, NH, NC, CS, F, dtype, device):
    """Fresh random inputs scaled like a layer's (unit-variance tokens, 1/sqrt(fan-in) weights)."""
    K = 4 * F
    xq, xk, xv = (torch.randn(B, NH, NC, CS, F, device=device).to(dtype) for _ in range(3))
    lr = (0.1 * torch.rand(B, NH, NC, CS, 1, device=device)).to(dtype)
    token_scale = 1.0 / torch.arange(1, CS + 1, device=device) + 0.05 * torch.rand(CS, device=device)  # [CS]
    ln_weight = 1.0 + 0.2 * torch.randn(NH, F, device=device)
    ln_bias = 0.2 * torch.randn(NH, F, device=device)
    w1 = torch.randn(B, NH, F, K, device=device) / F ** 0.5
    b1 = 0.1 * torch.randn(B, NH, 1, K, device=device)
    w2 = torch.randn(B, NH, K, F, device=device) / K ** 0.5
    b2 = 0.1 * torch.randn(B, NH, 1, F, device=device)
    return dict(xq=xq, xk=xk, xv=xv, lr=lr, token_scale=token_scale, ln_weight=ln_weight, ln_bias=ln_bias,
                w1=w1, b1=b1, w2=w2, b2=b2)


def run_reference(inp, causal, G):
    """fp64 reference with autograd on every input."""
    ref_in = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
    out, final, ckpts = reference(*(ref_in[k] for k in ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias",
                                                        "w1", "b1", "w2", "b2")),
                                  causal=causal, token_scale=ref_in["token_scale"], checkpoint_group_size=G)
    return ref_in, out, final, ckpts


def kernel_args(inp):
    return [inp[k] for k in ("xq", "xk", "xv", "lr", "token_scale", "ln_weight", "ln_bias")]


def check_against_reference(shape, causal, dtype, device, launch=None):
    """The launchers (launch: their LaunchOptions) vs the fp64 reference: outputs, checkpoints, final state, and
    every gradient for random upstream gradients of the outputs and of the final state."""
    B, NH, NC, CS, F, G = shape
    inp = make_inputs(B, NH, NC, CS, F, dtype, device)
    assert use_triton(inp["xq"]) and kernels.supports(F, CS, dtype)
    tol_out, tol_grad = TTT_TOL[dtype]

    out, ckpts, final = kernels.ttt_mlp_fwd(*kernel_args(inp), inp["w1"], inp["b1"], inp["w2"], inp["b2"],
                                            causal=causal, checkpoint_group_size=G, launch=launch)
    ref_in, ref_out, ref_final, ref_ckpts = run_reference(inp, causal, G)
    assert out.dtype == dtype and out.shape == inp["xq"].shape
    assert_rel_close(out, ref_out, tol_out, "out")
    for name, got, want in zip(("w1", "b1", "w2", "b2"), final + ckpts, ref_final + ref_ckpts):
        assert_rel_close(got, want, tol_out, name)

    # upstream gradients of the outputs and of the final state (fresh random, not the usual zeros)
    grad_out = torch.randn_like(out)
    grad_last = [0.1 * torch.randn_like(s) for s in final]
    grads = kernels.ttt_mlp_bwd(*kernel_args(inp), *ckpts, grad_out, *grad_last, causal=causal,
                                checkpoint_group_size=G, launch=launch)
    want = torch.autograd.grad([ref_out, *ref_final], [ref_in[k] for k in GRAD_NAMES],
                               [grad_out.double(), *(g.double() for g in grad_last)], allow_unused=True)
    for name, w in zip(GRAD_NAMES, want):
        got = grads[name]
        if name == "token_scale" and not causal:
            assert got is None and w is None
            continue
        if name in ("ln_weight", "ln_bias"):  # per batch element [B, NH, F]
            assert got.shape == (B, NH, F)
            got = got.sum(0)
        assert_rel_close(got, w, tol_grad, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(shape, causal, dtype, device):
    check_against_reference(shape, causal, dtype, device)


# head dims that are not a power of two (the launcher pads F to the next one: 48 -> 64, 80 -> 128; the LN
# statistics are over the real F): every mode and dtype at F = 48 (the LM's head dim, d_model 384 / 8 heads),
# two at F = 80; on the GPU also F = 96 at ttt-tk's CS = 64
def padded_case(shape, causal, dtype):
    return pytest.param(shape, causal, dtype, id=f"F{shape[4]}-CS{shape[3]}-{('non', '')[causal]}causal-{dtype}")


GPU_DTYPES = (torch.bfloat16,) if torch.cuda.is_available() else ()
PADDED = [padded_case((1, 2, 2, 16, 48, 1), causal, dtype) for causal in (False, True)
          for dtype in (torch.float32, torch.float16, *GPU_DTYPES)]
PADDED += [padded_case((1, 1, 2, 16, 80, 2), True, torch.float32),
           padded_case((1, 1, 2, 16, 80, 2), False, torch.float16)]
if torch.cuda.is_available():
    PADDED += [padded_case((2, 2, 3, 64, 96, 2), causal, dtype) for causal in (False, True)
               for dtype in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("shape, causal, dtype", PADDED)
def test_padded_head_dims_match_reference(shape, causal, dtype, device):
    check_against_reference(shape, causal, dtype, device)


def test_supported_head_dims():
    assert [F for F in range(8, 145, 8) if kernels.supports(F, 16, torch.float32)] == list(range(16, 129, 16))
    assert kernels.unsupported(40, 16, torch.float32) == "head dim 40 is not a multiple of 16 (kernels take 16..128)"
    assert "over 128" in kernels.unsupported(144, 16, torch.float32)
    assert "mini-batch size 8" in kernels.unsupported(48, 8, torch.float32)
    assert "state dtype torch.float64" in kernels.unsupported(48, 16, torch.float32, torch.float64)


def test_learning_rates_of_any_float_dtype(device):
    """The kernels read lr as fp32: an autocast layer's fp32 rates beside bf16 tokens, or fp64 ones."""
    inp = make_inputs(1, 1, 1, 16, 16, torch.float32, device)
    state = [inp[k] for k in ("w1", "b1", "w2", "b2")]
    args = kernel_args(inp)
    out = kernels.ttt_mlp_fwd(*args, *state, causal=True, checkpoint_group_size=1)[0]
    args[3] = args[3].double()
    torch.testing.assert_close(kernels.ttt_mlp_fwd(*args, *state, causal=True, checkpoint_group_size=1)[0], out)


def test_launchers_write_into_given_buffers(device):
    B, NH, NC, CS, F, G = 1, 1, 2, 16, 16, 1
    inp = make_inputs(B, NH, NC, CS, F, torch.float32, device)
    out_buf = torch.empty_like(inp["xq"])
    w1_ckpt = torch.empty(B, NH, NC, F, 4 * F, device=device)
    out, ckpts, final = kernels.ttt_mlp_fwd(*kernel_args(inp), inp["w1"], inp["b1"], inp["w2"], inp["b2"],
                                            causal=True, checkpoint_group_size=G, out=out_buf, w1_ckpt=w1_ckpt)
    assert out is out_buf and ckpts[0] is w1_ckpt
    grad_out = torch.randn_like(out)
    buffers = {"xq": torch.empty_like(inp["xq"]), "token_scale": torch.empty_like(inp["token_scale"])}
    grads = kernels.ttt_mlp_bwd(*kernel_args(inp), *ckpts, grad_out, *map(torch.zeros_like, final),
                                causal=True, checkpoint_group_size=G, grads=dict(buffers))
    ref_in, ref_out, _, _ = run_reference(inp, True, G)
    want = torch.autograd.grad(ref_out, [ref_in["xq"], ref_in["token_scale"]], grad_out.double())
    for (name, buf), w in zip(buffers.items(), want):
        assert grads[name] is buf
        assert_rel_close(buf, w, 1e-4, name)


def test_bad_arguments_are_named(device):
    inp = make_inputs(1, 1, 2, 16, 16, torch.float32, device)
    state = [inp[k] for k in ("w1", "b1", "w2", "b2")]
    with pytest.raises(ValueError, match="lr"):
        kernels.ttt_mlp_fwd(inp["xq"], inp["xk"], inp["xv"], inp["lr"][:, :, :1], inp["token_scale"],
                            inp["ln_weight"], inp["ln_bias"], *state, causal=False, checkpoint_group_size=1)
    with pytest.raises(TypeError, match="w1"):
        kernels.ttt_mlp_fwd(*kernel_args(inp), state[0].half(), *state[1:], causal=False, checkpoint_group_size=1)
    with pytest.raises(ValueError, match="token_scale"):
        kernels.ttt_mlp_fwd(*kernel_args(inp)[:4], inp["token_scale"][:8], *kernel_args(inp)[5:], *state,
                            causal=True, checkpoint_group_size=1)
    with pytest.raises(ValueError, match="checkpoint_group_size"):
        kernels.ttt_mlp_fwd(*kernel_args(inp), *state, causal=False, checkpoint_group_size=0)
    with pytest.raises(ValueError, match="head dim"):
        kernels.ttt_mlp_fwd(*(t[..., :8] if t.dim() == 5 and t.shape[-1] > 1 else t for t in kernel_args(inp)), *state,
                            causal=False, checkpoint_group_size=1)
    not_contiguous = torch.empty(1, 1, 2, 16, 32, device=device)[..., ::2]
    with pytest.raises(ValueError, match="out"):
        kernels.ttt_mlp_fwd(*kernel_args(inp), *state, causal=False, checkpoint_group_size=1, out=not_contiguous)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programs of a head wait for each other: GPU only")
@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("shape", [(1, 2, 5, 64, 64, 2), (4, 64, 2, 16, 64, 1)])
def test_split_programs_match_reference(shape, causal, dtype, split):
    """P programs per head (K = 256 in 4 blocks of 64) exchanging their partial sums over K; the second
    shape launches 1024 programs at P = 4, more than an H100 holds at once."""
    check_against_reference(shape, causal, dtype, "cuda", launch=kernels.LaunchOptions(block_k=64, split=split))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programs of a head wait for each other: GPU only")
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_split_programs_padded_head_dim(causal, dtype, split):
    """Head dim 48 (padded to 64): K = 192 in 3 blocks of 64, one or three programs per head."""
    check_against_reference((1, 2, 3, 16, 48, 2), causal, dtype, "cuda",
                            launch=kernels.LaunchOptions(block_k=64, split=split))


def test_bad_split_is_named(device):
    inp = make_inputs(1, 1, 2, 16, 16, torch.float32, device)
    state = [inp[k] for k in ("w1", "b1", "w2", "b2")]
    # F = 16: K = 64 in 4 blocks of 16, so 3 does not divide the block count
    with pytest.raises(ValueError, match="split: expected a divisor"):
        kernels.ttt_mlp_fwd(*kernel_args(inp), *state, causal=False, checkpoint_group_size=1,
                            launch=kernels.LaunchOptions(block_k=16, split=3))
    if not torch.cuda.is_available():  # interpreted programs run one after another: P = 1 only
        with pytest.raises(ValueError, match="split: expected 1 under the Triton interpreter"):
            kernels.ttt_mlp_fwd(*kernel_args(inp), *state, causal=False, checkpoint_group_size=1,
                                launch=kernels.LaunchOptions(block_k=16, split=2))
