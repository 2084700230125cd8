"""Batch of sets -> noised targets (references clean) -> joint UNet -> loss on targets only.

Plain PyTorch: the LightningModule and the benchmarks call it; it knows nothing of Lightning.

batch (from the data stream, see data_pipelines/stream.py):
    pixel_values (B, N, 3, H, W) in [-1, 1]; input_ids (B, N, T) [(B, N, 2, T) for SDXL]; is_ref (B, N); valid (B, N);
    optional subject_mask (B, N, 1, H, W) in [0, 1] (procedural shards carry it); size_crop (B, N, 4): original
    height, width and crop top, left of each image (the stream records them: SDXL's time_ids)
    optional cached encodings (shards written by `jedi-data encode`, any float dtype; used instead of the
    frozen VAE / text encoders when present): latent_mean (B, N, C, h, w) [+ latent_logvar, same shape: a VAE
    posterior, sampled each step as the VAE would]; text_hidden (B, N, T, D) [+ text_pooled (B, N, P),
    text_time_ids (B, N, 6)]; text_empty_hidden (1, T, D) [+ text_empty_pooled, text_empty_time_ids]: the
    "" caption, for caption dropout
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from jedi_train.models.attention import SetLayout
from jedi_train.models.components import Components
from jedi_train.models.joint_flux import shifted_sigmas
from jedi_train.models.text import TEXT_FIELDS, PromptEncoder, TextEmbeddings, sdxl_time_ids


@dataclass
class ObjectiveConfig:
    caption_dropout: float = 0.1  # per target image: caption -> "" (text CFG)
    reference_dropout: float = 0.1  # per set: references hidden (image guidance)
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting; None = plain MSE
    # what snr_gamma clips, as a weight on the x0 error: "min_snr" min(snr, gamma) (Hang et al. 2023) or "v"
    # min(1 + snr, gamma), the loss of a v-prediction (x0 error / sigma^2) clipped: low-noise steps, where
    # details are decided, weigh up to gamma x more while high-noise ones keep weight ~1 (JiT's x-pred, v-loss)
    snr_weighting: str = "min_snr"
    # per reference image: caption -> "", so uncaptioned user photos are in distribution (None: caption_dropout)
    reference_caption_dropout: float | None = None
    subject_loss_weight: float = 1.0  # loss weight of subject pixels (needs subject_mask); 1 = plain MSE
    # a set's timestep is drawn from [high_timestep_min, T) with this probability, else from [0, T): identity
    # can only come from the references where the noisy target no longer shows it (high t)
    high_timestep_prob: float = 0.0
    high_timestep_min: int = 400
    guidance_embedding: float = 1.0  # the guidance value guidance-distilled transformers (FLUX.1-dev) train with


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(M, 1, H, W) pixel mask -> (M, 1, h, w) coverage of each latent cell (area average)."""
    return mask if tuple(mask.shape[-2:]) == tuple(size) else F.interpolate(mask, size=size, mode="area")


def cached_text(batch: dict, prefix: str, dtype: torch.dtype) -> TextEmbeddings:
    """batch[prefix + field] for each TextEmbeddings field present (text_hidden, text_pooled, ...)."""
    return TextEmbeddings(*(batch[prefix + f].to(dtype) if prefix + f in batch else None for f in TEXT_FIELDS))


@dataclass
class Dropout:
    """Which conditions were dropped in one step (kept so tests and logs can see them)."""

    caption: torch.Tensor  # (B, N) bool
    reference: torch.Tensor  # (B,) bool


