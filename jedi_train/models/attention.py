"""Coupled self-attention: every image of a set attends to the keys/values of ALL images of its set.

Hidden states arrive per image, shaped (B*N, L, C) for B sets of N images (set-major order).
Queries, keys and values are regrouped to (B, N*L, C): attention over the concatenated tokens of a
set is exactly "each image's queries attend to all images' keys/values". With N = 1 and no mask
this is the base model's AttnProcessor2_0, op for op.

Who may attend to whom is given by a `SetLayout`, passed through the UNet's
``cross_attention_kwargs={"set_layout": layout}``:
  * ``valid``   (B, N): False marks padding images (sets of unequal size share one batch padded to N);
                padded images are never keys.
  * ``is_ref``  (B, N): which images are references (clean, known).
  * ``coupled`` (B,):   False = "no references" mode for that set: targets may not attend to
                references (image guidance's unconditional branch, reference dropout).
Masks depend only on the *key* image within each query group (targets / references), so they are
key-only masks (B, 1, 1, N*L): no (N*L)^2 matrix is built, and when nothing is masked the mask is
None and SDPA may use its flash kernel. A decoupled batch costs two SDPA calls (one per group).

Reference attention (`JeDiConfig.reference_attention`, read by `joint_attn_processors`):
  * ``"set"`` (default): a reference's queries see every image of its set, targets included;
  * ``"references"``: a reference's queries see only references. Then references never depend on
    the targets, and with references fed at t = 0 their keys/values are the same at every sampling
    step: a `ReferenceKVCache` records them in one references-only pass and the sampler reuses them.

Attention maps (pipelines/attention_maps.py): a layout made `with_attention_recorder` makes every coupled layer
(these processors, `text_and_set_attention`) also hand the recorder its image queries and keys; a layout without
one never enters that path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


@dataclass
class SetLayout:
    """How a flat batch of B*N images is grouped into sets, and which images may see which."""

    n: int
    is_ref: torch.Tensor  # (B, N) bool
    valid: torch.Tensor  # (B, N) bool
    coupled: torch.Tensor  # (B,) bool
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    # set by `with_reference_cache`: record references' keys/values, or prepend the recorded ones
    reference_cache: ReferenceKVCache | None = field(default=None, repr=False, compare=False)
    # (B,) long: which recorded subject's references each set replays (None: one subject, every set)
    reference_rows: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # set by `with_attention_recorder` (pipelines/attention_maps.py): every coupled layer hands it the target
    # queries and the keys; None (the default) = the recording code path is never entered
    attention_recorder: object | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, is_ref: torch.Tensor, valid: torch.Tensor | None = None,
              coupled: torch.Tensor | None = None) -> SetLayout:
        if is_ref.dim() != 2:
            raise ValueError(f"is_ref must be (num_sets, set_size), got shape {tuple(is_ref.shape)}")
        b, n = is_ref.shape
        valid = torch.ones_like(is_ref, dtype=torch.bool) if valid is None else valid.bool()
        coupled = torch.ones(b, dtype=torch.bool, device=is_ref.device) if coupled is None else coupled.bool()
        if valid.shape != is_ref.shape:
            raise ValueError(f"valid mask shape {tuple(valid.shape)} != is_ref shape {tuple(is_ref.shape)}")
        if coupled.shape != (b,):
            raise ValueError(f"coupled must have one entry per set ({b}), got shape {tuple(coupled.shape)}")
        targets = valid & ~is_ref.bool()
        if not bool(targets.any(dim=1).all()):
            bad = (~targets.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"sets {bad} have no target image; every set needs at least one non-reference image")
        return cls(n=n, is_ref=is_ref.bool(), valid=valid, coupled=coupled)

    @classmethod
    def independent(cls, num_images: int, device=None) -> SetLayout:
        """Every image its own set of one: the base model's behaviour."""
        z = torch.zeros(num_images, 1, dtype=torch.bool, device=device)
        return cls.build(z)

    @property
    def num_sets(self) -> int:
        return self.is_ref.shape[0]

    def decoupled(self) -> SetLayout:
        """The same sets with targets cut off from references (image guidance's 'no references' branch)."""
        return SetLayout.build(self.is_ref, self.valid, torch.zeros_like(self.coupled))

    @classmethod
    def references_only(cls, num_refs: int, device=None, num_sets: int = 1) -> SetLayout:
        """Sets made of references only (one per subject): the pass that fills a `ReferenceKVCache`."""
        ones = torch.ones(num_sets, num_refs, dtype=torch.bool, device=device)
        return cls(n=num_refs, is_ref=ones, valid=ones.clone(),
                   coupled=torch.ones(num_sets, dtype=torch.bool, device=device))

    def with_reference_cache(self, cache: ReferenceKVCache, rows: torch.Tensor | None = None) -> SetLayout:
        """This layout, carrying a reference key/value cache (recording or replaying). rows: (B,) the
        recorded subject each set replays, when one call samples several subjects."""
        return SetLayout(self.n, self.is_ref, self.valid, self.coupled, reference_cache=cache, reference_rows=rows,
                         attention_recorder=self.attention_recorder)

    def replay(self, recorded: torch.Tensor) -> torch.Tensor:
        """Recorded reference keys or values (subjects, ...) -> one row per set of this layout."""
        if self.reference_rows is None:
            return recorded.expand(self.num_sets, *recorded.shape[1:])
        return recorded[self.reference_rows.to(recorded.device)]

    def with_attention_recorder(self, recorder) -> SetLayout:
        """This layout (its cache too), with an attention recorder: `recorder.record(query, key, layout,
        ref_tokens)` is called by every coupled layer (see `record_attention`)."""
        return SetLayout(self.n, self.is_ref, self.valid, self.coupled, reference_cache=self.reference_cache,
                         reference_rows=self.reference_rows, attention_recorder=recorder)

    @property
    def trivial(self) -> bool:
        """Sets of one image with nothing cached or recorded: the base model's attention, op for op."""
        return (self.reference_cache is None and self.attention_recorder is None and self.n == 1
                and bool(self.valid.all()))

    def target_key_mask(self, tokens_per_image: int, ref_tokens: int = 0) -> torch.Tensor:
        """(B, ref_tokens + N*tokens_per_image) bool: the image keys a TARGET's queries may see (cached
        reference tokens first when `ref_tokens`), as `key_masks` / `cached_key_mask` / `per_image_key_mask`
        give them to SDPA."""
        tgt_keys, _ = self._visible_keys(True)  # a target's keys do not depend on references_see_targets
        keys = tgt_keys.repeat_interleave(tokens_per_image, dim=1)
        if ref_tokens:
            keys = torch.cat([self.coupled[:, None].expand(-1, ref_tokens), keys], dim=1)
        return keys

    def key_masks(self, tokens_per_image: int, device: torch.device, references_see_targets: bool = True):
        """[(query_is_ref or None, key_mask or None), ...] for the query groups, expanded to tokens.

        Cached per sequence length: every attention layer at one resolution shares them.
        """
        key = (tokens_per_image, device, references_see_targets)
        if key not in self._cache:
            self._cache[key] = self._key_masks(tokens_per_image, device, references_see_targets)
        return self._cache[key]

    def cached_key_mask(self, tokens_per_image: int, ref_tokens: int, device: torch.device):
        """Key mask when `ref_tokens` cached reference keys are prepended to every set's target keys:
        coupled sets see them, decoupled sets do not; padded images are never keys. None = no mask."""
        key = ("cached", tokens_per_image, ref_tokens, device)
        if key not in self._cache:
            refs = self.coupled[:, None].expand(-1, ref_tokens)
            keys = torch.cat([refs, self.valid.repeat_interleave(tokens_per_image, dim=1)], dim=1)
            self._cache[key] = None if bool(keys.all()) else keys[:, None, None, :].to(device)
        return self._cache[key]

    def per_image_key_mask(self, text_len: int, tokens_per_image: int, references_see_targets: bool, device,
                           ref_tokens: int = 0):
        """(B*N, 1, 1, text_len + ref_tokens + N*tokens_per_image) bool, or None when nothing is masked, for
        transformers whose queries are split by image and see their own text first (FLUX): own text, then
        `ref_tokens` cached reference tokens (coupled sets only), then the set's image tokens. Cached."""
        key = ("per_image", text_len, tokens_per_image, references_see_targets, ref_tokens, device)
        if key not in self._cache:
            b, n = self.is_ref.shape
            img = self.image_key_mask(references_see_targets).repeat_interleave(tokens_per_image, 2)
            if ref_tokens:
                img = torch.cat([self.coupled[:, None, None].expand(b, n, ref_tokens), img], dim=2)
            own_text = torch.ones(b * n, text_len, dtype=torch.bool, device=self.is_ref.device)
            mask = torch.cat([own_text, img.reshape(b * n, -1)], dim=1)
            self._cache[key] = None if bool(mask.all()) else mask[:, None, None, :].to(device)
        return self._cache[key]

    def _visible_keys(self, references_see_targets: bool):
        """(target queries' key images, reference queries' key images), each (B, N) bool, where the layout
        lives (the batch's device; the CPU for a meta-device dry run): callers move the masks they build."""
        is_ref, valid, coupled = self.is_ref, self.valid, self.coupled[:, None]
        tgt_keys = valid & (coupled | ~is_ref)
        ref_keys = valid & ((coupled & references_see_targets) | is_ref)
        # a set without references has no reference queries; keep its row non-empty (no NaN in SDPA)
        return tgt_keys, torch.where(ref_keys.any(1, keepdim=True), ref_keys, valid)

    def image_key_mask(self, references_see_targets: bool) -> torch.Tensor:
        """(B, N, N) bool: may image i's queries see image j's keys. The same rules as `key_masks`, per query
        image (transformers whose queries are already split by image, e.g. FLUX with per-image text)."""
        tgt_keys, ref_keys = self._visible_keys(references_see_targets)
        is_ref = self.is_ref[:, :, None]
        return torch.where(is_ref, ref_keys[:, None, :], tgt_keys[:, None, :])

    def _key_masks(self, L: int, device, references_see_targets: bool = True):
        is_ref, valid = self.is_ref, self.valid  # decided where the layout lives, then moved to `device`
        tgt_keys, ref_keys = self._visible_keys(references_see_targets)

        def tok(m):  # (B, N) -> (B, 1, 1, N*L)
            return m.repeat_interleave(L, dim=1)[:, None, None, :].to(device)

        has_refs = bool((is_ref & valid).any())
        if not has_refs or bool((tgt_keys == ref_keys).all()):
            return [(None, None if bool(tgt_keys.all()) else tok(tgt_keys))]
        q_ref = (is_ref & valid).repeat_interleave(L, dim=1)[:, None, :, None].to(device)  # (B, 1, N*L, 1)
        return [(None, tok(tgt_keys)), (q_ref, tok(ref_keys))]


