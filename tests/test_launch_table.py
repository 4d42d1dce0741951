"""The launch tables: one file, src/tether/kernels/launch_lif.json, shipped with the package and read by
tether.kernels.lif (the LIF rows) and tether.kernels.norm_lif (the "norm_lif" rows) at import; every row is a
launch the kernels accept."""
import fnmatch
import importlib
import json
from importlib import resources
from pathlib import Path

import pytest

from tether.kernels import lif as kernels
from tether.kernels import norm_lif as norm_kernels

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


def _bench(name):
    try:  # the repository root is on sys.path under `python -m pytest` (the README's command)
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as err:
        if err.name != "benchmarks":
            raise
        pytest.skip("the benchmarks package is not importable: run python -m pytest from the repository root")


def test_the_sweep_writes_the_same_format(tmp_path):
    bench_lif = _bench("bench_lif")
    path = tmp_path / "launch_lif.json"
    bench_lif.write_launch_table(kernels.LAUNCH, path)
    assert path.read_text() == (ROOT / "src/tether/kernels/launch_lif.json").read_text()
    assert json.loads(path.read_text())["about"]


# ---- norm_lif ---------------------------------------------------------------------------------------------

def test_norm_lif_reads_the_shipped_file():
    assert norm_kernels.LAUNCH == norm_kernels.read_launch_table()
    assert norm_kernels.read_launch_table(ROOT / "src/tether/kernels/launch_lif.json") == norm_kernels.LAUNCH
    assert json.loads((ROOT / "src/tether/kernels/launch_lif.json").read_text())["norm_lif"]


def test_every_norm_lif_row_is_a_valid_launch():
    rows = norm_kernels.LAUNCH
    min_ns = [row[0] for row in rows]
    assert rows and min_ns == sorted(min_ns, reverse=True) and min_ns[-1] == 0, "rows must end with min N 0"
    assert len(set(min_ns)) == len(min_ns)
    for min_n, block, warps, seg in rows:
        # two neurons a thread at least: with one, Triton lays the tiles' time rows across threads
        assert warps >= 1 and block & (block - 1) == 0 and block % (64 * warps) == 0, (block, warps)
        assert seg in (4, 8, 16, 32), seg


@pytest.mark.parametrize("N", [1, 64 * 384, 131_071, 131_072, 256 * 1536, 10**7])
def test_norm_lif_launch_config_reads_the_table(N, monkeypatch):
    expected = next(row[1:] for row in norm_kernels.LAUNCH if N >= row[0])
    assert norm_kernels.launch_config(N) == expected
    monkeypatch.setattr(norm_kernels, "LAUNCH", [(0, 256, 8, 4)])  # read at call time, not frozen at import
    assert norm_kernels.launch_config(N) == (256, 8, 4)


def test_norm_lif_launch_swap_restores_the_table():
    common = _bench("common")
    shipped = norm_kernels.LAUNCH
    with pytest.raises(RuntimeError):
        with common.norm_lif_launch([(0, 64, 1, 8)]):
            assert norm_kernels.launch_config(10**6) == (64, 1, 8)
            raise RuntimeError
    assert norm_kernels.LAUNCH is shipped


FAKE_SHAPES = [(256, 64, 384), (256, 64, 1152), (256, 64, 1536), (256, 256, 384), (256, 256, 1536)]


def fake_sweep():
    """Fake timings: at N >= 131072 (B*C) (256, 4) is fastest in sum, below (64, 1)."""
    rows = []
    for T, B, C in FAKE_SHAPES:
        N = B * C
        for block, warps, seg in [(64, 1, 8), (64, 1, 16), (128, 2, 8), (256, 4, 16), (256, 4, 8)]:
            ms = 1.0 + abs(block - (256 if N >= 131_072 else 64)) / 64 + warps / 100 + seg / 1000
            rows.append({"T": T, "B": B, "C": C, "N": N, "BLOCK": block, "WARPS": warps, "SEG": seg,
                         "fwd_bwd_ms": ms})
    return rows


def test_norm_lif_sweep_picks_winners_per_range():
    bench = _bench("bench_norm_lif")
    winners = bench.pick_winners(fake_sweep(), (131_072, 0))
    assert winners == [(131_072, 256, 4, 8), (0, 64, 1, 8)]
    # the lowest summed time over a range's shapes, not the most per-shape wins
    rows = [{"N": n, "BLOCK": b, "WARPS": w, "SEG": 16, "fwd_bwd_ms": ms} for n, b, w, ms in
            [(10, 64, 1, 1.0), (20, 64, 1, 1.0), (30, 64, 1, 9.0),
             (10, 128, 2, 1.1), (20, 128, 2, 1.1), (30, 128, 2, 1.1)]]
    assert bench.pick_winners(rows, (0,)) == [(0, 128, 2, 16)]
    # a range no shape falls in takes the next range's winner (the table still ends with min N 0)
    assert bench.pick_winners(fake_sweep(), (10**9, 131_072, 0)) == [(131_072, 256, 4, 8), (0, 64, 1, 8)]
    # a config missing on one of a range's shapes is not compared on a partial sum
    partial = [r for r in fake_sweep() if not ((r["BLOCK"], r["WARPS"], r["SEG"]) == (64, 1, 8) and r["C"] == 1152)]
    assert bench.pick_winners(partial, (131_072, 0))[1][1:] != (64, 1, 8)


def test_norm_lif_sweep_writes_the_shipped_format(tmp_path):
    bench = _bench("bench_norm_lif")
    path = tmp_path / "launch_lif.json"
    bench.write_launch_table(norm_kernels.LAUNCH, path)
    assert path.read_text() == (ROOT / "src/tether/kernels/launch_lif.json").read_text()
    bench.write_launch_table(bench.pick_winners(fake_sweep(), bench.RANGES), path)
    assert norm_kernels.read_launch_table(path) == [(131_072, 256, 4, 8), (0, 64, 1, 8)]
    assert kernels.read_launch_table(path) == kernels.LAUNCH  # the LIF rows are kept
    assert json.loads(path.read_text())["about"] == json.loads(
        (ROOT / "src/tether/kernels/launch_lif.json").read_text())["about"]
