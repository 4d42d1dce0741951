"""tether eval: per-position validation losses equal the model's own cross-entropy (spiking: one pass carrying
the state; windowed mixers: every position scored once), the context report, the CLI and its errors."""
import json

import pytest
import torch
import torch.nn.functional as F

from tether import checkpoint, cli, evaluate
from tether.models import LMConfig, build_model

TEXT = "".join(f"{i}: to be, or not to be, that is the question. Whether 'tis nobler in the mind\n"
               for i in range(60))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def save_model(out, mixer: str, block_size: int = 32):
    torch.manual_seed(0)
    chars = "".join(sorted(set(TEXT)))
    cfg = LMConfig(vocab_size=len(chars), vocab=chars, n_layer=2, n_head=2, d_model=16, block_size=block_size,
                   dropout=0.0, mixer=mixer)
    model = build_model(cfg).eval()
    checkpoint.save(out, model, {"model": cfg.to_dict(), "vocab": chars, "train": {}}, {"step": 0})
    return model


def windows(n=3, L=80, vocab=None):
    return torch.randint(vocab or 20, (n, L + 1), generator=torch.Generator().manual_seed(0))


def direct_losses(model, x, y):
    with torch.no_grad():
        logits, _ = model(x)
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # [n, T]


def test_spiking_reads_each_window_in_one_pass(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = save_model(tmp_path, "spiking")
    w = windows(vocab=model.cfg.vocab_size)
    got = evaluate.position_losses(model, w, batch_size=2)
    assert got.shape == (3, 80)
    torch.testing.assert_close(got, direct_losses(model, w[:, :-1], w[:, 1:]))


def test_spiking_with_its_state_reset_every_n_tokens(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = save_model(tmp_path, "spiking")
    w = windows(vocab=model.cfg.vocab_size)
    got = evaluate.position_losses(model, w, batch_size=3, reset_every=32)
    x, y = w[:, :-1], w[:, 1:]
    for start in (0, 32, 64):  # each 32-token chunk from a zero state: the model on the chunk alone
        torch.testing.assert_close(got[:, start:start + 32], direct_losses(model, x[:, start:start + 32],
                                                                           y[:, start:start + 32]))
    carried = evaluate.position_losses(model, w, batch_size=3)
    torch.testing.assert_close(got[:, :32], carried[:, :32])
    assert not torch.allclose(got[:, 32:], carried[:, 32:])  # past the first reset the state differs


def test_softmax_slides_its_window_and_scores_each_position_once(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = save_model(tmp_path, "softmax", block_size=32)
    w = windows(L=90, vocab=model.cfg.vocab_size)
    x, y = w[:, :-1], w[:, 1:]
    got = evaluate.position_losses(model, w, batch_size=3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, :32], direct_losses(model, x[:, :32], y[:, :32]))  # first window: all
    for start in (16, 32, 48):  # later windows (stride 16) score their last 16 positions
        want = direct_losses(model, x[:, start:start + 32], y[:, start:start + 32])[:, 16:]
        torch.testing.assert_close(got[:, start + 16:start + 32], want)
    tail = direct_losses(model, x[:, 64:90], y[:, 64:90])[:, 16:]  # the last, shorter window
    torch.testing.assert_close(got[:, 80:90], tail)


def test_loss_at_context_is_the_second_half_mean():
    losses = torch.arange(8.0).repeat(2, 1)  # [2, 8]
    assert evaluate.at_contexts(losses, [4, 8]) == {4: 2.5, 8: 5.5}
    assert evaluate.curve(losses, 4) == [(0, 1.5), (4, 5.5)]


def test_cli_compares_checkpoints(monkeypatch, tmp_path, corpus, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    save_model(tmp_path / "spiking", "spiking")
    save_model(tmp_path / "softmax", "softmax")
    out = tmp_path / "eval.json"
    code = cli.main(["eval", "--checkpoint", str(tmp_path / "spiking"), "--checkpoint", str(tmp_path / "softmax"),
                     "--context", "16,64", "--sequences", "4", "--data", str(corpus), "--device", "cpu",
                     "--json", str(out), "--plot", str(tmp_path / "eval.png"), "--reset-every", "16"])
    assert code == 0
    table = capsys.readouterr().out
    assert "loss at 16 | loss at 64" in table and "| spiking |" in table and "| softmax |" in table
    results = json.loads(out.read_text())["results"]
    assert [(r["mixer"], r["state"]) for r in results] == [
        ("spiking", "carried"), ("spiking", "reset every 16"), ("softmax", "sliding 32-token window")]
    assert all(r["sequences"] == 4 and set(r["loss_at_context"]) == {"16", "64"} for r in results)
    assert (tmp_path / "eval.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--context", "1024,256"], "--context: expected increasing counts >= 2, got '1024,256'"),
    (["--context", "4k"], "--context: expected comma-separated token counts"),
    (["--sequences", "0"], "--sequences: expected a positive count, got 0"),
    (["--reset-every", "-1"], "--reset-every: expected a token count >= 0 (0: never), got -1"),
    (["--context", "10000000"], "--context: expected at most"),
])
def test_user_errors_are_one_line(monkeypatch, tmp_path, corpus, capsys, argv, message):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    save_model(tmp_path / "run", "spiking")
    code = cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus), "--device", "cpu",
                     *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_of_another_corpus_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    save_model(tmp_path / "run", "spiking")
    other = tmp_path / "other.txt"
    other.write_text("abc" * 1000, encoding="utf-8")
    code = cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(other), "--device", "cpu"])
    assert code == 2 and "--data: expected the corpus the checkpoint" in capsys.readouterr().err
