"""The joint denoiser of every family (SD 1.x/2.x and SDXL UNets, the FLUX.1 and SD3 MM-DiTs; tiny models in the real
layouts): exact reduction to the base model, set equivariance, isolation, no-reference mode, masks, persistence."""
import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from helpers.invariants import check_coupling_and_permutation, check_sets_independent, run_denoiser

from jedi_train.models.attention import SetLayout
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.joint_flux import image_ids, load_joint_flux, pack, unpack
from jedi_train.models.joint_sd3 import load_joint_sd3
from jedi_train.models.joint_unet import JointUNet2DConditionModel, load_joint_unet
from jedi_train.models.text import TextEmbeddings

FIXTURES = {"sd": "tiny_model_dir", "sdxl": "tiny_sdxl_model_dir", "flux": "tiny_flux_model_dir",
            "sd3": "tiny_sd3_model_dir"}


@pytest.fixture(scope="module", params=list(FIXTURES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(request, family):
    return request.getfixturevalue(FIXTURES[family])


@pytest.fixture(scope="module")
def base(model_dir, family):
    if family in ("flux", "sd3"):
        cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
        return cls.from_pretrained(model_dir, subfolder="transformer").eval()
    return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()


@pytest.fixture(scope="module")
def joint(model_dir, family):
    if family == "sd3":
        return load_joint_sd3(model_dir).eval()
    return (load_joint_flux(model_dir, jedi=JeDiConfig(resolution=32)) if family == "flux" else load_joint_unet(model_dir)).eval()


def _base_output(base, x, t, e):
    """The base model's own call (FLUX: packed tokens, position ids, sigma = t / 1000)."""
    if isinstance(base, FluxTransformer2DModel):
        h, w = x.shape[-2:]
        out = base(hidden_states=pack(x), encoder_hidden_states=e.hidden, pooled_projections=e.pooled,
                   timestep=t.float() / 1000, img_ids=image_ids(h, w, x.device),
                   txt_ids=torch.zeros(e.hidden.shape[1], 3), guidance=torch.ones(x.shape[0])).sample
        return unpack(out, h, w)
    if isinstance(base, SD3Transformer2DModel):
        return base(hidden_states=x, encoder_hidden_states=e.hidden, pooled_projections=e.pooled, timestep=t).sample
    return base(x, t, **e.unet_kwargs()).sample


def _inputs(bn, seed=0, unet=None, tokens=8):
    """Random (latents, timesteps, text) for `unet`'s family; SDXL text carries pooled embeddings + time ids,
    FLUX text T5-like hidden states + a CLIP-like pooled vector."""
    cfg = unet.config
    c = unet.latent_channels
    s = cfg.get("sample_size") or 16  # FLUX: 32 px through the tiny VAE (/2)
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(bn, c, s, s, generator=g), torch.randint(0, 1000, (bn,), generator=g)
    if "joint_attention_dim" in cfg:
        return x, t, TextEmbeddings(torch.randn(bn, tokens, cfg.joint_attention_dim, generator=g),
                                    torch.randn(bn, cfg.pooled_projection_dim, generator=g))
    text = TextEmbeddings(torch.randn(bn, tokens, cfg.cross_attention_dim, generator=g))
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        text = TextEmbeddings(text.hidden, torch.randn(bn, pooled, generator=g),
                              torch.tensor([32.0, 32, 0, 0, 32, 32]).expand(bn, 6))
    return x, t, text


def _input_width(model, channels: int) -> int:
    """Input features for `channels` latent channels: UNets and SD3 take them as is, FLUX packs 2x2 patches."""
    return 4 * channels if "axes_dims_rope" in model.config else channels


_run = run_denoiser


def test_single_image_sets_equal_base_model(base, joint):
    x, t, e = _inputs(3, unet=joint)
    with torch.no_grad():
        want = _base_output(base, x, t, e)
    got = _run(joint, x, t, e, SetLayout.independent(3))
    assert joint.config.in_channels == _input_width(joint, 2 * joint.latent_channels + 1)
    assert (got - want).abs().max() <= 1e-5


def test_coupling_changes_outputs_and_permutation_equivariance(joint):
    check_coupling_and_permutation(joint, *_inputs(4, unet=joint))


def test_sets_in_one_batch_do_not_interact(joint):
    check_sets_independent(joint, *_inputs(6, unet=joint))


def test_mixed_set_sizes_padding_is_invisible(joint):
    """A set of 2 padded to 3 gives the same outputs as the set of 2 on its own."""
    x, t, e = _inputs(3, unet=joint)
    t = torch.full((3,), 300)
    is_ref = torch.tensor([[True, False, False]])
    pad = SetLayout.build(is_ref, valid=torch.tensor([[True, True, False]]))
    rv = torch.tensor([True, False, False])
    padded = _run(joint, x, t, e, pad, rv)
    x_other = x.clone()
    x_other[2] = torch.randn_like(x[2])  # padding content must not matter
    padded2 = _run(joint, x_other, t, e, pad, rv)
    alone = _run(joint, x[:2], t[:2], e[:2], SetLayout.build(is_ref[:, :2]), rv[:2])
    assert (padded[:2] - alone).abs().max() < 1e-5
    assert (padded2[:2] - alone).abs().max() < 1e-5


def test_decoupled_targets_ignore_reference_content(joint):
    x, t, e = _inputs(3, unet=joint)
    is_ref = torch.tensor([[True, False, False]])
    coupled = SetLayout.build(is_ref)
    decoupled = coupled.decoupled()
    x_changed = x.clone()
    x_changed[0] = torch.randn_like(x[0])  # a different reference image
    rv = torch.tensor([True, False, False])
    a = _run(joint, x, t, e, decoupled, torch.zeros(3, dtype=torch.bool))
    b = _run(joint, x_changed, t, e, decoupled, torch.zeros(3, dtype=torch.bool))
    assert (a[1:] - b[1:]).abs().max() < 1e-6
    c = _run(joint, x, t, e, coupled, rv)
    d = _run(joint, x_changed, t, e, coupled, rv)
    assert (c[1:] - d[1:]).abs().max() > 1e-3


def test_widened_conv_in_starts_equal_and_reference_channels_matter_after_training(joint):
    # zero-initialised new input channels: the reference slot has no effect before training
    x, t, e = _inputs(2, unet=joint)
    layout = SetLayout.independent(2)
    with torch.no_grad():
        a = joint.denoise(joint.assemble_input(x, x, torch.zeros(2, dtype=torch.bool)), t, e, layout)
        b = joint.denoise(joint.assemble_input(x, torch.randn_like(x), torch.ones(2, dtype=torch.bool)), t, e, layout)
    assert torch.equal(a, b)
    widened = joint.get_submodule(joint.joint_input_module).weight  # conv_in / x_embedder (FLUX) / pos_embed.proj
    assert widened[:, _input_width(joint, joint.latent_channels):].abs().sum() == 0


def test_save_load_round_trip(joint, tmp_path):
    joint.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    again = type(joint).from_pretrained(tmp_path / "unet").eval()
    assert again.jedi == joint.jedi and again.config.in_channels == joint.config.in_channels
    assert all(type(p).__name__ in ("JointAttnProcessor", "PerImageAttnProcessor", "JointFluxAttnProcessor",
                                    "JointSD3AttnProcessor")
               for p in again.attn_processors.values())
    x, t, e = _inputs(4, unet=joint)
    layout = SetLayout.build(torch.tensor([[True, False], [False, False]]))
    rv = torch.tensor([True, False, False, False])
    assert torch.equal(_run(joint, x, t, e, layout, rv), _run(again, x, t, e, layout, rv))


def test_replacement_mode_keeps_input_channels(tiny_model_dir):
    unet = load_joint_unet(tiny_model_dir, jedi=JeDiConfig(conditioning="replacement", reference_timestep="target"))
    assert unet.config.in_channels == 12 and unet.jedi.conditioning == "replacement"
    x = torch.randn(2, 12, 16, 16)
    assert torch.equal(unet.assemble_input(x, torch.randn_like(x), torch.ones(2, dtype=torch.bool)), x)


def test_bad_layouts_and_paths_raise_clear_errors(joint, tmp_path):
    with pytest.raises(ValueError, match="no target"):
        SetLayout.build(torch.tensor([[True, True]]))
    with pytest.raises(ValueError, match="valid mask shape"):
        SetLayout.build(torch.zeros(2, 3, dtype=torch.bool), valid=torch.ones(2, 2, dtype=torch.bool))
    x, t, e = _inputs(5, unet=joint)
    with pytest.raises(ValueError, match="does not match the set layout"):
        _run(joint, x, t, e, SetLayout.build(torch.zeros(2, 2, dtype=torch.bool)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_joint_unet(str(tmp_path / "nope"))


def test_make_joint_validates_options(tiny_model_dir):
    unet = JointUNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    assert unet.jedi is None  # a base checkpoint stays a base model until converted
    with pytest.raises(ValueError, match="conditioning='pixels' is unknown"):
        unet.make_joint(JeDiConfig(conditioning="pixels"))
    unet.make_joint()
    with pytest.raises(ValueError, match="already joint"):
        unet.make_joint()


def test_missing_component_is_named(tiny_model_dir, tmp_path):
    import shutil

    from jedi_train.models.components import load_components

    broken = tmp_path / "sd"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(FileNotFoundError, match="lacks the 'text_encoder' component"):
        load_components(str(broken))


@pytest.mark.parametrize("mmdit", ["flux", "sd3"])
def test_lora_adapter_export_loads_into_the_base_pipeline(mmdit, request, tmp_path):
    """LoRA on a joint MM-DiT (adapters + the widened input embedding in full) -> --lora-only's file in the
    family's diffusers format -> the family pipeline's load_lora_weights on the base: the in-training
    predictions, exactly."""
    from jedi_train.export.to_pipeline import save_lora_atomically
    from jedi_train.models.components import load_components
    from jedi_train.models.lora import LoraSettings, add_lora, trained_names
    from jedi_train.pipelines.pipeline_jedi_sd import JeDiPipeline

    model_dir = request.getfixturevalue(FIXTURES[mmdit])
    c = load_components(model_dir, JeDiConfig(resolution=32))
    add_lora(c.denoiser, LoraSettings(rank=4))
    full = c.denoiser.joint_input_module
    assert {n for n in trained_names(c.denoiser) if "lora" not in n} == {f"{full}.weight", f"{full}.bias"}
    with torch.no_grad():  # as if trained: every trained weight moves
        for p in c.denoiser.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    x, t, e = _inputs(3, unet=c.denoiser)
    x = torch.cat([x, x, x[:, :1]], dim=1)  # [noisy | reference | mask]: 2C + 1 channels
    layout = SetLayout.build(torch.tensor([[True, False, False]]))
    with torch.no_grad():
        want = c.denoiser.eval().denoise(x, t, e, layout)
    out = save_lora_atomically(c.denoiser, str(tmp_path / "lora"))
    pipe = JeDiPipeline.from_components(load_components(model_dir, JeDiConfig(resolution=32)))
    with torch.no_grad():
        assert (pipe.transformer.denoise(x, t, e, layout) - want).abs().max() > 1e-2  # the base alone differs
        pipe.load_lora_weights(out)
        torch.testing.assert_close(pipe.transformer.eval().denoise(x, t, e, layout), want, atol=1e-5, rtol=0)
