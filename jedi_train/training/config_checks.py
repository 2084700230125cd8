"""Plain-value checks of a composed jedi-train config, run before anything heavy (model, data, W&B).

Without them a wrong value surfaces late and far from its key: `trainer.max_steps=abc` as a TypeError
once the model is built and a W&B run exists, `data.batch_size=0` as a ZeroDivisionError in the data
stream, a text file as `ckpt_path` as a KeyError inside Lightning. Each check raises a ValueError (or
FileNotFoundError) whose message names the key and a value that works; cli/train.py prints it as one line.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

_ABSENT = object()

# key -> (smallest value, null allowed); keys a config does not have are not checked
INTS = {
    "seed": (0, False),
    "trainer.max_steps": (-1, False),  # -1: no step limit (Lightning)
    "trainer.max_epochs": (-1, True),
    "trainer.log_every_n_steps": (1, False),
    "trainer.accumulate_grad_batches": (1, False),
    "trainer.num_nodes": (1, False),
    "model.resolution": (8, False),
    "data.resolution": (8, False),
    "data.batch_size": (1, False),
    "data.num_workers": (0, False),
    "data.min_set": (1, False),
    "data.max_set": (1, False),
    "data.shuffle_buffer": (1, False),
    "data.epoch_sets": (1, True),
    "data.min_image_size": (1, False),
    "data.max_image_pixels": (1, False),
}
# key -> (lowest, highest, null allowed, a value to suggest)
FLOATS = {
    "model.optimizer.lr": (0.0, None, False, 1e-4),
    "trainer.gradient_clip_val": (0.0, None, True, 1.0),
    "data.flip_prob": (0.0, 1.0, False, 0.5),
}


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=_ABSENT)


def _check_int(key: str, value, low: int, nullable: bool) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}={value!r} is not a whole number; give e.g. {key}={max(low, 1)}")  # noqa: TRY004
    if value < low:
        raise ValueError(f"{key}={value} is too small; use {key}={low} or more")


def _check_float(key: str, value, low: float, high: float | None, nullable: bool, example: float) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}={value!r} is not a number; give e.g. {key}={example}")  # noqa: TRY004
    if value < low or (high is not None and value > high):
        raise ValueError(f"{key}={value} is out of range; use a value "
                         + (f"in [{low}, {high}]" if high is not None else f">= {low}"))


def _is_torch_file(path: Path) -> bool:
    """A torch.save file: a zip with a data.pkl, or the legacy format (a pickle, first byte 0x80)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("data.pkl") for n in z.namelist())
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def check_ckpt_path(value) -> None:
    if value in (None, "last"):
        return
    path = Path(str(value))
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path {value} does not exist; give a checkpoint file, a DeepSpeed / FSDP "
                                "checkpoint dir, 'last', or null")
    if path.is_file() and not _is_torch_file(path):  # a directory: a DeepSpeed checkpoint, Lightning's to read
        raise ValueError(f"ckpt_path {value} is not a checkpoint (not a file written by torch.save); give a "
                         "Lightning .ckpt file (e.g. runs/<run>/checkpoints/last.ckpt), a DeepSpeed checkpoint "
                         "dir, 'last', or null")


def check_strategy(cfg: DictConfig) -> None:
    """strategy=fsdp where it cannot run: a torch without FSDP2, or options FSDP2 cannot shard."""
    target = str(OmegaConf.select(cfg, "strategy._target_", default="") or "")
    if not target.endswith("FSDP2Strategy"):
        return
    from jedi_train.training.strategies import check_fsdp_available

    check_fsdp_available()
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    if precision not in ("32", "32-true", "bf16-mixed", "bf16-true", "16-true"):  # Lightning's ModelParallelStrategy
        raise ValueError(f"trainer.precision={precision} does not work with strategy=fsdp (Lightning's "
                         "ModelParallelStrategy takes 32-true, bf16-mixed, bf16-true or 16-true); use "
                         "trainer.precision=bf16-mixed")
    if OmegaConf.select(cfg, "model.lora.base_dtype", default=None):
        raise ValueError("model.lora.base_dtype stores the frozen base in another dtype than the adapter, and FSDP2 "
                         "(strategy=fsdp) gathers each block's weights as one buffer of one dtype; set "
                         "model.lora.base_dtype=null or use strategy=deepspeed_zero2")
    if "8bit" in str(OmegaConf.select(cfg, "model.optimizer._target_", default="") or ""):
        raise ValueError("model/optimizer=adamw8bit (bitsandbytes) does not step FSDP2's sharded DTensor weights; "
                         "use model/optimizer=adamw with strategy=fsdp, or strategy=deepspeed_zero2")


def check_config(cfg: DictConfig) -> None:
    """Raise ValueError / FileNotFoundError naming the first key whose value cannot work."""
    for key, (low, nullable) in INTS.items():
        value = _get(cfg, key)
        if value is not _ABSENT:
            _check_int(key, value, low, nullable)
    for key, spec in FLOATS.items():
        value = _get(cfg, key)
        if value is not _ABSENT:
            _check_float(key, value, *spec)

    res, data_res = _get(cfg, "model.resolution"), _get(cfg, "data.resolution")
    if res is not _ABSENT and res % 8:  # jedi-synth's rule: the sets it would write must fit the model
        raise ValueError(f"model.resolution={res} is not a multiple of 8 (jedi-synth refuses it too); use e.g. "
                         f"model.resolution={max(8, round(res / 8) * 8)}")
    if res is not _ABSENT and data_res is not _ABSENT and data_res != res:  # the data is decoded at model.resolution
        raise ValueError(f"data.resolution={data_res} differs from model.resolution={res}; the data is prepared at "
                         "the model's resolution: set model.resolution instead (data.resolution follows it)")
    steps, epochs, max_time = _get(cfg, "trainer.max_steps"), _get(cfg, "trainer.max_epochs"), _get(cfg, "trainer.max_time")
    if steps == -1 and epochs in (_ABSENT, None, -1) and max_time in (_ABSENT, None):
        raise ValueError("trainer.max_steps=-1 means no step limit (Lightning) and nothing else bounds this run: it "
                         "would train until killed; give trainer.max_steps=N, or bound it with "
                         "trainer.max_time=DD:HH:MM:SS (or trainer.max_epochs=N)")
    lo, hi = _get(cfg, "data.min_set"), _get(cfg, "data.max_set")
    if lo is not _ABSENT and hi is not _ABSENT and lo > hi:
        raise ValueError(f"data.min_set={lo} is larger than data.max_set={hi}; give data.min_set <= data.max_set")
    check_ckpt_path(OmegaConf.select(cfg, "ckpt_path"))
    check_strategy(cfg)
