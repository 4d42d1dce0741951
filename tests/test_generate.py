"""Generation: streamed characters, greedy decoding through the carried state == the full-sequence model,
checkpoint round trip through `tether generate`, argument errors."""
import pytest
import torch

from tether import checkpoint, generate
from tether.data import Vocab
from tether.models import LMConfig, build_model

VOCAB = Vocab("".join(sorted(set("\nROMEO:JULIET, wherefore art thou?"))))


@pytest.fixture
def model(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch path on CPU; kernel tests live elsewhere
    torch.manual_seed(0)
    config = LMConfig(vocab_size=len(VOCAB), n_layer=2, n_head=4, d_model=32, block_size=64, dropout=0.0)
    return build_model(config).eval()


def test_streams_what_it_returns(model):
    seen = []
    text = generate.sample(model, VOCAB, "ROMEO:", 30, generator=torch.Generator().manual_seed(1),
                           on_text=seen.append)
    assert text == "ROMEO:" + "".join(seen) and len(seen) == 30
    again = generate.sample(model, VOCAB, "ROMEO:", 30, generator=torch.Generator().manual_seed(1))
    assert again == text


def test_greedy_step_decoding_matches_full_forward(model):
    # top_k=1 picks the argmax; the full forward over the text so far must agree at every position
    text = generate.sample(model, VOCAB, "JULIET:", 12, top_k=1)
    ids = VOCAB.encode(text)[None]  # [1, len(text)]
    with torch.no_grad():
        logits, _ = model(ids)  # [1, len(text), V]
    start = len("JULIET:") - 1
    assert torch.equal(logits[0, start:-1].argmax(-1), ids[0, start + 1:])


def test_checkpoint_round_trip_and_cli(model, tmp_path, capsys):
    config = {"model": model.cfg.to_dict(), "vocab": VOCAB.chars, "train": {}}
    checkpoint.save(tmp_path, model, config, {"step": 0})
    loaded, vocab = generate.load(tmp_path, "cpu")
    assert vocab.chars == VOCAB.chars
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert generate.main(["--checkpoint", str(tmp_path), "--prompt", "ROMEO:", "--tokens", "40",
                          "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 40 + 1  # + the final newline


def test_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="prompt: expected characters of the model's vocabulary, got \\['Z'\\]"):
        generate.sample(model, VOCAB, "ROMEOZ", 5)
    with pytest.raises(ValueError, match="prompt: expected at least one character"):
        generate.sample(model, VOCAB, "", 5)
    with pytest.raises(ValueError, match="temperature: expected > 0, got 0"):
        generate.sample(model, VOCAB, "R", 5, temperature=0)
    with pytest.raises(FileNotFoundError, match="--checkpoint: expected a checkpoint directory"):
        generate.load(tmp_path, "cpu")
