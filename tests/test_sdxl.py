"""SDXL through the same rooms as SD: the tiny SDXL of conf/model/tiny_sdxl.yaml (two text encoders, pooled
text embeddings, time ids, a tiny VAE) saved in the real directory layout and loaded through the user's path.
The joint UNet's own properties (N = 1 equals the base, equivariance, isolation, persistence) are
tests/test_joint_unet.py, parametrised over both families; here: text conditioning, pipeline, CLI, bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.pipelines import CAN, DOG, load, make_pipeline_dir, needs_dreambench, run

from jedi_train.models.components import load_components
from jedi_train.models.objective import JeDiObjective
from jedi_train.pipelines.pipeline_jedi import JeDiPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def components(tiny_sdxl_model_dir):
    return load_components(tiny_sdxl_model_dir)


@pytest.fixture(scope="module")
def cache_pipe(tiny_sdxl_model_dir, tmp_path_factory):
    return load(make_pipeline_dir(tiny_sdxl_model_dir, str(tmp_path_factory.mktemp("sdxl_pipe")), "references"))


def test_text_conditioning_is_sdxl_s(components):
    """Penultimate layers of both encoders side by side, the second's pooled projection, uncropped time ids."""
    c = components
    assert c.family == "sdxl"
    ids = c.text.token_ids(["a red backpack", ""])
    assert ids.shape == (2, 2, c.tokenizer.model_max_length)
    emb = c.text.embed(ids, c.resolution)
    with torch.no_grad():
        h1 = c.text_encoder(ids[:, 0], output_hidden_states=True).hidden_states[-2]
        out2 = c.text_encoder_2(ids[:, 1], output_hidden_states=True)
    torch.testing.assert_close(emb.hidden, torch.cat([h1, out2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(emb.pooled, out2.text_embeds)
    assert emb.hidden.shape[-1] == c.unet.config.cross_attention_dim
    assert emb.time_ids.tolist() == [[32.0, 32, 0, 0, 32, 32]] * 2


def test_objective_trains_the_unet_with_pooled_text(components):
    c = components
    ids = c.text.token_ids(["a backpack"] * 6).view(2, 3, 2, -1)
    batch = {"pixel_values": torch.rand(2, 3, 3, 32, 32) * 2 - 1, "input_ids": ids,
             "is_ref": torch.tensor([[True, False, False]] * 2)}
    objective = JeDiObjective(c)
    out = objective(batch, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert c.unet.add_embedding.linear_1.weight.grad.abs().sum() > 0  # the pooled-text / time-id path trains
    assert all(p.grad is None for p in c.text_encoder_2.parameters())
    c.unet.zero_grad(set_to_none=True)
    # caption dropout replaces BOTH tokenizers' ids by the empty caption's
    drop = objective.sample_dropout(batch["is_ref"], torch.ones(2, 3, dtype=torch.bool))
    assert objective.empty_ids.shape == ids.shape[2:]
    assert drop.caption.shape == (2, 3)



def test_size_and_crop_micro_conditioning_come_from_each_images_own_geometry(components, monkeypatch):
    """The stream records each image's original size and random-crop offset; SDXL's time_ids carry them."""
    import numpy as np

    from data_pipelines.schema import encode_set
    from data_pipelines.sets import SetOptions, collate_sets, load_set
    from data_pipelines.skips import Counts

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 64, 3), dtype=np.uint8) for _ in range(3)]  # (h, w): short side 40
    sample = encode_set("s0", images, ["a backpack"] * 3, ext="png")
    opt = SetOptions(resolution=32, min_set=3, max_set=3, crop="random", ref_count_probs=[0, 1, 0, 0])
    s = load_set(sample, opt, np.random.default_rng(1), Counts())
    geo = s["size_crop"]
    assert geo.shape == (3, 4) and (geo[:, :3] == [40, 64, 0]).all()  # resized to 32 x 51: crops move along x
    assert len(set(geo[:, 3].tolist())) > 1 and ((0 <= geo[:, 3]) & (geo[:, 3] <= 51 - 32)).all()

    batch = collate_sets([s, {**s, "images": s["images"][:2], "captions": s["captions"][:2], "is_ref": s["is_ref"][:2],
                              "size_crop": geo[:2]}], lambda caps: components.text.token_ids(caps))
    seen = {}

    def record(sample, t, text, layout, guidance=None):
        seen["time_ids"] = text.time_ids
        return torch.zeros_like(sample[:, :components.unet.config.out_channels])

    monkeypatch.setattr(components.unet, "denoise", record)
    JeDiObjective(components)(batch, generator=torch.Generator().manual_seed(0))
    t = seen["time_ids"].view(2, 3, 6)
    assert t[0].tolist() == [[40, 64, 0, int(x), 32, 32] for x in geo[:, 3]]
    assert t[1, 2].tolist() == [32, 32, 0, 0, 32, 32]  # padding: an uncropped image at the target size

@needs_dreambench
def test_pipeline_cache_save_load_and_references(cache_pipe, tmp_path):
    pipe = cache_pipe
    assert pipe.tokenizer_2 is not None and pipe.reference_cache_supported()
    cached = run(pipe, CAN[:3], use_reference_cache=True)
    torch.testing.assert_close(cached, run(pipe, CAN[:3], use_reference_cache=False), atol=1e-4, rtol=0)
    assert (cached - run(pipe, DOG[:3], use_reference_cache=True)).abs().max() > 1e-3  # references matter
    assert cached.shape == (2, 3, 32, 32)
    pipe.save_pretrained(tmp_path / "again", safe_serialization=True)
    with open(tmp_path / "again" / "model_index.json") as f:
        assert json.load(f)["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert torch.equal(run(load(tmp_path / "again"), CAN[:3]), run(pipe, CAN[:3]))


def test_bad_sdxl_directories_fail_in_one_line(tiny_sdxl_model_dir, components, tmp_path):
    broken = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_model_dir, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="Stable Diffusion XL model .* lacks the 'tokenizer_2' component"):
        load_components(str(broken))
    flux = tmp_path / "flux"
    (flux / "transformer").mkdir(parents=True)
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="holds a diffusion transformer \\(FluxPipeline\\).*supports"):
        load_components(str(flux))
    c = components
    with pytest.raises(ValueError, match="no text_encoder_2"):
        JeDiPipeline(c.unet, c.text_encoder, c.tokenizer, c.noise_scheduler, c.vae)
