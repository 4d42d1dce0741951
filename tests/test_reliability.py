"""Reliability of the commands: one-line user errors (exit 2, --debug for the traceback), every numeric flag
checked before any work, checkpoints written and verified as one unit, SIGTERM saves at a step boundary,
an existing run is not overwritten."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tether import checkpoint, cli, generate, train
from tether.data import CharCorpus, Vocab
from tether.models import LMConfig, build_model
from test_train import cli_env


def run_cli(capsys, argv, main=cli.main):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("argv, flag", [
    (["train", "--grad-clip", "x"], "--grad-clip: expected a float, got 'x'"),
    (["train", "--mixer", "foo"], "--mixer: invalid choice"),
    (["train", "--device", "cpu", "--block-size", "0"], "--block-size: expected a positive integer, got 0"),
    (["generate"], "the following arguments are required: --checkpoint"),
    ([], "required: command"),
])
def test_user_error_is_one_line_exit_2(capsys, argv, flag):
    code, err = run_cli(capsys, argv)
    prog = "tether " + argv[0] if argv else "tether"
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: ") and flag in err, err


def test_debug_shows_the_traceback(capsys, tmp_path):
    for argv, main in ((["--debug", "generate", "--checkpoint", str(tmp_path)], cli.main),
                       (["generate", "--checkpoint", str(tmp_path), "--debug"], cli.main),
                       (["--checkpoint", str(tmp_path), "--debug"], generate.main),
                       (["--device", "cpu", "--lr", "0", "--debug"], train.main)):
        code, err = run_cli(capsys, argv, main)
        assert code == 2 and "Traceback" in err, argv
        assert err.splitlines()[-1].startswith("tether "), err


def test_a_bug_is_not_swallowed(monkeypatch):
    def bug(args):
        raise TypeError("a real bug")

    monkeypatch.setattr(train, "run", bug)
    with pytest.raises(TypeError, match="a real bug"):
        cli.main(["train"])


def test_keyboard_interrupt_exits_130(monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "run", interrupted)
    assert cli.main(["generate", "--checkpoint", "x"]) == 130


@pytest.mark.parametrize("flag, value, expected", [
    ("--grad-clip", "0", "--grad-clip: expected > 0, got 0.0"),
    ("--grad-clip", "nan", "--grad-clip: expected > 0, got nan"),
    ("--n-layer", "0", "--n-layer: expected a positive integer, got 0"),
    ("--warmup-iters", "-1", "--warmup-iters: expected >= 0, got -1"),
    ("--sample-tokens", "-5", "--sample-tokens: expected >= 0, got -5"),
    ("--lr", "0", "--lr: expected > 0, got 0.0"),
    ("--lr", "-1e-3", "--lr: expected > 0, got -0.001"),
    ("--weight-decay", "-0.1", "--weight-decay: expected >= 0, got -0.1"),
    ("--dropout", "1", "--dropout: expected a rate in [0, 1), got 1.0"),
    ("--dropout", "-0.1", "--dropout: expected a rate in [0, 1), got -0.1"),
    ("--decay", "1.5", "--decay: expected a membrane decay in [0, 1], got 1.5"),
    ("--threshold", "0", "--threshold: expected a firing threshold > 0, got 0.0"),
    ("--threshold", "nan", "--threshold: expected a firing threshold > 0, got nan"),
    ("--d-model", "60", "--d-model: expected a positive multiple of the 8 heads, got 60"),
    ("--d-model", "-8", "--d-model: expected a positive multiple of the 8 heads, got -8"),
    ("--max-iters", "0", "--max-iters: expected a positive integer, got 0"),
    ("--ttt-mini-batch", "0", "--ttt-mini-batch: expected a positive integer, got 0"),
    ("--time-budget", "0", "--time-budget: expected positive minutes, got 0.0"),
    ("--block-size", "1000000000", "--block-size: expected a batch that fits in memory, got 1000000000 tokens"),
])
def test_numeric_flags_are_checked_before_any_work(capsys, monkeypatch, tmp_path, flag, value, expected):
    def no_work(*args, **kwargs):
        raise AssertionError("the corpus was loaded before the flags were checked")

    monkeypatch.setattr(train.CharCorpus, "load", no_work)
    code, err = run_cli(capsys, ["train", "--device", "cpu", "--out", str(tmp_path / "run"), f"{flag}={value}"])
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1 and err.startswith(f"tether train: {expected}")
    assert not (tmp_path / "run").exists()


def test_memory_estimate_names_the_sizes(monkeypatch):
    monkeypatch.setattr(train, "available_memory", lambda device: 2**30)
    args = train.build_parser().parse_args(["--device", "cpu", "--block-size", "4096", "--batch-size", "64",
                                            "--d-model", "256"])
    with pytest.raises(ValueError, match=r"--block-size: .* ~ \d+\.\d GiB of activations, 1\.0 GiB available on cpu"):
        train.resolve_args(args, train.pick_device("cpu"))


@pytest.mark.parametrize("flag, value, expected", [
    ("--tokens", "-1", "--tokens: expected a count >= 0, got -1"),
    ("--temperature", "0", "--temperature: expected > 0, got 0.0"),
    ("--top-k", "-2", "--top-k: expected a count >= 0 (0: all characters), got -2"),
    ("--batch", "0", "--batch: expected a positive number of samples, got 0"),
    ("--prompt", "", "--prompt: expected at least one character, got an empty string"),
])
def test_generate_flags_are_checked_before_the_checkpoint(capsys, tmp_path, flag, value, expected):
    code, err = run_cli(capsys, ["generate", "--checkpoint", str(tmp_path / "none"), f"{flag}={value}"])
    assert code == 2 and err == f"tether generate: {expected}\n"


def test_generate_on_a_missing_cuda_device(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    code, err = run_cli(capsys, ["generate", "--checkpoint", str(tmp_path), "--device", "cuda"])
    assert code == 2 and err == "tether generate: --device: expected cpu on this machine (no CUDA device), got cuda\n"


VOCAB = Vocab("".join(sorted(set("ROMEO: wherefore"))))


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run directory with a checkpoint at step 3 and a best/ at step 2."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = build_model(LMConfig(vocab_size=len(VOCAB), n_layer=1, d_model=16, block_size=16, dropout=0.0))
    config = {"model": model.cfg.to_dict(), "vocab": VOCAB.chars, "train": {}}
    checkpoint.save_weights(tmp_path / "best", model, config, 2)
    checkpoint.save(tmp_path, model, config, {"step": 3})
    return tmp_path


def test_checkpoint_unit_and_manifest(run_dir):
    unit = run_dir / "checkpoint"
    assert sorted(p.name for p in run_dir.iterdir()) == ["best", "checkpoint"]  # no temp dirs left
    manifest = json.loads((unit / "manifest.json").read_text())
    assert manifest["step"] == 3 and sorted(manifest["files"]) == ["config.json", "model.safetensors", "state.pt"]
    assert json.loads((run_dir / "best" / "manifest.json").read_text())["step"] == 2
    for path in (run_dir, unit, run_dir / "best"):  # generate takes the run, its checkpoint or best/
        model, vocab = generate.load(path, "cpu")
        assert vocab.chars == VOCAB.chars
    assert checkpoint.find(run_dir, "--resume", need_state=True) == unit
    with pytest.raises(checkpoint.CheckpointError, match="has no state.pt"):
        checkpoint.find(run_dir / "best", "--resume", need_state=True)


@pytest.mark.parametrize("damage", ["corrupt", "missing", "no-manifest"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(run_dir, damage, capsys):
    unit = run_dir / "checkpoint"
    if damage == "corrupt":
        with (unit / "state.pt").open("r+b") as f:
            f.seek(100)
            f.write(b"\xff\x00")
        message = f"--resume: checkpoint {unit / 'state.pt'} is corrupt (sha256 mismatch); delete {unit}"
    elif damage == "missing":
        (unit / "state.pt").unlink()
        message = f"--resume: checkpoint {unit / 'state.pt'} is missing; delete {unit}"
    else:
        (unit / "manifest.json").unlink()
        message = f"--resume: expected a checkpoint with manifest.json"
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.find(run_dir, "--resume", need_state=True)
    assert str(err.value).startswith(message), str(err.value)
    code, err = run_cli(capsys, ["train", "--resume", "--out", str(run_dir)])  # one line, no traceback
    assert code == 2 and err.startswith(f"tether train: {message}") and err.count("\n") == 1


def test_a_torn_save_is_ignored_or_recovered(run_dir):
    unit, tmp, old = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"
    # a save that died while writing: a partial temp dir beside the checkpoint, ignored on load
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.find(run_dir, "--resume", need_state=True) == unit
    # a save that died between its renames: only checkpoint.old, which is read, and restored by the next save
    shutil.copytree(unit, old)
    shutil.rmtree(unit)
    assert checkpoint.find(run_dir, "--resume", need_state=True) == old
    model, _ = generate.load(run_dir, "cpu")
    checkpoint.save(run_dir, model, checkpoint.load_config(old), {"step": 4})
    assert sorted(p.name for p in run_dir.iterdir()) == ["best", "checkpoint"]
    assert checkpoint.load_state(checkpoint.find(run_dir, "--resume", need_state=True))["step"] == 4


def test_a_failed_save_keeps_the_previous_checkpoint(run_dir, monkeypatch):
    def disk_full(obj, path):
        raise OSError("No space left on device")

    model, _ = generate.load(run_dir, "cpu")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        checkpoint.save(run_dir, model, checkpoint.load_config(run_dir / "checkpoint"), {"step": 9})
    monkeypatch.undo()
    unit = checkpoint.find(run_dir, "--resume", need_state=True)
    assert checkpoint.load_state(unit)["step"] == 3


def final_weights(out):
    import safetensors.torch

    return safetensors.torch.load_file(str(out / "checkpoint" / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = final_weights(a), final_weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def train_in_process(argv):
    return train.train(train.build_parser().parse_args(argv))


def test_sigterm_stops_at_the_step_boundary_and_resumes_bit_identically(tmp_path, tiny, monkeypatch, in_process):
    full, out = tmp_path / "full", tmp_path / "stopped"
    train_in_process([*tiny, "--out", str(full)])
    batch, train_batches = CharCorpus.batch, []

    def sigterm_during_step_13(self, split, *args, **kwargs):
        if split == "train":
            train_batches.append(1)
            if len(train_batches) == 14:
                os.kill(os.getpid(), signal.SIGTERM)  # the step finishes; the loop stops before step 14
        return batch(self, split, *args, **kwargs)

    monkeypatch.setattr(CharCorpus, "batch", sigterm_during_step_13)
    with pytest.raises(train.Stop) as stopped:
        train_in_process([*tiny, "--out", str(out)])
    assert stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with the loop
    assert checkpoint.load_state(out / "checkpoint")["step"] == 14
    monkeypatch.setattr(CharCorpus, "batch", batch)
    train_in_process(["--resume", "--out", str(out)])
    assert_same_weights(out, full)


def test_sigterm_to_a_training_process(tmp_path, tiny, in_process):
    args = [*tiny, "--max-iters", "150", "--eval-interval", "50", "--d-model", "32", "--n-layer", "1"]
    full, out = tmp_path / "full", tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "tether.cli", "train", *args, "--out", str(out)],
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and '"split": "train"' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "interrupted: checkpoint at step" in err
    step = checkpoint.load_state(out / "checkpoint")["step"]
    assert 5 <= step < 150
    train_in_process(["--resume", "--out", str(out)])
    train_in_process([*args, "--out", str(full)])
    assert_same_weights(out, full)


def test_an_existing_run_is_not_overwritten(run_dir, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the corpus was loaded before --out was checked")

    monkeypatch.setattr(train.CharCorpus, "load", no_work)
    code, err = run_cli(capsys, ["train", "--device", "cpu", "--out", str(run_dir)])
    assert code == 2 and err == (f"tether train: --out: expected a directory without a run, got {run_dir} holding "
                                 f"one (checkpoint, best); pass --resume to continue it or --force to replace it\n")
    assert checkpoint.load_state(run_dir / "checkpoint")["step"] == 3


def test_force_replaces_the_run(run_dir, tiny, in_process):
    (run_dir / "summary.json").write_text("stale")
    (run_dir / "notes.txt").write_text("not the run's")
    train_in_process([*tiny, "--max-iters", "2", "--sample-tokens", "1", "--out", str(run_dir), "--force"])
    assert checkpoint.load_state(run_dir / "checkpoint")["step"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert (run_dir / "notes.txt").read_text() == "not the run's"


@pytest.fixture
def env_corpus_run(tmp_path, tiny, corpus, monkeypatch, in_process):
    """(run, its corpus): a finished 2-step run whose corpus (a copy of the made-up one) came from TETHER_DATA,
    not --data; TETHER_DATA is unset again after it, and there is no download to fall back on."""
    out, data = tmp_path / "run", tmp_path / "play.txt"
    shutil.copyfile(corpus, data)
    monkeypatch.setenv("TETHER_DATA", str(data))
    argv = [a for a in tiny if a not in ("--data", str(corpus))]
    train_in_process([*argv, "--max-iters", "2", "--sample-tokens", "1", "--out", str(out)])
    monkeypatch.delenv("TETHER_DATA")
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "empty-cache"))
    return out, data


def test_resume_uses_the_corpus_the_run_recorded(env_corpus_run, tmp_path):
    run, data = env_corpus_run
    config = checkpoint.load_config(run / "checkpoint")
    assert config["corpus"]["path"] == str(data) == config["train"]["data"]
    assert train.main(["--resume", "--out", str(run), "--max-iters", "3"]) == 0
    assert checkpoint.load_state(run / "checkpoint")["step"] == 3
    copy = tmp_path / "copy.txt"  # the same text elsewhere is the same corpus
    shutil.copyfile(data, copy)
    assert train.main(["--resume", "--out", str(run), "--data", str(copy), "--max-iters", "4"]) == 0
    assert checkpoint.load_state(run / "checkpoint")["step"] == 4


def test_resume_on_other_text_is_refused(env_corpus_run, tmp_path, capsys):
    run, data = env_corpus_run
    other = tmp_path / "other.txt"
    other.write_text(data.read_text() + "more\n")
    recorded = hashlib.sha256(data.read_bytes()).hexdigest()
    code, err = run_cli(capsys, ["--resume", "--out", str(run), "--data", str(other)], train.main)
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    assert (code, err) == (2, f"tether train: --data: expected the text the run was trained on ({data}, sha256 "
                              f"{recorded}), got {other} with sha256 {digest}; resuming on other text is refused: "
                              f"drop --data, or start a new run with --force\n")
    data.unlink()
    code, err = run_cli(capsys, ["--resume", "--out", str(run)], train.main)
    assert (code, err) == (2, f"tether train: --resume: expected the run's corpus at {data} (recorded in its "
                              f"checkpoint), got no file there; pass --data with a copy of it\n")
    assert checkpoint.load_state(run / "checkpoint")["step"] == 2
