"""Char-level corpora: find or download the text, check it, split it 90/10, sample batches.

The corpus comes from (first match wins) an explicit path (``--data``), the ``TETHER_DATA`` environment
variable, or a download of TinyShakespeare into the cache directory (``TETHER_CACHE``, default
``~/.cache/tether``). A given path may hold any UTF-8 text (the vocabulary is its set of characters); the
download's sha256 is checked, so every default run trains on byte-identical text.
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
    """The corpus cannot be found, downloaded, read or verified; the message says how to fix it."""


def cache_dir() -> Path:
    return Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(path: Path, what: str) -> Path:
    """Return path if it holds the TinyShakespeare bytes; else a DataError naming where it came from."""
    digest = sha256_of(path)
    if digest != CORPUS_SHA256:
        raise DataError(f"{what}: expected a file with sha256 {CORPUS_SHA256} (TinyShakespeare, "
                        f"1,115,394 bytes), got sha256 {digest} for {path}")
    return path


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text at path; a DataError naming ``what`` for no file, an empty file or bytes that are not
    UTF-8."""
    if not path.is_file():
        raise DataError(f"{what}: expected a UTF-8 text file, got no file at {path}")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"{what}: expected a UTF-8 text file, got an empty file {path}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{what}: expected a UTF-8 text file, got a binary file {path} (byte {err.start} "
                        f"is not UTF-8)") from None


def download(url: str, dest: Path) -> None:
    """Fetch url into dest atomically (a partial download never sits at dest)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    with urllib.request.urlopen(url, timeout=30) as response:
        tmp.write_bytes(response.read())
    os.replace(tmp, dest)


def resolve_corpus(path: Optional[str] = None) -> tuple:
    """(path, what): --data, else TETHER_DATA, else the cached (or freshly downloaded, verified) TinyShakespeare;
    ``what`` names where it came from, for errors."""
    if path:
        return Path(path).expanduser(), "--data"
    if os.environ.get("TETHER_DATA"):
        return Path(os.environ["TETHER_DATA"]).expanduser(), "TETHER_DATA"
    cached = cache_dir() / CORPUS_NAME
    if not cached.is_file():
        try:
            download(CORPUS_URL, cached)
        except OSError as err:  # URLError and socket timeouts are OSErrors
            raise DataError(
                f"could not download the corpus from {CORPUS_URL} ({err}). Without network, point at a "
                f"local copy: pass --data PATH or set TETHER_DATA=PATH (any UTF-8 text; TinyShakespeare is "
                f"{CORPUS_URL}, save it as {CORPUS_NAME})") from err
    what = f"cached corpus (delete it to download again; from {CORPUS_URL})"
    return verify(cached, what), what


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
    """Token ids of the corpus, split 90/10 into train and validation, kept on one device. ``path`` and
    ``what`` (the flag or variable it came from) are kept for errors and for the run's record."""

    def __init__(self, text: str, device="cpu", path: Optional[Path] = None, what: str = "--data"):
        self.path, self.what = path, what
        self.vocab = Vocab("".join(sorted(set(text))))
        ids = self.vocab.encode(text).to(device)  # [n_chars]
        n_train = int(TRAIN_FRACTION * len(ids))
        self.splits = {"train": ids[:n_train], "val": ids[n_train:]}

    @classmethod
    def load(cls, path: Optional[str] = None, device="cpu") -> "CharCorpus":
        path, what = resolve_corpus(path)
        return cls(read_text(path, what), device, path, what)

    def check_block_size(self, block_size: int) -> None:
        """Both splits must be longer than a training window; else a DataError naming where the text came from."""
        if len(self.splits["val"]) > block_size:
            return
        n_chars = len(self.splits["train"]) + len(self.splits["val"])
        needed = next(n for n in range(block_size, 20 * (block_size + 1))
                      if n - int(TRAIN_FRACTION * n) > block_size)
        raise DataError(f"{self.what}: expected a text of at least {needed} characters (its 10% validation split "
                        f"longer than --block-size {block_size}), got {n_chars} characters in {self.path}")

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
