"""`jedi-train ... dry_run=true`: size a job before queueing it. The model is built on the meta device (no
weights read, no memory used) from the model directory's configs, or, when the directory is absent, from the
architecture the model config names (`model.architecture`: the published SD 1.5 / FLUX.1-dev shapes), made
joint and given its LoRA exactly as training would; then per-rank bytes for the chosen strategy.

Bytes per rank (fp32 trained weights as Lightning's mixed precision keeps them, AdamW's two fp32 moments,
fp32 gradients, one fp32 EMA copy per rank): single / DDP hold all of it; ZeRO-2 shards gradients and
optimizer states over the ranks; ZeRO-3 also the trained weights (offload moves optimizer states to CPU).
Text encoders and VAE at `model.frozen_dtype`; a LoRA's frozen base at `model.lora.base_dtype` (its Linear /
Conv weights; the rest fp32); `model/optimizer=adamw8bit`: 2 bytes of state per trained parameter.
Activations are not estimated: they depend on the kernels and checkpointing; measure one step.
"""
from __future__ import annotations

import json
import os

import torch

# published configs (diffusers / transformers names), enough to build each part on the meta device
ARCHITECTURES = {
    "sd15": {
        "family": "sd",
        "denoiser": {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        "text_encoders": [("clip", {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                                    "num_hidden_layers": 12, "num_attention_heads": 12,
                                    "max_position_embeddings": 77, "hidden_act": "quick_gelu"})],
        "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4},
    },
    "flux_dev": {
        "family": "flux",
        "denoiser": {"num_layers": 19, "num_single_layers": 38, "guidance_embeds": True},
        "text_encoders": [("clip", {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                                    "num_hidden_layers": 12, "num_attention_heads": 12,
                                    "max_position_embeddings": 77, "hidden_act": "quick_gelu"}),
                          ("t5", {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "num_layers": 24,
                                  "num_heads": 64, "d_kv": 64, "feed_forward_proj": "gated-gelu"})],
        "vae": {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16,
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                "use_quant_conv": False, "use_post_quant_conv": False},
    },
}
DTYPE_BYTES = {None: 4, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def _read(model_dir: str, sub: str) -> dict | None:
    path = os.path.join(model_dir, sub, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _text_encoder(kind: str, config: dict):
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    if kind == "t5":
        return T5EncoderModel(T5Config(**config))
    cls = CLIPTextModelWithProjection if kind == "clip_projection" else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def _parts(model_cfg: dict) -> tuple[str, dict, list, dict | None]:
    """(family, denoiser config, [(kind, text encoder config)], vae config) from the directory or the preset."""
    from .model.components import model_family

    model_dir = model_cfg.get("model_dir") or ""
    if os.path.isdir(model_dir) and (_read(model_dir, "unet") or _read(model_dir, "transformer")):
        family = model_family(model_dir)
        denoiser = _read(model_dir, "transformer" if family == "flux" else "unet")
        kinds = {"CLIPTextModel": "clip", "CLIPTextModelWithProjection": "clip_projection", "T5EncoderModel": "t5"}
        encoders = []
        for sub in ("text_encoder", "text_encoder_2"):
            cfg = _read(model_dir, sub)
            if cfg is not None:
                encoders.append((kinds.get((cfg.get("architectures") or ["CLIPTextModel"])[0], "clip"), cfg))
        return family, denoiser, encoders, _read(model_dir, "vae")
    name = model_cfg.get("architecture")
    if name not in ARCHITECTURES:
        raise FileNotFoundError(f"dry run: model.model_dir {model_dir} holds no model and model.architecture="
                                f"{name!r} names no embedded one ({', '.join(ARCHITECTURES)}); point model.model_dir "
                                "at a model directory or set model.architecture")
    arch = ARCHITECTURES[name]
    return arch["family"], arch["denoiser"], arch["text_encoders"], arch["vae"]


def build_on_meta(model_cfg: dict):
    """(family, joint denoiser with LoRA if configured, frozen modules), all on the meta device."""
    from diffusers import AutoencoderKL

    from .model.joint import JeDiConfig
    from .model.joint_flux import JointFluxTransformer2DModel
    from .model.joint_unet import JointUNet2DConditionModel
    from .model.lora import LoraSettings, add_lora

    family, denoiser_cfg, encoders, vae_cfg = _parts(model_cfg)
    clean = {k: v for k, v in denoiser_cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        if family == "flux":
            denoiser = JointFluxTransformer2DModel.from_config(clean)
        else:
            denoiser = JointUNet2DConditionModel.from_config(clean)
        if denoiser_cfg.get("_jedi") is None:
            denoiser.make_joint(JeDiConfig.from_dict(model_cfg))
        lora = LoraSettings(**(model_cfg.get("lora") or {}))
        if lora.enabled:
            add_lora(denoiser, lora)
        frozen = [_text_encoder(kind, cfg) for kind, cfg in encoders]
        if vae_cfg is not None:
            frozen.append(AutoencoderKL.from_config({k: v for k, v in vae_cfg.items() if not k.startswith("_")}))
    return family, denoiser, frozen


def _world(cfg) -> int:
    devices = cfg.trainer.get("devices", 1)
    nodes = int(cfg.trainer.get("num_nodes", 1) or 1)
    per_node = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, list) else 8)
    return max(1, per_node) * nodes


def estimate(cfg) -> dict:
    """Parameter counts and bytes per rank for the composed training config `cfg`."""
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    family, denoiser, frozen = build_on_meta(model_cfg)
    trained = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    frozen_base = sum(p.numel() for p in denoiser.parameters() if not p.requires_grad)
    # model.lora.base_dtype stores the frozen Linear/Conv weights in fewer bytes (lora.store_base_in)
    base_dtype = (model_cfg.get("lora") or {}).get("base_dtype")
    stored = sum(m.weight.numel() for n, m in denoiser.named_modules() if "lora_" not in n
                 and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not m.weight.requires_grad) if base_dtype else 0
    base_bytes = 4 * (frozen_base - stored) + DTYPE_BYTES.get(base_dtype, 4) * stored
    frozen_parts = sum(p.numel() for m in frozen for p in m.parameters())
    strategy = cfg.get("strategy") or {}
    stage = int(strategy.get("stage", 0) or 0)
    world = _world(cfg)
    shard = world if stage >= 2 else 1
    ema = 4 * trained if (model_cfg.get("ema") or {}).get("enabled", True) else 0  # ZeRO-3: gathered, full copy
    frozen_bytes = DTYPE_BYTES.get(model_cfg.get("frozen_dtype"), 4)
    adam8 = "8bit" in str((model_cfg.get("optimizer") or {}).get("_target_", ""))  # bitsandbytes: 2 x 1 byte per parameter
    optimizer = (2 if adam8 else 8) * trained / shard
    per_rank = {"trained weights (fp32)": 4 * trained / (world if stage >= 3 else 1),
                "gradients (fp32)": 4 * trained / shard,
                f"AdamW states ({'8-bit' if adam8 else 'fp32'})": 0.0 if strategy.get("offload_optimizer") else optimizer,
                "EMA copy (fp32)": float(ema),
                f"frozen base of the denoiser ({base_dtype or 'float32'})": float(base_bytes),
                f"text encoders + VAE ({model_cfg.get('frozen_dtype') or 'float32'})": float(frozen_bytes * frozen_parts)}
    return {"family": family, "denoiser": type(denoiser).__name__, "trained": trained, "frozen_base": frozen_base,
            "frozen_parts": frozen_parts, "world": world, "stage": stage, "per_rank": per_rank,
            "total_per_rank": sum(per_rank.values()),
            "cpu_optimizer": optimizer if strategy.get("offload_optimizer") else 0.0}


def report(cfg) -> str:
    e = estimate(cfg)
    strategy = f"ZeRO-{e['stage']}" if e["stage"] else (cfg.strategy.get("_target_", "single").rsplit(".", 1)[-1]
                                                         if "_target_" in cfg.strategy else "single device")
    lines = [f"jedi-train dry run: {e['denoiser']} ({e['family']}), {strategy} over {e['world']} rank(s)",
             (f"  parameters: {e['trained'] / 1e6:,.1f} M trained, {e['frozen_base'] / 1e6:,.1f} M frozen in the "
             f"denoiser, {e['frozen_parts'] / 1e6:,.1f} M in text encoders + VAE"),
             "  memory per rank (weights and optimizer; activations not included: measure one step):"]
    lines += [f"    {name:<40} {value / 2**30:9.2f} GiB" for name, value in e["per_rank"].items()]
    lines.append(f"    {'total':<40} {e['total_per_rank'] / 2**30:9.2f} GiB")
    if e["cpu_optimizer"]:
        lines.append(f"    AdamW states offloaded to CPU: {e['cpu_optimizer'] / 2**30:.2f} GiB per rank")
    return "\n".join(lines)
