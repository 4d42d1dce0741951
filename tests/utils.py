"""What the tests share: counting kernel launches, comparing with per-dtype tolerances, norm-wise relative errors.
Test modules import it as `utils` (pytest puts tests/ on the path, as for conftest)."""
import importlib
import math

import torch

# TTT-MLP kernels vs the fp64 reference, norm-wise relative error allowed on (outputs, gradients) by input dtype:
# fp16 rounds the matmul operands of a chain of ~30 matmuls
TTT_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 2e-2), torch.bfloat16: (1e-2, 4e-2)}


def count_launches(monkeypatch, launchers: dict) -> dict:
    """Counts calls of Triton launchers, so a test proves a kernel ran (and no fallback did).

    launchers: {key: "module.launcher"}; each is replaced (for the test) by a wrapper that adds one to
    calls[key] and calls it. Returns calls, {key: 0} at first."""
    calls = dict.fromkeys(launchers, 0)
    for key, target in launchers.items():
        module_name, name = target.rsplit(".", 1)
        module = importlib.import_module(module_name)
        launcher = getattr(module, name)

        def counted(*args, _launcher=launcher, _key=key, **kwargs):
            calls[_key] += 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def assert_close(actual, expected, tol, dtype=None, **kwargs):
    """torch.testing.assert_close with rtol = atol = tol; tol: a number, or a table {dtype: tol} read at dtype
    (the dtype the inputs had; default: actual's). kwargs go to torch.testing.assert_close (msg, or an atol
    of its own)."""
    if isinstance(tol, dict):
        tol = tol[actual.dtype if dtype is None else dtype]
    torch.testing.assert_close(actual, expected, **{"rtol": tol, "atol": tol, **kwargs})


def assert_rel_close(actual, expected, rtol, name, atol=0.0):
    """Norm-wise, in fp64: ||actual - expected|| <= rtol ||expected|| + atol * sqrt(numel) (atol: a per-element
    floor, for an expected near zero)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double().cpu(), expected.double().cpu()
    err, norm = (actual - expected).norm().item(), expected.norm().item()
    bound = rtol * norm + atol * math.sqrt(expected.numel())
    assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} (norm of expected {norm:.3e})"
