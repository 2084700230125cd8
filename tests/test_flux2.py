"""FLUX.2 (Klein and dev) through the family table: the tiny Klein of conf/model/tiny_flux2_klein.yaml (a 27-layer
Qwen3 with a byte-level BPE tokenizer, no guidance embedding) and the tiny FLUX.2-dev of conf/model/tiny_flux2.yaml
(a Mistral3ForConditionalGeneration with a PixtralProcessor, guidance embedding), each with an AutoencoderKLFlux2 and
FLUX.2's scheduler, saved in the real layout. Checked against diffusers' own Flux2KleinPipeline / Flux2Pipeline
where they have the piece (text embeddings, VAE latents, timesteps, LoRA loading); the joint model's invariants as
tests/test_joint_model.py checks them for the other families (both flavours: `model_dir` is parametrised, tests
that concern one flavour pin it); the pipeline's K = 0, 1, 3 sampling and persistence through JeDiAutoPipeline.
The CLI run (train -> export -> sample) is in tests/test_backbones_cli.py's parametrisation."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from helpers.invariants import (
    check_cache_equals_no_cache,
    check_coupling_and_permutation,
    check_save_load,
    check_sets_independent,
    run_denoiser,
)
from helpers.pipelines import CAN, load, make_pipeline_dir, needs_dreambench, run

from jedi_train.models import families
from jedi_train.models.attention import SetLayout
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
from jedi_train.pipelines.pipeline_jedi_flux2 import JeDiFlux2KleinPipeline, JeDiFlux2Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

KLEIN, DEV = "tiny_flux2_klein", "tiny_flux2"
# model config -> (family row, JeDi pipeline, diffusers' own pipeline, title)
FLAVOURS = {KLEIN: ("flux2_klein", JeDiFlux2KleinPipeline, Flux2KleinPipeline, "FLUX.2 Klein"),
            DEV: ("flux2", JeDiFlux2Pipeline, Flux2Pipeline, "FLUX.2-dev")}
klein_only = pytest.mark.parametrize("model_dir", [KLEIN], indirect=True)
dev_only = pytest.mark.parametrize("model_dir", [DEV], indirect=True)


@pytest.fixture(scope="module", params=[KLEIN, DEV])
def model_dir(request):
    """What model=tiny_flux2_klein / tiny_flux2 creates on first use (conftest's session fixtures)."""
    return request.getfixturevalue(f"{request.param}_model_dir")


def flavour(model_dir):
    return next(v for k, v in FLAVOURS.items() if families.family_of_dir(model_dir).name == v[0])


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


_run = run_denoiser


# -- the family ---------------------------------------------------------------------------------------------------
def test_directory_is_recognised_by_flavour(model_dir, components):
    name = flavour(model_dir)[0]
    assert families.family_of_dir(model_dir).name == name
    assert components.family == name and isinstance(components.denoiser, JointFlux2Transformer2DModel)
    assert type(components.vae).__name__ == "AutoencoderKLFlux2"
    assert isinstance(components.codec, Flux2LatentCodec) and components.codec.downsample == 4  # VAE /2, patchify /2
    assert isinstance(LatentCodec.of(components.vae, components.denoiser), Flux2LatentCodec)
    assert families.family_of(components.denoiser).name == name
    assert components.denoiser.config.guidance_embeds == (name == "flux2")  # FLUX.2-dev: guidance-distilled
    tokenizer = "PixtralProcessor" if name == "flux2" else "Qwen2Tokenizer"
    assert type(components.tokenizer).__name__.startswith(tokenizer)


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


# diffusers' published black-forest-labs/FLUX.2-dev transformer/config.json (guidance_embeds absent: diffusers'
# default, True) and FLUX.2-klein-9B's (diffusers' scripts/convert_flux2_to_diffusers.py "klein-9b"), typed in
_FLUX2_DEV_CONFIG = {"patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48,
                     "attention_head_dim": 128, "num_attention_heads": 48, "joint_attention_dim": 15360,
                     "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32],
                     "rope_theta": 2000, "eps": 1e-6}
_KLEIN_9B_CONFIG = {**_FLUX2_DEV_CONFIG, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                    "joint_attention_dim": 12288, "guidance_embeds": False}


@pytest.mark.parametrize(("preset", "config", "family", "text_params"),
                         [("flux2_dev", _FLUX2_DEV_CONFIG, "flux2", (23.5e9, 24.2e9)),  # Mistral-Small-3.2-24B
                          ("flux2_klein_9b", _KLEIN_9B_CONFIG, "flux2_klein", (8.1e9, 8.3e9))])  # Qwen3-8B
def test_dry_run_presets_count_the_published_transformers(preset, config, family, text_params):
    """The preset's joint transformer has exactly the published transformer's parameters (built from the typed-in
    config on the meta device) plus the reference channels of the widened input embedding."""
    from jedi_train.training.dry_run import build_on_meta

    with torch.device("meta"):
        published = Flux2Transformer2DModel.from_config(config)
    assert published.config.guidance_embeds == (family == "flux2")
    want = sum(p.numel() for p in published.parameters())
    row, denoiser, frozen = build_on_meta({"architecture": preset, "model_dir": "", "resolution": 512})
    assert row.name == family and families.family_of(denoiser).name == family
    widened = (config["in_channels"] + 1) * published.inner_dim  # [clean reference | mask] columns of x_embedder
    assert sum(p.numel() for p in denoiser.parameters()) == want + widened
    text = sum(p.numel() for p in frozen[0].parameters())
    assert text_params[0] < text < text_params[1], text


def test_flux2_s3_is_sized_without_its_dropped_text_encoder(tmp_path):
    """experiment=flux2_s3 (FLUX.2-dev LoRA, fp8 base, cached text): the dry run counts no Mistral-3 bytes when
    data.drop_text_encoders frees it, and all 24 B of it at bf16 when not."""
    from helpers.cli import compose_train

    from jedi_train.training.dry_run import estimate

    def per_rank(*overrides):
        cfg = compose_train(["experiment=flux2_s3", "trainer.devices=8", *overrides], tmp_path)
        cfg.model.model_dir = str(tmp_path / "absent")  # the preset, not a local FLUX2_DIR
        return estimate(cfg)["per_rank"]

    dropped, kept = per_rank(), per_rank("data.drop_text_encoders=false")
    text = kept["text encoders + VAE (bfloat16)"] - dropped["VAE (text encoders dropped, bfloat16)"]
    assert 2 * 23.5e9 < text < 2 * 24.2e9, text  # Mistral-Small-3.2-24B in bf16
    # 32.2 B at one byte, which ZeRO-3 partitions over the 8 ranks like every parameter
    assert 32e9 / 8 < dropped["frozen base of the denoiser (float8_e4m3fn)"] < 33e9 / 8
    assert sum(dropped.values()) < 40 * 2**30 < sum(kept.values())


# -- text, latents, timesteps: as Flux2KleinPipeline --------------------------------------------------------------
def test_text_is_the_diffusers_pipelines(model_dir, components):
    """Klein: Qwen3 chat prompt, layers 9/18/27 (Flux2KleinPipeline); dev: Mistral-3 chat prompt with FLUX.2's system
    message, layers 10/20/30 (Flux2Pipeline); stacked per token, padding masked: the pipelines' prompt embeddings."""
    c = components
    prompts = ["a red backpack on a beach", ""]
    ids = c.text.token_ids(prompts)
    tokenizer = getattr(c.tokenizer, "tokenizer", c.tokenizer)
    length = tokenizer.model_max_length
    assert ids.shape == (2, length)
    emb = c.text.embed(ids, c.resolution)
    if flavour(model_dir)[0] == "flux2_klein":
        assert c.text.layout == "qwen3"
        assert "<|im_start|>user\na red backpack on a beach<|im_end|>" in tokenizer.decode(ids[0])
        want = Flux2KleinPipeline._get_qwen3_prompt_embeds(c.text_encoder, c.tokenizer, prompts,
                                                           max_sequence_length=length)
    else:
        assert c.text.layout == "mistral3"
        text = tokenizer.decode(ids[0])
        assert "[SYSTEM_PROMPT]You are an AI that reasons" in text and "[INST]a red backpack on a beach[/INST]" in text
        want = Flux2Pipeline._get_mistral_3_small_prompt_embeds(c.text_encoder, c.tokenizer, prompts,
                                                                max_sequence_length=length)
    torch.testing.assert_close(emb.hidden, want)
    assert emb.hidden.shape[-1] == c.denoiser.config.joint_attention_dim and emb.pooled is None


def test_training_captions_are_tokenized_as_the_pipeline_does(model_dir, components):
    """The data stream's token ids are the pipeline's chat prompt (train.py's way: the components' tokenizers and
    layout; a bare model_dir: the family's), not the plain caption that a CLIP family would see."""
    from jedi_train.models.text import token_ids
    from jedi_train.training.datamodule import JeDiDataModule

    captions = ["a red dog on a beach", ""]
    want = components.text.token_ids(captions)
    as_train = JeDiDataModule("unused/*.tar", tokenizer=components.text.tokenizers, text_layout=components.text.layout)
    torch.testing.assert_close(as_train._tokenize_fn()(captions), want)
    torch.testing.assert_close(JeDiDataModule("unused/*.tar", model_dir=model_dir)._tokenize_fn()(captions), want)
    if flavour(model_dir)[0] == "flux2_klein":  # (a processor has no plain call: dev cannot even get there)
        assert not torch.equal(token_ids(components.text.tokenizers, captions), want)


@klein_only
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


def test_timesteps_are_the_diffusers_pipelines(model_dir, tmp_path):
    pipe_dir = make_pipeline_dir(model_dir, str(tmp_path / "p"), resolution=32)
    pipe = load(pipe_dir)
    pipe.prepare_timesteps(4, "cpu", 64)
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    ref = type(pipe.scheduler).from_config(pipe.scheduler.config)
    want, _ = retrieve_timesteps(ref, 4, "cpu", sigmas=np.linspace(1.0, 1 / 4, 4),
                                 mu=compute_empirical_mu(image_seq_len=64 * 64, num_steps=4))
    torch.testing.assert_close(pipe.scheduler.timesteps, want)
    assert pipe.guidance_distilled == (flavour(model_dir)[0] == "flux2")  # Klein base: real CFG; dev: distilled


@klein_only
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
    guidance = torch.ones(3) if base.config.guidance_embeds else None  # dev: the training default, 1.0
    with torch.no_grad():
        want = unpack(base(hidden_states=pack(x), encoder_hidden_states=e.hidden, timestep=t / 1000,
                           img_ids=image_ids(8, 8, "cpu"), txt_ids=text_ids(6, "cpu"), guidance=guidance).sample, 8, 8)
        fresh = load_joint_flux2(model_dir, jedi=JeDiConfig(resolution=32)).eval()  # zero-initialised new inputs
    assert fresh.config.in_channels == 2 * fresh.latent_channels + 1
    for layout in (SetLayout.independent(3), None):
        assert (_run(fresh, x, t, e, layout) - want).abs().max() <= 1e-5
    replacement = load_joint_flux2(model_dir, jedi=JeDiConfig(resolution=32, conditioning="replacement")).eval()
    assert (_run(replacement, x, t, e, SetLayout.independent(3)) - want).abs().max() <= 1e-5


def test_coupling_changes_outputs_and_permutation_equivariance(joint):
    check_coupling_and_permutation(joint, *_inputs(4, joint))


def test_sets_in_one_batch_do_not_interact_and_padding_is_invisible(joint):
    x, t, e = _inputs(6, joint)
    check_sets_independent(joint, x, t, e)
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


@klein_only
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
    check_cache_equals_no_cache(model, x, e)


def test_save_load_round_trip(joint, tmp_path):
    check_save_load(joint, Flux2Transformer2DModel, tmp_path / "t", *_inputs(3, joint))


@klein_only
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
def test_pipeline_samples_k0_k1_k3_and_round_trips(model_dir, pipe_dir, tmp_path):
    _, jedi_pipeline, _, title = flavour(model_dir)
    pipe = load(pipe_dir)
    assert type(pipe) is jedi_pipeline and title in pipe.describe()
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


@klein_only
def test_distilled_klein_runs_no_text_branch(pipe_dir):
    pipe = load(pipe_dir)
    pipe.register_to_config(is_distilled=True)
    assert pipe.guidance_distilled
    out = run(pipe, None, image_guidance_scale=0.0, guidance_scale=4.0)
    torch.testing.assert_close(out, run(pipe, None, image_guidance_scale=0.0, guidance_scale=1.0))  # scale ignored


@klein_only
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
@klein_only  # the same bundle code for dev (its pipeline class sits in the same module)
def test_export_loads_with_plain_diffusers(pipe_dir, tmp_path):
    """The bundled code (joint_flux2 with its codec, the qwen3 text layout) loads without jedi_train installed."""
    from helpers.pipelines import run_generic

    line = run_generic(pipe_dir, tmp_path / "out.npy", tmp_path)
    assert "JointFlux2Transformer2DModel" in line and np.isfinite(np.load(tmp_path / "out.npy")).all()


@dev_only
def test_dev_takes_the_text_guidance_scale_as_an_input(pipe_dir):
    """FLUX.2-dev is guidance-distilled (as Flux2Pipeline): no CFG branch, the scale goes into the model."""
    pipe = load(pipe_dir)
    assert pipe.guidance_distilled
    a = run(pipe, None, image_guidance_scale=0.0, guidance_scale=4.0)
    assert (a - run(pipe, None, image_guidance_scale=0.0, guidance_scale=1.0)).abs().max() > 1e-5


def test_lora_only_export_loads_into_the_diffusers_pipeline(model_dir, tmp_path):
    """--lora-only's file (save_lora_atomically) loads with diffusers' own Flux2KleinPipeline / Flux2Pipeline
    `load_lora_weights`; there, a lone image on diffusers' own prompt embeddings and ids gets the in-training
    prediction (a joint model's one-image set is its base). conditioning='replacement': the adapter is all that
    trains (under 'channels' the widened x_embedder rides along in full, which only the JeDi pipeline loads)."""
    from jedi_train.export.to_pipeline import save_lora_atomically
    from jedi_train.models.lora import LoraSettings, add_lora, trained_names

    name, _, diffusers_pipeline, _ = flavour(model_dir)
    c = load_components(model_dir, JeDiConfig(resolution=32, conditioning="replacement"))
    add_lora(c.denoiser, LoraSettings(rank=4))
    assert all("lora_" in n for n in trained_names(c.denoiser))
    with torch.no_grad():  # as if trained
        for p in c.denoiser.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    prompt, guidance = "a red dog on a beach", 2.5
    x = torch.randn(1, c.denoiser.latent_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([600.0])
    with torch.no_grad():
        want = c.denoiser.eval().denoise(x, t, c.text.embed(c.text.token_ids([prompt])), SetLayout.independent(1),
                                         guidance=guidance)
    out = save_lora_atomically(c.denoiser, str(tmp_path / "lora"))
    pipe = diffusers_pipeline(transformer=Flux2Transformer2DModel.from_pretrained(model_dir, subfolder="transformer"),
                              text_encoder=c.text_encoder, tokenizer=c.tokenizer, vae=c.vae,
                              scheduler=c.noise_scheduler)
    length = getattr(c.tokenizer, "tokenizer", c.tokenizer).model_max_length

    def predict():
        with torch.no_grad():
            embeds, txt_ids = pipe.encode_prompt(prompt, device="cpu", max_sequence_length=length)
            g = torch.full((1,), guidance) if name == "flux2" else None
            return unpack(pipe.transformer.eval()(hidden_states=pack(x), timestep=t / 1000, guidance=g,
                                                  encoder_hidden_states=embeds, txt_ids=txt_ids,
                                                  img_ids=pipe._prepare_latent_ids(x)).sample, 8, 8)

    assert (predict() - want).abs().max() > 1e-3  # the base alone differs
    pipe.load_lora_weights(out)
    torch.testing.assert_close(predict(), want, atol=1e-5, rtol=1e-4)


def test_bad_directories_are_one_clear_line(model_dir, tmp_path, capsys):
    """A FLUX.2 directory whose text encoder is missing, or is the other flavour's (a Klein directory with a
    guidance-embedding transformer reads as FLUX.2-dev: its Qwen3 is then named), or too shallow for the layers the
    family reads: one line each; through `jedi-data encode` (which reads the table) exit 2."""
    import json
    import shutil

    name = flavour(model_dir)[0]
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    cfg = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**cfg, "guidance_embeds": name != "flux2"}))
    want = "'mistral3' text encoder, not FLUX.2 Klein's Qwen3ForCausalLM" if name == "flux2" else \
        "'qwen3' text encoder, not FLUX.2-dev's Mistral3ForConditionalGeneration"
    with pytest.raises(ValueError, match=f"is a FLUX.2.* model .* but its text_encoder/ holds a {want}"):
        load_components(str(other), JeDiConfig(resolution=32))
    missing = tmp_path / "missing"
    shutil.copytree(model_dir, missing)
    shutil.rmtree(missing / "text_encoder")
    with pytest.raises(FileNotFoundError, match="lacks the 'text_encoder' component"):
        load_components(str(missing), JeDiConfig(resolution=32))
    if name == "flux2":  # through the CLI that reads the table: one `jedi-data: error:` line, exit 2
        from helpers.stream_helpers import write_shards

        from jedi_train.cli.data import main as jedi_data

        write_shards(str(tmp_path / "sets"), 1, 1)
        capsys.readouterr()
        assert jedi_data(["encode", f"{tmp_path}/sets/*.tar", str(tmp_path / "cache"), "--model", str(other),
                          "--resolution", "32", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("jedi-data: error:") and want in err[0]
        assert not (tmp_path / "cache").exists()
        return
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shallow = tmp_path / "shallow"
    shutil.copytree(model_dir, shallow)
    enc = Qwen3ForCausalLM.from_pretrained(model_dir, subfolder="text_encoder")
    keep = {k: v for k, v in enc.config.to_dict().items() if k != "layer_types"}
    Qwen3ForCausalLM(Qwen3Config(**{**keep, "num_hidden_layers": 4})).save_pretrained(
        shallow / "text_encoder")
    c = load_components(str(shallow), JeDiConfig(resolution=32))
    with pytest.raises(ValueError, match="text encoder has 4 layers; FLUX.2 Klein reads layers"):
        c.text.embed(c.text.token_ids(["a dog"]))
