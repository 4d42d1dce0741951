"""The spiking block's fused ops against the unfused ones they replace, in the whole training step (GPU).

Variants of the default spiking LM (bf16 autocast, AdamW; benchmarks.bench_lm.measure_training), beside the
softmax baseline of the same size in the same run:
- ``unfused``: LayerNorm, then the LIF (the normalised input stored between them), attention output scaled
  by plain ops (its fp32 input kept for backward), q/k/v kept as bf16 for the attention backward;
- ``shipped``: the model as tether.nn builds it (LayerNorm, then the LIF; ``output_scale``; q/k/v kept as bits);
- ``fused``: the shipped model with ``NormLIF(fuse_norm=True)`` (``norm_lif``: the normalised input never stored).
Reported: ms a step, tokens/s, peak memory and bytes saved for backward per token.

Run, from the repository root: PYTHONPATH=src:. python -m benchmarks.bench_block_ops [--variants shipped,fused]
[--paths "compile + cuda graph"] (default: every variant and path; softmax always runs beside them)
Writes block_ops.json and .md under benchmarks/results (or $OUT).
"""
import argparse
import contextlib
import functools
import sys

import torch

import tether.nn.attention as attention
from benchmarks.bench_lm import measure_training, saved_per_token
from benchmarks.common import markdown_table, write_results
from tether.functional import spike_attention_qkv
from tether.models import LMConfig


def _plain_scale(out, gamma, dtype=None):
    return (out * (1 - gamma)[:, None]).to(out.dtype if dtype is None else dtype)


@contextlib.contextmanager
def _patched(target, **attrs):
    """Set attributes of target for the duration (restored on exit)."""
    saved = {name: getattr(target, name) for name in attrs}
    for name, value in attrs.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(target, name, value)


def unfused():
    """The block before its memory ops: plain output scale, q/k/v kept as they are."""
    return _patched(attention, output_scale=_plain_scale,
                    ATTENTION_OPS={**attention.ATTENTION_OPS, "fused": spike_attention_qkv})


def fused():
    """Every NormLIF built inside is NormLIF(..., fuse_norm=True)."""
    return _patched(attention.NormLIF, __init__=functools.partialmethod(attention.NormLIF.__init__, fuse_norm=True))


PATHS = ("eager", "compile + cuda graph")
PLAN = [(64, PATHS), (256, PATHS)]
VARIANTS = {"unfused": unfused, "shipped": contextlib.nullcontext, "fused": fused}


def run(plan=PLAN, iters: int = 10, variants=tuple(VARIANTS)) -> list:
    rows = []
    for variant, mixer, scope in ([(v, "spiking", VARIANTS[v]) for v in variants]
                                  + [("softmax", "softmax", contextlib.nullcontext)]):
        with scope():
            saved = saved_per_token(LMConfig(mixer=mixer)) / 1024
            for batch, paths in plan:
                for path in paths if mixer == "spiking" else PATHS:
                    row = measure_training(LMConfig(mixer=mixer), batch, path, iters)
                    row.update(variant=variant, saved_kib_per_token=saved)
                    rows.append(row)
                    print({k: row[k] for k in ("variant", "batch", "path", "ms_per_step", "peak_mib")}, flush=True)
                    torch._dynamo.reset()
    for row in rows:
        same = [r for r in rows if r["variant"] == "softmax" and r["batch"] == row["batch"]]
        eager = [r for r in same if r["path"] == "eager"]
        path = [r for r in same if r["path"] == row["path"]]
        row["vs_softmax_eager"] = row["tokens_per_s"] / eager[0]["tokens_per_s"] if eager else None
        row["memory_vs_softmax_same_path"] = row["peak_mib"] / path[0]["peak_mib"] if path else None
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated, of " + ", ".join(PATHS))
    args = parser.parse_args()
    variants, paths = args.variants.split(","), tuple(args.paths.split(","))
    for name, given, allowed in (("--variants", variants, VARIANTS), ("--paths", paths, PATHS)):
        if not set(given) <= set(allowed):
            parser.error(f"{name}: expected some of {', '.join(allowed)}, got {', '.join(given)}")
    if not torch.cuda.is_available():
        sys.exit("bench_block_ops: needs a CUDA GPU")
    torch.manual_seed(0)
    rows = run([(batch, paths) for batch, _ in PLAN], variants=variants)
    table = ("Default model (d_model 384, 4 layers, 8 heads, 256 tokens), bf16 autocast, AdamW; median of 3 rounds "
             "of 10 steps. `unfused`: LayerNorm then LIF, plain output scale, q/k/v kept in bf16; `shipped`: "
             "LayerNorm then LIF, output_scale, q/k/v kept as bits; `fused`: shipped with norm_lif. "
             "`saved_kib_per_token`: activations kept for backward per "
             "token, all layers.\n\n"
             + markdown_table(rows, ["variant", "batch", "path", "ms_per_step", "tokens_per_s", "peak_mib",
                                     "saved_kib_per_token", "vs_softmax_eager", "memory_vs_softmax_same_path"]))
    print(write_results("block_ops", {"training": rows}, table))
    print(table)


if __name__ == "__main__":
    main()
