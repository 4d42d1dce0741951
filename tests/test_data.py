"""Corpus loader: any UTF-8 text from --data or TETHER_DATA, what a missing, binary, empty or too short file says,
the verified TinyShakespeare download (faked: no network), the 90/10 split, batches."""
import hashlib
import shutil
import urllib.error

import pytest
import torch

from tether import cli, data


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No TETHER_DATA, and an empty cache directory."""
    monkeypatch.delenv("TETHER_DATA", raising=False)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_any_text_file_is_a_corpus(no_env, corpus):
    loaded = data.CharCorpus.load(str(corpus))
    assert loaded.vocab.chars == "".join(sorted(set(corpus.read_text(encoding="utf-8"))))
    assert (loaded.path, loaded.what) == (corpus, "--data")


@pytest.mark.parametrize("content, expected", [
    (None, "--data: expected a UTF-8 text file, got no file at {path}"),
    (b"", "--data: expected a UTF-8 text file, got an empty file {path}"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xff\xfe binary", "--data: expected a UTF-8 text file, got a binary file "
                                                           "{path} (byte 10 is not UTF-8)"),
    ("short text ".encode() * 10, "--data: expected a text of at least 161 characters (its 10% validation split "
                                  "longer than --block-size 16), got 110 characters in {path}"),
])
def test_a_bad_data_file_is_one_line_naming_the_flag(no_env, capsys, content, expected):
    path = no_env / "any.bin"
    if content is not None:
        path.write_bytes(content)
    code = cli.main(["train", "--device", "cpu", "--block-size", "16", "--data", str(path),
                     "--out", str(no_env / "run")])
    assert (code, capsys.readouterr().err) == (2, f"tether train: {expected.format(path=path)}\n")
    assert not (no_env / "run").exists()


def test_env_var_is_used_and_names_itself(no_env, monkeypatch, corpus):
    monkeypatch.setenv("TETHER_DATA", str(corpus))
    assert data.CharCorpus.load().path == corpus
    monkeypatch.setenv("TETHER_DATA", str(no_env / "nope.txt"))
    with pytest.raises(data.DataError, match="TETHER_DATA: expected a UTF-8 text file, got no file"):
        data.CharCorpus.load()


def test_no_network_says_how_to_fix(no_env, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data, "download", offline)
    with pytest.raises(data.DataError) as err:
        data.resolve_corpus()
    message = str(err.value)
    assert data.CORPUS_URL in message
    assert "--data PATH or set TETHER_DATA=PATH" in message
    assert "shared/data" not in message  # no path that exists only on a developer's machine


@pytest.fixture
def fake_download(no_env, monkeypatch, corpus):
    """The network replaced by a copy of the made-up corpus, whose sha256 stands in for TinyShakespeare's."""
    calls = []

    def download(url, dest):
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpus, dest)

    monkeypatch.setattr(data, "download", download)
    monkeypatch.setattr(data, "CORPUS_SHA256", hashlib.sha256(corpus.read_bytes()).hexdigest())
    return calls


def test_download_goes_to_the_cache_once(no_env, fake_download):
    first = data.resolve_corpus()
    second = data.resolve_corpus()
    assert first[0] == second[0] == no_env / "cache" / data.CORPUS_NAME
    assert fake_download == [data.CORPUS_URL]


def test_the_download_is_checked(no_env, fake_download):
    (no_env / "cache").mkdir()
    (no_env / "cache" / data.CORPUS_NAME).write_text("First Citizen:\nnot quite the corpus\n")
    with pytest.raises(data.DataError, match=f"cached corpus .*: expected a file with sha256 "
                                             f"{data.CORPUS_SHA256} .*got sha256"):
        data.resolve_corpus()
    assert fake_download == []


def test_split_vocab_and_batches(corpus):
    loaded = data.CharCorpus.load(str(corpus))
    text = corpus.read_text(encoding="utf-8")
    assert loaded.vocab.chars == "".join(sorted(set(text)))
    train, val = loaded.splits["train"], loaded.splits["val"]
    assert len(train) == int(0.9 * len(text)) and len(train) + len(val) == len(text)
    assert loaded.vocab.decode(val[:50].tolist()) == text[len(train):len(train) + 50]

    x, y = loaded.batch("train", 6, 32, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (6, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # a rank's rows are its slice of the same global batch
    x_rows, _ = loaded.batch("train", 6, 32, torch.Generator().manual_seed(3), slice(3, 6))
    assert torch.equal(x_rows, x[3:])


def test_vocab_rejects_unknown_characters():
    vocab = data.Vocab("abc")
    assert vocab.decode(vocab.encode("cab").tolist()) == "cab"
    with pytest.raises(ValueError, match=r"prompt: expected characters of the model's vocabulary, got \['z'\]"):
        vocab.encode("abz", "prompt")
