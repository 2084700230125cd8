"""Stable Diffusion 3 / 3.5 (MM-DiT) through the same rooms as FLUX: the tiny SD3 of conf/model/tiny_sd3.yaml
(CLIP-L + CLIP-G + T5, a 16-channel VAE, SD3.5's dual attention in its first block) saved in the real layout.
The joint model's own properties are tests/test_joint_model.py (parametrised over every family); here: the
SD3-specific parts (text layout, flow objective through the widened patch embedding, pipeline, bad input)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers.pipelines import CAN, DOG, load, make_pipeline_dir, needs_dreambench, run

from jedi_train.models.components import load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.objective import JeDiObjective
from jedi_train.pipelines.pipeline_jedi import JeDiPipeline, JeDiSD3Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def components(tiny_sd3_model_dir):
    return load_components(tiny_sd3_model_dir, JeDiConfig())


def test_text_conditioning_is_sd3_s(components):
    """Both CLIPs' penultimate hidden states side by side, zero-padded to T5's width, then T5's tokens; both
    CLIPs' pooled projections concatenated (StableDiffusion3Pipeline.encode_prompt)."""
    c = components
    assert c.family == "sd3" and c.text.layout == "sd3" and c.resolution == 32
    ids = c.text.token_ids(["a red backpack", ""])
    assert ids.shape[1] == 3
    emb = c.text.embed(ids, c.resolution)
    with torch.no_grad():
        l, g = (enc(ids[:, i], output_hidden_states=True) for i, enc in enumerate((c.text_encoder, c.text_encoder_2)))
        t5 = c.text_encoder_3(ids[:, 2])[0]
    clip = F.pad(torch.cat([l.hidden_states[-2], g.hidden_states[-2]], -1), (0, t5.shape[-1] - 32))
    torch.testing.assert_close(emb.hidden, torch.cat([clip, t5], dim=1))
    torch.testing.assert_close(emb.pooled, torch.cat([l.text_embeds, g.text_embeds], -1))
    assert emb.hidden.shape[-1] == c.unet.config.joint_attention_dim
    assert emb.pooled.shape[-1] == c.unet.config.pooled_projection_dim


def test_flow_objective_trains_the_widened_patch_embedding(components):
    c = components
    objective = JeDiObjective(c)
    assert objective.prediction_type == "flow"
    ids = c.text.token_ids(["a backpack"] * 6).view(2, 3, 3, -1)
    batch = {"pixel_values": torch.rand(2, 3, 3, 32, 32) * 2 - 1, "input_ids": ids,
             "is_ref": torch.tensor([[True, False, False]] * 2)}
    out = objective(batch, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and c.unet.pos_embed.proj.weight.grad[:, 16:].abs().sum() > 0
    c.unet.zero_grad(set_to_none=True)


@needs_dreambench
def test_pipeline_cache_guidance_and_persistence(tiny_sd3_model_dir, tmp_path):
    pipe_dir = make_pipeline_dir(tiny_sd3_model_dir, str(tmp_path / "pipe"), "references")
    pipe = load(pipe_dir)  # JeDiPipeline.from_pretrained picks the SD3 pipeline
    assert isinstance(pipe, JeDiSD3Pipeline) and not pipe.guidance_distilled and pipe.reference_cache_supported()
    cached = run(pipe, CAN[:3], use_reference_cache=True)
    torch.testing.assert_close(cached, run(pipe, CAN[:3], use_reference_cache=False), atol=1e-4, rtol=0)
    assert (cached - run(pipe, DOG[:3], use_reference_cache=True)).abs().max() > 1e-3  # references matter
    assert (cached - run(pipe, CAN[:3], guidance_scale=6.0)).abs().max() > 1e-4  # real CFG: the scale matters
    one = run(pipe, CAN[:1])
    assert cached.shape == one.shape == (2, 3, 32, 32) and torch.isfinite(one).all()
    with open(f"{pipe_dir}/model_index.json") as f:
        index = json.load(f)
    assert index["_class_name"][1] == "JeDiSD3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    pipe.save_pretrained(tmp_path / "again", safe_serialization=True)
    assert torch.equal(run(load(tmp_path / "again"), CAN[:3]), cached)


def test_bad_sd3_input_fails_in_one_line(tiny_sd3_model_dir, tmp_path):
    with pytest.raises(ValueError, match="Stable Diffusion 3 is a flow-matching model: set model.prediction_type=flow"):
        load_components(tiny_sd3_model_dir, prediction_type="epsilon")
    with pytest.raises(ValueError, match="SD3 adds one fixed position grid.*reference_positions=same"):
        load_components(tiny_sd3_model_dir, JeDiConfig(reference_positions="offset"))
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(tiny_sd3_model_dir, no_t5)
    shutil.rmtree(no_t5 / "text_encoder_3")
    with pytest.raises(FileNotFoundError, match="is a Stable Diffusion 3 model but lacks the 'text_encoder_3'"):
        load_components(str(no_t5))
    with pytest.raises(ValueError, match="plain SD3Transformer2DModel without JeDi settings"):
        from diffusers import SD3Transformer2DModel

        c = load_components(tiny_sd3_model_dir)
        JeDiSD3Pipeline(SD3Transformer2DModel.from_pretrained(tiny_sd3_model_dir, subfolder="transformer"),
                        scheduler=c.noise_scheduler, vae=c.vae, **c.text_parts())
    assert JeDiPipeline.from_components(load_components(tiny_sd3_model_dir)).__class__ is JeDiSD3Pipeline
