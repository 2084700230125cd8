"""Personalized sampling cost vs the number of references K, with and without the reference KV cache.

Tiny pixel config (32 px), one JeDiPipeline whose UNet is set up the way the cache needs
(references at t = 0, reference_attention 'references'), so both columns run the same model and
give the same images. K = 0 is plain text-to-image (image_guidance_scale 0: two guidance branches
instead of three); every number is printed as a ratio to K = 0 measured in this run. Repetitions
are interleaved and the fastest is kept, so load from other processes hits every cell alike.
One intra-op thread: on a shared 2-core machine multi-threaded small ops mostly measure contention.
"""
import tempfile
import time

import numpy as np
import torch

from jedi_train.models.components import load_components
from jedi_train.models.tiny import create_tiny_model_dir
from jedi_train.pipelines.pipeline_jedi import JeDiPipeline

KS = (0, 1, 3, 5)


def _pipeline(tmp):
    components = load_components(create_tiny_model_dir(tmp, resolution=32, pixel_fold=2))
    components.unet.set_reference_attention("references")
    pipe = JeDiPipeline.from_components(components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _refs(k):
    rng = np.random.default_rng(k)
    return [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(k)]


def time_table(prompts=4, steps=10, reps=3, pipe=None, label="tiny pixel model 32 px, {steps} DDIM steps"):
    """pipe: a pipeline set up for the cache (default: the tiny pixel one); label names it in the table."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe = pipe or _pipeline(tmp)
        cells = [(k, cache) for k in KS for cache in ((None,) if k == 0 else (False, True))]

        def call(k, cache):
            pipe(reference_images=_refs(k), prompt=[f"prompt {i}" for i in range(prompts)],
                 num_inference_steps=steps, guidance_scale=3.0, image_guidance_scale=2.0 if k else 0.0,
                 use_reference_cache=cache, generator=torch.Generator().manual_seed(0), output_type="pt")

        for cell in cells:  # warm-up: first calls per shape are slower
            call(*cell)
        best = dict.fromkeys(cells, float("inf"))
        for _ in range(reps):
            for cell in cells:
                t0 = time.perf_counter()
                call(*cell)
                best[cell] = min(best[cell], (time.perf_counter() - t0) / prompts)
    base = best[(0, None)]
    print(f"sampling time per image, {label.format(steps=steps)}, {prompts} targets per call, "
          f"guidance branches batched (K = 0: text only)")
    print(f"{'K':>3} {'no cache ms':>12} {'ratio':>7} {'cache ms':>10} {'ratio':>7} {'cache speedup':>14}")
    print(f"{0:>3} {base * 1e3:12.1f} {1.0:7.2f} {'':>10} {'':>7} {'':>14}")
    rows = {0: (1.0, None)}
    for k in KS[1:]:
        plain, cached = best[(k, False)], best[(k, True)]
        rows[k] = (plain / base, cached / base)
        print(f"{k:>3} {plain * 1e3:12.1f} {plain / base:7.2f} {cached * 1e3:10.1f} {cached / base:7.2f} "
              f"{plain / cached:14.2f}")
    return rows


def main():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        time_table()
    finally:
        torch.set_num_threads(threads)  # the other benches run in this process


if __name__ == "__main__":
    main()
