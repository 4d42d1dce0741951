"""Fused LayerNorm -> LIF benchmark (../shared/BENCHMARKS.md): tether.functional.norm_lif against its peer, F.layer_norm
then tether.functional.lif, at the spiking LM's shapes, and the sweep that writes norm_lif's launch table.

On the GPU machine, from the repository root:
  PYTHONPATH=src:. python -m benchmarks.bench_norm_lif [--write-table]
Order: each shape's outputs checked against the peer (shipped table); the launch sweep, forward + backward for
every candidate (BLOCK, WARPS, SEG) on every shape, each installed by common.norm_lif_launch (the shipped table is back
after each); the winners per N range (lowest summed time over the range's shapes); with --write-table they are
written to the shipped table (src/tether/kernels/launch_lif.json, key "norm_lif", LIF rows kept) and the rest of
the run times them; last, the shipped table against the peer on every shape.
Writes norm_lif.json and norm_lif.md under $OUT (or benchmarks/results/).
"""
import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, environment, markdown_table, norm_lif_launch, rel_err, write_launch_file, \
    write_results
from tether.functional.lif import lif
from tether.functional.norm_lif import norm_lif
from tether.kernels import lif as lif_kernels
from tether.kernels import norm_lif as kernels

T = 256
# (B, C, x dtype): the LM's NormLIF inputs. The residual stream is fp32 into the d_model (384) norms, bf16 into the
# wider ones; spikes are bf16 throughout.
SHAPES = [(64, 384, torch.float32), (64, 1152, torch.bfloat16), (64, 1536, torch.bfloat16),
          (256, 384, torch.float32), (256, 1536, torch.bfloat16)]
# (BLOCK, WARPS, SEG), at least 2 neurons a thread (docs/norm_lif.md: with one, the tiles' time rows spread over
# threads)
CANDIDATES = [(64, 1, 8), (128, 1, 8), (128, 2, 8), (256, 2, 8), (256, 4, 8), (64, 1, 16), (128, 2, 16),
              (256, 4, 16)]
RANGES = (131_072, 0)  # min N of the table's rows, decreasing, ending with 0
DECAY, THRESHOLD, EPS = 0.5, 1.0, 1e-5
OUT_DTYPE = torch.bfloat16
NEAR = 1e-3  # a spike may differ from the peer's where the membrane is this close to the threshold


def fused_fn(x, w, b):
    return norm_lif(x, w, b, DECAY, THRESHOLD, eps=EPS, dtype=OUT_DTYPE)[0]


def peer_fn(x, w, b):
    """What the model's NormLIF runs by default: the norm in fp32 (autocast upcasts a bf16 x), then the LIF."""
    return lif(F.layer_norm(x.float(), (x.shape[-1],), w, b, EPS).to(OUT_DTYPE), DECAY, THRESHOLD)[0]


def fwd_bwd(fn, x, w, b, g):
    """One training step of fn: forward, then backward to x, weight and bias."""
    return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), g)


def inputs(B, C, dtype):
    x = torch.randn(T, B, C, device="cuda", dtype=dtype).requires_grad_()  # [T, B, C]
    w = (1 + 0.1 * torch.randn(C, device="cuda")).requires_grad_()  # [C]
    b = (0.1 * torch.randn(C, device="cuda")).requires_grad_()  # [C]
    g = torch.randn(T, B, C, device="cuda", dtype=OUT_DTYPE)  # dL/dspikes
    return x, w, b, g


def normalized(x, w, b):
    """y [T, N] in OUT_DTYPE two ways: the peer's (F.layer_norm, then rounded) and the kernels' (((x - mean) rstd)
    w + b in fp32 from torch.var_mean, then rounded: tests/test_norm_lif.py's oracle, which the kernels match
    bit for bit). They differ where the fp32 value sits at a rounding boundary of OUT_DTYPE."""
    x, w, b = x.detach(), w.detach(), b.detach()
    peer = F.layer_norm(x.float(), (x.shape[-1],), w, b, EPS).to(OUT_DTYPE)
    var, mean = torch.var_mean(x.float(), dim=-1, correction=0, keepdim=True)
    ours = ((x.float() - mean) * torch.rsqrt(var + EPS) * w + b).to(OUT_DTYPE)
    return peer.flatten(1), ours.flatten(1)


def membrane(y):
    """The membrane h_t (fp32, [T, N]) entering each step's threshold test for input y [T, N] (hard reset to 0)."""
    v, hs = torch.zeros_like(y[0], dtype=torch.float32), []
    for y_t in y.float():
        h = DECAY * v + y_t
        hs.append(h)
        v = torch.where(h >= THRESHOLD, 0.0, h)
    return torch.stack(hs)


