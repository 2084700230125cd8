"""Qwen-Image through the family table: the tiny Qwen-Image of conf/model/tiny_qwenimage.yaml (a Qwen2.5-VL text
encoder with a byte-level BPE tokenizer, an AutoencoderKLQwenImage, a QwenImageTransformer2DModel, Qwen-Image's
scheduler) saved in the real layout. Checked against diffusers' own QwenImagePipeline where it has the piece (text
embeddings and mask, VAE latents, timesteps, true-CFG rescale, LoRA loading); the joint model's invariants as
tests/test_joint_model.py checks them for the other families; the pipeline's K = 0, 1, 3 sampling. The CLI run
(train -> export -> sample) is in tests/test_backbones_cli.py's parametrisation."""
from __future__ import annotations

import json
import shutil
import tarfile
import types

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from helpers.cli import cli, one_line_error
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
from jedi_train.models.joint_flux import pack, unpack
from jedi_train.models.joint_qwenimage import (
    JointQwenImageTransformer2DModel,
    QwenImageLatentCodec,
    load_joint_qwenimage,
)
from jedi_train.models.text import QWEN_IMAGE_DROP, QWEN_IMAGE_TEMPLATE, TextEmbeddings
from jedi_train.pipelines.pipeline_jedi_qwenimage import JeDiQwenImagePipeline

pytestmark = pytest.mark.usefixtures("one_thread")
J = JeDiConfig(resolution=32)

# Qwen/Qwen-Image transformer/config.json (diffusers' published config), typed in
QWEN_IMAGE_CONFIG = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
                     "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
                     "axes_dims_rope": [16, 56, 56]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """What model=tiny_qwenimage creates on first use (its create_tiny_if_missing), in a temporary folder."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from jedi_train.models.tiny import create_tiny_model_dir
    from jedi_train.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny_qwenimage"])
    spec = OmegaConf.to_container(cfg.model.create_tiny_if_missing, resolve=True)
    return create_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_qwenimage")), **spec)


@pytest.fixture(scope="module")
def components(model_dir):
    return load_components(model_dir, J)


@pytest.fixture(scope="module")
def base(model_dir):
    return QwenImageTransformer2DModel.from_pretrained(model_dir, subfolder="transformer").eval()


@pytest.fixture(scope="module")
def joint(model_dir):
    model = load_joint_qwenimage(model_dir, jedi=J).eval()
    with torch.no_grad():  # the reference channels get weights, so references also reach the model through them
        model.img_in.weight[:, 4 * model.latent_channels:].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


def _inputs(bn, model, seed=0, tokens=6):
    """Latents, timesteps and text whose rows have 3..6 valid tokens (the rest is padding, masked)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bn, model.latent_channels, 8, 8, generator=g)
    t = torch.randint(0, 1000, (bn,), generator=g).float()
    mask = torch.arange(tokens)[None] < torch.randint(3, tokens + 1, (bn, 1), generator=g)
    hidden = torch.randn(bn, tokens, model.config.joint_attention_dim, generator=g) * mask[..., None]
    return x, t, TextEmbeddings(hidden, mask=mask)


_run = run_denoiser


def _base_call(model, x, t, e):
    """QwenImagePipeline's transformer call on packed latents (its mask: None when every token is valid)."""
    keep = int(e.mask.any(0).nonzero().max()) + 1
    mask = e.mask[:, :keep]
    out = model(hidden_states=pack(x), encoder_hidden_states=e.hidden[:, :keep],
                encoder_hidden_states_mask=None if mask.all() else mask, timestep=t / 1000,
                img_shapes=[[(1, 4, 4)]] * len(x)).sample
    return unpack(out, 8, 8)


