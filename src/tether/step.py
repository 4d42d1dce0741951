"""The training step: forward under autocast, backward, gradient clipping and AdamW, run eagerly or replayed
from a CUDA graph.

A step of the default spiking model launches ~400 kernels; eagerly, the host's Python, autograd and launch
time per step exceeds the GPU's work, so the GPU waits. Captured once as a CUDA graph, a step costs one
replay of host time. The graph needs static shapes and addresses: the batch is copied into fixed input
buffers, the learning rate lives in a device tensor, AdamW runs with ``capturable=True``, and the loss and
firing-rate sums accumulate on the device (read only at log time, so no step waits for the GPU).

The first ``warmup`` steps run eagerly (Triton compiles, AdamW allocates its state, the caching allocator
settles) and are real training steps; the graph is captured at the next one and replayed from then on. The
captured step draws dropout masks from the default CUDA generator like the eager step (graph-safe philox
offsets), so a run's RNG stream is the same either way.
"""
import warnings
from contextlib import nullcontext
from typing import Optional

import torch


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# Inductor settings of the compiled training step on CUDA (benchmarks/results/compile_settings.md):
# inductor's mix-order reduction (a norm's row reductions and its weight-gradient column sums in one kernel)
# ran the LayerNorm backwards of the spiking step ~3x off the copy bandwidth, and pointwise / reduction
# kernels get their launch configs benchmarked (max_autotune_pointwise) instead of guessed.
COMPILE_OPTIONS = {"triton.mix_order_reduction": False, "max_autotune_pointwise": True}


def compile_model(model: torch.nn.Module, device: torch.device, options: Optional[dict] = None):
    """``torch.compile(model)`` for the training step; on CUDA with inductor ``options`` (default
    ``COMPILE_OPTIONS``; the keys this torch's inductor knows: an older one runs its defaults)."""
    if device.type != "cuda":
        return torch.compile(model)
    known = torch._inductor.config.get_config_copy()
    options = COMPILE_OPTIONS if options is None else options
    return torch.compile(model, options={k: v for k, v in options.items() if k in known})


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW, weight decay on matrices only; on CUDA fused and capturable with a device-tensor learning rate,
    so the same optimizer runs eagerly and inside a CUDA graph."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if device.type != "cuda":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
    return torch.optim.AdamW(groups, lr=torch.tensor(lr, device=device), betas=(0.9, 0.99), fused=True,
                             capturable=True)


class TrainStep:
    """``step(x, y, lr)``: one optimizer step on the batch ``x, y [B, T]`` (long) at learning rate ``lr``.

    ``model`` is what runs the forward (the raw model, or its DDP / compiled wrapper); ``raw`` the module whose
    parameters are clipped and whose firing rate is read. ``cuda_graph``: capture the step after ``warmup``
    eager steps (CUDA only). ``loss_sum`` / ``rate_sum`` (0-d fp32 device tensors) sum the loss and the mean
    firing rate over the steps since the last ``take_sums()``.
    """

    def __init__(self, model, raw, optimizer: torch.optim.Optimizer, *, grad_clip: float, device: torch.device,
                 cuda_graph: bool = False, warmup: int = 3):
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph: expected a CUDA device, got {device}")
        self.model, self.raw, self.optimizer = model, raw, optimizer
        self.grad_clip, self.device, self.warmup = grad_clip, device, warmup
        self.cuda_graph = cuda_graph
        if device.type == "cuda":
            # a resumed optimizer's lr may be a float or a CPU tensor: the captured update reads this one
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.rate_sum = torch.zeros((), device=device)
        self.steps_since_sums = 0
        self.rated = False  # whether the model reports a firing rate (the first step finds out)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.eager_steps = 0
        self._side = torch.cuda.Stream(device) if cuda_graph else None

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _step(self, x: torch.Tensor, y: torch.Tensor, zero_grad: bool = True) -> None:
        """The step's work, the same eagerly and under capture: no host syncs. Captured without zero_grad:
        the gradients were None at capture, so each replay's backward writes them afresh."""
        with autocast(self.device):
            _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.grad_clip, foreach=self.device.type == "cuda")
        self.optimizer.step()
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        self.loss_sum += loss.detach().float()
        rate = self.raw.firing_rate()
        if rate is not None:
            self.rated = True
            self.rate_sum += rate.detach().float()

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.clone(), y.clone()  # the graph's input buffers [B, T]
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(self.graph):
            self._step(self.x, self.y, zero_grad=False)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        # contiguous always: a compiled model guards on strides, and the graph's buffers are contiguous clones
        # (a window view of the corpus is not), so the capture must see what the warm-up steps compiled for
        x, y = x.contiguous(), y.contiguous()
        self._set_lr(lr)
        self.steps_since_sums += 1
        if self.graph is not None:
            self.x.copy_(x)
            self.y.copy_(y)
            self.graph.replay()
            return
        if not self.cuda_graph:
            self._step(x, y)
            return
        if self.eager_steps < self.warmup:
            # warm-up steps on a side stream, as torch.cuda.graphs asks: the capture then finds no work from
            # the ambient stream in its memory pool
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                self._step(x, y)
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            self.eager_steps += 1
            return
        try:
            self._capture(x, y)
        except RuntimeError as err:  # said once, then the eager step: slower, the same function
            warnings.warn(f"TrainStep: CUDA graph capture failed ({str(err).splitlines()[0]}); "
                          "training on without the graph (--no-cuda-graph skips the attempt)")
            self.graph, self.cuda_graph = None, False
            torch.cuda.synchronize(self.device)
            self.optimizer.zero_grad(set_to_none=True)  # a half-captured backward may have set them
            self._step(x, y)
            return
        self.graph.replay()

    def take_sums(self) -> tuple[float, Optional[float], int]:
        """(mean loss, mean firing rate or None, steps) since the last call; syncs with the GPU."""
        steps = self.steps_since_sums
        loss, rate = (torch.stack((self.loss_sum, self.rate_sum)) / max(steps, 1)).tolist()  # one sync
        self.loss_sum.zero_()
        self.rate_sum.zero_()
        self.steps_since_sums = 0
        return loss, rate if self.rated else None, steps
