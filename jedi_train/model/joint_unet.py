"""Base diffusers UNet -> joint-image UNet (JeDi).

`JointUNet2DConditionModel` is a `UNet2DConditionModel` with
  * coupled self-attention processors on every attn1 (see attention.py),
  * reference conditioning: 'channels' (default; conv_in widened from C to 2C+1 input channels
    [noisy | clean reference or zeros | reference mask], new weights zero so the widened model
    starts equal to the base) or 'replacement' (no input change: references enter as (re-)noised
    images and are marked only by their timestep and the attention layout),
  * its JeDi settings stored in the model config under ``_jedi`` (a private key diffusers keeps
    without warnings), so `save_pretrained` / `from_pretrained` restore everything.

Any base checkpoint loads with `load_joint_unet(path)`: a plain SD 1.x/2.x ``unet/`` folder is
converted on load; a saved joint UNet is restored as it was.
"""
from __future__ import annotations

import os

import torch
from diffusers import UNet2DConditionModel

from .attention import SetLayout, joint_attn_processors
from .text import TextEmbeddings

CONDITIONING_MODES = ("channels", "replacement")
REFERENCE_TIMESTEPS = ("zero", "target")


class JointUNet2DConditionModel(UNet2DConditionModel):
    """A UNet2DConditionModel that denoises sets of images jointly. Call it with ``set_layout=``."""

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, **kwargs):
        model = super().from_config(config, **kwargs)
        out = model[0] if isinstance(model, tuple) else model
        if out.jedi is not None:  # a saved joint model: reinstall the processors
            out.set_attn_processor(joint_attn_processors(out))
        return model

    joint_input_module = "conv_in"  # the weights 'channels' conditioning widens (trained in full under LoRA)

    @property
    def jedi(self) -> dict | None:
        return self.config.get("_jedi")

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

    def make_joint(self, conditioning: str = "channels", reference_timestep: str = "zero",
                   pixel_fold: int = 1) -> JointUNet2DConditionModel:
        """Convert this (base) UNet in place. Outputs are unchanged for sets of one image without references."""
        if self.jedi is not None:
            raise ValueError("this UNet is already a joint UNet")
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning={conditioning!r} is unknown; use one of {CONDITIONING_MODES}")
        if reference_timestep not in REFERENCE_TIMESTEPS:
            raise ValueError(f"reference_timestep={reference_timestep!r} is unknown; use one of {REFERENCE_TIMESTEPS}")
        c = self.config.in_channels
        if c != self.config.out_channels:
            raise ValueError(f"base UNet has in_channels={c} != out_channels={self.config.out_channels} "
                             "(an inpainting UNet?); start from a plain text-to-image UNet")
        if conditioning == "channels":
            old = self.conv_in
            new = torch.nn.Conv2d(2 * c + 1, old.out_channels, old.kernel_size, old.stride, old.padding,
                                  device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight.zero_()
                new.weight[:, :c] = old.weight
                new.bias.copy_(old.bias)
            self.conv_in = new
            self.register_to_config(in_channels=2 * c + 1)
        self.register_to_config(_jedi={"conditioning": conditioning, "reference_timestep": reference_timestep,
                                       "pixel_fold": int(pixel_fold), "latent_channels": c})
        self.set_attn_processor(joint_attn_processors(self))
        return self

    # -- inputs --------------------------------------------------------------------------------
    def assemble_input(self, noisy: torch.Tensor, clean: torch.Tensor, ref_visible: torch.Tensor) -> torch.Tensor:
        """UNet input for a flat batch of B*N images.

        noisy: (B*N, C, h, w) what the UNet denoises; clean: (B*N, C, h, w) clean latents;
        ref_visible: (B*N,) bool, True where the image is a reference the targets may use.
        """
        if self.jedi is None:
            raise ValueError("call make_joint() (or load with load_joint_unet) before using the joint UNet")
        if self.jedi["conditioning"] == "replacement":
            return noisy
        m = ref_visible.to(noisy.dtype)[:, None, None, None]
        mask = m.expand(-1, 1, *noisy.shape[2:])
        return torch.cat([noisy, clean * m, mask], dim=1)

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


def as_joint_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A joint UNet's folder loaded as a plain UNet2DConditionModel (exports name the UNet that way, so
    generic diffusers loading needs no jedi_train) -> the joint UNet it is: same weights and config,
    joint methods and processors. Anything else is returned unchanged."""
    if type(unet) is UNet2DConditionModel and unet.config.get("_jedi") is not None:
        unet.__class__ = JointUNet2DConditionModel  # adds methods only: no state to initialise
        unet.set_attn_processor(joint_attn_processors(unet))
    return unet


def load_joint_unet(path: str, subfolder: str | None = "unet", conditioning: str = "channels",
                    reference_timestep: str = "zero", pixel_fold: int | None = None,
                    **from_pretrained_kwargs) -> JointUNet2DConditionModel:
    """Load a UNet from a diffusers directory; convert it to a joint UNet if it is a base UNet.

    pixel_fold: for pixel-space models (no VAE), the pixel-unshuffle factor; inferred from
    in_channels = 3 * fold^2 when None.
    """
    where = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(where):
        raise FileNotFoundError(f"UNet folder {where} does not exist; point model.model_dir at a diffusers model "
                                "directory with a unet/ subfolder")
    if not os.path.isfile(os.path.join(where, "config.json")):
        raise FileNotFoundError(f"UNet folder {where} has no config.json; is it a diffusers UNet?")
    unet = JointUNet2DConditionModel.from_pretrained(path, subfolder=subfolder, **from_pretrained_kwargs)
    if unet.jedi is None:
        if pixel_fold is None:
            c = unet.config.in_channels
            fold = round((c / 3) ** 0.5)
            pixel_fold = fold if 3 * fold * fold == c else 1
        unet.make_joint(conditioning, reference_timestep, pixel_fold)
    return unet
