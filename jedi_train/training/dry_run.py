"""`jedi-train ... dry_run=true`: size a job before queueing it. The model is built on the meta device (no
weights read, no memory used) from the model directory's configs, or, when the directory is absent, from the
architecture the model config names (`model.architecture`: the published SD 1.5 / FLUX.1-dev / SD3.5-medium
shapes), made joint and given its LoRA exactly as training would; then per-rank bytes for the chosen strategy.

Bytes per rank (fp32 trained weights as Lightning's mixed precision keeps them, AdamW's two fp32 moments,
fp32 gradients, the fp32 EMA): single / DDP hold all of it; ZeRO-2 shards gradients and optimizer states over
the ranks; ZeRO-3 also the trained weights and the EMA (jedi_train/training/ema.py; offload moves optimizer states to CPU),
and so does FSDP2 (strategy=fsdp). Both shard the denoiser's frozen LoRA base as well (all its parameters).
Text encoders and VAE at `model.frozen_dtype` (the text encoders not at all with data.drop_text_encoders); a LoRA's frozen base at `model.lora.base_dtype` (its Linear /
Conv weights; the rest fp32); `model/optimizer=adamw8bit`: 2 bytes of state per trained parameter.

Activations: one training forward of the joint denoiser over a batch (data.batch_size sets of data.max_set
images, one reference each, at the training resolution) is traced on the meta device, and every tensor autograd
keeps for the backward is counted once (views share their storage; weights are not activations). In the
trainer's precision (bf16/fp16 when it says so); with model.gradient_checkpointing only the checkpointed blocks'
inputs (plus what lies outside them). What it leaves out: the backward's own transients (one block's recompute
under checkpointing, gradients in flight) and the kernels' workspaces -- measure one step before a long run.
"""
from __future__ import annotations

import json
import os

import torch

