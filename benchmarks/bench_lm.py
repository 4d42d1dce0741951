"""Language-model benchmark (GPU): the three mixers of the default model side by side in one run.

- training (bf16 autocast, AdamW, grad clip): tokens/s and peak memory at batch 64 and 256, eager and with the
  step replayed from a CUDA graph (`tether.step.TrainStep`, what `tether train` runs);
- `tether train`'s own steady tokens/s (a short run in a subprocess, with --data);
- generation (`tether.generate.Decoder`, greedy): ms a token at batch 1 and tokens/s at batch 64, after 256,
  1k and 16k tokens of context, eager and graphed.

Run, from the repository root: PYTHONPATH=src python -m benchmarks.bench_lm [--data PATH] [--profile]
Writes lm_bench.json, .md and .png under benchmarks/results (or $OUT).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import markdown_table, saved_bytes, write_results
from tether.generate import Decoder, _tensors
from tether.models import LMConfig, build_model
from tether.step import TrainStep, compile_model, make_optimizer

MIXERS = ("spiking", "softmax", "ttt-mlp")


PATHS = {"eager": (False, False), "cuda graph": (True, False), "compile + cuda graph": (True, True)}


def make_step(cfg: LMConfig, batch: int, cuda_graph: bool, compile: bool = False, compile_options=None):
    """(step(), model): one training step of the default recipe on a fixed random batch; compile_options: the
    inductor options of compile_model (None: the shipped COMPILE_OPTIONS)."""
    model = build_model(cfg).cuda()
    opt = make_optimizer(model, 1e-3, 0.1, torch.device("cuda"))
    cuda = torch.device("cuda")
    step = TrainStep(compile_model(model, cuda, compile_options) if compile else model, model, opt, grad_clip=1.0, device=cuda,
                     cuda_graph=cuda_graph)
    idx = torch.randint(cfg.vocab_size, (batch, cfg.block_size + 1), device="cuda")  # [B, T + 1]
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    return (lambda: step(x, y, 1e-3)), step


def measure_training(cfg: LMConfig, batch: int, path: str, iters: int, compile_options=None) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run, step = make_step(cfg, batch, *PATHS[path], compile_options=compile_options)
    start = time.perf_counter()
    for _ in range(step.warmup + 2):
        run()  # compile kernels, allocate optimizer state, capture the graph
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    step.take_sums()
    times = []
    for _ in range(3):  # three timed rounds: the median
        start = time.perf_counter()
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / iters)
    loss, rate, _ = step.take_sums()
    seconds = sorted(times)[1]
    return {"mixer": cfg.mixer, "batch": batch, "path": path, "warmup_s": warmup_s, "ms_per_step": seconds * 1e3, "tokens_per_s": batch * cfg.block_size / seconds,
            "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20, "loss": loss, "firing_rate": rate}


def saved_per_token(cfg: LMConfig, device: str = "cuda") -> float:
    """Bytes autograd saves for backward per token of a training forward (bf16 autocast; common.saved_bytes),
    activations only: the difference between batch 16 and batch 8 over the 8 * T extra tokens (weights and
    their bf16 copies cancel)."""
    model = build_model(cfg).to(device).train()

    def saved(batch):
        idx = torch.randint(cfg.vocab_size, (batch, cfg.block_size + 1), device=device)  # [B, T + 1]
        with torch.autocast(device, torch.bfloat16):
            return saved_bytes(lambda: model(idx[:, :-1], idx[:, 1:])[1])

    return (saved(16) - saved(8)) / (8 * cfg.block_size)


def profile_training(cfg: LMConfig, batch: int, compile: bool, steps: int = 3) -> str:
    """Where the GPU time of a step goes (not graphed: the same kernels): top kernels by CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    run, _ = make_step(cfg, batch, cuda_graph=False, compile=compile)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)


def measure_generation(cfg: LMConfig, batch: int, contexts, tokens: int, path: str) -> list:
    """ms a token of Decoder.step (greedy) after a prompt of each context length; per context, the median of
    5 rounds of `tokens` steps."""
    model = build_model(cfg).cuda().eval()
    rows = []
    for context in contexts:
        decoder = Decoder(model, batch, "cuda", *PATHS[path])
        with torch.no_grad():
            prompt = torch.randint(cfg.vocab_size, (batch, context), device="cuda")  # [B, context]
            token = decoder.prefill(prompt).argmax(-1)  # [B]
            for _ in range(5):  # warm-up and capture
                token = decoder.step(token).argmax(-1)
            rounds = []
            for _ in range(5):
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(tokens):
                    token = decoder.step(token).argmax(-1)
                torch.cuda.synchronize()
                rounds.append((time.perf_counter() - start) / tokens)
        seconds = sorted(rounds)[2]
        state = sum(t.numel() * t.element_size() for t in _tensors(decoder.state))
        rows.append({"mixer": cfg.mixer, "path": path if decoder.graph is not None or path == "eager" else "eager",
                     "batch": batch, "context": context, "ms_per_token": seconds * 1e3,
                     "tokens_per_s": batch / seconds, "state_kib_per_seq": state / batch / 2**10})
        del decoder
    return rows


