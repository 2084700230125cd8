"""train(cfg): compose everything a Hydra config names and fit. The entry point (cli/train.py) is thin.

Order of events: seed -> data ready (synthesized if the config asks and shards are missing) ->
model -> datamodule -> resume checkpoint (the run dir's newest complete one) -> logger (W&B offline
without a key; run id kept in the run dir) -> callbacks -> strategy -> Trainer.fit -> export.
SIGTERM / SIGINT during fit: checkpoint at the current step (callbacks.Checkpoint), exit 128 + signal.
"""
from __future__ import annotations

import csv
import io
import os
import uuid
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from jedi_common.atomic import atomic_write_text
from jedi_common.hydra_args import CONF_DIR as _CONF_DIR
from jedi_train.export.artifacts import wandb_offline
from jedi_train.training.checkpoints import (
    AtomicCheckpointIO,
    checkpoint_step,
    newest_complete,
    remove_partials,
)
from jedi_train.training.strategies import shards_weights

CONF_DIR = str(_CONF_DIR)  # Hydra's APIs take a str; the directory is found in jedi_common.hydra_args


class _ContinuedWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; this one keeps the rows from before the
    checkpoint the run resumes from and appends after them (one history per run dir)."""

    def __init__(self, log_dir: str, resume_step: int | None):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by __init__
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if self.resume_step is not None and not self._redone(r)]
        kept = io.StringIO(newline="")
        writer = csv.DictWriter(kept, fieldnames=reader.fieldnames or [])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.metrics_file_path, kept.getvalue())  # the project's one atomic writer
        self.metrics_keys = list(reader.fieldnames or [])  # save() appends under this header (or rewrites it)

    def _redone(self, row: dict) -> bool:
        """Logged after the checkpoint, so logged again by the resumed run: training-step rows carry the
        number of steps before them (Lightning), callback rows the global step they measured at."""
        try:
            step = int(float(row.get("step") or -1))
        except ValueError:
            return False
        return step > self.resume_step or (step == self.resume_step and bool(row.get("train/loss")))


class ContinuedCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives resumes. resume_step: the global step of the checkpoint the
    run resumes from; None = a fresh start (earlier rows are dropped, as Lightning does)."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.resume_step)
        return self._experiment


def make_logger(cfg: DictConfig, output_dir: str, resume_step: int | None = None):
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    kwargs = {}
    if cfg.logger._target_ in ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger"):
        kwargs.update(_target_=f"{__name__}.ContinuedCSVLogger", resume_step=resume_step)
    if cfg.logger._target_.endswith("WandbLogger"):
        if cfg.logger.get("offline") is None:  # automatic: no key, no network use
            kwargs["offline"] = wandb_offline()
        id_file = Path(output_dir) / "wandb_id.txt"  # resumed / requeued runs continue the same W&B run
        if not id_file.exists():
            id_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(id_file, uuid.uuid4().hex[:12])
        kwargs.update(id=id_file.read_text().strip(), resume="allow")
    logger = hydra.utils.instantiate(cfg.logger, **kwargs)
    if hasattr(logger, "log_hyperparams"):
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def checkpoint_dir(cfg: DictConfig, output_dir: str) -> Path:
    return Path(OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
                or Path(output_dir) / "checkpoints")


def find_resume_checkpoint(cfg: DictConfig, output_dir: str) -> tuple[str | None, int | None]:
    """(path, global step) to resume from. ckpt_path: a path, or null / 'last' = the newest checkpoint
    of the run dir that loads, whatever its name (last.ckpt, stepNNNNNNN.ckpt, SLURM's hpc_ckpt_*.ckpt,
    DeepSpeed dirs); a truncated or unreadable one is skipped with a message saying why."""
    if cfg.get("ckpt_path") not in (None, "last"):
        if not Path(cfg.ckpt_path).exists():
            raise FileNotFoundError(f"ckpt_path {cfg.ckpt_path} does not exist; give a checkpoint file, a DeepSpeed "
                                    "checkpoint dir, 'last', or null")
        return str(cfg.ckpt_path), checkpoint_step(str(cfg.ckpt_path))
    ckpt_dir = checkpoint_dir(cfg, output_dir)
    candidates = [*ckpt_dir.glob("*.ckpt"), *Path(output_dir).glob("hpc_ckpt_*.ckpt")]
    path, step, skipped = newest_complete(candidates)
    for why in skipped:
        rank_zero_warn(f"{why}; " + (f"resuming from {Path(path).name}" if path else "trying an older checkpoint"),
                       category=UserWarning)
    if path is None and candidates:  # never train from scratch over checkpoints that exist but do not load
        raise ValueError(f"no checkpoint in {ckpt_dir} loads ({skipped[0]}); pass ckpt_path=PATH, or move them "
                         "away to start fresh")
    if path is None and cfg.get("ckpt_path") == "last":
        rank_zero_info(f"ckpt_path=last but {ckpt_dir} holds no checkpoint yet: starting fresh")
    return path, (step if path else None)


@rank_zero_only
def clean_unfinished_saves(cfg: DictConfig, output_dir: str) -> None:
    for p in remove_partials(checkpoint_dir(cfg, output_dir), output_dir):
        rank_zero_info(f"removed {p}: an unfinished save of a run that was killed")


def check_resume_strategy(cfg: DictConfig, ckpt_path: str | None) -> None:
    """A sharded (FSDP) checkpoint resumes under strategy=fsdp only; other strategies cannot read its slices."""
    from jedi_train.training.sharded import is_sharded

    if ckpt_path and is_sharded(ckpt_path) and not str(cfg.strategy.get("_target_", "")).endswith("FSDP2Strategy"):
        raise ValueError(f"{ckpt_path} is a sharded checkpoint of strategy=fsdp; resume it with strategy=fsdp "
                         f"(or export its weights: jedi-export {ckpt_path} OUT)")


def make_strategy(cfg: DictConfig):
    if "_target_" in cfg.strategy:
        return hydra.utils.instantiate(cfg.strategy)
    return cfg.strategy.get("name", "auto")


def final_checkpoint(trainer) -> str:
    """The checkpoint of the run's last step (what export_after_fit reads when the weights are sharded)."""
    last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
    if not last or not os.path.exists(last) or checkpoint_step(last) != trainer.global_step:
        raise ValueError("export_after_fit with sharded weights (ZeRO-3 / FSDP) exports the checkpoint of the last "
                         "step, and none was saved; keep callbacks.model_checkpoint.save_last=true (or export a "
                         "checkpoint with jedi-export)")
    return last


