"""`JeDiFlux2KleinPipeline`: JeDi on FLUX.2 Klein -- the joint FLUX.2 MM-DiT, one Qwen3 text encoder (layers 9/18/27,
Flux2KleinPipeline's prompt embeddings), the AutoencoderKLFlux2 latents patchified and batch-norm normalised
(`Flux2LatentCodec`), Klein's timesteps (sigmas 1 -> 1/steps shifted by its empirical, step-count-dependent mu),
and Klein's guidance: real classifier-free guidance for the base (undistilled) models, none for the step-distilled
ones (`is_distilled`, as Flux2KleinPipeline's config: the text guidance scale is then ignored; image guidance
still runs its branches). LoRA in diffusers' Flux2LoraLoaderMixin format."""
from __future__ import annotations

import numpy as np
from diffusers import AutoencoderKLFlux2
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from jedi_train.models.joint_flux2 import JointFlux2Transformer2DModel
from jedi_train.pipelines.pipeline_jedi_mmdit import JeDiMMDiTPipeline


class JeDiFlux2KleinPipeline(JeDiMMDiTPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    joint_class = JointFlux2Transformer2DModel

    def __init__(self, transformer, text_encoder, tokenizer, scheduler, vae: AutoencoderKLFlux2,
                 is_distilled: bool = False):
        self._register_mmdit(transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)
        self.register_to_config(is_distilled=is_distilled)

    @property
    def guidance_distilled(self) -> bool:
        """Step-distilled Klein (is_distilled): no CFG branch; a guidance-embedding transformer takes the scale."""
        return bool(self.config.get("is_distilled", False)) or bool(self.transformer.config.guidance_embeds)

    def prepare_timesteps(self, num_inference_steps: int, device, latent_size: int) -> None:
        """As Flux2KleinPipeline: sigmas linspace(1, 1/steps) (the scheduler's own with use_flow_sigmas), shifted
        by compute_empirical_mu(tokens per image, steps)."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if self.scheduler.config.get("use_flow_sigmas"):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=latent_size * latent_size, num_steps=num_inference_steps)
        self.scheduler.set_timesteps(num_inference_steps if sigmas is None else None, device=device, sigmas=sigmas,
                                     mu=mu)
