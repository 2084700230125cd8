"""FLUX.2 Klein through the family table: the tiny Klein of conf/model/tiny_flux2_klein.yaml (a 27-layer Qwen3 with
a byte-level BPE tokenizer, an AutoencoderKLFlux2, a Flux2Transformer2DModel without guidance embedding, Klein's
scheduler) saved in the real layout. Checked against diffusers' own Flux2KleinPipeline where it has the piece (text
embeddings, VAE latents, timesteps); the joint model's invariants as tests/test_joint_model.py checks them for the
other families; the pipeline's K = 0, 1, 3 sampling and persistence through JeDiAutoPipeline. The CLI run
(train -> export -> sample) is in tests/test_backbones_cli.py's parametrisation."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from helpers.pipelines import CAN, load, make_pipeline_dir, needs_dreambench, run

from jedi_train.models import families
from jedi_train.models.attention import ReferenceKVCache, SetLayout
from jedi_train.models.components import LatentCodec, load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.joint_flux2 import (
    Flux2LatentCodec,
    JointFlux2Transformer2DModel,
    image_ids,
    load_joint_flux2,
    pack,
    text_ids,
    unpack,
)
from jedi_train.models.text import TextEmbeddings
from jedi_train.pipelines.pipeline_jedi_flux2 import JeDiFlux2KleinPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """What model=tiny_flux2_klein creates on first use (its create_tiny_if_missing), in a temporary folder."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from jedi_train.models.tiny import create_tiny_model_dir
    from jedi_train.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny_flux2_klein"])
    spec = OmegaConf.to_container(cfg.model.create_tiny_if_missing, resolve=True)
    return create_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_flux2_klein")), **spec)


@pytest.fixture(scope="module")
def components(model_dir):
    return load_components(model_dir, JeDiConfig(resolution=32))


@pytest.fixture(scope="module")
def base(model_dir):
    return Flux2Transformer2DModel.from_pretrained(model_dir, subfolder="transformer").eval()


@pytest.fixture(scope="module")
def joint(model_dir):
    model = load_joint_flux2(model_dir, jedi=JeDiConfig(resolution=32)).eval()
    with torch.no_grad():  # the reference channels get weights, so references also reach the model through them
        model.x_embedder.weight[:, model.latent_channels:].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


def _inputs(bn, model, seed=0, tokens=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bn, model.latent_channels, 8, 8, generator=g)
    t = torch.randint(0, 1000, (bn,), generator=g).float()
    return x, t, TextEmbeddings(torch.randn(bn, tokens, model.config.joint_attention_dim, generator=g))


def _run(model, x, t, e, layout, ref_visible=None):
    ref_visible = torch.zeros(x.shape[0], dtype=torch.bool) if ref_visible is None else ref_visible
    with torch.no_grad():
        return model.denoise(model.assemble_input(x, x, ref_visible), t, e, layout)


# -- the family ---------------------------------------------------------------------------------------------------
def test_directory_is_recognised_as_klein(model_dir, components):
    assert families.family_of_dir(model_dir).name == "flux2_klein"
    assert components.family == "flux2_klein" and isinstance(components.denoiser, JointFlux2Transformer2DModel)
    assert type(components.vae).__name__ == "AutoencoderKLFlux2"
    assert isinstance(components.codec, Flux2LatentCodec) and components.codec.downsample == 4  # VAE /2, patchify /2
    assert isinstance(LatentCodec.of(components.vae, components.denoiser), Flux2LatentCodec)
    assert families.family_of(components.denoiser).name == "flux2_klein"
    assert type(components.tokenizer).__name__.startswith("Qwen2Tokenizer")


