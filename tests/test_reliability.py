"""Reliability of the commands: one-line user errors (exit 2, --debug for the traceback), every numeric flag
checked before any work, checkpoints written and verified as one unit, SIGTERM saves at a step boundary,
an existing run is not overwritten."""
import pytest

from tether import cli, generate, train


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
    ("--d-model", "60", "--d-model: expected a positive multiple of the 8 heads, got 60"),
    ("--d-model", "-8", "--d-model: expected a positive multiple of the 8 heads, got -8"),
    ("--max-iters", "0", "--max-iters: expected a positive integer, got 0"),
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