# -- the family ---------------------------------------------------------------------------------------------------
def test_directory_is_recognised_as_qwenimage(model_dir, components):
    assert families.family_of_dir(model_dir).name == "qwenimage"
    assert components.family == "qwenimage" and isinstance(components.denoiser, JointQwenImageTransformer2DModel)
    assert type(components.vae).__name__ == "AutoencoderKLQwenImage"
    assert type(components.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"  # QwenImagePipeline's
    assert isinstance(components.codec, QwenImageLatentCodec) and components.codec.downsample == 2
    assert isinstance(LatentCodec.of(components.vae, components.denoiser), QwenImageLatentCodec)
    assert families.family_of(components.denoiser).name == "qwenimage"


def test_dry_run_preset_is_qwen_image_20b():
    """qwenimage_20b at Qwen-Image's published shapes: the joint transformer is the published config instantiated
    on the meta device plus the widened input (68 more features per packed patch), ~20.4 B; Qwen2.5-VL-7B ~8.3 B."""
    from jedi_train.training.dry_run import build_on_meta, vae_downsample

    family, denoiser, frozen = build_on_meta({"architecture": "qwenimage_20b", "model_dir": "", "resolution": 512})
    assert family.name == "qwenimage" and isinstance(denoiser, JointQwenImageTransformer2DModel)
    with torch.device("meta"):
        published = QwenImageTransformer2DModel(**QWEN_IMAGE_CONFIG)
    n_pub = sum(p.numel() for p in published.parameters())
    n = sum(p.numel() for p in denoiser.parameters())
    assert n - n_pub == (4 * (2 * 16 + 1) - 64) * 24 * 128 and 20.3e9 < n_pub < 20.5e9, (n, n_pub)
    assert {k: denoiser.config[k] for k in QWEN_IMAGE_CONFIG if k != "in_channels"} == \
        {k: v for k, v in QWEN_IMAGE_CONFIG.items() if k != "in_channels"}
    qwen = sum(p.numel() for p in frozen[0].parameters())
    assert type(frozen[0]).__name__ == "Qwen2_5_VLForConditionalGeneration" and 8.2e9 < qwen < 8.4e9, qwen
    assert vae_downsample(frozen, family) == 8
    sample, _, text = denoiser.dummy_inputs(2, 64, 512, torch.float32, "meta")
    assert sample.shape == (2, 33, 64, 64) and text.hidden.shape == (2, 512, 3584)


# -- text, latents, timesteps: as QwenImagePipeline ---------------------------------------------------------------
def test_text_is_qwen_image_s(components):
    """The prompt template, its first 34 tokens (exactly the system prompt and user header) dropped, the last hidden
    states of the valid tokens, zero-padded, and the mask: QwenImagePipeline._get_qwen_prompt_embeds."""
    c = components
    assert c.text.layout == "qwen2_5_vl"
    assert len(c.tokenizer(QWEN_IMAGE_TEMPLATE.split("{}")[0]).input_ids) == QWEN_IMAGE_DROP
    prompts = ["a red backpack on a beach", ""]
    ids = c.text.token_ids(prompts)
    assert ids.shape == (2, c.tokenizer.model_max_length)
    emb = c.text.embed(ids, c.resolution)
    fake = types.SimpleNamespace(tokenizer=c.tokenizer, text_encoder=c.text_encoder, tokenizer_max_length=1024,
                                 prompt_template_encode=QWEN_IMAGE_TEMPLATE, prompt_template_encode_start_idx=34,
                                 _extract_masked_hidden=lambda h, m: QwenImagePipeline._extract_masked_hidden(None, h, m))
    want, want_mask = QwenImagePipeline._get_qwen_prompt_embeds(fake, prompts, device="cpu")
    n = want.shape[1]
    torch.testing.assert_close(emb.hidden[:, :n], want)
    assert torch.equal(emb.mask[:, :n], want_mask.bool()) and not emb.mask[:, n:].any()
    assert (emb.hidden[:, n:] == 0).all() and emb.hidden.shape[-1] == c.denoiser.config.joint_attention_dim


def test_latents_are_qwen_image_s(components):
    """One-frame clips through the video VAE, normalised by latents_mean / latents_std (QwenImageEditPipeline
    encodes so), decoded as QwenImagePipeline decodes."""
    from diffusers import QwenImageEditPipeline

    c = components
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = types.SimpleNamespace(vae=c.vae, latent_channels=c.vae.config.z_dim)
    with torch.no_grad():
        want = QwenImageEditPipeline._encode_vae_image(fake, images[:, :, None], None)[:, :, 0]
    got = c.codec.encode(images, sample=False)
    torch.testing.assert_close(got, want)
    assert got.shape == (2, c.denoiser.latent_channels, 16, 16)
    mean, logvar = c.codec.posterior(images)  # what jedi-data encode caches
    torch.testing.assert_close(c.codec.sample(mean, torch.full_like(logvar, -1e4)), want, atol=1e-4, rtol=1e-4)
    cfg = c.vae.config
    raw = got[:, :, None] / (1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)) + \
        torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(c.codec.decode(got), c.vae.decode(raw).sample[:, :, 0], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def pipe_dir(model_dir, tmp_path_factory):
    return make_pipeline_dir(model_dir, str(tmp_path_factory.mktemp("qwen_pipe")), "references", resolution=32)


def test_timesteps_and_true_cfg_are_qwen_image_s(pipe_dir):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

    pipe = load(pipe_dir)
    pipe.prepare_timesteps(4, "cpu", 64)
    ref = type(pipe.scheduler).from_config(pipe.scheduler.config)
    c = ref.config
    mu = calculate_shift(32 * 32, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    want, _ = retrieve_timesteps(ref, 4, "cpu", sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    torch.testing.assert_close(pipe.scheduler.timesteps, want)
    assert c.shift_terminal == 0.02 and c.max_shift == 0.9 and not pipe.guidance_distilled  # true CFG
    # two branches (text CFG): QwenImagePipeline's combination and norm rescale, per packed token
    from jedi_train.pipelines.set_plan import guidance_branches

    branches = guidance_branches(4.0, 0.0, False)
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn(2, 4, 8, 8, generator=g) for _ in branches]
    neg, cond = (pack(p) for p in (preds[[b.text for b in branches].index("uncond")],
                                   preds[[b.text for b in branches].index("cond")]))
    comb = neg + 4.0 * (cond - neg)
    want = unpack(comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True)), 8, 8)
    torch.testing.assert_close(pipe.combine_guidance(branches, preds), want)


