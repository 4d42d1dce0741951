"""LIF benchmark (../shared/BENCHMARKS.md): tether's fused kernels against SpikingJelly 2.0, tetherpy 0.2.0,
snnTorch 1.0, the eager reference loop and torch.compile of it, in one run on one GPU.

On the GPU machine, from the repository root (peer wheels installed with --target; tetherpy into its own dir,
its import name clashes):
  PYTHONPATH=src:/tmp/site python3 -m benchmarks.bench_lif --tetherpy-site /tmp/tetherpy [--write-table]
Order: launch-config sweep (its winners are recorded; with --write-table they are written to the shipped table,
src/tether/kernels/launch_lif.json), tether on every standard shape with the shipped table (checked against the
reference first), saved bytes per case, an int64-offset check (T * N > 2**31), peers.
Writes lif.json, lif.md and lif.png under $OUT (or benchmarks/results/).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import (bench_ms, rel_err, ceilings, environment, lif_launch, markdown_table, peak_extra_bytes,
                               saved_bytes, write_launch_file, write_results)
from tether.functional.lif import lif
from tether.kernels import lif as kernels
from tether.reference import lif as reference

MAIN = (1024, 65536)  # T, N = 64 x 1024
SHAPES = [(1024, 65536, torch.float32), (1024, 65536, torch.bfloat16), (64, 4 * 2**20, torch.float32),
          (8192, 8192, torch.float32)]
DECAY, THRESHOLD = 0.5, 1.0


def fwd_bwd(fn, x, grad):
    """One training step of an LIF implementation fn(x) -> spikes: forward + backward to x."""
    def step():
        spikes = fn(x)
        return torch.autograd.grad(spikes, x, grad)[0]
    return step


def forward_only(fn, x):
    def step():
        with torch.no_grad():
            return fn(x)
    return step


def train_forward(fn, x):
    return lambda: fn(x)


def time_impl(fn, x, grad, warmup=25, rep=100):
    """fwd (inference, no grad), fwd (training: saves for backward), fwd+bwd ms, peak extra bytes/elem."""
    x = x.detach().requires_grad_()
    step = fwd_bwd(fn, x, grad)
    return {
        "fwd_infer_ms": bench_ms(forward_only(fn, x), warmup, rep),
        "fwd_ms": bench_ms(train_forward(fn, x), warmup, rep),
        "fwd_bwd_ms": bench_ms(step, warmup, rep),
        "peak_extra_B_per_elem": peak_extra_bytes(step) / x.numel(),
    }


def tether_fn(x):
    return lif(x, DECAY, THRESHOLD)[0]


def reference_fn(x):
    return reference.lif(x, DECAY, THRESHOLD)[0]


def check_against_reference(x, grad):
    """Spikes equal to the fp32-membrane reference; gradient to x within 1e-4 (norm-wise, fp32)."""
    xk = x.detach().requires_grad_()
    xr = x.detach().requires_grad_()
    sk, sr = tether_fn(xk), reference_fn(xr)
    (gk,) = torch.autograd.grad(sk, xk, grad)
    (gr,) = torch.autograd.grad(sr, xr, grad)
    return {"spikes_mismatch": int((sk != sr).sum()), "grad_x_rel_err": rel_err(gk, gr)}


def dtype_rounds(rounds=5):
    """fp32 vs bf16 input at the main shape, timed in alternation: fwd+bwd of bf16 sits near the host's
    per-call CPU time, so a slow spell of the host lands in one round of both dtypes, not in one dtype.
    Per dtype: each round's do_bench median, and the median and lowest of them."""
    T, N = MAIN
    data = {d: (torch.randn(T, N, device="cuda", dtype=d), torch.randn(T, N, device="cuda", dtype=d))
            for d in (torch.float32, torch.bfloat16)}
    out = {str(d).replace("torch.", ""): {"fwd_ms": [], "fwd_bwd_ms": []} for d in data}
    for _ in range(rounds):
        for d, (x, grad) in data.items():
            x = x.detach().requires_grad_()
            r = out[str(d).replace("torch.", "")]
            r["fwd_ms"].append(bench_ms(train_forward(tether_fn, x)))
            r["fwd_bwd_ms"].append(bench_ms(fwd_bwd(tether_fn, x, grad)))
    for r in out.values():
        r["fwd_ms_min"], r["fwd_bwd_ms_min"] = min(r["fwd_ms"]), min(r["fwd_bwd_ms"])
        r["fwd_ms_median"], r["fwd_bwd_ms_median"] = statistics.median(r["fwd_ms"]), statistics.median(r["fwd_bwd_ms"])
    print("rounds", json.dumps(out), flush=True)
    return out


