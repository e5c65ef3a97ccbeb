"""The matmul peak a training run is measured against: on the training device, in its dtype.

Why not one CPU ``torch.mm``: dividing a GPU run's FLOP/s by a CPU peak printed "1995 % of
peak". The fraction means something only against what the same chip does in the same dtype:
CUDA bf16 (or fp16) 8192² matmuls timed with CUDA events, CPU fp32 2048² ``torch.mm``. The best
of several repeats is taken, so the peak is a peak and the fraction stays ≤ 1.
"""
from __future__ import annotations

import time

import torch


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 8) -> float:
    """FLOP/s of the fastest of ``repeats`` n×n matmuls on ``device`` in ``dtype``."""
    device = torch.device(device)
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32           # training on CPU computes in fp32 (engine.resolve_precision)
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            torch.mm(a, b)
            seconds = time.perf_counter() - t
        best = min(best, seconds)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n ** 3 / best
