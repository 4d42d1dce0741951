"""The spiking block's fused ops against the unfused ones they replace, in the whole training step (GPU).

Variants of the default spiking LM (bf16 autocast, AdamW; benchmarks.bench_lm.measure_training), beside the
softmax baseline of the same size in the same run:
- ``unfused``: LayerNorm, then the LIF (the normalised input stored between them), attention output scaled
  by plain ops (its fp32 input kept for backward), q/k/v kept as bf16 for the attention backward;
- ``fused`` (what ships): ``norm_lif``, ``output_scale``, q/k/v kept as bits (``binary=True``).
Reported: ms a step, tokens/s, peak memory and bytes saved for backward per token.

Run, from the repository root: PYTHONPATH=src:. python -m benchmarks.bench_block_ops
Writes block_ops.json and .md under benchmarks/results (or $OUT).
"""
import contextlib
import sys

import torch

import tether.nn.attention as attention
from benchmarks.bench_lm import measure_training, saved_per_token
from benchmarks.common import markdown_table, write_results
from tether.functional import lif, spike_attention_qkv
from tether.models import LMConfig


def _unfused_norm_lif(self, x, membrane=None):
    """NormLIF.forward as two ops: the normalised input is stored for the LIF's backward."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    spikes, membrane = lif(self.norm(x).to(dtype), self.decay, self.threshold, membrane, surrogate=self.surrogate)
    self.rate = spikes.detach().mean(dtype=torch.float32)
    return spikes, membrane


def _plain_scale(out, gamma, dtype=None):
    return (out * (1 - gamma)[:, None]).to(out.dtype if dtype is None else dtype)


@contextlib.contextmanager
def unfused():
    """The block as it was before the fused ops (restored on exit)."""
    saved = attention.NormLIF.forward, attention.output_scale, attention.ATTENTION_OPS["fused"]
    attention.NormLIF.forward, attention.output_scale = _unfused_norm_lif, _plain_scale
    attention.ATTENTION_OPS["fused"] = spike_attention_qkv
    try:
        yield
    finally:
        attention.NormLIF.forward, attention.output_scale, attention.ATTENTION_OPS["fused"] = saved


PLAN = [(64, ("eager", "compile + cuda graph")), (256, ("eager", "compile + cuda graph"))]


def run(plan=PLAN, iters: int = 10) -> list:
    rows = []
    for variant, mixer, scope in (("unfused", "spiking", unfused), ("fused", "spiking", contextlib.nullcontext),
                                  ("softmax", "softmax", contextlib.nullcontext)):
        with scope():
            saved = saved_per_token(LMConfig(mixer=mixer)) / 1024
            for batch, paths in plan:
                for path in paths if mixer == "spiking" else ("eager", "compile + cuda graph"):
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
    if not torch.cuda.is_available():
        sys.exit("bench_block_ops: needs a CUDA GPU")
    torch.manual_seed(0)
    rows = run()
    table = ("Default model (d_model 384, 4 layers, 8 heads, 256 tokens), bf16 autocast, AdamW; median of 3 rounds "
             "of 10 steps. `unfused`: LayerNorm then LIF, plain output scale, q/k/v kept in bf16; `fused`: "
             "norm_lif, output_scale, q/k/v kept as bits. `saved_kib_per_token`: activations kept for backward per "
             "token, all layers.\n\n"
             + markdown_table(rows, ["variant", "batch", "path", "ms_per_step", "tokens_per_s", "peak_mib",
                                     "saved_kib_per_token", "vs_softmax_eager", "memory_vs_softmax_same_path"]))
    print(write_results("block_ops", {"training": rows}, table))
    print(table)


if __name__ == "__main__":
    main()
