"""Validation loss by position over long sequences: how a model uses context past its training length.

    tether eval --checkpoint DIR [--checkpoint DIR2 ...] --context 256,1024,4096 [--plot loss_vs_position.png]

Each checkpoint is scored on ``--sequences`` windows of ``max(--context)`` tokens from the validation split
(evenly spaced, the same for every checkpoint), and its loss is reported at each context length ``c`` as the
mean loss over positions ``[c / 2, c)`` (so a cold start at position 0 does not flatter the longer contexts).

- The spiking mixer reads every window in one pass from a zero state, carrying its membranes and attention
  memory over all of it: position ``p`` sees the ``p`` tokens before it.
- ``--reset-every N`` adds, for each spiking checkpoint, a row with its state reset to zero every N tokens:
  the same model and text without the memory beyond N tokens, so the two rows show what the carried state buys.
- The softmax and TTT-MLP mixers have learned positions up to ``block_size``: they are shown for what they can
  do, a sliding window of ``block_size`` tokens moved by half of it, each token scored once with at least
  ``block_size / 2`` tokens of context (the first window's tokens: what they have).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tether import checkpoint, cli
from tether.data import CharCorpus

PLOT_BIN = 64  # positions per point of the loss-vs-position curve


def parse_contexts(text: str) -> list:
    """"256,1024,4096" -> [256, 1024, 4096]: increasing positive ints."""
    try:
        contexts = [int(c) for c in text.split(",")]
    except ValueError:
        raise ValueError(f"--context: expected comma-separated token counts like 256,1024,4096, got {text!r}") \
            from None
    if any(c < 2 for c in contexts) or contexts != sorted(set(contexts)):
        raise ValueError(f"--context: expected increasing counts >= 2, got {text!r}")
    return contexts


@torch.no_grad()
def position_losses(model, windows: torch.Tensor, batch_size: int, reset_every: int = 0) -> torch.Tensor:
    """windows ``[n, L + 1]`` token ids -> cross-entropy of every next-token prediction ``[n, L]`` (fp32).

    Spiking: one pass over each window (reset_every > 0: one pass per reset_every tokens, each from a zero
    state). Other mixers: a sliding window of ``block_size`` tokens, stride half of it (see the module
    docstring)."""
    from tether.step import autocast

    n, L = windows.shape[0], windows.shape[1] - 1
    device = windows.device
    losses = torch.empty(n, L, device=device)  # [n, L]
    W = model.cfg.block_size
    for rows in torch.arange(n, device=device).split(batch_size):
        x, y = windows[rows, :-1], windows[rows, 1:]  # [b, L]
        if model.max_tokens is None:  # reads any length (the spiking model)
            step = reset_every or L
            spans = [(s, min(s + step, L), s) for s in range(0, L, step)]  # (start, end, first scored position)
        else:
            stride = max(W // 2, 1)
            starts = range(0, max(L - W, 0) + stride, stride)
            spans = [(s, min(s + W, L), 0 if s == 0 else min(s + W - stride, L)) for s in starts]
        for start, end, scored in spans:
            with autocast(device):
                logits, _ = model(x[:, start:end])  # [b, end - start, V]
            ce = F.cross_entropy(logits.float().transpose(1, 2), y[:, start:end], reduction="none")  # [b, span]
            losses[rows, scored:end] = ce[:, scored - start:]
    return losses


def at_contexts(losses: torch.Tensor, contexts: Sequence[int]) -> dict:
    """{c: mean loss over positions [c / 2, c)} for each context length c."""
    return {c: losses[:, c // 2:c].mean().item() for c in contexts}


def curve(losses: torch.Tensor, bin_size: int = PLOT_BIN) -> list:
    """[(first position of the bin, mean loss)] over bins of bin_size positions."""
    L = losses.shape[1]
    return [(p, losses[:, p:p + bin_size].mean().item()) for p in range(0, L, bin_size)]


def _corpus(ckpt: str, data: Optional[str], device) -> CharCorpus:
    """--data, else the corpus the checkpoint's run recorded (when that file is still there), else the one
    tether train finds."""
    if data is None:
        try:
            record = checkpoint.load_config(checkpoint.find(ckpt, "--checkpoint")).get("corpus")
        except (ValueError, FileNotFoundError):  # a save_pretrained directory records no corpus
            record = None
        if record and Path(record["path"]).is_file():
            data = record["path"]
    return CharCorpus.load(data, device)


def evaluate_checkpoint(ckpt: str, contexts: Sequence[int], sequences: int, batch_size: int, device,
                        data: Optional[str] = None, reset_every: int = 0) -> list:
    """One checkpoint's losses at each context length and its curve (see the module docstring); a second
    result with the state reset every ``reset_every`` tokens for a spiking checkpoint when that is > 0."""
    from tether.generate import load

    model, vocab = load(ckpt, device)
    model.eval()
    corpus = _corpus(ckpt, data, device)
    if corpus.vocab.chars != vocab.chars:
        raise ValueError(f"--data: expected the corpus the checkpoint {ckpt} was trained on (its vocabulary of "
                         f"{len(vocab)} characters), got one with {len(corpus.vocab)}")
    val, L = corpus.splits["val"], contexts[-1]
    n = min(sequences, (len(val) - 1) // L)
    if n < 1:
        raise ValueError(f"--context: expected at most {len(val) - 1} tokens (the validation split), got {L}")
    starts = torch.arange(n, device=device) * ((len(val) - 1 - L) // max(n - 1, 1))  # [n], evenly spaced
    windows = val[starts[:, None] + torch.arange(L + 1, device=device)]  # [n, L + 1]
    resets = [0] + ([reset_every] if reset_every and model.max_tokens is None else [])
    results = []
    for reset in resets:
        losses = position_losses(model, windows, batch_size, reset)
        results.append({"checkpoint": str(ckpt), "mixer": model.cfg.mixer, "block_size": model.cfg.block_size,
                        "state": _state_label(model, reset), "sequences": n,
                        "loss_at_context": at_contexts(losses, contexts), "curve": curve(losses)})
    return results


def _state_label(model, reset_every: int) -> str:
    if model.max_tokens is not None:
        return f"sliding {model.max_tokens}-token window"
    return f"reset every {reset_every}" if reset_every else "carried"


def markdown(results: list, contexts: Sequence[int]) -> str:
    head = "| checkpoint | mixer | trained on | state | " + " | ".join(f"loss at {c}" for c in contexts) + " |"
    lines = [head, "|" + "---|" * (4 + len(contexts))]
    for r in results:
        cells = " | ".join(f"{r['loss_at_context'][c]:.4f}" for c in contexts)
        lines.append(f"| {r['checkpoint']} | {r['mixer']} | {r['block_size']} | {r.get('state', '')} | {cells} |")
    return "\n".join(lines)


def plot(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        xs, ys = zip(*r["curve"])
        state = f", {r['state']}" if "state" in r else ""
        ax.plot([x + PLOT_BIN / 2 for x in xs], ys, label=f"{r['mixer']}{state} ({r['checkpoint']})")
    ax.set_xscale("log")
    ax.set_xlabel("position in the sequence (tokens)")
    ax.set_ylabel(f"validation loss (nats/char, mean of {PLOT_BIN} positions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser(parser: argparse.ArgumentParser = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="tether eval", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="directory written by tether train (its --out, checkpoint/ or best/); repeat to compare")
    p.add_argument("--context", default="256,1024,4096", help="context lengths to report, increasing")
    p.add_argument("--sequences", type=int, default=16, help="validation windows of max(--context) tokens")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--reset-every", type=int, default=0,
                   help="also score spiking checkpoints with their state reset every N tokens (0: not)")
    p.add_argument("--data", help="the corpus (default: the one tether train finds)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--json", help="write the results (losses and curves) to this file")
    p.add_argument("--plot", help="write the loss-vs-position plot to this PNG")
    return p


def run(args: argparse.Namespace) -> list:
    from tether.train import pick_device

    contexts = parse_contexts(args.context)
    for flag in ("sequences", "batch"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag}: expected a positive count, got {getattr(args, flag)}")
    if args.reset_every < 0:
        raise ValueError(f"--reset-every: expected a token count >= 0 (0: never), got {args.reset_every}")
    device = pick_device(args.device)
    results = [r for c in args.checkpoint
               for r in evaluate_checkpoint(c, contexts, args.sequences, args.batch, device, args.data,
                                            args.reset_every)]
    print(markdown(results, contexts))
    if args.json:
        Path(args.json).write_text(json.dumps({"contexts": contexts, "results": results}, indent=1))
    if args.plot:
        plot(results, Path(args.plot))
    return results


def main(argv=None) -> int:
    return cli.command("tether eval", build_parser, lambda args: run(args) and 0, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
