"""ONE row per backbone family: everything the rest of the tree asks about "which model is this?".

A row says how a model directory is recognised (its denoiser folder, the class names its config may carry,
one extra check on that config), its joint denoiser class, its text encoders and how their outputs become
the denoiser's conditioning (`text_layout`, read by text.PromptEncoder), whether it is trained by flow
matching, whether a VAE is required, where its pixel size comes from, its pipeline class, its diffusers
LoRA loader, its dry-run presets and its tiny-model recipe.

Classes are named as "module:attribute" and imported on first use: this file imports nothing heavy, the
pipelines may name models and the models may name pipelines without an import cycle. A new backbone is a
new row (`register`) plus its own rooms (a joint model module, a pipeline module, a tiny recipe, configs).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field


def import_object(path: str):
    """"package.module:Name" -> the object. Inside an export's bundle (this file flattened beside the others,
    no jedi_train installed) a project module is its flat sibling file (bundle.flat_name's rule)."""
    module, _, name = path.partition(":")
    if not __name__.startswith("jedi_train.") and module.startswith(("jedi_train.", "data_pipelines.")):
        base = module.rsplit(".", 1)[-1]
        module = f"{__package__}.{base if base.startswith(('jedi', 'pipeline_jedi')) else 'jedi_' + base}"
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    name: str  # the short name checkpoints record ("sd", "sdxl", ...)
    title: str  # what messages call it
    denoiser_folder: str  # "unet" | "transformer"
    denoiser_classes: tuple[str, ...]  # _class_name values of <denoiser_folder>/config.json: base, joint
    joint_class: str  # "module:Class" of the joint denoiser
    text_encoders: tuple[tuple[str, str], ...]  # transformers (encoder, tokenizer) class per slot: text_encoder, _2, ...
    text_layout: str  # how text.PromptEncoder turns the encoders' outputs into conditioning
    text_tokens: tuple[tuple[str, int], ...]  # (tokenizer folder, default length): the tokens the denoiser sees
    pipeline_class: str  # "module:Class"
    lora_loader: str  # "module:Class": the family's diffusers LoRA format
    tiny_recipe: str  # "module:function(out_dir, **kwargs)" writing a tiny random BASE model directory
    flow_matching: bool = False  # FlowMatchEulerDiscreteScheduler, velocity target; else DDPM + DDIM sampling
    needs_vae: bool = False  # pixel-space models (no vae/) exist only for the UNet families
    fixed_resolution: bool = True  # sample_size x VAE factor fixes the pixel size; else the resolution made joint for
    matches: Callable[[dict], bool] = field(default=lambda config: True, compare=False)  # on the denoiser config
    recognised_by: str = ""  # what `matches` saw, for messages about a directory of this family
    dry_run_presets: dict[str, dict] = field(default_factory=dict, compare=False)  # published shapes, by name
    vae_class: str = "diffusers:AutoencoderKL"  # "module:Class" of the vae/ folder
    codec_class: str = "jedi_train.models.components:LatentCodec"  # images <-> the denoiser's latents (VAE scaling)

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple("tokenizer" + ("" if i == 0 else f"_{i + 1}") for i in range(len(self.text_encoders)))

    @property
    def encoder_folders(self) -> tuple[str, ...]:
        return tuple("text_encoder" + ("" if i == 0 else f"_{i + 1}") for i in range(len(self.text_encoders)))

    @property
    def required(self) -> tuple[str, ...]:
        """The component folders a model directory of this family must have."""
        pairs = [p for pair in zip(self.encoder_folders, self.tokenizers) for p in pair]
        return (self.denoiser_folder, *(["vae"] if self.needs_vae else []), *pairs, "scheduler")

    def joint(self):
        return import_object(self.joint_class)

    def pipeline(self):
        return import_object(self.pipeline_class)

    def lora(self):
        return import_object(self.lora_loader)

    def vae(self):
        return import_object(self.vae_class)

    def codec(self):
        return import_object(self.codec_class)

    def text_encoder_class(self, slot: int):
        return getattr(importlib.import_module("transformers"), self.text_encoders[slot][0])

    def tokenizer_class(self, slot: int):
        return getattr(importlib.import_module("transformers"), self.text_encoders[slot][1])

    def create_tiny(self, out_dir: str, **kwargs) -> str:
        return import_object(self.tiny_recipe)(out_dir, **kwargs)


FAMILIES: dict[str, Family] = {}  # in recognition order


def register(family: Family, before: str | None = None) -> Family:
    """Add (or replace) a row; `before`: recognised ahead of that row (a family whose `matches` is narrower than
    an existing row's). Tests register a renamed copy to check that nothing else needs editing."""
    FAMILIES.pop(family.name, None)
    rows = list(FAMILIES.items())
    at = next((i for i, (name, _) in enumerate(rows) if name == before), len(rows))
    rows.insert(at, (family.name, family))
    FAMILIES.clear()
    FAMILIES.update(rows)
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)