# -- the joint model ----------------------------------------------------------------------------------------------
def test_single_image_sets_equal_base_model(base, joint, model_dir):
    """N = 1 without references is the base transformer, through the base processor and through the coupled one
    (a set padded to 2: the padding invisible), text padding masked in both."""
    x, t, e = _inputs(3, joint)
    with torch.no_grad():
        want = _base_call(base, x, t, e)
        fresh = load_joint_qwenimage(model_dir, jedi=J).eval()  # zero-initialised new inputs
    assert fresh.config.in_channels == 4 * (2 * fresh.latent_channels + 1)
    for layout in (SetLayout.independent(3), None):
        assert (_run(fresh, x, t, e, layout) - want).abs().max() <= 1e-5
    padded = SetLayout.build(torch.zeros(3, 2, dtype=torch.bool), valid=torch.tensor([[True, False]] * 3))
    rep = torch.arange(3).repeat_interleave(2)
    out = _run(fresh, x[rep], t[rep], e[rep], padded)
    assert (out[::2] - want).abs().max() <= 1e-4
    replacement = load_joint_qwenimage(model_dir, jedi=J.replace(conditioning="replacement")).eval()
    assert (_run(replacement, x, t, e, SetLayout.independent(3)) - want).abs().max() <= 1e-5


def test_coupling_changes_outputs_and_permutation_equivariance(joint):
    check_coupling_and_permutation(joint, *_inputs(4, joint))


def test_sets_in_one_batch_do_not_interact_and_text_padding_is_invisible(joint):
    x, t, e = _inputs(6, joint)
    out, layout = check_sets_independent(joint, x, t, e)
    noise = torch.randn_like(e.hidden) * ~e.mask[..., None]  # only padded text tokens change
    assert (out - _run(joint, x, t, TextEmbeddings(e.hidden + noise, mask=e.mask), layout)).abs().max() < 1e-5
    unmasked = _run(joint, x, t, TextEmbeddings(e.hidden + noise), layout)  # without the mask they would count
    assert (out - unmasked).abs().max() > 1e-4


def test_no_reference_mode_cuts_targets_off_the_references(joint):
    x, t, e = _inputs(3, joint)
    coupled = SetLayout.build(torch.tensor([[True, False, False]]))
    hidden = torch.zeros(3, dtype=torch.bool)
    x2 = x.clone()
    x2[0] = torch.randn_like(x[0])
    a, b = _run(joint, x, t, e, coupled.decoupled(), hidden), _run(joint, x2, t, e, coupled.decoupled(), hidden)
    assert (a[1:] - b[1:]).abs().max() < 1e-6
    visible = torch.tensor([True, False, False])
    c, d = _run(joint, x, t, e, coupled, visible), _run(joint, x2, t, e, coupled, visible)
    assert (c[1:] - d[1:]).abs().max() > 1e-3


