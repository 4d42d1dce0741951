"""Train the spiking char-level language model on TinyShakespeare.

    tether train [--mixer spiking|softmax|ttt-mlp] [--device cuda|cpu] [--out DIR] [--resume] ...
    torchrun --nproc_per_node=N -m tether.train ...   # data-parallel, same global batch as one process

Defaults depend on the device: on a GPU the default model for ~9.5 minutes, on a CPU a smaller model
for ~3 minutes. The run writes to --out: checkpoint/ (see tether.checkpoint), best/ (weights of the lowest
validation loss), metrics.jsonl, loss.png, sample.txt and summary.json. Ctrl-C or SIGTERM (at the next step
boundary), an error or the end of the time budget saves a checkpoint first; --resume continues it at the same
step with the same data and RNG streams.
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
from pathlib import Path

import torch
import torch.distributed as dist

from tether import checkpoint, cli
from tether.data import CharCorpus
from tether.progress import ProgressBar
from tether.step import TrainStep, autocast, make_optimizer

# Train arguments that differ between a GPU and a CPU run; anything given on the command line wins,
# and on --resume the saved run's values come before these.
# GPU dropout 0.2: in a 90 s H100 check (dropout 0.1) train loss was already 0.21 below val loss, and a
# 9.5 minute run sees the 1M-character corpus ~200 times.
# On a GPU the step is compiled (torch.compile fuses the norms, casts and dropout around the kernels) and
# replayed from a CUDA graph: benchmarks/results/lm_bench.md.
GPU_DEFAULTS = dict(batch_size=64, block_size=256, d_model=None, n_layer=4, lr=1e-3, max_iters=100_000,
                    time_budget=9.5, eval_interval=500, eval_iters=20, log_interval=10, dropout=0.2, compile=True)
# CPU: the model width, batch, lr and dropout that reach the lowest validation loss in 3 minutes of 2 cores
# (benchmarks/results/cpu_train.md); 1,000 steps of batch 32 see the corpus twice, too few for dropout to pay.
CPU_DEFAULTS = dict(batch_size=32, block_size=64, d_model=128, n_layer=4, lr=3e-3, max_iters=1_000,
                    time_budget=3.0, eval_interval=250, eval_iters=10, log_interval=10, dropout=0.0,
                    compile=False)
COMMON_DEFAULTS = dict(data=None, mixer="spiking", out="runs/tether", seed=1337,
                       weight_decay=0.1, grad_clip=1.0, warmup_iters=100, sample_tokens=500)
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
    p.add_argument("--data", help="path of tinyshakespeare.txt (else $TETHER_DATA, else download)")
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

    for key in ("max_iters", "batch_size", "block_size", "eval_interval", "eval_iters", "log_interval", "n_layer"):
        if getattr(args, key) <= 0:
            raise ValueError(f"{flag(key)}: expected a positive integer, got {getattr(args, key)}")
    for key, what in (("time_budget", "positive minutes"), ("lr", "> 0"), ("grad_clip", "> 0")):
        if not getattr(args, key) > 0:
            raise ValueError(f"{flag(key)}: expected {what}, got {getattr(args, key)}")
    for key in ("warmup_iters", "sample_tokens", "weight_decay"):
        if not getattr(args, key) >= 0:
            raise ValueError(f"{flag(key)}: expected >= 0, got {getattr(args, key)}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout: expected a rate in [0, 1), got {args.dropout}")
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

    def close(self) -> None:
        if self.world > 1:
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
def evaluate(model, corpus: CharCorpus, args, world: Distributed, batches: int) -> float:
    """Mean validation loss over a fixed set of windows (same seed every call: a smooth curve)."""
    model.eval()
    generator = torch.Generator(device=world.device).manual_seed(args.seed + 1)
    total = torch.zeros((), device=world.device)
    for _ in range(batches):
        x, y = corpus.batch("val", args.batch_size, args.block_size, generator, world.rows(args.batch_size))
        with autocast(world.device):
            _, loss = model(x, y)
        total += loss.float()
    model.train()
    return world.mean([total.item() / batches])[0]


def model_config(args, vocab: str, saved: dict = None):
    from tether.models import LMConfig

    if saved is not None:
        return LMConfig.from_dict({"vocab": vocab, **saved})  # a checkpoint from before the config held it
    overrides = {"d_model": args.d_model, "n_layer": args.n_layer, "dropout": args.dropout}
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


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) training as args say; returns the summary (rank 0) or {} (other ranks)."""
    from tether.generate import sample
    from tether.models import build_model

    started = time.monotonic()
    device = pick_device(args.device)
    out = Path(args.out or COMMON_DEFAULTS["out"])
    check_out(out, args)  # on every rank before any rank can write (they meet in Distributed first)
    world = Distributed(device)
    resumed = checkpoint.find(out, "--resume", need_state=True) if args.resume else None
    saved_config = checkpoint.load_config(resumed) if args.resume else None
    args = resolve_args(args, device, saved_config["train"] if saved_config else None)
    device = world.device
    if args.batch_size % world.world:
        raise ValueError(f"--batch-size: expected a multiple of the {world.world} data-parallel ranks, "
                         f"got {args.batch_size}")

    torch.manual_seed(args.seed)
    corpus = CharCorpus.load(args.data, device)
    if saved_config and saved_config["vocab"] != corpus.vocab.chars:
        raise ValueError("--data: expected the corpus the checkpoint was trained on (same vocabulary), "
                         "got a different character set")
    config = model_config(args, corpus.vocab.chars, saved_config["model"] if saved_config else None)
    raw = build_model(config).to(device)
    optimizer = make_optimizer(raw, args.lr, args.weight_decay, device)
    step, elapsed_before, train_time, tokens_seen = 0, 0.0, 0.0, 0
    best_val = (float("inf"), 0)  # (loss, step) of the lowest validation loss, whose weights are in out/best
    if args.resume:
        state = checkpoint.load_state(resumed)
        checkpoint.load_weights(resumed, raw, device)
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_before = state["step"], state["elapsed_s"]
        train_time, tokens_seen = state["train_time_s"], state["tokens_seen"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        random.setstate(state["rng"]["python"])
        best_val = tuple(state.get("best_val", best_val))
    n_params = raw.num_params()

    model = torch.compile(raw) if args.compile else raw
    if world.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    files = RunFiles(out)
    run_config = {"model": config.to_dict(), "vocab": corpus.vocab.chars, "train": vars(args)}
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if args.resume:
            files.restart_metrics(step)
        else:
            clear_run(out)
            files.metrics_path.write_text("")
        print(f"tether train: {config.mixer} model, {n_params / 1e6:.2f}M parameters, device {device}"
              f" x{world.world}, batch {args.batch_size} x {args.block_size} tokens, "
              f"{'resuming at step ' + str(step) if args.resume else 'from scratch'} -> {out}", flush=True)

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - started

    def save() -> None:
        if not world.main:
            return
        state = {"step": step, "elapsed_s": elapsed(), "train_time_s": train_time, "tokens_seen": tokens_seen,
                 "optimizer": optimizer.state_dict(),
                 # The lr schedule is a function of (step, elapsed_s) and the train arguments: no own state.
                 "schedule": {k: getattr(args, k) for k in ("lr", "warmup_iters", "max_iters", "time_budget")},
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                 "data": {"seed": args.seed, "next_step": step}, "best_val": best_val}
        checkpoint.save(out, raw, run_config, state)
        files.plot()

    cuda_graph = args.cuda_graph
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and world.world == 1
    elif cuda_graph and (device.type != "cuda" or world.world > 1):
        raise ValueError(f"--cuda-graph: expected one CUDA process, got device {device}, {world.world} processes")
    train_step = TrainStep(model, raw, optimizer, grad_clip=args.grad_clip, device=device, cuda_graph=cuda_graph)
    bar = ProgressBar(args.max_iters, 60 * args.time_budget)
    tokens_per_step = args.batch_size * args.block_size
    synced_elapsed = world.from_main(elapsed())
    interval_steps, interval_start, paused = 0, time.monotonic(), 0.0
    interval_rates = []  # tokens/s of each log interval, for a steady-state figure without the JIT warmup
    val_loss, firing, energy, train_loss = None, None, {}, None

    def track_best(loss: float) -> None:
        """Keep the weights of the lowest validation loss in out/best (a long run ends past it)."""
        nonlocal best_val
        if loss < best_val[0]:
            best_val = (loss, step)
            if world.main:
                checkpoint.save_weights(out / BEST, raw, run_config, step)
    stop = step >= args.max_iters or synced_elapsed >= 60 * args.time_budget
    signals = StopSignals()
    stop_signal = None  # the signal all ranks act on: rank 0's, agreed at log steps when data-parallel
    try:
        while not stop:
            stop_signal = signals.received if world.world == 1 else stop_signal
            if stop_signal:
                raise Stop(stop_signal)
            lr = learning_rate(args, step, synced_elapsed)
            x, y = corpus.batch("train", args.batch_size, args.block_size, step_generator(args.seed, step, device),
                                world.rows(args.batch_size))
            train_step(x, y, lr)
            step += 1
            interval_steps += 1
            tokens_seen += tokens_per_step
            last = step >= args.max_iters
            if step % args.log_interval == 0 or last:
                train_loss, firing, _ = train_step.take_sums()
                train_loss, firing_mean = world.mean([train_loss, firing or 0.0])
                firing = firing_mean if firing is not None else None
                # Validation and checkpoint time (paused) is not training time.
                seconds = time.monotonic() - interval_start - paused
                train_time += seconds
                tokens_per_s = interval_steps * tokens_per_step / seconds
                interval_rates.append(tokens_per_s)
                synced_elapsed = world.from_main(elapsed())
                if world.world > 1:
                    stop_signal = int(world.from_main(float(signals.received or 0)))
                last = last or synced_elapsed >= 60 * args.time_budget
                if world.main:
                    files.log({"step": step, "split": "train", "loss": train_loss, "lr": lr,
                               "tokens_per_s": tokens_per_s, "firing_rate": firing, "elapsed_s": synced_elapsed})
                    fr = f" | fr {firing:.3f}" if firing is not None else ""
                    bar.update(step, synced_elapsed,
                               f"loss {train_loss:.3f} | {tokens_per_s / 1e3:.0f}k tok/s{fr} | lr {lr:.1e}")
                interval_steps, interval_start, paused = 0, time.monotonic(), 0.0
            if step % args.eval_interval == 0 and not last:
                eval_start = time.monotonic()
                val_loss = evaluate(raw, corpus, args, world, args.eval_iters)
                track_best(val_loss)
                if world.main:
                    energy = raw.energy_per_token()
                    files.log({"step": step, "split": "val", "loss": val_loss, "elapsed_s": elapsed(), **energy})
                    bar.message(f"step {step}: val loss {val_loss:.4f} | energy/token "
                                f"{energy.get('energy_spiking_j', 0) * 1e6:.3f} uJ spiking vs "
                                f"{energy.get('energy_ann_j', 0) * 1e6:.3f} uJ ANN")
                save()
                paused += time.monotonic() - eval_start
            stop = last
    except KeyboardInterrupt:
        save()
        if world.main:
            bar.message(f"interrupted: checkpoint at step {step} in {out / checkpoint.CHECKPOINT}; continue with "
                        f"--resume")
        world.close()
        raise
    except Exception:
        # Keep the last completed step; a failure while saving must not hide the original error.
        try:
            save()
        except Exception as err:  # noqa: BLE001
            print(f"checkpoint after the error failed too: {err}", file=sys.stderr)
        raise
    finally:
        signals.restore()

    val_loss = evaluate(raw, corpus, args, world, FINAL_EVAL_FACTOR * args.eval_iters)
    track_best(val_loss)
    summary = {}
    if world.main:
        energy = raw.energy_per_token()
        files.log({"step": step, "split": "val", "loss": val_loss, "elapsed_s": elapsed(), **energy})
        save()
        bar.message(f"step {step}: final val loss {val_loss:.4f}")
        text = sample(raw, corpus.vocab, SAMPLE_PROMPT, args.sample_tokens, temperature=0.8, top_k=40,
                      generator=torch.Generator(device=device).manual_seed(args.seed))
        (out / "sample.txt").write_text(text)
        print(f"--- sample ---\n{text}\n--------------", flush=True)
        summary = summarize(args, config, n_params, world, step, tokens_seen, train_time, elapsed(),
                            val_loss, best_val, train_loss, firing, energy, interval_rates)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: summary[k] for k in ("val_loss", "tokens_per_s", "wall_time_s", "steps")}),
              flush=True)
    world.close()
    return summary


def summarize(args, config, n_params, world, step, tokens_seen, train_time, wall, val_loss, best_val, train_loss,
              firing, energy, interval_rates) -> dict:
    import triton

    device = world.device
    return {
        "mixer": config.mixer, "val_loss": val_loss, "best_val_loss": best_val[0], "best_val_step": best_val[1],
        "train_loss": train_loss, "steps": step,
        "tokens_seen": tokens_seen, "tokens_per_s": tokens_seen / max(train_time, 1e-9),
        # median over log intervals: the steady rate, without the first interval's kernel compilation
        "tokens_per_s_steady": sorted(interval_rates)[len(interval_rates) // 2] if interval_rates else None,
        "wall_time_s": wall, "train_time_s": train_time, "params": n_params,
        "firing_rate": firing, "energy_per_token": energy,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": world.world, "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"), "model": config.to_dict(), "train_args": vars(args),
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