def host_us(calls=3000):
    """Host (CPU) time of one call at a tiny shape, T=8, N=64, where the GPU has nothing to wait for: the
    eager path's Python, autograd and launch cost, per dtype; next to it, torch.autograd.grad of x * 2 (the
    harness's own share of a fwd+bwd step). Median of `calls` calls, lowest of 3 rounds."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, 64, device="cuda", dtype=dtype, requires_grad=True)
        grad = torch.randn(8, 64, device="cuda", dtype=dtype)
        fns = {"fwd": train_forward(tether_fn, x), "fwd_bwd": fwd_bwd(tether_fn, x, grad),
               "autograd.grad of x * 2": fwd_bwd(lambda t: t * 2, x, grad)}
        r = out[str(dtype).replace("torch.", "")] = {}
        for _ in range(3):
            for name, fn in fns.items():
                for _ in range(200):
                    fn()
                torch.cuda.synchronize()
                times = []
                for _ in range(calls):
                    start = time.perf_counter_ns()
                    fn()
                    times.append(time.perf_counter_ns() - start)
                torch.cuda.synchronize()
                r[name] = min(r.get(name, math.inf), statistics.median(times) / 1e3)
    print("host_us", json.dumps(out), flush=True)
    return out


def saved_bytes_per_case(T, N, dtype):
    """What each case saves for backward, bytes per element (saved_tensors_hooks)."""
    x = torch.randn(T, N, device="cuda", dtype=dtype, requires_grad=True)
    cases = {
        "default (fixed decay, detach_reset)": lambda: lif(x, DECAY, THRESHOLD),
        "threshold 0-d with grad": lambda: lif(x, DECAY, torch.tensor(THRESHOLD, device="cuda",
                                                                      requires_grad=True)),
        "soft reset, detach_reset=False": lambda: lif(x, DECAY, THRESHOLD, reset="soft", detach_reset=False),
        "learnable decay (0-d with grad)": lambda: lif(x, torch.tensor(DECAY, device="cuda", requires_grad=True),
                                                       THRESHOLD),
        "hard reset, detach_reset=False": lambda: lif(x, DECAY, THRESHOLD, detach_reset=False),
        "inference (no grad)": lambda: lif(x.detach(), DECAY, THRESHOLD),
    }
    return {name: saved_bytes(fn) / (T * N) for name, fn in cases.items()}


def traffic_bytes(dtype_bytes):
    """Bytes per element moved: inference fwd, training fwd (+ COMPACT save), fwd+bwd."""
    infer = 2 * dtype_bytes  # read x, write spikes
    train = infer + 2.125
    return infer, train, train + dtype_bytes + 2.125 + dtype_bytes  # bwd: read dL/ds + saved, write dL/dx


# ---- peers ------------------------------------------------------------------------------------------------

def spikingjelly_fn():
    from spikingjelly.activation_based import functional, neuron, surrogate

    node = neuron.LIFNode(tau=2.0, decay_input=False, v_threshold=1.0, surrogate_function=surrogate.ATan(),
                          detach_reset=True, step_mode="m")

    def run(x):
        functional.reset_net(node)
        return node(x.view(x.shape[0], 64, -1)).view(x.shape)  # run on [T, B, D]
    return run


def snntorch_fn():
    import snntorch as snn
    from snntorch import surrogate

    leaky = snn.Leaky(beta=0.5, threshold=1.0, spike_grad=surrogate.atan(), reset_mechanism="zero")

    def run(x):
        mem = torch.zeros_like(x[0])
        spikes = []
        for x_t in x:
            spk, mem = leaky(x_t, mem)
            spikes.append(spk)
        return torch.stack(spikes)
    return run


TETHERPY = r"""
import json, torch
from benchmarks.common import bench_ms, peak_extra_bytes
import tether
T, N = %d, %d
torch.manual_seed(0)
x = torch.randn(T, N, device="cuda", requires_grad=True)
grad = torch.randn(T, N, device="cuda")
layer = tether.nn.LIF(N, decay=0.5, threshold=1.0).cuda()
def fwd():
    return layer(x)
