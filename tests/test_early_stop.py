"""--patience: a run stops after that many validations without a new best, keeps the best weights in best/
and says so in its summary; 0 never stops early."""
import itertools
import json

import pytest

from tether import train


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"ROMEO: {i} the quick brown fox jumps over the lazy dog.\n" for i in range(400)),
                    encoding="utf-8")
    return path


def run(corpus, out, *flags):
    argv = ["--device", "cpu", "--data", str(corpus), "--d-model", "16", "--n-layer", "1", "--batch-size", "2",
            "--block-size", "8", "--max-iters", "40", "--eval-interval", "2", "--eval-iters", "1",
            "--log-interval", "2", "--sample-tokens", "5", "--out", str(out), *flags]
    return train.train(train.build_parser().parse_args(argv))


@pytest.mark.parametrize("patience, steps, stopped", [(2, 6, True), (0, 40, False)])
def test_patience(monkeypatch, tmp_path, corpus, in_process, patience, steps, stopped):
    losses = itertools.count(3.0, 0.1)  # every validation worse than the one before: the best is step 2's
    monkeypatch.setattr(train, "evaluate", lambda *args: (next(losses),) * 2)  # (all windows, periodic ones)
    summary = run(corpus, tmp_path / "run", "--patience", str(patience))
    assert summary["steps"] == steps and summary["stopped_early"] is stopped
    assert (summary["best_val_loss"], summary["best_val_step"]) == (3.0, 2)
    assert json.loads((tmp_path / "run" / "best" / "manifest.json").read_text())["step"] == 2


def test_negative_patience_is_refused(tmp_path, corpus):
    with pytest.raises(ValueError, match="--patience: expected >= 0, got -1"):
        run(corpus, tmp_path / "run", "--patience", "-1")
