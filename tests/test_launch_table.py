"""The LIF launch table: one file, src/tether/kernels/launch_lif.json, shipped with the package and read by
tether.kernels.lif at import; every row is a launch the kernels accept."""
import fnmatch
import json
from importlib import resources
from pathlib import Path

import pytest

from tether.kernels import lif as kernels

ROOT = Path(__file__).resolve().parents[1]


def test_the_kernels_use_the_shipped_file():
    shipped = resources.files("tether.kernels").joinpath(kernels.LAUNCH_FILE)
    assert shipped.is_file()
    assert kernels.LAUNCH == kernels.read_launch_table()
    assert kernels.read_launch_table(ROOT / "src/tether/kernels/launch_lif.json") == kernels.LAUNCH


def test_the_file_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["tether.kernels"]
    assert any(fnmatch.fnmatch(kernels.LAUNCH_FILE, p) for p in patterns)


def test_every_kernel_and_dtype_has_rows():
    assert set(kernels.LAUNCH) == {(k, size) for k in ("forward", "backward") for size in (4, 2)}


@pytest.mark.parametrize("key", sorted(kernels.LAUNCH))
def test_every_row_is_a_valid_launch(key):
    rows = kernels.LAUNCH[key]
    min_ns = [row[0] for row in rows]
    assert min_ns == sorted(min_ns, reverse=True) and min_ns[-1] == 0, f"{key}: rows must end with min N 0"
    for min_n, block, chunk, warps in rows:
        assert warps >= 1 and block & (block - 1) == 0 and block % (32 * warps) == 0, (key, block, warps)
        assert chunk % 2 == 0 and 32 % chunk == 0, (key, chunk)


@pytest.mark.parametrize("N", [1, 49_999, 50_000, 10**7])
def test_launch_config_reads_the_table(N):
    for (kernel, size), rows in kernels.LAUNCH.items():
        expected = next(row[1:] for row in rows if N >= row[0])
        assert kernels.launch_config(kernel, N, size) == expected


def test_the_sweep_writes_the_same_format(tmp_path):
    try:  # the repository root is on sys.path under `python -m pytest` (the README's command)
        from benchmarks import bench_lif
    except ModuleNotFoundError as err:
        if err.name != "benchmarks":
            raise
        pytest.skip("the benchmarks package is not importable: run python -m pytest from the repository root")
    path = tmp_path / "launch_lif.json"
    bench_lif.write_launch_table(kernels.LAUNCH, path)
    assert path.read_text() == (ROOT / "src/tether/kernels/launch_lif.json").read_text()
    assert json.loads(path.read_text())["about"]
