"""LightningModule: the joint denoiser + objective, AdamW + diffusers LR schedule, EMA, NaN guard.

The model itself (jedi_train/model) knows nothing of Lightning; this file only wires it to a
Trainer: which parameters train, how the optimizer steps, what goes into a checkpoint.
"""
from __future__ import annotations

import hashlib
import time

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.utilities import rank_zero_info

from jedi_train.models.components import Components, load_components
from jedi_train.models.joint import JeDiConfig
from jedi_train.models.lora import (
    LoraSettings,
    add_lora,
    base_fingerprint,
    store_base_in,
    trained_names,
    trained_parameters,
)
from jedi_train.models.objective import JeDiObjective, ObjectiveConfig
from jedi_train.models.quantize import check_quantization, quantize_text_encoders
from jedi_train.models.tiny import create_tiny_model_dir_if_missing
from jedi_train.training.checkpoints import (
    check_denoiser_weights,
    check_family,
    check_lora_checkpoint,
    denoiser_state_from_checkpoint,
    old_denoiser_key,
)
from jedi_train.training.ema import TrainingEMA

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4, "betas": (0.9, 0.999),
                     "weight_decay": 1e-2, "eps": 1e-8, "foreach": True}
DEFAULT_LR_SCHEDULER = {"_target_": "diffusers.optimization.get_scheduler", "_partial_": True,
                        "name": "constant_with_warmup", "num_warmup_steps": 0}


def build_partial(key: str, default: dict, cfg: dict | None, renamed: dict[str, str] | None = None):
    """`cfg` over `default` (a config without _target_ only changes kwargs), instantiated as a partial.
    `renamed`: keys of the settings before the `_partial_` configs -> what replaces them (refused)."""
    cfg = dict(cfg or {})
    for old, new in (renamed or {}).items():
        if old in cfg:
            raise ValueError(f"{key}.{old} is gone: {new}")
    merged = (default if "_target_" not in cfg else {}) | cfg
    merged["_partial_"] = True
    try:
        return hydra.utils.instantiate(merged, _convert_="all")
    except InstantiationException as e:  # Hydra wraps a bad _target_ in a page of context
        raise ValueError(f"{key}._target_={merged.get('_target_')!r} could not be built "
                         f"({str(e).splitlines()[0]}); use a class path such as torch.optim.AdamW") from None


def adamw_8bit(params, **kwargs):
    """bitsandbytes' AdamW8bit (an optional extra: pip install 'jedi-train[adam8bit]'; CUDA only)."""
    params = list(params)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("model/optimizer=adamw8bit needs bitsandbytes: pip install 'jedi-train[adam8bit]' (or use "
                         "model/optimizer=adamw)") from None
    device = params[0].device if params else torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"model/optimizer=adamw8bit runs on CUDA GPUs only, this run is on {device.type}; use "
                         "model/optimizer=adamw here (trainer=gpu for 8-bit AdamW)")
    return bnb.optim.AdamW8bit(params, **kwargs)


def _rename_old_denoiser_keys(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "unet.")]:
        state_dict[prefix + old_denoiser_key(key[len(prefix):])] = state_dict.pop(key)