def supported() -> str:
    return ", ".join(f.title for f in FAMILIES.values())


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is unknown; jedi-train supports {', '.join(FAMILIES)} "
                         f"({supported()})")
    return FAMILIES[name]


def _read_config(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _pipeline_class(model_dir: str) -> str | None:
    index = _read_config(os.path.join(model_dir, "model_index.json")) or {}
    name = index.get("_class_name")
    return name[1] if isinstance(name, list) else name


def family_of_config(folder: str, config: dict) -> Family | None:
    """The family whose denoiser folder is `folder` and whose classes and check accept `config`."""
    cls = config.get("_class_name") or "UNet2DConditionModel"
    for family in FAMILIES.values():
        if family.denoiser_folder == folder and cls in family.denoiser_classes and family.matches(config):
            return family
    return None


def family_of_dir(model_dir: str) -> Family:
    """Read from the denoiser's config; one clear error for a denoiser no row accepts. A directory with no
    denoiser at all reads as the first family, so that the caller names the missing folder."""
    for folder in dict.fromkeys(f.denoiser_folder for f in FAMILIES.values()):
        if not os.path.isdir(os.path.join(model_dir, folder)):
            continue
        config = _read_config(os.path.join(model_dir, folder, "config.json")) or {}  # unreadable: the loader says
        family = family_of_config(folder, config)
        if family is not None:
            return family
        pipeline = _pipeline_class(model_dir)
        cls = config.get("_class_name")
        what = (f"a diffusion transformer ({cls or pipeline}{', ' + pipeline if pipeline and cls else ''})"
                if folder != "unet" else
                f"a {cls} with addition_embed_type={config.get('addition_embed_type')!r} "
                f"({pipeline or 'unknown pipeline'})")
        raise ValueError(f"model directory {model_dir} holds {what} that jedi-train does not support; it supports "
                         f"{supported()}: point model.model_dir at one of those")
    return next(iter(FAMILIES.values()))


def family_of(model) -> Family:
    """The family of a (joint or plain) denoiser instance."""
    for family in FAMILIES.values():
        try:
            joint = family.joint()
        except ImportError:  # an export's bundle carries its own family's code only
            continue
        if isinstance(model, joint) and family.matches(model.config):
            return family
    for family in FAMILIES.values():  # a plain diffusers model: by the class names the rows list
        if type(model).__name__ in family.denoiser_classes and family.matches(model.config):
            return family
    raise ValueError(f"a {type(model).__name__} belongs to no model family jedi-train supports ({supported()})")


def renamed(family: Family, **changes) -> Family:
    return dataclasses.replace(family, **changes)


_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
_T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64,
           "feed_forward_proj": "gated-gelu"}
_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
_VAE16 = {**_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}

