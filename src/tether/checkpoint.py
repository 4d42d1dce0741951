"""Checkpoints as one unit: a directory holding ``model.safetensors`` (weights), ``config.json`` (model config,
vocabulary, train arguments), ``state.pt`` (optimizer, schedule, step, RNG states; absent from a weights-only
unit such as a run's ``best/``) and ``manifest.json`` (the step and each file's sha256 and size).

A run keeps its checkpoint in ``<out>/checkpoint``. A save never leaves a torn checkpoint in place:

1. the files and the manifest are written (and fsync'd) into a fresh ``<unit>.tmp`` beside the target;
2. the previous ``<unit>`` is renamed to ``<unit>.old``;
3. ``<unit>.tmp`` is renamed to ``<unit>``;
4. ``<unit>.old`` is deleted, its manifest first (a half-deleted unit is no checkpoint).

A crash between 2 and 3 leaves no ``<unit>`` but a complete ``<unit>.old``: loading reads it, and the next save
renames it back first. Any ``<unit>.tmp`` is a save that did not finish: loading ignores it, a save deletes it.
Loading checks the manifest (every file present, every checksum equal) and refuses anything else with a
message naming the file and what to do.

Fault injection, for tests: ``TETHER_FAULT=<point>:<n>[:<signal>]`` sends this process SIGKILL (or the named
signal, e.g. SIGTERM) the n-th time it reaches ``point``. The points of a save of ``<unit>`` (``checkpoint``,
``best``) are ``<unit>/<file>`` (the file just written; SIGKILL cuts it to half its bytes first, as a kill
mid-write leaves it), ``<unit>/written`` (all files and the manifest written, nothing renamed),
``<unit>/renamed-old`` (between the two renames), ``<unit>/renamed-new`` (after both) and
``<unit>/deleting-old`` (``<unit>.old`` without its manifest); tether.train adds ``step`` (after each training
step). Unset, reaching a point is one environment lookup.
"""
import collections
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import torch

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.pt"
MANIFEST = "manifest.json"
CHECKPOINT = "checkpoint"  # a run's checkpoint: <out>/checkpoint


_faults_reached = collections.Counter()  # point -> times this process reached it, while TETHER_FAULT is set


