"""Python/CPU dispatch overhead of the functional ops, kernels mocked out.

Every Triton launcher is replaced by a function that only allocates correctly-shaped empty outputs, so what
is timed is the eager-mode work around the kernels: argument checks, custom-op / autograd dispatch, saving
for backward, allocations. CPU tensors with TRITON_INTERPRET=1 take the kernel path without a GPU.

    python -m benchmarks.overhead_cpu --label before   # then change the code, then --label after

Each run stores its times under its label (the lowest over the label's runs) in
benchmarks/results/overhead_cpu.json and rewrites
benchmarks/results/overhead_cpu.md with one column per label.
"""
import argparse
import json
import os
import platform
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before tether is imported: CPU tensors take the kernel path

import torch  # noqa: E402

import tether.kernels.lif as lif_kernels  # noqa: E402
import tether.kernels.pack as pack_kernels  # noqa: E402
import tether.kernels.spike_attention as attention_kernels  # noqa: E402
from benchmarks.common import RESULTS  # noqa: E402
from tether.functional import lif, spike_attention  # noqa: E402
from tether.functional.spike_linear import spike_linear  # noqa: E402


def mock_launchers():
    """Launchers that return empty outputs of the shapes the real ones return."""
    def lif_forward(x, v_init, decay, threshold, *, save, **_):
        T, N = x.shape[0], x[0].numel()
        return (torch.empty_like(x), x.new_empty(x.shape[1:], dtype=torch.float32),
                *lif_kernels.saved_buffers(T, N, save, x))

    def lif_backward(grad_spikes, grad_v_final, saved, bits, v_init, decay, threshold, *, grad_v_init,
                     grad_decay, grad_threshold, **_):
        N, f32 = grad_spikes[0].numel(), torch.float32
        return (torch.empty_like(grad_spikes),
                grad_spikes.new_empty(grad_spikes.shape[1:], dtype=f32) if grad_v_init else None,
                grad_spikes.new_empty(N, dtype=f32) if grad_decay else None,
                grad_spikes.new_empty(N, dtype=f32) if grad_threshold else None)

    def attention_forward(qkv, gamma, state):
        T, B, _, H, D = qkv.shape
        f32 = qkv.new_empty(0, dtype=torch.float32)
        return (f32.new_empty(T, B, H, D), f32.new_empty(B, H, D),
                f32.new_empty(-(-T // attention_kernels.CHUNK), B, H, D))

    def attention_backward(qkv, gamma, entering, dout, dfinal, need_dgamma):
        return torch.empty_like(qkv), torch.empty_like(dfinal), torch.empty_like(gamma)

    def pack(s):
        return s.new_empty((*s.shape[:-1], (s.shape[-1] + 7) // 8), dtype=torch.uint8)

    def unpack(packed, n, dtype):
        return packed.new_empty((*packed.shape[:-1], n), dtype=dtype)

    lif_kernels.lif_forward, lif_kernels.lif_backward = lif_forward, lif_backward
    attention_kernels.spike_attention_forward = attention_forward
    attention_kernels.spike_attention_backward = attention_backward
    pack_kernels.pack_spikes, pack_kernels.unpack_spikes = pack, unpack


def median_us(fn, calls: int) -> float:
    """Median wall time of fn() in microseconds over `calls` calls."""
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def measure(fns: dict, calls: int, rounds: int) -> dict:
    """name -> the lowest of `rounds` medians; rounds go over all fns in turn, so that a slow spell of this
    shared VM lands in one round of every case rather than in all rounds of one."""
    for fn in fns.values():
        median_us(fn, 200)  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], median_us(fn, calls))
    return best


def cases():
    """name -> (forward-only fn, forward+backward fn), small fp32 CPU tensors that require grad."""
    x = torch.randn(16, 2, 32, requires_grad=True)  # [T, B, C]
    threshold = torch.tensor(1.0, requires_grad=True)
    lif_grads = (torch.randn(16, 2, 32), torch.randn(2, 32))  # d spikes, d v_final

    q, k, v = (torch.randn(16, 2, 4, 8).requires_grad_() for _ in range(3))  # [T, B, H, D]
    attention_grads = (torch.randn(16, 2, 4, 8), torch.randn(2, 4, 8))  # d out, d final state

    spikes = (torch.rand(16, 2, 64) < 0.3).float()  # [T, B, in]
    weight = torch.randn(32, 64, requires_grad=True)  # [out, in]
    bias = torch.randn(32, requires_grad=True)
    linear_grad = torch.randn(16, 2, 32)

    def lif_fwd():
        return lif(x, 0.5, 1.0)

    def lif_fwd_learned_threshold():
        return lif(x, 0.5, threshold)

    def attention_fwd():
        return spike_attention(q, k, v, 0.9)

    def linear_fwd():
        return (spike_linear(spikes, weight, bias),)

    def with_backward(fwd, grads):
        return lambda: torch.autograd.backward(fwd(), grads)

    return {
        "lif (x [16, 2, 32], float decay/threshold)": (lif_fwd, with_backward(lif_fwd, lif_grads)),
        "lif, learned 0-d threshold": (lif_fwd_learned_threshold,
                                       with_backward(lif_fwd_learned_threshold, lif_grads)),
        "spike_attention (q, k, v [16, 2, 4, 8])": (attention_fwd, with_backward(attention_fwd, attention_grads)),
        "spike_linear (spikes [16, 2, 64], weight [32, 64])": (linear_fwd,
                                                               with_backward(linear_fwd, (linear_grad,))),
    }


def write_markdown(results: dict):
    labels = list(results["runs"])
    lines = [
        "# Eager-mode CPU overhead per call, launchers mocked",
        "",
        "CPU dispatch time only, NOT GPU time: every Triton launcher is replaced by a stub that returns empty",
        "outputs of the right shapes, so the numbers are the Python/dispatcher work around the kernels",
        f"(argument checks, custom-op and autograd dispatch, allocations). Machine: {results['machine']}, "
        f"torch {results['torch']}.",
        "Microseconds per call: median of 1000 calls, lowest of 5 such rounds and of the runs of a label",
        f"(runs: {results['runs_per_label']}, before / after alternated; the VM is noisy); `fwd` =",
        "forward only with inputs that require grad,",
        "`fwd+bwd` = forward then `torch.autograd.backward` with given output gradients.",
        "Produced by `python -m benchmarks.overhead_cpu --label <label>` (one column per label); an older",
        "commit's column: `git archive COMMIT src | tar -x -C /tmp/old` then `PYTHONPATH=/tmp/old/src python -m",
        "benchmarks.overhead_cpu --label before`.",
        "",
        "| op | " + " | ".join(f"{label} fwd | {label} fwd+bwd" for label in labels) + " |",
        "|---|" + "---:|---:|" * len(labels),
    ]
    for name in next(iter(results["runs"].values())):
        cells = []
        for label in labels:
            fwd, both = results["runs"][label].get(name, (float("nan"), float("nan")))
            cells += [f"{fwd:.1f}", f"{both:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(labels) >= 2:
        first, last = labels[0], labels[-1]
        lines += ["", f"Ratio {first} / {last} (fwd+bwd):", ""]
        for name, (_, both) in results["runs"][first].items():
            if name in results["runs"][last]:
                lines.append(f"- {name}: {both / results['runs'][last][name][1]:.2f}x")
    (RESULTS / "overhead_cpu.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="column name, e.g. before / after")
    parser.add_argument("--calls", type=int, default=1000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    mock_launchers()
    path = RESULTS / "overhead_cpu.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    results.update(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   torch=torch.__version__)
    fns = {(name, kind): fn for name, pair in cases().items() for kind, fn in zip(("fwd", "fwd+bwd"), pair)}
    times = measure(fns, args.calls, args.rounds)
    run = {}
    for name in cases():
        run[name] = (times[name, "fwd"], times[name, "fwd+bwd"])
        print(f"{name:55s} fwd {run[name][0]:7.1f} us   fwd+bwd {run[name][1]:7.1f} us")
    # a label run again keeps each case's lowest time: alternating before / after runs share the VM's noise
    previous = results["runs"].get(args.label, {})
    results["runs"][args.label] = {name: tuple(map(min, zip(pair, previous.get(name, pair))))
                                   for name, pair in run.items()}
    results["runs_per_label"] = {**results.get("runs_per_label", {}),
                                 args.label: results.get("runs_per_label", {}).get(args.label, 0) + 1}
    path.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results)


if __name__ == "__main__":
    main()