def check(x, w, b, g):
    """norm_lif against the peer. Spikes: equal to the peer's except in neurons whose first difference is
    explained, i.e. the peer's membrane is within NEAR of the threshold there, or the two roundings of y
    (normalized) differed at or before that step; `unexplained` counts the others. Gradients to x, w, b:
    norm-wise within 2e-2 of the peer's (dL/dy is bf16)."""
    with torch.no_grad():
        sf, sp = fused_fn(x, w, b), peer_fn(x, w, b)
    diff = (sf != sp).flatten(1)  # [T, N]
    first = diff & (diff.cumsum(0) == 1)
    y_peer, y_ours = normalized(x, w, b)
    rounded_apart = (y_peer != y_ours).cumsum(0) > 0
    near = (membrane(y_peer) - THRESHOLD).abs() < NEAR
    with torch.no_grad():
        oracle = membrane(y_ours) >= THRESHOLD  # spikes of the kernels' rounding of y
    gf = torch.autograd.grad(fused_fn(x, w, b), (x, w, b), g)
    gp = torch.autograd.grad(peer_fn(x, w, b), (x, w, b), g)
    r = {"spikes_mismatch": int(diff.sum()), "neurons_differing": int(first.sum()),
         "y_rounded_apart": int((y_peer != y_ours).sum()),
         "unexplained": int((first & ~near & ~rounded_apart).sum()),
         "spikes_vs_own_rounding": int((sf.flatten(1).bool() != oracle).sum()),
         **{f"grad_{n}_rel_err": rel_err(a, p) for n, a, p in zip(("x", "w", "b"), gf, gp)}}
    r["ok"] = r["unexplained"] == 0 and all(r[f"grad_{n}_rel_err"] <= 2e-2 for n in ("x", "w", "b"))
    return r


def shape_row(B, C, dtype):
    return {"T": T, "B": B, "C": C, "N": B * C, "x dtype": str(dtype).replace("torch.", "")}


def _shape(row):
    return tuple(row.get(k) for k in ("T", "B", "C", "x dtype", "N"))


def pick_winners(rows, ranges=RANGES):
    """The launch table from sweep rows ({"N", "BLOCK", "WARPS", "SEG", "fwd_bwd_ms"}, one per shape and candidate):
    per range [min N, next larger min N), the (BLOCK, WARPS, SEG) with the lowest fwd_bwd_ms summed over that range's
    shapes, among the candidates timed on all of them (ties: the first in the rows' order). Ranges holding no
    shape are left out; the last row's min N is 0. Returns [(min N, BLOCK, WARPS, SEG)], min N decreasing."""
    ranges = sorted(ranges, reverse=True)
    assert ranges and ranges[-1] == 0, "ranges must end with min N 0"
    table = []
    for i, low in enumerate(ranges):
        high = ranges[i - 1] if i else float("inf")
        inside = [r for r in rows if low <= r["N"] < high]
        shapes = {_shape(r) for r in inside}
        totals, seen, order = {}, {}, []
        for r in inside:
            cfg = (r["BLOCK"], r["WARPS"], r["SEG"])
            if cfg not in totals:
                order.append(cfg)
                totals[cfg], seen[cfg] = 0.0, set()
            totals[cfg] += r["fwd_bwd_ms"]
            seen[cfg].add(_shape(r))
        complete = [cfg for cfg in order if seen[cfg] == shapes]
        if complete:
            best = min(complete, key=lambda cfg: (totals[cfg], order.index(cfg)))
            table.append((low, *best))
    assert table, "no sweep row to pick from"
    table[-1] = (0, *table[-1][1:])
    return table


def write_launch_table(rows, path=None):
    """Write rows ([(min N, BLOCK, WARPS, SEG)]) as norm_lif's rows of the shipped launch file
    (src/tether/kernels/launch_lif.json, or path), keeping its "about" and the LIF rows (common.write_launch_file)."""
    write_launch_file(lif_kernels.read_launch_table(), rows, path)


def sweep(data):
    rows = []
    for (B, C, dtype), (x, w, b, g) in data.items():
        for block, warps, seg in CANDIDATES:
            with norm_lif_launch([(0, block, warps, seg)]):
                r = {**shape_row(B, C, dtype), "BLOCK": block, "WARPS": warps, "SEG": seg,
                     "fwd_bwd_ms": bench_ms(fwd_bwd(fused_fn, x, w, b, g), 10, 50)}
            rows.append(r)
            print("sweep", json.dumps(r), flush=True)
    return rows


def winners_rows(rows, table):
    """The winners as markdown rows: each row's range, its config and the summed time over the range."""
    out, high = [], float("inf")
    for min_n, block, warps, seg in table:
        inside = [r for r in rows if min_n <= r["N"] < high
                  and (r["BLOCK"], r["WARPS"], r["SEG"]) == (block, warps, seg)]
        out.append({"min N": min_n, "BLOCK": block, "WARPS": warps, "SEG": seg, "shapes": len(inside),
                    "summed fwd_bwd_ms": sum(r["fwd_bwd_ms"] for r in inside)})
        high = min_n
    return out


