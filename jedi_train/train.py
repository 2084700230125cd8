"""train(cfg): compose everything a Hydra config names and fit. The entry point (cli/train.py) is thin.

Order of events: seed -> data ready (synthesized if the config asks and shards are missing) ->
model -> datamodule -> logger (W&B offline without a key; run id kept in the run dir) ->
callbacks -> strategy -> Trainer.fit (resuming from the run dir's last checkpoint) -> export.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def make_logger(cfg: DictConfig, output_dir: str):
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    kwargs = {}
    if cfg.logger._target_.endswith("WandbLogger"):
        if cfg.logger.get("offline") is None:  # automatic: no key, no network use
            kwargs["offline"] = not wandb_key_configured() or os.environ.get("WANDB_MODE") == "offline"
        id_file = Path(output_dir) / "wandb_id.txt"  # resumed / requeued runs continue the same W&B run
        if not id_file.exists():
            id_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = id_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(uuid.uuid4().hex[:12])
            os.replace(tmp, id_file)
        kwargs.update(id=id_file.read_text().strip(), resume="allow")
    logger = hydra.utils.instantiate(cfg.logger, **kwargs)
    if hasattr(logger, "log_hyperparams"):
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def find_resume_checkpoint(cfg: DictConfig, output_dir: str) -> str | None:
    """ckpt_path: a path, 'last', or null (= newest of the run dir's last.ckpt and the hpc_ckpt_*.ckpt
    Lightning writes when SLURM pre-empts a job)."""
    ckpt_dir = Path(output_dir) / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if cfg.get("ckpt_path") in (None, "last"):
        found = [p for p in [last, *Path(output_dir).glob("hpc_ckpt_*.ckpt"), *ckpt_dir.glob("hpc_ckpt_*.ckpt")]
                 if p.exists()]
        if found:
            return str(max(found, key=lambda p: p.stat().st_mtime))
        if cfg.get("ckpt_path") == "last":
            rank_zero_info(f"ckpt_path=last but {last} does not exist yet: starting fresh")
        return None
    if not Path(cfg.ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path {cfg.ckpt_path} does not exist; give a checkpoint file, a DeepSpeed "
                                "checkpoint dir, 'last', or null")
    return str(cfg.ckpt_path)


def make_strategy(cfg: DictConfig):
    if "_target_" in cfg.strategy:
        return hydra.utils.instantiate(cfg.strategy)
    return cfg.strategy.get("name", "auto")


def run_dir(cfg: DictConfig) -> str:
    """paths.output_dir; in a sweep (-m) each job gets its own ${hydra.sweep.dir}/${hydra.sweep.subdir}."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(HydraConfig.get().runtime.output_dir)
    return str(cfg.paths.output_dir)


def train(cfg: DictConfig) -> dict:
    from .datamodule import build_datamodule  # heavy imports after config errors had their chance

    output_dir = run_dir(cfg)
    if output_dir != str(cfg.paths.output_dir):
        cfg.paths.output_dir = output_dir  # callbacks' dirs interpolate it
    os.makedirs(output_dir, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    tmp = os.path.join(output_dir, f".config.yaml.tmp{os.getpid()}")
    OmegaConf.save(cfg, tmp, resolve=True)
    os.replace(tmp, os.path.join(output_dir, "config.yaml"))  # atomic: a reader never sees half a config

    module = hydra.utils.instantiate(cfg.model, _convert_="all")
    datamodule = build_datamodule(cfg.data, module.components.tokenizer, resolution=cfg.model.resolution,
                                  seed=cfg.seed)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()
                 if c is not None and "_target_" in c]
    trainer = hydra.utils.instantiate(cfg.trainer, logger=make_logger(cfg, output_dir), callbacks=callbacks,
                                      strategy=make_strategy(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=find_resume_checkpoint(cfg, output_dir))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    result = {"output_dir": output_dir, "global_step": trainer.global_step, "metrics": metrics}
    if cfg.get("export_after_fit") and trainer.is_global_zero:
        from .export import export_module

        result["pipeline_dir"] = export_module(module, os.path.join(output_dir, "pipeline"))
    return result
