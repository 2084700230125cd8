"""Checkpoint files that a kill cannot leave half-written and that cannot run code when read.

- `AtomicCheckpointIO` (Trainer plugin): Lightning's TorchCheckpointIO writes through an fsspec transaction
  that stages the file in $TMPDIR and, when $TMPDIR is another filesystem, *copies* it to its final name:
  a kill during the copy leaves a truncated `last.ckpt`. Here the bytes go to a hidden temp file beside
  the destination, are fsynced, then renamed (os.replace: atomic within a directory).
- `safe_load`: torch.load(weights_only=True) for every checkpoint a user hands us. jedi-train's own
  Lightning checkpoints need nothing beyond torch's defaults (ints, floats, strings, dicts, lists,
  tensors; checked on real runs); DeepSpeed's ZeRO shards need the few classes in DEEPSPEED_GLOBALS.
- `newest_complete`: the newest checkpoint of a run dir that loads, whatever its name.
- reading a run's weights back (jedi-export, resume): `load_checkpoint` (a file, a ZeRO dir or an FSDP dir
  (sharded.py), consolidated),
  `denoiser_state_from_checkpoint`, `load_denoiser_weights`, `copy_ema`, and the refusals of a checkpoint of another
  family or LoRA base (`check_family`, `check_lora_checkpoint`) that export and resume share.
"""
from __future__ import annotations

import contextlib
import glob
import importlib
import os
import pickle
import re
import tempfile

import torch
from diffusers.training_utils import EMAModel
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from jedi_common.atomic import PARTIAL, atomic_path, publish, remove_partials  # noqa: F401  (re-exported)
from jedi_common.errors import missing

# what DeepSpeed's ZeRO optimizer shards hold besides plain data (ZeRO-2/3, fp32/bf16/fp16)
DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address")


class UnsafeCheckpointError(ValueError):
    pass


def atomic_save(obj, path: str) -> None:
    """torch.save through jedi_common.atomic_path: a hidden partial file, fsynced, renamed into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def _resolve(names) -> list:
    out = []
    for name in names:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            out.append(getattr(importlib.import_module(module), attr))
    return out


def safe_load(path: str, map_location="cpu", mmap: bool = False, extra_globals=()) -> dict:
    """torch.load(weights_only=True): a checkpoint holding other objects is refused, never unpickled."""
    try:
        with torch.serialization.safe_globals(_resolve(extra_globals)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL (\S+)", str(e))
        what = found[0] if found else str(e).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"{path} holds a Python object ({what}) that checkpoints are not allowed to contain (loaded with "
            "torch.load(weights_only=True), so that a file cannot run code); if you trust it, re-save its "
            "contents as tensors and plain dicts/lists/numbers/strings and use that file") from None
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError)):
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a complete checkpoint (truncated or corrupt: {reason})") from None


def deepspeed_files(path: str) -> list[str]:
    """The shard files of a DeepSpeed checkpoint dir (its `latest` file names the tag dir)."""
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        raise ValueError(f"{path} is a directory but not a DeepSpeed or FSDP checkpoint (no 'latest' or '.metadata' file)")
    with open(latest) as f:
        tag_dir = os.path.join(path, f.read().strip())
    files = sorted(glob.glob(os.path.join(glob.escape(tag_dir), "*.pt")))
    if not any("model_states" in os.path.basename(p) for p in files):
        raise ValueError(f"{path} is an incomplete DeepSpeed checkpoint (no *model_states.pt in {tag_dir})")
    return files


def checkpoint_step(path: str) -> int:
    """The global step of a checkpoint file or DeepSpeed dir, after checking that every file of it loads
    (mmap: the tensors are not read). Raises ValueError saying what is wrong."""
    if not os.path.isdir(path):
        return int(safe_load(path, mmap=True).get("global_step", 0))
    from jedi_train.training import sharded

    if sharded.is_sharded(path):  # FSDP: meta.pt and the shard index
        return int(sharded.read_meta(path).get("global_step", 0))
    step = 0
    for f in deepspeed_files(path):
        state = safe_load(f, mmap=True, extra_globals=DEEPSPEED_GLOBALS)
        if "model_states" in os.path.basename(f):
            step = int(state.get("global_step", 0))
    return step


def checkpoint_mtime(path: str) -> float:
    from jedi_train.training.sharded import META

    for last in ("latest", META):  # what DeepSpeed / the FSDP strategy write last
        if os.path.isfile(os.path.join(path, last)):
            return os.path.getmtime(os.path.join(path, last))
    return os.path.getmtime(path)


def newest_complete(candidates) -> tuple[str | None, int, list[str]]:
    """(path, global step, [why each newer candidate was skipped]) for the newest candidate that loads."""
    skipped = []
    for path in sorted({str(p) for p in candidates}, key=checkpoint_mtime, reverse=True):
        try:
            return path, checkpoint_step(path), skipped
        except ValueError as e:
            skipped.append(str(e))
    return None, 0, skipped


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints through `atomic_save`; loads with weights_only=True unless a caller asks otherwise."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote (fsspec) paths: Lightning's way
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, os.fspath(path))

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        if weights_only is False or "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return safe_load(os.fspath(path), map_location=map_location)


# -- reading a run's weights back (jedi-export, resume) ----------------------------------------------
def load_checkpoint(path: str) -> dict:
    from jedi_train.training import sharded

    if sharded.is_sharded(path):  # FSDP: the shards joined in this process
        return sharded.consolidate(path)
    if os.path.isdir(path):  # DeepSpeed ZeRO checkpoint directory: consolidate shards to one fp32 state
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        # the converter unpickles the shards with weights_only=False: first prove that each one loads safely
        shards = {f: safe_load(f, mmap=True, extra_globals=DEEPSPEED_GLOBALS) for f in deepspeed_files(path)}
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "consolidated.ckpt")
            convert_zero_checkpoint_to_fp32_state_dict(path, out)
            ckpt = safe_load(out, extra_globals=DEEPSPEED_GLOBALS)
        if isinstance(ckpt.get("ema"), dict) and "partition" in ckpt["ema"]:  # ZeRO-3: each rank saved its slice
            from jedi_train.training.ema import merge_partitions

            ckpt["ema"] = merge_partitions([state["ema"] for f, state in shards.items()
                                            if "model_states" in os.path.basename(f)])
        return ckpt
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} {missing(path)}; give a .ckpt file or a DeepSpeed / FSDP checkpoint "
                                "dir")
    return safe_load(path)


def old_denoiser_key(key: str) -> str:
    """A state-dict key of a checkpoint written before the rename -> today's ("unet.x" -> "denoiser.x")."""
    head, sep, rest = key.partition("unet.")
    return f"{head}denoiser.{rest}" if sep and head in ("", "_forward_module.") else key


