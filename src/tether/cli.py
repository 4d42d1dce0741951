"""The ``tether`` command: ``tether train ...``, ``tether generate ...`` and ``tether eval ...``.

A user error (a bad flag value, a missing or corrupt checkpoint, a missing corpus) prints one line,
``tether train: --grad-clip: expected > 0, got -1.0``, on stderr and exits 2; ``--debug`` prints the traceback
first. Other exceptions are bugs and propagate with their traceback. Ctrl-C exits 130 (SIGTERM 143).
"""
import argparse
import re
import sys
import traceback

from tether.data import DataError

# What the checks of arguments, corpus and checkpoint raise; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, DataError)
USAGE_EXIT = 2
_INVALID_VALUE = re.compile(r"argument (\S+): invalid (\w+) value: (.*)")


class UsageError(ValueError):
    """argparse's complaint, raised instead of printing the usage and exiting."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        invalid = _INVALID_VALUE.fullmatch(message)
        if invalid:  # "argument --grad-clip: invalid float value: 'x'" -> the "expected ..., got ..." form
            flag, kind, value = invalid.groups()
            message = f"{flag}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {value}"
        message = message.removeprefix("argument ")
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_debug(parser: argparse.ArgumentParser, default=False) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on a user error, print the traceback too")


def call(prog: str, parse, run) -> int:
    """run(parse()) as a command: the exit code, one line on stderr for a user error (2)."""
    debug = False
    try:
        args = parse()
        debug = args.__dict__.pop("debug", False)
        code = run(args)
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: {err}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        return 130
    return code or 0


def command(prog: str, build_parser, run, argv=None, description: str = None) -> int:
    """``python -m tether.train`` / ``tether.generate``: the subcommand's parser, with --debug."""
    parser = Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    build_parser(parser)
    add_debug(parser)
    return call(prog, lambda: parser.parse_args(argv), run)


def main(argv=None) -> int:
    from tether import evaluate, generate, train

    parser = Parser(prog="tether", description="Spiking language models with Triton kernels.")
    add_debug(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    subparsers = {
        "train": train.build_parser(commands.add_parser("train", help="train a char-level LM on any text",
                                                        description=train.__doc__,
                                                        formatter_class=argparse.RawDescriptionHelpFormatter)),
        "generate": generate.build_parser(commands.add_parser("generate", help="stream text from a checkpoint",
                                                              description=generate.__doc__,
                                                              formatter_class=argparse.RawDescriptionHelpFormatter)),
        "eval": evaluate.build_parser(commands.add_parser("eval", help="validation loss by position, long contexts",
                                                          description=evaluate.__doc__,
                                                          formatter_class=argparse.RawDescriptionHelpFormatter)),
    }
    for sub in subparsers.values():
        add_debug(sub, default=argparse.SUPPRESS)  # `tether train --debug` too, without hiding `tether --debug`
    # The program name of an error: the subcommand's, once argv says which.
    argv = sys.argv[1:] if argv is None else argv
    named = next((a for a in argv if a in subparsers), None)
    prog = subparsers[named].prog if named else parser.prog
    runs = {"train": train.run, "generate": lambda args: generate.run(args) and 0,
            "eval": lambda args: evaluate.run(args) and 0}

    def run(args):
        return runs[args.__dict__.pop("command")](args)

    return call(prog, lambda: parser.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
