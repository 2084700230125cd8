"""JeDi on FLUX.2: `JeDiFlux2KleinPipeline` (Klein: one Qwen3 text encoder, layers 9/18/27, Flux2KleinPipeline's prompt
embeddings) and `JeDiFlux2Pipeline` (FLUX.2-dev: one Mistral-3 text encoder, layers 10/20/30 with FLUX.2's system
message, Flux2Pipeline's). Both: the joint FLUX.2 MM-DiT, the AutoencoderKLFlux2 latents patchified and batch-norm
normalised (`Flux2LatentCodec`), FLUX.2's timesteps (sigmas 1 -> 1/steps shifted by its empirical,
step-count-dependent mu) and LoRA in diffusers' Flux2LoraLoaderMixin format. Guidance: Klein base (undistilled)
runs real classifier-free guidance, the step-distilled Klein (`is_distilled`) none (the text guidance scale is then
ignored); FLUX.2-dev is guidance-distilled: the text guidance scale is an input of the model, as in Flux2Pipeline.
Image guidance runs its branches in every case."""
from __future__ import annotations

import numpy as np
from diffusers import AutoencoderKLFlux2
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

from jedi_train.models.joint_flux2 import JointFlux2Transformer2DModel
from jedi_train.pipelines.pipeline_jedi_mmdit import JeDiMMDiTPipeline


class _JeDiFlux2Base(JeDiMMDiTPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    joint_class = JointFlux2Transformer2DModel

    @property
    def guidance_distilled(self) -> bool:
        """A guidance-embedding transformer (FLUX.2-dev) takes the scale; a step-distilled Klein has no CFG branch."""
        return bool(self.config.get("is_distilled", False)) or bool(self.transformer.config.guidance_embeds)

    def prepare_timesteps(self, num_inference_steps: int, device, latent_size: int) -> None:
        """As Flux2Pipeline and Flux2KleinPipeline: sigmas linspace(1, 1/steps) (the scheduler's own with
        use_flow_sigmas), shifted by compute_empirical_mu(tokens per image, steps)."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if self.scheduler.config.get("use_flow_sigmas"):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=latent_size * latent_size, num_steps=num_inference_steps)
        self.scheduler.set_timesteps(num_inference_steps if sigmas is None else None, device=device, sigmas=sigmas,
                                     mu=mu)


class JeDiFlux2KleinPipeline(_JeDiFlux2Base):
    def __init__(self, transformer, text_encoder, tokenizer, scheduler, vae: AutoencoderKLFlux2,
                 is_distilled: bool = False):
        self._register_mmdit(transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)
        self.register_to_config(is_distilled=is_distilled)


class JeDiFlux2Pipeline(_JeDiFlux2Base):
    def __init__(self, transformer, text_encoder, tokenizer, scheduler, vae: AutoencoderKLFlux2):
        self._register_mmdit(transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)
