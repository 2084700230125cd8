"""The frozen parts around the joint denoiser: tokenizer(s), text encoder(s), VAE (or pixel codec), scheduler.

One loader, `load_components(model_dir)`, reads a diffusers directory of any family in the family table
(families.py: SD 1.x/2.x, SDXL, FLUX.1, SD3 / SD3.5): the row says which folders it has, which text encoders,
which scheduler. A real download and the tiny offline models that `tiny.create_tiny_model_dir` writes use the
same path: tests exercise exactly what a user's directory goes through.
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
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTokenizer

from jedi_train.models import families
from jedi_train.models.families import Family
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.text import PromptEncoder, tokenize  # noqa: F401  (tokenize: re-exported for callers)


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
        """The codec of a joint denoiser: its VAE, or (pixel-space models) the fold its settings record; the
        family table's codec_class (e.g. FLUX.2's patchified, batch-norm-normalised latents)."""
        codec = families.family_of(denoiser).codec() if cls is LatentCodec and vae is not None else cls
        return codec(vae, 1 if vae is not None else (denoiser.jedi.pixel_fold or 1))

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
    denoiser: torch.nn.Module  # the joint UNet or MM-DiT: the one module that trains
    text_encoder: torch.nn.Module
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler
    vae: AutoencoderKL | None
    text_encoder_2: torch.nn.Module | None = None  # SDXL, FLUX (T5), SD3
    tokenizer_2: object | None = None
    text_encoder_3: torch.nn.Module | None = None  # SD3: T5
    tokenizer_3: object | None = None
    family_row: Family | None = None  # the row the model directory was recognised as (None: from the denoiser)

    def __post_init__(self):
        if self.family_row is None:
            self.family_row = families.family_of(self.denoiser)

    @property
    def codec(self) -> LatentCodec:
        return LatentCodec.of(self.vae, self.denoiser)

    @property
    def resolution(self) -> int:
        return model_resolution(self.denoiser, self.codec)

    @property
    def family(self) -> str:
        return self.family_row.name

    @property
    def text(self) -> PromptEncoder:
        return PromptEncoder.of(self.family_row.text_layout, self.tokenizer, self.text_encoder, self.tokenizer_2,
                                self.text_encoder_2, self.tokenizer_3, self.text_encoder_3)

    def drop_text_encoders(self) -> None:
        """Free the text encoders when every batch brings cached embeddings (jedi-data encode); tokenizers stay."""
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None

    def text_parts(self) -> dict:
        """The tokenizers and text encoders, by component name (what load_text_parts returns)."""
        return {k: getattr(self, k) for k in TEXT_PARTS}


def model_resolution(denoiser, codec: LatentCodec) -> int:
    """Pixel size the model works at: sample size x the codec's downsampling (UNets, SD3); a family without a
    fixed size (FLUX): the resolution it was made joint for (its _jedi settings)."""
    if not families.family_of(denoiser).fixed_resolution:
        return int(denoiser.jedi.resolution)
    return denoiser.config.sample_size * codec.downsample


def check_model_dir(model_dir: str) -> str:
    """The model's family; one clear error naming the missing path and component."""
    if not os.path.isdir(model_dir):
        why = ("is a file, not a directory" if os.path.isfile(model_dir) else
               "is a broken symlink or a symlink loop" if os.path.islink(model_dir) else "does not exist")
        raise FileNotFoundError(f"model directory {model_dir} {why}; set model.model_dir to a diffusers "
                                "Stable Diffusion directory (unet/ text_encoder/ tokenizer/ scheduler/ [vae/]; "
                                "SDXL also text_encoder_2/ tokenizer_2/)")
    folders = sorted({f.denoiser_folder for f in families.FAMILIES.values()})
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")) and \
            not any(os.path.isdir(os.path.join(model_dir, f)) for f in folders):
        what = "is empty" if not os.listdir(model_dir) else "holds no diffusers model"
        raise FileNotFoundError(f"model directory {model_dir} {what} (no model_index.json, no "
                                f"{' or '.join(f + '/' for f in folders)}); point it at a diffusers model directory "
                                f"({families.supported()})")
    family = families.family_of_dir(model_dir)
    for comp in family.required:
        if not os.path.isdir(os.path.join(model_dir, comp)):
            why = f" ({family.recognised_by})" if family.recognised_by else ""
            raise FileNotFoundError(f"model directory {model_dir} is a {family.title} model{why} but lacks the "
                                    f"'{comp}' component ({os.path.join(model_dir, comp)} is missing)")
    return family.name


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


