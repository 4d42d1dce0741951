"""Registers, spills and shared memory of every Triton kernel a model's training step launches, compiled for
sm_90a (the H100 / H200) on a machine without a GPU.

The model runs forward and backward on the CPU with the kernel paths forced on (`tether.functional` takes them
for CPU tensors here) and Triton's launch replaced by its compile step: each launch compiles the kernel for
sm_90a with this machine's Triton and its bundled ptxas (a stand-in driver answers Triton's device queries),
reads the cubin's resource usage (cuobjdump), and zeroes the launch's tensors in place of running it (the
values are meaningless; the shapes, dtypes and constexprs are the GPU's, so are the launch configs).
A spill (LOCAL > 0) or a register count at the 255 cap is what made norm_lif 9x slower before
(docs/norm_lif.md); tests/test_kernel_resources.py checks the spiking step's kernels on every CI run.

Run, from the repository root, without TRITON_INTERPRET=1 (the kernels must be defined as compiled ones):
PYTHONPATH=src python -m benchmarks.kernel_resources [--mixer spiking] [--batch 64,256] [--block-size 32]
[--fuse-norm] [--ttgir DIR] [--json]
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import replace
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from tether.models import LMConfig, build_model

TARGET = GPUTarget("cuda", 90, 32)  # sm_90a: Triton adds the "a" (wgmma, TMA) for capability 9.0
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
FUNCTIONAL = ("pack", "lif", "spike_attention", "spike_linear", "ttt_mlp", "norm_lif")


class _Sm90Driver:
    """What Triton asks its active driver while it compiles (no launch, no device)."""

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("kernel_resources compiles kernels; it cannot time them")


def resource_usage(kernel) -> dict:
    """{"regs", "local", "stack", "shared"} of a compiled kernel: registers a thread, local-memory (spill) and
    stack bytes from its cubin (cuobjdump --dump-resource-usage), shared-memory bytes a program."""
    if not os.path.exists(CUOBJDUMP):
        raise SystemExit(f"kernel_resources: this Triton has no bundled cuobjdump (looked for {CUOBJDUMP})")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    # shared: what Triton allocates at launch (the cubin's static SHARED is only its reserved 1 KB)
    return {"regs": int(fields["REG"]), "local": int(fields["LOCAL"]), "stack": int(fields["STACK"]),
            "shared": kernel.metadata.shared}


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            yield from _tensors(v)


@contextlib.contextmanager
def compile_only(rows: dict):
    """Inside: every Triton launch compiles for sm_90a and adds its row to rows, keyed by (kernel,
    constexprs), instead of running; tether's kernel paths are taken for CPU tensors."""
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        constexprs = tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))
        key = (self.fn.__name__, constexprs)
        if key not in rows:
            rows[key] = {"kernel": self.fn.__name__, "grid": grid if isinstance(grid, tuple) else "fn",
                         "num_warps": kernel.metadata.num_warps, **resource_usage(kernel),
                         "constexprs": dict(constexprs), "ttgir": kernel.asm["ttgir"]}
        for t in _tensors(list(args) + list(kwargs.values())):  # defined outputs, no NaN checks tripped
            t.data.zero_()  # through .data: autograd's version counters (of saved inputs) stay as they are
        return kernel

    patches = [mock.patch.object(JITFunction, "run", compile_instead),
               mock.patch("tether.kernels.interpreting", lambda: True)]  # Launcher: every call through run
    patches += [mock.patch(f"tether.functional.{name}.use_triton", lambda t: True) for name in FUNCTIONAL]
    driver = triton.runtime.driver
    active = driver._active  # None until a first use; no default driver exists without a GPU
    with contextlib.ExitStack() as stack:
        driver.set_active(_Sm90Driver())
        for p in patches:
            stack.enter_context(p)
        try:
            yield rows
        finally:
            driver._active = active


def step_kernels(cfg: LMConfig, batch: int, fuse_norm: bool = False) -> list:
    """The resource rows of the kernels one training step of cfg's model launches (bf16 autocast, as on the
    GPU), at batch size batch and cfg.block_size tokens."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if fuse_norm:
        for m in model.modules():
            if hasattr(m, "fuse_norm"):
                m.fuse_norm = True
    idx = torch.randint(cfg.vocab_size, (batch, cfg.block_size + 1))  # [B, T + 1]
    rows = {}
    with compile_only(rows), torch.autocast("cpu", torch.bfloat16):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
    return list(rows.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixer", default="spiking")
    parser.add_argument("--batch", default="64", help="batch sizes, comma separated")
    parser.add_argument("--block-size", type=int, default=32, help="tokens (the launch configs depend on the "
                        "neuron count batch x width, not on T)")
    parser.add_argument("--fuse-norm", action="store_true", help="NormLIF(fuse_norm=True): the norm_lif kernels")
    parser.add_argument("--ttgir", help="write each kernel's TTGIR into this folder")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list (no TTGIR)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1: the kernels would be defined for the interpreter; unset it")
    cfg = replace(LMConfig(), mixer=args.mixer, block_size=args.block_size)
    rows = []
    for batch in map(int, args.batch.split(",")):
        rows += [{"batch": batch, **r} for r in step_kernels(cfg, batch, args.fuse_norm)]
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "ttgir"} for r in rows]))
        return
    print(f"triton {triton.__version__}, sm_90a, {args.mixer}{', fuse_norm' if args.fuse_norm else ''}\n")
    print("| batch | kernel | num_warps | regs | spill (local B) | shared B | constexprs |\n|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {r['batch']} | {r['kernel']} | {r['num_warps']} | {r['regs']} | {r['local']} | {r['shared']} | "
              f"{', '.join(f'{k}={v}' for k, v in r['constexprs'].items())} |")
        if args.ttgir:
            os.makedirs(args.ttgir, exist_ok=True)
            with open(os.path.join(args.ttgir, f"{i:02d}_b{r['batch']}_{r['kernel']}.ttgir"), "w") as f:
                f.write(r["ttgir"])


if __name__ == "__main__":
    main()
