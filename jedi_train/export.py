"""Checkpoint -> diffusers pipeline directory (JeDiPipeline), written to a temp dir and renamed.

Accepts a Lightning checkpoint file or a DeepSpeed ZeRO checkpoint directory (consolidated with
Lightning's converter). EMA weights are exported unless use_ema=False. The frozen components come
from the model directory the run trained from (or --model-dir when it moved). Checkpoints are read
with weights_only=True (checkpoints.safe_load); an existing output directory is replaced only when
asked to and only if it is a previous export.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile

import torch
from diffusers import DDIMScheduler
from diffusers.training_utils import EMAModel

from data_pipelines.errors import missing

from .bundle import MODULES as BUNDLE_MODULES
from .checkpoints import DEEPSPEED_GLOBALS, PARTIAL, deepspeed_files, publish, remove_partials, safe_load
from .model.components import Components, check_model_dir, denoiser_family, load_components, load_denoiser
from .model.lora import (
    LoraSettings,
    add_lora,
    base_fingerprint,
    fuse_lora,
    has_lora,
    lora_layers,
    trained_names,
    trained_parameters,
)
from .model_card import find_run_dir, write_model_card

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name: load_lora_weights(DIR) finds it


def build_pipeline(components: Components, unet=None):
    from .pipeline import JeDiFluxPipeline, JeDiPipeline

    c = components
    if c.family == "flux":  # the flow-matching scheduler as the base model ships it
        return JeDiFluxPipeline(transformer=unet or c.unet, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                                scheduler=copy.deepcopy(c.noise_scheduler), vae=c.vae)
    # same betas / prediction type; "trailing" spacing so that sampling starts at t = 999, not 960 ("leading")
    scheduler = DDIMScheduler.from_config(c.noise_scheduler.config, timestep_spacing="trailing")
    return JeDiPipeline(unet=unet or c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                        scheduler=scheduler, text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2)


def publish_dir(tmp: str, out_dir: str) -> None:
    """Rename a finished temp dir to out_dir; an existing out_dir is replaced only now, when the new one
    is complete (readers see the old or the new directory, never a half-written one)."""
    publish(tmp, out_dir)


@contextlib.contextmanager
def staged_dir(out_dir: str):
    """A temp dir beside out_dir (same filesystem), published as out_dir when the block ends without error.
    Temp dirs of killed exports into the same place are removed first."""
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    remove_partials(parent, name=name, only_dead=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}{PARTIAL}{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the published dir should not be
    try:
        yield tmp
        publish_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    ours |= {"README.md", "samples.png", *(f"{name}.py" for name in BUNDLE_MODULES)}  # card, bundle.py
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
        if card is not None:
            write_model_card(tmp, pipe, **card)
    return out_dir


def _joint_settings(hp: dict) -> dict:
    """The joint denoiser's settings as a run's hyper-parameters recorded them."""
    return {"conditioning": hp.get("conditioning", "channels"), "reference_timestep": hp.get("reference_timestep", "zero"),
            "reference_attention": hp.get("reference_attention", "set"), "resolution": hp.get("resolution"),
            "reference_positions": hp.get("reference_positions", "same")}


def components_from_hparams(hp: dict, model_dir: str) -> Components:
    """The model as a run's hyper-parameters load it, in full precision."""
    return load_components(model_dir, prediction_type=hp.get("prediction_type"),
                           noise_schedule=hp.get("noise_schedule"), **_joint_settings(hp))


def export_module(module, out_dir: str, use_ema: bool = True, overwrite: bool = True) -> str:
    """From a live JeDiModule (end of training; replaces the run's previous export on resume)."""
    if module.lora.enabled and module.lora.base_dtype:  # fuse into the full-precision base, not the stored one
        hp = dict(module.hparams)
        unet = load_denoiser(hp["model_dir"], **_joint_settings(hp))  # the rest is the module's own
        add_lora(unet, module.lora)
        unet.load_state_dict({n: p.detach().cpu().float() for n, p in module.unet.named_parameters()
                              if p.requires_grad}, strict=False)
    else:
        unet = copy.deepcopy(module.unet).to("cpu", torch.float32)
    if use_ema and module.ema is not None:
        ema = copy.deepcopy(module.ema)
        ema.to("cpu")
        ema.copy_to(trained_parameters(unet))
    if has_lora(unet):
        fuse_lora(unet)
    components = copy.copy(module.components)
    card = {"hparams": dict(module.hparams), "step": module.global_step, "run_dir": find_run_dir(out_dir)}
    return save_pipeline_atomically(build_pipeline(components, unet), out_dir, overwrite, card)


def load_checkpoint(path: str) -> dict:
    if os.path.isdir(path):  # DeepSpeed ZeRO checkpoint directory: consolidate shards to one fp32 state
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        # the converter unpickles the shards with weights_only=False: first prove that each one loads safely
        for shard in deepspeed_files(path):
            safe_load(shard, mmap=True, extra_globals=DEEPSPEED_GLOBALS)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "consolidated.ckpt")
            convert_zero_checkpoint_to_fp32_state_dict(path, out)
            return safe_load(out, extra_globals=DEEPSPEED_GLOBALS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} {missing(path)}; give a .ckpt file or a DeepSpeed checkpoint dir")
    return safe_load(path)


