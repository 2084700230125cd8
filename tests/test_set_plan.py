"""SetPlan and guidance branches on their own (no model): how M targets and K references become sets,
the flat batch and back, and the one SetLayout all guidance branches share."""
import math

import pytest
import torch

from jedi_train.models.text import TextEmbeddings
from jedi_train.pipelines.set_plan import Branch, SetPlan, guidance_branches


def test_targets_are_split_into_near_equal_contiguous_sets():
    """S = ceil(M / cap), cap = max(1, max_set_size - K); sizes differ by at most one; valid slots in
    set-major order are the targets in order; padding repeats a valid target of its own set."""
    for m in range(1, 14):
        for k in range(7):
            for max_set in range(2, 9):
                plan = SetPlan.build(m, k, k, max_set_size=max_set)
                cap = max(1, max_set - k)
                sizes = plan.target_valid.sum(1).tolist()
                assert plan.num_sets == math.ceil(m / cap) == len(sizes), (m, k, max_set)
                assert sum(sizes) == m and max(sizes) - min(sizes) <= 1 and max(sizes) <= cap
                assert plan.set_size == k + plan.target_index.shape[1] == k + max(sizes)
                assert torch.equal(plan.target_index[plan.target_valid], torch.arange(m))
                for row, valid in zip(plan.target_index, plan.target_valid):
                    assert set(row[~valid].tolist()) <= set(row[valid].tolist())


def test_cached_references_decide_the_split_but_take_no_slots():
    """num_refs_in_set=0 (references cached): the same split as with K references in the sets, sets of
    targets only, and stack() needs no references."""
    cached, in_set = SetPlan.build(7, 0, 5, max_set_size=8), SetPlan.build(7, 5, 5, max_set_size=8)
    assert torch.equal(cached.target_index, in_set.target_index) and cached.num_sets == 3
    assert cached.set_size == 3 and in_set.set_size == 8
    targets = torch.arange(7.0)
    flat = cached.stack(None, targets)
    assert flat.shape == (9,) and torch.equal(cached.unstack(flat), targets)


def test_stack_and_unstack_image_tensors():
    plan = SetPlan.build(5, 2, 2, max_set_size=5)  # cap 3: sets of 3 and 2 targets (+1 padding)
    g = torch.Generator().manual_seed(0)
    refs, targets = torch.randn(2, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    flat = plan.stack(refs, targets)
    assert flat.shape == (plan.num_sets * plan.set_size, 4, 8, 8) == (10, 4, 8, 8)
    sets = flat.view(2, 5, 4, 8, 8)
    assert torch.equal(sets[:, :2], refs.expand(2, *refs.shape))  # every set: all K references first
    assert torch.equal(sets[0, 2:], targets[:3]) and torch.equal(sets[1, 2:4], targets[3:])
    assert torch.equal(sets[1, 4], targets[3])  # the padding slot: a copy of a target of the same set
    assert torch.equal(plan.unstack(flat), targets)
    out = flat * 2 + 1  # what a UNet returns for the slots: unstack keeps valid target slots, in order
    out.view(2, 5, 4, 8, 8)[1, 4] = float("nan")  # nothing from the padding slot comes back
    assert torch.equal(plan.unstack(out), targets * 2 + 1)


def test_stack_text_embeddings_field_by_field():
    plan = SetPlan.build(3, 1, 1, max_set_size=3)  # cap 2: sets of 2 and 1 (+1 padding)
    def emb(n, off):
        return TextEmbeddings(hidden=torch.arange(n * 6.0).view(n, 2, 3) + off,
                              pooled=torch.arange(n * 4.0).view(n, 4) + off)

    refs, targets = emb(1, 100), emb(3, 0)
    flat = plan.stack(refs, targets)
    assert isinstance(flat, TextEmbeddings) and flat.time_ids is None  # absent fields stay absent
    assert torch.equal(flat.hidden, plan.stack(refs.hidden, targets.hidden))
    assert torch.equal(flat.pooled, plan.stack(refs.pooled, targets.pooled))
    assert flat.hidden.shape == (6, 2, 3) and torch.equal(flat.hidden[3], refs.hidden[0])
    no_refs = SetPlan.build(3, 0, 1, max_set_size=3).stack(None, targets)
    assert torch.equal(no_refs.pooled, targets.pooled[[0, 1, 2, 2]])


def test_layout_marks_references_padding_and_branch_coupling():
    """One layout for all branches, branch-major: references first in each set, padding invalid, and a
    set coupled to its references only in branches that see them."""
    plan = SetPlan.build(5, 2, 2, max_set_size=5)
    branches = guidance_branches(3.0, 2.0, use_refs=True)
    assert [b.refs for b in branches] == [False, True, True]
    layout = plan.layout(branches, "cpu")
    assert layout.num_sets == 6 and layout.n == plan.set_size == 5
    assert layout.is_ref.tolist() == [[True, True, False, False, False]] * 6
    assert layout.valid.tolist() == [[True] * 5, [True] * 4 + [False]] * 3
    assert layout.coupled.tolist() == [False, False, True, True, True, True]
    assert len(plan.stack(torch.zeros(2), torch.zeros(5))) * len(branches) == layout.num_sets * layout.n

    cached = SetPlan.build(5, 0, 2, max_set_size=5).layout(branches[:1], "cpu")  # cached refs: targets only
    assert cached.n == 3 and not cached.is_ref.any() and cached.valid.tolist() == [[True] * 3, [True] * 2 + [False]]


@pytest.mark.parametrize("use_refs", [True, False])
def test_guidance_branch_weights_sum_to_one(use_refs):
    g = torch.Generator().manual_seed(0)
    for s_txt, s_img in (torch.rand(20, 2, generator=g) * 8).tolist() + [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]:
        branches = guidance_branches(s_txt, s_img, use_refs)
        assert branches and all(b.weight != 0 for b in branches)
        assert math.isclose(sum(b.weight for b in branches), 1.0, abs_tol=1e-9)
        assert use_refs or not any(b.refs for b in branches)


def test_guidance_one_makes_a_single_branch():
    """Text and image guidance 1: the text + references prediction alone (one branch, one set per batch)."""
    assert guidance_branches(1.0, 1.0, use_refs=True) == [Branch("cond", True, 1.0)]
    assert guidance_branches(1.0, 5.0, use_refs=False) == [Branch("cond", False, 1.0)]
    assert guidance_branches(0.0, 0.0, use_refs=True) == [Branch("uncond", False, 1.0)]