def test_reference_positions_offset_puts_references_at_their_own_frames(model_dir):
    """'offset': the r-th reference at frame r (QwenImageEditPlus's condition images); targets at frame 0."""
    same = load_joint_qwenimage(model_dir, jedi=J).eval()
    moved = load_joint_qwenimage(model_dir, jedi=J.replace(reference_positions="offset")).eval()
    x, t, e = _inputs(3, same)
    lone = SetLayout.independent(3)
    assert (_run(same, x, t, e, lone) - _run(moved, x, t, e, lone)).abs().max() < 1e-6
    layout = SetLayout.build(torch.tensor([[True, True, False]]))
    rv = torch.tensor([True, True, False])
    assert (_run(same, x, t, e, layout, rv)[2] - _run(moved, x, t, e, layout, rv)[2]).abs().max() > 1e-4
    img, _ = moved._rope(layout, 6, 8, 8, "cpu")
    edit_plus, _ = moved.pos_embed([[(1, 4, 4), (1, 4, 4), (1, 4, 4)]], device="cpu", max_txt_seq_len=6)
    frames = edit_plus.view(3, 16, -1)  # QwenEmbedRope over [target, condition 1, condition 2]: frames 0, 1, 2
    torch.testing.assert_close(img, frames[[1, 2, 0]])


def test_reference_cache_equals_no_cache(model_dir):
    model = load_joint_qwenimage(model_dir, jedi=J.replace(reference_attention="references")).eval()
    x, _, e = _inputs(4, model)
    check_cache_equals_no_cache(model, x, e)


def test_save_load_round_trip(joint, tmp_path):
    check_save_load(joint, QwenImageTransformer2DModel, tmp_path / "t", *_inputs(3, joint))


def test_objective_trains_the_reference_channels(components):
    from jedi_train.models.objective import JeDiObjective

    c = components
    ids = c.text.token_ids(["a backpack"] * 6).view(2, 3, -1)
    batch = {"pixel_values": torch.rand(2, 3, 3, 32, 32) * 2 - 1, "input_ids": ids,
             "is_ref": torch.tensor([[True, False, False]] * 2)}
    out = JeDiObjective(c)(batch, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    grad = c.denoiser.img_in.weight.grad[:, 4 * c.denoiser.latent_channels:]
    assert torch.isfinite(out["loss"]) and grad.abs().sum() > 0
    c.denoiser.zero_grad(set_to_none=True)


def test_cached_text_carries_the_mask(components):
    """jedi-data encode's cache holds the mask beside the states (stored in the cache's dtype); the objective's
    cached path (caption dropout to the cached "" included) gives the conditioning the on-the-fly path gives."""
    from jedi_train.models.objective import JeDiObjective

    c = components
    caps = ["a red dog", "a blue cat on a beach", "a toy"] * 2
    ids = c.text.token_ids(caps)
    emb, empty = c.text.embed(ids), c.text.embed(c.text.token_ids([""]))
    stored = emb.apply(lambda x: x.to(torch.bfloat16))
    batch = {"pixel_values": torch.zeros(2, 3, 3, 32, 32), "input_ids": ids.view(2, 3, -1),
             "text_hidden": stored.hidden.view(2, 3, *emb.hidden.shape[1:]), "text_mask": stored.mask.view(2, 3, -1),
             "text_empty_hidden": empty.hidden.bfloat16(), "text_empty_mask": empty.mask.bfloat16()}
    objective = JeDiObjective(c)
    dropped = torch.tensor([[True, False, False]] * 2)
    cached = objective.text_conditioning(batch, dropped)
    fresh = objective.text_conditioning({k: v for k, v in batch.items() if not k.startswith("text_")}, dropped)
    assert torch.equal(cached.mask.bool(), fresh.mask.bool()) and cached.mask[0].sum() == empty.mask.sum()
    torch.testing.assert_close(cached.hidden, fresh.hidden, atol=0.05, rtol=0.02)


# -- the pipeline, LoRA -------------------------------------------------------------------------------------------
@needs_dreambench
def test_pipeline_samples_k0_k1_k3_and_round_trips(pipe_dir, tmp_path):
    pipe = load(pipe_dir)
    assert type(pipe) is JeDiQwenImagePipeline and "Qwen-Image" in pipe.describe()
    k0 = run(pipe, None, image_guidance_scale=0.0)
    k1 = run(pipe, CAN[:1])
    k3 = run(pipe, CAN[:3])
    for out in (k0, k1, k3):
        assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert (k1 - k3).abs().max() > 1e-4 and (k0 - k1).abs().max() > 1e-4
    cached = run(pipe, CAN[:3], use_reference_cache=True)  # trained-with-'references' layout: cache = no cache
    torch.testing.assert_close(cached, run(pipe, CAN[:3], use_reference_cache=False), atol=1e-4, rtol=1e-3)
    pipe.save_pretrained(tmp_path / "again", safe_serialization=True)
    torch.testing.assert_close(run(load(tmp_path / "again"), CAN[:1]), k1)


@pytest.mark.parametrize("conditioning", ["replacement", "channels"])
def test_lora_only_export_loads_in_qwen_image_pipelines(model_dir, conditioning, tmp_path):
    """LoRA on the joint transformer -> --lora-only's file (diffusers' QwenImage LoRA format) -> loaded by
    load_lora_weights: diffusers' own QwenImagePipeline on the base model ('replacement': no widened input) gives the
    in-training prediction of a lone target; with 'channels' (the widened img_in trained in full, in the file) the
    JeDi pipeline on the base gives it for a set with a reference."""
    from jedi_train.export.to_pipeline import save_lora_atomically
    from jedi_train.models.lora import LoraSettings, add_lora
    from jedi_train.pipelines.pipeline_jedi import JeDiBasePipeline

    jedi = J.replace(conditioning=conditioning)
    c = load_components(model_dir, jedi)
    add_lora(c.denoiser, LoraSettings(rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                             "add_k_proj", "add_v_proj", "to_add_out"]))
    with torch.no_grad():  # as if trained: every trained weight moves
        for p in c.denoiser.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    out = save_lora_atomically(c.denoiser, str(tmp_path / "lora"))
    x, t, e = _inputs(3, c.denoiser)
    if conditioning == "replacement":
        with torch.no_grad():
            want = c.denoiser.eval().denoise(x, t, e, None)
        base = QwenImageTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
        pipe = QwenImagePipeline(scheduler=c.noise_scheduler, vae=c.vae, text_encoder=c.text_encoder,
                                 tokenizer=c.tokenizer, transformer=base)  # diffusers' own, on the base model
        with torch.no_grad():
            assert (_base_call(pipe.transformer, x, t, e) - want).abs().max() > 1e-3  # the base alone differs
            pipe.load_lora_weights(out)
            torch.testing.assert_close(_base_call(pipe.transformer.eval(), x, t, e), want, atol=1e-5, rtol=0)
        return
    model_in = c.denoiser.assemble_input(x, x, torch.tensor([True, False, False]))
    layout = SetLayout.build(torch.tensor([[True, False, False]]))
    with torch.no_grad():
        want = c.denoiser.eval().denoise(model_in, t, e, layout)
    pipe = JeDiBasePipeline.from_components(load_components(model_dir, jedi))
    assert isinstance(pipe, JeDiQwenImagePipeline)
    with torch.no_grad():
        pipe.load_lora_weights(out)
        torch.testing.assert_close(pipe.transformer.eval().denoise(model_in, t, e, layout), want, atol=1e-5, rtol=0)


