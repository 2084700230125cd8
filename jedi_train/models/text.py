"""Captions -> what the denoiser is conditioned on, for each text-encoder layout.

* SD 1.x/2.x: one CLIP text encoder; its last hidden states.
* SDXL: two (CLIP ViT-L and OpenCLIP ViT-bigG with projection): the penultimate hidden states of both,
  concatenated, plus the second one's pooled projection and the size/crop micro-conditioning
  ("time_ids": original size, crop top-left, target size), as diffusers' SDXL pipeline builds them.
* FLUX.1: CLIP ViT-L's pooled output and T5-XXL's last hidden states, as diffusers' FluxPipeline.
* SD3 / SD3.5: three (CLIP ViT-L, OpenCLIP ViT-bigG, T5-XXL): both CLIPs' penultimate hidden states side by
  side, zero-padded to T5's width, then T5's tokens after them; both CLIPs' pooled projections concatenated,
  as diffusers' StableDiffusion3Pipeline.
* FLUX.2 Klein ("qwen3"): one Qwen3 causal LM; each caption wrapped in Qwen3's chat template (one user turn, the
  generation prompt, thinking off), padded to 512 tokens (or the tokenizer's shorter model_max_length), and the
  hidden states of layers 9, 18 and 27 stacked per token (T, 3 x hidden), with the padding masked out, as
  diffusers' Flux2KleinPipeline._get_qwen3_prompt_embeds. The mask is read back from the ids (pad token), so the
  ids alone stay what the stream and the cache carry.
* FLUX.2-dev ("mistral3"): one Mistral-3 (Mistral3ForConditionalGeneration, its text tower); each caption as
  Flux2Pipeline formats it (diffusers' format_input: its SYSTEM_MESSAGE as the system turn, the caption as the user
  turn, no generation prompt) through the processor's chat template, padded to 512 tokens (or shorter
  model_max_length), and the hidden states of layers 10, 20 and 30 stacked per token (T, 3 x hidden), padding
  masked, as Flux2Pipeline._get_mistral_3_small_prompt_embeds.
* Qwen-Image ("qwen2_5_vl"): one Qwen2.5-VL (text only); each caption in QwenImagePipeline's prompt template, the
  last hidden states of its valid tokens with the template's first 34 tokens (the system prompt and the user
  turn's header) dropped, at most 512 tokens, zero-padded, plus the text mask (`TextEmbeddings.mask`) the
  transformer attends with, as QwenImagePipeline._get_qwen_prompt_embeds / encode_prompt.

Token ids travel through the data stream as one tensor per caption, (T,) for one tokenizer or (E, T)
for E tokenizers (shorter ones padded to the longest, cut back when embedded: CLIP 77, T5 512), so the
stream, its caption cache and the caption dropout stay one code path.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F

TEXT_FIELDS = ("hidden", "pooled", "time_ids", "mask")  # TextEmbeddings' fields, in order (the cache stores them by name)


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
    """Per-image text conditioning: hidden (M, T, D) [+ pooled (M, P) and time_ids (M, 6) for SDXL; + mask (M, T),
    nonzero on real tokens, for layouts whose denoiser masks text padding (Qwen-Image)].

    Indexes, concatenates and stacks like one tensor of M rows (every field row-aligned), so the
    objective and the pipeline treat it as they treat image latents."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None

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


QWEN3_MAX_LENGTH = 512  # Flux2KleinPipeline's max_sequence_length
QWEN3_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers (indices into hidden_states)
MISTRAL3_MAX_LENGTH = 512  # Flux2Pipeline's max_sequence_length
MISTRAL3_LAYERS = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers


