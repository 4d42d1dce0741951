"""Corpus loader: where the text comes from, what a bad file or no network says, the 90/10 split, batches."""
import os
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

from tether import data

CORPUS = Path(os.environ.get("TETHER_DATA") or Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt")
needs_corpus = pytest.mark.skipif(not CORPUS.is_file(), reason=f"corpus not at {CORPUS}; set TETHER_DATA")


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No TETHER_DATA, and an empty cache directory."""
    monkeypatch.delenv("TETHER_DATA", raising=False)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_missing_file_names_the_argument(no_env):
    with pytest.raises(data.DataError, match=r"--data: expected the TinyShakespeare text file, got no file"):
        data.resolve_corpus(str(no_env / "nope.txt"))


def test_wrong_sha256_is_refused(no_env):
    bad = no_env / "bad.txt"
    bad.write_text("First Citizen:\nnot quite the corpus\n")
    with pytest.raises(data.DataError, match=f"expected a file with sha256 {data.CORPUS_SHA256}.*got sha256"):
        data.resolve_corpus(str(bad))


def test_env_var_is_used_and_checked(no_env, monkeypatch):
    bad = no_env / "bad.txt"
    bad.write_text("x")
    monkeypatch.setenv("TETHER_DATA", str(bad))
    with pytest.raises(data.DataError, match="TETHER_DATA: expected a file with sha256"):
        data.resolve_corpus()


@needs_corpus
def test_env_var_points_at_the_corpus(no_env, monkeypatch):
    monkeypatch.setenv("TETHER_DATA", str(CORPUS))
    assert data.resolve_corpus() == CORPUS


def test_no_network_says_how_to_fix(no_env, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data, "download", offline)
    with pytest.raises(data.DataError) as err:
        data.resolve_corpus()
    message = str(err.value)
    assert data.CORPUS_URL in message
    assert "--data PATH or set TETHER_DATA=PATH" in message
    assert "../shared/data/tinyshakespeare.txt" in message


@needs_corpus
def test_download_goes_to_the_cache_once(no_env, monkeypatch):
    calls = []

    def fake_download(url, dest):  # the network, replaced by a copy of the real bytes
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CORPUS, dest)

    monkeypatch.setattr(data, "download", fake_download)
    first = data.resolve_corpus()
    second = data.resolve_corpus()
    assert first == second == no_env / "cache" / data.CORPUS_NAME
    assert calls == [data.CORPUS_URL]


@needs_corpus
def test_split_vocab_and_batches():
    corpus = data.CharCorpus.load(str(CORPUS))
    text = CORPUS.read_text(encoding="utf-8")
    assert len(corpus.vocab) == 65 and corpus.vocab.chars == "".join(sorted(set(text)))
    train, val = corpus.splits["train"], corpus.splits["val"]
    assert len(train) == int(0.9 * len(text)) and len(train) + len(val) == len(text)
    assert corpus.vocab.decode(val[:50].tolist()) == text[len(train):len(train) + 50]

    x, y = corpus.batch("train", 6, 32, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (6, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # a rank's rows are its slice of the same global batch
    x_rows, _ = corpus.batch("train", 6, 32, torch.Generator().manual_seed(3), slice(3, 6))
    assert torch.equal(x_rows, x[3:])


def test_vocab_rejects_unknown_characters():
    vocab = data.Vocab("abc")
    assert vocab.decode(vocab.encode("cab").tolist()) == "cab"
    with pytest.raises(ValueError, match=r"prompt: expected characters of the model's vocabulary, got \['z'\]"):
        vocab.encode("abz", "prompt")
