"""The ``tether`` command: ``tether train ...`` and ``tether generate ...``.

A user's mistake (a bad flag value, a missing or wrong file) prints one line, ``tether train: --grad-clip:
expected ...``, and exits 2; ``--debug`` shows the traceback instead.
"""
import argparse
import sys

from tether import generate, train
from tether.data import DataError

USER_ERRORS = (ValueError, FileNotFoundError, DataError)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tether", description="Spiking language models with Triton kernels.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    train.build_parser(commands.add_parser("train", help="train a char-level LM on TinyShakespeare",
                                           description=train.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    generate.build_parser(commands.add_parser("generate", help="stream text from a checkpoint",
                                              description=generate.__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    command, debug = args.__dict__.pop("command"), args.__dict__.pop("debug")
    try:
        if command == "train":
            return train.run(args)
        generate.run(args)
        return 0
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"tether {command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
