"""LIF launch configs at the spiking LM's shapes (GPU): T = 256 tokens, N = batch x channels for the four neuron
groups of a block (384, 1152, 384, 1536 channels) at batch 64 and 256, bf16 input (autocast).

The shipped LIF launch table (src/tether/kernels/launch_lif.json) was swept at T = 1024, N = 65536. At the LM's
smaller N a program per 64 neurons leaves most SMs idle while it walks its 256 steps. This times the training
forward and the backward of candidate (BLOCK, CHUNK, WARPS) per shape (each installed with
benchmarks.common.lif_launch) against the shipped table's own choice; it does not write the table.

Run, from the repository root: PYTHONPATH=src python -m benchmarks.sweep_lif_lm
(writes lif_lm_sweep.json / .md under results or $OUT)
"""
import contextlib

import torch

from benchmarks.common import bench_ms, lif_launch, markdown_table, write_results
from tether.functional.lif import lif

SHAPES = [(256, 64 * c) for c in (384, 1152, 1536)] + [(256, 256 * c) for c in (384, 1536)]
CANDIDATES = [(32, 8, 1), (32, 16, 1), (64, 8, 1), (64, 16, 1), (64, 32, 1), (128, 8, 1), (128, 16, 2),
              (128, 16, 1)]


def time_config(x, grad, cfg):
    """(fwd ms, bwd ms) with launch config cfg = (BLOCK, CHUNK, WARPS) for both kernels, or the shipped table."""
    table = {(k, 2): [(0, *cfg)] for k in ("forward", "backward")}
    with contextlib.nullcontext() if cfg is None else lif_launch(table):
        spikes = lif(x, 0.5, 1.0)[0]
        fwd = bench_ms(lambda: lif(x, 0.5, 1.0), 5, 40)
        bwd = bench_ms(lambda: torch.autograd.grad(spikes, x, grad, retain_graph=True), 5, 40)
    return fwd, bwd


def main():
    rows = []
    for T, N in SHAPES:
        x = torch.randn(T, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        table_fwd, table_bwd = time_config(x, grad, None)
        for cfg in [None] + CANDIDATES:
            fwd, bwd = (table_fwd, table_bwd) if cfg is None else time_config(x, grad, cfg)
            rows.append({"T": T, "N": N, "config": "table" if cfg is None else str(cfg), "fwd_ms": fwd,
                         "bwd_ms": bwd, "fwd_vs_table": fwd / table_fwd, "bwd_vs_table": bwd / table_bwd})
            print(rows[-1], flush=True)
    best = []
    for T, N in SHAPES:
        mine = [r for r in rows if r["N"] == N]
        best.append({"N": N, "best_fwd": min(mine, key=lambda r: r["fwd_ms"])["config"],
                     "fwd_vs_table": min(r["fwd_vs_table"] for r in mine),
                     "best_bwd": min(mine, key=lambda r: r["bwd_ms"])["config"],
                     "bwd_vs_table": min(r["bwd_vs_table"] for r in mine)})
    table = ("LIF at the LM's shapes, bf16 in, training forward and backward, (BLOCK, CHUNK, WARPS) vs the "
             "launch table's choice:\n\n" + markdown_table(best, ["N", "best_fwd", "fwd_vs_table", "best_bwd",
                                                                  "bwd_vs_table"])
             + "\n\n" + markdown_table(rows, ["T", "N", "config", "fwd_ms", "bwd_ms", "fwd_vs_table", "bwd_vs_table"]))
    print(table)
    write_results("lif_lm_sweep", {"rows": rows, "best": best}, table)


if __name__ == "__main__":
    main()
