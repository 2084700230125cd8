"""Timing shared by the benchmarks: wall-clock seconds per call after a warm-up, and one training step."""
from __future__ import annotations

import time

import torch


def seconds_per_call(fn, reps: int, warmup: int = 1) -> float:
    """fn(i) `warmup` times (allocator, kernels), then `reps` timed calls: seconds per call. `i` counts all
    calls, so a step can seed its noise with it."""
    for i in range(warmup):
        fn(i)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + reps):
        fn(i)
    return (time.perf_counter() - t0) / reps


def objective_step(objective, optimizer: torch.optim.Optimizer, batch):
    """fn(i) for seconds_per_call: the JeDi loss on `batch` (noise seeded by i), backward, optimizer step."""
    def step(i: int) -> None:
        objective(batch, generator=torch.Generator().manual_seed(i))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
