"""The joint Qwen-Image transformer: cost of coupling a set, and sampling cost vs K references with / without the cache.

1. Training step (forward + backward, AdamW) of the joint transformer over B sets x N images (one reference per
   set, coupled attention) vs the plain QwenImageTransformer2DModel (the base it was made from) over the same B*N
   images, same run. Goal: ratio <= 1.15.
2. The same ratio in FLOPs at the real Qwen-Image shape (60 blocks, width 3072, 512 px: 256 image + 512 text tokens
   per image), counted on the meta device (no weights, no time).
3. bench_sampling's table on a tiny Qwen-Image pipeline (references at t = 0, reference_attention 'references').
Qwen-Image-shaped but tiny (2 blocks, width 64, 32 px: 64 image + 32 text tokens per image), CPU, one intra-op
thread; repetitions interleaved, the fastest kept.
"""
import tempfile

import torch
from diffusers import QwenImageTransformer2DModel

from bench.bench_flux import compare_step
from bench.bench_sampling import time_table
from bench.timing import joint_vs_apart_flops
from jedi_train.models.components import load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.joint_flux import pack
from jedi_train.models.text import TextEmbeddings
from jedi_train.models.tiny import create_tiny_model_dir
from jedi_train.pipelines.pipeline_jedi import JeDiBasePipeline

B, N = 4, 3
SHAPE = {"heads": 4, "layers": 2, "text_width": 64, "latent_channels": 16}


def step_ratio(tmp):
    model_dir = create_tiny_model_dir(tmp, family="qwenimage", transformer_kwargs=SHAPE)
    c = load_components(model_dir, JeDiConfig(resolution=32), prediction_type="flow")
    joint = c.denoiser.train()
    plain = QwenImageTransformer2DModel.from_pretrained(model_dir, subfolder="transformer").train()  # the base
    g = torch.Generator().manual_seed(0)
    bn, size = B * N, 16
    x = torch.randn(bn, 16, size, size, generator=g)
    text = TextEmbeddings(torch.randn(bn, 32, joint.config.joint_attention_dim, generator=g))
    t = torch.rand(bn, generator=g) * 1000
    is_ref = torch.zeros(B, N, dtype=torch.bool)
    is_ref[:, 0] = True
    model_in = joint.assemble_input(x, x, is_ref.flatten())

    def plain_call():
        return plain(hidden_states=pack(x), encoder_hidden_states=text.hidden, timestep=t / 1000,
                     img_shapes=[[(1, size // 2, size // 2)]] * bn).sample

    compare_step(joint, plain, plain_call, model_in, t, text, is_ref, "tiny Qwen-Image-shaped MM-DiT")
    return c


def main():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            c = step_ratio(tmp)
            joint_vs_apart_flops("qwenimage_20b", "Qwen-Image")
            c.denoiser.set_reference_attention("references")
            pipe = JeDiBasePipeline.from_components(c)
            pipe.set_progress_bar_config(disable=True)
            time_table(pipe=pipe, label="tiny Qwen-Image-shaped MM-DiT 32 px, {steps} flow-matching Euler steps")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
