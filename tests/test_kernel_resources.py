"""The spiking LM step's Triton kernels compiled for sm_90a without a GPU (benchmarks.kernel_resources): none
spills registers to local memory or sits at the 255-register cap, at the launch configs of batch 64 and 256
(the shipped tables pick other rows for other neuron counts), with LayerNorm then lif and with the fused norm
(norm_lif). Spills and shuffles in its backward made norm_lif 9x slower (docs/norm_lif.md); this catches the
next such regression on CI. The tool runs in a subprocess: here the kernels are defined for the interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def kernel_rows(*flags):
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--json", "--batch", "64,256",
                          "--block-size", "8", *flags], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode and "no bundled cuobjdump" in out.stderr:
        pytest.skip("this Triton has no bundled cuobjdump")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("fuse_norm", [False, True])
def test_spiking_step_kernels_do_not_spill(fuse_norm):
    rows = kernel_rows(*(["--fuse-norm"] if fuse_norm else []))
    neurons = ("norm_lif_fwd_kernel", "norm_lif_bwd_kernel") if fuse_norm else ("lif_fwd_kernel", "lif_bwd_kernel")
    expected = {"pack_kernel", "unpack_kernel", "_chunk_forward_kernel", "_chunk_backward_kernel", *neurons}
    for batch in (64, 256):
        names = {r["kernel"] for r in rows if r["batch"] == batch}
        assert expected <= names, f"batch {batch}: kernels compiled {sorted(names)}"
    for r in rows:
        assert r["local"] == 0 and r["regs"] < 255, r
