"""The joint FLUX.2 transformer (Klein; FLUX.2-dev is the same class with a guidance embedding): cost of coupling a
set, and sampling cost vs K references with / without the cache.

1. Training step (forward + backward, AdamW) of the joint transformer over B sets x N images (one reference per
   set, coupled attention) vs the plain Flux2Transformer2DModel (the base it was made from) over the same B*N
   images, same run. Goal: ratio <= 1.15.
2. The same ratio in FLOPs at the real FLUX.2 Klein 4B and FLUX.2-dev shapes (512 px), on the meta device.
3. bench_sampling's table on a tiny Klein pipeline (references at t = 0, reference_attention 'references').
FLUX.2-shaped but tiny (2 double + 2 single blocks, width 64, 32 px), CPU, one intra-op thread; repetitions
interleaved, the fastest kept.
"""
import tempfile

import torch
from diffusers import Flux2Transformer2DModel

from bench.bench_flux import compare_step
from bench.bench_sampling import time_table
from bench.timing import joint_vs_apart_flops
from jedi_train.models.components import load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.joint_flux2 import image_ids, pack, text_ids
from jedi_train.models.text import TextEmbeddings
from jedi_train.models.tiny import create_tiny_model_dir
from jedi_train.pipelines.pipeline_jedi import JeDiBasePipeline

B, N = 4, 3
SHAPE = {"heads": 4, "layers": 2, "single_layers": 2, "text_width": 16, "latent_channels": 4}


def step_ratio(tmp):
    model_dir = create_tiny_model_dir(tmp, family="flux2_klein", transformer_kwargs=SHAPE)
    c = load_components(model_dir, JeDiConfig(resolution=32), prediction_type="flow")
    joint = c.denoiser.train()
    plain = Flux2Transformer2DModel.from_pretrained(model_dir, subfolder="transformer").train()  # the base
    g = torch.Generator().manual_seed(0)
    bn, size, text_len = B * N, 8, 32
    x = torch.randn(bn, joint.latent_channels, size, size, generator=g)
    text = TextEmbeddings(torch.randn(bn, text_len, joint.config.joint_attention_dim, generator=g))
    t = torch.rand(bn, generator=g) * 1000
    is_ref = torch.zeros(B, N, dtype=torch.bool)
    is_ref[:, 0] = True
    model_in = joint.assemble_input(x, x, is_ref.flatten())

    def plain_call():
        return plain(hidden_states=pack(x), encoder_hidden_states=text.hidden, timestep=t / 1000,
                     img_ids=image_ids(size, size, x.device), txt_ids=text_ids(text_len, x.device)).sample

    compare_step(joint, plain, plain_call, model_in, t, text, is_ref, "tiny FLUX.2-shaped MM-DiT")
    return c


def main():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            c = step_ratio(tmp)
            joint_vs_apart_flops("flux2_klein_4b", "FLUX.2 Klein 4B")
            joint_vs_apart_flops("flux2_dev", "FLUX.2-dev")
            c.denoiser.set_reference_attention("references")
            pipe = JeDiBasePipeline.from_components(c)
            pipe.set_progress_bar_config(disable=True)
            time_table(pipe=pipe, label="tiny FLUX.2 Klein-shaped MM-DiT 32 px, {steps} flow-matching Euler steps")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
