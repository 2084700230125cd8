"""Checkpoint (or the live module at the end of training) -> diffusers pipeline directory, staged and renamed.

Accepts a Lightning checkpoint file or a DeepSpeed ZeRO checkpoint directory (read by checkpoints.py);
the pipeline is built by `JeDiPipeline.from_components`. EMA weights are exported unless use_ema=False. The frozen components come
from the model directory the run trained from (or --model-dir when it moved). Checkpoints are read
with weights_only=True (checkpoints.safe_load); an existing output directory is replaced only when
asked to and only if it is a previous export.
"""
from __future__ import annotations

import copy
import json
import os

import torch

from jedi_common.atomic import staged_dir
from jedi_train.export.model_card import find_run_dir, write_model_card
from jedi_train.models import families
from jedi_train.models.components import (
    Components,
    check_model_dir,
    load_components,
    load_denoiser,
    load_text_parts,
)
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.lora import (
    LoraSettings,
    add_lora,
    base_fingerprint,
    fuse_lora,
    has_lora,
    lora_layers,
    trained_names,
    trained_parameters,
)
from jedi_train.pipelines.bundle import is_bundle_file
from jedi_train.pipelines.pipeline_jedi import JeDiBasePipeline
from jedi_train.training.checkpoints import (
    check_family,
    check_lora_checkpoint,
    copy_ema,
    denoiser_state_from_checkpoint,
    load_checkpoint,
    load_denoiser_weights,
)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name: load_lora_weights(DIR) finds it


def check_export_target(out_dir: str, overwrite: bool = False) -> None:
    """An export never deletes what it did not write: a non-empty out_dir is replaced only with
    overwrite=True and only if it holds nothing but a previous export (model_index.json + its components)."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a directory; give a new output directory")
    entries = set(os.listdir(out_dir))
    if not entries:
        return
    index = os.path.join(out_dir, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{out_dir} is not empty and is not a previous export (no model_index.json); "
                         "give a new or empty output directory")
    if not overwrite:
        raise ValueError(f"{out_dir} holds a previous export; pass --overwrite to replace it, or give a new directory")
    try:
        with open(index) as f:
            ours = {"model_index.json", *(k for k in json.load(f) if not k.startswith("_"))}
    except (OSError, ValueError, AttributeError):
        ours = {"model_index.json"}
    ours |= {"README.md", "samples.png", "sampling.json", *filter(is_bundle_file, entries)}  # card, bundle.py
    other = sorted(entries - ours)
    if other:
        raise ValueError(f"{out_dir} holds a previous export and other files ({', '.join(other[:3])}); "
                         "move them out or give a new directory (--overwrite replaces only an export)")


def save_pipeline_atomically(pipe, out_dir: str, overwrite: bool = False, card: dict | None = None) -> str:
    """card: {hparams, step, run_dir} of the training run, for the model card (README.md)."""
    out_dir = os.path.realpath(out_dir)  # a symlinked out_dir: replace its target, not the link
    check_export_target(out_dir, overwrite)
    with staged_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        scrub_local_paths(tmp)
        if card is not None:
            write_model_card(tmp, pipe, **card)
    return out_dir


def scrub_local_paths(export_dir: str) -> None:
    """The configs diffusers / transformers save record where the weights were loaded from (`_name_or_path`):
    an absolute local path (a home dir, a cluster path) must not travel with an export or reach the Hub, so it
    becomes its last two parts (model_card.public_path); Hub ids stay."""
    from jedi_common.atomic import atomic_write_text
    from jedi_train.export.model_card import public_path

    for folder, _, files in os.walk(export_dir):
        for name in files:
            if not name.endswith(".json"):
                continue
            path = os.path.join(folder, name)
            try:
                with open(path) as f:
                    config = json.load(f)
            except (OSError, ValueError):
                continue
            if not isinstance(config, dict):
                continue
            changed = {k: public_path(v, None) for k in ("_name_or_path", "name_or_path")
                       if isinstance(v := config.get(k), str) and os.path.isabs(v)}
            if changed:
                atomic_write_text(path, json.dumps({**config, **changed}, indent=2, sort_keys=True) + "\n")


def components_from_hparams(hp: dict, model_dir: str) -> Components:
    """The model as a run's hyper-parameters load it, in full precision."""
    return load_components(model_dir, JeDiConfig.from_dict(hp), prediction_type=hp.get("prediction_type"),
                           noise_schedule=hp.get("noise_schedule"))


