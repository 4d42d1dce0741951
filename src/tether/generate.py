"""Generate text from a checkpoint, one character at a time with the model's carried state (O(1) per token).

    tether generate --checkpoint DIR --prompt "ROMEO:" --tokens 500 [--temperature 0.8 --top-k 40]
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from tether import checkpoint, cli
from tether.data import Vocab


def _tensors(state) -> list:
    """The tensors of a model state (nested lists and tuples, or a KVCache), in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if hasattr(state, "tensors"):
        return state.tensors()
    return [t for part in state for t in _tensors(part)]


class Decoder:
    """``model.step`` over a fixed batch with the state in fixed buffers, updated in place.

    ``cuda_graph`` (default: on CUDA): after two eager steps the step is captured as a CUDA graph and
    replayed, so a token costs one replay of host time instead of a forward's worth of launches. A state
    that grows (the TTT-MLP mixer's token context) is replaced on every step and never graphed.
    ``compile``: the step is ``torch.compile``'d first (fewer, fused kernels; the compilation takes seconds).
    ``prefill(idx [B, T])`` and ``step(idx [B])`` return the logits of the last token ``[B, V]`` (a view of a
    fixed buffer when graphed: read it before the next call).
    """

    WARMUP = 2

    def __init__(self, model, batch_size: int, device, cuda_graph: Optional[bool] = None, compile: bool = False):
        self.model, self.device = model, torch.device(device)
        self._step = torch.compile(model.step) if compile else model.step
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph: expected a CUDA device, got {device}")
        self.state = model.init_state(batch_size, self.device)
        self.fixed = not isinstance(self.state, torch.Tensor)  # a token context grows: no fixed buffers
        self.cuda_graph = self.cuda_graph and self.fixed
        self.buffers = _tensors(self.state)
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # [B]
        self.graph, self.logits, self.steps = None, None, 0

    def _keep(self, state) -> None:
        """Copy a state the model returned into the fixed buffers (a KVCache is already them)."""
        if not self.fixed:
            self.state = state
            return
        for buffer, new in zip(self.buffers, _tensors(state)):
            if new is not buffer:
                buffer.copy_(new)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        logits, state = self.model.prefill(idx, self.state)
        self._keep(state)
        return logits

    def _full(self) -> bool:
        """A KVCache whose window is full: the step rebuilds it (host work a graph cannot hold)."""
        return hasattr(self.state, "length") and self.state.length >= self.model.cfg.block_size

    @torch.no_grad()
    def step(self, idx: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        full = self._full()
        if self.graph is None and self.cuda_graph and self.steps > self.WARMUP and not full:
            self._capture(idx)
        if self.graph is None or full:
            logits, state = (self.model.step if full else self._step)(idx, self.state)
            self._keep(state)
            return logits
        self.idx.copy_(idx)
        self.graph.replay()
        if hasattr(self.state, "length"):
            self.state.length += 1  # the captured step advanced the device position; this is its host copy
        return self.logits

    def _capture(self, idx: torch.Tensor) -> None:
        self.idx.copy_(idx)
        length = getattr(self.state, "length", None)
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, state = self._step(self.idx, self.state)
            self._keep(state)
        if length is not None:
            self.state.length = length  # capture ran the host side of the step once, the device side not


def _check_sampling(prompt: str, tokens: int, temperature: float, top_k: Optional[int], batch_size: int) -> None:
    if not prompt:
        raise ValueError("prompt: expected at least one character, got an empty string")
    if tokens < 0:
        raise ValueError(f"tokens: expected a count >= 0, got {tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k: expected a positive integer or None, got {top_k}")
    if batch_size <= 0:
        raise ValueError(f"batch: expected a positive number of samples, got {batch_size}")


@torch.no_grad()
def samples(model, vocab: Vocab, prompt: str, tokens: int, batch_size: int, temperature: float = 0.8,
            top_k: Optional[int] = 40, generator: Optional[torch.Generator] = None,
            on_text: Optional[Callable[[str], None]] = None, cuda_graph: Optional[bool] = None) -> list:
    """``batch_size`` continuations of ``prompt``, each ``tokens`` sampled characters, generated together.
    on_text(ch) sees each character of the first sample as it is made (a sync per token: only then)."""
    _check_sampling(prompt, tokens, temperature, top_k, batch_size)
    device = next(model.parameters()).device
    ids = vocab.encode(prompt, "prompt").to(device)[None].expand(batch_size, -1)  # [B, len(prompt)]
    stream = None if on_text is None else (lambda token: on_text(vocab.chars[token[0].item()]))
    out = model.generate(ids, tokens, temperature, top_k, generator,
                         decoder=Decoder(model, batch_size, device, cuda_graph), on_token=stream)
    return [prompt + vocab.decode(row) for row in out[:, len(prompt):].tolist()]  # out [B, len(prompt) + tokens]


def sample(model, vocab: Vocab, prompt: str, tokens: int, temperature: float = 0.8, top_k: Optional[int] = 40,
           generator: Optional[torch.Generator] = None, on_text: Optional[Callable[[str], None]] = None) -> str:
    """prompt followed by `tokens` sampled characters; on_text(ch) sees each character as it is made."""
    return samples(model, vocab, prompt, tokens, 1, temperature, top_k, generator, on_text)[0]


def load(ckpt_dir, device):
    """(model, vocab) from a directory written by tether train (its --out, or its checkpoint/ or best/), or by
    ``save_pretrained`` of any of the models (``LanguageModel.from_pretrained`` builds the saved mixer's)."""
    from tether.models import LanguageModel, LMConfig, build_model

    hub_config = Path(ckpt_dir) / checkpoint.CONFIG
    if hub_config.is_file() and "cfg" in json.loads(hub_config.read_text()):  # the Hugging Face Hub layout
        model = LanguageModel.from_pretrained(ckpt_dir).to(device)
        if not model.cfg.vocab:
            raise ValueError(f"--checkpoint: expected a model config with its vocabulary, got none in {ckpt_dir}")
        return model, Vocab(model.cfg.vocab)
    unit = checkpoint.find(ckpt_dir, "--checkpoint")
    config = checkpoint.load_config(unit)
    model = build_model(LMConfig.from_dict(config["model"])).to(device)
    checkpoint.load_weights(unit, model, device)
    return model, Vocab(config["vocab"])


def build_parser(parser: argparse.ArgumentParser = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="tether generate", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="directory written by tether train: its --out, or its checkpoint/ or best/")
    p.add_argument("--prompt", default="ROMEO:", help="text to start from")
    p.add_argument("--tokens", type=int, default=500, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest characters (0: all)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--batch", type=int, default=1, help="samples generated together (the first is streamed)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """The sampling flags, before the checkpoint is read (the prompt's characters are checked against it)."""
    if not args.prompt:
        raise ValueError("--prompt: expected at least one character, got an empty string")
    if args.tokens < 0:
        raise ValueError(f"--tokens: expected a count >= 0, got {args.tokens}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature: expected > 0, got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k: expected a count >= 0 (0: all characters), got {args.top_k}")
    if args.batch <= 0:
        raise ValueError(f"--batch: expected a positive number of samples, got {args.batch}")


def run(args: argparse.Namespace) -> str:
    from tether.train import pick_device

    check_args(args)
    device = pick_device(args.device)
    model, vocab = load(args.checkpoint, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)

    def stream(char: str) -> None:
        sys.stdout.write(char)
        sys.stdout.flush()

    texts = samples(model, vocab, args.prompt, args.tokens, args.batch, args.temperature, args.top_k or None,
                    generator, stream)
    sys.stdout.write("\n")
    for i, text in enumerate(texts[1:], 2):
        sys.stdout.write(f"--- sample {i} ---\n{text}\n")
    return texts[0]


def main(argv=None) -> int:
    return cli.command("tether generate", build_parser, lambda args: run(args) and 0, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
