"""tether.kernels."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grids and buffer sizes: plain Python (triton.cdiv goes through Triton's
    constexpr-function call path, ~10 us a call on the CPU)."""
    return -(-a // b)