def _text_tokenizer(tokenizer):
    """The tokenizer itself, also when a processor (FLUX.2-dev's PixtralProcessor) wraps it."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def qwen3_token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> (len, T) ids of Qwen3's chat prompt, as Flux2KleinPipeline tokenizes them."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False) for c in captions]
    length = min(QWEN3_MAX_LENGTH, tokenizer.model_max_length)
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def mistral3_token_ids(processor, captions: list[str]) -> torch.Tensor:
    """Captions -> (len, T) ids of Mistral-3's chat prompt with FLUX.2's system message, as Flux2Pipeline."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    padding = {"padding": "max_length", "truncation": True,
               "max_length": min(MISTRAL3_MAX_LENGTH, _text_tokenizer(processor).model_max_length)}
    if hasattr(processor, "tokenizer"):  # a processor takes them apart (the same call, without its warning)
        padding = {"processor_kwargs": padding}
    return processor.apply_chat_template(format_input(list(captions), SYSTEM_MESSAGE), add_generation_prompt=False,
                                         tokenize=True, return_dict=True, return_tensors="pt", **padding)["input_ids"]


def stacked_layers(encoder, tokenizer, ids: torch.Tensor, layers: tuple[int, ...], family: str) -> torch.Tensor:
    """(M, T) ids -> (M, T, len(layers) x hidden): those hidden states of the encoder side by side per token,
    the padding (read back from the ids) masked out."""
    ids = ids.to(encoder.device)
    mask = (ids != _text_tokenizer(tokenizer).pad_token_id).long()
    out = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    if len(out.hidden_states) <= max(layers):
        raise ValueError(f"the {type(encoder).__name__} text encoder has {len(out.hidden_states) - 1} layers; "
                         f"{family} reads layers {layers}: point model.model_dir at a {family} directory")
    stacked = torch.stack([out.hidden_states[k] for k in layers], dim=1)  # (M, K, T, D)
    m, k, t, d = stacked.shape
    return stacked.permute(0, 2, 1, 3).reshape(m, t, k * d)


QWEN_IMAGE_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                       "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                       "<|im_end|>\n<|im_start|>assistant\n")  # QwenImagePipeline.prompt_template_encode
QWEN_IMAGE_DROP = 34  # QwenImagePipeline.prompt_template_encode_start_idx: the template's tokens before the caption
QWEN_IMAGE_MAX_LENGTH = 512  # QwenImagePipeline.__call__'s max_sequence_length (after the dropped tokens)


