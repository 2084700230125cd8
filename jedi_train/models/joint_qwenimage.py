"""Base Qwen-Image transformer (`QwenImageTransformer2DModel`, an MM-DiT of double-stream blocks) -> joint-image
transformer (JeDi on Qwen-Image).

The same coupling as FLUX and SD3 (`attention.text_and_set_attention`): each image's queries, text and image tokens
alike, attend to its OWN text tokens plus the image tokens of every image of its set, with the `SetLayout` rules of
every family and the reference key/value cache; Qwen-Image's text padding (QwenImagePipeline's text mask) is never a
key. See `JointQwenImageAttnProcessor`.

`JointQwenImageTransformer2DModel` is a `QwenImageTransformer2DModel` with
  * the coupled processor on every block's attention;
  * latents as `QwenImageLatentCodec` gives them: the video VAE's latent of a one-frame clip, frame axis dropped,
    normalised by the VAE's latents_mean / latents_std (QwenImagePipeline's decode, QwenImageEditPipeline's encode);
    `denoise` packs them 2x2 into tokens (QwenImagePipeline._pack_latents, FLUX.1's layout);
  * reference conditioning 'channels' (img_in widened from 4C to 4(2C+1) features per packed 2x2 patch: [noisy |
    clean reference or zeros | mask], new weights zero, so the widened model starts equal to the base) or
    'replacement' (no input change);
  * Qwen-Image's video rotary ids (frame, row, col; rows and columns centred, text after the largest image index);
    with reference_positions 'offset' the r-th reference of a set is frame r, the frame index QwenImageEditPlus
    gives its condition images (img_shapes [target, condition 1, ...]), so references are told apart by position
    the way the Edit models read them; 'same': every image is frame 0, as a lone text-to-image target;
  * `denoise(sample, timestep, text, set_layout)` on spatial latents (B*N, C, h, w), timesteps sigma x 1000, text
    padding trimmed to the longest caption of the batch and masked (QwenImagePipeline.encode_prompt);
  * its JeDi settings in the config under ``_jedi``.
"""
from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from jedi_train.models.attention import SetLayout, text_and_set_attention
from jedi_train.models.components import LatentCodec
from jedi_train.models.joint import JeDiConfig, JointDenoiserMixin, widen
from jedi_train.models.joint_flux import pack, unpack
from jedi_train.models.text import TextEmbeddings


