"""Reference attention maps (issue 33): pipe(..., return_attention_maps=True) on tiny SD and FLUX pipelines, the
recorder against hand-computed attention, overlays on disk."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.pipelines import load, make_pipeline_dir
from PIL import Image

from jedi_train.models.attention import SetLayout
from jedi_train.pipelines.attention_maps import AttentionRecorder, recorded_steps, spread
from jedi_train.pipelines.set_plan import SetPlan

pytestmark = pytest.mark.usefixtures("one_thread")

REFS = [np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8) for i in range(2)]
PROMPTS = ("a can", "a can on a beach", "a can in the snow")


@pytest.fixture(scope="module")
def sd_pipe(tiny_model_dir, tmp_path_factory):
    return load(make_pipeline_dir(tiny_model_dir, str(tmp_path_factory.mktemp("attn_sd")), "references"))


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux_model_dir, tmp_path_factory):
    return load(make_pipeline_dir(tiny_flux_model_dir, str(tmp_path_factory.mktemp("attn_flux")), "references",
                                  resolution=32))


def sample(pipe, **kw):
    kw = {"num_inference_steps": 3, "guidance_scale": 3.0, "image_guidance_scale": 2.0, "output_type": "pt",
          "max_set_size": 4, **kw}  # 2 refs + 3 prompts at max_set_size 4: two sets, one padded
    return pipe(reference_images=REFS, prompt=list(PROMPTS), generator=torch.Generator().manual_seed(0), **kw)


def check_distributions(maps, k):
    assert len(maps) == len(PROMPTS)
    for m in maps:
        assert m.shares.shape == (k + 2,) and m.heatmaps.shape[0] == k
        assert float(m.shares.sum()) == pytest.approx(1.0, abs=1e-5)
        assert (m.shares >= 0).all()
        torch.testing.assert_close(m.heatmaps.sum((-1, -2)), m.reference_shares, atol=1e-5, rtol=0)
    # two sets of 2 + 1 targets: the lone target has no other target to attend to, the others do
    others = [m.others_share for m in maps]
    assert others[2] == pytest.approx(0.0, abs=1e-6) and min(others[:2]) > 1e-3


@pytest.mark.parametrize("name", ["sd_pipe", "flux_pipe"])
def test_maps_are_distributions_and_the_same_with_the_cache_on_or_off(name, request, monkeypatch):
    pipe = request.getfixturevalue(name)
    calls = []
    real = AttentionRecorder.record
    monkeypatch.setattr(AttentionRecorder, "record", lambda self, *a: calls.append(1) or real(self, *a))
    plain = sample(pipe, use_reference_cache=True)
    assert plain.attention_maps is None and not calls  # off: the recording path is never entered
    on = sample(pipe, use_reference_cache=True, return_attention_maps=True)
    layers = len(calls)
    off = sample(pipe, use_reference_cache=False, return_attention_maps=True)
    torch.testing.assert_close(on.images, plain.images, atol=0, rtol=0)  # recording does not change images
    check_distributions(on.attention_maps, len(REFS))
    for a, b in zip(on.attention_maps, off.attention_maps):
        torch.testing.assert_close(a.shares, b.shares, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.heatmaps, b.heatmaps, atol=1e-4, rtol=0)
    # the last third of the steps (1 of 3), every coupled layer once
    joint = sum(type(p).__name__.startswith("Joint") for p in pipe.denoiser.attn_processors.values())
    assert layers == joint * len(recorded_steps(3)) and layers > 0
    assert max(float(m.reference_shares.sum()) for m in on.attention_maps) > 0.05  # references are looked at


def test_unbatched_branches_and_tuple_output_give_the_same_maps(sd_pipe):
    batched = sample(sd_pipe, return_attention_maps=True).attention_maps
    images, _, maps = sample(sd_pipe, return_attention_maps=True, batch_guidance_branches=False,
                                return_dict=False)
    assert images.shape == (len(PROMPTS), 3, 32, 32)
    for a, b in zip(batched, maps):
        torch.testing.assert_close(a.shares, b.shares, atol=1e-5, rtol=0)
    # without references: shares are self + others only
    text_only = sample(sd_pipe, image_guidance_scale=0, return_attention_maps=True).attention_maps
    assert all(m.shares.shape == (2,) and m.heatmaps.shape[0] == 0 for m in text_only)


def test_recorder_against_hand_computed_attention():
    """Queries of zero: every visible key gets the same weight, so the shares are token counts; then a target
    whose queries match one token of reference 1 puts (nearly) all its mass there."""
    k, length, heads, d = 2, 4, 2, 8
    plan = SetPlan.build(3, k, k, max_set_size=4)  # sets [r r t t], [r r t pad]
    layout = plan.layout([attention_maps_branch()], "cpu")
    n = plan.set_size
    key = torch.randn(plan.num_sets, heads, n * length, d, generator=torch.Generator().manual_seed(0))
    rec = AttentionRecorder(plan, k, slice(0, plan.num_sets))
    rec.record(torch.zeros(plan.num_sets, heads, n * length, d), key, layout, 0)
    shares = rec.maps()
    assert torch.allclose(shares[0].shares, torch.tensor([.25, .25, .25, .25]))  # 4 visible images
    assert torch.allclose(shares[2].shares, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))  # padding is no key
    query = torch.zeros(plan.num_sets, heads, n * length, d)
    token = 1 * length + 3  # reference 1, token 3 = grid cell (1, 1)
    key[0, :, token] *= 3  # its own key scores far above any random one (not left to the draw)
    query[0, :, 2 * length:3 * length] = 50 * key[0, :, token, None]  # target 0 looks there
    rec = AttentionRecorder(plan, k, slice(0, plan.num_sets))
    rec.record(query, key, layout, 0)
    m = rec.maps()[0]
    assert m.reference_shares[1] > 0.9 and m.heatmaps[1].argmax() == 3 and m.heatmaps.shape == (2, 2, 2)


def attention_maps_branch():
    from jedi_train.pipelines.set_plan import Branch

    return Branch("cond", True, 1.0)


def test_spread_keeps_mass_and_layout():
    x = torch.rand(3, 2, 4, 4)
    for side in (8, 6):
        up = spread(x, side)
        torch.testing.assert_close(up.sum((-1, -2)), x.sum((-1, -2)))
    torch.testing.assert_close(spread(x, 8)[..., :2, :2], x[..., :1, :1].expand(3, 2, 2, 2) / 4)


def test_layout_carries_recorder_and_cache_together():
    layout = SetLayout.independent(2)
    assert layout.trivial and not layout.with_attention_recorder(object()).trivial
    both = layout.with_attention_recorder("r").with_reference_cache("c")
    assert both.attention_recorder == "r" and both.reference_cache == "c"


def test_overlays_written_next_to_the_image(sd_pipe, tmp_path):
    from jedi_train.explain import save_attention_overlays

    out = sample(sd_pipe, return_attention_maps=True, output_type="pil")
    image = tmp_path / "00_01.png"
    out.images[1].save(image)
    paths = save_attention_overlays(out.attention_maps[1], out.reference_images, str(image))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00_01.attention.0.png", "00_01.attention.1.png"]
    for p, ref in zip(paths, out.reference_images):
        overlay = np.asarray(Image.open(p).convert("RGB"), dtype=float)
        assert overlay.shape[:2] == ref.size[::-1]
        assert np.abs(overlay - np.asarray(ref, dtype=float)).mean() > 1  # the heatmap is drawn over it
    assert sorted(f.name for f in tmp_path.iterdir()) == ["00_01.attention.0.png", "00_01.attention.1.png",
                                                          "00_01.png"]  # no temp file left
    with pytest.raises(ValueError, match="2 references but 1 reference image"):
        save_attention_overlays(out.attention_maps[1], out.reference_images[:1], str(image))



def test_overlay_lights_up_tokens_above_the_mean_only():
    from jedi_train.explain import overlay

    ref = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    heat = torch.ones(4, 4)
    heat[1, 2] = 4.0  # one hot token: pixels rows 8-15, cols 16-23
    out = np.asarray(overlay(heat, ref), dtype=float)
    change = np.abs(out - 128).sum(-1)
    assert change[10:14, 18:22].min() > 2 * change[28:, :4].max()  # the hot token stands out from a far corner
    flat = np.asarray(overlay(torch.ones(4, 4), ref), dtype=float)
    assert np.ptp(flat.reshape(-1, 3), axis=0).max() == 0  # a uniform map tints the photo evenly
