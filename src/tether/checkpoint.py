"""Checkpoints in one directory: ``model.safetensors`` (weights), ``config.json`` (model config, vocabulary,
train arguments) and ``state.pt`` (optimizer, schedule, step, RNG states).

Every file is written to a temporary name and renamed into place, so a crash mid-save leaves the previous
checkpoint readable. ``state.pt`` is renamed last: a resume reads a step only after its weights exist.
"""
import json
import os
from pathlib import Path

import torch

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.pt"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError("checkpoints need safetensors: pip install 'tether[train]'") from err
    return safetensors.torch


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_weights(out_dir, model: torch.nn.Module, config: dict) -> None:
    """Weights + config only: enough for ``tether generate``, not for ``--resume``."""
    st = _safetensors()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # save_model drops tied duplicates (embedding = head weight) that save_file refuses.
    _replace(out / WEIGHTS, lambda p: st.save_model(model, str(p)))
    _replace(out / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2)))


def save(out_dir, model: torch.nn.Module, config: dict, state: dict) -> None:
    """model: the bare module (not DDP / compiled); config: JSON-able; state: anything torch.save takes."""
    save_weights(out_dir, model, config)
    _replace(Path(out_dir) / STATE, lambda p: torch.save(state, p))


def load_config(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: expected a directory with {CONFIG}, got none at {path}")
    return json.loads(path.read_text())


def load_weights(ckpt_dir, model: torch.nn.Module, device) -> None:
    path = Path(ckpt_dir) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: expected {WEIGHTS} in {ckpt_dir}, got no such file")
    _safetensors().load_model(model, str(path), device=str(device))


def load_state(ckpt_dir) -> dict:
    path = Path(ckpt_dir) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: expected {STATE} in {ckpt_dir}, got no such file")
    return torch.load(path, map_location="cpu", weights_only=False)
