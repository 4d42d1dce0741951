"""tether.step.TrainStep (eager and CUDA-graphed) and tether.generate.Decoder (KV cache, graphed step)."""
import pytest
import torch

from tether.generate import Decoder
from tether.models import LMConfig, build_model
from tether.step import COMPILE_OPTIONS, TrainStep, compile_model, make_optimizer

# on the CPU the spiking model's ops run from PyTorch (backend "eager", the same function as the kernels, which
# the interpreter runs too slowly for a training loop); the CUDA tests take the kernels
BACKEND = "fused" if torch.cuda.is_available() else "eager"
TINY = dict(vocab_size=11, n_layer=2, n_head=2, d_model=32, block_size=16, backend=BACKEND)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def batches(n, B=4, T=16, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(11, (B, T + 1), generator=g).to(device) for _ in range(n)]


def run_steps(cfg, device, cuda_graph, n=8, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).to(device)
    opt = make_optimizer(model, 3e-3, 0.1, torch.device(device))
    step = TrainStep(model, model, opt, grad_clip=1.0, device=torch.device(device), cuda_graph=cuda_graph)
    losses = []
    torch.manual_seed(seed + 1)  # the dropout stream
    for idx in batches(n, device=device):
        step(idx[:, :-1], idx[:, 1:], 3e-3)
        losses.append(step.take_sums()[0])
    return losses, model, step


def test_eager_step_is_the_plain_loop():
    cfg = LMConfig(**TINY, mixer="spiking", dropout=0.0)
    losses, model, _ = run_steps(cfg, "cpu", cuda_graph=False)
    torch.manual_seed(0)
    ref = build_model(cfg)
    opt = make_optimizer(ref, 3e-3, 0.1, torch.device("cpu"))
    expected = []
    for idx in batches(8):
        _, loss = ref(idx[:, :-1], idx[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        expected.append(loss.item())
    assert losses == pytest.approx(expected, rel=1e-6)
    assert losses[-1] < losses[0]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_sums_average_over_steps():
    cfg = LMConfig(**TINY, mixer="spiking", dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    step = TrainStep(model, model, make_optimizer(model, 1e-3, 0.0, torch.device("cpu")), grad_clip=1.0,
                     device=torch.device("cpu"))
    for idx in batches(3):
        step(idx[:, :-1], idx[:, 1:], 0.0)  # lr 0: the same weights, the same loss each step
    loss, rate, steps = step.take_sums()
    with torch.no_grad():
        expected = [model(idx[:, :-1], idx[:, 1:])[1].item() for idx in batches(3)]
    assert steps == 3
    assert loss == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert 0.0 < rate < 1.0
    assert step.take_sums()[2] == 0


def test_compile_options_are_inductor_settings_of_this_torch():
    """compile_model drops a key inductor does not know (an older torch): here every key must still exist, so a
    renamed setting cannot silently stop applying."""
    known = torch._inductor.config.get_config_copy()
    assert COMPILE_OPTIONS and all(key in known for key in COMPILE_OPTIONS)


@pytest.mark.parametrize("device, options", [("cpu", None), ("cuda", COMPILE_OPTIONS)])
def test_compile_model_passes_the_options_on_cuda(monkeypatch, device, options):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    model = torch.nn.Linear(2, 2)
    assert compile_model(model, torch.device(device)) is model
    assert calls == [{"options": options} if options else {}]


def test_cuda_graph_needs_cuda():
    model = build_model(LMConfig(**TINY))
    with pytest.raises(ValueError, match="cuda_graph: expected a CUDA device"):
        TrainStep(model, model, make_optimizer(model, 1e-3, 0.0, torch.device("cpu")), grad_clip=1.0,
                  device=torch.device("cpu"), cuda_graph=True)


@pytest.mark.parametrize("mixer", ["softmax", "spiking"])
def test_decoder_matches_full_forward(mixer):
    """prefill + step through the Decoder (KV cache for softmax) == the logits of one full forward."""
    torch.manual_seed(0)
    model = build_model(LMConfig(**TINY, mixer=mixer, dropout=0.0)).eval()
    idx = torch.randint(11, (2, 16))
    with torch.no_grad():
        full, _ = model(idx)  # [2, 16, V]
        decoder = Decoder(model, 2, "cpu")
        logits = [decoder.prefill(idx[:, :5])] + [decoder.step(idx[:, t]).clone() for t in range(5, 16)]
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 4:], atol=1e-5, rtol=1e-5)


def test_kv_cache_restarts_its_window_when_full():
    """Past block_size tokens the softmax cache keeps the last block_size // 2 and goes on: the logits are those
    of a full forward over that window."""
    torch.manual_seed(0)
    model = build_model(LMConfig(**TINY, mixer="softmax", dropout=0.0)).eval()
    idx = torch.randint(11, (2, 17))
    with torch.no_grad():
        decoder = Decoder(model, 2, "cpu")
        decoder.prefill(idx[:, :16])
        logits = decoder.step(idx[:, 16])
        assert decoder.state.length == 8
        expected = model(idx[:, 9:])[0][:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@cuda
@pytest.mark.parametrize("mixer", ["spiking", "softmax"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_graphed_step_matches_eager(mixer, dropout):
    cfg = LMConfig(**TINY, mixer=mixer, dropout=dropout)
    eager, m1, _ = run_steps(cfg, "cuda", cuda_graph=False, n=10)
    graphed, m2, step = run_steps(cfg, "cuda", cuda_graph=True, n=10)
    assert step.graph is not None
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-5)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3)


@cuda
@pytest.mark.parametrize("mixer", ["spiking", "softmax"])
def test_graphed_decoder_matches_eager(mixer):
    torch.manual_seed(0)
    model = build_model(LMConfig(**TINY, mixer=mixer, dropout=0.0)).cuda().eval()
    idx = torch.randint(11, (3, 40), device="cuda")
    out = []
    with torch.no_grad():
        for cuda_graph in (False, True):
            decoder = Decoder(model, 3, "cuda", cuda_graph=cuda_graph)
            logits = [decoder.prefill(idx[:, :4])] + [decoder.step(idx[:, t]).clone() for t in range(4, 40)]
            assert (decoder.graph is not None) == cuda_graph
            out.append(torch.stack(logits, 1))
    torch.testing.assert_close(out[1], out[0], atol=1e-4, rtol=1e-4)
