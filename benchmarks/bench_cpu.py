"""The CPU main job: `tether train` with no flags on a machine without a GPU, measured.

    python -m benchmarks.bench_cpu                      # the 3-minute run: tokens/s, val loss, sample
    python -m benchmarks.bench_cpu --ab /tmp/old/src    # training steps, this tree vs another, alternated

The first form runs the CLI's default CPU job into a temporary --out (or --out DIR) and prints its
tokens/s, validation loss and the sample's first lines, with the load average before and after (the
tokens/s of a shared machine say more about its other users than about the code).

--ab times the training step of each tree's own CPU default model (batch, block, width and dropout from that
tree's tether.train.CPU_DEFAULTS, on the real corpus, with its TrainStep and AdamW) in fresh subprocesses,
alternating the trees round by round, so that both see the same minutes of a noisy machine; it prints each
round's tokens/s and the median of the per-round ratios. An older commit's tree: `git archive COMMIT src |
tar -x -C /tmp/old`. --same-config times the other tree with this tree's defaults (the code's share alone).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run inside a subprocess with PYTHONPATH=<tree>: times `steps` training steps after `warmup`, prints JSON.
STEP_TIMER = r"""
import json, sys, time, torch
from tether import train
from tether.data import CharCorpus
from tether.models import build_model
from tether.step import TrainStep, make_optimizer

overrides, steps, warmup = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
device = torch.device("cpu")
args = train.build_parser().parse_args(["--device", "cpu"])
for key, value in overrides.items():
    setattr(args, key, value)
args = train.resolve_args(args, device)
torch.manual_seed(args.seed)
corpus = CharCorpus.load(args.data, device)
model = build_model(train.model_config(args, corpus.vocab.chars))
optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
step = TrainStep(model, model, optimizer, grad_clip=args.grad_clip, device=device)
times = []
for i in range(warmup + steps):
    x, y = corpus.batch("train", args.batch_size, args.block_size, train.step_generator(args.seed, i, device))
    start = time.perf_counter()
    step(x, y, args.lr)
    times.append(time.perf_counter() - start)
times = times[warmup:]
tokens = args.batch_size * args.block_size
config = {k: getattr(args, k) for k in ("batch_size", "block_size", "d_model", "n_layer", "dropout", "lr")}
print(json.dumps({"tokens_per_s": tokens * len(times) / sum(times), "best_tokens_per_s": tokens / min(times),
                  "threads": torch.get_num_threads(), "config": config}))
"""


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def time_steps(src: Path, overrides: dict, steps: int, warmup: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", STEP_TIMER, json.dumps(overrides), str(steps), str(warmup)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def defaults_of(src: Path) -> dict:
    """The CPU defaults of the tree at src, as its tether.train holds them."""
    code = "import json; from tether.train import CPU_DEFAULTS as d; print(json.dumps(d))"
    env = {**os.environ, "PYTHONPATH": str(src)}
    return json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                     text=True).stdout)


def ab(other: Path, rounds: int, steps: int, warmup: int, same_config: bool) -> None:
    this = ROOT / "src"
    keys = ("batch_size", "block_size", "d_model", "n_layer", "dropout", "lr")
    overrides = {k: v for k, v in defaults_of(this).items() if k in keys} if same_config else {}
    ratios = []
    print(f"this tree {this} vs {other}; {rounds} rounds of {steps} steps (+{warmup} warm-up) each")
    for r in range(rounds):
        before = load()
        first, second = (other, this) if r % 2 == 0 else (this, other)
        results = {src: time_steps(src, overrides if src == other else {}, steps, warmup) for src in (first, second)}
        new, old = results[this], results[other]
        ratios.append(new["tokens_per_s"] / old["tokens_per_s"])
        print(f"round {r + 1}: other {old['tokens_per_s']:7.0f} tok/s (best step {old['best_tokens_per_s']:7.0f}) | "
              f"this {new['tokens_per_s']:7.0f} tok/s (best step {new['best_tokens_per_s']:7.0f}) | "
              f"ratio {ratios[-1]:.2f} | {before}", flush=True)
    print(f"configs: other {old['config']}, this {new['config']}, threads {new['threads']}")
    print(f"median ratio this/other {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


def main_job(out: Path, extra: list) -> None:
    print(f"before: {load()}", flush=True)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT / "src")}
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "tether.train", "--device", "cpu", "--out", str(out), "--force", *extra],
                   env=env, check=True)
    summary = json.loads((out / "summary.json").read_text())
    sample = (out / "sample.txt").read_text().splitlines()
    print(f"after: {load()}; wall {time.monotonic() - start:.0f} s")
    print(f"tokens/s {summary['tokens_per_s']:.0f} (steady {summary['tokens_per_s_steady']:.0f}), "
          f"val loss {summary['val_loss']:.4f} (best {summary['best_val_loss']:.4f} at step "
          f"{summary['best_val_step']}), {summary['steps']} steps in {summary['train_time_s']:.0f} s of training")
    print("sample:\n" + "\n".join(sample[:8]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ab", type=Path, metavar="SRC", help="another tree's src/ to time steps against")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and tree")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--same-config", action="store_true", help="--ab: the other tree runs this tree's defaults")
    parser.add_argument("--out", type=Path, help="the main job's --out (default: a temporary directory)")
    args, extra = parser.parse_known_args()
    if args.ab:
        ab(args.ab.resolve(), args.rounds, args.steps, args.warmup, args.same_config)
    elif args.out:
        main_job(args.out, extra)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main_job(Path(tmp), extra)


if __name__ == "__main__":
    main()