def unet_state_from_checkpoint(ckpt: dict) -> dict:
    state = ckpt.get("state_dict") or ckpt.get("module") or {}
    unet = {k.split("unet.", 1)[1]: v for k, v in state.items() if k.startswith(("unet.", "_forward_module.unet."))}
    if not unet:
        raise ValueError("checkpoint holds no UNet weights (no 'unet.*' keys); is it a jedi-train checkpoint?")
    return unet


def load_unet_weights(unet, state: dict, source: str) -> None:
    own = unet.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    if bad or missing:
        example = (bad or missing)[0]
        raise ValueError(f"{source} is from another model ({len(bad)} unexpected/mismatched and {len(missing)} "
                         f"missing weights, e.g. {example!r}); use the model config it was trained with")
    unet.load_state_dict(state)


def check_family(ckpt: dict, family: str, source: str) -> None:
    """A checkpoint trained on one backbone family is refused, in one line, against another family's model."""
    from .model.components import FAMILIES

    trained = ckpt.get("family")
    if trained and trained != family:
        raise ValueError(f"{source} is a {FAMILIES.get(trained, trained)} checkpoint but the model directory holds a "
                         f"{FAMILIES[family]} model; point model.model_dir (or --model-dir) at the base "
                         "model it was trained from")


def check_lora_checkpoint(ckpt: dict, fingerprint: str, names: list[str], source: str) -> None:
    """A LoRA checkpoint holds the trained weights only: it needs the base it was trained on and all of them."""
    if ckpt.get("lora_base") and ckpt["lora_base"] != fingerprint:
        raise ValueError(f"{source} holds a LoRA trained on another base model (base fingerprint "
                         f"{ckpt['lora_base']}, this one {fingerprint}); point model.model_dir (or --model-dir) at "
                         "the base model it was trained from")
    state = unet_state_from_checkpoint(ckpt)
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} of the {len(names)} LoRA-trained weights (e.g. "
                         f"{missing[0]!r}); use the model.lora settings it was trained with")


def copy_ema(unet, ckpt: dict) -> None:
    """The checkpoint's EMA weights into the UNet: the EMA follows ckpt['trained_names'] (all weights in
    checkpoints written before that key existed)."""
    params = dict(unet.named_parameters())
    names = ckpt.get("trained_names") or list(params)
    ema = EMAModel([params[n] for n in names])
    ema.load_state_dict(ckpt["ema"])
    if len(ema.shadow_params) != len(names):
        raise ValueError(f"the checkpoint's EMA holds {len(ema.shadow_params)} tensors for {len(names)} trained "
                         "weights; export with --no-ema")
    ema.copy_to([params[n] for n in names])


def check_lora_target(out_dir: str, overwrite: bool) -> None:
    if not os.path.lexists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        return
    entries = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    if entries != {LORA_WEIGHTS}:
        raise ValueError(f"{out_dir} exists and is not a previous --lora-only export; give a new or empty directory")
    if not overwrite:
        raise ValueError(f"{out_dir} holds a previous LoRA export; pass --overwrite to replace it")


def save_lora_atomically(unet, out_dir: str) -> str:
    """The adapter alone in diffusers' format (pipe.load_lora_weights(out_dir) on a JeDiPipeline of the base)."""
    from .pipeline import JeDiFluxPipeline, JeDiPipeline

    out_dir = os.path.realpath(out_dir)
    state, metadata = lora_layers(unet.to("cpu", torch.float32))
    pipeline = JeDiFluxPipeline if denoiser_family(unet) == "flux" else JeDiPipeline
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
    unet, lora = components.unet, LoraSettings(**(hp.get("lora") or {}))
    if lora.enabled:
        add_lora(unet, lora)
        check_lora_checkpoint(ckpt, base_fingerprint(unet), trained_names(unet), ckpt_path)
        unet.load_state_dict(unet_state_from_checkpoint(ckpt), strict=False)
    elif lora_only:
        raise ValueError(f"{ckpt_path} was trained without LoRA (model.lora.rank 0); --lora-only needs a LoRA run "
                         "(export the whole pipeline without --lora-only)")
    else:
        load_unet_weights(unet, unet_state_from_checkpoint(ckpt), ckpt_path)
    if use_ema and ckpt.get("ema"):
        copy_ema(unet, ckpt)
    if lora_only:
        return save_lora_atomically(unet, out_dir)
    if lora.enabled:
        fuse_lora(unet)
    card = {"hparams": hp, "step": ckpt.get("global_step"), "run_dir": find_run_dir(ckpt_path)}
    return save_pipeline_atomically(build_pipeline(components), out_dir, overwrite, card)
