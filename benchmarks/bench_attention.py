"""Elementwise linear spike-driven attention: tether's Triton kernels vs the PyTorch cumsum formulation,
eager and under torch.compile, timed in the same run on the same inputs (../shared/BENCHMARKS.md).

    PYTHONPATH=src python3 -m benchmarks.bench_attention     (GPU, repo root) -> results/attention.json, .md

Shape T=1024, B=16, H=8, D=64; spikes in bf16 and fp32; gamma 1.0 (a float) and a learnable [H] gamma.
"fwd" is the training forward (inputs require grad, so each implementation saves what its backward needs);
"fwd+bwd" adds the gradients to q, k, v (and gamma). q, k, v are fresh random spikes at rate 0.5.
The row "tether kernels only, CUDA graph" times the same launchers replayed from a CUDA graph: GPU time alone.
"""
import torch

from benchmarks.common import bench_ms, ceilings, markdown_table, peak_extra_bytes, saved_bytes, write_results
from tether.functional.spike_attention import spike_attention
from tether.reference.spike_attention import spike_attention_cumsum

T, B, H, D = 1024, 16, 8, 64
DEVICE = "cuda"


def traffic_bytes(n: int, spike_bytes: int) -> tuple:
    """Bytes the op must move at least: fwd reads q, k, v and writes fp32 out; bwd reads q, k, v and an
    fp32 dout and writes dq, dk, dv (state and gamma traffic is negligible)."""
    forward = n * (3 * spike_bytes + 4)
    return forward, forward + n * (6 * spike_bytes + 4)


def measure(impl, inputs, grad_out):
    q, k, v, gamma = inputs
    wrt = [t for t in inputs if isinstance(t, torch.Tensor)]

    def forward():
        return impl(q, k, v, gamma)

    def train():
        out, _ = impl(q, k, v, gamma)
        return torch.autograd.grad(out, wrt, grad_out)

    return {
        "fwd_ms": bench_ms(forward),
        "fwd_bwd_ms": bench_ms(train),
        "saved_bytes_per_elem": saved_bytes(forward) / grad_out.numel(),
        "peak_extra_bytes_per_elem": peak_extra_bytes(train) / grad_out.numel(),
    }, forward, train


def measure_graphed_kernels(inputs, grad_out):
    """The Triton launchers alone (no autograd, no custom-op dispatch), replayed from CUDA graphs: the GPU
    time of the op, without the Python overhead that the end-to-end rows include."""
    from tether.kernels.spike_attention import spike_attention_backward, spike_attention_forward

    q, k, v, gamma = (t.detach() if isinstance(t, torch.Tensor) else t for t in inputs)
    qkv = torch.stack((q, k, v), 2)  # [T, B, 3, H, D], the kernels' layout
    per_head = gamma if isinstance(gamma, torch.Tensor) else torch.full((H,), gamma, device=DEVICE)  # [H]
    zeros = torch.zeros(B, H, D, device=DEVICE)  # initial state and grad of the final state, [B, H, D]

    def forward():
        return spike_attention_forward(qkv, per_head, zeros)

    def train():
        _, _, entering = forward()
        return spike_attention_backward(qkv, per_head, entering, grad_out, zeros,
                                        isinstance(gamma, torch.Tensor))

    stats = {}
    for key, fn in (("fwd_ms", forward), ("fwd_bwd_ms", train)):
        fn()  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        stats[key] = bench_ms(graph.replay)
    return stats


def check(name, got, want, tol):
    for a, b in zip(got, want):
        if not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol):
            raise AssertionError(f"{name}: max abs difference {(a.float() - b.float()).abs().max().item():.3g}")


