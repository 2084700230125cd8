"""The joint FLUX transformer: cost of coupling a set, and sampling cost vs K references with / without the cache.

1. Training step (forward + backward, AdamW) of the joint transformer over B sets x N images (one reference per
   set, coupled attention: each image's queries see its text + the set's image tokens) vs the plain
   FluxTransformer2DModel (the base it was made from) over the same B*N images, same run. Goal: ratio <= 1.15.
2. The same ratio in FLOPs at the real FLUX.1-dev shape (19 + 38 blocks, width 3072, 512 px: 1024 image + 512
   text tokens per image), counted on the meta device (no weights, no time): what the coupling costs where
   attention is a realistic share of the work. At width 64 attention is ~3x the share it is at width 3072.
3. bench_sampling's table on a tiny FLUX pipeline (references at t = 0, reference_attention 'references').
FLUX-shaped but tiny (2 double + 2 single-stream blocks, width 64, 32 px: 64 image + 32 text tokens per image),
CPU, one intra-op thread; repetitions interleaved, the fastest kept.
"""
import tempfile
import time

import torch
from diffusers import FluxTransformer2DModel

from bench.bench_sampling import time_table
from bench.timing import joint_vs_apart_flops
from jedi_train.models.attention import SetLayout
from jedi_train.models.components import load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.joint_flux import image_ids, pack
from jedi_train.models.text import TextEmbeddings
from jedi_train.models.tiny import create_tiny_model_dir
from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

B, N, STEPS = 4, 3, 10
SHAPE = {"width": 64, "heads": 4, "layers": 2, "single_layers": 2, "guidance_embeds": True}
# FLUX.1-dev's attention share: tokens per image / transformer width is 96 / 192 here as 1536 / 3072 at 512 px
# (12 heads of 16), where SHAPE's 96 / 64 gives attention ~3x the share it has in the real model
PROPORTIONED = dict(SHAPE, heads=12)


def _step_time(model, call, reps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def one():
        call().float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            one()
        best = min(best, (time.perf_counter() - t0) / STEPS)
    return best


def compare_step(joint, plain, plain_call, model_in, t, text, is_ref, label: str, note: str = ""):
    """Training step times of the plain base over the batch's images, the joint model with coupled sets
    (`is_ref`: (B, N)), and the joint model with every image its own set (all but the coupled attention);
    interleaved, the fastest kept, printed as ratios to the plain model. -> (plain, joint, independent) seconds."""
    layout, independent = SetLayout.build(is_ref), SetLayout.independent(is_ref.numel())
    calls = {"plain": (plain, plain_call), "joint": (joint, lambda: joint.denoise(model_in, t, text, layout)),
             "independent": (joint, lambda: joint.denoise(model_in, t, text, independent))}
    times = {k: [] for k in calls}
    for _ in range(2):  # interleaved
        for k, (model, call) in calls.items():
            times[k].append(_step_time(model, call))
    p, j, i = (min(times[k]) for k in ("plain", "joint", "independent"))
    b, n = is_ref.shape
    width = joint.config.num_attention_heads * joint.config.attention_head_dim
    print(f"training step, {b} sets x {n} images (1 reference each), {label} "
          f"(width {width}, {sum(q.numel() for q in joint.parameters()) / 1e6:.2f} M parameters)")
    print(f"  plain transformer over {b * n} images: {p * 1e3:8.1f} ms")
    print(f"  joint model, each image its own set: {i * 1e3:7.1f} ms   ratio {i / p:.2f} (the framework's overhead)")
    print(f"  joint (coupled sets):               {j * 1e3:8.1f} ms   ratio {j / p:.2f} (goal <= 1.15{note})")
    return p, j, i


def step_ratio(tmp, shape=SHAPE, label="tiny FLUX-shaped MM-DiT"):
    model_dir = create_tiny_model_dir(tmp, family="flux", transformer_kwargs=shape)
    c = load_components(model_dir, JeDiConfig(resolution=32), prediction_type="flow")
    joint = c.denoiser.train()
    plain = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer").train()  # the base
    g = torch.Generator().manual_seed(0)
    bn, size = B * N, 16
    x = torch.randn(bn, 16, size, size, generator=g)
    text = TextEmbeddings(torch.randn(bn, 32, c.denoiser.config.joint_attention_dim, generator=g),
                          torch.randn(bn, c.denoiser.config.pooled_projection_dim, generator=g))
    t = torch.rand(bn, generator=g) * 1000
    is_ref = torch.zeros(B, N, dtype=torch.bool)
    is_ref[:, 0] = True
    model_in = joint.assemble_input(x, x, is_ref.flatten())
    ones = torch.ones(bn)

    def plain_call():
        return plain(hidden_states=pack(x), encoder_hidden_states=text.hidden, pooled_projections=text.pooled,
                     timestep=t / 1000, img_ids=image_ids(size, size, "cpu"), txt_ids=torch.zeros(32, 3),
                     guidance=ones).sample

    p, j, _ = compare_step(joint, plain, plain_call, model_in, t, text, is_ref, label,
                           f"; the rest is attention over {N}x the image keys")
    return c, j / p


def main():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            c, _ = step_ratio(tmp)
            with tempfile.TemporaryDirectory() as tmp2:
                step_ratio(tmp2, PROPORTIONED, "tiny MM-DiT with FLUX.1-dev's attention share")
            joint_vs_apart_flops("flux_dev", "FLUX.1-dev")
            c.denoiser.set_reference_attention("references")
            pipe = JeDiPipeline.from_components(c)
            pipe.set_progress_bar_config(disable=True)
            time_table(pipe=pipe, label="tiny FLUX-shaped MM-DiT 32 px, {steps} flow-matching Euler steps")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