class ReferenceKVCache:
    """Keys/values of the reference images in every coupled self-attention layer.

    Valid only when references do not depend on the targets (reference_attention "references")
    nor on the sampling step (references at t = 0). Fill it with one forward pass of the references
    alone (layout `SetLayout.references_only(K).with_reference_cache(cache)`, recording=True), then
    set recording=False and run target-only sets: every layer prepends the recorded keys/values. Several
    subjects: one references-only set each when recording, and `reference_rows` says whose each set replays.
    """

    def __init__(self):
        self.recording = True
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._kv)

    def record(self, attn: Attention, key: torch.Tensor, value: torch.Tensor) -> None:
        self._kv[id(attn)] = (key, value)  # one row per subject: (subjects, heads, K*L, head_dim)

    def get(self, attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        if id(attn) not in self._kv:
            raise RuntimeError("reference cache has no entry for this attention layer; run the recording pass "
                               "(references only, recording=True) with the same UNet first")
        return self._kv[id(attn)]


class JointAttnProcessor(AttnProcessor2_0):
    """Set-coupled self-attention (attn1). Falls back to the base processor when no layout is given.

    references_see_targets=False: reference queries attend to references only (see module doc).
    """

    def __init__(self, references_see_targets: bool = True):
        super().__init__()
        self.references_see_targets = references_see_targets

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, set_layout: SetLayout | None = None):
        if encoder_hidden_states is not None:
            raise ValueError("JointAttnProcessor is for self-attention (attn1); cross-attention stays per image")
        if set_layout is None or set_layout.trivial:
            return super().__call__(attn, hidden_states, None, attention_mask, temb)
        cache = set_layout.reference_cache
        if attention_mask is not None:
            raise ValueError("a UNet attention_mask cannot be combined with set-coupled self-attention")

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            bn, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(bn, channel, height * width).transpose(1, 2)
        bn, L, _ = hidden_states.shape
        n = set_layout.n
        if bn != set_layout.num_sets * n:
            raise ValueError(f"batch of {bn} images does not match the set layout "
                             f"({set_layout.num_sets} sets x {n} images)")
        b = bn // n
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        def regroup(x):  # (B*N, L, H*d) -> (B, H, N*L, d): a set's tokens side by side
            return x.reshape(b, n * L, attn.heads, head_dim).transpose(1, 2)

        query, key, value = regroup(query), regroup(key), regroup(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if cache is not None and cache.recording:  # references-only pass: remember their keys/values
            if not bool(set_layout.is_ref.all()):
                raise ValueError("the reference-cache recording pass takes sets made of references only")
            if self.references_see_targets:
                raise ValueError("a reference key/value cache needs reference_attention='references' "
                                 "(references that do not attend to targets)")
            cache.record(attn, key, value)
            groups = [(None, None)]
        elif cache is not None:  # target-only sets: prepend the cached reference keys/values
            if bool(set_layout.is_ref.any()):
                raise ValueError("with a replaying reference cache, sets hold targets only")
            ref_k, ref_v = cache.get(attn)
            key = torch.cat([set_layout.replay(ref_k), key], dim=2)
            value = torch.cat([set_layout.replay(ref_v), value], dim=2)
            groups = [(None, set_layout.cached_key_mask(L, ref_k.shape[2], query.device))]
        else:
            groups = set_layout.key_masks(L, query.device, self.references_see_targets)
        if set_layout.attention_recorder is not None:  # explain mode only (return_attention_maps)
            set_layout.attention_recorder.record(query, key, set_layout, key.shape[2] - n * L)

        out = None
        for q_select, key_mask in groups:
            o = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask, dropout_p=0.0)
            out = o if out is None else torch.where(q_select, o, out)

        hidden_states = out.transpose(1, 2).reshape(bn, L, inner_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(bn, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def text_and_set_attention(query, key, value, text_len: int, set_layout: SetLayout, references_see_targets: bool,
                           attn: Attention, text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The joint text-image attention of an MM-DiT (FLUX, SD3), coupled over sets: each image's queries see its
    OWN text keys and the image keys of every image of its set (masked as `per_image_key_mask` says), plus the
    cached reference image keys when `set_layout` replays a `ReferenceKVCache`. query, key, value: (B*N, S, H, d)
    per image, its `text_len` text tokens first; text_mask (B*N, text_len), False on text padding that is never a
    key (Qwen-Image); returns (B*N, S, H*d)."""
    cache = set_layout.reference_cache
    bn, s, heads, d = query.shape
    n, b, li = set_layout.n, bn // set_layout.n, s - text_len
    if bn != set_layout.num_sets * n:
        raise ValueError(f"batch of {bn} images does not match the set layout "
                         f"({set_layout.num_sets} sets x {n} images)")
    img_k, img_v = key[:, text_len:].reshape(b, n * li, heads, d), value[:, text_len:].reshape(b, n * li, heads, d)
    ref_tokens = 0
    if cache is not None and cache.recording:  # references-only pass: remember their image keys/values
        if not bool(set_layout.is_ref.all()):
            raise ValueError("the reference-cache recording pass takes sets made of references only")
        if references_see_targets:
            raise ValueError("a reference key/value cache needs reference_attention='references'")
        cache.record(attn, img_k, img_v)
    elif cache is not None:  # target-only sets: the cached reference image tokens come first
        if bool(set_layout.is_ref.any()):
            raise ValueError("with a replaying reference cache, sets hold targets only")
        ref_k, ref_v = cache.get(attn)
        img_k = torch.cat([set_layout.replay(ref_k), img_k], dim=1)
        img_v = torch.cat([set_layout.replay(ref_v), img_v], dim=1)
        ref_tokens = ref_k.shape[1]
    if set_layout.attention_recorder is not None:  # explain mode only: image queries and keys, text left out
        img_q = query[:, text_len:].reshape(b, n * li, heads, d)
        set_layout.attention_recorder.record(img_q.transpose(1, 2), img_k.transpose(1, 2), set_layout, ref_tokens)

    def per_image(own, shared):  # one copy: cat reads the set's tokens through an expanded view
        text = own[:, :text_len].unflatten(0, (b, n))
        return torch.cat([text, shared[:, None].expand(b, n, *shared.shape[1:])], dim=2).flatten(0, 1)

    keys, values = per_image(key, img_k), per_image(value, img_v)
    mask = set_layout.per_image_key_mask(text_len, li, references_see_targets, query.device, ref_tokens)
    if text_mask is not None and not bool(text_mask.all()):
        full = mask if mask is not None else torch.ones(bn, 1, 1, keys.shape[1], dtype=torch.bool, device=query.device)
        mask = torch.cat([full[..., :text_len] & text_mask.bool()[:, None, None, :], full[..., text_len:]], dim=-1)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask).transpose(1, 2)
    return out.flatten(2, 3).to(query.dtype)


class PerImageAttnProcessor(AttnProcessor2_0):
    """Cross-attention (attn2): per image, unchanged; accepts (and ignores) the set layout."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, set_layout: SetLayout | None = None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def joint_attn_processors(unet) -> dict:
    """Processor map for `unet.set_attn_processor`: coupled attn1, per-image everything else."""
    see_targets = unet.jedi.reference_attention == "set"
    return {name: JointAttnProcessor(see_targets) if name.endswith("attn1.processor") else PerImageAttnProcessor()
            for name in unet.attn_processors}
