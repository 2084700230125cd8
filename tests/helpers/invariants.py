"""The joint-denoiser invariants every family's tests check, written once: a set's images interact and the set is
permutation-equivariant; sets stacked in one batch do not interact. `run_denoiser` is one call of any family's
joint denoiser (its own input assembly, its `denoise`)."""
import torch

from jedi_train.models.attention import SetLayout


def run_denoiser(model, x, t, e, layout, ref_visible=None):
    ref_visible = torch.zeros(x.shape[0], dtype=torch.bool) if ref_visible is None else ref_visible
    with torch.no_grad():
        return model.denoise(model.assemble_input(x, x, ref_visible), t, e, layout)


def check_coupling_and_permutation(model, x, t, e, atol=1e-5):
    """4 images as one set: they change each other's outputs, and permuting them permutes the outputs."""
    t = torch.full((4,), 500, dtype=t.dtype)  # one timestep per set
    layout = SetLayout.build(torch.zeros(1, 4, dtype=torch.bool))
    out = run_denoiser(model, x, t, e, layout)
    assert (out - run_denoiser(model, x, t, e, SetLayout.independent(4))).abs().max() > 1e-3  # they interact
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(run_denoiser(model, x[perm], t[perm], e[perm], layout), out[perm], atol=atol, rtol=1e-4)


def check_sets_independent(model, x, t, e):
    """6 images as 2 sets of 3: changing the second set's images leaves the first set's outputs alone.
    Returns (outputs, layout) for the family's own further checks."""
    layout = SetLayout.build(torch.zeros(2, 3, dtype=torch.bool))
    out = run_denoiser(model, x, t, e, layout)
    x2 = x.clone()
    x2[3:] = torch.randn_like(x2[3:])
    out2 = run_denoiser(model, x2, t, e, layout)
    assert (out[:3] - out2[:3]).abs().max() < 1e-6 and (out[3:] - out2[3:]).abs().max() > 1e-3
    return out, layout


def check_cache_equals_no_cache(model, x, e):
    """4 images, 2 references + 2 targets: targets replaying the references' recorded keys/values (one
    references-only pass) get the outputs of the full set. `model` must be built with reference_attention
    'references'."""
    from jedi_train.models.attention import ReferenceKVCache

    k = 2
    t = torch.tensor([0.0, 0.0, 600.0, 600.0])
    rv = torch.tensor([True, True, False, False])
    full = run_denoiser(model, x, t, e, SetLayout.build(rv[None]), rv)
    cache = ReferenceKVCache()
    run_denoiser(model, x[:k], t[:k], e[:k], SetLayout.references_only(k).with_reference_cache(cache), rv[:k])
    cache.recording = False
    assert len(cache) == len(model.attn_processors)
    replay = SetLayout.build(torch.zeros(1, 2, dtype=torch.bool)).with_reference_cache(cache)
    cached = run_denoiser(model, x[k:], t[k:], e[k:], replay, torch.zeros(2, dtype=torch.bool))
    torch.testing.assert_close(cached, full[k:], atol=1e-5, rtol=1e-4)


def check_save_load(joint, base_class, folder, x, t, e):
    """A saved joint model loads back with its JeDi settings, and a plain diffusers load of the same folder
    adopted as joint gives the same outputs (3 images: 1 reference, 2 targets)."""
    joint.save_pretrained(folder)
    cls = type(joint)
    back = cls.load(str(folder), None).eval()
    assert back.jedi == joint.jedi
    plain = cls.adopt(base_class.from_pretrained(folder).eval())
    layout = SetLayout.build(torch.tensor([[True, False, False]]))
    rv = torch.tensor([True, False, False])
    want = run_denoiser(joint, x, t, e, layout, rv)
    assert torch.equal(run_denoiser(back, x, t, e, layout, rv), want)
    assert torch.equal(run_denoiser(plain, x, t, e, layout, rv), want)