class JeDiObjective:
    def __init__(self, components: Components, config: ObjectiveConfig | None = None):
        self.c = components
        self.cfg = config or ObjectiveConfig()
        self.empty_ids = self.text.token_ids([""])[0]  # (T,) or (2, T) for SDXL
        # flow matching (FLUX): x_t = (1 - sigma) x0 + sigma noise, t = 1000 sigma, target = noise - x0
        self.prediction_type = components.noise_scheduler.config.get("prediction_type") or "flow"
        if self.cfg.snr_weighting not in ("min_snr", "v"):
            raise ValueError(f"objective.snr_weighting={self.cfg.snr_weighting!r} is unknown; use min_snr or v")

    @property
    def text(self) -> PromptEncoder:  # not kept: Components.drop_text_encoders must free the encoders
        return self.c.text

    # -- pieces --------------------------------------------------------------------------------
    def sample_dropout(self, is_ref: torch.Tensor, valid: torch.Tensor, generator=None) -> Dropout:
        b, n = is_ref.shape
        u = torch.rand(b, n + 1, generator=generator, device=is_ref.device)
        ref_rate = self.cfg.caption_dropout if self.cfg.reference_caption_dropout is None \
            else self.cfg.reference_caption_dropout
        rate = torch.where(is_ref, torch.full_like(u[:, :n], ref_rate), torch.full_like(u[:, :n], self.cfg.caption_dropout))
        caption = (u[:, :n] < rate) & valid
        reference = (u[:, n] < self.cfg.reference_dropout) & (is_ref & valid).any(1)
        return Dropout(caption, reference)

    def encode_text(self, input_ids: torch.Tensor) -> TextEmbeddings:
        return self.text.embed(input_ids, self.c.resolution)

    def latents(self, batch: dict, generator=None) -> torch.Tensor:
        """(B*N, C, h, w): the cached posterior sampled, else the images encoded (frozen VAE / pixel fold)."""
        pixels = batch["pixel_values"]
        if "latent_mean" in batch:
            logvar = batch.get("latent_logvar")
            return self.c.codec.sample(batch["latent_mean"].flatten(0, 1).to(pixels.dtype),
                                       None if logvar is None else logvar.flatten(0, 1).to(pixels.dtype), generator)
        return self.c.codec.encode(pixels.flatten(0, 1), generator)

    def text_conditioning(self, batch: dict, caption_dropped: torch.Tensor) -> TextEmbeddings:
        """One row per image, captions dropped to "": cached embeddings when the batch has them, else encoded.
        SDXL's size/crop micro-conditioning comes from the images' own sizes and crops (batch["size_crop"])."""
        text = self._text_rows(batch, caption_dropped)
        if text.time_ids is not None and "size_crop" in batch:
            sizes = batch["size_crop"].flatten(0, 1).to(text.time_ids.device)
            text = replace(text, time_ids=sdxl_time_ids(sizes, self.c.resolution).to(text.time_ids))
        return text

    def _text_rows(self, batch: dict, caption_dropped: torch.Tensor) -> TextEmbeddings:
        if "text_hidden" in batch:
            dtype = batch["pixel_values"].dtype
            rows = cached_text(batch, "text_", dtype).apply(lambda x: x.flatten(0, 1))
            drop = caption_dropped.flatten()
            return rows.apply(lambda x, e: torch.where(drop.view(-1, *[1] * (x.dim() - 1)), e.to(x.device), x),
                              cached_text(batch, "text_empty_", dtype))
        ids = batch["input_ids"]
        drop = caption_dropped.view(*caption_dropped.shape, *[1] * (ids.dim() - 2))
        return self.encode_text(torch.where(drop, self.empty_ids.to(ids.device), ids).flatten(0, 1))

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.snr_gamma is None:
            return None
        # the weight is set on the x0 error and divided by how much larger each parameterisation's squared
        # error is: snr + 1 (v), snr (epsilon), 1 / sigma^2 (flow: x0 = x_t - sigma * velocity), so one recipe
        # means the same on every family
        if self.prediction_type == "flow":  # x_t = (1 - s) x0 + s noise: snr = ((1 - s) / s)^2
            sigma = (timesteps.float() / 1000).clamp(1e-4, 1.0)
            snr, error_scale = ((1 - sigma) / sigma) ** 2, sigma ** -2
        else:
            snr = compute_snr(self.c.noise_scheduler, timesteps)
            error_scale = {"v_prediction": snr + 1, "sample": 1.0}.get(self.prediction_type, snr)
        return torch.clamp(snr + (self.cfg.snr_weighting == "v"), max=self.cfg.snr_gamma) / error_scale

    def sample_timesteps(self, b: int, device, generator=None, latent_size: tuple[int, int] | None = None):
        """One per set: integers in [0, T) (DDPM) or, for flow matching, 1000 x the shifted sigma (float)."""
        if self.prediction_type == "flow":
            low = self.cfg.high_timestep_min / 1000 if self.cfg.high_timestep_prob > 0 else 0.0
            u = torch.rand(b, generator=generator, device=device)
            if low:
                pick = torch.rand(b, generator=generator, device=device) < self.cfg.high_timestep_prob
                u = torch.where(pick, low + (1 - low) * u, u)
            seq = self.c.denoiser.image_tokens(*latent_size) if latent_size else 256  # the family's tokens
            return 1000 * shifted_sigmas(u, self.c.noise_scheduler.config, seq)
        T = self.c.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, T, (b,), generator=generator, device=device)
        if self.cfg.high_timestep_prob > 0:
            high = torch.randint(min(self.cfg.high_timestep_min, T - 1), T, (b,), generator=generator, device=device)
            pick = torch.rand(b, generator=generator, device=device) < self.cfg.high_timestep_prob
            t = torch.where(pick, high, t)
        return t

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t_img: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "flow":
            sigma = (t_img.float() / 1000).view(-1, *[1] * (latents.dim() - 1)).to(latents.dtype)
            return (1 - sigma) * latents + sigma * noise
        return self.c.noise_scheduler.add_noise(latents, noise, t_img)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t_img: torch.Tensor) -> torch.Tensor:
        """What the UNet predicts. "sample" (x0): the UNet never has to reproduce the noise, which a small
        pixel-space model with large patches (pixel_fold 4: 48 values per token) cannot do early in training
        (with epsilon/v it leaves part of the noise in every sampling step: docs/experiments.md)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.c.noise_scheduler.get_velocity(latents, noise, t_img)
        if self.prediction_type == "sample":
            return latents
        if self.prediction_type == "flow":
            return noise - latents
        raise ValueError(f"prediction_type={self.prediction_type!r} is not supported; use epsilon, v_prediction "
                         "or sample")

    # -- the step ------------------------------------------------------------------------------
    def __call__(self, batch: dict, noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                 dropout: Dropout | None = None, generator: torch.Generator | None = None,
                 return_error: bool = False) -> dict:
        """return_error: also return the per-element squared error (B*N, C, h, w), detached."""
        denoiser = self.c.denoiser
        pixels, ids = batch["pixel_values"], batch["input_ids"]
        is_ref = batch["is_ref"].bool()
        valid = batch.get("valid", torch.ones_like(is_ref)).bool()
        if pixels.dim() != 5:
            raise ValueError(f"pixel_values must be (sets, set_size, 3, H, W), got {tuple(pixels.shape)}")
        b, n = pixels.shape[:2]
        if is_ref.shape != (b, n) or ids.shape[:2] != (b, n):
            raise ValueError(f"is_ref {tuple(is_ref.shape)} / input_ids {tuple(ids.shape)} do not match "
                             f"the {b} sets x {n} images of pixel_values")
        device = pixels.device
        dropout = dropout or self.sample_dropout(is_ref, valid, generator)
        layout = SetLayout.build(is_ref, valid, coupled=~dropout.reference)  # raises if a set has no target

        latents = self.latents(batch, generator)  # (B*N, C, h, w), frozen
        text = self.text_conditioning(batch, dropout.caption)

        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        if timesteps is None:  # one timestep per set: a set's targets are denoised together at inference
            timesteps = self.sample_timesteps(b, device, generator, tuple(latents.shape[-2:]))
        t_img = timesteps.repeat_interleave(n)
        ref_flat = is_ref.flatten()
        noisy = self.add_noise(latents, noise, t_img)
        if denoiser.jedi.reference_timestep == "zero":  # references enter clean, at t = 0
            t_img = torch.where(ref_flat, torch.zeros_like(t_img), t_img)
            noisy = torch.where(ref_flat[:, None, None, None], latents, noisy)
        ref_visible = (is_ref & valid & ~dropout.reference[:, None]).flatten()
        model_in = denoiser.assemble_input(noisy, latents, ref_visible)

        pred = denoiser.denoise(model_in, t_img, text, layout, guidance=self.cfg.guidance_embedding)
        target = self.target(latents, noise, t_img)
        error = F.mse_loss(pred.float(), target.float(), reduction="none")
        if self.cfg.subject_loss_weight != 1.0 and "subject_mask" in batch:
            m = latent_mask(batch["subject_mask"].flatten(0, 1).to(error), error.shape[-2:])
            per_image = (error * (1 + (self.cfg.subject_loss_weight - 1) * m)).mean(dim=(1, 2, 3))
        else:
            per_image = error.mean(dim=(1, 2, 3))
        weights = self.loss_weights(t_img)
        if weights is not None:
            per_image = per_image * weights
        keep = (valid & ~is_ref).flatten()  # references and padding get no loss (indexing: no NaN*0)
        loss = per_image[keep].mean()
        out = {"loss": loss, "per_image_loss": per_image.detach(), "loss_mask": keep, "dropout": dropout,
               "num_targets": int(keep.sum()), "timesteps": timesteps}
        if return_error:
            out["error"] = error.detach()
        return out


@torch.no_grad()
def identity_gain(objective: JeDiObjective, batch: dict, timesteps=(500, 700, 900), seeds=(0, 1, 2, 3)) -> dict:
    """How much the references help on the SUBJECT's pixels: per set, 1 - err(refs visible) / err(refs
    hidden), the squared error summed over its targets' subject pixels, the noise seeds and timesteps
    (same noise and t in both). 0 = references ignored; > 0 = used. Background pixels are left out: cutting
    a target off from its references shifts its background too, which says nothing about identity.

    Needs batch["subject_mask"] and at least one reference per set (e.g. fixed sets with exactly one).
    Returns {"gain": mean over sets, "se": its standard error, "per_set": (B,) gains, "n_sets": B}.
    """
    if "subject_mask" not in batch:
        raise ValueError("identity_gain needs subject masks (batch['subject_mask']); procedural shards written "
                         "with generator.masks=true carry them")
    is_ref = batch["is_ref"].bool()
    valid = batch.get("valid", torch.ones_like(is_ref)).bool()
    b, n = is_ref.shape
    if not bool((is_ref & valid).any(1).all()):
        raise ValueError("identity_gain needs at least one reference in every set")
    device = batch["pixel_values"].device
    no_caption = torch.zeros(b, n, dtype=torch.bool, device=device)
    target = (valid & ~is_ref).flatten()
    latent_shape = objective.c.codec.encode(batch["pixel_values"][:1, :1].flatten(0, 1)).shape[1:]
    mask = latent_mask(batch["subject_mask"].flatten(0, 1).to(device).float(), latent_shape[-2:])
    sums = torch.zeros(2, b, dtype=torch.float64, device=device)  # [seen, hidden] per set
    for seed in seeds:
        g = torch.Generator(device=device).manual_seed(int(seed))
        for t in timesteps:
            noise = torch.randn((b * n, *latent_shape), generator=g, device=device)
            t_b = torch.full((b,), int(t), dtype=torch.long, device=device)
            for row, hide in enumerate((False, True)):  # same noise and t, references visible / hidden
                drop = Dropout(no_caption, torch.full((b,), hide, dtype=torch.bool, device=device))
                err = objective(batch, noise=noise, timesteps=t_b, dropout=drop, return_error=True)["error"]
                per_image = (err * mask).sum(dim=(1, 2, 3)) * target
                sums[row] += per_image.view(b, n).sum(1).double()
    per_set = 1 - sums[0] / sums[1].clamp_min(1e-12)
    se = float(per_set.std(unbiased=True) / b ** 0.5) if b > 1 else float("nan")
    return {"gain": float(per_set.mean()), "se": se, "per_set": per_set.float().cpu(), "n_sets": b}
