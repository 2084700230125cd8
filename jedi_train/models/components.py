"""The frozen parts around the joint UNet: tokenizer(s), text encoder(s), VAE (or pixel codec), scheduler.

One loader, `load_components(model_dir)`, reads a diffusers Stable-Diffusion directory of either family:
  * SD 1.x/2.x: unet/, text_encoder/, tokenizer/, scheduler/, vae/ (optional: pixel-space tiny models);
  * SDXL: the same plus text_encoder_2/ and tokenizer_2/ (its UNet takes pooled text + time ids);
  * FLUX.1: transformer/ (an MM-DiT) in place of unet/, CLIP + T5 text encoders, a flow-matching scheduler;
  * SD3 / SD3.5: transformer/ (an MM-DiT), three text encoders (CLIP-L, CLIP-G, T5), a flow-matching scheduler.
The family is read from the denoiser's config. A real download and the tiny offline models that
`tiny.create_tiny_model_dir` writes use the same path: tests exercise exactly what a user's directory goes through.
"""
from __future__ import annotations

import functools
import json
import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from jedi_train.models.joint import JeDiConfig
from jedi_train.models.joint_flux import load_joint_flux
from jedi_train.models.joint_sd3 import load_joint_sd3
from jedi_train.models.joint_unet import JointUNet2DConditionModel, load_joint_unet
from jedi_train.models.text import PromptEncoder, tokenize  # noqa: F401  (tokenize: re-exported for callers)

FAMILIES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL", "flux": "FLUX.1",
            "sd3": "Stable Diffusion 3"}
REQUIRED = {"sd": ("unet", "text_encoder", "tokenizer", "scheduler"),
            "sdxl": ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
            "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
            "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                    "tokenizer_2", "tokenizer_3", "scheduler")}
FLOW_FAMILIES = ("flux", "sd3")  # MM-DiTs trained by flow matching, their denoiser in transformer/
# transformer/config.json's _class_name (a base model, or a jedi-train export) -> family
TRANSFORMER_CLASSES = {"FluxTransformer2DModel": "flux", "JointFluxTransformer2DModel": "flux",
                       "SD3Transformer2DModel": "sd3", "JointSD3Transformer2DModel": "sd3"}


def denoiser_folder(family: str) -> str:
    return "transformer" if family in FLOW_FAMILIES else "unet"


class LatentCodec:
    """Images in [-1, 1] <-> the space the UNet denoises.

    With a VAE: latents, shifted and scaled by the VAE's shift_factor (FLUX) and scaling_factor. Without: pixels, optionally
    folded (pixel-unshuffle by `fold`: 2x2 blocks into channels), which gives a CPU model 4x more
    compute per pixel at the same cost.
    """

    def __init__(self, vae: AutoencoderKL | None = None, pixel_fold: int = 1):
        self.vae, self.fold = vae, pixel_fold

    @classmethod
    def of(cls, vae: AutoencoderKL | None, denoiser) -> LatentCodec:
        """The codec of a joint denoiser: its VAE, or (pixel-space models) the fold its settings record."""
        return cls(vae, 1 if vae is not None else (denoiser.jedi.pixel_fold or 1))

    @property
    def downsample(self) -> int:
        if self.vae is not None:
            return 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.fold

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, logvar) of the VAE posterior, unshifted and unscaled; pixels: (folded pixels, None).
        What `jedi-data encode` caches: `sample` of it is exactly `encode`."""
        if self.vae is None:
            return (F.pixel_unshuffle(images, self.fold) if self.fold > 1 else images), None
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return dist.mean, dist.logvar

    @torch.no_grad()
    def sample(self, mean: torch.Tensor, logvar: torch.Tensor | None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior (from `posterior` or a cache) -> latents the denoiser sees, drawn as the VAE draws them."""
        if logvar is None:
            return mean
        params = torch.cat([mean, logvar], dim=1).to(self.vae.dtype)
        return (DiagonalGaussianDistribution(params).sample(generator) - self.shift) * self.vae.config.scaling_factor

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True) -> torch.Tensor:
        """Images -> latents the denoiser sees: drawn from the posterior (training), or with sample=False its
        mean, the mode (sampling's reference photos: deterministic)."""
        mean, logvar = self.posterior(images)
        if sample or logvar is None:
            return self.sample(mean, logvar, generator)
        return (mean - self.shift) * self.vae.config.scaling_factor

    @property
    def shift(self) -> float:
        return self.vae.config.get("shift_factor") or 0.0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return F.pixel_shuffle(latents, self.fold) if self.fold > 1 else latents
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.shift).sample


