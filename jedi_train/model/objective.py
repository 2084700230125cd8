"""Batch of sets -> noised targets (references clean) -> joint UNet -> loss on targets only.

Plain PyTorch: the LightningModule and the benchmarks call it; it knows nothing of Lightning.

batch (from the data stream, see data_pipelines/stream.py):
    pixel_values (B, N, 3, H, W) in [-1, 1]; input_ids (B, N, T); is_ref (B, N); valid (B, N)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from .attention import SetLayout
from .components import Components, tokenize


@dataclass
class ObjectiveConfig:
    caption_dropout: float = 0.1  # per target image: caption -> "" (text CFG)
    reference_dropout: float = 0.1  # per set: references hidden (image guidance)
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting; None = plain MSE


@dataclass
class Dropout:
    """Which conditions were dropped in one step (kept so tests and logs can see them)."""

    caption: torch.Tensor  # (B, N) bool
    reference: torch.Tensor  # (B,) bool


class JeDiObjective:
    def __init__(self, components: Components, config: ObjectiveConfig | None = None):
        self.c = components
        self.cfg = config or ObjectiveConfig()
        self.empty_ids = tokenize(components.tokenizer, [""])[0]
        self.prediction_type = components.noise_scheduler.config.prediction_type

    # -- pieces --------------------------------------------------------------------------------
    def sample_dropout(self, is_ref: torch.Tensor, valid: torch.Tensor, generator=None) -> Dropout:
        b, n = is_ref.shape
        u = torch.rand(b, n + 1, generator=generator, device=is_ref.device)
        caption = (u[:, :n] < self.cfg.caption_dropout) & valid & ~is_ref
        reference = (u[:, n] < self.cfg.reference_dropout) & (is_ref & valid).any(1)
        return Dropout(caption, reference)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.c.text_encoder(input_ids.to(self.c.text_encoder.device))[0]

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.snr_gamma is None:
            return None
        snr = compute_snr(self.c.noise_scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.cfg.snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr

    # -- the step ------------------------------------------------------------------------------
    def __call__(self, batch: dict, noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                 dropout: Dropout | None = None, generator: torch.Generator | None = None) -> dict:
        unet, sched = self.c.unet, self.c.noise_scheduler
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

        latents = self.c.codec.encode(pixels.flatten(0, 1), generator)  # (B*N, C, h, w), frozen
        ids = torch.where(dropout.caption[..., None], self.empty_ids.to(ids.device), ids)
        text = self.encode_text(ids.flatten(0, 1))

        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        if timesteps is None:  # one timestep per set: a set's targets are denoised together at inference
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator, device=device)
        t_img = timesteps.repeat_interleave(n)
        ref_flat = is_ref.flatten()
        noisy = sched.add_noise(latents, noise, t_img)
        if unet.jedi["reference_timestep"] == "zero":  # references enter clean, at t = 0
            t_img = torch.where(ref_flat, torch.zeros_like(t_img), t_img)
            noisy = torch.where(ref_flat[:, None, None, None], latents, noisy)
        ref_visible = (is_ref & valid & ~dropout.reference[:, None]).flatten()
        model_in = unet.assemble_input(noisy, latents, ref_visible)

        pred = unet(model_in, t_img, text, set_layout=layout).sample
        target = noise if self.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t_img)
        per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = self.loss_weights(t_img)
        if weights is not None:
            per_image = per_image * weights
        keep = (valid & ~is_ref).flatten()  # references and padding get no loss (indexing: no NaN*0)
        loss = per_image[keep].mean()
        return {"loss": loss, "per_image_loss": per_image.detach(), "loss_mask": keep, "dropout": dropout,
                "num_targets": int(keep.sum()), "timesteps": timesteps}


@torch.no_grad()
def reference_gain(objective: JeDiObjective, batch: dict, timestep: int = 900, seed: int = 0) -> float:
    """How much the references help: 1 - loss(refs visible) / loss(refs hidden), same noise and t.

    At high noise a target's content must come from somewhere; a model that uses its references
    predicts them better when it sees them. 0 = references ignored; > 0 = used. A cheap, sensitive
    training signal (METHOD.md calibration) that needs no sampling.
    """
    is_ref = batch["is_ref"].bool()
    b, n = is_ref.shape
    g = torch.Generator(device=batch["pixel_values"].device).manual_seed(seed)
    latents_shape = objective.c.codec.encode(batch["pixel_values"][:1, :1].flatten(0, 1)).shape[1:]
    noise = torch.randn((b * n, *latents_shape), generator=g, device=batch["pixel_values"].device)
    t = torch.full((b,), timestep, dtype=torch.long, device=noise.device)
    no_caption = torch.zeros(b, n, dtype=torch.bool, device=noise.device)
    has_refs = (is_ref & batch.get("valid", torch.ones_like(is_ref)).bool()).any(1)
    seen = objective(batch, noise=noise, timesteps=t, dropout=Dropout(no_caption, torch.zeros_like(has_refs)))
    hidden = objective(batch, noise=noise, timesteps=t, dropout=Dropout(no_caption, has_refs))
    return float(1 - seen["loss"] / hidden["loss"])