class JeDiModule(L.LightningModule):
    def __init__(self, model_dir: str, conditioning: str = "channels", reference_timestep: str = "zero",
                 prediction_type: str | None = "v_prediction", create_tiny_if_missing: dict | None = None,
                 objective: dict | None = None, optimizer: dict | None = None, lr_scheduler: dict | None = None,
                 ema: dict | None = None, gradient_checkpointing: bool = False, trainable: list[str] | None = None,
                 max_nonfinite_steps: int = 10, seed: int = 0, frozen_dtype: str | None = None,
                 resolution: int | None = None, reference_attention: str = "set",
                 noise_schedule: dict | None = None, lora: dict | None = None, reference_positions: str = "same",
                 architecture: str | None = None,  # architecture: only read by dry_run.py
                 text_encoder_quantization: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        if create_tiny_if_missing is not None and create_tiny_model_dir_if_missing(model_dir, create_tiny_if_missing):
            rank_zero_info(f"model.model_dir {model_dir} held no model: created the embedded tiny random-init model "
                           "there (model.create_tiny_if_missing); set model.model_dir to a diffusers model directory "
                           "to train a real one")
        dtype = getattr(torch, frozen_dtype) if frozen_dtype else None
        check_quantization(text_encoder_quantization)  # unknown mode / no torchao: now, not after loading
        # JeDi's settings, set once here from the flat model config and passed whole
        self.jedi = JeDiConfig(conditioning=conditioning, reference_timestep=reference_timestep,
                               reference_attention=reference_attention, resolution=resolution,
                               reference_positions=reference_positions)
        self.components: Components = load_components(model_dir, self.jedi, prediction_type, dtype=dtype,
                                                      noise_schedule=noise_schedule)
        # the joint denoiser (UNet, or FLUX's transformer) is the only trained module: what state_dict / ZeRO see
        self.denoiser = self.components.denoiser
        # checkpoints written before the attribute was renamed hold unet.* keys (Lightning and DeepSpeed loads)
        self.register_load_state_dict_pre_hook(_rename_old_denoiser_keys)
        native = self.components.resolution
        if resolution is not None and resolution != native:
            raise ValueError(f"model.resolution={resolution} but the model in {model_dir} works at {native} px "
                             f"(sample_size {self.denoiser.config.get('sample_size')} x "
                             f"{self.components.codec.downsample}); set model.resolution={native}")
        self.resolution = native
        # frozen parts live outside the module tree: not in the optimizer, checkpoints or ZeRO-3 partitions
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.lora = LoraSettings(**(lora or {}))
        if self.lora.enabled and trainable:
            raise ValueError("model.trainable and model.lora are exclusive; with LoRA name fully trained modules "
                             "in model.lora.train_fully")
        if self.lora.enabled:  # base frozen; adapter + joint-specific input weights train
            add_lora(self.denoiser, self.lora, seed)
            self.lora_base = base_fingerprint(self.denoiser)  # of the base as loaded, before any low-precision storage
            self.strict_loading = False  # LoRA checkpoints hold the trained weights only
            if self.lora.base_dtype:
                store_base_in(self.denoiser, self.lora.base_dtype)
        elif self.lora.base_dtype:
            raise ValueError("model.lora.base_dtype stores a LoRA run's frozen base in low precision; set "
                             "model.lora.rank > 0 (or model.lora.base_dtype=null for a full finetune)")
        if trainable:  # only parameters whose names start with one of these prefixes train
            for name, p in self.denoiser.named_parameters():
                p.requires_grad_(any(name.startswith(pre) for pre in trainable))
        self.trained_names = trained_names(self.denoiser)
        if not self.trained_names:
            raise ValueError("no denoiser parameter trains (model.trainable matches nothing); fix model.trainable")
        self.objective = JeDiObjective(self.components, ObjectiveConfig(**(objective or {})))
        ema = dict(ema or {})
        # EMA of what trains (all of the denoiser unless LoRA / model.trainable freeze parts of it)
        self.ema = (TrainingEMA(trained_parameters(self.denoiser), decay=ema.get("decay", 0.9999))
                    if ema.get("enabled", True) else None)
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._t_last = None

    # -- devices: the frozen parts follow the module ---------------------------------------------
    def configure_model(self):
        """strategy=fsdp: the denoiser sharded with FSDP2 and the EMA with it (Lightning calls this before the
        optimizer is built; other strategies: nothing to do)."""
        if not self._fsdp:
            return
        self.trainer.strategy.shard(self.denoiser)
        if self.ema is not None:
            self.ema.shard_like(trained_parameters(self.denoiser))

    def on_fit_start(self):
        self.denoiser.train()  # from_pretrained returns eval mode, which Lightning keeps (LoRA dropout would be off)
        self.components.text.to(self.device)
        c = self.components  # 8-bit text encoders are made on the device they run on (float8: CUDA only)
        quantize_text_encoders([c.text_encoder, c.text_encoder_2, c.text_encoder_3], self.hparams.text_encoder_quantization,
                               self.device)
        if self.components.vae is not None:
            self.components.vae.to(self.device)
        if self.ema is not None and self._zero3:  # each rank keeps its slice of the EMA, as of the weights
            self.ema.partition(trained_parameters(self.denoiser))
        elif self.ema is not None:
            self.ema.to(self.device)

    @property
    def _fsdp(self) -> bool:
        return self._trainer is not None and getattr(self.trainer.strategy, "shards_parameters", False)

    @property
    def _zero3(self) -> bool:
        return self._trainer is not None and getattr(self.trainer.strategy, "zero_stage_3", False)

    # -- one step --------------------------------------------------------------------------------
    def step_generator(self) -> torch.Generator:
        """Per-(seed, step, rank) randomness: a resumed run draws exactly the noise it would have drawn."""
        key = f"{self.hparams.seed}-{self.global_step}-{self.global_rank}".encode()
        g = torch.Generator(device=self.device)
        g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1))
        return g

    def training_step(self, batch, batch_idx):
        out = self.objective(batch, generator=self.step_generator())
        loss = out["loss"]
        finite = torch.isfinite(loss).all()
        finite = self.trainer.strategy.reduce_boolean_decision(bool(finite), all=True)
        if not finite:  # skip the step on every rank; stop after too many in a row
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.log("train/nonfinite_steps", float(self.nonfinite_total))
            if self.nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
                raise RuntimeError(f"loss was NaN/inf for {self.nonfinite_in_a_row} steps in a row; lower "
                                   "model.optimizer.lr or check the data (jedi-data stats)")
            return None
        self.nonfinite_in_a_row = 0
        b, _n = batch["is_ref"].shape
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/targets_per_set", out["num_targets"] / b)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        now = time.perf_counter()
        if self._t_last is not None:
            dt = now - self._t_last
            world = self.trainer.world_size
            images = int(batch.get("valid", batch["is_ref"]).sum())
            self.log("perf/sets_per_s", b * world / dt)
            self.log("perf/images_per_s", images * world / dt, prog_bar=True)
        self._t_last = now
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # bad data, summed over ranks: a collective, so here (every rank gets here each step, even when
        # training_step skipped a NaN loss) and only on the steps whose metrics reach the logger (the
        # check Lightning's own LearningRateMonitor/ThroughputMonitor use)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "global_counts") and self.trainer._logger_connector.should_update_logs:
            for kind, counts in dm.global_counts().items():
                for reason, count in counts.items():
                    self.log(f"data/{kind}_{reason}", float(count))

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # the EMA follows optimizer steps, not batches (gradient accumulation), and is updated before any
        # callback's batch-end hook, so a periodic checkpoint holds the EMA of its own step
        if self.ema is None or self.nonfinite_in_a_row:  # a skipped NaN step moved no weight
            return
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)  # DeepSpeed accumulates by itself
        if engine is not None and not engine.was_step_applied():  # mid-accumulation, or an fp16 overflow
            return
        self.ema.step(trained_parameters(self.denoiser))  # under ZeRO-3: each rank's slice, no communication

    # -- optimizer ------------------------------------------------------------------------------
    def configure_optimizers(self):
        """Optimizer and LR schedule from their `_partial_` configs (conf/model/optimizer, lr_scheduler)."""
        params = trained_parameters(self.denoiser)
        optimizer = build_partial("model.optimizer", DEFAULT_OPTIMIZER, self.hparams.optimizer, {
            "name": "choose the optimizer with model/optimizer=adamw or model/optimizer=adamw8bit "
                    "(conf/model/optimizer/), or set model.optimizer._target_"})(params)
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 10**6
        scheduler = build_partial("model.lr_scheduler", DEFAULT_LR_SCHEDULER, self.hparams.lr_scheduler, {
            "warmup_steps": "it is now model.lr_scheduler.num_warmup_steps (diffusers' get_scheduler)"})(
            optimizer=optimizer, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: EMA travels with them ---------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint["nonfinite_total"] = self.nonfinite_total
        checkpoint["trained_names"] = self.trained_names  # which parameters the EMA's shadow list follows
        checkpoint["family"] = self.components.family  # sd | sdxl | flux: refused against another family
        if self.lora.enabled:  # the base comes from model_dir: keep only what trained (a few MB, not GB)
            keep = {f"denoiser.{n}" for n in self.trained_names}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith("denoiser.") or k in keep}
            checkpoint["lora_base"] = self.lora_base

    def on_load_checkpoint(self, checkpoint):
        check_family(checkpoint, self.components.family, "the checkpoint being resumed")
        state = denoiser_state_from_checkpoint(checkpoint) if checkpoint.get("state_dict") else {}
        if self.lora.enabled:
            check_lora_checkpoint(checkpoint, self.lora_base, self.trained_names, "the checkpoint being resumed")
        elif state:  # Lightning loads them next: refuse another model's weights in one line first
            check_denoiser_weights(self.denoiser, state, "the checkpoint being resumed")
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
            if self._zero3:  # a whole EMA (saved without ZeRO-3) is cut to this rank's slice
                self.ema.partition(trained_parameters(self.denoiser))
            elif self._fsdp:  # likewise under FSDP (a sharded checkpoint's EMA is loaded sharded already)
                self.ema.shard_like(trained_parameters(self.denoiser))
        self.nonfinite_total = checkpoint.get("nonfinite_total", 0)
        rank_zero_info(f"resumed at step {checkpoint.get('global_step')}")

    # -- EMA weights for sampling / export ----------------------------------------------------------
    def ema_weights(self):
        """Context manager: the denoiser carries EMA weights inside, its training weights after."""
        module = self

        class _Swap:
            def __enter__(self):
                if module.ema is not None:
                    module.ema.store(trained_parameters(module.denoiser))
                    module.ema.copy_to(trained_parameters(module.denoiser))
                return module.denoiser

            def __exit__(self, *exc):
                if module.ema is not None:
                    module.ema.restore(trained_parameters(module.denoiser))

        return _Swap()
