"""Spiking LM modules: streaming (chunked / token by token) == full sequence, fused == eager, energy, configs."""
import json

import pytest
import torch

from tether.models import LMConfig, build_model
from tether.nn import SpikingSelfAttention, SpikingTransformerBlock
from utils import count_launches

TINY = dict(d_model=32, n_head=4, n_layer=2, dropout=0.0)


def _idx(B, T, V=65):
    return torch.randint(0, V, (B, T))


@pytest.mark.parametrize("attention,T,values", [("elementwise", 7, "spikes"), ("matrix", 70, "spikes"),  # 70: past
                                                ("elementwise", 7, "real"), ("matrix", 70, "real")])  # the chunk
def test_step_matches_full_sequence(attention, T, values):
    model = build_model(LMConfig(**TINY, attention=attention, values=values)).eval()
    idx = _idx(2, T)
    with torch.no_grad():
        full, _ = model(idx)  # [B, T, V]
        state = model.init_state(2, "cpu")
        steps = []
        for t in range(idx.shape[1]):
            logits, state = model.step(idx[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("module_cls,kwargs", [(SpikingSelfAttention, {}), (SpikingTransformerBlock, {}),
                                               (SpikingSelfAttention, dict(form="matrix")),
                                               (SpikingTransformerBlock, dict(attention="matrix")),
                                               (SpikingSelfAttention, dict(values="real")),
                                               (SpikingTransformerBlock, dict(attention="matrix", values="real"))])
def test_chunked_equals_full(module_cls, kwargs):
    module = module_cls(16, 2, **kwargs)
    x = torch.randn(13, 2, 16)  # [T, B, C]
    w = torch.randn(13, 2, 16)
    full, _ = module(x)
    (full * w).sum().backward()
    want = _grads(module)
    module.zero_grad()

    first, state = module(x[:5])
    second, _ = module(x[5:], state)
    chunked = torch.cat([first, second])
    (chunked * w).sum().backward()  # gradients flow through the carried state too
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    got = _grads(module)
    assert got.keys() == want.keys() and "gamma_logit" in "".join(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("values", ["spikes", "real"])
def test_backward_reaches_every_parameter(values):
    model = build_model(LMConfig(**TINY, values=values))
    idx = _idx(2, 9)
    _, loss = model(idx, _idx(2, 9))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


LAUNCHERS = [("tether.kernels.lif", "lif_forward"), ("tether.kernels.lif", "lif_backward"),
             ("tether.kernels.spike_attention", "spike_attention_forward"),
             ("tether.kernels.spike_attention", "spike_attention_backward"),
             ("tether.kernels.pack", "pack_spikes"), ("tether.kernels.pack", "unpack_spikes")]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Calls of each Triton launcher the fused build should use."""
    return count_launches(monkeypatch, {name: f"{module}.{name}" for module, name in LAUNCHERS})


@pytest.mark.parametrize("values", ["spikes", "real"])
def test_fused_matches_eager(kernel_calls, device, values):
    # on the device the kernels run on (the interpreter on a CPU machine, CUDA on a GPU one)
    fused = build_model(LMConfig(**TINY, backend="fused", values=values)).to(device)
    eager = build_model(LMConfig(**TINY, backend="eager", values=values)).to(device)
    eager.load_state_dict(fused.state_dict())
    idx, targets = _idx(2, 10).to(device), _idx(2, 10).to(device)

    logits_e, loss_e = eager(idx, targets)
    loss_e.backward()
    assert not any(kernel_calls.values()), kernel_calls  # the eager build is plain PyTorch
    logits_f, loss_f = fused(idx, targets)
    loss_f.backward()
    assert all(kernel_calls.values()), kernel_calls  # every kernel ran (interpreter on CPU), no fallback

    torch.testing.assert_close(logits_f, logits_e, atol=1e-5, rtol=1e-5)
    grads_e = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads_e[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(fused.firing_rate(), eager.firing_rate())


@pytest.mark.parametrize("mixer", ["softmax", "ttt-mlp"])
def test_non_spiking_mixers(mixer):
    model = build_model(LMConfig(**TINY, mixer=mixer, block_size=16)).eval()
    idx = _idx(2, 7)
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 7, 65) and torch.isfinite(loss)
    assert model.firing_rate() is None
    state = model.init_state(2, "cpu")
    for t in range(7):
        step_logits, state = model.step(idx[:, t], state)
    torch.testing.assert_close(step_logits, logits[:, -1], atol=1e-5, rtol=1e-5)
    energy = model.energy_per_token()
    assert energy["ac"] == 0 and energy["energy_spiking_j"] == energy["energy_ann_j"]


def test_energy_and_firing_rate():
    cfg = LMConfig(**TINY)
    model = build_model(cfg)
    model(_idx(3, 12))
    rate = model.firing_rate()
    assert rate.dim() == 0 and 0 < rate.item() < 1
    e = model.energy_per_token()
    C, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layer
    # per block: qkv 3C^2 + proj C^2 + fc1 4C^2 + fc2 4C^2; plus the head C*V
    assert e["mac_ann"] == L * 12 * C * C + C * V
    assert e["mac"] == L * C * C + C * V  # proj and head see real inputs
    assert 0 < e["ac"] < L * 11 * C * C  # spike-fed layers: ACs only for the inputs that fired
    assert e["energy_ann_j"] == pytest.approx(e["mac_ann"] * 4.6e-12)
    assert e["energy_spiking_j"] == pytest.approx(e["mac"] * 4.6e-12 + e["ac"] * 0.9e-12)
    assert e["energy_spiking_j"] < e["energy_ann_j"]


def test_config_round_trip_and_errors():
    cfg = LMConfig(**TINY, mixer="softmax", surrogate="sigmoid")
    assert LMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="config: unknown keys"):
        LMConfig.from_dict({**cfg.to_dict(), "n_embd": 3})
    with pytest.raises(ValueError, match="mixer: expected one of"):
        LMConfig(mixer="mamba")
    with pytest.raises(ValueError, match="backend: expected one of"):
        LMConfig(backend="cuda")
    with pytest.raises(ValueError, match="d_model: expected a multiple"):
        LMConfig(d_model=30, n_head=4)
    model = build_model(LMConfig(**TINY))
    with pytest.raises(ValueError, match="idx: expected a \\[B, T\\] long"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="gamma: expected values in"):
        SpikingSelfAttention(16, 2, gamma=1.0)
    with pytest.raises(ValueError, match="values: expected one of"):
        LMConfig(values="graded")
    old = {k: v for k, v in cfg.to_dict().items() if k != "values"}  # saved before `values` existed
    assert LMConfig.from_dict(old).values == "spikes" and LMConfig().values == "real"


def test_torch_compile_fullgraph(monkeypatch):
    """The spiking LM traces without graph breaks (custom ops / autograd.Function), here on the reference path."""
    import tether._backend

    monkeypatch.setattr(tether._backend, "interpreting", lambda: False)
    model = build_model(LMConfig(**{**TINY, "n_layer": 1}))
    idx = _idx(2, 8)
    logits, loss = model(idx, idx)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got_logits, got_loss = compiled(idx, idx)
    got_loss.backward()
    torch.testing.assert_close(got_logits, logits)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], msg=name)


@pytest.mark.parametrize("mixer", ["spiking", "softmax", "ttt-mlp"])
def test_generate_on_the_model(mixer):
    model = build_model(LMConfig(**TINY, mixer=mixer, block_size=16)).train()
    prompt = _idx(2, 3)
    out = model.generate(prompt, 8, top_k=5, generator=torch.Generator().manual_seed(0))
    again = model.generate(prompt, 8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 11) and torch.equal(out[:, :3], prompt) and torch.equal(out, again)
    assert model.training  # generate runs in eval mode and restores the mode


def test_ttt_mini_batch_option():
    model = build_model(LMConfig(**TINY, mixer="ttt-mlp", block_size=16, ttt_mini_batch=8)).eval()
    assert [b.mixer.mini_batch for b in model.blocks] == [8] * TINY["n_layer"]
    logits, loss = model(_idx(2, 11), _idx(2, 11))  # 11 tokens: two mini-batches of 8, the second padded
    assert logits.shape == (2, 11, 65) and torch.isfinite(loss)
    with pytest.raises(ValueError, match="ttt_mini_batch: expected a positive int, got 0"):
        LMConfig(ttt_mini_batch=0)
