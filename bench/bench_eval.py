"""jedi-eval procedural throughput: images scored per second, generation excluded.

Scoring one generated image needs its ground truth (the subject and 7 distractors re-rendered in the
target scene, the scene's background palette, prototypes) and the image's descriptor against 8
prototypes. The baseline, measured in the same run, is rendering alone: the ground-truth renders the
scorer has to make anyway (per target: 4+2 true renders + 7x4 distractor renders + 1 other subject).
So a 64-subject x 2-sample x 5-cell evaluation (640 images, 128 ground truths) costs, besides sampling:
128 x (truth) + 640 x (score). Detail accuracy and sharpness (details.py) add, per target, the
classifiers' calibration (every variant of 4 attributes in 10 poses) and, per image, their scoring.
"""
import time

import numpy as np

from data_pipelines.synth import procedural
from jedi_train.eval import details
from jedi_train.eval import procedural as ev

SUBJECTS, SAMPLES, RES = 16, 2, 32


def main():
    cases = ev.make_cases(SUBJECTS, 1, SAMPLES, 0, RES)
    pairs = [(c, sc) for c in cases for sc in c.target_scenes]
    renders_per_truth = ev.PROTO_RENDERS + 2 + ev.NUM_DISTRACTORS * ev.PROTO_RENDERS + 1

    t0 = time.perf_counter()
    for c, sc in pairs:
        for k in range(renders_per_truth):
            procedural.render_subject(c.spec, sc, k, RES, with_mask=True)
    t_render = time.perf_counter() - t0

    t0 = time.perf_counter()
    truths = [ev.build_truth(c, sc, RES) for c, sc in pairs]
    t_truth = time.perf_counter() - t0

    images = [t.oracle["ground_truth"] for t in truths]
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        for img, t in zip(images, truths):
            ev.score_image(img, t)
    t_score = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    dts = [details.build_details(c.spec, sc, 10**6, RES, c.layout, t.scene.foreground) for (c, sc), t in zip(pairs, truths)]
    t_details = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        for img, dt in zip(images, dts):
            details.score_details(img, dt)
    t_dscore = (time.perf_counter() - t0) / reps
    n = len(pairs)
    print(f"{n} targets at {RES} px: ground truth {n / t_truth:.1f} targets/s "
          f"({t_truth / t_render:.2f}x rendering its {renders_per_truth} renders alone: {n / t_render:.1f} targets/s)")
    print(f"scoring {n / t_score:.0f} images/s once the ground truth exists")
    print(f"details: calibration {n / t_details:.1f} targets/s ({t_details / t_truth:.2f}x the colour ground truth), "
          f"scoring {n / t_dscore:.0f} images/s")
    per_eval = 128 * t_truth / n + 640 * t_score / n
    per_details = 128 * t_details / n + 640 * t_dscore / n
    print(f"=> a 64-subject x 2-sample x 5-cell eval spends {per_eval:.1f} s outside sampling on colour identity, "
          f"{per_details:.1f} s more on details (--details off skips them) "
          f"(mean of {reps} scoring passes; {np.round(t_truth, 2)} s for {n} truths)")