DTYPE_BYTES = {None: 4, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def _read(model_dir: str, sub: str) -> dict | None:
    path = os.path.join(model_dir, sub, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _parts(model_cfg: dict):
    """(family row, denoiser config, [text encoder config per slot], vae config) from the directory or the
    preset (the family table's dry_run_presets: the published shapes)."""
    from jedi_train.models import families

    model_dir = model_cfg.get("model_dir") or ""
    folders = {f.denoiser_folder for f in families.FAMILIES.values()}
    if os.path.isdir(model_dir) and any(_read(model_dir, f) for f in folders):
        family = families.family_of_dir(model_dir)
        encoders = [_read(model_dir, sub) for sub in family.encoder_folders]
        return family, _read(model_dir, family.denoiser_folder), encoders, _read(model_dir, "vae")
    name = model_cfg.get("architecture")
    found = families.dry_run_preset(name) if name else None
    if found is None:
        raise FileNotFoundError(f"dry run: model.model_dir {model_dir} holds no model and model.architecture="
                                f"{name!r} names no embedded one ({', '.join(families.all_presets())}); point "
                                "model.model_dir at a model directory or set model.architecture")
    family, arch = found
    return family, arch["denoiser"], arch["text_encoders"], arch["vae"]


def build_on_meta(model_cfg: dict):
    """(family row, joint denoiser with LoRA if configured, frozen modules), all on the meta device."""
    from jedi_train.models.joint import JeDiConfig
    from jedi_train.models.lora import LoraSettings, add_lora

    family, denoiser_cfg, encoders, vae_cfg = _parts(model_cfg)
    clean = {k: v for k, v in denoiser_cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        denoiser = family.joint().from_config(clean)
        if denoiser_cfg.get("_jedi") is None:
            denoiser.make_joint(JeDiConfig.from_dict(model_cfg))
        lora = LoraSettings(**(model_cfg.get("lora") or {}))
        if lora.enabled:
            add_lora(denoiser, lora)
        frozen = []
        for slot, cfg in enumerate(encoders):
            cls = family.text_encoder_class(slot)
            frozen.append(cls(cls.config_class(**{k: v for k, v in cfg.items() if not k.startswith("_")})))
        if vae_cfg is not None:
            frozen.append(family.vae().from_config({k: v for k, v in vae_cfg.items() if not k.startswith("_")}))
    return family, denoiser, frozen


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient, as CUDA and CPU pick) keeps for the backward:
    q, k, v, the output and the log-sum-exp. The meta device would take the math path instead, which keeps
    the whole attention matrix (quadratic in the set's tokens): not what a GPU run holds."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace only counts
        raise NotImplementedError


def _fused_sdpa(query, key, value, *args, **kwargs):
    return _FusedAttention.apply(query, key, value)


def _count_saved(params: set[int]):
    """(hooks, counter): saved_tensors_hooks that count each storage autograd keeps once, and the running total."""
    seen: set[int] = set()
    total = [0]

    def add(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage._cdata not in seen and storage._cdata not in params:
            seen.add(storage._cdata)
            total[0] += storage.nbytes()

    def pack(t):
        add(t)
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), add, total


def activation_bytes(denoiser, sets: int, set_size: int, resolution: int, downsample: int,
                     text_len: int, dtype=torch.float32, gradient_checkpointing: bool = False) -> int:
    """Bytes autograd keeps for the backward of one training forward (see the module doc). Works on a model
    on any device; on the meta device nothing is allocated."""
    from jedi_train.models.attention import SetLayout

    device = next(denoiser.parameters()).device
    is_ref = torch.zeros(sets, set_size, dtype=torch.bool)  # the layout lives on the CPU, as a batch's would
    is_ref[:, 0] = set_size > 1
    layout = SetLayout.build(is_ref)
    sample, t, text = denoiser.dummy_inputs(sets * set_size, resolution // downsample, text_len, dtype, device)
    params = {p.untyped_storage()._cdata for p in denoiser.parameters()}
    hooks, add, total = _count_saved(params)
    if gradient_checkpointing:  # torch's checkpoint, counting what each checkpointed block keeps: its inputs
        def counting(module, *args):
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    add(a)
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

        denoiser.enable_gradient_checkpointing(counting)
    was_training = denoiser.training
    denoiser.train()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if device.type == "meta":
        torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.enable_grad(), hooks:
            out = denoiser.denoise(sample, t, text, layout)
            add(out)  # the output lives until the loss is taken
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        denoiser.train(was_training)
        if gradient_checkpointing:
            denoiser.disable_gradient_checkpointing()
    return total[0]


def _max_length(model_dir: str, sub: str, default: int) -> int:
    path = os.path.join(model_dir, sub, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            length = json.load(f).get("model_max_length")
        if isinstance(length, int) and 0 < length < 10**5:
            return length
    return default


def _text_len(model_cfg: dict, family) -> int:
    """Tokens per caption the denoiser sees: the family's tokenizers' model_max_length (table: text_tokens)."""
    model_dir = model_cfg.get("model_dir") or ""
    return sum(_max_length(model_dir, sub, default) for sub, default in family.text_tokens)


def vae_downsample(frozen, family=None) -> int | None:
    """The VAE's downsampling as the family's codec sees it (FLUX.2: the VAE's x its 2x2 patchify)."""
    vae = next((m for m in frozen if type(m).__name__.startswith("AutoencoderKL")), None)
    if vae is None:
        return None
    return family.codec()(vae).downsample if family is not None else 2 ** (len(vae.config.block_out_channels) - 1)


def _activations(cfg, model_cfg: dict, family, denoiser, downsample: int | None) -> tuple[int, dict]:
    """(bytes, the batch it is for) of one training forward at the run's batch, set size, resolution, precision."""
    data = cfg.get("data") or {}
    sets, set_size = int(data.get("batch_size", 1) or 1), int(data.get("max_set", 2) or 2)
    downsample = downsample or (denoiser.jedi.pixel_fold or 1)
    if family.fixed_resolution:
        resolution = int(model_cfg.get("resolution") or denoiser.config.sample_size * downsample)
    else:
        resolution = int(model_cfg.get("resolution") or denoiser.jedi.resolution or 1024)
    precision = str((cfg.get("trainer") or {}).get("precision", "32"))
    dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
    checkpointing = bool(model_cfg.get("gradient_checkpointing"))
    # torch.nn.Module.to: diffusers' own .to() warns about fp32-only modules, which a meta trace does not have
    n = activation_bytes(torch.nn.Module.to(denoiser, dtype), sets, set_size, resolution, downsample,
                         _text_len(model_cfg, family), dtype, checkpointing)
    return n, {"sets": sets, "set_size": set_size, "resolution": resolution, "dtype": str(dtype).split(".")[-1],
               "gradient_checkpointing": checkpointing}


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
    # data.drop_text_encoders: every source cached (jedi-data encode), the text encoders are freed before training
    dropped = bool((cfg.get("data") or {}).get("drop_text_encoders"))
    held = [m for m in frozen if type(m).__name__.startswith("AutoencoderKL") or not dropped]
    # model.text_encoder_quantization: the text encoders' Linear weights at 1 byte (torchao weight-only)
    quantized = sum(m.weight.numel() for enc in held if not type(enc).__name__.startswith("AutoencoderKL")
                    for m in enc.modules() if isinstance(m, torch.nn.Linear)) if model_cfg.get("text_encoder_quantization") else 0
    strategy = cfg.get("strategy") or {}
    stage = int(strategy.get("stage", 0) or 0)
    fsdp = str(strategy.get("_target_", "")).endswith("FSDP2Strategy")  # shards as ZeRO-3 does
    world = _world(cfg)
    shard = world if stage >= 2 or fsdp else 1
    param_shard = world if stage >= 3 or fsdp else 1  # ZeRO-3 / FSDP: the weights (frozen too) and the EMA too
    ema = 4 * trained if (model_cfg.get("ema") or {}).get("enabled", True) else 0
    frozen_bytes = DTYPE_BYTES.get(model_cfg.get("frozen_dtype"), 4)
    adam8 = "8bit" in str((model_cfg.get("optimizer") or {}).get("_target_", ""))  # bitsandbytes: 2 x 1 byte per parameter
    optimizer = (2 if adam8 else 8) * trained / shard
    per_rank = {"trained weights (fp32)": 4 * trained / param_shard,
                "gradients (fp32)": 4 * trained / shard,
                f"AdamW states ({'8-bit' if adam8 else 'fp32'})": 0.0 if strategy.get("offload_optimizer") else optimizer,
                "EMA copy (fp32)": ema / param_shard,
                f"frozen base of the denoiser ({base_dtype or 'float32'})": base_bytes / param_shard,
                f"{'VAE (text encoders dropped' if dropped else 'text encoders + VAE ('}"
                f"{', ' if dropped else ''}{model_cfg.get('frozen_dtype') or 'float32'}"
                f"{', 8-bit Linear' if quantized else ''})":
                    float(frozen_bytes * (sum(p.numel() for m in held for p in m.parameters()) - quantized)
                          + quantized)}
    activations, batch = _activations(cfg, model_cfg, family, denoiser, vae_downsample(frozen, family))
    per_rank["activations (estimate)"] = float(activations)
    return {"family": family.name, "denoiser": type(denoiser).__name__, "trained": trained, "frozen_base": frozen_base,
            "activations": activations, "batch": batch,
            "frozen_parts": frozen_parts, "world": world, "stage": stage, "fsdp": fsdp, "per_rank": per_rank,
            "total_per_rank": sum(per_rank.values()),
            "cpu_optimizer": optimizer if strategy.get("offload_optimizer") else 0.0}


def report(cfg) -> str:
    e = estimate(cfg)
    strategy = "FSDP2" if e["fsdp"] else f"ZeRO-{e['stage']}" if e["stage"] else (cfg.strategy.get("_target_", "single").rsplit(".", 1)[-1]
                                                         if "_target_" in cfg.strategy else
                                                         "single device" if e["world"] == 1 else
                                                         "Lightning's auto strategy (DDP)")
    lines = [f"jedi-train dry run: {e['denoiser']} ({e['family']}), {strategy} over {e['world']} rank(s)",
             (f"  parameters: {e['trained'] / 1e6:,.1f} M trained, {e['frozen_base'] / 1e6:,.1f} M frozen in the "
             f"denoiser, {e['frozen_parts'] / 1e6:,.1f} M in text encoders + VAE"),
             "  memory per rank:"]
    lines += [f"    {name:<40} {value / 2**30:9.2f} GiB" for name, value in e["per_rank"].items()]
    lines.append(f"    {'total':<40} {e['total_per_rank'] / 2**30:9.2f} GiB")
    b = e["batch"]
    lines.append(f"    (activations: {b['sets']} sets x {b['set_size']} images at {b['resolution']} px, {b['dtype']}"
                 f"{', gradient checkpointing' if b['gradient_checkpointing'] else ''}; what autograd keeps for the "
                 "backward, traced on the meta device: measure one step before a long run)")
    if e["cpu_optimizer"]:
        lines.append(f"    AdamW states offloaded to CPU: {e['cpu_optimizer'] / 2**30:.2f} GiB per rank")
    ema = e["per_rank"]["EMA copy (fp32)"]
    if ema > 0.3 * e["total_per_rank"]:  # e.g. a full fine-tune on one device or DDP: a whole fp32 copy per rank
        lines.append(f"  note: the EMA copy is {ema / 2**30:.1f} GiB of the {e['total_per_rank'] / 2**30:.1f} GiB per rank; "
                     "model.ema.enabled=false drops it (strategy=deepspeed_zero3 or strategy=fsdp shard it over the ranks)")
    return "\n".join(lines)
