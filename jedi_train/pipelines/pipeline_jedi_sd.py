"""`JeDiPipeline`: JeDi on Stable Diffusion 1.x/2.x and SDXL UNets (SDXL's second text encoder and tokenizer are
optional components), sampled with DDIM at "trailing" spacing. The loop itself is pipeline_jedi.py's."""
from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from jedi_train.models.joint_unet import JointUNet2DConditionModel
from jedi_train.pipelines.pipeline_jedi import JeDiBasePipeline


def _export_unet_class():
    """Exports before bundle.py named the UNet ["jedi_train", "JointUNet2DConditionModel"]. diffusers resolves
    that library from sys.modules and finds the loader by looking up its base classes (ModelMixin, ...) on
    the same module, so `jedi_train` must expose both names; its lazy __init__ does not expose ModelMixin."""
    try:
        import jedi_train
    except ImportError:  # running from an export's bundle: such exports name a plain diffusers UNet
        return
    from diffusers import ModelMixin

    for name, obj in (("JointUNet2DConditionModel", JointUNet2DConditionModel), ("ModelMixin", ModelMixin)):
        if getattr(jedi_train, name, None) is None:
            setattr(jedi_train, name, obj)



class JeDiPipeline(JeDiBasePipeline, StableDiffusionLoraLoaderMixin):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    # vae: None for pixel-space models; the second text encoder + tokenizer: SDXL only
    _optional_components: ClassVar[list[str]] = ["vae", "text_encoder_2", "tokenizer_2"]

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 scheduler, vae: AutoencoderKL | None = None,
                 text_encoder_2: CLIPTextModelWithProjection | None = None, tokenizer_2: CLIPTokenizer | None = None):
        super().__init__()
        unet = JointUNet2DConditionModel.adopt(unet)  # saved as a plain UNet2DConditionModel (see bundle.py)
        if not isinstance(unet, JointUNet2DConditionModel) or unet.jedi is None:
            raise ValueError(f"the pipeline's unet is a plain {type(unet).__name__} without JeDi settings (_jedi), "
                             "not a joint UNet; export the trained model with jedi-export (or convert it with "
                             "load_joint_unet)")
        if vae is None and unet.latent_channels != 3 * unet.jedi.pixel_fold ** 2:
            raise ValueError(f"no vae, but the unet has {unet.latent_channels} channels (not pixels folded by "
                             f"{unet.jedi.pixel_fold}); the pipeline directory is missing its vae/")
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError("an SDXL pipeline needs both text_encoder_2 and tokenizer_2; one of them is missing")
        wants_pooled = unet.config.get("addition_embed_type") == "text_time"
        if wants_pooled != (text_encoder_2 is not None):
            raise ValueError("the unet takes SDXL's pooled text embeddings and time ids but the pipeline has no "
                             "text_encoder_2/tokenizer_2" if wants_pooled else
                             "text_encoder_2 is given but the unet is not an SDXL UNet (no text_time embedding)")
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              vae=vae, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self._finish_init()

    # -- persistence -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        _export_unet_class()
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @staticmethod
    def sampling_scheduler(noise_scheduler):
        """DDIM with "trailing" spacing (same betas and prediction type; sampling starts at t = 999, not 960 as
        "leading" does)."""
        return DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing")

    def noise_references(self, ref_latents: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        ddpm = DDPMScheduler.from_config(self.scheduler.config)
        return ddpm.add_noise(ref_latents, noise, t.float().round().long().expand(ref_latents.shape[0]))

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' LoRA loading, plus the full weights a jedi-train LoRA export carries beside the adapter
        (the joint UNet's widened conv_in trains in full: `unet.<name>` keys without 'lora')."""
        state, alphas, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict,
                                                       return_lora_metadata=True, **kwargs)
        self._load_full_weights(state, "unet")
        self.load_lora_into_unet(state, network_alphas=alphas, unet=self.unet, adapter_name=adapter_name,
                                 metadata=metadata, _pipeline=self)

