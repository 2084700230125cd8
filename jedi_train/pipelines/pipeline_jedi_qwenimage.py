"""`JeDiQwenImagePipeline`: JeDi on Qwen-Image -- the joint Qwen-Image MM-DiT, one Qwen2.5-VL text encoder (the
prompt template with its first 34 tokens dropped, the text mask; QwenImagePipeline's prompt embeddings), the
AutoencoderKLQwenImage latents normalised by latents_mean / latents_std (`QwenImageLatentCodec`), QwenImagePipeline's
timesteps (sigmas 1 -> 1/steps, dynamic shift mu from the packed tokens per image) and its true CFG: Qwen-Image is
not guidance-distilled, so the text guidance is a branch, combined with JeDi's image guidance branches and then
rescaled to the fully conditioned branch's norm per token, as QwenImagePipeline rescales its CFG. LoRA in diffusers'
QwenImageLoraLoaderMixin format."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from jedi_train.models.joint_flux import pack, unpack
from jedi_train.models.joint_qwenimage import JointQwenImageTransformer2DModel
from jedi_train.pipelines.pipeline_jedi_mmdit import JeDiMMDiTPipeline


class JeDiQwenImagePipeline(JeDiMMDiTPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    joint_class = JointQwenImageTransformer2DModel

    def __init__(self, transformer, text_encoder, tokenizer, scheduler, vae: AutoencoderKLQwenImage):
        self._register_mmdit(transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)

    def prepare_timesteps(self, num_inference_steps: int, device, latent_size: int) -> None:
        """As QwenImagePipeline: sigmas linspace(1, 1/steps), mu = calculate_shift(packed tokens per image) with the
        scheduler's base/max lengths and shifts (its shift_terminal stretches the end, in the scheduler)."""
        c = self.scheduler.config
        mu = calculate_shift((latent_size // 2) ** 2, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    def combine_guidance(self, branches, preds: list[torch.Tensor]) -> torch.Tensor:
        """The weighted sum, rescaled per packed token to the norm of the branch with the text and the references
        (QwenImagePipeline: comb * |cond| / |comb|). One branch (no guidance): unchanged, as the pipeline."""
        comb = super().combine_guidance(branches, preds)
        cond = [p for b, p in zip(branches, preds) if b.text == "cond"]
        if len(branches) == 1 or not cond:
            return comb
        h, w = comb.shape[-2:]
        c, g = pack(cond[-1]), pack(comb)
        return unpack(g * (c.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True)), h, w)
