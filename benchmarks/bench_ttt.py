"""TTT-MLP kernels vs peers on ttt-tk's test shape (B=1, NH=48, L=2048, CS=64, F=64, G=8, bf16) and B=8, or
(--shape lm) on the TTT-MLP language model's (B=64, NH=8, L=256, CS=16, F=48 run padded to 64, G=4, causal)
and B=256.

Measures (protocol: ../shared/BENCHMARKS.md) forward and forward+backward time of the Triton launchers
(tether.kernels.ttt_mlp), the peak memory of forward+backward, the relative error (norm-wise) of the bf16
output and of every gradient vs an fp32 reference computed on the GPU with tether.reference, and, in the
same run on the same inputs, torch.compile of the reference's per-mini-batch step and the eager fp32
reference (the latter with and without remat: its peak memory is the bar for ours).

GPU, from the repository root:
    PYTHONPATH=src python3 -m benchmarks.bench_ttt [--configs default,BK:FWDWARPS:BWDWARPS:STAGES:SPLIT,...]
    [--splits 1,2,4] [--no-peers] [--shape ttt-tk|lm]
A config is the K block, the warps of the forward and of the backward kernel, the pipelining stages and the
programs per head (split); '-' leaves a field to the launchers. --splits runs every config at each split.
Each config is measured in its own process at the shape's first batch size (B=1; lm: 64); per split, the
fastest is measured at the second (B=8; lm: 256) too, and the fastest overall is compared with the peers.
Writes ttt.json / .md (lm: ttt_lm.json / .md).
"""
import argparse
import json
import os
import subprocess
import sys

import torch

from benchmarks.common import bench_ms, rel_err, ceilings, environment, markdown_table, peak_extra_bytes, write_results
from tether._checks import default_token_scale
from tether.kernels import ttt_mlp as kernels
from tether.reference import ttt_mlp as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, for python -m
# heads, tokens, mini-batch, head dim, checkpoint group, causal, (sweep batch, second batch)
SHAPES = {"ttt-tk": dict(NH=48, L=2048, CS=64, F=64, G=8, CAUSAL=False, BATCHES=(1, 8)),
          "lm": dict(NH=8, L=256, CS=16, F=48, G=4, CAUSAL=True, BATCHES=(64, 256))}