def run_dir(cfg: DictConfig) -> str:
    """paths.output_dir; in a sweep (-m) each job gets its own ${hydra.sweep.dir}/${hydra.sweep.subdir}."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(HydraConfig.get().runtime.output_dir)
    return str(cfg.paths.output_dir)


def train(cfg: DictConfig) -> dict:
    from jedi_train.training.datamodule import (
        build_datamodule,  # heavy imports after config errors had their chance
    )

    output_dir = run_dir(cfg)
    if output_dir != str(cfg.paths.output_dir):
        cfg.paths.output_dir = output_dir  # callbacks' dirs interpolate it
    os.makedirs(output_dir, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    atomic_write_text(os.path.join(output_dir, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))  # never half

    pipeline_dir = os.path.join(output_dir, "pipeline")
    if cfg.get("export_after_fit"):
        from jedi_train.export.to_pipeline import check_export_target

        check_export_target(pipeline_dir, overwrite=True)  # refused now, not after hours of training
    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    datamodule = build_datamodule(cfg.data, module.components.text.tokenizers, resolution=cfg.model.resolution,
                                  seed=cfg.seed, text_layout=module.components.text.layout)
    # the one place model and data meet: cached encodings are checked against (and may free) these encoders
    datamodule.cache_model = (cfg.model.model_dir, module.components)
    datamodule.split_heldout(output_dir)  # your own sources: a seeded split of them is held out (heldout.json)
    clean_unfinished_saves(cfg, output_dir)
    ckpt_path, resume_step = find_resume_checkpoint(cfg, output_dir)
    check_resume_strategy(cfg, ckpt_path)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()
                 if c is not None and "_target_" in c]
    trainer = hydra.utils.instantiate(cfg.trainer, logger=make_logger(cfg, output_dir, resume_step),
                                      callbacks=callbacks, strategy=make_strategy(cfg),
                                      plugins=[AtomicCheckpointIO()])  # DeepSpeed writes its dirs itself
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    stopped_by = next((cb.stopped_by for cb in trainer.checkpoint_callbacks if getattr(cb, "stopped_by", None)), None)
    if stopped_by:  # SIGTERM / Ctrl+C: the Checkpoint callback saved the step it stopped at; no export
        from jedi_train.training.callbacks.checkpoint import exit_at_once_on_signals

        exit_at_once_on_signals()  # a second signal from here on: exit at once
        raise SystemExit(128 + stopped_by)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result = {"output_dir": output_dir, "global_step": trainer.global_step, "metrics": metrics}
    final = final_checkpoint(trainer) if cfg.get("export_after_fit") and shards_weights(trainer.strategy) else None
    if cfg.get("export_after_fit") and trainer.is_global_zero:
        from jedi_train.export.to_pipeline import export_checkpoint, export_module

        # replaces the previous export; under ZeRO-3 / FSDP no rank holds the whole model: the final checkpoint, joined
        result["pipeline_dir"] = (export_checkpoint(final, pipeline_dir, overwrite=True) if final else
                                  export_module(module, pipeline_dir))
        if cfg.get("log_pipeline_artifact", True):
            from jedi_train.export.artifacts import log_pipeline_artifact

            result["artifact_aliases"] = log_pipeline_artifact(trainer.logger, pipeline_dir, trainer.global_step,
                                                               metrics, cfg.get("optimized_metric"), output_dir)
    if cfg.get("log_checkpoint_artifact") and trainer.is_global_zero:
        from jedi_train.export.artifacts import log_checkpoint_artifact

        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        log_checkpoint_artifact(trainer.logger, last or str(checkpoint_dir(cfg, output_dir) / "last.ckpt"),
                                trainer.global_step)
    return result
