"""Base FLUX.1 transformer (MM-DiT) -> joint-image transformer (JeDi on FLUX).

In FLUX every image's text tokens and image tokens attend jointly. Coupled over a set, each image's
queries (text and image tokens alike) attend to its OWN text tokens plus the image tokens of every
image of its set, with the same who-sees-whom rules as the UNet (`SetLayout`: padding never a key,
decoupled sets' targets cut off from references, reference_attention 'set' | 'references'). That holds
in the double-stream blocks (text and image streams with their own projections) and in the
single-stream blocks (one sequence [text | image]) alike; see `JointFluxAttnProcessor`.

`JointFluxTransformer2DModel` is a `FluxTransformer2DModel` with
  * the coupled processor on every attention layer;
  * reference conditioning 'channels' (x_embedder widened from the packed latent's 4C features to
    4(2C+1): [noisy | clean reference or zeros | mask] per 2x2 patch, new weights zero, so the widened
    model starts equal to the base) or 'replacement' (no input change);
  * rotary positions per image: every image has the ids (0, row, col); reference_positions 'offset'
    shifts the r-th reference of a set by r x (rows, cols) as UNO does, so references are told apart
    from targets by position too;
  * `denoise(sample, timestep, text, set_layout)` working on spatial latents (B*N, C, h, w) like the
    UNet: packing into 2x2 patches, position ids and the timestep scale live here, not in the callers;
  * its JeDi settings in the config under ``_jedi`` (kept by save_pretrained / from_pretrained).
"""
from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from jedi_train.models.attention import SetLayout, text_and_set_attention
from jedi_train.models.joint import JeDiConfig, JointDenoiserMixin, widen
from jedi_train.models.text import TextEmbeddings


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(M, C, h, w) -> (M, h/2 * w/2, 4C): 2x2 patches as tokens (FluxPipeline._pack_latents' layout)."""
    m, c, h, w = latents.shape
    return latents.view(m, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(m, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack`: (M, h/2 * w/2, 4C) -> (M, C, h, w)."""
    m, _, d = tokens.shape
    return tokens.view(m, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(m, d // 4, h, w)


def image_ids(h: int, w: int, device, offset: int = 0) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids (0, row, col) of a packed latent, shifted by offset x (rows, cols)."""
    rows, cols = torch.arange(h // 2, device=device), torch.arange(w // 2, device=device)
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = rows[:, None] + offset * (h // 2)
    ids[..., 2] = cols[None, :] + offset * (w // 2)
    return ids.reshape(-1, 3)


def flow_mu(scheduler_config, image_seq_len: int) -> float | None:
    """FLUX.1-dev's resolution-dependent shift (diffusers' calculate_shift); None without dynamic shifting."""
    c = scheduler_config
    if not c.get("use_dynamic_shifting"):
        return None
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    slope = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (max_len - base_len)
    return c.get("base_shift", 0.5) + slope * (image_seq_len - base_len)


def shifted_sigmas(u: torch.Tensor, scheduler_config, image_seq_len: int) -> torch.Tensor:
    """Uniform u in [0, 1) -> the noise levels FLUX trains and samples at: time-shifted towards noise, by
    exp(mu) (dynamic, resolution-dependent) or by the scheduler's fixed `shift`."""
    mu = flow_mu(scheduler_config, image_seq_len)
    if mu is not None:
        e = torch.exp(torch.as_tensor(mu, dtype=u.dtype))
        return e / (e + (1 / u.clamp_min(1e-6) - 1))
    shift = scheduler_config.get("shift", 1.0)
    return shift * u / (1 + (shift - 1) * u)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' apply_rotary_emb (real, interleaved pairs) with a per-image table: x (M, S, H, d), cos (M, S, d)."""
    re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-im, re], dim=-1).flatten(3)
    return (x.float() * cos[:, :, None] + rotated.float() * sin[:, :, None]).to(x.dtype)


class JointFluxAttnProcessor(FluxAttnProcessor):
    """Set-coupled joint attention for FLUX's double- and single-stream blocks. Without a set layout (or for
    sets of one image with nothing cached) it is the base processor, op for op."""

    def __init__(self, references_see_targets: bool = True):
        super().__init__()
        self.references_see_targets = references_see_targets

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 set_layout: SetLayout | None = None, text_len: int | None = None, rope=None):
        if set_layout is None or set_layout.trivial:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("an attention_mask cannot be combined with set-coupled attention")
        query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:  # double-stream block: [text | image] from two projections
            e_query, e_key, e_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (e_query, e_key, e_value))
            e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
            query, key, value = (torch.cat(p, dim=1) for p in ((e_query, query), (e_key, key), (e_value, value)))
            text_len = encoder_hidden_states.shape[1]
        cos, sin = rope  # (M or 1, S, d) per image: references may sit at offset positions
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)

        out = text_and_set_attention(query, key, value, text_len, set_layout, self.references_see_targets, attn)
        if encoder_hidden_states is None:
            return out
        e_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(e_out.contiguous())


def joint_flux_processors(model) -> dict:
    see_targets = model.jedi.reference_attention == "set"
    return {name: JointFluxAttnProcessor(see_targets) for name in model.attn_processors}


class JointFluxTransformer2DModel(JointDenoiserMixin, FluxTransformer2DModel):
    """A FluxTransformer2DModel that denoises sets of images jointly: use `denoise(...)`."""

    directory_hint = "a diffusers FLUX.1 directory with a transformer/ subfolder"
    joint_input_module = "x_embedder"

    @property
    def latent_channels(self) -> int:
        return self.out_channels // 4  # packed 2x2 patches of the VAE latent

    def joint_processors(self) -> dict:
        return joint_flux_processors(self)

    def _widen_input(self, config: JeDiConfig) -> JeDiConfig:
        c = self.latent_channels
        if self.config.in_channels != 4 * c or self.config.patch_size != 1:
            raise ValueError(f"base transformer has in_channels={self.config.in_channels}, out_channels="
                             f"{self.out_channels}, patch_size={self.config.patch_size}; start from a plain "
                             "FLUX.1 text-to-image transformer (not Fill/Depth/Redux variants)")
        if config.conditioning == "channels":  # per packed 2x2 patch: [noisy | clean reference | mask]
            self.x_embedder = widen(self.x_embedder, 4 * (2 * c + 1), keep=4 * c)
            self.register_to_config(in_channels=4 * (2 * c + 1), out_channels=4 * c)
        return config.replace(latent_channels=c, resolution=int(config.resolution or 1024), pixel_fold=1)

    def _rope(self, set_layout: SetLayout | None, text_len: int, h: int, w: int, device):
        """Per-image rotary tables (M or 1, text_len + h/2*w/2, d): text at 0, images at (0, row, col) or,
        with reference_positions 'offset', the r-th reference of a set at r x (rows, cols)."""
        txt = torch.zeros(text_len, 3, device=device)
        offsets = torch.zeros(1, dtype=torch.long)  # on the CPU (or the layout's device): int() reads it
        if set_layout is not None and self.jedi.reference_positions == "offset" and bool(set_layout.is_ref.any()):
            is_ref = set_layout.is_ref.long()  # where the layout lives: int() below needs real values
            offsets = (is_ref.cumsum(1) * is_ref).flatten()  # 1, 2, ... for a set's references; 0 for targets
        tables = [self.pos_embed(torch.cat([txt, image_ids(h, w, device, int(o))])) for o in range(int(offsets.max()) + 1)]
        cos, sin = torch.stack([t[0] for t in tables]), torch.stack([t[1] for t in tables])
        offsets = offsets.to(cos.device)
        return cos[offsets], sin[offsets]

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, text: TextEmbeddings,
                set_layout: SetLayout | None = None, guidance: float | torch.Tensor | None = None) -> torch.Tensor:
        """sample (B*N, C', h, w) from assemble_input; timestep (B*N,) in [0, 1000) (sigma x 1000);
        text: TextEmbeddings (T5 hidden states + CLIP pooled); guidance: the distilled guidance scale
        (guidance-embedding checkpoints). Returns the predicted velocity (B*N, C, h, w)."""
        bn, _, h, w = sample.shape
        text_len = text.hidden.shape[1]
        kwargs = None
        if set_layout is not None:
            kwargs = {"set_layout": set_layout, "text_len": text_len, "rope": self._rope(set_layout, text_len, h, w,
                                                                                         sample.device)}
        if self.config.guidance_embeds:
            g = 1.0 if guidance is None else guidance
            guidance = torch.as_tensor(g, device=sample.device, dtype=torch.float32).expand(bn)
        else:
            guidance = None
        out = self(hidden_states=pack(sample), encoder_hidden_states=text.hidden, pooled_projections=text.pooled,
                   timestep=timestep.float() / 1000, img_ids=image_ids(h, w, sample.device),
                   txt_ids=torch.zeros(text_len, 3, device=sample.device), guidance=guidance,
                   joint_attention_kwargs=kwargs).sample
        return unpack(out, h, w)

    def image_tokens(self, h: int, w: int) -> int:
        return (h // 2) * (w // 2)  # denoise() packs 2x2 latent patches into one token

    def dummy_inputs(self, images: int, latent: int, text_len: int, dtype, device):
        """(sample, timesteps, text) shaped as the objective hands them over (the dry run traces with them)."""
        cfg = self.config
        text = TextEmbeddings(torch.empty(images, text_len, cfg.joint_attention_dim, dtype=dtype, device=device),
                              torch.empty(images, cfg.pooled_projection_dim, dtype=dtype, device=device))
        channels = cfg.in_channels // 4  # denoise() packs 2x2 patches itself
        sample = torch.empty(images, channels, latent, latent, dtype=dtype, device=device)
        return sample, torch.empty(images, device=device), text


def load_joint_flux(path: str, subfolder: str | None = "transformer", jedi: JeDiConfig | None = None,
                    **from_pretrained_kwargs) -> JointFluxTransformer2DModel:
    """Load a FLUX transformer; a base one is made joint with `jedi` (resolution None: 1024), a joint one
    is restored as saved."""
    return JointFluxTransformer2DModel.load(path, subfolder, jedi, **from_pretrained_kwargs)
