"""Do the reference attention maps point at the subject? Two measurements on held-out procedural subjects, whose
renders come with exact subject masks (procedural.render_subject(with_mask=True); subjects from make_cases, a
seed range no training set uses). Called by tests/test_attention_measure.py and bench/bench_explain.py; figures
in the README (Personalize: reference attention maps).

subject_vs_background: one reference per subject; its targets are GENERATED (pipe(..., return_attention_maps=True),
prompts naming other scenes). Each heatmap is spread evenly over the pixels of its tokens; mass per pixel on the
reference's subject pixels (mask-weighted) vs its background pixels. The statistic is the ratio of the two means
over subjects (> 1: the maps find the subject), with a bootstrap 95% CI over subjects.

true_vs_distractor: two references in one call, the true subject and a same-class distractor (random order). A
generated image's subject is whatever the model made of both, so here the target is a GROUND-TRUTH render of the
true subject in another scene, noised to each step of the last third of the schedule (the steps the maps
average) and denoised once per step with the references visible (the conditional branch only). Statistic: the
fraction of subjects whose true reference gets more attention mass than the distractor, with a bootstrap CI.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from data_pipelines.synth import procedural
from jedi_train.eval.common import bootstrap_ci
from jedi_train.eval.procedural import make_cases
from jedi_train.pipelines.attention_maps import recorded_steps, spread


def _render(spec, scene: str, seed: int, resolution: int, layout: str):
    img, mask = procedural.render_subject(spec, scene, seed, resolution, with_mask=True, layout=layout)
    return Image.fromarray(img), mask.astype(np.float64) / 255


def pixel_densities(heatmap: torch.Tensor, mask: np.ndarray) -> tuple[float, float]:
    """(h, w) token masses + (R, R) subject mask in [0, 1] -> (mass per subject pixel, mass per background pixel)."""
    px = spread(heatmap.float(), mask.shape[0]).double().numpy()
    return float((px * mask).sum() / mask.sum()), float((px * (1 - mask)).sum() / (1 - mask).sum())


def subject_vs_background(pipe, subjects: int = 16, samples: int = 2, steps: int = 25, guidance: float = 3.0,
                          image_guidance: float = 3.0, seed: int = 0, layout: str = "centered") -> dict:
    """{ratio, ratio_ci, subject_density, background_density, per_subject [[subject, background]], subjects}."""
    res = pipe.resolution
    rows = []
    for case in make_cases(subjects, 1, samples, seed, res, layout):
        ref, mask = _render(case.spec, case.ref_scenes[0], case.ref_seeds[0], res, layout)
        out = pipe(reference_images=[ref], reference_captions=[case.prompt(case.ref_scenes[0])],
                   prompt=[case.prompt(sc) for sc in case.target_scenes], num_inference_steps=steps,
                   guidance_scale=guidance, image_guidance_scale=image_guidance, output_type="latent",
                   generator=torch.Generator().manual_seed(seed * 1_000_003 + case.index), return_attention_maps=True)
        rows.append(np.mean([pixel_densities(m.heatmaps[0], mask) for m in out.attention_maps], axis=0))
    rows = np.array(rows)

    def ratio(r):
        return float(r[:, 0].mean() / r[:, 1].mean())

    return {"ratio": ratio(rows), "ratio_ci": list(bootstrap_ci(rows, ratio, seed=seed)),
            "subject_density": float(rows[:, 0].mean()), "background_density": float(rows[:, 1].mean()),
            "per_subject": rows.tolist(), "subjects": len(rows)}


@torch.no_grad()
def reference_shares_for_image(pipe, references: list, image, prompt: str, captions: list[str], steps: int,
                               seed: int = 0) -> torch.Tensor:
    """(K,) attention shares on each reference of a KNOWN target image (noised to each of the last third of the
    steps, denoised once per step in the conditional branch with the references visible)."""
    ref_latents, _ = pipe.prepare_references(references, 1.0)
    target, _ = pipe.prepare_references([image], 1.0)
    cond, uncond, ref_text = pipe.encode_prompt([prompt], [""], captions, 1)
    # text and image guidance 1: the conditional branch with the references is the only one
    sets = pipe.prepare_sets(cond, uncond, ref_text, ref_latents, guidance_scale=1.0, image_guidance_scale=1.0,
                             max_set_size=8, use_cache=pipe._use_cache(None, True), batch_guidance_branches=True)
    recorder = pipe.attention_recording(sets, ref_latents)
    pipe.prepare_timesteps(steps, pipe._execution_device, pipe.latent_size)
    timesteps = pipe.scheduler.timesteps
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(seed)).to(target)
    for i in recorded_steps(len(timesteps)):
        t = timesteps[i]
        noisy = pipe.scheduler.add_noise(target, noise, t[None]) if hasattr(pipe.scheduler, "add_noise") \
            else pipe.scheduler.scale_noise(target, t[None], noise)
        x_in = pipe.scheduler.scale_model_input(noisy, t) if hasattr(pipe.scheduler, "scale_model_input") else noisy
        pipe.predict(sets, x_in, t, pipe.prepare_reference_noise(sets, None, target.device, target.dtype),
                     recorder.calls)
    return recorder.maps()[0].reference_shares


def true_vs_distractor(pipe, subjects: int = 16, steps: int = 25, seed: int = 0, layout: str = "centered") -> dict:
    """{true_wins, true_wins_ci, true_share, distractor_share, per_subject [[true, distractor]], subjects}."""
    res = pipe.resolution
    rows = []
    for case in make_cases(subjects, 1, 1, seed, res, layout):
        rng = np.random.default_rng([seed, case.index, 33])
        true_ref, _ = _render(case.spec, case.ref_scenes[0], case.ref_seeds[0], res, layout)
        other, _ = _render(case.distractors[0], case.ref_scenes[0], case.ref_seeds[0] + 1, res, layout)
        truth, _ = _render(case.spec, case.target_scenes[0], case.gt_seed, res, layout)
        flip = bool(rng.integers(2))  # the true reference first or second: no slot is favoured
        refs = [other, true_ref] if flip else [true_ref, other]
        caption = case.prompt(case.ref_scenes[0])
        shares = reference_shares_for_image(pipe, refs, truth, case.prompt(case.target_scenes[0]), [caption] * 2,
                                            steps, seed * 1_000_003 + case.index)
        rows.append([float(shares[int(flip)]), float(shares[1 - int(flip)])])
    rows = np.array(rows)
    wins = (rows[:, 0] > rows[:, 1]).astype(float)
    return {"true_wins": float(wins.mean()), "true_wins_ci": list(bootstrap_ci(wins, seed=seed)),
            "true_share": float(rows[:, 0].mean()), "distractor_share": float(rows[:, 1].mean()),
            "per_subject": rows.tolist(), "subjects": len(rows)}
