"""Spiking LM benchmark (GPU): training tokens/s and peak memory of the default model, fused kernels vs the
same model built from eager PyTorch ops (loop LIF, cumsum attention, float spikes saved); generation time
and memory per token at 1k and 16k tokens of context (O(1) state: should not grow).

Run: PYTHONPATH=src python benchmarks/bench_lm.py [--batch 64] [--iters 10]
Writes benchmarks/results/lm_bench.json and .md (or under $OUT).
"""
import argparse
import time
from dataclasses import replace

import torch

from common import markdown_table, write_results
from tether.models import LMConfig, build_model


def state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    return sum(state_bytes(s) for s in state)


def check_fused_vs_eager(cfg: LMConfig) -> dict:
    """Same weights: largest fp32 logit difference, and the losses under bf16 autocast, fused vs eager."""
    fused = build_model(replace(cfg, backend="fused")).cuda()
    eager = build_model(replace(cfg, backend="eager")).cuda()
    eager.load_state_dict(fused.state_dict())
    idx = torch.randint(cfg.vocab_size, (4, 129), device="cuda")  # [B, T + 1]
    with torch.no_grad():
        diff = (fused(idx[:, :-1])[0] - eager(idx[:, :-1])[0]).abs().max().item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = [m(idx[:, :-1], idx[:, 1:])[1].item() for m in (fused, eager)]
    return {"fp32_max_logit_diff": diff, "bf16_loss_fused": losses[0], "bf16_loss_eager": losses[1]}


def make_train_step(cfg: LMConfig, batch: int):
    """One AdamW step (bf16 autocast forward + backward + update) on a random batch of block_size tokens."""
    model = build_model(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    idx = torch.randint(cfg.vocab_size, (batch, cfg.block_size + 1), device="cuda")  # [B, T + 1]

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):  # compile kernels, allocate optimizer state
        train_step()
    return train_step


def measure_training(cfg: LMConfig, batch: int, iters: int) -> dict:
    train_step = make_train_step(cfg, batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(iters):
        loss = train_step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    return {"backend": cfg.backend, "batch": batch, "ms_per_step": seconds * 1e3,
            "tokens_per_s": batch * cfg.block_size / seconds,
            "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20, "loss": loss.item()}


def profile_training(cfg: LMConfig, batch: int, steps: int = 3) -> None:
    """Print where the GPU time of a fused training step goes (torch.profiler, top ops by CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    train_step = make_train_step(cfg, batch)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step()
        torch.cuda.synchronize()
    print(f"per step over {steps} steps:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))


def measure_generation(cfg: LMConfig, contexts, tokens: int, rounds: int) -> list:
    """Per-token latency of model.step (batch 1) after a prompt of each context length.

    The contexts take turns (``rounds`` times ``tokens`` steps each) so that drift of the machine (clocks,
    other load) hits them alike; the median round is reported.
    """
    model = build_model(cfg).cuda().eval()
    runs = {}
    with torch.no_grad():
        for context in contexts:
            prompt = torch.randint(cfg.vocab_size, (1, context), device="cuda")  # [1, context]
            logits, state = model.prefill(prompt, model.init_state(1, "cuda"))
            runs[context] = {"token": logits.argmax(-1), "state": state, "ms": [], "peak": 0}  # token [1]
        for _ in range(rounds):
            for context, run in runs.items():
                token, state = run["token"], run["state"]
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                start = time.perf_counter()
                for _ in range(tokens):
                    logits, state = model.step(token, state)
                    token = logits.argmax(-1)
                torch.cuda.synchronize()
                run["ms"].append((time.perf_counter() - start) / tokens * 1e3)
                run["peak"] = max(run["peak"], torch.cuda.max_memory_allocated() - base)
                run["token"], run["state"] = token, state
    rows = []
    for context, run in runs.items():
        ms = sorted(run["ms"][1:])  # the first round warms up
        rows.append({"context": context, "ms_per_token": ms[len(ms) // 2], "ms_min": ms[0], "ms_max": ms[-1],
                     "state_kib": state_bytes(run["state"]) / 2**10, "peak_extra_mib": run["peak"] / 2**20})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--eager-iters", type=int, default=3)
    parser.add_argument("--gen-tokens", type=int, default=100, help="tokens per generation round")
    parser.add_argument("--gen-rounds", type=int, default=6)
    parser.add_argument("--profile", action="store_true", help="only print a profile of the fused training step")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = LMConfig()
    if args.profile:
        return profile_training(cfg, args.batch)
    check = check_fused_vs_eager(cfg)
    print("fused vs eager:", check, flush=True)

    fused = measure_training(cfg, args.batch, args.iters)
    print(fused, flush=True)
    eager = measure_training(replace(cfg, backend="eager"), args.batch, args.eager_iters)
    print(eager, flush=True)
    softmax = measure_training(replace(cfg, mixer="softmax"), args.batch, args.iters)  # context: the baseline
    softmax["backend"] = "softmax mixer (SDPA)"
    for row in (fused, eager, softmax):
        row["speedup_vs_eager"] = row["tokens_per_s"] / eager["tokens_per_s"]
        row["memory_vs_eager"] = row["peak_extra_mib"] / eager["peak_extra_mib"]

    generation = measure_generation(cfg, (1024, 16384), args.gen_tokens, args.gen_rounds)
    for row in generation:
        row["vs_1k"] = row["ms_per_token"] / generation[0]["ms_per_token"]
    print(generation, flush=True)

    table = ("Training step (AdamW, bf16 autocast), default model "
             f"(d_model {cfg.d_model}, {cfg.n_layer} layers, {cfg.n_head} heads, T {cfg.block_size}), "
             f"batch {args.batch}:\n\n"
             + markdown_table([fused, eager, softmax], ["backend", "ms_per_step", "tokens_per_s", "peak_extra_mib",
                                               "speedup_vs_eager", "memory_vs_eager"])
             + f"\n\nGeneration (model.step, batch 1, fp32) after a prompt of `context` tokens, median of "
             f"{args.gen_rounds - 1} rounds of {args.gen_tokens} tokens (contexts take turns):\n\n"
             + markdown_table(generation, ["context", "ms_per_token", "ms_min", "ms_max", "vs_1k", "state_kib",
                                           "peak_extra_mib"]))
    payload = {"config": cfg.to_dict(), "fused_vs_eager": check,
               "training": [fused, eager, softmax], "generation": generation}
    print(table)
    write_results("lm_bench", payload, table)


if __name__ == "__main__":
    main()