def denoiser_state_from_checkpoint(ckpt: dict) -> dict:
    state = ckpt.get("state_dict") or ckpt.get("module") or {}
    out = {}
    for k, v in state.items():
        k = old_denoiser_key(k).removeprefix("_forward_module.")
        if k.startswith("denoiser."):
            out[k[len("denoiser."):]] = v
    if not out:
        raise ValueError("checkpoint holds no denoiser weights (no 'denoiser.*' keys); is it a jedi-train checkpoint?")
    return out


def check_denoiser_weights(denoiser, state: dict, source: str) -> None:
    """Refuse, in one line, weights of another model (unexpected, mismatched or missing names)."""
    from jedi_train.models.joint import mismatched_weights

    bad, missing = mismatched_weights(denoiser, state)
    if bad or missing:
        example = (bad or missing)[0]
        raise ValueError(f"{source} is from another model ({len(bad)} unexpected/mismatched and {len(missing)} "
                         f"missing weights, e.g. {example!r}); use the model config it was trained with")


def load_denoiser_weights(denoiser, state: dict, source: str) -> None:
    check_denoiser_weights(denoiser, state, source)
    denoiser.load_state_dict(state)


def check_family(ckpt: dict, family: str, source: str) -> None:
    """A checkpoint trained on one backbone family is refused, in one line, against another family's model."""
    from jedi_train.models import families

    trained = ckpt.get("family")
    if trained and trained != family:
        title = families.FAMILIES[trained].title if trained in families.FAMILIES else trained
        raise ValueError(f"{source} is a {title} checkpoint but the model directory holds a "
                         f"{families.get(family).title} model; point model.model_dir (or --model-dir) at the base "
                         "model it was trained from")


def check_lora_checkpoint(ckpt: dict, fingerprint: str, names: list[str], source: str) -> None:
    """A LoRA checkpoint holds the trained weights only: it needs the base it was trained on and all of them."""
    if ckpt.get("lora_base") and ckpt["lora_base"] != fingerprint:
        raise ValueError(f"{source} holds a LoRA trained on another base model (base fingerprint "
                         f"{ckpt['lora_base']}, this one {fingerprint}); point model.model_dir (or --model-dir) at "
                         "the base model it was trained from")
    state = denoiser_state_from_checkpoint(ckpt)
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} of the {len(names)} LoRA-trained weights (e.g. "
                         f"{missing[0]!r}); use the model.lora settings it was trained with")


def copy_ema(denoiser, ckpt: dict) -> None:
    """The checkpoint's EMA weights into the denoiser: the EMA follows ckpt['trained_names'] (all weights in
    checkpoints written before that key existed)."""
    params = dict(denoiser.named_parameters())
    names = ckpt.get("trained_names") or list(params)
    ema = EMAModel([params[n] for n in names])
    ema.load_state_dict(ckpt["ema"])
    if len(ema.shadow_params) != len(names):
        raise ValueError(f"the checkpoint's EMA holds {len(ema.shadow_params)} tensors for {len(names)} trained "
                         "weights; export with --no-ema")
    ema.copy_to([params[n] for n in names])
