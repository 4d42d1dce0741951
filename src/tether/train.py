"""Train the spiking char-level language model on TinyShakespeare, or on any UTF-8 text (--data).

    tether train [--mixer spiking|softmax|ttt-mlp] [--device cuda|cpu] [--out DIR] [--resume] ...
    torchrun --nproc_per_node=N -m tether.train ...   # data-parallel, same global batch as one process

Defaults depend on the device: on a GPU the default model for ~9.5 minutes, on a CPU a smaller model
for ~3 minutes. The run writes to --out: checkpoint/ (see tether.checkpoint), best/ (weights of the lowest
validation loss), metrics.jsonl, loss.png, sample.txt and summary.json. Ctrl-C or SIGTERM (at the next step
boundary), an error or the end of the time budget saves a checkpoint first; --resume continues it at the same
step with the same data and RNG streams, on the corpus file the run recorded (path and sha256).
"""
import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from tether import checkpoint, cli
from tether._checks import FORMS, VALUES
from tether.data import CharCorpus, DataError, read_text, sha256_of
from tether.progress import ProgressBar
from tether.step import TrainStep, autocast, compile_model, make_optimizer

# Train arguments that differ between a GPU and a CPU run; anything given on the command line wins,
# and on --resume the saved run's values come before these.
# GPU dropout 0.2: a GPU run sees the 1M-character corpus many times over and overfits without it
# (docs/model.md; benchmarks/results/quality_3min.md). GPU max_iters 6,000: the cosine ends where the
# validation loss is lowest (docs/model.md#ablations-2026-12-04); the time budget is the backstop.
# On a GPU the step is compiled (torch.compile fuses the norms, casts and dropout around the kernels) and
# replayed from a CUDA graph: benchmarks/results/lm_bench.md.
GPU_DEFAULTS = dict(batch_size=64, block_size=256, d_model=None, n_layer=4, lr=1e-3, max_iters=6_000,
                    time_budget=9.5, eval_interval=500, eval_iters=20, log_interval=10, dropout=0.2, compile=True,
                    values="real", decay=0.25)
# CPU: the model width, batch, lr and dropout that reach the lowest validation loss in 3 minutes of 2 cores
# (benchmarks/results/cpu_train.md); 1,000 steps of batch 32 see the corpus twice, too few for dropout to pay.
# Spike values and decay 0.5 there: in those 3 minutes they train better than the GPU's real values and decay
# 0.25 (benchmarks/results/cpu_values_ab/).
CPU_DEFAULTS = dict(batch_size=32, block_size=64, d_model=128, n_layer=4, lr=3e-3, max_iters=1_000,
                    time_budget=3.0, eval_interval=250, eval_iters=10, log_interval=10, dropout=0.0,
                    compile=False, values="spikes", decay=0.5)
COMMON_DEFAULTS = dict(data=None, mixer="spiking", out="runs/tether", seed=1337,
                       weight_decay=0.1, grad_clip=1.0, warmup_iters=100, sample_tokens=500, patience=4)
SAMPLE_PROMPT = "ROMEO:"
BEST = "best"  # subdirectory of --out with the weights of the lowest validation loss
# What a run writes to --out (a checkpoint's temp names and the layout before checkpoint/ included): a
# directory holding any of them holds a run, which only --resume or --force may touch; --force deletes these.
RUN_ENTRIES = [name + suffix for name in (checkpoint.CHECKPOINT, BEST) for suffix in ("", ".tmp", ".old")] + [
    "metrics.jsonl", "loss.png", "sample.txt", "summary.json",
    checkpoint.WEIGHTS, checkpoint.CONFIG, checkpoint.STATE]
