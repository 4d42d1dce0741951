"""Train the default spiking LM on TinyShakespeare (same as ``tether train``; takes the same flags).

    python examples/train_stories.py [--device cpu] [--mixer softmax] [--data PATH] ...
"""
import sys

from tether.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
