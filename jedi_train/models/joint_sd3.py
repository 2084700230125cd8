"""Base Stable Diffusion 3 / 3.5 transformer (MM-DiT) -> joint-image transformer (JeDi on SD3).

The same coupling as FLUX (`attention.text_and_set_attention`): each image's queries, text and image tokens
alike, attend to its OWN text tokens plus the image tokens of every image of its set, with the `SetLayout`
rules of every family. SD3.5's extra image-only attention (attn2 of its dual-attention blocks) is coupled
as a UNet's self-attention is (`JointAttnProcessor`).

`JointSD3Transformer2DModel` is an `SD3Transformer2DModel` with
  * the coupled processors on every attention layer;
  * reference conditioning 'channels' (the patch embedding's conv widened from C to 2C+1 input channels:
    [noisy | clean reference or zeros | mask], new weights zero, so the widened model starts equal to the
    base) or 'replacement' (no input change);
  * `denoise(sample, timestep, text, set_layout)` on spatial latents (B*N, C, h, w), timesteps sigma x 1000
    as StableDiffusion3Pipeline passes them.
SD3's positions are a fixed grid added at the patch embedding, the same for every image: there are no ids
to offset, so reference_positions 'offset' (UNO, FLUX) is refused.
"""
from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from jedi_train.models.attention import JointAttnProcessor, SetLayout, text_and_set_attention
from jedi_train.models.joint import JeDiConfig, JointDenoiserMixin, widen
from jedi_train.models.text import TextEmbeddings


class JointSD3AttnProcessor(JointAttnProcessor2_0):
    """Set-coupled joint attention of SD3's blocks. Without a set layout (or for sets of one image with
    nothing cached) it is the base processor, op for op."""

    def __init__(self, references_see_targets: bool = True):
        super().__init__()
        self.references_see_targets = references_see_targets

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 set_layout: SetLayout | None = None, **kwargs):
        if set_layout is None or set_layout.trivial:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)
        if attention_mask is not None or encoder_hidden_states is None:
            raise ValueError("set-coupled SD3 attention takes text tokens (encoder_hidden_states) and no attention_mask")

        def heads(x):  # (M, S, H*d) -> (M, S, H, d)
            return x.unflatten(-1, (attn.heads, -1))

        def normed(norm, x):
            return x if norm is None else norm(x)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        query, key = normed(attn.norm_q, query), normed(attn.norm_k, key)
        e = encoder_hidden_states
        e_query, e_key, e_value = heads(attn.add_q_proj(e)), heads(attn.add_k_proj(e)), heads(attn.add_v_proj(e))
        e_query, e_key = normed(attn.norm_added_q, e_query), normed(attn.norm_added_k, e_key)
        # [text | image] per image (SD3 orders [image | text]; the order of keys does not change attention)
        query, key, value = (torch.cat(p, dim=1) for p in ((e_query, query), (e_key, key), (e_value, value)))
        text_len = e.shape[1]
        out = text_and_set_attention(query, key, value, text_len, set_layout, self.references_see_targets, attn)
        e_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        if not attn.context_pre_only:
            e_out = attn.to_add_out(e_out.contiguous())
        return out, e_out


def joint_sd3_processors(model) -> dict:
    see_targets = model.jedi.reference_attention == "set"
    return {name: JointAttnProcessor(see_targets) if name.endswith("attn2.processor") else JointSD3AttnProcessor(see_targets)
            for name in model.attn_processors}


class JointSD3Transformer2DModel(JointDenoiserMixin, SD3Transformer2DModel):
    """An SD3Transformer2DModel that denoises sets of images jointly: use `denoise(...)`."""

    directory_hint = "a diffusers Stable Diffusion 3 directory with a transformer/ subfolder"
    joint_input_module = "pos_embed.proj"

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    def joint_processors(self) -> dict:
        return joint_sd3_processors(self)

    def _widen_input(self, config: JeDiConfig) -> JeDiConfig:
        c = self.out_channels
        if self.config.in_channels != c:
            raise ValueError(f"base transformer has in_channels={self.config.in_channels}, out_channels={c}; start "
                             "from a plain SD3 text-to-image transformer (not an inpainting or control variant)")
        if config.reference_positions != "same":
            raise ValueError("reference_positions=offset shifts FLUX's rotary ids; SD3 adds one fixed position grid "
                             "to every image: set model.reference_positions=same")
        if config.conditioning == "channels":  # [noisy | clean reference | mask] into the patch embedding
            self.pos_embed.proj = widen(self.pos_embed.proj, 2 * c + 1, keep=c)
            self.register_to_config(in_channels=2 * c + 1, out_channels=c)
        return config.replace(latent_channels=c, pixel_fold=1)

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, text: TextEmbeddings,
                set_layout: SetLayout | None = None, guidance: float | torch.Tensor | None = None) -> torch.Tensor:
        """sample (B*N, C', h, w) from assemble_input; timestep (B*N,) in [0, 1000) (sigma x 1000); text:
        TextEmbeddings (CLIP-L + CLIP-G + T5 hidden states, both CLIPs' pooled projections). SD3 is not
        guidance-distilled: `guidance` is ignored. Returns the predicted velocity (B*N, C, h, w)."""
        kwargs = None if set_layout is None else {"set_layout": set_layout}
        return self(hidden_states=sample, encoder_hidden_states=text.hidden, pooled_projections=text.pooled,
                    timestep=timestep, joint_attention_kwargs=kwargs).sample

    def dummy_inputs(self, images: int, latent: int, text_len: int, dtype, device):
        """(sample, timesteps, text): CLIP + T5 tokens side by side at T5's width; both CLIPs' pooled projections."""
        cfg = self.config
        text = TextEmbeddings(torch.empty(images, text_len, cfg.joint_attention_dim, dtype=dtype, device=device),
                              torch.empty(images, cfg.pooled_projection_dim, dtype=dtype, device=device))
        sample = torch.empty(images, cfg.in_channels, latent, latent, dtype=dtype, device=device)
        return sample, torch.empty(images, device=device), text


def load_joint_sd3(path: str, subfolder: str | None = "transformer", jedi: JeDiConfig | None = None,
                   **from_pretrained_kwargs) -> JointSD3Transformer2DModel:
    """Load an SD3 transformer; a base one is made joint with `jedi`, a joint one is restored as saved."""
    return JointSD3Transformer2DModel.load(path, subfolder, jedi, **from_pretrained_kwargs)