def measure_trainer(data: str, mixer: str, iters: int) -> dict:
    """`tether train`'s own steady tokens/s (its summary.json), a short run of the default model."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "tether.train", "--data", data, "--mixer", mixer, "--out", out,
               "--max-iters", str(iters), "--eval-interval", str(iters), "--sample-tokens", "20"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        summary = json.loads((Path(out) / "summary.json").read_text())
    return {"mixer": mixer, "steps": summary["steps"], "tokens_per_s_steady": summary["tokens_per_s_steady"],
            "tokens_per_s_mean": summary["tokens_per_s"]}


def plot(training: list, generation: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['mixer']}\nB{r['batch']} {r['path']}" for r in training]
    colors = {"spiking": "tab:orange", "softmax": "tab:blue", "ttt-mlp": "tab:green"}
    ax1.bar(range(len(training)), [r["tokens_per_s"] / 1e6 for r in training],
            color=[colors[r["mixer"]] for r in training], alpha=0.9)
    ax1.set_xticks(range(len(training)), labels, fontsize=7, rotation=60)
    ax1.set_ylabel("training tokens/s (M)")
    ax1.set_title("training step, bf16 autocast + AdamW")
    for mixer in MIXERS:
        for kind, style in (("compile + cuda graph", "-o"), ("cuda graph", "-s"), ("eager", "--x")):
            rows = [r for r in generation if r["mixer"] == mixer and r["batch"] == 1 and r["path"] == kind]
            if rows:
                ax2.plot([r["context"] for r in rows], [r["ms_per_token"] for r in rows], style,
                         color=colors[mixer], label=f"{mixer} {kind}")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("context (tokens)")
    ax2.set_ylabel("ms a token, batch 1")
    ax2.set_title("generation")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "--from-logs":  # --from-logs ENV_JSON LOG [LOG ...]
        return from_logs(sys.argv[3:], json.loads(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":  # redraw the plot of a results file
        payload = json.loads(Path(sys.argv[2]).read_text())
        return plot(payload["training"], payload["generation"], Path(sys.argv[2]).with_suffix(".png"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per round")
    parser.add_argument("--mixers", default=",".join(MIXERS))
    parser.add_argument("--ttt-mini-batches", default="16", help="ttt-mlp training rows at each mini-batch")
    parser.add_argument("--paths", default="eager,cuda graph", help=f"training paths, of {list(PATHS)}")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--gen-mixers", default=None, help="mixers for generation (default: --mixers)")
    parser.add_argument("--contexts", default="256,1024,16384")
    parser.add_argument("--gen-tokens", type=int, default=100)
    parser.add_argument("--data", help="corpus for the tether train runs (skipped without it)")
    parser.add_argument("--trainer-iters", type=int, default=300)
    parser.add_argument("--trainer-mixers", default="spiking")
    parser.add_argument("--profile", choices=["eager", "compile"], help="also print a profile of a step at batch 64")
    parser.add_argument("--profile-mixer", default="spiking", choices=MIXERS)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = LMConfig()
    mixers = args.mixers.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    training, generation, trainer = [], [], []
    saved = {}  # (mixer, ttt mini-batch) -> KiB saved for backward per token
    for mixer in mixers if not args.skip_training else ():
        for batch in map(int, args.batches.split(",")):
            for path in args.paths.split(","):
                iters = args.iters if path != "eager" or mixer != "ttt-mlp" else max(2, args.iters // 5)
                sizes = map(int, args.ttt_mini_batches.split(",")) if mixer == "ttt-mlp" else [cfg.ttt_mini_batch]
                for size in sizes:
                    row = measure_training(replace(cfg, mixer=mixer, ttt_mini_batch=size), batch, path, iters)
                    row["ttt_mini_batch"] = size if mixer == "ttt-mlp" else None
                    key = (mixer, size)
                    if key not in saved:
                        saved[key] = saved_per_token(replace(cfg, mixer=mixer, ttt_mini_batch=size)) / 1024
                    row["saved_kib_per_token"] = saved[key]
                    training.append(row)
                    print(row, flush=True)
    for mixer in (args.gen_mixers or args.mixers).split(",") if not args.skip_generation else ():
        for batch in (1, 64):
            # ttt-mlp reruns its 256-token window on every token (a growing state: never graphed)
            # softmax: capturing the compiled KV-cache step fails (an operation not permitted while capturing)
            for path in [p for p in args.paths.split(",") if mixer == "spiking" or not p.startswith("compile")]:
                if mixer == "ttt-mlp" and path != "eager":
                    continue
                ctx, tokens = (contexts, args.gen_tokens) if mixer != "ttt-mlp" else (contexts[:1], 10)
                rows = measure_generation(replace(cfg, mixer=mixer), batch, ctx, tokens, path)
                generation.extend(rows)
                for row in rows:
                    print(row, flush=True)
    if args.data:
        for mixer in args.trainer_mixers.split(","):
            row = measure_trainer(args.data, mixer, args.trainer_iters // (6 if mixer == "ttt-mlp" else 1))
            trainer.append(row)
            print(row, flush=True)
    profile = profile_training(replace(cfg, mixer=args.profile_mixer), 64, args.profile == "compile") if args.profile else None
    if profile:
        print(profile)

    report(cfg, training, trainer, generation, profile, vars(args))


def report(cfg: LMConfig, training: list, trainer: list, generation: list, profile, args: dict, env=None) -> None:
    """Ratios to the softmax baseline of the same run, the markdown table, JSON and plot."""
    eager = {r["batch"]: r["tokens_per_s"] for r in training if r["mixer"] == "softmax" and r["path"] == "eager"}
    for row in training:
        if 64 in eager:
            row["vs_softmax_eager_b64"] = row["tokens_per_s"] / eager[64]
        if row["batch"] in eager:
            row["vs_softmax_eager_same_batch"] = row["tokens_per_s"] / eager[row["batch"]]
        same = [r for r in training if r["mixer"] == "softmax" and r["batch"] == row["batch"]
                and r["path"] == row["path"]]
        if same:
            row["vs_softmax_same"] = row["tokens_per_s"] / same[0]["tokens_per_s"]
            row["memory_vs_softmax_same"] = row["peak_mib"] / same[0]["peak_mib"]
    for row in trainer:
        bench = [r for r in training if r["mixer"] == row["mixer"] and r["batch"] == 64
                 and r["path"] == "compile + cuda graph"]  # what tether train runs on CUDA by default
        row["vs_bench_step"] = row["tokens_per_s_steady"] / bench[0]["tokens_per_s"] if bench else None
    table = (f"Default model (d_model {cfg.d_model}, {cfg.n_layer} layers, {cfg.n_head} heads, "
             f"{cfg.block_size} tokens), bf16 autocast, AdamW (fused, capturable), grad clip 1. Median of 3 rounds "
             f"of {args['iters']} steps. `cuda graph`: the step replayed from a CUDA graph (tether.step.TrainStep). "
             f"`saved_kib_per_token`: activations autograd keeps for backward per token, all layers (saved_tensors_hooks).\n\n"
             + markdown_table(training, ["mixer", "ttt_mini_batch", "batch", "path", "warmup_s", "ms_per_step", "tokens_per_s", "peak_mib",
                                         "saved_kib_per_token", "vs_softmax_eager_b64", "vs_softmax_eager_same_batch", "vs_softmax_same",
                                         "memory_vs_softmax_same"])
             + "\n\n`tether train` (default model and arguments, --max-iters "
             f"{args['trainer_iters']}): steady tokens/s (median of its log intervals) vs the bench's compile + cuda graph step at batch 64.\n\n"
             + (markdown_table(trainer, ["mixer", "steps", "tokens_per_s_steady", "tokens_per_s_mean",
                                         "vs_bench_step"]) if trainer else "(not run: no --data)")
             + f"\n\nGeneration (`Decoder.step`, greedy, fp32), median of 5 rounds of {args['gen_tokens']} tokens after "
             "a prompt of `context` tokens. Softmax: KV cache of its 256-token window (learned positions; the "
             "window restarts from its last 128 tokens when full). TTT-MLP: reruns its 256-token window.\n\n"
             + markdown_table(generation, ["mixer", "batch", "path", "context", "ms_per_token", "tokens_per_s",
                                           "state_kib_per_seq"]))
    if args.get("note"):
        table += "\n\n" + args["note"]
    payload = {"config": cfg.to_dict(), "training": training, "trainer": trainer, "generation": generation,
               "profile": profile}
    print(table)
    if env:
        payload["environment"] = env
    md = write_results("lm_bench", payload, table)
    plot(training, generation, md.with_suffix(".png"))


def from_logs(logs: list, env: dict) -> None:
    """The report of rows printed by earlier runs (one dict per line): runs split over several device calls.
    ``env`` (JSON): the environment, plus ``trainer_iters`` and ``gen_tokens`` of those runs and a ``note``
    for the report (where the rows come from)."""
    import ast

    rows = [ast.literal_eval(line) for log in logs for line in Path(log).read_text().splitlines()
            if line.startswith("{'mixer'")]
    training = [r for r in rows if "ms_per_step" in r]
    # a row measured again in a later log replaces the earlier one
    generation = list({(r["mixer"], r["batch"], r["path"], r["context"]): r
                       for r in rows if "ms_per_token" in r}.values())
    trainer = [r for r in rows if "tokens_per_s_steady" in r]
    report(LMConfig(), training, trainer, generation, None,
           {"iters": 10, "trainer_iters": env.pop("trainer_iters", 300), "gen_tokens": env.pop("gen_tokens", 100),
            "note": env.pop("note", "")}, env)


if __name__ == "__main__":
    main()
