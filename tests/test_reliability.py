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
                       (["--device", "cpu", "--block-size", "0", "--debug"], train.main)):
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