def test_dry_run_preset_is_klein_4b():
    """The flux2_klein_4b preset at FLUX.2 Klein 4B's published shapes: a ~3.9 B transformer (5 double + 20 single
    blocks, 3072 wide) and Qwen3-4B (~4.0 B)."""
    from jedi_train.training.dry_run import build_on_meta, vae_downsample

    family, denoiser, frozen = build_on_meta({"architecture": "flux2_klein_4b", "model_dir": "", "resolution": 512})
    assert family.name == "flux2_klein" and isinstance(denoiser, JointFlux2Transformer2DModel)
    n = sum(p.numel() for p in denoiser.parameters())
    assert 3.7e9 < n < 4.1e9, n
    qwen = sum(p.numel() for p in frozen[0].parameters())
    assert 3.9e9 < qwen < 4.1e9, qwen
    assert vae_downsample(frozen, family) == 16
    sample, _, text = denoiser.dummy_inputs(2, 32, 512, torch.float32, "meta")
    assert sample.shape == (2, 257, 32, 32) and text.hidden.shape == (2, 512, 7680)


# -- text, latents, timesteps: as Flux2KleinPipeline --------------------------------------------------------------
def test_text_is_flux2_klein_s(components):
    """Qwen3 chat prompt, layers 9/18/27 stacked per token, padding masked: Flux2KleinPipeline's prompt embeddings."""
    c = components
    assert c.text.layout == "qwen3"
    prompts = ["a red backpack on a beach", ""]
    ids = c.text.token_ids(prompts)
    assert ids.shape == (2, c.tokenizer.model_max_length)
    assert "<|im_start|>user\na red backpack on a beach<|im_end|>" in c.tokenizer.decode(ids[0])
    emb = c.text.embed(ids, c.resolution)
    want = Flux2KleinPipeline._get_qwen3_prompt_embeds(c.text_encoder, c.tokenizer, prompts,
                                                       max_sequence_length=c.tokenizer.model_max_length)
    torch.testing.assert_close(emb.hidden, want)
    assert emb.hidden.shape[-1] == c.denoiser.config.joint_attention_dim and emb.pooled is None