register(Family(
    name="sd", title="Stable Diffusion 1.x/2.x", denoiser_folder="unet",
    denoiser_classes=("UNet2DConditionModel", "JointUNet2DConditionModel"),
    joint_class="jedi_train.models.joint_unet:JointUNet2DConditionModel",
    text_encoders=(("CLIPTextModel", "CLIPTokenizer"),), text_layout="sd", text_tokens=(("tokenizer", 77),),
    pipeline_class="jedi_train.pipelines.pipeline_jedi_sd:JeDiPipeline",
    lora_loader="diffusers.loaders:StableDiffusionLoraLoaderMixin",
    tiny_recipe="jedi_train.models.tiny:create_tiny_unet_dir",
    matches=lambda config: config.get("addition_embed_type") is None,
    dry_run_presets={"sd15": {
        "denoiser": {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        "text_encoders": [_CLIP_L], "vae": {**_VAE, "latent_channels": 4}}},
))
register(Family(
    name="sdxl", title="Stable Diffusion XL", denoiser_folder="unet",
    denoiser_classes=("UNet2DConditionModel", "JointUNet2DConditionModel"),
    joint_class="jedi_train.models.joint_unet:JointUNet2DConditionModel",
    text_encoders=(("CLIPTextModel", "CLIPTokenizer"), ("CLIPTextModelWithProjection", "CLIPTokenizer")), text_layout="sdxl",
    text_tokens=(("tokenizer", 77),),
    pipeline_class="jedi_train.pipelines.pipeline_jedi_sd:JeDiPipeline",
    lora_loader="diffusers.loaders:StableDiffusionXLLoraLoaderMixin",
    tiny_recipe="jedi_train.models.tiny:create_tiny_unet_dir",
    matches=lambda config: config.get("addition_embed_type") == "text_time",
    recognised_by="its UNet takes SDXL's pooled text embeddings and time ids",
))
register(Family(
    name="flux", title="FLUX.1", denoiser_folder="transformer",
    denoiser_classes=("FluxTransformer2DModel", "JointFluxTransformer2DModel"),
    joint_class="jedi_train.models.joint_flux:JointFluxTransformer2DModel",
    text_encoders=(("CLIPTextModel", "CLIPTokenizer"), ("T5EncoderModel", "AutoTokenizer")), text_layout="flux", text_tokens=(("tokenizer_2", 512),),
    pipeline_class="jedi_train.pipelines.pipeline_jedi_flux:JeDiFluxPipeline",
    lora_loader="diffusers.loaders:FluxLoraLoaderMixin",
    tiny_recipe="jedi_train.models.tiny:create_tiny_flux_dir",
    flow_matching=True, needs_vae=True, fixed_resolution=False,
    dry_run_presets={"flux_dev": {
        "denoiser": {"num_layers": 19, "num_single_layers": 38, "guidance_embeds": True},
        "text_encoders": [_CLIP_L, _T5_XXL], "vae": _VAE16}},
))
register(Family(
    name="sd3", title="Stable Diffusion 3", denoiser_folder="transformer",
    denoiser_classes=("SD3Transformer2DModel", "JointSD3Transformer2DModel"),
    joint_class="jedi_train.models.joint_sd3:JointSD3Transformer2DModel",
    text_encoders=(("CLIPTextModelWithProjection", "CLIPTokenizer"), ("CLIPTextModelWithProjection", "CLIPTokenizer"), ("T5EncoderModel", "AutoTokenizer")),
    text_layout="sd3", text_tokens=(("tokenizer", 77), ("tokenizer_3", 256)),
    pipeline_class="jedi_train.pipelines.pipeline_jedi_sd3:JeDiSD3Pipeline",
    lora_loader="diffusers.loaders:SD3LoraLoaderMixin",
    tiny_recipe="jedi_train.models.tiny:create_tiny_sd3_dir",
    flow_matching=True, needs_vae=True,
    dry_run_presets={"sd35_medium": {  # stabilityai/stable-diffusion-3.5-medium (MMDiT-X: 13 dual-attention blocks)
        "denoiser": {"num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64,
                     "caption_projection_dim": 1536, "joint_attention_dim": 4096, "pooled_projection_dim": 2048,
                     "pos_embed_max_size": 384, "qk_norm": "rms_norm", "sample_size": 128,
                     "dual_attention_layers": list(range(13))},
        "text_encoders": [{**_CLIP_L, "projection_dim": 768},
                          {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                           "num_attention_heads": 20, "projection_dim": 1280, "max_position_embeddings": 77,
                           "hidden_act": "gelu"},
                          _T5_XXL],
        "vae": _VAE16}},
))

# black-forest-labs/FLUX.2-klein-4B: transformer/config.json, text_encoder/config.json (Qwen3-4B), vae/config.json
_QWEN3_4B = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
             "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
             "rope_theta": 1000000, "tie_word_embeddings": True}
