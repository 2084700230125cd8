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


def joint_vs_apart_flops(architecture: str, label: str, set_sizes=(3, 4)) -> dict[int, float]:
    """Forward FLOPs of a family's joint denoiser at its real shape (a dry-run preset, built on the meta device,
    512 px, 512 text tokens) over one set with 1 reference vs the same images each its own set (the plain model's
    work plus the widened input layer); the backward scales both alike. -> {N: ratio}."""
    from torch.utils.flop_counter import FlopCounterMode

    from jedi_train.models.attention import SetLayout
    from jedi_train.training.dry_run import build_on_meta, vae_downsample

    family, model, frozen = build_on_meta({"architecture": architecture, "model_dir": "", "resolution": 512})
    latent = 512 // vae_downsample(frozen, family)  # the side of what the denoiser takes, as the dry run sizes it
    print(f"{label} shape (meta device), 512 px, 512 text tokens: forward FLOPs, joint set vs images apart")
    ratios = {}
    for n in set_sizes:
        is_ref = torch.zeros(1, n, dtype=torch.bool)
        is_ref[:, 0] = True
        sample, t, text = model.dummy_inputs(n, latent, 512, torch.bfloat16, "meta")
        flops = {}
        for name, layout in (("joint", SetLayout.build(is_ref)), ("apart", SetLayout.independent(n))):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model.denoise(sample, t, text, layout)
            flops[name] = counter.get_total_flops()
        ratios[n] = flops["joint"] / flops["apart"]
        print(f"  N = {n}: {flops['joint'] / 1e12:6.1f} vs {flops['apart'] / 1e12:6.1f} TFLOP   "
              f"ratio {ratios[n]:.3f} (goal <= 1.15)")
    return ratios