def run_benchmark(args):
    torch.manual_seed(0)
    results = {"environment": environment(), "T": T, "decay": DECAY, "threshold": THRESHOLD, "eps": EPS,
               "out_dtype": "bfloat16", "surrogate": "arctan alpha 2",
               "shipped_before": [list(r) for r in kernels.LAUNCH]}
    data = {(B, C, dtype): inputs(B, C, dtype) for B, C, dtype in SHAPES}
    results["checks"] = []
    for (B, C, dtype), tensors in data.items():
        r = {**shape_row(B, C, dtype), **check(*tensors)}
        results["checks"].append(r)
        print("check", json.dumps(r), flush=True)
        if not r["ok"]:
            print(f"WARNING: norm_lif differs from the peer at B={B}, C={C} beyond the tolerances", flush=True)
    results["sweep"] = sweep(data)
    winners = pick_winners(results["sweep"])
    results["winners"] = [list(r) for r in winners]
    print("winners", json.dumps(results["winners"]), flush=True)
    if args.write_table:
        write_launch_table(winners)
        kernels.LAUNCH = kernels.read_launch_table()  # time what was written, as bench_lif does
    results["written"] = args.write_table
    results["shipped"] = [list(r) for r in kernels.LAUNCH]
    results["shapes"] = []
    for (B, C, dtype), (x, w, b, g) in data.items():
        fused = bench_ms(fwd_bwd(fused_fn, x, w, b, g))
        peer = bench_ms(fwd_bwd(peer_fn, x, w, b, g))
        r = {**shape_row(B, C, dtype), "launch (BLOCK, WARPS, SEG)": str(kernels.launch_config(B * C)),
             "norm_lif_ms": fused, "peer_ms": peer, "speedup": peer / fused}
        results["shapes"].append(r)
        print("shipped", json.dumps(r), flush=True)
    write_outputs(results)


def write_outputs(results):
    shape_cols = ["T", "B", "C", "N", "x dtype"]
    table = (f"Fused LayerNorm -> LIF (`tether.functional.norm_lif`, bf16 spikes) against F.layer_norm then "
             f"`tether.functional.lif`, forward + backward (to x, weight, bias), T={results['T']}, decay "
             f"{DECAY}, threshold {THRESHOLD}, arctan alpha 2, hard reset; do_bench medians.\n\n"
             "## Shipped table against the peer\n\n"
             f"Launch rows [min N, BLOCK, WARPS, SEG] timed: {json.dumps(results['shipped'])} (src/tether/kernels/"
             f"launch_lif.json, \"norm_lif\"{', written by this run' if results['written'] else ''}; before the "
             f"run: {json.dumps(results['shipped_before'])}).\n\n"
             + markdown_table(results["shapes"], shape_cols + ["launch (BLOCK, WARPS, SEG)", "norm_lif_ms", "peer_ms",
                                                                "speedup"]) +
             "\n\n## Check against the peer (shipped table)\n\n"
             "Spikes may differ from the peer's only in neurons whose first difference has the peer's membrane "
             f"within {NEAR:g} of the threshold, or follows a step where the two roundings of the normalized value "
             "to bf16 differ (F.layer_norm's vs the kernels' ((x - mean) rstd) w + b; `y_rounded_apart` counts "
             "those elements); `unexplained` counts the other neurons. `spikes_vs_own_rounding`: spikes against "
             "an fp32 LIF of the kernels' rounding of y (expected 0). Gradients norm-wise, allowed 2e-2.\n\n"
             + markdown_table(results["checks"], shape_cols + ["spikes_mismatch", "neurons_differing",
                                                                "y_rounded_apart", "unexplained",
                                                                "spikes_vs_own_rounding", "grad_x_rel_err",
                                                                "grad_w_rel_err", "grad_b_rel_err", "ok"]) +
             "\n\n## Launch sweep winners (lowest fwd+bwd time summed over the range's shapes)\n\n"
             + markdown_table(winners_rows(results["sweep"], results["winners"]),
                              ["min N", "BLOCK", "WARPS", "SEG", "shapes", "summed fwd_bwd_ms"]) +
             "\n\n## Launch sweep\n\n"
             + markdown_table(results["sweep"], shape_cols + ["BLOCK", "WARPS", "SEG", "fwd_bwd_ms"]))
    write_results("norm_lif", results, table)
    print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-table", action="store_true",
                        help='write the sweep\'s winners to src/tether/kernels/launch_lif.json ("norm_lif") and time '
                             "those")
    run_benchmark(parser.parse_args())
