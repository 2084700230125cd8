"""FSDP2 checkpoints (strategy=fsdp): a torch distributed-checkpoint (DCP) directory, read without running code.

Layout (jedi_train.training.strategies.FSDP2Strategy writes it): `__<rank>_0.distcp` (each rank's slices of
the weights, the AdamW states and the EMA), `.metadata` (DCP's index of them) and `meta.pt` (everything else
Lightning keeps: step, loops, LR schedule, hyper-parameters, the EMA's settings). Keys in the DCP part:
`state_dict` (the module's, `denoiser.*`), `optimizer_0`, `ema_shadow` ({trained name: EMA tensor}).

torch reads `.metadata` with pickle.load and non-tensor values with torch.load(weights_only=False): here the
index is first unpickled with only DCP's own metadata classes allowed, values load with weights_only=True and
`meta.pt` through checkpoints.safe_load, so a crafted checkpoint is refused before torch unpickles it.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import warnings

import torch

META = "meta.pt"  # Lightning's name (lightning.fabric.utilities.load._METADATA_FILENAME)
INDEX = ".metadata"  # DCP's
# what DCP's index holds: the classes defined in these modules, and these few globals
_INDEX_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_INDEX_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                  ("collections", "OrderedDict")}


def is_sharded(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX))


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _INDEX_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _INDEX_MODULES:
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and found.__module__ == module:  # its own classes, not what it imports
                return found
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def check_index(path: str) -> None:
    """Unpickle the DCP index allowing only DCP's metadata classes; ValueError naming what else it holds."""
    from jedi_train.training.checkpoints import UnsafeCheckpointError

    index = os.path.join(path, INDEX)
    try:
        with open(index, "rb") as f:
            _IndexUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{index} holds a Python object ({str(e).removeprefix('GLOBAL ')}) that a "
                                    "distributed-checkpoint index does not contain; it is not read (it could run "
                                    "code)") from None
    except (EOFError, OSError, AttributeError, ImportError, IndexError, TypeError) as e:
        raise ValueError(f"{path} is not a complete FSDP checkpoint ({INDEX} unreadable: {type(e).__name__})") from None


def read_meta(path: str, mmap: bool = True) -> dict:
    """meta.pt of a sharded checkpoint (after checking its index); ValueError when either is missing."""
    from jedi_train.training.checkpoints import safe_load

    meta = os.path.join(path, META)
    if not os.path.isfile(meta):
        raise ValueError(f"{path} is an incomplete FSDP checkpoint (no {META})")
    check_index(path)
    return safe_load(meta, mmap=mmap)


def _safe_planner(base):
    class SafeValues(base):
        """Non-tensor values (e.g. the optimizer's param_groups) with torch.load(weights_only=True)."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeValues


def load_planner(**kwargs):
    from torch.distributed.checkpoint import DefaultLoadPlanner

    return _safe_planner(DefaultLoadPlanner)(**kwargs)


def consolidate(path: str) -> dict:
    """The whole checkpoint in one process: meta.pt with `state_dict` (full tensors) and the EMA's shadow
    list put back in; the optimizer states are not read (export needs none)."""
    from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata
    from torch.distributed.checkpoint import load as dcp_load

    ckpt = read_meta(path, mmap=False)  # checks the index first
    reader = FileSystemReader(path)
    index = reader.read_metadata()
    full: dict = {}
    for fqn, item in index.state_dict_metadata.items():  # whole tensors to load the slices into
        where = index.planner_data.get(fqn, (fqn,))
        if where[0] in ("state_dict", "ema_shadow") and isinstance(item, TensorStorageMetadata):
            full.setdefault(where[0], {})[".".join(map(str, where[1:]))] = torch.empty(
                item.size, dtype=item.properties.dtype)
    if "state_dict" not in full:
        raise ValueError(f"{path} holds no model weights (no 'state_dict' in its shards); is it a jedi-train "
                         "FSDP checkpoint?")
    with warnings.catch_warnings():  # no_dist=True is the intent: one process joins the slices
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load(full, storage_reader=reader, planner=load_planner(), no_dist=True)
    ckpt["state_dict"] = full["state_dict"]
    if "ema_shadow" in full and isinstance(ckpt.get("ema"), dict):
        shadow = full["ema_shadow"]
        ckpt["ema"]["shadow_params"] = [shadow[n] for n in ckpt["trained_names"]]
    return ckpt