def use_shape(name):
    """Set the module's shape constants (NH, L, CS, F, G, CAUSAL, BATCHES, NC, K) to SHAPES[name]."""
    globals().update(SHAPES[name], SHAPE=name)
    globals().update(NC=L // CS, K=4 * F)


use_shape("ttt-tk")
GRADS = ("xq", "xk", "xv", "lr", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2")


def make_inputs(B, seed=0):
    """Activations bf16, state fp32, scaled as a TTT layer starts: unit tokens, lr = sigmoid(.) / F,
    inner weights N(0, 0.02). Upstream gradients random (outputs bf16, final state fp32)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0, dtype=torch.float32):
        return (scale * torch.randn(*shape, device="cuda", generator=g)).to(dtype)

    x = {n: randn(B, NH, NC, CS, F, dtype=torch.bfloat16) for n in ("xq", "xk", "xv")}  # [B, NH, NC, CS, F]
    x["lr"] = (torch.sigmoid(randn(B, NH, NC, CS, 1)) / F).to(torch.bfloat16)
    x["ln_weight"] = 1.0 + randn(NH, F, scale=0.1)
    x["ln_bias"] = randn(NH, F, scale=0.1)
    x.update(w1=randn(B, NH, F, K, scale=0.02), b1=randn(B, NH, 1, K, scale=0.02),
             w2=randn(B, NH, K, F, scale=0.02), b2=randn(B, NH, 1, F, scale=0.02))
    x["token_scale"] = default_token_scale(CS, "cuda") if CAUSAL else None  # [CS], causal mode only
    upstream = {"out": randn(B, NH, NC, CS, F, dtype=torch.bfloat16),
                "last": [randn(*x[n].shape, scale=0.01) for n in ("w1", "b1", "w2", "b2")]}
    return x, upstream


def kernel_fwd(x, cfg):
    return kernels.ttt_mlp_fwd(x["xq"], x["xk"], x["xv"], x["lr"], x["token_scale"], x["ln_weight"], x["ln_bias"],
                               x["w1"], x["b1"], x["w2"], x["b2"], causal=CAUSAL, checkpoint_group_size=G,
                               launch=kernels.LaunchOptions(cfg[0], cfg[1], cfg[3], cfg[4]))


def kernel_fwd_bwd(x, up, cfg):
    out, ckpts, last = kernel_fwd(x, cfg)
    grads = kernels.ttt_mlp_bwd(x["xq"], x["xk"], x["xv"], x["lr"], x["token_scale"], x["ln_weight"],
                                x["ln_bias"], *ckpts, up["out"], *up["last"], causal=CAUSAL, checkpoint_group_size=G,
                                launch=kernels.LaunchOptions(cfg[0], cfg[2], cfg[3], cfg[4]))
    return out, last, grads


def reference_fwd_bwd(x, up, group=None, dtype=torch.float32):
    """Eager reference in `dtype` (inputs upcast); returns (out, final state, grads)."""
    leaves = {n: x[n].detach().to(dtype).requires_grad_() for n in GRADS}
    out, last, _ = ref.ttt_mlp(*(leaves[n] for n in GRADS), causal=CAUSAL, token_scale=x["token_scale"],
                               checkpoint_group_size=group)
    torch.autograd.backward([out, *last], [up["out"].to(dtype), *up["last"]])
    return out, last, {n: leaves[n].grad for n in GRADS}


def compiled_step_scan():
    """torch.compile of the reference's per-mini-batch step, scanned over NC in Python (fp32)."""
    step = torch.compile(ref.ttt_mlp_step, dynamic=False)

    def scan(leaves):
        state = tuple(leaves[n] for n in ("w1", "b1", "w2", "b2"))
        outs = []
        for c in range(NC):
            out, state = step(leaves["xq"][:, :, c], leaves["xk"][:, :, c], leaves["xv"][:, :, c],
                              leaves["lr"][:, :, c], leaves["ln_weight"], leaves["ln_bias"], state,
                              causal=CAUSAL, token_scale=leaves["token_scale"])
            outs.append(out)
        return torch.stack(outs, 2), state
    return scan


def measure_kernel(B, cfg):
    """Errors vs the fp32 reference, then fwd and fwd+bwd time and peak memory of one config."""
    x, up = make_inputs(B)
    ref_out, ref_last, ref_grads = reference_fwd_bwd(x, up)
    out, last, grads = kernel_fwd_bwd(x, up, cfg)
    errors = {"out": rel_err(out, ref_out)}
    errors.update({f"last_{n}": rel_err(a, b) for n, a, b in zip(("w1", "b1", "w2", "b2"), last, ref_last)})
    errors.update({f"d{n}": rel_err(grads[n].sum(0) if n.startswith("ln") else grads[n], ref_grads[n])
                   for n in GRADS})
    del ref_out, ref_last, ref_grads, out, last, grads
    res = {"B": B, "config": list(cfg), "errors": errors, "fwd_ms": bench_ms(lambda: kernel_fwd(x, cfg)),
           "fwd_bwd_ms": bench_ms(lambda: kernel_fwd_bwd(x, up, cfg)),
           "peak_gb": peak_extra_bytes(lambda: kernel_fwd_bwd(x, up, cfg)) / 1e9}
    res["fwd_tflops"] = 14 * CS * F * K * NC * B * NH / res["fwd_ms"] / 1e9
    res["max_grad_err"] = max(v for k, v in errors.items() if k.startswith("d"))
    return res


def parse_config(text):
    """'default' -> all None (the launchers pick); 'BK:FWDWARPS:BWDWARPS:STAGES:SPLIT' -> ints, '-' = None."""
    fields = ["-"] * 5 if text == "default" else text.split(":")
    if len(fields) != 5:
        raise ValueError(f"--configs: expected 'default' or BK:FWDWARPS:BWDWARPS:STAGES:SPLIT, got {text!r}")
    return tuple(None if v == "-" else int(v) for v in fields)


def config_name(cfg):
    return ":".join("-" if v is None else str(v) for v in cfg)


def measure_in_subprocess(B, cfg):
    """One config in its own process: a config that fails to compile or run (or hangs: its programs wait
    for each other) is reported, not fatal."""
    try:
        run = subprocess.run([sys.executable, "-m", "benchmarks.bench_ttt", "--shape", SHAPE,
                              "--measure", f"{B}:{config_name(cfg)}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        print(f"B={B} config {config_name(cfg)} timed out", flush=True)
        return None
    if run.returncode != 0:
        print(f"B={B} config {config_name(cfg)} failed:\n{run.stderr[-1500:]}", flush=True)
        return None
    res = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"B={B} config {config_name(cfg)}: fwd {res['fwd_ms']:.3f} ms, fwd+bwd {res['fwd_bwd_ms']:.3f} ms, "
          f"out err {res['errors']['out']:.2e}, max grad err {res['max_grad_err']:.2e}", flush=True)
    return res


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="default",
                        help="'default' (the launchers' own) or BK:FWDWARPS:BWDWARPS:STAGES:SPLIT ('-' = the "
                             "launchers' choice), comma separated")
    parser.add_argument("--splits", default=None, help="programs per head, comma separated: each config at each")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--shape", default="ttt-tk", choices=list(SHAPES))
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_shape(args.shape)
    if args.measure:
        B, *cfg = args.measure.split(":")
        print(json.dumps(measure_kernel(int(B), parse_config(":".join(cfg)))))
        return
    configs = [parse_config(c) for c in args.configs.split(",")]
    if args.splits:
        configs = [(*c[:4], int(p)) for c in configs for p in args.splits.split(",")]
    env = environment()
    peaks = ceilings()
    first, second = BATCHES
    payload = {"environment": env, "ceilings": peaks, "results": [],
               "shape": dict(name=SHAPE, NH=NH, L=L, CS=CS, F=F, G=G, causal=CAUSAL)}
    sweep = [r for r in (measure_in_subprocess(first, c) for c in configs) if r is not None]
    payload[f"sweep_B{first}"] = sweep
    best = min(sweep, key=lambda r: r["fwd_bwd_ms"])
    rows = []
    for split in dict.fromkeys(r["config"][4] for r in sweep):  # per split, in the order given: its fastest
        res1 = min((r for r in sweep if r["config"][4] == split), key=lambda r: r["fwd_bwd_ms"])
        for B in BATCHES:
            res = res1 if B == first else measure_in_subprocess(B, tuple(res1["config"]))
            if res is None:
                continue
            rows.append({"implementation": f"tether Triton, bf16 (config {config_name(res['config'])})", "B": B,
                         "fwd ms": res["fwd_ms"], "fwd+bwd ms": res["fwd_bwd_ms"], "peak GB": res["peak_gb"],
                         "out err": res["errors"]["out"], "max grad err": res["max_grad_err"]})
            payload["results"].append(res)
    if not args.no_peers:
        best.update(measure_peers(first))
        peers = [{"implementation": "torch.compile per mini-batch step, fp32", "B": first,
                  "fwd ms": best["compile_fwd_ms"], "fwd+bwd ms": best["compile_fwd_bwd_ms"]},
                 {"implementation": f"PyTorch eager reference, fp32 (peak: remat G={G})", "B": first,
                  "fwd ms": best["eager_fwd_ms"], "fwd+bwd ms": best["eager_fwd_bwd_ms"],
                  "peak GB": best["eager_remat_peak_gb"]}]
        for r in peers:
            r["ratio fwd"] = r["fwd ms"] / best["fwd_ms"]
            r["ratio fwd+bwd"] = r["fwd+bwd ms"] / best["fwd_bwd_ms"]
        rows += peers
    columns = ["implementation", "B", "fwd ms", "fwd+bwd ms", "ratio fwd", "ratio fwd+bwd", "peak GB",
               "out err", "max grad err"]
    table = markdown_table(rows, columns)
    anchors = (f"ttt-tk (ThunderKittens, H100-only CUDA; not run here, anchors of BENCHMARKS.md, B=1): fwd 1.08 ms, "
               f"fwd+bwd 9.89 ms, ratio {1.08 / best['fwd_ms']:.2f} and {9.89 / best['fwd_bwd_ms']:.2f}. "
               if SHAPE == "ttt-tk" else "")
    table = (f"Shape {SHAPE}: NH={NH}, L={L}, CS={CS}, F={F}, G={G}, causal={CAUSAL}, bf16 activations, fp32 "
             f"state.\n\n" + table)
    table += (f"\n\nConfig = K block : forward warps : backward warps : stages : programs per head (split); "
              f"'-' = the launchers' default. ratio = peer time / time of the fastest tether config at B={first} "
              f"({config_name(best['config'])}). Errors: relative (norm-wise) vs the fp32 reference on the "
              f"same inputs; per-gradient errors in the JSON. " + anchors + "Eager peak: fp32 copies of the "
              f"inputs and all their gradients included. Forward {best['fwd_tflops']:.1f} TFLOP/s. Ceilings "
              f"here: copy {peaks['copy_gbs']:.0f} GB/s, bf16 matmul {peaks['bf16_matmul_tflops']:.0f} TFLOP/s.")
    print(table)
    write_results("ttt" if SHAPE == "ttt-tk" else "ttt_lm", payload, table)


def measure_peers(B):
    """torch.compile of the reference step and the eager reference (fp32), on the same inputs."""
    x, up = make_inputs(B)
    leaves = {n: x[n].detach().float().requires_grad_() for n in GRADS}
    leaves["token_scale"] = x["token_scale"]
    up32 = [up["out"].float(), *up["last"]]
    scan = compiled_step_scan()

    def compiled_fwd_bwd():
        out, last = scan(leaves)
        torch.autograd.backward([out, *last], up32)
    res = {}
    with torch.no_grad():
        res["compile_fwd_ms"] = bench_ms(lambda: scan(leaves), warmup=3, rep=10)
    res["compile_fwd_bwd_ms"] = bench_ms(compiled_fwd_bwd, warmup=3, rep=10)
    with torch.no_grad():
        res["eager_fwd_ms"] = bench_ms(lambda: ref.ttt_mlp(*(leaves[n] for n in GRADS), causal=CAUSAL,
                                                            token_scale=x["token_scale"]), warmup=2, rep=5)
    res["eager_fwd_bwd_ms"] = bench_ms(lambda: reference_fwd_bwd(x, up), warmup=2, rep=5)
    res["eager_remat_peak_gb"] = peak_extra_bytes(lambda: reference_fwd_bwd(x, up, group=G)) / 1e9
    res["eager_peak_gb"] = peak_extra_bytes(lambda: reference_fwd_bwd(x, up)) / 1e9
    return res


if __name__ == "__main__":
    main()