def infer():
    with torch.no_grad():
        return layer(x)
def step():
    return torch.autograd.grad(layer(x), x, grad)[0]
print(json.dumps({"fwd_infer_ms": bench_ms(infer), "fwd_ms": bench_ms(fwd), "fwd_bwd_ms": bench_ms(step),
                  "peak_extra_B_per_elem": peak_extra_bytes(step) / x.numel(), "version": tether.__version__
                  if hasattr(tether, "__version__") else "0.2.0"}))
"""


def tetherpy_result(site):
    """tetherpy's import name is `tether`: time it in a child process that sees only its own install (and the
    benchmarks package, from the repository root)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([site, str(Path(__file__).resolve().parent.parent)])
    code = TETHERPY % MAIN
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return {"error": out.stderr[-800:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def scaled(result, factor, T_run):
    """A Python-loop peer timed at a shorter T, scaled linearly to the main T."""
    out = {k: v * factor if k.endswith("_ms") else v for k, v in result.items()}
    out["note"] = f"timed at T={T_run}, times x{factor}"
    return out


# ---- runs -------------------------------------------------------------------------------------------------

def run_benchmark(args):
    torch.manual_seed(0)
    env = environment()
    ceil = ceilings()
    results = {"environment": env, "ceilings": ceil, "decay": DECAY, "threshold": THRESHOLD,
               "surrogate": "arctan alpha 2", "shapes": [], "peers": {}}
    sweep_launch(results, args.write_table)
    for T, N, dtype in SHAPES:
        x = torch.randn(T, N, device="cuda", dtype=dtype)  # [T, N]
        grad = torch.randn(T, N, device="cuda", dtype=dtype)
        check = check_against_reference(x, grad)
        r = {"T": T, "N": N, "dtype": str(dtype).replace("torch.", ""), **check, **time_impl(tether_fn, x, grad)}
        infer_b, train_b, step_b = traffic_bytes(x.element_size())
        r["fwd_infer_GBs"] = infer_b * T * N / r["fwd_infer_ms"] / 1e6
        r["fwd_bwd_GBs"] = step_b * T * N / r["fwd_bwd_ms"] / 1e6
        r["fwd_infer_floor_ms"] = infer_b * T * N / ceil["copy_gbs"] / 1e6
        r["fwd_bwd_floor_ms"] = step_b * T * N / ceil["copy_gbs"] / 1e6
        results["shapes"].append(r)
        print(json.dumps(r), flush=True)
        del x, grad
    results["rounds"] = dtype_rounds()
    results["host_us"] = host_us()
    results["saved_bytes_per_elem"] = saved_bytes_per_case(*MAIN, torch.float32)
    print(json.dumps(results["saved_bytes_per_elem"]), flush=True)
    results["int64_check"] = int64_check()
    print("int64", json.dumps(results["int64_check"]), flush=True)
    dump_partial(results)
    torch.cuda.empty_cache()

    T, N = MAIN
    x = torch.randn(T, N, device="cuda")
    grad = torch.randn(T, N, device="cuda")
    peers = results["peers"]
    peers["tether fp32"] = results["shapes"][0]
    peers["tether bf16"] = results["shapes"][1]
    try:
        sj = spikingjelly_fn()
        peers["SpikingJelly 2.0 fp32"] = time_impl(sj, x, grad)
        peers["SpikingJelly 2.0 fp32"]["spikes_mismatch"] = int((sj(x) != tether_fn(x)).sum())
        xb, gb = x.bfloat16(), grad.bfloat16()
        peers["SpikingJelly 2.0 bf16"] = time_impl(sj, xb, gb, warmup=1, rep=3)
    except Exception as e:  # a peer that fails is reported, not fatal
        peers["SpikingJelly 2.0 fp32"] = {"error": repr(e)[:500]}
    print("spikingjelly", json.dumps(peers.get("SpikingJelly 2.0 bf16", peers["SpikingJelly 2.0 fp32"])), flush=True)
    dump_partial(results)
    if args.tetherpy_site:
        peers["tetherpy 0.2.0"] = tetherpy_result(args.tetherpy_site)
        print("tetherpy", json.dumps(peers["tetherpy 0.2.0"]), flush=True)
    short = 256
    try:
        peers["snnTorch 1.0"] = scaled(time_impl(snntorch_fn(), x[:short], grad[:short], warmup=1, rep=3),
                                       T // short, short)
    except Exception as e:
        peers["snnTorch 1.0"] = {"error": repr(e)[:500]}
    peers["PyTorch eager loop (reference)"] = scaled(
        time_impl(reference_fn, x[:short], grad[:short], warmup=1, rep=3), T // short, short)
    print("eager", json.dumps(peers["PyTorch eager loop (reference)"]), flush=True)
    dump_partial(results)
    compile_T = 16
    t0 = time.time()
    try:
        compiled = torch.compile(reference_fn)
        peers["torch.compile(reference)"] = scaled(time_impl(compiled, x[:compile_T], grad[:compile_T]),
                                                   T // compile_T, compile_T)
        peers["torch.compile(reference)"]["compile_s"] = time.time() - t0
    except Exception as e:
        peers["torch.compile(reference)"] = {"error": repr(e)[:500]}
    write_outputs(results)


def write_outputs(results):
    ceil, shapes, peers = results["ceilings"], results["shapes"], results["peers"]
    cols = ["T", "N", "dtype", "fwd_infer_ms", "fwd_ms", "fwd_bwd_ms", "fwd_infer_floor_ms", "fwd_bwd_floor_ms",
            "fwd_infer_GBs", "fwd_bwd_GBs", "peak_extra_B_per_elem", "spikes_mismatch", "grad_x_rel_err"]
    ours = results["shapes"][0]
    peer_rows = []
    for name, p in peers.items():
        row = {"implementation": name, **{k: p.get(k) for k in ("fwd_infer_ms", "fwd_ms", "fwd_bwd_ms",
                                                                "peak_extra_B_per_elem", "note", "error")}}
        if "fwd_ms" in p:
            row["peer / tether fwd"] = p["fwd_ms"] / ours["fwd_ms"]
            row["peer / tether fwd+bwd"] = p["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
        peer_rows.append(row)
    pcols = ["implementation", "fwd_infer_ms", "fwd_ms", "fwd_bwd_ms", "peak_extra_B_per_elem",
             "peer / tether fwd", "peer / tether fwd+bwd", "note", "error"]
    saved = "\n".join(f"| {k} | {v:.4g} |" for k, v in results["saved_bytes_per_elem"].items())
    table = (targets(results) + "\n\n" + f"Ceilings measured here: copy {ceil['copy_gbs']:.0f} GB/s, bf16 matmul "
             f"{ceil['bf16_matmul_tflops']:.0f} TFLOP/s. decay 0.5, threshold 1, arctan alpha 2, hard reset.\n"
             "fwd_infer: no grad (nothing saved); fwd: training forward (saves for backward); floors: bytes "
             "moved / copy bandwidth (fwd_infer 2 x dtype B/elem; fwd+bwd 4 x dtype + 4.25 B/elem).\n\n"
             "## tether, all shapes\n\n" + markdown_table(shapes, cols) + "\n\n" + rounds_section(results) +
             f"\n\n## Peers, T={MAIN[0]}, N={MAIN[1]} fp32 (ratio > 1: tether faster)\n\n"
             + markdown_table(peer_rows, pcols) +
             "\n\n## Saved for backward, bytes per element (T=1024, N=65536, fp32)\n\n| case | B/elem |\n|---|---|\n"
             + saved + f"\n\nint64 offsets (T * N > 2**31): {json.dumps(results['int64_check'])}\n\n"
             + launch_section(results["launch"])
             + markdown_table(results["launch"]["sweep"], ["T", "N", "dtype", "BLOCK", "CHUNK", "WARPS", "fwd_ms",
                                                           "bwd_ms"])
             + "\n\n![LIF times](lif.png)")
    path = write_results("lif", results, table)
    if torch.cuda.is_available():  # a rewrite of the tables from lif.json elsewhere keeps the run's PNG
        plot(peers, path.parent / "lif.png", results["environment"]["gpu"])
    print(table)


def launch_section(launch):
    """The table the timings above ran with and the sweep's winners, as markdown."""
    timed = launch.get("shipped")
    text = ("Launch (min N, BLOCK, CHUNK, WARPS) per (kernel, bytes per element): "
            + (f"timed above, the shipped table (src/tether/kernels/launch_lif.json"
               f"{', written by this run' if launch.get('written') else ''}): {json.dumps(timed)}; "
               if timed else "")
            + f"the sweep's winners: {json.dumps(launch.get('winners', launch.get('chosen')))}\n\n")
    return text


def rounds_section(results):
    """The fp32 / bf16 alternating rounds and the host time per call, as markdown."""
    rows = [{"dtype": d, "fwd ms, each round": ", ".join(f"{v:.3f}" for v in r["fwd_ms"]),
             "fwd+bwd ms, each round": ", ".join(f"{v:.3f}" for v in r["fwd_bwd_ms"]),
             "fwd+bwd median": r["fwd_bwd_ms_median"], "fwd+bwd lowest": r["fwd_bwd_ms_min"]}
            for d, r in results["rounds"].items()]
    host = [{"dtype": d, **r} for d, r in results["host_us"].items()]
    return (f"## fp32 vs bf16, alternating rounds (T={MAIN[0]}, N={MAIN[1]}; each value a do_bench median)\n\n"
            + markdown_table(rows, list(rows[0])) +
            "\n\n## Host time per call, microseconds (T=8, N=64: no GPU work to wait for)\n\n"
            "A forward+backward step is bound by the host when its CPU time exceeds its GPU time (bf16 at the main "
            "shape: ~0.3 ms of kernels), so these set the floor of the bf16 step on this machine.\n\n"
            + markdown_table(host, list(host[0])))


def targets(results):
    """Issue 2's done-when, T=1024, N=65536, from this run's numbers."""
    fp32, bf16 = results["shapes"][0], results["shapes"][1]
    peers = results["peers"]
    sj, tp = peers.get("SpikingJelly 2.0 fp32", {}), peers.get("tetherpy 0.2.0", {})
    saved = results["saved_bytes_per_elem"]["default (fixed decay, detach_reset)"]
    rows = [("forward, fp32 (ms)", f"{fp32['fwd_ms']:.4f}", "<= 0.30", fp32["fwd_ms"] <= 0.30),
            ("forward + backward, fp32 (ms)", f"{fp32['fwd_bwd_ms']:.4f}", "<= 0.50", fp32["fwd_bwd_ms"] <= 0.50)]
    if "fwd_bwd_ms" in sj:
        rows.append(("SpikingJelly 2.0 / tether, fwd and fwd+bwd (this run)",
                     f"{sj['fwd_ms'] / fp32['fwd_ms']:.2f}x, {sj['fwd_bwd_ms'] / fp32['fwd_bwd_ms']:.2f}x", ">= 2.7x",
                     min(sj["fwd_ms"] / fp32["fwd_ms"], sj["fwd_bwd_ms"] / fp32["fwd_bwd_ms"]) >= 2.7))
    if "fwd_bwd_ms" in tp:
        rows.append(("tetherpy 0.2.0 / tether, fwd+bwd (this run; anchor 3.00 ms)",
                     f"{tp['fwd_bwd_ms'] / fp32['fwd_bwd_ms']:.2f}x (anchor: {3.00 / fp32['fwd_bwd_ms']:.2f}x)",
                     ">= 6x", tp["fwd_bwd_ms"] / fp32["fwd_bwd_ms"] >= 6))
    rounds = results.get("rounds")
    if rounds:  # median of the alternating rounds (see dtype_rounds)
        f, b = rounds["float32"], rounds["bfloat16"]
        fwd_ratio = b["fwd_ms_median"] / f["fwd_ms_median"]
        step_ratio = b["fwd_bwd_ms_median"] / f["fwd_bwd_ms_median"]
        what = (f"bf16 / fp32 time, fwd and fwd+bwd (median of {len(f['fwd_ms'])} alternating rounds: "
                f"{b['fwd_ms_median']:.4f} / {f['fwd_ms_median']:.4f}, "
                f"{b['fwd_bwd_ms_median']:.4f} / {f['fwd_bwd_ms_median']:.4f} ms)")
    else:
        fwd_ratio, step_ratio = bf16["fwd_ms"] / fp32["fwd_ms"], bf16["fwd_bwd_ms"] / fp32["fwd_bwd_ms"]
        what = "bf16 / fp32 time, fwd and fwd+bwd"
    rows += [(what, f"{fwd_ratio:.2f}, {step_ratio:.2f}", "<= 1", max(fwd_ratio, step_ratio) <= 1),
             ("saved for backward (B/elem)", f"{saved:.3f}", "<= 2.25", saved <= 2.25),
             ("spikes != reference (fp32)", str(fp32["spikes_mismatch"]), "0", fp32["spikes_mismatch"] == 0),
             ("grad x relative error (fp32)", f"{fp32['grad_x_rel_err']:.2e}", "<= 1e-4",
              fp32["grad_x_rel_err"] <= 1e-4)]
    lines = ["## Done-when of issue 2 (this run)", "", "| point | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {value} | {target} | {'yes' if ok else 'NO'} |" for name, value, target, ok in rows]
    return "\n".join(lines)


def plot(peers, path, gpu: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, p in peers.items() if "fwd_ms" in p]
    fwd = [peers[n]["fwd_ms"] for n in names]
    step = [peers[n]["fwd_bwd_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    pos = range(len(names))
    ax.bar([p - 0.2 for p in pos], fwd, 0.4, label="forward (training)")
    ax.bar([p + 0.2 for p in pos], step, 0.4, label="forward + backward")
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    ax.set_xticks(list(pos), [n.replace(" (", "\n(") for n in names], fontsize=7, rotation=20)
    ax.set_title(f"LIF, T={MAIN[0]}, N={MAIN[1]}, {gpu}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# (T, N, dtype) -> candidate (BLOCK, CHUNK, WARPS) for the launch sweep
SWEEP = {
    (1024, 65536, torch.float32): [(64, 16, 1), (64, 32, 1), (64, 8, 1), (128, 16, 2), (128, 32, 2),
                                   (128, 8, 1), (128, 16, 1)],
    (1024, 65536, torch.bfloat16): [(256, 8, 2), (256, 16, 2), (128, 16, 1), (128, 8, 1), (64, 16, 1),
                                    (64, 32, 1), (128, 16, 2), (512, 8, 4)],
    (8192, 8192, torch.float32): [(64, 16, 1), (32, 16, 1), (64, 32, 1), (64, 8, 1)],
}


def sweep_launch(results, write_table: bool):
    """Time the training forward and the backward alone for candidate (BLOCK, CHUNK, WARPS) on a large-N shape
    per dtype and a small-N shape (small N: the fp32 winner for both dtypes) and record the winners. With
    write_table, write them to the shipped table (launch_lif.json) and use it from then on; without, the rest of
    the run times the shipped table as it is."""
    rows = []
    for (T, N, dtype), candidates in SWEEP.items():
        x = torch.randn(T, N, device="cuda", dtype=dtype, requires_grad=True)
        grad = torch.randn(T, N, device="cuda", dtype=dtype)
        for cfg in candidates:
            with lif_launch({(k, x.element_size()): [(0, *cfg)] for k in ("forward", "backward")}):
                spikes = tether_fn(x)
                r = {"T": T, "N": N, "dtype": str(dtype).replace("torch.", ""), "BLOCK": cfg[0], "CHUNK": cfg[1],
                     "WARPS": cfg[2], "fwd_ms": bench_ms(train_forward(tether_fn, x), 5, 40),
                     "bwd_ms": bench_ms(lambda: torch.autograd.grad(spikes, x, grad, retain_graph=True), 5, 40)}
            rows.append(r)
            print("sweep", json.dumps(r), flush=True)
        del x, grad, spikes
    best = {}
    for kernel, key in (("forward", "fwd_ms"), ("backward", "bwd_ms")):
        small = min((r for r in rows if r["N"] == 8192), key=lambda r: r[key])
        for size, dtype in ((4, "float32"), (2, "bfloat16")):
            big = min((r for r in rows if r["N"] == 65536 and r["dtype"] == dtype), key=lambda r: r[key])
            best[(kernel, size)] = [(50_000, big["BLOCK"], big["CHUNK"], big["WARPS"]),
                                    (0, small["BLOCK"], small["CHUNK"], small["WARPS"])]
    if write_table:
        write_launch_table(best)
        kernels.LAUNCH = kernels.read_launch_table()
    results["launch"] = {"sweep": rows, "winners": as_json(best), "shipped": as_json(kernels.LAUNCH),
                         "written": write_table}
    print("launch", json.dumps(results["launch"]["winners"]), flush=True)


def as_json(table):
    """{(kernel, size): rows} -> {"kernel sizeB": rows}, for the results file."""
    return {f"{k} {size}B": [list(row) for row in rows] for (k, size), rows in table.items()}


def write_launch_table(table, path=None):
    """Write table as the LIF rows of the shipped launch file (src/tether/kernels/launch_lif.json, or path),
    keeping the shipped file's "about" and norm_lif's rows (common.write_launch_file)."""
    from tether.kernels import norm_lif as norm_kernels

    write_launch_file(table, norm_kernels.read_launch_table(), path)


def int64_check():
    """T * N > 2**31 elements: the last neurons' spikes, v_final and gradient against the reference."""
    T, N = 32800, 65536
    x = torch.randn(T, N, device="cuda", requires_grad=True)
    spikes, v = lif(x, DECAY, THRESHOLD)
    grad = torch.randn(T, 3, device="cuda")
    (gx,) = torch.autograd.grad(spikes[:, -3:], x, grad)
    gx = gx[:, -3:].clone()
    xr = x[:, -3:].detach().requires_grad_()
    sr, vr = reference.lif(xr, DECAY, THRESHOLD)
    (gr,) = torch.autograd.grad(sr, xr, grad)
    return {"T": T, "N": N, "spikes_mismatch": int((spikes[:, -3:] != sr).sum()),
            "v_final_max_err": (v[-3:] - vr).abs().max().item(), "grad_x_rel_err": rel_err(gx, gr)}


def dump_partial(results):
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "lif_partial.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tetherpy-site", default=None)
    parser.add_argument("--write-table", action="store_true",
                        help="write the sweep's winners to src/tether/kernels/launch_lif.json and time those")
    args = parser.parse_args()
    run_benchmark(args)
