"""`JeDiFluxPipeline`: JeDi on FLUX.1 -- the joint MM-DiT, CLIP + T5 text, the flow-matching scheduler with
FLUX's resolution-dependent shift, and for guidance-distilled checkpoints (FLUX.1-dev) the text guidance scale
fed to the model (image guidance still runs its branches)."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

from jedi_train.models.joint_flux import JointFluxTransformer2DModel, flow_mu
from jedi_train.pipelines.pipeline_jedi_mmdit import JeDiMMDiTPipeline


class JeDiFluxPipeline(JeDiMMDiTPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    joint_class = JointFluxTransformer2DModel
    lora_load_kwargs: ClassVar[dict] = {"network_alphas": None}  # FLUX's loader requires them

    def __init__(self, transformer, text_encoder: CLIPTextModel, tokenizer, text_encoder_2, tokenizer_2, scheduler,
                 vae: AutoencoderKL):
        self._register_mmdit(transformer, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                             tokenizer_2=tokenizer_2, scheduler=scheduler, vae=vae)

    @property
    def guidance_distilled(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def prepare_timesteps(self, num_inference_steps: int, device, latent_size: int) -> None:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)  # as FluxPipeline
        mu = flow_mu(self.scheduler.config, (latent_size // 2) ** 2)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device, **({"mu": mu} if mu is not None else {}))