def test_latents_are_flux2_klein_s(components):
    """Patchified 2x2, normalised by the VAE's batch-norm statistics (Flux2KleinPipeline._encode_vae_image), and
    decoded the pipeline's way."""
    c = components
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = types.SimpleNamespace(vae=c.vae, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    with torch.no_grad():
        want = Flux2KleinPipeline._encode_vae_image(fake, images, None)
    got = c.codec.encode(images, sample=False)
    torch.testing.assert_close(got, want)
    assert got.shape == (2, c.denoiser.latent_channels, 8, 8)
    mean, logvar = c.codec.posterior(images)  # what jedi-data encode caches
    torch.testing.assert_close(c.codec.sample(mean, torch.full_like(logvar, -1e4)), want, atol=1e-4, rtol=1e-4)
    bn = c.vae.bn
    raw = Flux2KleinPipeline._unpatchify_latents(got * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4)
                                                 + bn.running_mean.view(1, -1, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(c.codec.decode(got), c.vae.decode(raw).sample)


def test_timesteps_are_flux2_klein_s(model_dir, tmp_path):
    pipe_dir = make_pipeline_dir(model_dir, str(tmp_path / "p"), resolution=32)
    pipe = load(pipe_dir)
    pipe.prepare_timesteps(4, "cpu", 64)
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    ref = type(pipe.scheduler).from_config(pipe.scheduler.config)
    want, _ = retrieve_timesteps(ref, 4, "cpu", sigmas=np.linspace(1.0, 1 / 4, 4),
                                 mu=compute_empirical_mu(image_seq_len=64 * 64, num_steps=4))
    torch.testing.assert_close(pipe.scheduler.timesteps, want)
    assert not pipe.guidance_distilled  # Klein base: real CFG


def test_training_noise_levels_count_klein_s_tokens(components):
    """Flow matching's resolution shift sees one token per latent cell (Klein's codec packs 2x2 already);
    FLUX.1's rule (its denoise packs 2x2 itself) would see a quarter of them."""
    from jedi_train.models.joint_flux import shifted_sigmas
    from jedi_train.models.objective import JeDiObjective

    assert components.denoiser.image_tokens(16, 16) == 256
    objective = JeDiObjective(components)
    drawn = objective.sample_timesteps(64, "cpu", torch.Generator().manual_seed(0), (16, 16))
    u = torch.rand(64, generator=torch.Generator().manual_seed(0))
    config = components.noise_scheduler.config
    torch.testing.assert_close(drawn, 1000 * shifted_sigmas(u, config, 256))


# -- the joint model ----------------------------------------------------------------------------------------------
def test_single_image_sets_equal_base_model(base, joint, model_dir):
    x, t, e = _inputs(3, joint)
    with torch.no_grad():
        want = unpack(base(hidden_states=pack(x), encoder_hidden_states=e.hidden, timestep=t / 1000,
                           img_ids=image_ids(8, 8, "cpu"), txt_ids=text_ids(6, "cpu")).sample, 8, 8)
        fresh = load_joint_flux2(model_dir, jedi=JeDiConfig(resolution=32)).eval()  # zero-initialised new inputs
    assert fresh.config.in_channels == 2 * fresh.latent_channels + 1
    for layout in (SetLayout.independent(3), None):
        assert (_run(fresh, x, t, e, layout) - want).abs().max() <= 1e-5
    replacement = load_joint_flux2(model_dir, jedi=JeDiConfig(resolution=32, conditioning="replacement")).eval()
    assert (_run(replacement, x, t, e, SetLayout.independent(3)) - want).abs().max() <= 1e-5


def test_coupling_changes_outputs_and_permutation_equivariance(joint):
    x, t, e = _inputs(4, joint)
    t = torch.full((4,), 500.0)
    layout = SetLayout.build(torch.zeros(1, 4, dtype=torch.bool))
    out = _run(joint, x, t, e, layout)
    assert (out - _run(joint, x, t, e, SetLayout.independent(4))).abs().max() > 1e-3
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(_run(joint, x[perm], t[perm], e[perm], layout), out[perm], atol=1e-5, rtol=1e-4)


def test_sets_in_one_batch_do_not_interact_and_padding_is_invisible(joint):
    x, t, e = _inputs(6, joint)
    layout = SetLayout.build(torch.zeros(2, 3, dtype=torch.bool))
    out = _run(joint, x, t, e, layout)
    x2 = x.clone()
    x2[3:] = torch.randn_like(x2[3:])
    out2 = _run(joint, x2, t, e, layout)
    assert (out[:3] - out2[:3]).abs().max() < 1e-6 and (out[3:] - out2[3:]).abs().max() > 1e-3
    is_ref = torch.tensor([[True, False, False]])
    pad = SetLayout.build(is_ref, valid=torch.tensor([[True, True, False]]))
    rv = torch.tensor([True, False, False])
    alone = _run(joint, x[:2], t[:2], e[:2], SetLayout.build(is_ref[:, :2]), rv[:2])
    assert (_run(joint, x[:3], t[:3], e[:3], pad, rv)[:2] - alone).abs().max() < 1e-5
    x3 = x[:3].clone()
    x3[2] = torch.randn_like(x3[2])  # the padded image's content does not matter
    assert (_run(joint, x3, t[:3], e[:3], pad, rv)[:2] - alone).abs().max() < 1e-5


def test_no_reference_mode_cuts_targets_off_the_references(joint):
    x, t, e = _inputs(3, joint)
    coupled = SetLayout.build(torch.tensor([[True, False, False]]))
    hidden = torch.zeros(3, dtype=torch.bool)  # decoupled: reference channels hidden too
    x2 = x.clone()
    x2[0] = torch.randn_like(x[0])
    a, b = _run(joint, x, t, e, coupled.decoupled(), hidden), _run(joint, x2, t, e, coupled.decoupled(), hidden)
    assert (a[1:] - b[1:]).abs().max() < 1e-6
    visible = torch.tensor([True, False, False])
    c, d = _run(joint, x, t, e, coupled, visible), _run(joint, x2, t, e, coupled, visible)
    assert (c[1:] - d[1:]).abs().max() > 1e-3


def test_reference_positions_offset_uses_flux2_time_offsets(model_dir):
    """'offset': the r-th reference at T = 10 r (FLUX.2's reference ids). A lone target is unchanged; with a
    reference in the set the targets' outputs change."""
    same = load_joint_flux2(model_dir, jedi=JeDiConfig(resolution=32)).eval()
    moved = load_joint_flux2(model_dir, jedi=JeDiConfig(resolution=32, reference_positions="offset")).eval()
    x, t, e = _inputs(3, same)
    lone = SetLayout.independent(3)
    assert (_run(same, x, t, e, lone) - _run(moved, x, t, e, lone)).abs().max() < 1e-6
    layout = SetLayout.build(torch.tensor([[True, True, False]]))
    rv = torch.tensor([True, True, False])
    assert (_run(same, x, t, e, layout, rv)[2] - _run(moved, x, t, e, layout, rv)[2]).abs().max() > 1e-4
    cos, _ = moved._rope(layout, 6, 8, 8, "cpu")
    want = [moved.pos_embed(torch.cat([text_ids(6, "cpu"), image_ids(8, 8, "cpu", tt)]))[0] for tt in (10, 20, 0)]
    torch.testing.assert_close(cos, torch.stack(want))


def test_reference_cache_equals_no_cache(model_dir):
    model = load_joint_flux2(model_dir, jedi=JeDiConfig(resolution=32, reference_attention="references")).eval()
    x, _, e = _inputs(4, model)
    k = 2
    t = torch.tensor([0.0, 0.0, 600.0, 600.0])
    layout = SetLayout.build(torch.tensor([[True, True, False, False]]))
    rv = torch.tensor([True, True, False, False])
    full = _run(model, x, t, e, layout, rv)
    cache = ReferenceKVCache()
    rec = SetLayout.references_only(k).with_reference_cache(cache)
    _run(model, x[:k], t[:k], e[:k], rec, rv[:k])
    cache.recording = False
    assert len(cache) == len(model.attn_processors)
    replay = SetLayout.build(torch.zeros(1, 2, dtype=torch.bool)).with_reference_cache(cache)
    cached = _run(model, x[k:], t[k:], e[k:], replay, torch.zeros(2, dtype=torch.bool))
    torch.testing.assert_close(cached, full[k:], atol=1e-5, rtol=1e-4)


def test_save_load_round_trip(joint, tmp_path):
    joint.save_pretrained(tmp_path / "t")
    back = JointFlux2Transformer2DModel.load(str(tmp_path / "t"), None).eval()
    assert back.jedi == joint.jedi
    plain = JointFlux2Transformer2DModel.adopt(Flux2Transformer2DModel.from_pretrained(tmp_path / "t").eval())
    x, t, e = _inputs(3, joint)
    layout = SetLayout.build(torch.tensor([[True, False, False]]))
    rv = torch.tensor([True, False, False])
    want = _run(joint, x, t, e, layout, rv)
    assert torch.equal(_run(back, x, t, e, layout, rv), want) and torch.equal(_run(plain, x, t, e, layout, rv), want)


def test_objective_trains_the_reference_channels(components):
    from jedi_train.models.objective import JeDiObjective

    c = components
    ids = c.text.token_ids(["a backpack"] * 6).view(2, 3, -1)
    batch = {"pixel_values": torch.rand(2, 3, 3, 32, 32) * 2 - 1, "input_ids": ids,
             "is_ref": torch.tensor([[True, False, False]] * 2)}
    out = JeDiObjective(c)(batch, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and c.denoiser.x_embedder.weight.grad[:, c.denoiser.latent_channels:].abs().sum() > 0
    c.denoiser.zero_grad(set_to_none=True)


# -- the pipeline -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe_dir(model_dir, tmp_path_factory):
    return make_pipeline_dir(model_dir, str(tmp_path_factory.mktemp("flux2_pipe")), "references", resolution=32)


@needs_dreambench
def test_pipeline_samples_k0_k1_k3_and_round_trips(pipe_dir, tmp_path):
    pipe = load(pipe_dir)
    assert type(pipe) is JeDiFlux2KleinPipeline and "FLUX.2 Klein" in pipe.describe()
    k0 = run(pipe, None, image_guidance_scale=0.0)
    k1 = run(pipe, CAN[:1])
    k3 = run(pipe, CAN[:3])
    for out in (k0, k1, k3):
        assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert (k1 - k3).abs().max() > 1e-4 and (k0 - k1).abs().max() > 1e-4
    cached = run(pipe, CAN[:3], use_reference_cache=True)  # trained-with-'references' layout: cache = no cache
    uncached = run(pipe, CAN[:3], use_reference_cache=False)
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-3)
    pipe.save_pretrained(tmp_path / "again", safe_serialization=True)
    again = load(tmp_path / "again")
    torch.testing.assert_close(run(again, CAN[:1]), k1)


def test_distilled_klein_runs_no_text_branch(pipe_dir):
    pipe = load(pipe_dir)
    pipe.register_to_config(is_distilled=True)
    assert pipe.guidance_distilled
    out = run(pipe, None, image_guidance_scale=0.0, guidance_scale=4.0)
    torch.testing.assert_close(out, run(pipe, None, image_guidance_scale=0.0, guidance_scale=1.0))  # scale ignored


def test_lora_round_trip_in_flux2_format(pipe_dir, tmp_path):
    """An adapter saved in diffusers' Flux2LoraLoaderMixin format (transformer.* keys) loads back into the pipeline."""
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = load(pipe_dir)
    base_out = run(pipe, None, image_guidance_scale=0.0)
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                            init_lora_weights=False))
    trained = run(pipe, None, image_guidance_scale=0.0)
    assert (trained - base_out).abs().max() > 1e-5
    JeDiFlux2KleinPipeline.save_lora_weights(str(tmp_path / "lora"), get_peft_model_state_dict(pipe.transformer))
    fresh = load(pipe_dir)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(run(fresh, None, image_guidance_scale=0.0), trained, atol=1e-5, rtol=1e-4)