FINAL_EVAL_FACTOR = 5  # the reported validation loss averages 5x the batches of a periodic eval


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are None here and filled in by resolve_args, so explicit flags can be told apart.
    p.add_argument("--data", help="UTF-8 text file to train on (else $TETHER_DATA, else TinyShakespeare, "
                                  "downloaded); --resume reuses the run's")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--mixer", choices=["spiking", "softmax", "ttt-mlp"], help="token mixer (default spiking)")
    p.add_argument("--out", help="output directory (default runs/tether)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--force", action="store_true", help="replace the run in --out (else it is refused)")
    p.add_argument("--max-iters", type=int, help="optimizer steps at most (also the cosine length)")
    p.add_argument("--time-budget", type=float, help="minutes of wall time at most (also the cosine length)")
    p.add_argument("--batch-size", type=int, help="global batch, split over data-parallel ranks")
    p.add_argument("--block-size", type=int, help="tokens per training sequence")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--d-model", type=int, help="model width (default: the model's own on GPU)")
    p.add_argument("--n-layer", type=int, help="number of blocks")
    p.add_argument("--dropout", type=float, help="dropout rate (default: 0.2 on GPU, 0 on CPU)")
    p.add_argument("--attention", choices=FORMS,
                   help="spiking attention form (default elementwise)")
    p.add_argument("--decay", type=float,
                   help="LIF membrane decay of the spiking mixer, in [0, 1] (default: 0.25 on GPU, 0.5 on CPU)")
    p.add_argument("--threshold", type=float, help="LIF firing threshold of the spiking mixer, > 0 (default 1)")
    p.add_argument("--values", choices=VALUES,
                   help="what the spiking attention accumulates: v real or as spikes (default: real on GPU, "
                        "spikes on CPU)")
    p.add_argument("--ttt-mini-batch", type=int, help="tokens per TTT-MLP inner step (ttt-mlp mixer; default 16)")
    p.add_argument("--eval-interval", type=int, help="steps between validation + checkpoint")
    p.add_argument("--eval-iters", type=int, help="batches per validation estimate")
    p.add_argument("--log-interval", type=int, help="steps between progress/metrics lines")
    p.add_argument("--warmup-iters", type=int, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="max global grad norm")
    p.add_argument("--seed", type=int)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the training step from a CUDA graph (default: on for one CUDA process)")
    p.add_argument("--sample-tokens", type=int, help="characters generated at the end")
    p.add_argument("--patience", type=int,
                   help="stop after this many validations without a new best (default 4; 0: never stop early)")


def resolve_args(args: argparse.Namespace, device: torch.device, saved: dict = None) -> argparse.Namespace:
    """Explicit flags, then the resumed run's arguments, then the device's defaults."""
    defaults = {**COMMON_DEFAULTS, **(GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, (saved or {}).get(key, value))
    args.device = str(device)
    check_args(args, device)
    return args


# Activation bytes a training step keeps per token, layer and model channel (fp32 on the CPU, bf16 on CUDA,
# plus the spike trains, masks and MLP hidden states of a block): a rough figure to refuse a --block-size
# that cannot fit, not a promise that a smaller one does.
ACTIVATION_FLOATS_PER_CHANNEL = 40


def available_memory(device: torch.device) -> int:
    """Free memory of the GPU, or the host's physical memory, in bytes."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def activation_bytes(args, device: torch.device) -> int:
    from tether.models import LMConfig

    d_model = args.d_model or LMConfig.d_model
    per_token = ACTIVATION_FLOATS_PER_CHANNEL * d_model * (2 if device.type == "cuda" else 4) * args.n_layer
    scores = 4 * LMConfig.n_head * args.block_size * args.n_layer if args.mixer == "softmax" else 0  # T x T
    return args.batch_size * args.block_size * (per_token + scores)


def check_args(args, device: torch.device) -> None:
    """Every numeric flag, before any work: the message names the flag, what was expected and what came."""
    from tether.models import LMConfig

    def flag(key):
        return f"--{key.replace('_', '-')}"

    for key in ("max_iters", "batch_size", "block_size", "eval_interval", "eval_iters", "log_interval", "n_layer",
                "ttt_mini_batch"):  # None: the model's default
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ValueError(f"{flag(key)}: expected a positive integer, got {getattr(args, key)}")
    for key, what in (("time_budget", "positive minutes"), ("lr", "> 0"), ("grad_clip", "> 0")):
        if not getattr(args, key) > 0:
            raise ValueError(f"{flag(key)}: expected {what}, got {getattr(args, key)}")
    for key in ("warmup_iters", "sample_tokens", "weight_decay", "patience"):
        if not getattr(args, key) >= 0:
            raise ValueError(f"{flag(key)}: expected >= 0, got {getattr(args, key)}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout: expected a rate in [0, 1), got {args.dropout}")
    if args.decay is not None and not 0 <= args.decay <= 1:
        raise ValueError(f"--decay: expected a membrane decay in [0, 1], got {args.decay}")
    if args.threshold is not None and not args.threshold > 0:
        raise ValueError(f"--threshold: expected a firing threshold > 0, got {args.threshold}")
    n_head = LMConfig.n_head
    if args.d_model is not None and (args.d_model <= 0 or args.d_model % n_head):
        raise ValueError(f"--d-model: expected a positive multiple of the {n_head} heads, got {args.d_model}")
    needed, available = activation_bytes(args, device), available_memory(device)
    if needed > available:
        raise ValueError(f"--block-size: expected a batch that fits in memory, got {args.block_size} tokens x "
                         f"{args.batch_size} sequences x {args.n_layer} layers ~ {needed / 2**30:.1f} GiB of "
                         f"activations, {available / 2**30:.1f} GiB available on {device}; lower --block-size "
                         f"or --batch-size")


def check_out(out: Path, args) -> None:
    """Refuse to write a new run over an existing one."""
    if args.resume or args.force or not out.is_dir():
        return
    found = [name for name in RUN_ENTRIES if (out / name).exists()]
    if found:
        raise ValueError(f"--out: expected a directory without a run, got {out} holding one ({', '.join(found)}); "
                         f"pass --resume to continue it or --force to replace it")


def clear_run(out: Path) -> None:
    """--force: delete what an earlier run wrote to out (only that)."""
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def pick_device(requested) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected cpu on this machine (no CUDA device), got {requested}")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device: expected cuda or cpu, got {requested}")
    return device


class Distributed:
    """Rank, world size and collectives; a world of one when not launched by torchrun."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            # NVLink multicast (NVLS / symmetric memory) hangs on the lent multi-GPU machines.
            os.environ["NCCL_NVLS_ENABLE"] = "0"
            os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: list) -> list:
        """Average floats over ranks (one small collective, called at log time only)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # [len(values)]
        dist.all_reduce(t)
        t /= self.world
        return t.tolist()

    def from_main(self, value: float) -> float:
        """Rank 0's value on every rank, so time-based decisions (lr, stop) agree."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return t.item()

    def rows(self, batch_size: int) -> slice:
        per_rank = batch_size // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def close(self, barrier: bool = False) -> None:
        """Leave the process group. barrier (the end of a run): wait for every rank first, so no rank tears
        its gloo connections down while another still uses them (rank 0 writes files and a sample last;
        a rank that left early aborted with "terminate called without an active exception")."""
        if self.world > 1:
            if barrier:
                dist.barrier()
            dist.destroy_process_group()


class Stop(KeyboardInterrupt):
    """SIGINT or SIGTERM, acted on at a step boundary."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While installed, the first SIGINT / SIGTERM only records itself; the training loop stops at the next
    step boundary, so the checkpoint holds whole steps and the RNG states of that boundary (a resume matches
    an uninterrupted run). A second signal raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def learning_rate(args, step: int, elapsed_s: float) -> float:
    """Linear warmup, then cosine to lr/10 over whichever ends first: max_iters steps or the time budget."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    progress = min(1.0, max(step / args.max_iters, elapsed_s / (60 * args.time_budget)))
    min_lr = args.lr / 10
    return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The training batch of a step depends only on (seed, step): a resumed run sees the same data."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


@torch.no_grad()
def evaluate(model, corpus: CharCorpus, args, world: Distributed, batches: int) -> tuple:
    """Mean validation loss over a fixed set of windows (same seed every call: a smooth curve) -> (over all
    ``batches``, over the first ``args.eval_iters``: the windows of every periodic validation, which a longer
    final one starts with, so that the two compare)."""
    model.eval()
    generator = torch.Generator(device=world.device).manual_seed(args.seed + 1)
    total = torch.zeros((), device=world.device)
    head = min(batches, args.eval_iters)
    for i in range(batches):
        x, y = corpus.batch("val", args.batch_size, args.block_size, generator, world.rows(args.batch_size))
        with autocast(world.device):
            _, loss = model(x, y)
        total += loss.float()
        if i + 1 == head:
            head_total = total.clone()
    model.train()
    full, first = world.mean([total.item() / batches, head_total.item() / head])
    return full, first


def load_corpus(given, saved: dict, device) -> CharCorpus:
    """The corpus of a new run (``given`` --data, else TETHER_DATA or the download), or of a resumed one: the
    file its config records (path and sha256), which an explicit --data may replace only by the same text."""
    record = (saved or {}).get("corpus")
    if record is None:
        corpus = CharCorpus.load(given, device)
        if saved and saved["vocab"] != corpus.vocab.chars:  # a checkpoint from before the config held its corpus
            raise DataError("--data: expected the corpus the checkpoint was trained on (same vocabulary), "
                            "got a different character set")
        return corpus
    if given is None:
        path = Path(record["path"])
        if not path.is_file():
            raise DataError(f"--resume: expected the run's corpus at {path} (recorded in its checkpoint), got no "
                            f"file there; pass --data with a copy of it")
        corpus = CharCorpus(read_text(path, "--resume"), device, path, "--resume")
    else:
        corpus = CharCorpus.load(given, device)
    digest = sha256_of(corpus.path)
    if digest != record["sha256"]:
        raise DataError(f"{corpus.what}: expected the text the run was trained on ({record['path']}, sha256 "
                        f"{record['sha256']}), got {corpus.path} with sha256 {digest}; resuming on other text is "
                        f"refused: drop --data, or start a new run with --force")
    return corpus


def sample_prompt(corpus: CharCorpus) -> str:
    """ROMEO: when the vocabulary has its characters, else the corpus's first characters."""
    if set(SAMPLE_PROMPT) <= set(corpus.vocab.chars):
        return SAMPLE_PROMPT
    return corpus.vocab.decode(corpus.splits["train"][:len(SAMPLE_PROMPT)].tolist())


def model_config(args, vocab: str, saved: dict = None):
    from tether.models import LMConfig

    if saved is not None:
        return LMConfig.from_dict({"vocab": vocab, **saved})  # a checkpoint from before the config held it
    overrides = {"d_model": args.d_model, "n_layer": args.n_layer, "dropout": args.dropout,
                 "attention": args.attention, "values": args.values, "decay": args.decay,
                 "threshold": args.threshold, "ttt_mini_batch": args.ttt_mini_batch}
    return LMConfig(vocab_size=len(vocab), vocab=vocab, block_size=args.block_size, mixer=args.mixer,
                    **{k: v for k, v in overrides.items() if v is not None})


class RunFiles:
    """Everything rank 0 writes under --out besides the checkpoint."""

    def __init__(self, out: Path):
        self.out = out
        self.metrics_path = out / "metrics.jsonl"

    def restart_metrics(self, keep_until_step: int) -> None:
        """On resume, drop records past the checkpoint so the curve continues without a fork."""
        if not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [ln for ln in lines if ln and json.loads(ln)["step"] <= keep_until_step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("loss.png skipped: plotting needs matplotlib (pip install 'tether[train]')", file=sys.stderr)
            return
        records = [json.loads(ln) for ln in self.metrics_path.read_text().splitlines() if ln]
        fig, ax = plt.subplots(figsize=(7, 4))
        for split in ("train", "val"):
            points = [(r["step"], r["loss"]) for r in records if r["split"] == split]
            if points:
                ax.plot(*zip(*points), label=split, marker="o" if split == "val" else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/char)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)


@dataclass
class RunState:
    """Where a run is, as a checkpoint's state.pt holds it: written by ``save`` and read by ``restore`` only.

    ``elapsed_s`` is the wall time of the earlier sessions; this session's runs from ``started`` (monotonic).
    ``best_val``: (loss, step) of the lowest validation loss, whose weights are in out/best. The optimizer's
    and the RNGs' states are taken at ``save`` and put back at ``restore``; the data position is the step
    (the batch of a step depends only on (seed, step)); the lr schedule is a function of (step, elapsed_s)
    and the train arguments, recorded for a reader.
    """

    step: int = 0
    elapsed_s: float = 0.0
    train_time_s: float = 0.0
    tokens_seen: int = 0
    best_val: tuple = (float("inf"), 0)
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        """Wall seconds of the run, every session included."""
        return self.elapsed_s + time.monotonic() - self.started

    def save(self, optimizer, args, device: torch.device) -> dict:
        return {"step": self.step, "elapsed_s": self.elapsed(), "train_time_s": self.train_time_s,
                "tokens_seen": self.tokens_seen, "optimizer": optimizer.state_dict(),
                "schedule": {k: getattr(args, k) for k in ("lr", "warmup_iters", "max_iters", "time_budget")},
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                "data": {"seed": args.seed, "next_step": self.step}, "best_val": self.best_val}

    @classmethod
    def restore(cls, state: dict, optimizer, device: torch.device, started: float) -> "RunState":
        """The run of ``state`` (a dict ``save`` wrote), its optimizer and RNG states put back."""
        if state["data"]["next_step"] != state["step"]:
            raise ValueError(f"--resume: expected a checkpoint whose data position is its step {state['step']}, "
                             f"got {state['data']['next_step']}")
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        random.setstate(state["rng"]["python"])
        return cls(step=state["step"], elapsed_s=state["elapsed_s"], train_time_s=state["train_time_s"],
                   tokens_seen=state["tokens_seen"], best_val=tuple(state.get("best_val", cls.best_val)),
                   started=started)


@dataclass
class Meter:
    """What the log lines and the summary report, as the loop goes."""

    train_loss: Optional[float] = None
    firing: Optional[float] = None  # mean firing rate of the last log interval (None: not a spiking model)
    energy: dict = field(default_factory=dict)
    rates: list = field(default_factory=list)  # tokens/s of each log interval (a steady figure: the median)
    interval_steps: int = 0
    interval_start: float = field(default_factory=time.monotonic)
    paused: float = 0.0  # validation and checkpoint seconds of this interval: not training time
    stopped_early: bool = False

    def next_interval(self) -> None:
        self.interval_steps, self.interval_start, self.paused = 0, time.monotonic(), 0.0


class Trainer:
    """One run of ``tether train``: set up from args (new or resumed), then ``run()``."""

    def __init__(self, args: argparse.Namespace):
        started = time.monotonic()
        device = pick_device(args.device)
        self.out = Path(args.out or COMMON_DEFAULTS["out"])
        check_out(self.out, args)  # on every rank before any rank can write (they meet in Distributed first)
        self.world = Distributed(device)
        resumed = checkpoint.find(self.out, "--resume", need_state=True) if args.resume else None
        saved_config = checkpoint.load_config(resumed) if args.resume else None
        given_data = args.data  # before resolve_args fills in the resumed run's
        self.args = args = resolve_args(args, device, saved_config["train"] if saved_config else None)
        self.device = self.world.device
        if args.batch_size % self.world.world:
            raise ValueError(f"--batch-size: expected a multiple of the {self.world.world} data-parallel ranks, "
                             f"got {args.batch_size}")
        torch.manual_seed(args.seed)
        self.corpus = load_corpus(given_data, saved_config, self.device)
        self.corpus.check_block_size(args.block_size)
        args.data = str(self.corpus.path.resolve())  # the run remembers a corpus from TETHER_DATA or the cache
        self._build(saved_config["model"] if saved_config else None, resumed, started)
        self.run_config = {"model": self.config.to_dict(), "vocab": self.corpus.vocab.chars,
                           "corpus": {"path": args.data, "sha256": sha256_of(self.corpus.path)},
                           "train": vars(args)}
        self.files = RunFiles(self.out)
        self._open_out()
        self.train_step = TrainStep(self.model, self.raw, self.optimizer, grad_clip=args.grad_clip,
                                    device=self.device, cuda_graph=self._cuda_graph())
        self.bar = ProgressBar(args.max_iters, 60 * args.time_budget)
        self.tokens_per_step = args.batch_size * args.block_size
        self.meter = Meter()

    def _build(self, saved_model: Optional[dict], resumed: Optional[Path], started: float) -> None:
        """The model, its optimizer and the run state: fresh, or the checkpoint's."""
        from tether.models import build_model

        self.config = model_config(self.args, self.corpus.vocab.chars, saved_model)
        self.raw = build_model(self.config).to(self.device)
        self.optimizer = make_optimizer(self.raw, self.args.lr, self.args.weight_decay, self.device)
        self.state = RunState(started=started)
        if resumed is not None:
            state = checkpoint.load_state(resumed)
            checkpoint.load_weights(resumed, self.raw, self.device)
            self.state = RunState.restore(state, self.optimizer, self.device, started)
        self.n_params = self.raw.num_params()
        self.model = compile_model(self.raw, self.device) if self.args.compile else self.raw
        if self.world.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=device_ids)

    def _open_out(self) -> None:
        """Rank 0: a new run clears --out, a resumed one drops the metrics past its checkpoint."""
        if not self.world.main:
            return
        args, out = self.args, self.out
        out.mkdir(parents=True, exist_ok=True)
        if args.resume:
            self.files.restart_metrics(self.state.step)
        else:
            clear_run(out)
            self.files.metrics_path.write_text("")
        print(f"tether train: {self.config.mixer} model, {self.n_params / 1e6:.2f}M parameters, device "
              f"{self.device} x{self.world.world}, batch {args.batch_size} x {args.block_size} tokens, "
              f"{'resuming at step ' + str(self.state.step) if args.resume else 'from scratch'} -> {out}",
              flush=True)

    def _cuda_graph(self) -> bool:
        cuda_graph, device, world = self.args.cuda_graph, self.device, self.world.world
        if cuda_graph is None:
            return device.type == "cuda" and world == 1
        if cuda_graph and (device.type != "cuda" or world > 1):
            raise ValueError(f"--cuda-graph: expected one CUDA process, got device {device}, {world} processes")
        return cuda_graph

    def save(self) -> None:
        if self.world.main:
            checkpoint.save(self.out, self.raw, self.run_config, self.state.save(self.optimizer, self.args,
                                                                                 self.device))
            self.files.plot()

    def track_best(self, loss: float) -> None:
        """Keep the weights of the lowest validation loss in out/best (a long run ends past it)."""
        if loss < self.state.best_val[0]:
            self.state.best_val = (loss, self.state.step)
            if self.world.main:
                checkpoint.save_weights(self.out / BEST, self.raw, self.run_config, self.state.step)

    def run(self) -> dict:
        """Train, checkpointing on a signal or an error; then the final validation, sample and summary."""
        signals = StopSignals()
        try:
            self.loop(signals)
        except KeyboardInterrupt:
            self.save()
            if self.world.main:
                self.bar.message(f"interrupted: checkpoint at step {self.state.step} in "
                                 f"{self.out / checkpoint.CHECKPOINT}; continue with --resume")
            self.world.close()
            raise
        except Exception:
            # Keep the last completed step; a failure while saving must not hide the original error.
            try:
                self.save()
            except Exception as err:  # noqa: BLE001
                print(f"checkpoint after the error failed too: {err}", file=sys.stderr)
            raise
        finally:
            signals.restore()
        summary = self.finish()
        self.world.close(barrier=True)
        return summary

    def loop(self, signals: StopSignals) -> None:
        """Steps until max_iters, the time budget, early stopping or a signal (acted on at a step boundary)."""
        args, state = self.args, self.state
        self.synced_elapsed = self.world.from_main(state.elapsed())
        stop = state.step >= args.max_iters or self.synced_elapsed >= 60 * args.time_budget
        self.stop_signal = None  # the signal all ranks act on: rank 0's, agreed at log steps when data-parallel
        while not stop:
            self.stop_signal = signals.received if self.world.world == 1 else self.stop_signal
            if self.stop_signal:
                raise Stop(self.stop_signal)
            lr = learning_rate(args, state.step, self.synced_elapsed)
            x, y = self.corpus.batch("train", args.batch_size, args.block_size,
                                     step_generator(args.seed, state.step, self.device),
                                     self.world.rows(args.batch_size))
            self.train_step(x, y, lr)
            state.step += 1
            checkpoint.fault("step")  # tests only (TETHER_FAULT): a kill between steps
            self.meter.interval_steps += 1
            state.tokens_seen += self.tokens_per_step
            last = state.step >= args.max_iters
            if state.step % args.log_interval == 0 or last:
                last = self.log_train(lr, signals) or last
            if state.step % args.eval_interval == 0 and not last:
                last = self.validate()
            stop = last

    def log_train(self, lr: float, signals: StopSignals) -> bool:
        """The log step: train loss, rate, lr to metrics.jsonl and the bar; True once the time budget is spent."""
        meter, world = self.meter, self.world
        train_loss, firing, _ = self.train_step.take_sums()
        meter.train_loss, firing_mean = world.mean([train_loss, firing or 0.0])
        meter.firing = firing_mean if firing is not None else None
        seconds = time.monotonic() - meter.interval_start - meter.paused
        self.state.train_time_s += seconds
        tokens_per_s = meter.interval_steps * self.tokens_per_step / seconds
        meter.rates.append(tokens_per_s)
        self.synced_elapsed = world.from_main(self.state.elapsed())
        if world.world > 1:
            self.stop_signal = int(world.from_main(float(signals.received or 0)))
        if world.main:
            self.files.log({"step": self.state.step, "split": "train", "loss": meter.train_loss, "lr": lr,
                            "tokens_per_s": tokens_per_s, "firing_rate": meter.firing,
                            "elapsed_s": self.synced_elapsed})
            fr = f" | fr {meter.firing:.3f}" if meter.firing is not None else ""
            self.bar.update(self.state.step, self.synced_elapsed, f"loss {meter.train_loss:.3f} | "
                            f"{tokens_per_s / 1e3:.0f}k tok/s{fr} | lr {lr:.1e}")
        meter.next_interval()
        return self.synced_elapsed >= 60 * self.args.time_budget

    def validate(self) -> bool:
        """The eval step: validation loss, best weights, energy, checkpoint; True to stop early (--patience)."""
        args, state, meter = self.args, self.state, self.meter
        eval_start = time.monotonic()
        val_loss, _ = evaluate(self.raw, self.corpus, args, self.world, args.eval_iters)
        self.track_best(val_loss)
        stalled = state.step - state.best_val[1] >= args.patience * args.eval_interval
        if args.patience and stalled:  # past its best: stop there (best/ holds the best weights)
            meter.stopped_early = True
            if self.world.main:
                self.bar.message(f"step {state.step}: stopping early, no better validation loss for "
                                 f"{args.patience} evaluations (best {state.best_val[0]:.4f} at step "
                                 f"{state.best_val[1]}, in {self.out / BEST})")
        if self.world.main:
            meter.energy = self.raw.energy_per_token()
            self.files.log({"step": state.step, "split": "val", "loss": val_loss, "elapsed_s": state.elapsed(),
                            **meter.energy})
            ann_uj = meter.energy.get("energy_ann_j", 0) * 1e6
            energy = (f"{meter.energy.get('energy_spiking_j', 0) * 1e6:.3f} uJ spiking vs {ann_uj:.3f} uJ ANN"
                      if self.raw.mixer == "spiking" else f"{ann_uj:.3f} uJ (no spikes)")
            self.bar.message(f"step {state.step}: val loss {val_loss:.4f} | energy/token {energy}")
        self.save()
        meter.paused += time.monotonic() - eval_start
        return meter.stopped_early

    def finish(self) -> dict:
        """The final validation (more batches), checkpoint, sample and summary; {} on ranks other than 0."""
        from tether.generate import sample

        args, state, meter = self.args, self.state, self.meter
        # best/ and best_val_loss compare on the periodic windows; the reported loss reads 5x as many
        val_loss, val_loss_periodic = evaluate(self.raw, self.corpus, args, self.world,
                                               FINAL_EVAL_FACTOR * args.eval_iters)
        self.track_best(val_loss_periodic)
        if not self.world.main:
            return {}
        meter.energy = self.raw.energy_per_token()
        self.files.log({"step": state.step, "split": "val", "loss": val_loss_periodic, "elapsed_s": state.elapsed(),
                        **meter.energy})
        self.files.log({"step": state.step, "split": "val_final", "loss": val_loss, "elapsed_s": state.elapsed()})
        self.save()
        self.bar.message(f"step {state.step}: final val loss {val_loss:.4f} ({FINAL_EVAL_FACTOR}x the windows; "
                         f"{val_loss_periodic:.4f} on those of every validation)")
        text = sample(self.raw, self.corpus.vocab, sample_prompt(self.corpus), args.sample_tokens, temperature=0.8,
                      top_k=40, generator=torch.Generator(device=self.device).manual_seed(args.seed))
        (self.out / "sample.txt").write_text(text)
        print(f"--- sample ---\n{text}\n--------------", flush=True)
        summary = summarize(self, val_loss, val_loss_periodic)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: summary[k] for k in ("val_loss", "tokens_per_s", "wall_time_s", "steps")}),
              flush=True)
        return summary


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) training as args say; returns the summary (rank 0) or {} (other ranks)."""
    return Trainer(args).run()


def summarize(trainer: Trainer, val_loss: float, val_loss_periodic: float) -> dict:
    import triton

    args, config, state, meter, world = trainer.args, trainer.config, trainer.state, trainer.meter, trainer.world
    device = world.device
    return {
        # val_loss: 5x the windows of a validation; best_val_loss and val_loss_periodic: on those of every one
        "mixer": config.mixer, "val_loss": val_loss, "val_loss_periodic": val_loss_periodic,
        "best_val_loss": state.best_val[0],
        "best_val_step": state.best_val[1], "train_loss": meter.train_loss, "steps": state.step,
        "tokens_seen": state.tokens_seen, "tokens_per_s": state.tokens_seen / max(state.train_time_s, 1e-9),
        # median over log intervals: the steady rate, without the first interval's kernel compilation
        "tokens_per_s_steady": sorted(meter.rates)[len(meter.rates) // 2] if meter.rates else None,
        "wall_time_s": state.elapsed(), "train_time_s": state.train_time_s, "params": trainer.n_params,
        "firing_rate": meter.firing, "energy_per_token": meter.energy,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": world.world, "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"), "model": config.to_dict(), "train_args": vars(args),
        "stopped_early": meter.stopped_early,
    }


def build_parser(parser: argparse.ArgumentParser = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="tether train", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """train(args) as a command: exit code 130 after Ctrl-C, 143 after SIGTERM (the checkpoint is saved)."""
    try:
        train(args)
    except KeyboardInterrupt as err:
        return 128 + getattr(err, "signum", signal.SIGINT)
    return 0


def main(argv=None) -> int:
    return cli.command("tether train", build_parser, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
