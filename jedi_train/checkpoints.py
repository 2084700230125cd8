"""Checkpoint files that a kill cannot leave half-written and that cannot run code when read.

- `AtomicCheckpointIO` (Trainer plugin): Lightning's TorchCheckpointIO writes through an fsspec transaction
  that stages the file in $TMPDIR and, when $TMPDIR is another filesystem, *copies* it to its final name:
  a kill during the copy leaves a truncated `last.ckpt`. Here the bytes go to a hidden temp file beside
  the destination, are fsynced, then renamed (os.replace: atomic within a directory).
- `safe_load`: torch.load(weights_only=True) for every checkpoint a user hands us. jedi-train's own
  Lightning checkpoints need nothing beyond torch's defaults (ints, floats, strings, dicts, lists,
  tensors; checked on real runs); DeepSpeed's ZeRO shards need the few classes in DEEPSPEED_GLOBALS.
- `newest_complete`: the newest checkpoint of a run dir that loads, whatever its name.
- `publish`: a finished temp file or dir renamed into place (strategies.AtomicDeepSpeedStrategy, exports).
"""
from __future__ import annotations

import contextlib
import glob
import importlib
import os
import pickle
import re
import shutil

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

PARTIAL = ".partial-"  # temp files are ".<name>.partial-<pid>": hidden, and never a checkpoint's name
# what DeepSpeed's ZeRO optimizer shards hold besides plain data (ZeRO-2/3, fp32/bf16/fp16)
DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address")


class UnsafeCheckpointError(ValueError):
    pass


def atomic_save(obj, path: str) -> None:
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}{PARTIAL}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: str, path: str) -> None:
    """Put the finished file or directory `tmp` at `path`, replacing what is there. A directory cannot be
    renamed over another one: the old one is moved aside (a hidden name) first, then removed."""
    directory, name = os.path.split(os.path.abspath(path))
    old = os.path.join(directory, f".{name}{PARTIAL}old-{os.getpid()}")
    if os.path.isdir(path) and not os.path.islink(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_partials(*dirs: str, name: str = "*", only_dead: bool = False) -> list[str]:
    """Temp files and dirs left by a save that was killed (they never carry a final name).
    only_dead: keep those of a live process (a directory other jobs publish into, e.g. exports): their
    names hold the writer's pid (`.<name>.partial-<pid>...`)."""
    removed = []
    for d in dirs:
        for p in glob.glob(os.path.join(glob.escape(str(d)), f".{name}{PARTIAL}*")):
            if only_dead:
                pid = re.match(r"(?:old-)?(\d+)", os.path.basename(p).split(PARTIAL, 1)[1])
                if pid is None or _pid_alive(int(pid.group(1))):
                    continue
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                removed.append(p)
    return removed


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
        raise ValueError(f"{path} is a directory but not a DeepSpeed checkpoint (no 'latest' file)")
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
    step = 0
    for f in deepspeed_files(path):
        state = safe_load(f, mmap=True, extra_globals=DEEPSPEED_GLOBALS)
        if "model_states" in os.path.basename(f):
            step = int(state.get("global_step", 0))
    return step


def checkpoint_mtime(path: str) -> float:
    latest = os.path.join(path, "latest")  # DeepSpeed writes it last
    return os.path.getmtime(latest if os.path.isfile(latest) else path)


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
