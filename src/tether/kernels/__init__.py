"""tether.kernels: the Triton kernels and their launchers."""
import triton
from triton import knobs

from tether._backend import interpreting


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grids and buffer sizes: plain Python (triton.cdiv goes through Triton's
    constexpr-function call path, slow on the host: docs/lif_kernels.md#host-cost-and-tetherkernelslauncher)."""
    return -(-a // b)


def _spec(arg):
    """What Triton specializes a runtime argument on (triton 3.6 and 3.9, NVIDIA): a tensor's dtype and
    16-byte alignment; an int's being 1 (then a constant), a multiple of 16, and its type (i32, i64, u64);
    None (a constant). Floats (always fp32) and bools are only typed (tests/test_launcher.py checks this
    against Triton's own specialization)."""
    if arg is None or isinstance(arg, (float, bool)):
        return type(arg)
    if isinstance(arg, int):
        return arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31, arg < 2**63  # i32, i64 or u64
    return arg.dtype, arg.data_ptr() % 16 == 0


def _hooked(hook) -> bool:
    """A launch hook is set: a non-empty HookChain (triton's default is an empty one) or any other callable."""
    return bool(getattr(hook, "calls", hook))


class Launcher:
    """`Launcher(kernel)[grid](*args, **constexprs_and_options)` = `kernel[grid](...)` with less host time.

    Triton's launch binds and specializes every argument and hashes the result into a cache key on every call
    (an LIF forward+backward step at small sizes is bound by this host time: docs/lif_kernels.md). Here the key
    is the same properties computed directly (`_spec`) plus the constexprs; the first call of a key goes through
    Triton (which compiles) and keeps the compiled kernel, later calls launch it directly, with Triton's own
    launcher and arguments. Under the interpreter, or with a launch hook set (a
    profiler), every call goes through Triton."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = kernel.arg_names  # every parameter, in order: the compiled launcher takes them all
        self.compiled = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        if interpreting() or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            self.kernel[grid](*args, **kwargs)
            return
        driver = triton.runtime.driver.active
        device = driver.get_current_device()
        key = (device, tuple(map(_spec, args)), tuple(kwargs.items()))
        compiled = self.compiled.get(key)
        if compiled is None:
            self.compiled[key] = self.kernel[grid](*args, **kwargs)
            return
        rest = [kwargs[name] for name in self.names[len(args):]]  # the constexprs, in signature order
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     driver.get_current_stream(device), compiled.function, compiled.packed_metadata, None,
                     None, None, *args, *rest)
