"""Shared benchmark plumbing (see ../shared/BENCHMARKS.md): timing, memory, ceilings, result files, launch-table
overrides for sweeps."""
import contextlib
import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def lif_launch(table: dict):
    """Run the LIF kernels with `table` ({(kernel, element bytes): [(min N, BLOCK, CHUNK, WARPS)]}, a sweep's
    candidate) in place of the shipped table (tether/kernels/launch_lif.json), which is back on exit. For
    sweeps only: published numbers time the shipped table."""
    from tether.kernels import lif as kernels

    shipped = kernels.LAUNCH
    kernels.LAUNCH = table
    try:
        yield
    finally:
        kernels.LAUNCH = shipped


@contextlib.contextmanager
def norm_lif_launch(rows: list):
    """Run the fused LayerNorm -> LIF kernels with `rows` ([(min N, BLOCK, WARPS, SEG)], a sweep's candidate) in place
    of the shipped rows (launch_lif.json's "norm_lif"), which are back on exit. For sweeps only."""
    from tether.kernels import norm_lif as kernels

    shipped = kernels.LAUNCH
    kernels.LAUNCH = rows
    try:
        yield
    finally:
        kernels.LAUNCH = shipped


def write_launch_file(lif_table: dict, norm_lif_rows: list, path=None, about=None) -> Path:
    """Write the shipped launch file (src/tether/kernels/launch_lif.json, or path): the LIF table
    ({(kernel, element bytes): rows}, one line per kernel and size) and norm_lif's rows (one line), with the
    shipped file's "about" unless about is given. The one writer of that file (bench_lif, bench_norm_lif)."""
    from tether.kernels import lif as kernels

    shipped = Path(kernels.__file__).with_name(kernels.LAUNCH_FILE)
    about = json.loads(shipped.read_text())["about"] if about is None else about
    lines = ["{", f'  "about": {json.dumps(about)},']
    for kernel in ("forward", "backward"):
        rows = [f'    "{size}": {json.dumps([list(row) for row in lif_table[kernel, size]])}' for size in (4, 2)]
        lines += [f'  "{kernel}": {{', ",\n".join(rows), "  },"]
    lines.append(f'  "norm_lif": {json.dumps([list(row) for row in norm_lif_rows])}')
    path = Path(path or shipped)
    path.write_text("\n".join(lines + ["}"]) + "\n")
    print("wrote", path, flush=True)
    return path


def environment() -> dict:
    """What the numbers were measured on."""
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def rel_err(got, want) -> float:
    """Norm-wise relative error of got against want, in fp64."""
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median time of fn in milliseconds (CUDA events, via triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs (saved_tensors_hooks)."""
    total = 0
    seen = set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def peak_extra_bytes(fn) -> int:
    """Peak allocated CUDA memory while fn() runs, above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def ceilings() -> dict:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s) of this GPU."""
    src = torch.empty(2**30 // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * 4 / ms / 1e6
    del src, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    return {"copy_gbs": copy_gbs, "bf16_matmul_tflops": 2 * n**3 / ms / 1e9}


def markdown_table(rows: list, columns: list) -> str:
    """rows: list of dicts; columns: keys to show, in order."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, table: str, out_dir=None) -> Path:
    """Write <name>.json and <name>.md (environment header + table) under benchmarks/results or out_dir."""
    out = Path(out_dir or os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    env = payload.setdefault("environment", environment())
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    header = f"# {name}\n\n{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}\n\n"
    (out / f"{name}.md").write_text(header + table + "\n")
    return out / f"{name}.md"