_VAE_FLUX2 = {**_VAE, "latent_channels": 32, "patch_size": [2, 2], "batch_norm_eps": 1e-4}
register(Family(
    name="flux2_klein", title="FLUX.2 Klein", denoiser_folder="transformer",
    denoiser_classes=("Flux2Transformer2DModel", "JointFlux2Transformer2DModel"),
    joint_class="jedi_train.models.joint_flux2:JointFlux2Transformer2DModel",
    text_encoders=(("Qwen3ForCausalLM", "Qwen2TokenizerFast"),), text_layout="qwen3", text_tokens=(("tokenizer", 512),),
    pipeline_class="jedi_train.pipelines.pipeline_jedi_flux2:JeDiFlux2KleinPipeline",
    lora_loader="diffusers.loaders:Flux2LoraLoaderMixin",
    tiny_recipe="jedi_train.models.tiny:create_tiny_flux2_klein_dir",
    flow_matching=True, needs_vae=True, fixed_resolution=False,
    vae_class="diffusers:AutoencoderKLFlux2", codec_class="jedi_train.models.joint_flux2:Flux2LatentCodec",
    matches=lambda config: not config.get("guidance_embeds", True),  # FLUX.2-dev (guidance-distilled): the flux2 row
    recognised_by="its Flux2Transformer2DModel has no guidance embedding and takes Qwen3 text (FLUX.2 Klein)",
    dry_run_presets={"flux2_klein_4b": {
        "denoiser": {"patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20,
                     "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
                     "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32],
                     "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False},
        "text_encoders": [_QWEN3_4B], "vae": _VAE_FLUX2},
        # diffusers' scripts/convert_flux2_to_diffusers.py "klein-9b" (the FLUX.2-klein-9B transformer config) and
        # Qwen/Qwen3-8B's config.json (Klein 9B's text encoder: 4096 wide, so 3 x 4096 = 12288 text features)
        "flux2_klein_9b": {
            "denoiser": {"patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 24,
                         "attention_head_dim": 128, "num_attention_heads": 32, "joint_attention_dim": 12288,
                         "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32],
                         "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False},
            "text_encoders": [{**_QWEN3_4B, "hidden_size": 4096, "intermediate_size": 12288,
                               "tie_word_embeddings": False}],
            "vae": _VAE_FLUX2}},
))

# black-forest-labs/FLUX.2-dev: transformer/config.json (diffusers' scripts/convert_flux2_to_diffusers.py "flux2-dev";
# guidance_embeds is absent there: diffusers' default, True) and text_encoder/config.json (Mistral-Small-3.2-24B:
# Mistral3ForConditionalGeneration, a Pixtral vision tower that the prompt embeddings never use).
_MISTRAL3_24B = {"text_config": {"model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120,
                                 "intermediate_size": 32768, "num_hidden_layers": 40, "num_attention_heads": 32,
                                 "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072,
                                 "rms_norm_eps": 1e-5, "rope_theta": 1e9},
                 "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096,
                                   "num_hidden_layers": 24, "num_attention_heads": 16, "head_dim": 64,
                                   "image_size": 1540, "patch_size": 14},
                 "spatial_merge_size": 2, "image_token_index": 10, "multimodal_projector_bias": False,
                 "tie_word_embeddings": False}  # (Mistral3Config defaults to tied; Mistral-Small keeps its lm_head)
register(Family(
    name="flux2", title="FLUX.2-dev", denoiser_folder="transformer",
    denoiser_classes=("Flux2Transformer2DModel", "JointFlux2Transformer2DModel"),
    joint_class="jedi_train.models.joint_flux2:JointFlux2Transformer2DModel",
    text_encoders=(("Mistral3ForConditionalGeneration", "AutoProcessor"),), text_layout="mistral3",
    text_tokens=(("tokenizer", 512),),
    pipeline_class="jedi_train.pipelines.pipeline_jedi_flux2:JeDiFlux2Pipeline",
    lora_loader="diffusers.loaders:Flux2LoraLoaderMixin",
    tiny_recipe="jedi_train.models.tiny:create_tiny_flux2_dir",
    flow_matching=True, needs_vae=True, fixed_resolution=False,
    vae_class="diffusers:AutoencoderKLFlux2", codec_class="jedi_train.models.joint_flux2:Flux2LatentCodec",
    matches=lambda config: bool(config.get("guidance_embeds", True)),  # guidance-distilled (diffusers' default)
    recognised_by="its Flux2Transformer2DModel has a guidance embedding (FLUX.2-dev, guidance-distilled)",
    dry_run_presets={"flux2_dev": {
        "denoiser": {"patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48,
                     "attention_head_dim": 128, "num_attention_heads": 48, "joint_attention_dim": 15360,
                     "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32],
                     "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True},
        "text_encoders": [_MISTRAL3_24B], "vae": _VAE_FLUX2}},
))

# Qwen/Qwen-Image: transformer/config.json, text_encoder/config.json (Qwen2.5-VL-7B-Instruct), vae/config.json
_QWEN2_5_VL_7B = {
    "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
                    "tie_word_embeddings": False},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
    "tie_word_embeddings": False}
register(Family(
    name="qwenimage", title="Qwen-Image", denoiser_folder="transformer",
    denoiser_classes=("QwenImageTransformer2DModel", "JointQwenImageTransformer2DModel"),
    joint_class="jedi_train.models.joint_qwenimage:JointQwenImageTransformer2DModel",
    text_encoders=(("Qwen2_5_VLForConditionalGeneration", "Qwen2TokenizerFast"),), text_layout="qwen2_5_vl",
    text_tokens=(("tokenizer", 512),),
    pipeline_class="jedi_train.pipelines.pipeline_jedi_qwenimage:JeDiQwenImagePipeline",
    lora_loader="diffusers.loaders:QwenImageLoraLoaderMixin",
    tiny_recipe="jedi_train.models.tiny:create_tiny_qwenimage_dir",
    flow_matching=True, needs_vae=True, fixed_resolution=False,
    vae_class="diffusers:AutoencoderKLQwenImage", codec_class="jedi_train.models.joint_qwenimage:QwenImageLatentCodec",
    # Edit-2511 (zero_cond_t), Layered (use_layer3d_rope) and additional-t variants condition differently: no row
    matches=lambda config: not any(config.get(k) for k in ("zero_cond_t", "use_layer3d_rope", "use_additional_t_cond",
                                                            "guidance_embeds")),
    recognised_by="its QwenImageTransformer2DModel is the text-to-image one and takes Qwen2.5-VL text (Qwen-Image)",
    dry_run_presets={"qwenimage_20b": {
        "denoiser": {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
                     "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
                     "axes_dims_rope": [16, 56, 56]},
        "text_encoders": [_QWEN2_5_VL_7B],
        "vae": {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                "temperal_downsample": [False, True, True], "dropout": 0.0}}},
))


def dry_run_preset(name: str) -> tuple[Family, dict] | None:
    for family in FAMILIES.values():
        if name in family.dry_run_presets:
            return family, family.dry_run_presets[name]
    return None


def all_presets() -> list[str]:
    return [name for family in FAMILIES.values() for name in family.dry_run_presets]
