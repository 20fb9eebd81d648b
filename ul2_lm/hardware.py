"""What one device can do: peak FLOP/s, for model-FLOP utilisation (MFU).

Accelerators are rated from their data sheets (dense bf16). A CPU has no meaningful rating, so
its peak is *measured*: the FLOP/s of a large f32 matmul in this process, which is what the
benchmarks and the trainer's MFU on CPU are relative to.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 FLOP/s per device (per chip for TPUs, per GPU for GPUs), keyed by substrings of
# jax.Device.device_kind.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


def rated_peak_flops(device: jax.Device | None = None) -> float | None:
    """The data-sheet dense bf16 peak of `device`, or None when it has no rating (CPU)."""
    device = device or jax.devices()[0]
    kind = device.device_kind
    for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_BF16_FLOPS[name]
    return None


def measure_matmul_flops(size: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """Median FLOP/s of an f32 [size, size] @ [size, size] matmul on the default device."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / float(np.median(times))


@functools.cache
def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for the default backend's devices."""
    rated = rated_peak_flops()
    if rated is not None:
        return rated, f"rated bf16 peak of {jax.devices()[0].device_kind}"
    return measure_matmul_flops(), "measured f32 matmul throughput of this CPU"
