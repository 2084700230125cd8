"""Reference attention maps: where each generated image took its subject from (`return_attention_maps=True`).

JeDi's coupled attention lets a target's queries attend to the keys of every reference (and of the other
targets of its set), so the attention mass a target puts on a reference's tokens IS its provenance. Per target:
  * `shares` (K + 2,): the share of its attention mass on each of the K references, on itself, and on the other
    targets of its set; they sum to 1 (padding images are never keys, so they get nothing);
  * `heatmaps` (K, h, w): that mass spread over each reference's token grid (`heatmaps[k].sum() == shares[k]`),
    on the finest grid of the coupled layers (coarser layers' maps are spread evenly over the finer tokens).

Averaged over
  * heads, and the target's query tokens (each query's attention is a distribution, so is their mean);
  * the coupled layers, each counted once (UNet self-attention at every resolution; MM-DiT joint blocks);
  * the last third of the denoising steps (`recorded_steps`): by then the target's layout is decided and its
    queries look up detail; at high noise early on, attention is diffuse and mostly positional.
Recorded from ONE guidance branch: the conditional one with the references visible (the prompt's branch;
without references, the prompt's branch alone; with guidance_scale 0, which drops it, the references-visible
branch without text). The image-guidance branches with references hidden would put no mass on references.
MM-DiT families (FLUX, SD3, FLUX.2): the text tokens a target also attends to are left out, i.e. the shares
are of the mass on IMAGE tokens (softmax over image keys only = the full softmax renormalised without text).

Cost: the recording is a separate code path, entered only by layouts that carry a recorder (SetLayout
.attention_recorder), i.e. only in the recorded steps of a call that asked for maps; without it the sampler
runs exactly the ops it always ran. With it, each recorded layer also forms the (target queries x keys)
attention matrix explicitly, in chunks (SDPA never returns it). The maps are the same with the reference KV
cache on or off: the cached keys are the keys the references have in the uncached sets (tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # attention-matrix elements formed at once (64 MB in float32)


@dataclass
class AttentionMap:
    """One generated image's attention: see the module doc."""

    shares: torch.Tensor  # (K + 2,): reference 0..K-1, the target itself, the other targets of its set
    heatmaps: torch.Tensor  # (K, h, w): mass per reference token; heatmaps[k].sum() == shares[k]

    @property
    def reference_shares(self) -> torch.Tensor:
        return self.shares[:-2]

    @property
    def self_share(self) -> float:
        return float(self.shares[-2])

    @property
    def others_share(self) -> float:
        return float(self.shares[-1])


def recorded_steps(num_inference_steps: int) -> range:
    """The step indices whose attention is averaged: the last third (at least one step)."""
    return range(num_inference_steps - math.ceil(num_inference_steps / 3), num_inference_steps)


def spread(maps: torch.Tensor, side: int) -> torch.Tensor:
    """(..., s, s) masses -> (..., side, side), each cell's mass spread over the cells it covers: sums are kept."""
    s = maps.shape[-1]
    if s == side:
        return maps
    flat = maps.reshape(-1, 1, s, s).float()
    up = F.interpolate(flat, size=(side, side), mode="nearest" if side % s == 0 else "bilinear")
    total, got = flat.sum((-1, -2), keepdim=True), up.sum((-1, -2), keepdim=True)
    up = up * torch.where(got > 0, total / got.clamp_min(1e-30), torch.zeros_like(got))
    return up.reshape(*maps.shape[:-2], side, side)


class AttentionRecorder:
    """Accumulates the maps of one sampling call. `plan`: the call's SetPlan; `num_refs`: K (whether the
    references sit in the sets' slots or in the key/value cache); `rows`: the sets of the recorded branch
    within its model call's batch (branches are stacked branch-major)."""

    def __init__(self, plan, num_refs: int, rows: slice):
        self.plan, self.k, self.rows = plan, num_refs, rows
        self.layers = 0  # (layer, step) records summed so far
        self.shares: torch.Tensor | None = None  # (M, K + 2) sums
        self.heat: dict[int, torch.Tensor] = {}  # token-grid side -> (M, K, side, side) sums
        self.calls: list | None = None  # the model calls of a recorded step (JeDiBasePipeline.attention_recording)

    def record(self, query: torch.Tensor, key: torch.Tensor, set_layout, ref_tokens: int) -> None:
        """One coupled layer: query (B, H, N*L, d) the image queries of every image of the batch's sets, key
        (B, H, ref_tokens + N*L, d) the image keys (cached reference tokens first). Text is never passed."""
        n, plan, k = set_layout.n, self.plan, self.k
        length = query.shape[2] // n
        slots = plan.target_index.shape[1]  # target slots per set
        if key.shape[2] != (k + slots) * length:
            raise RuntimeError(f"attention recorder: {key.shape[2]} keys, expected (K={k} + {slots}) x {length}")
        q, keys = query[self.rows], key[self.rows]
        mask = set_layout.target_key_mask(length, ref_tokens)[self.rows].to(q.device)
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=q.device).masked_fill(~mask, float("-inf"))
        first = plan.num_refs  # slot of the first target (0 when the references are cached)
        mass = torch.stack([self._mass(q[:, :, (first + j) * length:(first + j + 1) * length], keys, bias)
                            for j in range(slots)], dim=1)  # (S, T, keys)
        mass = mass.unflatten(2, (k + slots, length))[plan.target_valid.to(mass.device)]  # (M, K + T, L)
        slot = torch.nonzero(plan.target_valid)[:, 1].to(mass.device)  # each target's slot in its set
        own = mass[torch.arange(len(slot), device=mass.device), k + slot].sum(-1)
        shares = torch.cat([mass[:, :k].sum(-1), own[:, None], (mass[:, k:].sum((-1, -2)) - own)[:, None]], dim=1)
        side = math.isqrt(length)
        if side * side != length:
            raise RuntimeError(f"attention recorder: {length} tokens per image is not a square grid")
        heat = mass[:, :k].reshape(len(slot), k, side, side)
        self.shares = shares if self.shares is None else self.shares + shares
        self.heat[side] = heat if side not in self.heat else self.heat[side] + heat
        self.layers += 1

    @staticmethod
    def _mass(q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(S, H, L, d) one target slot's queries -> (S, keys): attention mass per key, mean over heads and queries."""
        s, h, length, d = q.shape
        step = max(1, CHUNK_ELEMENTS // max(1, s * h * keys.shape[2]))
        total = 0
        for i in range(0, length, step):
            logits = torch.matmul(q[:, :, i:i + step].float(), keys.float().transpose(-1, -2)) * d ** -0.5
            total = total + torch.softmax(logits + bias[:, None, None, :], dim=-1).sum((1, 2))
        return total / (h * length)

    def maps(self) -> list[AttentionMap]:
        """Per target (prompt-major, as the images): the averaged maps."""
        if not self.layers:
            raise RuntimeError("no attention was recorded: the denoiser has no coupled attention layer that ran")
        side = max(self.heat)
        heat = sum(spread(h, side) for h in self.heat.values()) / self.layers
        shares = self.shares / self.layers
        return [AttentionMap(shares[i].cpu(), heat[i].cpu()) for i in range(shares.shape[0])]
