"""FLUX.1 (MM-DiT) through the same rooms as the UNets: the tiny FLUX of conf/model/tiny_flux.yaml (CLIP + T5,
a 16-channel VAE with shift, guidance embedding, FLUX.1-dev's scheduler settings) saved in the real layout.
The joint model's own properties (N = 1 equals the base, equivariance, isolation, no-reference mode,
persistence) are tests/test_joint_model.py, parametrised over every family; here: the FLUX-specific parts."""
from __future__ import annotations

import json

import pytest
import torch
from helpers.pipelines import CAN, DOG, load, make_pipeline_dir, needs_dreambench, run, run_generic

from jedi_train.models.attention import SetLayout
from jedi_train.models.components import load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.joint_flux import shifted_sigmas
from jedi_train.models.objective import JeDiObjective
from jedi_train.pipelines.pipeline_jedi import JeDiFluxPipeline, JeDiPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def components(tiny_flux_model_dir):
    return load_components(tiny_flux_model_dir, JeDiConfig(resolution=32))


@pytest.fixture(scope="module")
def cache_pipe_dir(tiny_flux_model_dir, tmp_path_factory):
    return make_pipeline_dir(tiny_flux_model_dir, str(tmp_path_factory.mktemp("flux_pipe")), "references",
                             resolution=32)


def test_text_conditioning_is_flux_s(components):
    """T5's last hidden states as the text stream, CLIP's pooled output as the pooled projection."""
    c = components
    assert c.family == "flux" and c.text.layout == "flux"
    ids = c.text.token_ids(["a red backpack", ""])
    emb = c.text.embed(ids, c.resolution)
    with torch.no_grad():
        torch.testing.assert_close(emb.hidden, c.text_encoder_2(ids[:, 1])[0])
        torch.testing.assert_close(emb.pooled, c.text_encoder(ids[:, 0]).pooler_output)
    assert emb.time_ids is None and emb.hidden.shape[-1] == c.unet.config.joint_attention_dim


def test_flow_matching_objective(components):
    """x_t = (1 - sigma) x0 + sigma noise at the shifted sigmas; the target is the velocity noise - x0."""
    c = components
    objective = JeDiObjective(c)
    assert objective.prediction_type == "flow"
    x0, noise = torch.randn(2, 16, 16, 16), torch.randn(2, 16, 16, 16)
    t = torch.tensor([0.0, 250.0])
    torch.testing.assert_close(objective.add_noise(x0, noise, t), torch.stack([x0[0], 0.75 * x0[1] + 0.25 * noise[1]]))
    torch.testing.assert_close(objective.target(x0, noise, t), noise - x0)
    u = torch.linspace(0.05, 0.95, 19)
    sig = shifted_sigmas(u, c.noise_scheduler.config, 64)  # tiny FLUX: fixed shift 3, as FLUX.1-dev's base
    torch.testing.assert_close(sig, 3 * u / (1 + 2 * u))
    drawn = objective.sample_timesteps(4000, "cpu", torch.Generator().manual_seed(0), (16, 16))
    assert 0 <= float(drawn.min()) and float(drawn.max()) < 1000
    assert float(drawn.median()) > 700  # shifted towards noise: median sigma 0.75 for shift 3
    ids = c.text.token_ids(["a backpack"] * 6).view(2, 3, 2, -1)
    batch = {"pixel_values": torch.rand(2, 3, 3, 32, 32) * 2 - 1, "input_ids": ids,
             "is_ref": torch.tensor([[True, False, False]] * 2)}
    out = objective(batch, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and c.unet.x_embedder.weight.grad[:, 64:].abs().sum() > 0
    c.unet.zero_grad(set_to_none=True)


def test_reference_position_offset_moves_references_only(tiny_flux_model_dir):
    """reference_positions 'offset' (UNO): references at shifted rotary positions. A lone target is unchanged;
    in a set with a reference, the targets' outputs change (they see the reference at another position)."""
    same = load_components(tiny_flux_model_dir, JeDiConfig(resolution=32)).unet.eval()
    moved = load_components(tiny_flux_model_dir, JeDiConfig(resolution=32, reference_positions="offset")).unet.eval()
    assert moved.jedi.reference_positions == "offset"
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(3, 33, 16, 16, generator=g), same.config
    from jedi_train.models.text import TextEmbeddings

    e = TextEmbeddings(torch.randn(3, 8, text.joint_attention_dim, generator=g),
                       torch.randn(3, text.pooled_projection_dim, generator=g))
    t = torch.tensor([0.0, 600.0, 600.0])
    layout = SetLayout.build(torch.tensor([[True, False, False]]))
    with torch.no_grad():
        a, b = same.denoise(x, t, e, layout), moved.denoise(x, t, e, layout)
        alone = [m.denoise(x[1:2], t[1:2], e[1:2], SetLayout.independent(1)) for m in (same, moved)]
    assert (a[1:] - b[1:]).abs().max() > 1e-4
    torch.testing.assert_close(alone[0], alone[1])


@needs_dreambench
def test_pipeline_cache_guidance_and_persistence(cache_pipe_dir, tmp_path):
    pipe = JeDiPipeline.from_pretrained(cache_pipe_dir)  # the one entry point picks the FLUX pipeline
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, JeDiFluxPipeline) and pipe.guidance_distilled and pipe.reference_cache_supported()
    cached = run(pipe, CAN[:3], use_reference_cache=True)
    torch.testing.assert_close(cached, run(pipe, CAN[:3], use_reference_cache=False), atol=1e-4, rtol=0)
    assert (cached - run(pipe, DOG[:3], use_reference_cache=True)).abs().max() > 1e-3  # references matter
    assert (cached - run(pipe, CAN[:3], guidance_scale=6.0)).abs().max() > 1e-4  # distilled guidance is an input
    assert cached.shape == (2, 3, 32, 32)
    pipe.save_pretrained(tmp_path / "again", safe_serialization=True)
    with open(tmp_path / "again" / "model_index.json") as f:
        index = json.load(f)
    assert index["_class_name"][1] == "JeDiFluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert torch.equal(run(load(tmp_path / "again"), CAN[:3]), cached)
    # and in a process without jedi_train, as any diffusers user loads it
    line = run_generic(cache_pipe_dir, tmp_path / "generic.npy", tmp_path)
    assert "JointFluxTransformer2DModel" in line


def test_bad_flux_settings_fail_in_one_line(tiny_flux_model_dir, tmp_path):
    with pytest.raises(ValueError, match="FLUX.1 is a flow-matching model: set model.prediction_type=flow"):
        load_components(tiny_flux_model_dir, JeDiConfig(resolution=32), prediction_type="epsilon")
    pixart = tmp_path / "pixart"
    (pixart / "transformer").mkdir(parents=True)
    (pixart / "transformer" / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(ValueError, match="PixArtTransformer2DModel.*does not support.*FLUX.1, Stable Diffusion 3"):
        load_components(str(pixart))
