"""Without a GPU, run the Triton kernels under the interpreter (set before any kernel is defined). The training
tests share one made-up corpus and one tiny run's flags, so they need no download and no shipped file."""
import contextlib
import os
import random

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


@contextlib.contextmanager
def pytorch_path_one_thread():
    """A training run inside this process on the PyTorch path with one thread, as the CLI tests' subprocesses
    run (tiny tensors: threads only fight the other processes for the cores)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture
def in_process():
    with pytorch_path_one_thread():
        yield


SPEAKERS = ["ROMEO", "JULIET", "NURSE", "MERCUTIO", "FRIAR LAURENCE"]
WORDS = ("the and of to my thou thee art love night day sweet fair what is not a in that me with be but for so "
         "o wherefore doth hath come go speak name rose").split()


def made_up_play(n_chars: int, seed: int = 0) -> str:
    """Speakers and lines of random words: text with the shape of TinyShakespeare, ROMEO: included."""
    rng = random.Random(seed)
    parts = []
    while sum(map(len, parts)) < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        parts.append(f"{rng.choice(SPEAKERS)}:\n{line.capitalize()}{rng.choice('.,!?')}\n\n")
    return "".join(parts)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Path of an 8 KB made-up corpus: the same on every machine, with or without TinyShakespeare."""
    path = tmp_path_factory.mktemp("corpus") / "play.txt"
    path.write_text(made_up_play(8000), encoding="utf-8")
    return path


# A tiny model and run: 30 steps, validation + checkpoint every 10. The time budget (600 minutes) never ends
# such a run nor shapes its cosine (progress = max(steps, elapsed) fraction), so a run slowed by a busy
# machine has the same learning rates as a fast one and a resumed run stays bit-identical.
TINY = ["--device", "cpu", "--d-model", "64", "--n-layer", "2", "--batch-size", "8", "--block-size", "16",
        "--lr", "3e-3", "--warmup-iters", "5", "--max-iters", "30", "--eval-interval", "10", "--eval-iters", "2",
        "--log-interval", "5", "--sample-tokens", "20", "--seed", "7", "--time-budget", "600"]


@pytest.fixture(scope="session")
def tiny(corpus):
    """The tiny run's flags on the made-up corpus."""
    return [*TINY, "--data", str(corpus)]
