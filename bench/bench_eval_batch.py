"""jedi-eval procedural generation: several subjects per pipeline call (--batch) vs one call per subject.

The demo's model shape (tiny pixel UNet, fold 4, 32 px, attention at both levels, reference KV cache), random
weights: speed does not depend on what it learned. The eval's own generation loop (jedi_train.eval.procedural
.generate) on held-out procedural subjects, 1 reference, image guidance 2, 2 samples per subject. Batch 1 and
batch 8 alternate and the fastest of the repetitions is kept; the images of both are compared (they must be
the same: each subject keeps its own generator).
"""
import argparse
import tempfile
import time

import numpy as np
import torch

from jedi_train.eval import procedural as ev
from jedi_train.models.components import load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.tiny import create_tiny_model_dir
from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

SUBJECTS, STEPS, BATCHES = 16, 10, (1, 8)


class _NoBar:
    def __init__(self, *a, **k):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


def _pipeline(tmp):
    model = create_tiny_model_dir(tmp, resolution=32, pixel_fold=4,
                                  unet_kwargs={"block_out_channels": [64, 128], "attention_levels": 2, "heads": 4})
    c = load_components(model, JeDiConfig(reference_attention="references"))
    pipe = JeDiPipeline.from_components(c)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(reps: int = 2):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = _pipeline(tmp + "/model")
        cases = ev.make_cases(SUBJECTS, 1, 2, 0, pipe.resolution, "varied")
        best, images = dict.fromkeys(BATCHES, float("inf")), {}
        for rep in range(reps + 1):  # the first round warms up
            for batch in BATCHES:
                args = argparse.Namespace(out=f"{tmp}/out{rep}_{batch}", batch=batch, steps=STEPS, guidance=1.0,
                                          seed=0)
                t0 = time.perf_counter()
                images[batch] = ev.generate(pipe, cases, [(1, 2.0)], args, _NoBar)[(1, 2.0)]
                if rep:
                    best[batch] = min(best[batch], time.perf_counter() - t0)
    n = sum(len(c.target_scenes) for c in cases)
    diff = max(int(np.abs(images[1][key].astype(int) - images[8][key].astype(int)).max()) for key in images[1])
    print(f"jedi-eval procedural generation, demo-shaped model 32 px, {SUBJECTS} subjects x 2 samples, "
          f"{STEPS} steps, 1 reference, cache on; threads {torch.get_num_threads()}")
    for batch in BATCHES:
        print(f"  --batch {batch}: {n / best[batch]:6.1f} images/s  ({best[batch] / best[1]:.2f}x the time of --batch 1)")
    print(f"  speedup --batch 8 vs 1: {best[1] / best[8]:.2f}x; largest pixel difference between them: {diff}/255")
    return best


if __name__ == "__main__":
    main()