class QwenImageLatentCodec(LatentCodec):
    """Images <-> Qwen-Image's denoiser latents through AutoencoderKLQwenImage, a video VAE: an image is a one-frame
    clip (M, 3, 1, H, W); its latent's frame axis is dropped, and the latent is normalised per channel by the VAE's
    latents_mean / latents_std, as QwenImagePipeline decodes and QwenImageEditPipeline encodes. `posterior` (what
    `jedi-data encode` caches) is (M, C, h, w) without the frame axis."""

    @property
    def downsample(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)  # the VAE's spatial_compression_ratio

    @property
    def shift(self) -> float:
        return 0.0

    def _stats(self, like: torch.Tensor):
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def _normalise(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    @torch.no_grad()
    def posterior(self, images: torch.Tensor):
        dist = self.vae.encode(images[:, :, None].to(self.vae.dtype)).latent_dist
        return dist.mean[:, :, 0], dist.logvar[:, :, 0]

    @torch.no_grad()
    def sample(self, mean, logvar, generator=None):
        if logvar is None:  # (no VAE: pixels; a Qwen-Image codec always has one)
            return mean
        params = torch.cat([mean, logvar], dim=1).to(self.vae.dtype)
        return self._normalise(DiagonalGaussianDistribution(params).sample(generator))

    def encode(self, images, generator=None, sample: bool = True):
        mean, logvar = self.posterior(images)
        return self.sample(mean, logvar, generator) if sample else self._normalise(mean)  # mean: sample_mode argmax

    @torch.no_grad()
    def decode(self, latents):
        mean, std = self._stats(latents)
        return self.vae.decode((latents * std + mean)[:, :, None].to(self.vae.dtype)).sample[:, :, 0]


def _trivial(set_layout: SetLayout | None) -> bool:
    """No layout, or sets of one image with nothing cached: the base processor, op for op."""
    return set_layout is None or (set_layout.reference_cache is None and set_layout.n == 1
                                  and bool(set_layout.valid.all()))


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """apply_rotary_emb_qwen (complex) with a per-image table: x (M, S, H, d), freqs (M or 1, S, d/2) complex."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs[:, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class JointQwenImageAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """Set-coupled joint attention of Qwen-Image's double-stream blocks; the text mask (encoder_hidden_states_mask,
    False on padding) keeps padding from being a key, as the base processor's joint mask does."""

    def __init__(self, references_see_targets: bool = True):
        super().__init__()
        self.references_see_targets = references_see_targets

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, set_layout: SetLayout | None = None, rope=None):
        if _trivial(set_layout):
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)
        if attention_mask is not None or encoder_hidden_states is None:
            raise ValueError("set-coupled Qwen-Image attention takes text tokens (encoder_hidden_states) and no "
                             "attention_mask")
        d = attn.inner_dim // attn.heads
        query, key, value = (p(hidden_states).unflatten(-1, (-1, d)) for p in (attn.to_q, attn.to_k, attn.to_v))
        e_query, e_key, e_value = (p(encoder_hidden_states).unflatten(-1, (-1, d))
                                   for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        query, key = attn.norm_q(query), attn.norm_k(key)
        e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
        img_freqs, txt_freqs = rope
        query, key = _rotate(query, img_freqs), _rotate(key, img_freqs)
        e_query = apply_rotary_emb_qwen(e_query, txt_freqs, use_real=False)
        e_key = apply_rotary_emb_qwen(e_key, txt_freqs, use_real=False)
        query, key, value = (torch.cat(p, dim=1) for p in ((e_query, query), (e_key, key), (e_value, value)))
        text_len = encoder_hidden_states.shape[1]
        out = text_and_set_attention(query, key, value, text_len, set_layout, self.references_see_targets, attn,
                                     encoder_hidden_states_mask)
        e_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[0](out.contiguous())
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out, attn.to_add_out(e_out.contiguous())


class JointQwenImageTransformer2DModel(JointDenoiserMixin, QwenImageTransformer2DModel):
    """A QwenImageTransformer2DModel that denoises sets of images jointly: use `denoise(...)`."""

    directory_hint = "a diffusers Qwen-Image directory with a transformer/ subfolder"
    joint_input_module = "img_in"

    @property
    def latent_channels(self) -> int:
        return self.out_channels  # the VAE latent; denoise packs 2x2 patches into tokens

    def joint_processors(self) -> dict:
        see_targets = self.jedi.reference_attention == "set"
        return {name: JointQwenImageAttnProcessor(see_targets) for name in self.attn_processors}

    def _widen_input(self, config: JeDiConfig) -> JeDiConfig:
        c = self.out_channels
        if self.config.in_channels != 4 * c or self.config.patch_size != 2:
            raise ValueError(f"base transformer has in_channels={self.config.in_channels}, out_channels={c}, "
                             f"patch_size={self.config.patch_size}; start from a plain Qwen-Image text-to-image "
                             "transformer")
        if self.config.zero_cond_t or self.config.use_layer3d_rope or self.config.use_additional_t_cond:
            raise ValueError("this transformer is a Qwen-Image Edit-2511 / Layered variant (zero_cond_t, "
                             "use_layer3d_rope or use_additional_t_cond); start from the text-to-image Qwen-Image")
        if config.conditioning == "channels":  # per packed 2x2 patch: [noisy | clean reference | mask]
            self.img_in = widen(self.img_in, 4 * (2 * c + 1), keep=4 * c)
            self.register_to_config(in_channels=4 * (2 * c + 1), out_channels=c)
        return config.replace(latent_channels=c, resolution=int(config.resolution or 1024), pixel_fold=1)

    def image_tokens(self, h: int, w: int) -> int:
        return (h // 2) * (w // 2)  # denoise() packs 2x2 latent patches into one token

    def _rope(self, set_layout: SetLayout | None, text_len: int, h: int, w: int, device):
        """(image tables (M or 1, h/2*w/2, d/2), text table (text_len, d/2)), complex, as QwenEmbedRope gives them;
        with reference_positions 'offset' the r-th reference of a set at frame r."""
        img, txt = self.pos_embed([(1, h // 2, w // 2)], device=device, max_txt_seq_len=text_len)
        if set_layout is None or self.jedi.reference_positions != "offset" or not bool(set_layout.is_ref.any()):
            return img[None], txt
        is_ref = set_layout.is_ref.long()
        offsets = (is_ref.cumsum(1) * is_ref).flatten()  # 1, 2, ... for a set's references; 0 for targets
        tables = torch.stack([self.pos_embed._compute_video_freqs(1, h // 2, w // 2, int(o), device)
                              for o in range(int(offsets.max()) + 1)])
        return tables[offsets.to(tables.device)], txt

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, text: TextEmbeddings,
                set_layout: SetLayout | None = None, guidance: float | torch.Tensor | None = None) -> torch.Tensor:
        """sample (B*N, C', h, w) from assemble_input; timestep (B*N,) in [0, 1000) (sigma x 1000); text:
        TextEmbeddings (Qwen2.5-VL states + mask). guidance: unused (Qwen-Image is not guidance-distilled).
        Returns the predicted velocity (B*N, C, h, w)."""
        bn, _, h, w = sample.shape
        hidden, mask = text.hidden, text.mask
        if mask is not None:  # the padding every row has goes; an all-valid mask is none (encode_prompt)
            mask = mask.bool()
            used = mask.any(0).nonzero()
            keep = int(used.max()) + 1 if len(used) else 1
            hidden, mask = hidden[:, :keep], mask[:, :keep]
            mask = None if bool(mask.all()) else mask
        kwargs = None
        if set_layout is not None:
            kwargs = {"set_layout": set_layout, "rope": self._rope(set_layout, hidden.shape[1], h, w, sample.device)}
        out = self(hidden_states=pack(sample), encoder_hidden_states=hidden, encoder_hidden_states_mask=mask,
                   timestep=timestep.float() / 1000, img_shapes=[[(1, h // 2, w // 2)]] * bn,
                   attention_kwargs=kwargs).sample
        return unpack(out, h, w)

    def dummy_inputs(self, images: int, latent: int, text_len: int, dtype, device):
        """(sample, timesteps, text) shaped as the objective hands them over (the dry run traces with them);
        `latent`: the side of the VAE latent (pixels / 8)."""
        cfg = self.config
        text = TextEmbeddings(torch.empty(images, text_len, cfg.joint_attention_dim, dtype=dtype, device=device))
        sample = torch.empty(images, cfg.in_channels // 4, latent, latent, dtype=dtype, device=device)
        return sample, torch.empty(images, device=device), text


def load_joint_qwenimage(path: str, subfolder: str | None = "transformer", jedi: JeDiConfig | None = None,
                         **from_pretrained_kwargs) -> JointQwenImageTransformer2DModel:
    """Load a Qwen-Image transformer; a base one is made joint with `jedi` (resolution None: 1024), a joint one is
    restored as saved."""
    return JointQwenImageTransformer2DModel.load(path, subfolder, jedi, **from_pretrained_kwargs)
