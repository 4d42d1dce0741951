"""The ``tether`` command: ``tether train ...`` and ``tether generate ...``."""
import argparse
import sys

from tether import generate, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tether", description="Spiking language models with Triton kernels.")
    commands = parser.add_subparsers(dest="command", required=True)
    train.build_parser(commands.add_parser("train", help="train a char-level LM on TinyShakespeare",
                                           description=train.__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    generate.build_parser(commands.add_parser("generate", help="stream text from a checkpoint",
                                              description=generate.__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    command = args.__dict__.pop("command")
    if command == "train":
        return train.run(args)
    generate.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
