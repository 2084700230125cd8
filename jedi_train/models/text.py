"""Captions -> what the denoiser is conditioned on, for each text-encoder layout.

* SD 1.x/2.x: one CLIP text encoder; its last hidden states.
* SDXL: two (CLIP ViT-L and OpenCLIP ViT-bigG with projection): the penultimate hidden states of both,
  concatenated, plus the second one's pooled projection and the size/crop micro-conditioning
  ("time_ids": original size, crop top-left, target size), as diffusers' SDXL pipeline builds them.
* FLUX.1: CLIP ViT-L's pooled output and T5-XXL's last hidden states, as diffusers' FluxPipeline.
* SD3 / SD3.5: three (CLIP ViT-L, OpenCLIP ViT-bigG, T5-XXL): both CLIPs' penultimate hidden states side by
  side, zero-padded to T5's width, then T5's tokens after them; both CLIPs' pooled projections concatenated,
  as diffusers' StableDiffusion3Pipeline.

Token ids travel through the data stream as one tensor per caption, (T,) for one tokenizer or (E, T)
for E tokenizers (shorter ones padded to the longest, cut back when embedded: CLIP 77, T5 512), so the
stream, its caption cache and the caption dropout stay one code path.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

TEXT_FIELDS = ("hidden", "pooled", "time_ids")  # TextEmbeddings' fields, in order (the cache stores them by name)


def sdxl_time_ids(size_crop: torch.Tensor | None, resolution: int, rows: int | None = None) -> torch.Tensor:
    """SDXL's micro-conditioning per image, (M, 6): original (h, w), crop top-left, target (h, w).
    size_crop (M, 4): each image's original height, width and crop top, left (the stream records them);
    None: `rows` uncropped images already at the target size (what inference asks for by default)."""
    if size_crop is None:
        size_crop = torch.tensor([resolution, resolution, 0, 0]).expand(rows, 4)
    target = torch.tensor([resolution, resolution], device=size_crop.device).expand(len(size_crop), 2)
    return torch.cat([size_crop, target], dim=1).float()


@dataclass
class TextEmbeddings:
    """Per-image text conditioning: hidden (M, T, D) [+ pooled (M, P) and time_ids (M, 6) for SDXL].

    Indexes, concatenates and stacks like one tensor of M rows (every field row-aligned), so the
    objective and the pipeline treat it as they treat image latents."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def apply(self, fn, *others: TextEmbeddings) -> TextEmbeddings:
        """fn over each field (with the same field of `others`); absent fields stay absent."""
        out = {}
        for f in fields(self):
            mine = getattr(self, f.name)
            out[f.name] = None if mine is None else fn(mine, *(getattr(o, f.name) for o in others))
        return TextEmbeddings(**out)

    def __getitem__(self, index) -> TextEmbeddings:
        return self.apply(lambda x: x[index])

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def to(self, *args, **kwargs) -> TextEmbeddings:
        return self.apply(lambda x: x.to(*args, **kwargs))

    def repeat(self, n: int) -> TextEmbeddings:
        return self.apply(lambda x: x.repeat(n, *[1] * (x.dim() - 1)))

    @staticmethod
    def cat(items: list[TextEmbeddings]) -> TextEmbeddings:
        return items[0].apply(lambda *xs: torch.cat(xs), *items[1:])

    def unet_kwargs(self) -> dict:
        """encoder_hidden_states (+ added_cond_kwargs for SDXL) of a diffusers UNet2DConditionModel call."""
        kwargs = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> (len, T) input ids, padded/truncated to the tokenizer's model_max_length."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def token_ids(tokenizers: list, captions: list[str]) -> torch.Tensor:
    """(len, T) for one tokenizer, (len, E, T) for E of them (SDXL, FLUX: E = 2; SD3: 3; padded to the longest)."""
    ids = [tokenize(t, captions) for t in tokenizers]
    if len(ids) == 1:
        return ids[0]
    longest = max(i.shape[1] for i in ids)
    ids = [F.pad(i, (0, longest - i.shape[1]), value=t.pad_token_id or 0) for i, t in zip(ids, tokenizers)]
    return torch.stack(ids, dim=1)