@dataclass
class Components:
    unet: JointUNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    vae: AutoencoderKL | None
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL, FLUX (T5), SD3
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_3: torch.nn.Module | None = None  # SD3: T5
    tokenizer_3: object | None = None

    @property
    def codec(self) -> LatentCodec:
        return LatentCodec.of(self.vae, self.unet)

    @property
    def resolution(self) -> int:
        return model_resolution(self.unet, self.codec)

    @property
    def text(self) -> PromptEncoder:
        return PromptEncoder.of(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                                self.tokenizer_3, self.text_encoder_3)

    @property
    def family(self) -> str:
        return denoiser_family(self.unet)

    def drop_text_encoders(self) -> None:
        """Free the text encoders when every batch brings cached embeddings (jedi-data encode); tokenizers stay."""
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None

    def text_parts(self) -> dict:
        """The tokenizers and text encoders, by component name (what load_text_parts returns)."""
        return {k: getattr(self, k) for k in TEXT_PARTS}


def denoiser_family(model) -> str:
    if isinstance(model, FluxTransformer2DModel):
        return "flux"
    if isinstance(model, SD3Transformer2DModel):
        return "sd3"
    return "sdxl" if model.config.get("addition_embed_type") == "text_time" else "sd"


def model_resolution(denoiser, codec: LatentCodec) -> int:
    """Pixel size the model works at: sample size x the codec's downsampling (UNets, SD3); a FLUX transformer
    has no fixed size: the resolution it was made joint for (its _jedi settings)."""
    if denoiser_family(denoiser) == "flux":
        return int(denoiser.jedi.resolution)
    return denoiser.config.sample_size * codec.downsample


def model_family(model_dir: str) -> str:
    """'sd', 'sdxl', 'flux' or 'sd3', read from the denoiser's config; one clear error for anything else."""
    unet_cfg = os.path.join(model_dir, "unet", "config.json")
    if not os.path.isfile(unet_cfg):
        found = _pipeline_class(model_dir)
        transformer_cfg = os.path.join(model_dir, "transformer", "config.json")
        if os.path.isdir(os.path.join(model_dir, "transformer")):
            try:
                with open(transformer_cfg) as f:
                    cls = json.load(f).get("_class_name")
            except (OSError, ValueError):
                cls = None
            if cls in TRANSFORMER_CLASSES:
                return TRANSFORMER_CLASSES[cls]
            raise ValueError(f"model directory {model_dir} holds a diffusion transformer ({cls or found or 'transformer/'}"
                             f"{', ' + found if found and cls else ''}) that jedi-train does not support; it supports "
                             f"{', '.join(FAMILIES.values())}: point model.model_dir at one of those")
        return "sd"  # check_model_dir names the missing unet/
    with open(unet_cfg) as f:
        cfg = json.load(f)
    added = cfg.get("addition_embed_type")
    if added == "text_time":
        return "sdxl"
    if added is not None or cfg.get("_class_name", "UNet2DConditionModel") not in ("UNet2DConditionModel",
                                                                                  "JointUNet2DConditionModel"):
        raise ValueError(f"model directory {model_dir} holds a {cfg.get('_class_name')} with addition_embed_type="
                         f"{added!r} ({_pipeline_class(model_dir) or 'unknown pipeline'}); jedi-train supports "
                         f"{', '.join(FAMILIES.values())}")
    return "sd"


def _pipeline_class(model_dir: str) -> str | None:
    try:
        with open(os.path.join(model_dir, "model_index.json")) as f:
            return json.load(f).get("_class_name")
    except (OSError, ValueError):
        return None


def check_model_dir(model_dir: str) -> str:
    """The model's family; one clear error naming the missing path and component."""
    if not os.path.isdir(model_dir):
        why = "is a broken symlink or a symlink loop" if os.path.islink(model_dir) else "does not exist"
        raise FileNotFoundError(f"model directory {model_dir} {why}; set model.model_dir to a diffusers "
                                "Stable Diffusion directory (unet/ text_encoder/ tokenizer/ scheduler/ [vae/]; "
                                "SDXL also text_encoder_2/ tokenizer_2/)")
    family = model_family(model_dir)
    for comp in REQUIRED[family]:
        if not os.path.isdir(os.path.join(model_dir, comp)):
            why = " (its UNet takes SDXL's pooled text embeddings and time ids)" if family == "sdxl" else ""
            raise FileNotFoundError(f"model directory {model_dir} is a {FAMILIES[family]} model{why} but lacks the "
                                    f"'{comp}' component ({os.path.join(model_dir, comp)} is missing)")
    return family


