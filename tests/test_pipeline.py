"""JeDiPipeline on tiny models saved to disk and loaded back (offline, safetensors), 32 px, 2-3 steps."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from helpers.pipelines import CAN, DOG, DREAMBENCH, load, make_pipeline_dir, needs_dreambench, run
from PIL import Image

from jedi_train.models.components import load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.pipelines.pipeline_jedi import JeDiPipeline
from jedi_train.pipelines.references import load_references, prepare_reference
from jedi_train.pipelines.set_plan import SetPlan, guidance_branches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe_dir(tiny_model_dir, tmp_path_factory):
    return make_pipeline_dir(tiny_model_dir, str(tmp_path_factory.mktemp("pipe")))


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return load(pipe_dir)


@pytest.fixture(scope="module")
def cache_pipe(tiny_model_dir, tmp_path_factory):
    return load(make_pipeline_dir(tiny_model_dir, str(tmp_path_factory.mktemp("pipe_cache")), "references"))


def count_unet_batches(pipe):
    """Forward hook recording the batch size of every UNet call."""
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


# -- persistence ------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_vae", [False, True], ids=["pixel", "vae"])
def test_round_trip_offline_safetensors(with_vae, tiny_model_dir, tiny_vae_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = make_pipeline_dir(tiny_vae_model_dir if with_vae else tiny_model_dir, str(tmp_path / "a"))
    with open(os.path.join(first, "model_index.json")) as f:
        index = json.load(f)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]  # generic loading: bundle.py
    assert (index["vae"][0] is not None) == with_vae
    assert os.path.isfile(os.path.join(first, "unet", "diffusion_pytorch_model.safetensors"))
    assert not any(f.endswith(".bin") for _, _, files in os.walk(first) for f in files)

    a = load(first)
    a.save_pretrained(str(tmp_path / "b"), safe_serialization=True)
    b = load(str(tmp_path / "b"))
    assert (a.vae is not None) == with_vae and b.unet.jedi == a.unet.jedi
    for (name, x), (_, y) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(x, y), name
    refs = [np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)]
    out_a, out_b = run(a, refs), run(b, refs)
    assert out_a.shape == (2, 3, 32, 32) and torch.equal(out_a, out_b)


# -- sampling ---------------------------------------------------------------------------------------
@needs_dreambench
@pytest.mark.parametrize("k", [1, 3, 5])
def test_k_references(pipe, k):
    sizes, handle = count_unet_batches(pipe)
    try:
        out = pipe(reference_images=CAN[:k], prompt=["a can", "a can on a beach"], num_images_per_prompt=2,
                   num_inference_steps=3, image_guidance_scale=2.0, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(0), output_type="np", use_reference_cache=False)
    finally:
        handle.remove()
    assert out.images.shape == (4, 32, 32, 3) and np.isfinite(out.images).all()
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert [im.size for im in out.reference_images] == [(32, 32)] * k
    # one UNet call per step for all three guidance branches; 4 targets in sets of <= 8 - K (>= 1), each
    # set with all K references (set_plan.py)
    sets = -(-4 // max(1, 8 - k))
    assert sizes == [3 * sets * (k + 4 // sets)] * 3 and (k < 5 or sets == 2)


@needs_dreambench
def test_references_change_outputs_unless_image_guidance_is_zero(pipe):
    can, dog = run(pipe, CAN[:2]), run(pipe, DOG[:2])
    assert (can - dog).abs().max() > 1e-3
    assert (can - run(pipe, CAN[:2], reference_captions="a photo of a can")).abs().max() > 1e-4
    plain = [run(pipe, refs, image_guidance_scale=0.0) for refs in (CAN[:2], DOG[:2], None)]
    assert torch.equal(plain[0], plain[1]) and torch.equal(plain[0], plain[2])
    assert (plain[0] - can).abs().max() > 1e-3


@needs_dreambench
def test_decoupled_branch_does_not_see_references(pipe):
    """The 'no references' branch of image guidance: targets' predictions do not depend on the references
    even though the references sit in the same set (reference_attention='set': refs see the targets)."""
    plan = SetPlan.build(2, 2, 2, max_set_size=8)
    layout = plan.layout([b for b in guidance_branches(3.0, 2.0, True) if not b.refs], "cpu")
    x = torch.randn(2, 12, 16, 16, generator=torch.Generator().manual_seed(0))
    text = pipe.encode_text(["", ""] + ["a", "b"])
    preds = []
    for refs in (CAN[:2], DOG[:2]):
        latents = pipe.encode_references(load_references(refs, 32)[0])
        noisy = plan.stack(latents, x)
        is_ref = torch.tensor([True, True, False, False])
        inp = pipe.unet.assemble_input(noisy, noisy, torch.zeros(4, dtype=torch.bool))
        t = torch.where(is_ref, 0, 500)
        out = pipe.unet(inp, t, plan.stack(text[2:], text[:2]), set_layout=layout).sample
        preds.append((out[:2], plan.unstack(out)))
    assert (preds[0][0] - preds[1][0]).abs().max() > 1e-3  # the references themselves do differ
    torch.testing.assert_close(preds[0][1], preds[1][1], atol=1e-5, rtol=0)


def test_guidance_weights_match_method_formula():
    e00, e0r, etr = torch.randn(3, 5)
    s_txt, s_img = 4.0, 1.5
    branches = guidance_branches(s_txt, s_img, use_refs=True)
    pred = {("uncond", False): e00, ("uncond", True): e0r, ("cond", True): etr}
    mixed = sum(b.weight * pred[(b.text, b.refs)] for b in branches)
    torch.testing.assert_close(mixed, e00 + s_img * (e0r - e00) + s_txt * (etr - e0r))
    assert all(not b.refs for b in guidance_branches(s_txt, 0.0, use_refs=False))  # s_img = 0: no branch sees refs
    assert len(guidance_branches(2.0, 2.0, use_refs=True)) == 2  # zero-weight branch skipped


@needs_dreambench
def test_seeded_generator_is_deterministic(pipe):
    a, b, c = run(pipe, CAN[:3], seed=7), run(pipe, CAN[:3], seed=7), run(pipe, CAN[:3], seed=8)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3


@needs_dreambench
def test_unbatched_branches_give_the_same_images(pipe):
    sizes, handle = count_unet_batches(pipe)
    try:
        split = run(pipe, CAN[:3], batch_guidance_branches=False)
    finally:
        handle.remove()
    assert sizes == [5] * 6  # 3 branches x 2 steps, one set each
    torch.testing.assert_close(split, run(pipe, CAN[:3]), atol=1e-5, rtol=0)


@needs_dreambench
@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_scheduler_swap(pipe_dir, name):
    pipe = load(pipe_dir)
    cls = DDIMScheduler if name == "ddim" else DPMSolverMultistepScheduler
    kwargs = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    sizes, handle = count_unet_batches(pipe)
    try:
        a = run(pipe, CAN[:2], num_inference_steps=4)
    finally:
        handle.remove()
    assert len(sizes) == 4 and torch.isfinite(a).all()
    assert torch.equal(a, run(pipe, CAN[:2], num_inference_steps=4))
    other = run(load(pipe_dir), CAN[:2], num_inference_steps=4)  # the exported DDIM
    assert (name == "ddim") == torch.equal(a, other)


# -- references: real photos and odd inputs --------------------------------------------------------
@needs_dreambench
def test_dreambench_folder_preprocessed_like_training(pipe):
    from data_pipelines.sets import SetOptions, load_image
    from data_pipelines.skips import Counts

    folder = os.path.join(DREAMBENCH, "dog2")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".jpg"))
    pixels, pils = load_references(folder, 32)
    assert pixels.shape == (len(files), 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.max() - pixels.min() > 1.0
    opt = SetOptions(resolution=32, crop="center")
    for f, pil in zip(files, pils):
        with open(os.path.join(folder, f), "rb") as fh:
            train = load_image(fh.read(), opt, np.random.default_rng(0), Counts())
        np.testing.assert_array_equal(np.asarray(pil), train)
    out = pipe(reference_images=folder, prompt="a dog", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 1 and out.images[0].size == (32, 32) and len(out.reference_images) == len(files)


def test_exif_rgba_gray_arrays_tensors(tmp_path):
    # landscape photo, red left / blue right, EXIF "rotate 90 CW to display": upright it is red on top
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32, 0] = 255
    a[:, 32:, 2] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    up = np.asarray(prepare_reference(str(tmp_path / "phone.jpg"), 32)).astype(int)
    assert up.shape == (32, 32, 3)
    assert up[:12, :, 0].mean() > 200 and up[:12, :, 2].mean() < 50  # top red
    assert up[-12:, :, 2].mean() > 200 and up[-12:, :, 0].mean() < 50  # bottom blue

    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[:, :24, 3] = 255  # left opaque green, right transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    gray = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (40, 1)), "L")
    chw = torch.rand(3, 20, 30)
    hwc = (chw.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pixels, _ = load_references([str(tmp_path / "cutout.png"), gray, chw, hwc], 32)
    assert pixels.shape == (4, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(pixels[0, :, :, -8:], torch.ones(3, 32, 8))  # transparent -> white
    assert torch.allclose(pixels[0, :, :, :8], torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 32, 8))
    assert torch.equal(pixels[1, 0], pixels[1, 1]) and torch.equal(pixels[1, 1], pixels[1, 2])  # gray -> RGB
    assert pixels[1, 0, :, -1].mean() > pixels[1, 0, :, 0].mean()
    assert (pixels[2] - pixels[3]).abs().max() <= 2 / 255 + 1e-6  # float CHW tensor == uint8 HWC array


# -- set planning -----------------------------------------------------------------------------------
def test_set_plan_splits_targets_and_keeps_every_reference():
    plan = SetPlan.build(num_targets=7, num_refs_in_set=5, semantic_refs=5, max_set_size=8)
    assert plan.num_sets == 3 and plan.set_size == 8 and plan.target_valid.sum(1).tolist() == [3, 2, 2]
    refs, targets = torch.arange(5) + 100, torch.arange(7)
    flat = plan.stack(refs, targets).view(3, 8)
    assert (flat[:, :5] == refs).all()  # all K references in every set
    assert torch.equal(plan.unstack(plan.stack(refs, targets)), targets)
    assert SetPlan.build(3, 6, 6, max_set_size=4).num_sets == 3  # K >= max: K refs + 1 target per set
    with pytest.raises(ValueError, match="max_set_size"):
        SetPlan.build(3, 0, 0, max_set_size=1)


@needs_dreambench
def test_split_sets_sample_every_target(pipe):
    sizes, handle = count_unet_batches(pipe)
    try:
        out = run(pipe, CAN[:3], prompts=["a", "b", "c"], max_set_size=5)  # 3 targets, 2 per set -> 2 sets
    finally:
        handle.remove()
    assert out.shape == (3, 3, 32, 32) and sizes == [3 * 2 * 5] * 2


# -- reference key/value cache ------------------------------------------------------------------------
@needs_dreambench
@pytest.mark.parametrize("prompts,max_set_size", [(("a can", "a can on a beach"), 8), (("a", "b", "c"), 5)],
                         ids=["one-set", "padded-sets"])
def test_reference_cache_gives_the_same_images(cache_pipe, prompts, max_set_size):
    assert cache_pipe.reference_cache_supported()
    sizes, handle = count_unet_batches(cache_pipe)
    try:
        cached = run(cache_pipe, CAN[:3], prompts, use_reference_cache=True, max_set_size=max_set_size)
        recorded = list(sizes)
        plain = run(cache_pipe, CAN[:3], prompts, use_reference_cache=False, max_set_size=max_set_size)
    finally:
        handle.remove()
    m = len(prompts)
    sets = 1 if max_set_size == 8 else 2
    targets_per_set = -(-m // sets)
    assert recorded == [3] + [3 * sets * targets_per_set] * 2  # one references-only pass, then targets only
    assert sizes[len(recorded):] == [3 * sets * (3 + targets_per_set)] * 2
    torch.testing.assert_close(cached, plain, atol=1e-4, rtol=0)
    assert torch.equal(run(cache_pipe, CAN[:3], prompts, max_set_size=max_set_size), cached)  # default: on


@needs_dreambench
def test_reference_cache_with_replacement_conditioning(tiny_model_dir):
    """'replacement' models see references only as clean images at t = 0 (no extra input channels)."""
    c = load_components(tiny_model_dir, JeDiConfig(conditioning="replacement", reference_attention="references"))
    pipe = JeDiPipeline.from_components(c)
    pipe.set_progress_bar_config(disable=True)
    cached = run(pipe, CAN[:2], use_reference_cache=True)
    torch.testing.assert_close(cached, run(pipe, CAN[:2], use_reference_cache=False), atol=1e-4, rtol=0)
    assert (cached - run(pipe, DOG[:2], use_reference_cache=True)).abs().max() > 1e-3


def test_reference_cache_refused_for_models_not_trained_for_it(pipe, tiny_model_dir, tmp_path):
    refs = [np.full((32, 32, 3), 128, np.uint8)]
    with pytest.raises(ValueError, match="reference_attention='references'.*use_reference_cache=False"):
        run(pipe, refs, use_reference_cache=True)
    target = load(make_pipeline_dir(tiny_model_dir, str(tmp_path / "p"), "references", reference_timestep="target"))
    assert not target.reference_cache_supported()
    with pytest.raises(ValueError, match="reference_timestep='target'"):
        run(target, refs, use_reference_cache=True)
    assert run(target, refs).shape == (2, 3, 32, 32)  # default: runs uncached


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_inputs(pipe, pipe_dir, tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg does not exist"):
        run(pipe, [str(tmp_path / "nope.jpg")])
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg is not a readable image"):
        run(pipe, [str(tmp_path / "notes.jpg")])
    with pytest.raises(ValueError, match="needs at least one reference"):
        run(pipe, [], image_guidance_scale=1.5)
    with pytest.raises(ValueError, match="prompt is empty"):
        run(pipe, [np.zeros((32, 32, 3), np.uint8)], prompts=[])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        JeDiPipeline.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        JeDiPipeline.from_pretrained(str(tmp_path / "missing"))
    plain = shutil.copytree(pipe_dir, tmp_path / "plain")  # a base UNet where the joint one should be
    shutil.rmtree(plain / "unet")
    shutil.copytree(os.path.join(tiny_model_dir, "unet"), plain / "unet")
    with pytest.raises(ValueError, match="not a joint UNet"):
        JeDiPipeline.from_pretrained(str(plain))
    with pytest.raises(ValueError, match="not a joint UNet"):
        JeDiPipeline(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), pipe.text_encoder,
                     pipe.tokenizer, pipe.scheduler)
