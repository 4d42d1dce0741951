"""Without a GPU, run the Triton kernels under the interpreter (set before any kernel is defined)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def in_process(monkeypatch):
    """A training run inside this process on the PyTorch path with one thread, as the CLI tests' subprocesses
    run (tiny tensors: threads only fight the other processes for the cores)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
