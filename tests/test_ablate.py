"""benchmarks.ablate: runs `tether train` side by side and tabulates their validation losses (CPU, tiny runs)."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ablate(tmp_path, *argv):
    env = {**os.environ, "OUT": str(tmp_path / "results"), "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, "-m", "benchmarks.ablate", "--runs-dir", str(tmp_path / "runs"), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True)


def test_two_runs_side_by_side(tmp_path, corpus):
    tiny = (f"--data {corpus} --device cpu --block-size 16 --batch-size 2 --d-model 32 --n-layer 1 "
            "--eval-interval 2 --eval-iters 1 --sample-tokens 0")
    out = ablate(tmp_path, "--steps", "2", "--budget", "1", "--name", "abl",
                 "--run", f"base={tiny}", "--run", f"spike_values={tiny} --values spikes --decay 0.5")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "abl.json").read_text())
    rows = {row["run"]: row for row in result["runs"]}
    assert set(rows) == {"base", "spike_values"}
    for row in rows.values():
        assert row["exit"] == 0 and row["steps"] == 2 and 0 < row["best_val_loss"] < 10
    config = json.loads((tmp_path / "runs" / "abl" / "spike_values" / "summary.json").read_text())["model"]
    assert config["values"] == "spikes" and config["decay"] == 0.5
    with tarfile.open(tmp_path / "results" / "abl_logs.tar.gz") as tar:
        assert {"abl/base.log", "abl/spike_values.log"} <= set(tar.getnames())
    assert "| spike_values |" in (tmp_path / "results" / "abl.md").read_text()
    assert (tmp_path / "results" / "abl.png").stat().st_size > 0  # every run's validation curve
    out = ablate(tmp_path, "--name", "again", "--replot", str(tmp_path / "results" / "abl_logs.tar.gz"), "--only", "base")
    assert out.returncode == 0 and (tmp_path / "results" / "again.png").stat().st_size > 0, out.stderr[-3000:]
    out = ablate(tmp_path, "--name", "x", "--replot", str(tmp_path / "results" / "abl_logs.tar.gz"), "--only", "nope")
    assert out.returncode == 2 and "--only: no metrics for ['nope']" in out.stderr


def test_bad_run_is_refused(tmp_path):
    out = ablate(tmp_path, "--run", "no-equals-sign")
    assert out.returncode == 2 and "--run: expected NAME=FLAGS" in out.stderr and "Traceback" not in out.stderr
