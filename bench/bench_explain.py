"""The cost of reference attention maps (return_attention_maps=True, jedi-sample --explain): sampling time with
maps / without, same pipeline, same call (goal <= 1.15x); then the two 'do the maps point at the subject'
figures (jedi_train/eval/attention.py) on that pipeline.

Pipeline: $JEDI_PIPELINE, else the newest runs/demo-*/pipeline (a `make train` export), else the demo's model
untrained (conf/model/tiny_pixel.yaml's tiny recipe: the figures then say nothing about a trained model).
Repetitions are interleaved and the fastest is kept; one intra-op thread (a shared 2-core machine).
"""
import glob
import os
import tempfile
import time

import numpy as np
import torch

from jedi_train.eval import attention as measure

PROMPTS = ["a photo of a mug on the beach", "a photo of a mug in the snow", "a photo of a mug at night"]


def _pipeline(tmp: str):
    from jedi_train.pipelines.auto import JeDiAutoPipeline

    found = os.environ.get("JEDI_PIPELINE") or next(iter(sorted(glob.glob("runs/demo-*/pipeline"))[::-1]), None)
    if found:
        pipe, what = JeDiAutoPipeline.from_pretrained(found), found
    else:
        from jedi_train.models.components import load_components
        from jedi_train.models.joint import JeDiConfig
        from jedi_train.models.tiny import create_tiny_model_dir
        from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

        model = create_tiny_model_dir(tmp, resolution=32, pixel_fold=4, unet_kwargs={
            "block_out_channels": [64, 128], "attention_levels": 2, "heads": 4})
        c = load_components(model, JeDiConfig(reference_attention="references"))
        pipe, what = JeDiPipeline.from_components(c), "the demo's model, untrained"
    pipe.set_progress_bar_config(disable=True)
    return pipe, what


def cost(pipe, steps: int = 25, reps: int = 3) -> tuple[float, float]:
    """(seconds without maps, seconds with), fastest of `reps` interleaved calls: 1 reference, 3 prompts."""
    ref = [np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)]

    def call(maps: bool) -> float:
        t0 = time.perf_counter()
        pipe(reference_images=ref, prompt=PROMPTS, num_inference_steps=steps, guidance_scale=3.0,
             image_guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np",
             return_attention_maps=maps)
        return time.perf_counter() - t0

    call(False)  # warm-up
    times = {False: [], True: []}
    for _ in range(reps):
        for maps in (False, True):
            times[maps].append(call(maps))
    return min(times[False]), min(times[True])


def main():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pipe, what = _pipeline(tmp)
            print(f"pipeline: {what}")
            plain, maps = cost(pipe)
            print(f"sampling 3 images, 1 reference, 25 steps: {plain:.3f} s without maps, {maps:.3f} s with: "
                  f"{maps / plain:.3f}x (goal <= 1.15x)")
            n = int(os.environ.get("JEDI_BENCH_SUBJECTS", "16"))
            a = measure.subject_vs_background(pipe, subjects=n)
            lo, hi = a["ratio_ci"]
            print(f"mass per pixel, subject / background ({a['subjects']} held-out subjects): {a['ratio']:.3f} "
                  f"(95% CI {lo:.3f} .. {hi:.3f})")
            b = measure.true_vs_distractor(pipe, subjects=n)
            lo, hi = b["true_wins_ci"]
            print(f"true reference vs same-class distractor: the true one gets more mass for {b['true_wins']:.2f} "
                  f"of subjects (95% CI {lo:.2f} .. {hi:.2f}); mean shares {b['true_share']:.3f} vs "
                  f"{b['distractor_share']:.3f}")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
