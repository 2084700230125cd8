"""`JeDiSD3Pipeline`: JeDi on Stable Diffusion 3 / 3.5 -- three text encoders (CLIP-L, CLIP-G, T5), real text
guidance (SD3 is not guidance-distilled: the unconditional branch runs), the scheduler's own shift
(StableDiffusion3Pipeline's timesteps)."""
from __future__ import annotations

from diffusers import AutoencoderKL
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from jedi_train.models.joint_sd3 import JointSD3Transformer2DModel
from jedi_train.pipelines.pipeline_jedi_mmdit import JeDiMMDiTPipeline


class JeDiSD3Pipeline(JeDiMMDiTPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    joint_class = JointSD3Transformer2DModel

    def __init__(self, transformer, text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer,
                 text_encoder_2: CLIPTextModelWithProjection, tokenizer_2: CLIPTokenizer, text_encoder_3, tokenizer_3,
                 scheduler, vae: AutoencoderKL):
        self._register_mmdit(transformer, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                             tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
                             scheduler=scheduler, vae=vae)
