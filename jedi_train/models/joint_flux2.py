"""Base FLUX.2 transformer (dev and Klein; the MM-DiT of `Flux2Transformer2DModel`) -> joint-image transformer (JeDi on FLUX.2).

The same coupling as FLUX.1 and SD3 (`attention.text_and_set_attention`): each image's queries, text and image
tokens alike, attend to its OWN text tokens plus the image tokens of every image of its set, with the `SetLayout`
rules of every family (padding never a key, decoupled sets' targets cut off from references, reference_attention
'set' | 'references', the reference key/value cache). It holds in FLUX.2's double-stream blocks (`Flux2Attention`)
and in its parallel single-stream blocks (`Flux2ParallelSelfAttention`: [text | image] in one sequence, the MLP
fused beside the attention); see `JointFlux2AttnProcessor` / `JointFlux2ParallelAttnProcessor`.

`JointFlux2Transformer2DModel` is a `Flux2Transformer2DModel` with
  * the coupled processors on every attention layer;
  * latents as `Flux2LatentCodec` gives them: the VAE's latent patchified 2x2 into channels and normalised by the
    VAE's batch-norm statistics (Flux2KleinPipeline._encode_vae_image), so the denoiser's grid is 1/16 of the
    pixels with 4 x latent_channels channels and a token is one grid cell (patch_size 1: no further packing);
  * reference conditioning 'channels' (x_embedder widened from C to 2C+1 input features: [noisy | clean
    reference or zeros | mask] per token, new weights zero, so the widened model starts equal to the base) or
    'replacement' (no input change);
  * FLUX.2's 4-axis rotary ids (T, H, W, L): text at (0, 0, 0, l), images at (0, row, col, 0); with
    reference_positions 'offset', the r-th reference of a set at T = 10 r, FLUX.2's own time offset for
    reference images (Flux2KleinPipeline._prepare_image_ids, scale 10), so fine-tuning starts from the positions
    the base model already reads references at;
  * `denoise(sample, timestep, text, set_layout)` on spatial latents (B*N, C, h, w), timesteps sigma x 1000;
  * its JeDi settings in the config under ``_jedi``.
diffusers' own reference KV path (`Flux2KVAttnProcessor`, kv_cache_mode) is not used: JeDi's processors replace
it and give the same kind of cache through `ReferenceKVCache` (references attend to references only, t = 0).
"""
from __future__ import annotations

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2ParallelSelfAttnProcessor,
    _get_qkv_projections,
)

from jedi_train.models.attention import SetLayout, text_and_set_attention
from jedi_train.models.components import LatentCodec
from jedi_train.models.joint import JeDiConfig, JointDenoiserMixin
from jedi_train.models.joint_flux import _rotate
from jedi_train.models.text import TextEmbeddings

