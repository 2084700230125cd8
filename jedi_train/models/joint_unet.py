"""Base diffusers UNet -> joint-image UNet (JeDi).

`JointUNet2DConditionModel` is a `UNet2DConditionModel` with
  * coupled self-attention processors on every attn1 (see attention.py),
  * reference conditioning: 'channels' (default; conv_in widened from C to 2C+1 input channels
    [noisy | clean reference or zeros | reference mask], new weights zero so the widened model
    starts equal to the base) or 'replacement' (no input change: references enter as (re-)noised
    images and are marked only by their timestep and the attention layout),
  * its JeDi settings (`JeDiConfig`, joint.py) stored in the model config under ``_jedi``, so
    `save_pretrained` / `from_pretrained` restore everything.

Any base checkpoint loads with `load_joint_unet(path)`: a plain SD 1.x/2.x ``unet/`` folder is
converted on load; a saved joint UNet is restored as it was.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from jedi_train.models.attention import SetLayout, joint_attn_processors
from jedi_train.models.joint import JeDiConfig, JointDenoiserMixin, infer_pixel_fold, widen
from jedi_train.models.text import TextEmbeddings


class JointUNet2DConditionModel(JointDenoiserMixin, UNet2DConditionModel):
    """A UNet2DConditionModel that denoises sets of images jointly. Call it with ``set_layout=``."""

    directory_hint = "a diffusers Stable Diffusion directory with a unet/ subfolder"
    joint_input_module = "conv_in"

    def joint_processors(self) -> dict:
        return joint_attn_processors(self)

    def denoise(self, sample, timestep, text, set_layout: SetLayout | None = None, guidance=None) -> torch.Tensor:
        """The prediction for assemble_input's output: the one call the objective and the pipeline make
        on any joint denoiser (guidance: for guidance-distilled transformers; a UNet has none)."""
        return self(sample, timestep, text, set_layout=set_layout).sample

    @property
    def latent_channels(self) -> int:
        """Channels of the image representation (4 for SD latents; 3*fold^2 for pixel models)."""
        return self.config.out_channels

    def _widen_input(self, config: JeDiConfig) -> JeDiConfig:
        c = self.config.in_channels
        if c != self.config.out_channels:
            raise ValueError(f"base UNet has in_channels={c} != out_channels={self.config.out_channels} "
                             "(an inpainting UNet?); start from a plain text-to-image UNet")
        if config.conditioning == "channels":
            self.conv_in = widen(self.conv_in, 2 * c + 1, keep=c)
            self.register_to_config(in_channels=2 * c + 1)
        fold = infer_pixel_fold(c) if config.pixel_fold is None else config.pixel_fold
        return config.replace(pixel_fold=int(fold), latent_channels=c)

    def forward(self, sample, timestep, encoder_hidden_states, *args, set_layout: SetLayout | None = None,
                cross_attention_kwargs=None, **kwargs):
        """encoder_hidden_states: a tensor, or TextEmbeddings (which carry SDXL's pooled text and time ids)."""
        if isinstance(encoder_hidden_states, TextEmbeddings):
            text = encoder_hidden_states.unet_kwargs()
            encoder_hidden_states = text["encoder_hidden_states"]
            kwargs.setdefault("added_cond_kwargs", text.get("added_cond_kwargs"))
        if set_layout is not None:
            cross_attention_kwargs = dict(cross_attention_kwargs or {}, set_layout=set_layout)
        return super().forward(sample, timestep, encoder_hidden_states, *args,
                               cross_attention_kwargs=cross_attention_kwargs, **kwargs)


def load_joint_unet(path: str, subfolder: str | None = "unet", jedi: JeDiConfig | None = None,
                    **from_pretrained_kwargs) -> JointUNet2DConditionModel:
    """Load a UNet from a diffusers directory; a base UNet is made joint with `jedi` (defaults when None;
    pixel_fold None: inferred from in_channels = 3 * fold^2), a joint one is restored as saved."""
    return JointUNet2DConditionModel.load(path, subfolder, jedi, **from_pretrained_kwargs)