def check_text_encoder(model_dir: str, row: Family, slot: int) -> None:
    """The row's text encoder class must be what <encoder folder>/config.json describes (its model_type): another
    model's encoder (e.g. Qwen3 in a Qwen-Image directory) would load with random weights or fail deep inside."""
    folder = row.encoder_folders[slot]
    path = os.path.join(model_dir, folder, "config.json")
    try:
        with open(path) as f:
            found = json.load(f).get("model_type")
    except (OSError, ValueError):
        raise FileNotFoundError(f"model directory {model_dir} is a {row.title} model but {path} is missing or "
                                f"unreadable; {folder}/ must hold the {row.text_encoders[slot][0]} it was released "
                                "with") from None
    cls = row.text_encoder_class(slot)
    want = cls.config_class.model_type
    if found and want and found != want:
        raise ValueError(f"model directory {model_dir} is a {row.title} model but its {folder} is a {found!r} model; "
                         f"{row.title} needs a {cls.__name__} ({want!r}) there: copy the {folder}/ folder of the "
                         f"{row.title} release")


@refuse_pickled_weights
def load_text_parts(model_dir: str, family: str) -> dict:
    """{component name: model} for TEXT_PARTS: the family's tokenizers and text encoders, None for the rest."""
    row = families.get(family)
    parts = dict.fromkeys(TEXT_PARTS)
    for slot, (encoder, tokenizer) in enumerate(zip(row.encoder_folders, row.tokenizers)):
        check_text_encoder(model_dir, row, slot)
        parts[encoder] = row.text_encoder_class(slot).from_pretrained(model_dir, subfolder=encoder)
        parts[tokenizer] = row.tokenizer_class(slot).from_pretrained(model_dir, subfolder=tokenizer)
    return parts


@refuse_pickled_weights
def load_denoiser(model_dir: str, jedi: JeDiConfig | None = None):
    """The joint denoiser alone (the family's joint class). A base model is made joint with `jedi`; a
    saved joint model keeps its settings, except the reference-attention rule (no weights depend on it),
    which `jedi` sets when given."""
    family = families.get(check_model_dir(model_dir))
    make = jedi or JeDiConfig()
    if not family.needs_vae and os.path.isdir(os.path.join(model_dir, "vae")):  # latents, not folded pixels
        make = make.replace(pixel_fold=1)
    denoiser = family.joint().load(model_dir, family.denoiser_folder, make)
    if jedi is not None:
        saved = denoiser.jedi
        kept = [f"{k}={v!r} (asked {getattr(jedi, k)!r})" for k, v in saved.to_dict().items()
                if k in ("conditioning", "reference_timestep", "reference_positions") and getattr(jedi, k) != v]
        if kept:  # the weights were trained with them: the saved ones win
            warnings.warn(f"{model_dir} holds a joint model made with {', '.join(kept)}; its saved settings are "
                          "kept (they shaped its weights): set model.* to match to silence this", stacklevel=2)
        if saved.reference_attention != jedi.reference_attention:
            denoiser.set_reference_attention(jedi.reference_attention)
    return denoiser


@refuse_pickled_weights
def load_components(model_dir: str, jedi: JeDiConfig | None = None, prediction_type: str | None = None,
                    dtype: torch.dtype | None = None, noise_schedule: dict | None = None) -> Components:
    """Load every component of a diffusers directory; the denoiser becomes (or stays) joint (see load_denoiser).
    noise_schedule: DDPMScheduler config overrides, e.g. {"rescale_betas_zero_snr": True} (zero terminal
    SNR: at t = 999 the noisy image holds nothing of the image, as sampling from pure noise assumes)."""
    family = families.get(check_model_dir(model_dir))
    has_vae = os.path.isdir(os.path.join(model_dir, "vae"))
    denoiser = load_denoiser(model_dir, jedi)
    text = load_text_parts(model_dir, family.name)
    if family.flow_matching:  # the velocity is the only target
        if prediction_type not in (None, "flow") or noise_schedule:
            raise ValueError(f"{family.title} is a flow-matching model: set model.prediction_type=flow (not "
                             f"{prediction_type!r}) and model.noise_schedule=null")
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    else:
        if prediction_type == "flow":
            raise ValueError(f"prediction_type=flow is for flow-matching models (FLUX, SD3); {model_dir} is a "
                             f"{family.title} model: use epsilon, v_prediction or sample")
        sched_kwargs = {"prediction_type": prediction_type} if prediction_type else {}
        sched_kwargs.update(noise_schedule or {})
        noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler", **sched_kwargs)
    vae = family.vae().from_pretrained(model_dir, subfolder="vae") if has_vae else None
    for frozen in (text["text_encoder"], text["text_encoder_2"], text["text_encoder_3"], vae):
        if frozen is not None:
            frozen.requires_grad_(False).eval()
            if dtype is not None:
                frozen.to(dtype)
    return Components(denoiser=denoiser, noise_scheduler=noise_scheduler, vae=vae, family_row=family, **text)