REFERENCE_TIME_SCALE = 10  # Flux2KleinPipeline._prepare_image_ids: the i-th reference at T = 10 + 10 i


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(M, C, H, W) -> (M, 4C, H/2, W/2), Flux2KleinPipeline._patchify_latents' channel order."""
    m, c, h, w = latents.shape
    return latents.view(m, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(m, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify` (Flux2KleinPipeline._unpatchify_latents)."""
    m, c, h, w = latents.shape
    return latents.reshape(m, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(m, c // 4, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(M, C, h, w) -> (M, h*w, C): one token per grid cell (Flux2KleinPipeline._pack_latents)."""
    m, c, h, w = latents.shape
    return latents.reshape(m, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens.permute(0, 2, 1).reshape(tokens.shape[0], -1, h, w)


def image_ids(h: int, w: int, device, t: int = 0) -> torch.Tensor:
    """(h*w, 4) ids (t, row, col, 0), as Flux2KleinPipeline._prepare_latent_ids (t = 0) / _prepare_image_ids."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)


def text_ids(text_len: int, device) -> torch.Tensor:
    """(text_len, 4) ids (0, 0, 0, l), as Flux2KleinPipeline._prepare_text_ids."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_len)).to(device)


class Flux2LatentCodec(LatentCodec):
    """Images <-> FLUX.2's denoiser latents: the VAE posterior (mean, logvar: what `jedi-data encode` caches),
    patchified 2x2 and normalised with the VAE's batch-norm running statistics, exactly as Flux2KleinPipeline
    encodes reference images and decodes its output. downsample: the VAE's x 2."""

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) * int(self.vae.config.patch_size[0])

    @property
    def shift(self) -> float:
        return 0.0

    def _stats(self, like: torch.Tensor):
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def _normalise(self, z: torch.Tensor) -> torch.Tensor:
        z = patchify(z)
        mean, std = self._stats(z)
        return (z - mean) / std

    @torch.no_grad()
    def sample(self, mean, logvar, generator=None):
        if logvar is None:  # (no VAE: pixels; a FLUX.2 codec always has one)
            return mean
        params = torch.cat([mean, logvar], dim=1).to(self.vae.dtype)
        return self._normalise(DiagonalGaussianDistribution(params).sample(generator))

    def encode(self, images, generator=None, sample: bool = True):
        mean, logvar = self.posterior(images)
        if sample:
            return self.sample(mean, logvar, generator)
        return self._normalise(mean)  # the posterior's mode, as the pipeline's sample_mode="argmax"

    @torch.no_grad()
    def decode(self, latents):
        mean, std = self._stats(latents)
        return self.vae.decode(unpatchify(latents * std + mean).to(self.vae.dtype)).sample


def _widen_linear(old: torch.nn.Linear, new_in: int) -> torch.nn.Linear:
    """`joint.widen` for FLUX.2's bias-free input embedding: old weights first, the new input features zero."""
    new = torch.nn.Linear(new_in, old.out_features, bias=old.bias is not None, device=old.weight.device,
                          dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_features] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    return new


def _trivial(set_layout: SetLayout | None) -> bool:
    """No layout, or sets of one image with nothing cached or recorded: the base processor, op for op."""
    return set_layout is None or set_layout.trivial


class JointFlux2AttnProcessor(Flux2AttnProcessor):
    """Set-coupled joint attention of FLUX.2's double-stream blocks."""

    def __init__(self, references_see_targets: bool = True):
        super().__init__()
        self.references_see_targets = references_see_targets

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 set_layout: SetLayout | None = None, text_len: int | None = None, rope=None):
        if _trivial(set_layout):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None or encoder_hidden_states is None:
            raise ValueError("set-coupled FLUX.2 attention takes text tokens (encoder_hidden_states) and no attention_mask")
        query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        e_query, e_key, e_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (e_query, e_key, e_value))
        e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
        query, key, value = (torch.cat(p, dim=1) for p in ((e_query, query), (e_key, key), (e_value, value)))
        cos, sin = rope
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        text_len = encoder_hidden_states.shape[1]
        out = text_and_set_attention(query, key, value, text_len, set_layout, self.references_see_targets, attn)
        e_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(e_out.contiguous())


class JointFlux2ParallelAttnProcessor(Flux2ParallelSelfAttnProcessor):
    """Set-coupled attention of FLUX.2's parallel single-stream blocks ([text | image] per image; the fused MLP
    half stays per token)."""

    def __init__(self, references_see_targets: bool = True):
        super().__init__()
        self.references_see_targets = references_see_targets

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None,
                 set_layout: SetLayout | None = None, text_len: int | None = None, rope=None):
        if _trivial(set_layout):
            return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("an attention_mask cannot be combined with set-coupled attention")
        proj = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = proj.split([3 * attn.inner_dim, proj.shape[-1] - 3 * attn.inner_dim], dim=-1)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        cos, sin = rope
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        out = text_and_set_attention(query, key, value, text_len, set_layout, self.references_see_targets, attn)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def joint_flux2_processors(model) -> dict:
    see_targets = model.jedi.reference_attention == "set"
    return {name: (JointFlux2ParallelAttnProcessor(see_targets) if name.startswith("single_transformer_blocks")
                   else JointFlux2AttnProcessor(see_targets)) for name in model.attn_processors}


class JointFlux2Transformer2DModel(JointDenoiserMixin, Flux2Transformer2DModel):
    """A Flux2Transformer2DModel that denoises sets of images jointly: use `denoise(...)`."""

    directory_hint = "a diffusers FLUX.2 (dev or Klein) directory with a transformer/ subfolder"
    joint_input_module = "x_embedder"

    @property
    def latent_channels(self) -> int:
        return self.out_channels  # the patchified VAE latent: one token per grid cell

    def joint_processors(self) -> dict:
        return joint_flux2_processors(self)

    def _widen_input(self, config: JeDiConfig) -> JeDiConfig:
        c = self.out_channels
        if self.config.in_channels != c or self.config.patch_size != 1:
            raise ValueError(f"base transformer has in_channels={self.config.in_channels}, out_channels={c}, "
                             f"patch_size={self.config.patch_size}; start from a plain FLUX.2 text-to-image transformer")
        if config.conditioning == "channels":  # per token: [noisy | clean reference | mask]
            self.x_embedder = _widen_linear(self.x_embedder, 2 * c + 1)
            self.register_to_config(in_channels=2 * c + 1, out_channels=c)
        return config.replace(latent_channels=c, resolution=int(config.resolution or 1024), pixel_fold=1)

    def _rope(self, set_layout: SetLayout | None, text_len: int, h: int, w: int, device):
        """Per-image rotary tables (M or 1, text_len + h*w, d): text at (0, 0, 0, l), images at (0, row, col, 0),
        with reference_positions 'offset' the r-th reference of a set at T = 10 r (FLUX.2's reference ids)."""
        txt = text_ids(text_len, device)
        offsets = torch.zeros(1, dtype=torch.long)
        if set_layout is not None and self.jedi.reference_positions == "offset" and bool(set_layout.is_ref.any()):
            is_ref = set_layout.is_ref.long()
            offsets = (is_ref.cumsum(1) * is_ref).flatten()  # 1, 2, ... for a set's references; 0 for targets
        tables = [self.pos_embed(torch.cat([txt, image_ids(h, w, device, REFERENCE_TIME_SCALE * o)]))
                  for o in range(int(offsets.max()) + 1)]
        cos, sin = torch.stack([t[0] for t in tables]), torch.stack([t[1] for t in tables])
        offsets = offsets.to(cos.device)
        return cos[offsets], sin[offsets]

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, text: TextEmbeddings,
                set_layout: SetLayout | None = None, guidance: float | torch.Tensor | None = None) -> torch.Tensor:
        """sample (B*N, C', h, w) from assemble_input; timestep (B*N,) in [0, 1000) (sigma x 1000); text:
        TextEmbeddings (Qwen3 layers stacked per token); guidance: the distilled guidance scale, only for
        guidance-embedding checkpoints (Klein has none: ignored). Returns the predicted velocity (B*N, C, h, w)."""
        bn, _, h, w = sample.shape
        text_len = text.hidden.shape[1]
        kwargs = None
        if set_layout is not None:
            kwargs = {"set_layout": set_layout, "text_len": text_len,
                      "rope": self._rope(set_layout, text_len, h, w, sample.device)}
        g = None
        if self.config.guidance_embeds:
            g = torch.as_tensor(1.0 if guidance is None else guidance, device=sample.device,
                                dtype=torch.float32).expand(bn)
        out = self(hidden_states=pack(sample), encoder_hidden_states=text.hidden, timestep=timestep.float() / 1000,
                   img_ids=image_ids(h, w, sample.device), txt_ids=text_ids(text_len, sample.device), guidance=g,
                   joint_attention_kwargs=kwargs).sample
        return unpack(out, h, w)

    def dummy_inputs(self, images: int, latent: int, text_len: int, dtype, device):
        """(sample, timesteps, text) shaped as the objective hands them over (the dry run traces with them);
        `latent`: the side of the denoiser's grid (pixels / 16)."""
        cfg = self.config
        text = TextEmbeddings(torch.empty(images, text_len, cfg.joint_attention_dim, dtype=dtype, device=device))
        sample = torch.empty(images, cfg.in_channels, latent, latent, dtype=dtype, device=device)
        return sample, torch.empty(images, device=device), text


def load_joint_flux2(path: str, subfolder: str | None = "transformer", jedi: JeDiConfig | None = None,
                     **from_pretrained_kwargs) -> JointFlux2Transformer2DModel:
    """Load a FLUX.2 transformer; a base one is made joint with `jedi` (resolution None: 1024), a joint one is
    restored as saved."""
    return JointFlux2Transformer2DModel.load(path, subfolder, jedi, **from_pretrained_kwargs)
