"""Hugging Face Hub format: save_pretrained / from_pretrained round trip of every model class, offline, and generate
from it."""
import pytest
import torch

pytest.importorskip("huggingface_hub")

from tether.generate import load, sample  # noqa: E402
from tether.models import MODELS, LanguageModel, LMConfig, SpikingLM, build_model  # noqa: E402

VOCAB = "\n !,.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@pytest.mark.parametrize("mixer", ["spiking", "softmax", "ttt-mlp"])
def test_save_pretrained_round_trip_same_logits(tmp_path, mixer):
    cfg = LMConfig(vocab_size=len(VOCAB), vocab=VOCAB, n_layer=2, n_head=2, d_model=32, block_size=16,
                   mixer=mixer, backend="eager")
    model = build_model(cfg).eval()
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    loaded = LanguageModel.from_pretrained(tmp_path).eval()  # the base builds the saved mixer's class
    assert type(loaded) is MODELS[mixer] and loaded.cfg == cfg
    assert type(MODELS[mixer].from_pretrained(tmp_path)) is MODELS[mixer]
    idx = torch.randint(len(VOCAB), (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_generate_reads_the_hub_layout(tmp_path):
    cfg = LMConfig(vocab_size=len(VOCAB), vocab=VOCAB, n_layer=1, n_head=2, d_model=16, block_size=16,
                   backend="eager")
    SpikingLM(cfg).save_pretrained(tmp_path)
    model, vocab = load(tmp_path, "cpu")
    assert vocab.chars == VOCAB
    text = sample(model, vocab, "ROMEO:", 10, generator=torch.Generator().manual_seed(0))
    assert text.startswith("ROMEO:") and len(text) == 16 and set(text) <= set(VOCAB)


def test_hub_layout_without_vocabulary_is_refused(tmp_path):
    SpikingLM(LMConfig(vocab_size=11, n_layer=1, n_head=2, d_model=16, backend="eager")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--checkpoint: expected a model config with its vocabulary"):
        load(tmp_path, "cpu")


def test_a_class_loads_only_its_own_mixer(tmp_path):
    cfg = LMConfig(vocab_size=11, n_layer=1, n_head=2, d_model=16, block_size=16, mixer="softmax")
    build_model(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cfg.mixer: expected 'spiking' for SpikingLM, got 'softmax'"):
        SpikingLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cfg.mixer: expected 'spiking' for SpikingLM, got 'softmax'"):
        SpikingLM(cfg)