class PromptEncoder:
    """The frozen tokenizer(s) and text encoder(s) of one model: token ids for the data stream, embeddings
    for the denoiser. One pair = SD 1.x/2.x; two = SDXL (the second encoder has the projection) or FLUX (the
    second is T5); three = SD3."""

    def __init__(self, tokenizers: list, text_encoders: list):
        """text_encoders all None: dropped (Components.drop_text_encoders); token ids still work, embed refuses."""
        if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (1, 2, 3):
            raise ValueError(f"{len(tokenizers)} tokenizers / {len(text_encoders)} text encoders: expected one pair "
                             "(SD 1.x/2.x), two (SDXL, FLUX) or three (SD3)")
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.dropped = all(e is None for e in self.text_encoders)
        # SDXL's second encoder is a CLIP with projection; FLUX's is T5 (no pooled output of its own)
        self.layout = ("sd" if len(tokenizers) == 1 else "sd3" if len(tokenizers) == 3 else
                       "flux" if "T5" in type(text_encoders[1]).__name__ else "sdxl")

    @classmethod
    def of(cls, tokenizer, text_encoder, tokenizer_2=None, text_encoder_2=None, tokenizer_3=None,
           text_encoder_3=None) -> PromptEncoder:
        """From a model's named components (the pairs it has: SD one, SDXL / FLUX two, SD3 three)."""
        pairs = [(t, e) for t, e in ((tokenizer, text_encoder), (tokenizer_2, text_encoder_2),
                                     (tokenizer_3, text_encoder_3)) if t is not None]
        return cls([t for t, _ in pairs], [e for _, e in pairs])

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        return token_ids(self.tokenizers, captions)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, resolution: int | None = None) -> TextEmbeddings:
        """ids from `token_ids` (any leading shape flattened to M rows) -> TextEmbeddings of M rows.
        resolution: pixel size of the images (SDXL's time_ids: uncropped, original = target size)."""
        if self.dropped:
            raise ValueError("the text encoders were dropped (data.drop_text_encoders=true) but a batch has no cached "
                             "text embeddings; cache every source with `jedi-data encode`, or set "
                             "data.drop_text_encoders=false")
        enc = self.text_encoders[0]
        if len(self.tokenizers) == 1:
            return TextEmbeddings(enc(ids.reshape(-1, ids.shape[-1]).to(enc.device))[0])
        ids = ids.reshape(-1, len(self.tokenizers), ids.shape[-1])
        parts = [ids[:, i, :t.model_max_length] for i, t in enumerate(self.tokenizers)]
        if self.layout == "flux":  # CLIP pooled + T5 hidden states
            pooled = enc(parts[0].to(enc.device)).pooler_output
            t5 = self.text_encoders[1]
            return TextEmbeddings(t5(parts[1].to(t5.device))[0], pooled)
        hidden, pooled = [], []
        for enc, part in zip(self.text_encoders[:2], parts):
            out = enc(part.to(enc.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL and SD3 condition on the penultimate layer of both CLIPs
            pooled.append(out[0])  # the pooled projection (text_embeds)
        if self.layout == "sd3":  # [CLIPs side by side, zero-padded to T5's width | T5 tokens]; both pooled
            t5 = self.text_encoders[2]
            t5_hidden = t5(parts[2].to(t5.device))[0]
            clip = F.pad(torch.cat(hidden, dim=-1), (0, t5_hidden.shape[-1] - sum(h.shape[-1] for h in hidden)))
            return TextEmbeddings(torch.cat([clip, t5_hidden.to(clip.dtype)], dim=1), torch.cat(pooled, dim=-1))
        pooled = pooled[-1]  # SDXL: the second encoder's pooled projection only
        if resolution is None:
            raise ValueError("SDXL text conditioning needs the image resolution (time_ids)")
        time_ids = sdxl_time_ids(None, resolution, pooled.shape[0]).to(pooled)
        return TextEmbeddings(torch.cat(hidden, dim=-1), pooled, time_ids)

    def to(self, *args, **kwargs) -> PromptEncoder:
        for enc in self.text_encoders:
            if enc is not None:
                enc.to(*args, **kwargs)
        return self