@needs_dreambench
def test_export_loads_with_plain_diffusers(pipe_dir, tmp_path):
    """The bundled code (joint_flux2 with its codec, the qwen3 text layout) loads without jedi_train installed."""
    from helpers.pipelines import run_generic

    line = run_generic(pipe_dir, tmp_path / "out.npy", tmp_path)
    assert "JointFlux2Transformer2DModel" in line and np.isfinite(np.load(tmp_path / "out.npy")).all()


def test_bad_directories_are_one_clear_line(model_dir, tmp_path):
    """A FLUX.2-dev transformer (guidance embedding; no row yet) is refused by name; a Qwen3 too shallow for
    Klein's layers 9/18/27 is named."""
    import json
    import shutil

    from transformers import Qwen3Config, Qwen3ForCausalLM

    dev = tmp_path / "dev"
    shutil.copytree(model_dir, dev)
    cfg = json.loads((dev / "transformer" / "config.json").read_text())
    (dev / "transformer" / "config.json").write_text(json.dumps({**cfg, "guidance_embeds": True}))
    with pytest.raises(ValueError, match="Flux2Transformer2DModel.*that jedi-train does not support"):
        families.family_of_dir(str(dev))
    shallow = tmp_path / "shallow"
    shutil.copytree(model_dir, shallow)
    enc = Qwen3ForCausalLM.from_pretrained(model_dir, subfolder="text_encoder")
    keep = {k: v for k, v in enc.config.to_dict().items() if k != "layer_types"}
    Qwen3ForCausalLM(Qwen3Config(**{**keep, "num_hidden_layers": 4})).save_pretrained(
        shallow / "text_encoder")
    c = load_components(str(shallow), JeDiConfig(resolution=32))
    with pytest.raises(ValueError, match="has 4 layers; FLUX.2 Klein reads layers"):
        c.text.embed(c.text.token_ids(["a dog"]))