def refuse_pickled_weights(load):
    """A `.bin` (pickle) weights file holding more than tensors is refused by the safe loader (torch.load with
    weights_only=True, so that a file cannot run code); diffusers says only "Unable to load weights": say why
    and how to convert."""
    @functools.wraps(load)
    def wrapper(*args, **kwargs):
        try:
            return load(*args, **kwargs)
        except OSError as e:
            found = re.search(r"checkpoint file for '([^']+\.bin)'", str(e))
            if found is None:
                raise
            raise ValueError(f"{found.group(1)} holds Python objects besides tensors, which the safe loader "
                             "(torch.load(weights_only=True)) refuses so that a file cannot run code; where you trust "
                             "it, convert the model to safetensors (from_pretrained, then save_pretrained(DIR, "
                             "safe_serialization=True)) and set model.model_dir to DIR") from None
    return wrapper


TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


@refuse_pickled_weights
def load_text_parts(model_dir: str, family: str) -> dict:
    """{component name: model} for TEXT_PARTS: the family's tokenizers and text encoders, None for the rest."""
    from transformers import AutoTokenizer, T5EncoderModel

    parts = dict.fromkeys(TEXT_PARTS)
    first_clip = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel  # SD3 pools both CLIPs' projections
    parts["text_encoder"] = first_clip.from_pretrained(model_dir, subfolder="text_encoder")
    parts["tokenizer"] = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    if family in ("sdxl", "sd3"):
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2")
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2")
    t5 = {"flux": "2", "sd3": "3"}.get(family)
    if t5:
        parts[f"text_encoder_{t5}"] = T5EncoderModel.from_pretrained(model_dir, subfolder=f"text_encoder_{t5}")
        parts[f"tokenizer_{t5}"] = AutoTokenizer.from_pretrained(model_dir, subfolder=f"tokenizer_{t5}")
    return parts


@refuse_pickled_weights
def load_denoiser(model_dir: str, jedi: JeDiConfig | None = None):
    """The joint denoiser alone (UNet, or FLUX's transformer). A base model is made joint with `jedi`; a
    saved joint model keeps its settings, except the reference-attention rule (no weights depend on it),
    which `jedi` sets when given."""
    family = check_model_dir(model_dir)
    make = jedi or JeDiConfig()
    if family in FLOW_FAMILIES:
        unet = (load_joint_flux if family == "flux" else load_joint_sd3)(model_dir, "transformer", make)
    else:
        if os.path.isdir(os.path.join(model_dir, "vae")):  # latents are not folded pixels, whatever their channels
            make = make.replace(pixel_fold=1)
        unet = load_joint_unet(model_dir, "unet", make)
    if jedi is not None:
        saved = unet.jedi
        kept = [f"{k}={v!r} (asked {getattr(jedi, k)!r})" for k, v in saved.to_dict().items()
                if k in ("conditioning", "reference_timestep", "reference_positions") and getattr(jedi, k) != v]
        if kept:  # the weights were trained with them: the saved ones win
            warnings.warn(f"{model_dir} holds a joint model made with {', '.join(kept)}; its saved settings are "
                          "kept (they shaped its weights): set model.* to match to silence this", stacklevel=2)
        if saved.reference_attention != jedi.reference_attention:
            unet.set_reference_attention(jedi.reference_attention)
    return unet


@refuse_pickled_weights
def load_components(model_dir: str, jedi: JeDiConfig | None = None, prediction_type: str | None = None,
                    dtype: torch.dtype | None = None, noise_schedule: dict | None = None) -> Components:
    """Load every component of a diffusers directory; the denoiser becomes (or stays) joint (see load_denoiser).
    noise_schedule: DDPMScheduler config overrides, e.g. {"rescale_betas_zero_snr": True} (zero terminal
    SNR: at t = 999 the noisy image holds nothing of the image, as sampling from pure noise assumes)."""
    family = check_model_dir(model_dir)
    has_vae = os.path.isdir(os.path.join(model_dir, "vae"))
    unet = load_denoiser(model_dir, jedi)
    text = load_text_parts(model_dir, family)
    if family in FLOW_FAMILIES:  # flow matching: the velocity is the only target
        if prediction_type not in (None, "flow") or noise_schedule:
            raise ValueError(f"{FAMILIES[family]} is a flow-matching model: set model.prediction_type=flow (not "
                             f"{prediction_type!r}) and model.noise_schedule=null")
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    else:
        if prediction_type == "flow":
            raise ValueError(f"prediction_type=flow is for flow-matching models (FLUX, SD3); {model_dir} is a "
                             f"{FAMILIES[family]} model: use epsilon, v_prediction or sample")
        sched_kwargs = {"prediction_type": prediction_type} if prediction_type else {}
        sched_kwargs.update(noise_schedule or {})
        noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler", **sched_kwargs)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae") if has_vae else None
    for frozen in (text["text_encoder"], text["text_encoder_2"], text["text_encoder_3"], vae):
        if frozen is not None:
            frozen.requires_grad_(False).eval()
            if dtype is not None:
                frozen.to(dtype)
    return Components(unet=unet, noise_scheduler=noise_scheduler, vae=vae, **text)