def main():
    torch.manual_seed(0)
    ceiling = ceilings()
    compiled_cumsum = torch.compile(spike_attention_cumsum)
    impls = {"tether (triton)": spike_attention, "cumsum (eager)": spike_attention_cumsum,
             "cumsum (torch.compile)": compiled_cumsum}
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for learnable in (False, True):
            # [T, B, H, D] spikes; gamma: 1.0, or per head in [0.9, 1.0] with grad
            q, k, v = [(torch.rand(T, B, H, D, device=DEVICE) < 0.5).to(dtype).requires_grad_() for _ in range(3)]
            gamma = torch.linspace(0.9, 1.0, H, device=DEVICE).requires_grad_() if learnable else 1.0
            grad_out = torch.randn(T, B, H, D, device=DEVICE)  # [T, B, H, D] fp32
            fwd_bytes, train_bytes = traffic_bytes(grad_out.numel(), q.element_size())
            results = {}
            for name, impl in impls.items():
                stats, forward, train = measure(impl, (q, k, v, gamma), grad_out)
                results[name] = (stats, forward(), train())
            # outputs and gradients checked against the eager formulation before the numbers are kept
            _, want_out, want_grads = results["cumsum (eager)"]
            for name, (_, out, grads) in results.items():
                check(f"{name} forward", out, want_out, 1e-4)
                check(f"{name} grads", grads, want_grads, 1e-2 if dtype == torch.bfloat16 else 1e-4)  # rounded to bf16
            eager = results["cumsum (eager)"][0]
            compiled = results["cumsum (torch.compile)"][0]
            graphed = measure_graphed_kernels((q, k, v, gamma), grad_out)
            results["tether kernels only, CUDA graph"] = (graphed, None, None)
            for name, (stats, _, _) in results.items():
                rows.append({
                    "spikes": str(dtype).replace("torch.", ""), "gamma": "[H] learnable" if learnable else "1.0",
                    "impl": name, "saved_bytes_per_elem": None, "peak_extra_bytes_per_elem": None, **stats,
                    "fwd_gbs": fwd_bytes / stats["fwd_ms"] / 1e6,
                    "fwd_bwd_gbs": train_bytes / stats["fwd_bwd_ms"] / 1e6,
                    "fwd_speedup_vs_eager": eager["fwd_ms"] / stats["fwd_ms"],
                    "fwd_bwd_speedup_vs_eager": eager["fwd_bwd_ms"] / stats["fwd_bwd_ms"],
                    "fwd_speedup_vs_compile": compiled["fwd_ms"] / stats["fwd_ms"],
                    "fwd_bwd_speedup_vs_compile": compiled["fwd_bwd_ms"] / stats["fwd_bwd_ms"],
                    "fwd_floor_ms": fwd_bytes / ceiling["copy_gbs"] / 1e6,
                    "fwd_bwd_floor_ms": train_bytes / ceiling["copy_gbs"] / 1e6,
                })
            print(markdown_table(rows[-4:], ["spikes", "gamma", "impl", "fwd_ms", "fwd_bwd_ms"]), flush=True)
    columns = ["spikes", "gamma", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_speedup_vs_eager",
               "fwd_bwd_speedup_vs_eager", "fwd_bwd_speedup_vs_compile", "fwd_gbs", "fwd_bwd_gbs",
               "saved_bytes_per_elem", "peak_extra_bytes_per_elem"]
    table = (f"T={T}, B={B}, H={H}, D={D}. Ceilings: copy {ceiling['copy_gbs']:.0f} GB/s, "
             f"bf16 matmul {ceiling['bf16_matmul_tflops']:.0f} TFLOP/s. GB/s counts the bytes the op must move "
             "(fwd: q, k, v in, fp32 out; bwd: q, k, v, fp32 dout in, dq, dk, dv out). Bytes per element of "
             "[T, B, H, D]; speedups are peer ms / this ms.\n\n" + markdown_table(rows, columns))
    path = write_results("attention", {"shape": {"T": T, "B": B, "H": H, "D": D}, "ceilings": ceiling,
                                       "rows": rows}, table)
    print(path.read_text())


if __name__ == "__main__":
    main()
