"""`tether train --device cpu` end to end on the made-up corpus (conftest): loss goes down, checkpoint files,
Ctrl-C then --resume continues the same loss curve, generation from the checkpoint, DDP (gloo) == one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tether import cli, train
from tether.data import CharCorpus
FILES = ["checkpoint/model.safetensors", "checkpoint/config.json", "checkpoint/state.pt", "checkpoint/manifest.json",
         "metrics.jsonl", "loss.png", "sample.txt", "summary.json"]


def cli_env():
    # The CLI on a CPU runs the PyTorch path, as a user's would (tests elsewhere cover the interpreter).
    # One thread: these tensors are tiny, and threads only fight the other processes for the cores.
    return {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def records(out: Path, split: str) -> dict:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == split}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """One uninterrupted CLI run; its directory."""
    out = tmp_path_factory.mktemp("run") / "full"
    proc = subprocess.run([sys.executable, "-m", "tether.cli", "train", *tiny, "--out", str(out)],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_cli_train_loss_goes_down_and_writes_everything(trained, corpus):
    for name in FILES:
        assert (trained / name).is_file(), name
    train_loss = records(trained, "train")
    assert sorted(train_loss) == list(range(5, 35, 5))
    assert train_loss[30]["loss"] < train_loss[5]["loss"] - 0.4
    val = records(trained, "val")
    assert sorted(val) == [10, 20, 30] and val[30]["loss"] < val[10]["loss"]
    summary = json.loads((trained / "summary.json").read_text())
    # the final validation: 5x the windows (val_final), and the periodic windows among them (val, the curve)
    assert summary["steps"] == 30 and summary["val_loss"] == records(trained, "val_final")[30]["loss"]
    assert summary["val_loss_periodic"] == val[30]["loss"] and summary["val_loss"] != val[30]["loss"]
    assert summary["firing_rate"] is not None and 0 < summary["firing_rate"] < 1
    assert summary["energy_per_token"]["energy_spiking_j"] > 0
    best = min(val.values(), key=lambda r: r["loss"])
    assert (summary["best_val_loss"], summary["best_val_step"]) == (best["loss"], best["step"])
    assert (trained / "best" / "model.safetensors").is_file() and (trained / "best" / "config.json").is_file()
    config = json.loads((trained / "checkpoint" / "config.json").read_text())
    assert config["model"]["d_model"] == 64
    assert config["vocab"] == "".join(sorted(set(corpus.read_text()))) == config["model"]["vocab"]
    assert config["corpus"]["path"] == str(corpus) == config["train"]["data"]
    assert torch.load(trained / "checkpoint" / "state.pt", weights_only=False)["step"] == 30


def test_interrupt_then_resume_continues_the_curve(trained, tiny, tmp_path, monkeypatch, in_process):
    out = tmp_path / "interrupted"
    batch = CharCorpus.batch
    train_batches = []

    def ctrl_c_at_step_13(self, split, *args, **kwargs):
        if split == "train":
            train_batches.append(1)
            if len(train_batches) == 14:  # Ctrl-C arrives while step 13 starts
                raise KeyboardInterrupt
        return batch(self, split, *args, **kwargs)

    monkeypatch.setattr(CharCorpus, "batch", ctrl_c_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.build_parser().parse_args([*tiny, "--out", str(out)]))
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 13
    monkeypatch.setattr(CharCorpus, "batch", batch)

    train.train(train.build_parser().parse_args(["--resume", "--out", str(out)]))
    resumed, full = records(out, "train"), records(trained, "train")
    assert sorted(resumed) == [5, 10, 15, 20, 25, 30]
    # Same steps, data and RNG streams after the resume: the curve is the uninterrupted one.
    for step in (20, 25, 30):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-4, abs=1e-5), step
    assert records(out, "val")[30]["loss"] == pytest.approx(records(trained, "val")[30]["loss"], rel=1e-4)


@pytest.mark.parametrize("weights", ["run", "last", "best"])
def test_generate_from_the_checkpoint(trained, weights):
    ckpt = {"run": trained, "last": trained / "checkpoint", "best": trained / "best"}[weights]
    proc = subprocess.run([sys.executable, "-m", "tether.cli", "generate", "--checkpoint", str(ckpt),
                           "--prompt", "ROMEO:", "--tokens", "120", "--device", "cpu", "--seed", "1"],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout[:-1]  # the trailing newline
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 120


def test_ddp_gloo_two_processes_match_one(tmp_path, tiny, in_process):
    # Dropout off: the ranks' dropout masks cannot match one process's.
    args = [*tiny, "--max-iters", "4", "--log-interval", "1", "--eval-interval", "100", "--dropout", "0",
            "--sample-tokens", "5"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m",
                           "tether.train", *args, "--out", str(tmp_path / "ddp")],
                          env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train.train(train.build_parser().parse_args([*args, "--out", str(tmp_path / "one")]))
    ddp, one = records(tmp_path / "ddp", "train"), records(tmp_path / "one", "train")
    assert sorted(ddp) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        assert ddp[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4), step
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)


def test_error_saves_the_last_step_and_propagates(tmp_path, tiny, monkeypatch, in_process):
    out = tmp_path / "failed"
    batch = CharCorpus.batch
    calls = []

    def fail_at_step_7(self, split, *args, **kwargs):
        calls.append(split)
        if calls.count("train") == 8:
            raise RuntimeError("disk on fire")
        return batch(self, split, *args, **kwargs)

    monkeypatch.setattr(CharCorpus, "batch", fail_at_step_7)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train.train(train.build_parser().parse_args([*tiny, "--out", str(out)]))
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 7
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "checkpoint" / "config.json").is_file()


def test_train_on_any_text_then_generate_from_it(tmp_path, tiny, capsys, in_process):
    text = "".join(f"{word} {i % 7} fox\n" for i, word in enumerate(["quick", "brown", "lazy", "jumps"] * 60))
    (tmp_path / "any.txt").write_text(text, encoding="utf-8")  # no ROMEO: in its characters
    out = tmp_path / "any"
    assert cli.main(["train", *tiny, "--max-iters", "4", "--eval-interval", "2", "--data", str(tmp_path / "any.txt"),
                     "--out", str(out)]) == 0
    vocab = "".join(sorted(set(text)))
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["vocab"] == config["model"]["vocab"] == vocab and config["model"]["vocab_size"] == len(vocab)
    assert set((out / "sample.txt").read_text()) <= set(vocab)
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(out), "--prompt", "fox", "--tokens", "30", "--device", "cpu"]) == 0
    generated = capsys.readouterr().out
    assert generated.startswith("fox") and len(generated) == len("fox") + 30 + 1 and set(generated) <= set(vocab)


def test_spiking_model_defaults_by_device():
    """The GPU run trains the model of LMConfig's defaults (real values, decay 0.25); the CPU run keeps spike
    values and decay 0.5, which train better in its 3 minutes (benchmarks/results/cpu_values_ab/); flags win."""
    from tether.models import LMConfig

    assert (train.GPU_DEFAULTS["values"], train.GPU_DEFAULTS["decay"]) == (LMConfig.values, LMConfig.decay)
    args = train.resolve_args(train.build_parser().parse_args(["--device", "cpu"]), train.pick_device("cpu"))
    cfg = train.model_config(args, "abc")
    assert (cfg.values, cfg.decay) == ("spikes", 0.5)
    args = train.resolve_args(train.build_parser().parse_args(["--device", "cpu", "--values", "real", "--decay", "0.1"]),
                              train.pick_device("cpu"))
    assert (train.model_config(args, "abc").values, train.model_config(args, "abc").decay) == ("real", 0.1)