def fault(point: str, written: Path = None) -> None:
    """The TETHER_FAULT signal (module docstring) if this is its point and occurrence; ``written``: the file just
    written, which SIGKILL cuts to half its bytes first."""
    spec = os.environ.get("TETHER_FAULT")
    if spec is None:
        return
    name, n, *signal_name = spec.split(":")
    if name != point:
        return
    _faults_reached[point] += 1
    if _faults_reached[point] != int(n):
        return
    signum = signal.Signals[signal_name[0] if signal_name else "SIGKILL"]
    if written is not None and signum == signal.SIGKILL:
        os.truncate(written, written.stat().st_size // 2)
    os.kill(os.getpid(), signum)


class CheckpointError(ValueError):
    """A checkpoint that is missing a file, corrupt, or of the old layout; the message says what to do."""


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError("checkpoints need safetensors: pip install 'tether[train]'") from err
    return safetensors.torch


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(unit: Path, suffix: str) -> Path:
    return unit.with_name(unit.name + suffix)


def _save_unit(unit, writers: dict, step) -> None:
    """writers: file name -> write(path). Written into <unit>.tmp, then swapped in (module docstring)."""
    unit = Path(unit)
    tmp, old = _sibling(unit, ".tmp"), _sibling(unit, ".old")
    unit.parent.mkdir(parents=True, exist_ok=True)
    if not unit.exists() and old.is_dir():
        os.replace(old, unit)  # a crash after step 2 of the last save: its old unit is the checkpoint
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    files = {}
    for name, write in writers.items():
        write(tmp / name)
        fault(f"{unit.name}/{name}", tmp / name)
        _fsync(tmp / name)
        files[name] = {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
    fault(f"{unit.name}/{MANIFEST}", tmp / MANIFEST)
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    fault(f"{unit.name}/written")
    if unit.exists():
        os.replace(unit, old)
    fault(f"{unit.name}/renamed-old")
    os.replace(tmp, unit)
    _fsync(unit.parent)
    fault(f"{unit.name}/renamed-new")
    if old.exists():
        (old / MANIFEST).unlink(missing_ok=True)
        fault(f"{unit.name}/deleting-old")
        shutil.rmtree(old)


def _writers(model: torch.nn.Module, config: dict) -> dict:
    st = _safetensors()
    # save_model drops tied duplicates (embedding = head weight) that save_file refuses.
    return {WEIGHTS: lambda p: st.save_model(model, str(p)),
            CONFIG: lambda p: p.write_text(json.dumps(config, indent=2))}


def save_weights(unit_dir, model: torch.nn.Module, config: dict, step=None) -> None:
    """Weights + config only, as the unit ``unit_dir``: enough for ``tether generate``, not for ``--resume``."""
    _save_unit(unit_dir, _writers(model, config), step)


def save(run_dir, model: torch.nn.Module, config: dict, state: dict) -> None:
    """The run's checkpoint, ``<run_dir>/checkpoint``. model: the bare module (not DDP / compiled); config:
    JSON-able; state: anything torch.save takes, with the "step"."""
    writers = {**_writers(model, config), STATE: lambda p: torch.save(state, p)}
    _save_unit(Path(run_dir) / CHECKPOINT, writers, state.get("step"))


def find(path, what: str = "--checkpoint", need_state: bool = False) -> Path:
    """The verified unit at ``path``: a unit itself (``best/``, ``checkpoint/``) or a run directory holding
    ``checkpoint/``. ``what`` names the flag in errors; ``need_state``: a unit that can be resumed."""
    path = Path(path)
    # <unit>.old: a save stopped between its two renames (module docstring)
    candidates = [path, path / CHECKPOINT, path / (CHECKPOINT + ".old")] + [_sibling(path, ".old")] * (not path.exists())
    for candidate in candidates:
        if (candidate / MANIFEST).is_file():
            return verify(candidate, what, need_state)
    fix = f"delete {path} to start over" if what == "--resume" else "point --checkpoint at a directory tether train wrote"
    for torn in (path / (CHECKPOINT + ".tmp"), _sibling(path, ".tmp")):
        if torn.is_dir():
            raise CheckpointError(f"{what}: expected a complete checkpoint, got only {torn}, a save that did not "
                                  f"finish (the run stopped before its first checkpoint); {fix}")
    for unit in (path, path / CHECKPOINT):
        if (unit / WEIGHTS).is_file() or (unit / CONFIG).is_file():
            raise CheckpointError(f"{what}: expected a checkpoint with {MANIFEST} (written by this version of "
                                  f"tether train), got {unit} without one: an older layout or a torn copy; {fix}")
    raise FileNotFoundError(f"{what}: expected a checkpoint directory ({MANIFEST}) or a run directory holding "
                            f"{CHECKPOINT}/, got neither at {path}")


def verify(unit: Path, what: str, need_state: bool = False) -> Path:
    """unit, if its manifest's files are all there with their checksums; else a CheckpointError."""
    manifest = json.loads((unit / MANIFEST).read_text())
    files = manifest["files"]
    restore = f"delete {unit} to start over or restore a copy"
    for name in (WEIGHTS, CONFIG, STATE) if need_state else (WEIGHTS, CONFIG):
        if name not in files:
            raise CheckpointError(f"{what}: checkpoint {unit} has no {name} (a weights-only checkpoint?); "
                                  f"expected one written by tether train with its {name}")
    for name, entry in files.items():
        path = unit / name
        if not path.is_file():
            raise CheckpointError(f"{what}: checkpoint {path} is missing; {restore}")
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{what}: checkpoint {path} is corrupt (sha256 mismatch); {restore}")
    return unit


def load_config(unit) -> dict:
    """From a unit that find() returned."""
    return json.loads((Path(unit) / CONFIG).read_text())


def load_weights(unit, model: torch.nn.Module, device) -> None:
    _safetensors().load_model(model, str(Path(unit) / WEIGHTS), device=str(device))


def load_state(unit) -> dict:
    return torch.load(Path(unit) / STATE, map_location="cpu", weights_only=False)