def test_bad_directories_are_one_clear_line(model_dir, tmp_path):
    """A missing text encoder is named; a Qwen3 (FLUX.2 Klein's encoder) in its place is refused by class."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    missing = tmp_path / "missing"
    shutil.copytree(model_dir, missing)
    shutil.rmtree(missing / "text_encoder")
    with pytest.raises(FileNotFoundError, match="is a Qwen-Image model .* lacks the 'text_encoder' component"):
        load_components(str(missing), J)
    wrong = tmp_path / "wrong"
    shutil.copytree(model_dir, wrong)
    shutil.rmtree(wrong / "text_encoder")
    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)).save_pretrained(
        wrong / "text_encoder")
    with pytest.raises(ValueError, match="is a Qwen-Image model .*but its text_encoder/ holds a 'qwen3' text encoder, "
                                         "not Qwen-Image's Qwen2_5_VLForConditionalGeneration"):
        load_components(str(wrong), J)
    (tmp_path / "shards").mkdir()  # through a CLI: one line, exit 2
    tarfile.open(tmp_path / "shards" / "0.tar", "w").close()
    p = cli("jedi-data", "encode", f"{tmp_path}/shards/*.tar", tmp_path / "enc", "--model", wrong, "--resolution", "32",
            cwd=tmp_path)
    assert "its text_encoder/ holds a 'qwen3' text encoder" in one_line_error(p, "jedi-data")
    edit = tmp_path / "edit2511"
    shutil.copytree(model_dir, edit)
    cfg = json.loads((edit / "transformer" / "config.json").read_text())
    (edit / "transformer" / "config.json").write_text(json.dumps({**cfg, "zero_cond_t": True}))
    with pytest.raises(ValueError, match="QwenImageTransformer2DModel.*that jedi-train does not support"):
        families.family_of_dir(str(edit))
