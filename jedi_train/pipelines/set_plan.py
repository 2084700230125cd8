"""How one sampling call's images become sets, and the guidance branches one batched UNet input.

Set policy (large K + M): the M targets are split into S = ceil(M / cap) sets of near-equal size
(sizes differ by at most one; shorter sets are padded, padding is masked out of attention), where
cap = max(1, max_set_size - K) when the references belong to the sets, else max_set_size. EVERY set
holds ALL K references: references are never split, a target always sees every reference. So
max_set_size bounds the targets per set; with K >= max_set_size a set is K references + 1 target.
Targets in one set attend to each other (they are sampled jointly, like a set in training).

Guidance branches: each branch is (text, references visible) with a weight; the pipeline sums the
weighted predictions. All branches' sets are stacked into one batch with one SetLayout (coupled
per set), so one UNet call per step serves all branches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from jedi_train.models.attention import SetLayout


@dataclass(frozen=True)
class Branch:
    text: str  # "cond" (the prompts) or "uncond" (negative / empty prompt)
    refs: bool  # targets may attend to the references
    weight: float


def guidance_branches(guidance_scale: float, image_guidance_scale: float, use_refs: bool) -> list[Branch]:
    """docs/method.md: eps = e(none,none) + s_img (e(none,refs) - e(none,none)) + s_txt (e(text,refs) - e(none,refs)),
    rewritten as a weighted sum; without references (s_img = 0) plain text CFG with targets decoupled from
    the references in EVERY branch. Branches of weight 0 are skipped."""
    s_txt, s_img = float(guidance_scale), float(image_guidance_scale)
    if use_refs:
        branches = [Branch("uncond", False, 1.0 - s_img), Branch("uncond", True, s_img - s_txt),
                    Branch("cond", True, s_txt)]
    else:
        branches = [Branch("uncond", False, 1.0 - s_txt), Branch("cond", False, s_txt)]
    return [b for b in branches if b.weight != 0.0]  # weights sum to 1: never empty


@dataclass
class SetPlan:
    num_targets: int  # M (all subjects')
    num_refs: int  # K references in each set's batch slots (0 when they are cached or unused)
    target_index: torch.Tensor  # (S, T) long: target id of each target slot (padding repeats a valid id)
    target_valid: torch.Tensor  # (S, T) bool
    set_owner: torch.Tensor | None = None  # (S,) long: the subject of each set (None: one subject)

    @classmethod
    def build(cls, num_targets: int | list[int], num_refs_in_set: int, semantic_refs: int,
              max_set_size: int) -> SetPlan:
        """semantic_refs: K, the references every set conceptually holds (decides the split, cached or not).
        num_targets: M, or one M per subject when one call samples several subjects: each subject's targets
        are split as if it were sampled alone, and its sets hold its own K references."""
        if max_set_size < 2:
            raise ValueError(f"max_set_size={max_set_size} is too small; a set needs room for a target")
        per_subject = [num_targets] if isinstance(num_targets, int) else list(num_targets)
        cap = max(1, max_set_size - semantic_refs)
        sizes, owner = [], []
        for j, m in enumerate(per_subject):
            s = math.ceil(m / cap)
            sizes += [m // s + (1 if i < m % s else 0) for i in range(s)]
            owner += [j] * s
        t = max(sizes)
        index = torch.zeros(len(sizes), t, dtype=torch.long)
        valid = torch.zeros(len(sizes), t, dtype=torch.bool)
        start = 0
        for i, n in enumerate(sizes):  # contiguous chunks: set-major order of valid slots = target order
            index[i, :n] = torch.arange(start, start + n)
            index[i, n:] = start
            valid[i, :n] = True
            start += n
        owners = torch.tensor(owner, dtype=torch.long) if len(per_subject) > 1 else None
        return cls(sum(per_subject), num_refs_in_set, index, valid, owners)

    @property
    def num_sets(self) -> int:
        return self.target_index.shape[0]

    @property
    def set_size(self) -> int:
        return self.num_refs + self.target_index.shape[1]

    def stack(self, refs: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        """Per-image tensors -> one flat batch of S sets: [K refs | T target slots] per set.

        refs: (K, ...), or (J * K, ...) for J subjects (subject-major), or None; targets: (M, ...).
        Returns (S * N, ...). TextEmbeddings: field by field."""
        if hasattr(targets, "apply"):  # TextEmbeddings
            return targets.apply(lambda t, r: self.stack(r, t), refs) if self.num_refs else targets.apply(
                lambda t: self.stack(None, t))
        sets = targets[self.target_index.to(targets.device)]  # (S, T, ...)
        if self.num_refs:
            if self.set_owner is None:
                per_set = refs.unsqueeze(0).expand(self.num_sets, *refs.shape)
            else:
                per_set = refs.unflatten(0, (-1, self.num_refs))[self.set_owner.to(refs.device)]
            sets = torch.cat([per_set, sets], dim=1)
        return sets.flatten(0, 1)

    def unstack(self, flat: torch.Tensor) -> torch.Tensor:
        """(S * N, ...) UNet output of one branch -> (M, ...) target predictions in target order."""
        sets = flat.unflatten(0, (self.num_sets, self.set_size))[:, self.num_refs:]
        return sets[self.target_valid.to(flat.device)]

    def layout(self, branches: list[Branch], device) -> SetLayout:
        """One layout for all branches' sets, stacked branch-major."""
        s, k = self.num_sets, self.num_refs
        is_ref = torch.cat([torch.ones(s, k, dtype=torch.bool), torch.zeros_like(self.target_valid)], dim=1)
        valid = torch.cat([torch.ones(s, k, dtype=torch.bool), self.target_valid], dim=1)
        coupled = torch.tensor([b.refs for b in branches for _ in range(s)], dtype=torch.bool)
        nb = len(branches)
        return SetLayout.build(is_ref.repeat(nb, 1).to(device), valid.repeat(nb, 1).to(device), coupled.to(device))
