"""Generate text from a checkpoint, one character at a time with the model's carried state (O(1) per token).

    tether generate --checkpoint DIR --prompt "ROMEO:" --tokens 500 [--temperature 0.8 --top-k 40]
"""
import argparse
import sys
from typing import Callable, Optional

import torch

from tether import checkpoint
from tether.data import Vocab


@torch.no_grad()
def sample(model, vocab: Vocab, prompt: str, tokens: int, temperature: float = 0.8, top_k: Optional[int] = 40,
           generator: Optional[torch.Generator] = None, on_text: Optional[Callable[[str], None]] = None) -> str:
    """prompt followed by `tokens` sampled characters; on_text(ch) sees each character as it is made."""
    if not prompt:
        raise ValueError("prompt: expected at least one character, got an empty string")
    if tokens < 0:
        raise ValueError(f"tokens: expected a count >= 0, got {tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k: expected a positive integer or None, got {top_k}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = vocab.encode(prompt, "prompt").to(device)  # [len(prompt)]
    state = model.init_state(1, device)
    # The prompt goes through step too: the state after it is exactly what a full forward would carry.
    for token in ids:
        logits, state = model.step(token.view(1), state)  # [1, V]
    out = []
    for _ in range(tokens):
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [1, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).view(1)  # [1]
        char = vocab.chars[token.item()]
        out.append(char)
        if on_text is not None:
            on_text(char)
        logits, state = model.step(token, state)
    model.train(was_training)
    return prompt + "".join(out)


def load(ckpt_dir, device):
    """(model, vocab) from a checkpoint directory written by tether train."""
    from tether.models import LMConfig, build_model

    config = checkpoint.load_config(ckpt_dir)
    model = build_model(LMConfig.from_dict(config["model"])).to(device)
    checkpoint.load_weights(ckpt_dir, model, device)
    return model, Vocab(config["vocab"])


def build_parser(parser: argparse.ArgumentParser = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="tether generate", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="directory written by tether train (its --out)")
    p.add_argument("--prompt", default="ROMEO:", help="text to start from")
    p.add_argument("--tokens", type=int, default=500, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest characters (0: all)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=1337)
    return p


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, vocab = load(args.checkpoint, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)

    def stream(char: str) -> None:
        sys.stdout.write(char)
        sys.stdout.flush()

    text = sample(model, vocab, args.prompt, args.tokens, args.temperature, args.top_k or None, generator, stream)
    sys.stdout.write("\n")
    return text


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
