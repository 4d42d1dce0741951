"""Fault injection (issue 11): the CPU training run killed with SIGKILL between steps and inside each file write
and rename of a checkpoint save, or stopped by SIGINT / SIGTERM, then resumed with --resume to the end: the final
weights and optimizer state are bit-identical to the uninterrupted run's, and every resume starts from one whole
saved step, never a mix of two. The signals come from checkpoint.fault (TETHER_FAULT, see tether.checkpoint).

Each stopped run is a child process of a forkserver that imported torch and tether once (a fresh interpreter per
run would spend most of its time importing); the child runs the CLI as ``tether train`` does, with one thread.
"""
import hashlib
import json
import multiprocessing
import os
import signal
import sys

import pytest
import torch

from conftest import pytorch_path_one_thread
from tether import checkpoint, cli, train
from test_reliability import assert_same_weights

# 6 steps with a checkpoint at steps 2, 4 and 6 (the end): a kill in the second save has a complete one behind it.
# The long time budget keeps the lr a function of the step alone.
FAULT_RUN = ["--d-model", "16", "--n-layer", "1", "--batch-size", "4", "--block-size", "8", "--max-iters", "6",
             "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1", "--warmup-iters", "2",
             "--sample-tokens", "1", "--time-budget", "100"]
KILLED = -signal.SIGKILL
FORKSERVER = multiprocessing.get_context("forkserver")
PRELOAD = ["tether.cli", "tether.train", "tether.generate", "torch._dynamo", "safetensors.torch", "matplotlib.pyplot"]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_in_process(argv):
    return train.train(train.build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def args(tiny):
    return [*tiny, *FAULT_RUN]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, args):
    """The run without faults: (its directory, step -> sha256 of the weights it saved at that step)."""
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    weights, save = {}, checkpoint.save

    def recording_save(run_dir, model, config, state):
        save(run_dir, model, config, state)
        weights[state["step"]] = sha256(run_dir / checkpoint.CHECKPOINT / checkpoint.WEIGHTS)

    with pytorch_path_one_thread(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "save", recording_save)
        train_in_process([*args, "--out", str(out)])
    assert sorted(weights) == [2, 4, 6]
    return out, weights


def train_with_fault(argv, fault: str, log: str) -> None:
    """In the child: ``tether train argv`` on the PyTorch path with one thread, TETHER_FAULT=fault, output to log."""
    os.environ.update(TRITON_INTERPRET="0", TETHER_FAULT=fault)
    torch.set_num_threads(1)
    with open(log, "w") as f:
        os.dup2(f.fileno(), sys.stdout.fileno())
        os.dup2(f.fileno(), sys.stderr.fileno())
    sys.exit(cli.main(["train", *argv]))


def run_with_fault(args, out, fault: str):
    """(exit code, output) of the run stopped by fault; a signal's exit code is minus its number."""
    FORKSERVER.set_forkserver_preload(PRELOAD)  # before the first run starts the forkserver
    log = out.with_name(out.name + ".log")
    child = FORKSERVER.Process(target=train_with_fault, args=([*args, "--out", str(out)], fault, str(log)))
    child.start()
    child.join(120)
    return child.exitcode, log.read_text()


def assert_same_final_state(a, b):
    assert_same_weights(a, b)
    state_a, state_b = (checkpoint.load_state(run / checkpoint.CHECKPOINT) for run in (a, b))
    assert state_a["step"] == state_b["step"]
    opt_a, opt_b = state_a["optimizer"], state_b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"] and opt_a["state"].keys() == opt_b["state"].keys()
    for index, moments in opt_a["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)


@pytest.mark.parametrize("fault, exit_code, resumed_at", [
    ("step:3", KILLED, 2),  # between steps: back to the last checkpoint
    ("step:3:SIGTERM", 143, 3),  # at the next step boundary: a checkpoint of step 3
    ("step:3:SIGINT", 130, 3),
    ("checkpoint/model.safetensors:2", KILLED, 2),  # a file of the second save (step 4) half written
    ("checkpoint/config.json:2", KILLED, 2),
    ("checkpoint/state.pt:2", KILLED, 2),
    ("checkpoint/manifest.json:2", KILLED, 2),
    ("checkpoint/written:2", KILLED, 2),  # complete in checkpoint.tmp, not renamed
    ("checkpoint/renamed-old:2", KILLED, 2),  # only checkpoint.old holds a checkpoint
    ("checkpoint/renamed-new:2", KILLED, 4),
    ("checkpoint/deleting-old:1", KILLED, 4),  # the first save has no old one
    ("checkpoint/state.pt:3", KILLED, 4),  # the final save
    ("checkpoint/state.pt:2:SIGTERM", 143, 4),  # the save finishes, the loop stops after it
])
def test_a_stopped_run_resumes_bit_identically(uninterrupted, args, tmp_path, fault, exit_code, resumed_at):
    full, weights = uninterrupted
    out = tmp_path / "stopped"
    code, output = run_with_fault(args, out, fault)
    assert code == exit_code, output[-3000:]
    unit = checkpoint.find(out, "--resume", need_state=True)  # every file matches the manifest
    manifest = json.loads((unit / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == checkpoint.load_state(unit)["step"] == resumed_at
    if exit_code == KILLED:  # one of the uninterrupted run's checkpoints, whole
        assert manifest["files"][checkpoint.WEIGHTS]["sha256"] == weights[resumed_at]
    with pytorch_path_one_thread():
        train_in_process(["--resume", "--out", str(out)])
    assert_same_final_state(out, full)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_a_kill_in_the_first_save_is_refused_not_resumed(args, tmp_path, capsys):
    out = tmp_path / "torn"
    assert run_with_fault(args, out, "checkpoint/state.pt:1")[0] == KILLED
    assert cli.main(["train", "--resume", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"tether train: --resume: expected a complete checkpoint, got only {out / 'checkpoint.tmp'}, a save that "
        f"did not finish (the run stopped before its first checkpoint); delete {out} to start over\n")
