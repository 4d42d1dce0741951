"""tether.train.RunState: the state.pt layout is written and read by the same class, RNG and optimizer included."""
import argparse
import random

import pytest
import torch

from tether.train import RunState

ARGS = argparse.Namespace(lr=1e-3, warmup_iters=2, max_iters=10, time_budget=1.0, seed=7)


def _optimizer():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return optimizer


def test_save_then_restore_is_the_same_run():
    optimizer = _optimizer()
    run = RunState(step=5, elapsed_s=2.0, train_time_s=1.5, tokens_seen=80, best_val=(3.2, 4))
    saved = run.save(optimizer, ARGS, torch.device("cpu"))
    assert list(saved) == ["step", "elapsed_s", "train_time_s", "tokens_seen", "optimizer", "schedule", "rng",
                           "data", "best_val"]  # the keys of the checkpoints written before RunState
    want_torch, want_python = torch.rand(3), random.random()
    other = _optimizer()
    back = RunState.restore(saved, other, torch.device("cpu"), started=run.started)
    assert torch.equal(torch.rand(3), want_torch) and random.random() == want_python  # RNGs continue as saved
    assert (back.step, back.train_time_s, back.tokens_seen, back.best_val) == (5, 1.5, 80, (3.2, 4))
    assert back.elapsed_s == saved["elapsed_s"] >= 2.0
    assert other.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])


def test_restore_without_best_val_and_a_wrong_data_position():
    saved = RunState(step=3).save(_optimizer(), ARGS, torch.device("cpu"))
    del saved["best_val"]  # a checkpoint from before --patience
    assert RunState.restore(saved, _optimizer(), torch.device("cpu"), started=0.0).best_val == (float("inf"), 0)
    saved["data"]["next_step"] = 2
    with pytest.raises(ValueError, match="--resume: expected a checkpoint whose data position is its step 3"):
        RunState.restore(saved, _optimizer(), torch.device("cpu"), started=0.0)
