"""Tether: fused Triton kernels for linear-time sequence models (spiking transformers and TTT-MLP)."""
import os

__version__ = "0.1.0"

# Before torch loads OpenMP: its idle threads then sleep instead of spinning. A CPU training step is many
# small ops between parallel matmuls, and on a shared or busy machine the spinning threads took the cores
# from the thread with the work: 2-core steps ran 5-17x slower (benchmarks/results/cpu_train.md). An
# OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tether import functional, nn  # noqa: E402,F401