def qwen_image_token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> (len, 34 + 512) ids of QwenImagePipeline's prompt template, padded to a fixed length (the stream
    and the cache need one); the tokens past 34 + 512 it would cut after encoding are cut here (a causal encoder:
    the kept tokens' states do not depend on them). Or the tokenizer's shorter model_max_length."""
    length = min(QWEN_IMAGE_DROP + QWEN_IMAGE_MAX_LENGTH, tokenizer.model_max_length)
    texts = [QWEN_IMAGE_TEMPLATE.format(c) for c in captions]
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def qwen_image_embeddings(encoder, tokenizer, ids: torch.Tensor) -> TextEmbeddings:
    """(M, L) ids -> hidden (M, L - 34, D) and mask (M, L - 34): the last hidden states of each caption's valid
    tokens after the first 34, zero-padded (QwenImagePipeline._get_qwen_prompt_embeds). The transformer trims the
    padding every row has (denoise), so a batch sees what the pipeline's longest-prompt padding gives."""
    ids = ids.to(encoder.device)
    mask = ids != tokenizer.pad_token_id
    hidden = encoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[-1]
    rows = [h[m][QWEN_IMAGE_DROP:] for h, m in zip(hidden, mask)]
    length = ids.shape[1] - QWEN_IMAGE_DROP
    out = hidden.new_zeros(len(rows), length, hidden.shape[-1])
    keep = torch.zeros(len(rows), length, dtype=torch.bool, device=hidden.device)
    for i, r in enumerate(rows):
        out[i, :len(r)], keep[i, :len(r)] = r, True
    return TextEmbeddings(out, mask=keep)


STACKED = {"qwen3": (qwen3_token_ids, QWEN3_LAYERS, "FLUX.2 Klein"),
           "mistral3": (mistral3_token_ids, MISTRAL3_LAYERS, "FLUX.2-dev")}  # layout -> (ids, layers, family)


def layout_token_ids(layout: str | None, tokenizers: list, captions: list[str]) -> torch.Tensor:
    """Captions -> ids as the layout's pipeline tokenizes them (a chat prompt for the LLM encoders); None: plain.
    A module-level function, so that functools.partial(layout_token_ids, layout, tokenizers) goes to the data
    loader's workers without the text encoders."""
    if layout in STACKED:
        return STACKED[layout][0](tokenizers[0], captions)
    if layout == "qwen2_5_vl":
        return qwen_image_token_ids(tokenizers[0], captions)
    return token_ids(tokenizers, captions)


class PromptEncoder:
    """The frozen tokenizer(s) and text encoder(s) of one model: token ids for the data stream, embeddings
    for the denoiser. `layout` is the family's recipe (families.py `text_layout`): "sd" one pair; "sdxl" two
    CLIPs (the second with the projection); "flux" CLIP pooled + T5; "sd3" two CLIPs + T5; "qwen3" one Qwen3 (FLUX.2 Klein);
    "mistral3" one Mistral-3 (FLUX.2-dev); "qwen2_5_vl" one Qwen2.5-VL (Qwen-Image)."""

    LAYOUTS: ClassVar[dict[str, int]] = {"sd": 1, "sdxl": 2, "flux": 2, "sd3": 3, "qwen3": 1, "mistral3": 1,
                                         "qwen2_5_vl": 1}  # layout -> tokenizer/encoder pairs

    def __init__(self, tokenizers: list, text_encoders: list, layout: str):
        """text_encoders all None: dropped (Components.drop_text_encoders); token ids still work, embed refuses."""
        if layout not in self.LAYOUTS:
            raise ValueError(f"text layout {layout!r} is unknown; known: {', '.join(self.LAYOUTS)}")
        if len(tokenizers) != len(text_encoders) or len(tokenizers) != self.LAYOUTS[layout]:
            raise ValueError(f"{len(tokenizers)} tokenizers / {len(text_encoders)} text encoders, but the {layout} "
                             f"text layout takes {self.LAYOUTS[layout]} of each")
        self.tokenizers, self.text_encoders, self.layout = list(tokenizers), list(text_encoders), layout
        self.dropped = all(e is None for e in self.text_encoders)

    @classmethod
    def of(cls, layout: str, tokenizer, text_encoder, tokenizer_2=None, text_encoder_2=None, tokenizer_3=None,
           text_encoder_3=None) -> PromptEncoder:
        """From a model's named components (the pairs its layout has)."""
        pairs = [(tokenizer, text_encoder), (tokenizer_2, text_encoder_2), (tokenizer_3, text_encoder_3)]
        pairs = pairs[:cls.LAYOUTS.get(layout, 3)]  # an unknown layout: __init__ names it
        return cls([t for t, _ in pairs], [e for _, e in pairs], layout)

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        return layout_token_ids(self.layout, self.tokenizers, captions)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, resolution: int | None = None) -> TextEmbeddings:
        """ids from `token_ids` (any leading shape flattened to M rows) -> TextEmbeddings of M rows.
        resolution: pixel size of the images (SDXL's time_ids: uncropped, original = target size)."""
        if self.dropped:
            raise ValueError("the text encoders were dropped (data.drop_text_encoders=true) but a batch has no cached "
                             "text embeddings; cache every source with `jedi-data encode`, or set "
                             "data.drop_text_encoders=false")
        enc = self.text_encoders[0]
        if self.layout == "sd":
            return TextEmbeddings(enc(ids.reshape(-1, ids.shape[-1]).to(enc.device))[0])
        if self.layout in STACKED:
            _, layers, family = STACKED[self.layout]
            return TextEmbeddings(stacked_layers(enc, self.tokenizers[0], ids.reshape(-1, ids.shape[-1]), layers, family))
        if self.layout == "qwen2_5_vl":
            return qwen_image_embeddings(enc, self.tokenizers[0], ids.reshape(-1, ids.shape[-1]))
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
