"""Char-level TinyShakespeare: find or download the corpus, check it, split it 90/10, sample batches.

The corpus comes from (first match wins) an explicit path (``--data``), the ``TETHER_DATA`` environment
variable, or a download into the cache directory (``TETHER_CACHE``, default ``~/.cache/tether``).
Its sha256 is checked in every case, so every run trains on byte-identical text.
"""
import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Optional

import torch

CORPUS_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPUS_NAME = "tinyshakespeare.txt"
TRAIN_FRACTION = 0.9


class DataError(RuntimeError):
    """The corpus cannot be found, downloaded or verified; the message says how to fix it."""


def cache_dir() -> Path:
    return Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(path: Path, what: str) -> Path:
    """Return path if it holds the TinyShakespeare bytes; else a DataError naming where it came from."""
    if not path.is_file():
        raise DataError(f"{what}: expected the TinyShakespeare text file, got no file at {path}")
    digest = sha256_of(path)
    if digest != CORPUS_SHA256:
        raise DataError(f"{what}: expected a file with sha256 {CORPUS_SHA256} (TinyShakespeare, "
                        f"1,115,394 bytes), got sha256 {digest} for {path}")
    return path


def download(url: str, dest: Path) -> None:
    """Fetch url into dest atomically (a partial download never sits at dest)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    with urllib.request.urlopen(url, timeout=30) as response:
        tmp.write_bytes(response.read())
    os.replace(tmp, dest)


def resolve_corpus(path: Optional[str] = None) -> Path:
    """Path of a verified corpus: --data, else TETHER_DATA, else the cached (or freshly downloaded) copy."""
    if path:
        return verify(Path(path).expanduser(), "--data")
    if os.environ.get("TETHER_DATA"):
        return verify(Path(os.environ["TETHER_DATA"]).expanduser(), "TETHER_DATA")
    cached = cache_dir() / CORPUS_NAME
    if not cached.is_file():
        try:
            download(CORPUS_URL, cached)
        except OSError as err:  # URLError and socket timeouts are OSErrors
            raise DataError(
                f"could not download the corpus from {CORPUS_URL} ({err}). Without network, point at a "
                f"local copy: pass --data PATH or set TETHER_DATA=PATH "
                f"(e.g. --data ../shared/data/tinyshakespeare.txt)") from err
    return verify(cached, f"cached corpus (delete it to download again; from {CORPUS_URL})")


class Vocab:
    """Sorted characters of the corpus; token id = position in that list."""

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str, what: str = "text") -> torch.Tensor:
        missing = sorted(set(text) - set(self.index))
        if missing:
            raise ValueError(f"{what}: expected characters of the model's vocabulary, got {missing!r}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)  # [len(text)]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


class CharCorpus:
    """Token ids of the corpus, split 90/10 into train and validation, kept on one device."""

    def __init__(self, text: str, device="cpu"):
        self.vocab = Vocab("".join(sorted(set(text))))
        ids = self.vocab.encode(text).to(device)  # [n_chars]
        n_train = int(TRAIN_FRACTION * len(ids))
        self.splits = {"train": ids[:n_train], "val": ids[n_train:]}

    @classmethod
    def load(cls, path: Optional[str] = None, device="cpu") -> "CharCorpus":
        return cls(resolve_corpus(path).read_text(encoding="utf-8"), device)

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
              rows: slice = slice(None)):
        """Random windows: (x, y) [batch_size, block_size] long, y = x shifted by one.

        The window starts are drawn for the whole batch on the generator's device (a generator on the
        corpus's GPU needs no host-to-device copy, which would stall the step), then ``rows`` picks this
        process's share, so data-parallel ranks see disjoint parts of the same global batch.
        """
        data = self.splits[split]
        if len(data) <= block_size:
            raise ValueError(f"block_size: expected fewer than {len(data)} (the {split} split's length), "
                             f"got {block_size}")
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator,
                               device=generator.device)[rows]  # [b]
        offsets = torch.arange(block_size + 1, device=starts.device)  # [block_size + 1]
        windows = data[(starts[:, None] + offsets).to(data.device)]  # [b, block_size + 1]
        return windows[:, :-1], windows[:, 1:]
