"""Probe (GPU): the default models' training step under inductor / partitioner settings, one row each.

Run, from the repository root: PYTHONPATH=src python -m benchmarks.probe_compile VARIANT [VARIANT ...]
with VARIANT = mixer:batch:path:setting (path of bench_lm.PATHS, setting of SETTINGS), for example
"spiking:256:compile + cuda graph:coord". Prints one dict a variant (bench_lm.measure_training's row plus
the setting); results/compile_settings.md is read from two such runs.
"""
import sys
from dataclasses import replace

import torch

from benchmarks.bench_lm import measure_training
from tether.models import LMConfig
from tether.step import COMPILE_OPTIONS

# setting -> {"inductor": torch.compile options (instead of the shipped COMPILE_OPTIONS; none: torch's
# defaults), "functorch": a torch._functorch.config patch}
SETTINGS = {
    "default": {},
    "coord": {"inductor": {"coordinate_descent_tuning": True}},
    "moff": {"inductor": {"triton.mix_order_reduction": False}},
    "msplit": {"inductor": {"triton.mix_order_reduction_autotune_split_size": True}},
    "mapw": {"inductor": {"max_autotune_pointwise": True}},
    "moff_mapw": {"inductor": COMPILE_OPTIONS},  # the shipped settings
    "budget05": {"functorch": {"activation_memory_budget": 0.5}},
    "budget08": {"functorch": {"activation_memory_budget": 0.8}},
}


def main():
    for variant in sys.argv[1:]:
        mixer, batch, path, setting = variant.split(":")
        patches = SETTINGS[setting]
        torch._dynamo.reset()
        with torch._functorch.config.patch(patches.get("functorch", {})):
            try:
                row = measure_training(replace(LMConfig(), mixer=mixer), int(batch), path, 10,
                                       compile_options=patches.get("inductor", {}))
            except Exception as e:  # one failing variant must not lose the others' rows
                row = {"mixer": mixer, "error": repr(e)[:300]}
        row["setting"] = setting
        print(row, flush=True)


if __name__ == "__main__":
    main()
