"""Ablations of the LM (issue 10): several `tether train` runs side by side on one GPU, same seed and step count,
one table of best / final validation loss.

    python -m benchmarks.ablate --name ablation --steps 6000 --budget 5 \\
        --run base= --run values_real="--values real" --run decay25="--decay 0.25"

Each run is `python -m tether.train --max-iters STEPS --time-budget BUDGET --patience 0 --out OUT/NAME FLAGS`
(the cosine follows the step count as long as the budget is not reached), started at once: their loss curves
compare, their tokens/s do not (they share the GPU). The run directories (weights included) go under --runs-dir;
NAME.json / NAME.md (write_results) and every run's log and metrics in NAME_logs.tar.gz go under $OUT (default
benchmarks/results), with NAME.png: every run's validation loss against the step.

    python -m benchmarks.ablate --name curves --replot A_logs.tar.gz B_logs.tar.gz --only base,values_real

draws that plot again from saved archives (the runs named in --only, default all).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, markdown_table, write_results

COLUMNS = ["run", "flags", "params", "best_val_loss", "best_val_step", "val_loss", "steps", "tokens_per_s",
           "wall_time_s"]


def parse_run(text: str):
    name, sep, flags = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"--run: expected NAME=FLAGS with NAME an identifier, got {text!r}")
    return name, shlex.split(flags)


def val_curve(lines) -> list:
    """metrics.jsonl lines -> [(step, validation loss)] of its periodic validations."""
    rows = (json.loads(line) for line in lines if line.strip())
    return [(r["step"], r["loss"]) for r in rows if r.get("split") == "val"]


def plot_curves(curves: dict, path: Path, title: str) -> None:
    """curves: {run name: [(step, loss)]} -> a PNG of validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        if curve:
            ax.plot(*zip(*curve), marker=".", label=name)
    ax.set(xlabel="step", ylabel="validation loss (nats/char)", title=title)
    losses = [loss for curve in curves.values() for _, loss in curve]
    if losses:  # the part where runs differ: from the best to a little above the end
        ax.set_ylim(min(losses) - 0.01, min(losses) + 0.12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(archives: list, only: list, name: str) -> int:
    curves = {}
    for archive in archives:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                run = Path(member.name).name.removesuffix("_metrics.jsonl")
                if member.name.endswith("_metrics.jsonl") and (not only or run in only):
                    curves[run] = val_curve(tar.extractfile(member).read().decode().splitlines())
    missing = [run for run in only if run not in curves]
    if missing:
        print(f"--only: no metrics for {missing} in {[str(a) for a in archives]}", file=sys.stderr)
        return 2
    results = Path(os.environ.get("OUT") or RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    plot_curves({run: curves[run] for run in (only or curves)}, results / f"{name}.png", name)
    print("wrote", results / f"{name}.png")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=parse_run, action="append", default=[], help="NAME=FLAGS (repeatable)")
    p.add_argument("--replot", nargs="+", type=Path, metavar="ARCHIVE", help="only draw NAME.png from these logs")
    p.add_argument("--only", default="", help="with --replot: the runs to draw, comma-separated (default all)")
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps of every run (the cosine length)")
    p.add_argument("--budget", type=float, default=5.0, help="minutes at most per run")
    p.add_argument("--name", default="ablation", help="result file stem")
    p.add_argument("--note", default="", help="a line for the result file")
    p.add_argument("--runs-dir", default="runs", help="where the runs' directories go (default runs/)")
    args = p.parse_args(argv)
    if args.replot:
        return replot(args.replot, [run for run in args.only.split(",") if run], args.name)
    if not args.run:
        p.error("--run: expected at least one NAME=FLAGS (or --replot ARCHIVE ...)")
    names = [name for name, _ in args.run]
    if len(set(names)) != len(names):
        p.error(f"--run: names must differ, got {names}")

    out = Path(args.runs_dir) / args.name
    out.mkdir(parents=True, exist_ok=True)
    results = Path(os.environ.get("OUT") or RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, flags in args.run:
        cmd = [sys.executable, "-m", "tether.train", "--max-iters", str(args.steps), "--time-budget",
               str(args.budget), "--patience", "0", "--out", str(out / name), "--force", *flags]
        log = open(out / f"{name}.log", "w")
        print(f"[{name}]", shlex.join(cmd), flush=True)
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, flags)
    start = time.time()
    rows = []
    for name, (proc, log, flags) in procs.items():
        code = proc.wait()
        log.close()
        summary_file = out / name / "summary.json"
        row = {"run": name, "flags": " ".join(flags) or "(defaults)", "exit": code}
        if code == 0 and summary_file.exists():
            summary = json.loads(summary_file.read_text())
            row.update({key: summary.get(key) for key in COLUMNS[2:]})
        else:
            print(f"[{name}] failed with exit code {code}; its log: {out / f'{name}.log'}", file=sys.stderr)
        rows.append(row)
        print(f"[{name}] done after {time.time() - start:.0f} s: best {row.get('best_val_loss')}", flush=True)

    with tarfile.open(results / f"{args.name}_logs.tar.gz", "w:gz") as tar:
        for name in names:
            tar.add(out / f"{name}.log", arcname=f"{args.name}/{name}.log")
            metrics = out / name / "metrics.jsonl"
            if metrics.exists():
                tar.add(metrics, arcname=f"{args.name}/{name}_metrics.jsonl")
    header = (f"{len(rows)} `tether train` runs at once on one GPU, {args.steps} steps each (cosine over the steps, "
              f"--patience 0, seed and data the same): their loss curves compare, their tokens/s do not.\n"
              + (f"\n{args.note}\n" if args.note else "") + "\n")
    write_results(args.name, {"steps": args.steps, "budget_min": args.budget, "note": args.note, "runs": rows},
                  header + markdown_table(rows, COLUMNS), out_dir=results)
    curves = {name: val_curve((out / name / "metrics.jsonl").read_text().splitlines())
              for name in names if (out / name / "metrics.jsonl").exists()}
    plot_curves(curves, results / f"{args.name}.png", args.name)
    print(markdown_table(rows, ["run", "best_val_loss", "best_val_step", "val_loss", "steps"]))
    return 0 if all(row["exit"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