def export_module(module, out_dir: str, use_ema: bool = True, overwrite: bool = True) -> str:
    """From a live JeDiModule (end of training; replaces the run's previous export on resume)."""
    if module.lora.enabled and module.lora.base_dtype:  # fuse into the full-precision base, not the stored one
        hp = dict(module.hparams)
        denoiser = load_denoiser(hp["model_dir"], module.jedi)  # the rest is the module's own
        add_lora(denoiser, module.lora)
        denoiser.load_state_dict({n: p.detach().cpu().float() for n, p in module.denoiser.named_parameters()
                              if p.requires_grad}, strict=False)
    else:
        denoiser = copy.deepcopy(module.denoiser).to("cpu", torch.float32)
    if use_ema and module.ema is not None:
        ema = copy.deepcopy(module.ema)
        ema.to("cpu")
        ema.copy_to(trained_parameters(denoiser))
    if has_lora(denoiser):
        fuse_lora(denoiser)
    components = copy.copy(module.components)
    if module.hparams.get("text_encoder_quantization"):  # the export ships the text encoders as released
        for name, part in load_text_parts(module.hparams["model_dir"], components.family).items():
            setattr(components, name, part)
    card = {"hparams": dict(module.hparams), "step": module.global_step, "run_dir": find_run_dir(out_dir)}
    return save_pipeline_atomically(JeDiBasePipeline.from_components(components, denoiser), out_dir, overwrite, card)


def check_lora_target(out_dir: str, overwrite: bool) -> None:
    if not os.path.lexists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        return
    entries = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    if entries != {LORA_WEIGHTS}:
        raise ValueError(f"{out_dir} exists and is not a previous --lora-only export; give a new or empty directory")
    if not overwrite:
        raise ValueError(f"{out_dir} holds a previous LoRA export; pass --overwrite to replace it")


def save_lora_atomically(denoiser, out_dir: str) -> str:
    """The adapter alone in diffusers' format (pipe.load_lora_weights(out_dir) on a JeDiPipeline of the base)."""
    out_dir = os.path.realpath(out_dir)
    state, metadata = lora_layers(denoiser.to("cpu", torch.float32))
    pipeline = families.family_of(denoiser).pipeline()
    with staged_dir(out_dir) as tmp:
        pipeline.save_lora_weights(tmp, unet_lora_layers=state, unet_lora_adapter_metadata=metadata,
                                       weight_name=LORA_WEIGHTS)
    return out_dir


def export_checkpoint(ckpt_path: str, out_dir: str, use_ema: bool = True, model_dir: str | None = None,
                      overwrite: bool = False, lora_only: bool = False) -> str:
    """lora_only: write the LoRA adapter alone (pytorch_lora_weights.safetensors); else the whole pipeline,
    with a LoRA fused into the UNet."""
    # before the slow part
    (check_lora_target if lora_only else check_export_target)(os.path.realpath(out_dir), overwrite)
    ckpt = load_checkpoint(ckpt_path)
    hp = ckpt.get("hyper_parameters", {})
    model_dir = model_dir or hp.get("model_dir")
    if not model_dir:
        raise ValueError(f"{ckpt_path} records no model_dir; pass --model-dir with the base model directory")
    check_family(ckpt, check_model_dir(model_dir), ckpt_path)  # before loading: the settings differ by family
    components = components_from_hparams(hp, model_dir)
    denoiser, lora = components.denoiser, LoraSettings(**(hp.get("lora") or {}))
    if lora.enabled:
        add_lora(denoiser, lora)
        check_lora_checkpoint(ckpt, base_fingerprint(denoiser), trained_names(denoiser), ckpt_path)
        denoiser.load_state_dict(denoiser_state_from_checkpoint(ckpt), strict=False)
    elif lora_only:
        raise ValueError(f"{ckpt_path} was trained without LoRA (model.lora.rank 0); --lora-only needs a LoRA run "
                         "(export the whole pipeline without --lora-only)")
    else:
        load_denoiser_weights(denoiser, denoiser_state_from_checkpoint(ckpt), ckpt_path)
    if use_ema and ckpt.get("ema"):
        copy_ema(denoiser, ckpt)
    if lora_only:
        return save_lora_atomically(denoiser, out_dir)
    if lora.enabled:
        fuse_lora(denoiser)
    card = {"hparams": hp, "step": ckpt.get("global_step"), "run_dir": find_run_dir(ckpt_path)}
    return save_pipeline_atomically(JeDiBasePipeline.from_components(components), out_dir, overwrite, card)
