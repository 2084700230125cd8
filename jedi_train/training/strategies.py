"""Lightning strategies as jedi-train configures them (conf/strategy/).

`AtomicDeepSpeedStrategy`: DeepSpeed writes a checkpoint as a directory of per-rank shards, in place, so
a kill mid-save leaves a half-written directory under the checkpoint's name. Here every rank writes into
a hidden temp dir beside it and rank 0 renames it into place once all ranks are done: a kill leaves the
previous checkpoint intact and a hidden temp dir that the next start removes (checkpoints.remove_partials).

`FSDP2Strategy` (strategy=fsdp): FSDP2 through Lightning's ModelParallelStrategy, its checkpoints atomic the
same way (see its doc).
"""
from __future__ import annotations

import os
import shutil

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

from jedi_common.atomic import PARTIAL, publish


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy whose checkpoint directories appear complete or not at all (see module doc)."""

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        filepath = self.broadcast(os.fspath(filepath))
        if "://" in filepath:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        directory, name = os.path.split(os.path.abspath(filepath))
        tmp = os.path.join(directory, f".{name}{PARTIAL}zero")  # one name on every rank
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)  # a save killed before
            os.makedirs(directory, exist_ok=True)
        self.barrier("jedi_checkpoint_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("jedi_checkpoint_written")  # every rank's shards are on disk
        if self.is_global_zero:
            publish(tmp, filepath)
        self.barrier("jedi_checkpoint_published")


def shards_weights(strategy) -> bool:
    """Every rank holds only a slice of each weight (ZeRO-3, FSDP): no rank can run the model alone."""
    return bool(getattr(strategy, "zero_stage_3", False) or getattr(strategy, "shards_parameters", False))


def check_fsdp_available() -> None:
    """One line when this torch cannot run FSDP2 (strategy=fsdp)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError(f"strategy=fsdp needs torch.distributed, which this torch ({torch.__version__}) was built "
                         "without; use strategy=single or a torch build with distributed support")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise ValueError(f"strategy=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this torch "
                         f"is {torch.__version__}: upgrade torch or use strategy=deepspeed_zero3") from None


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) over all ranks: weights, gradients, AdamW states and the EMA
    sharded (like ZeRO-3), through Lightning's ModelParallelStrategy with a 1-D data-parallel mesh (no tensor
    parallelism). Sharding is applied in `shard`, called from JeDiModule.configure_model: each block of the
    denoiser's block lists is its own FSDP unit (gathered for its forward/backward, freed after), the denoiser
    the root. Checkpoints: a distributed-checkpoint directory (jedi_train/training/sharded.py) written aside and
    renamed into place, the EMA's slices in it; read back by `load_checkpoint` without running pickled code."""

    shards_parameters = True

    def __init__(self, reshard_after_forward: bool = True, process_group_backend: str | None = None, **kwargs):
        check_fsdp_available()
        for key in ("data_parallel_size", "tensor_parallel_size", "save_distributed_checkpoint"):
            if key in kwargs:
                raise ValueError(f"strategy.{key}: strategy=fsdp shards over all ranks (no tensor parallelism) and "
                                 "always writes sharded checkpoints; remove the key")
        super().__init__(process_group_backend=process_group_backend, save_distributed_checkpoint=True, **kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank one data-parallel shard
        self._tensor_parallel_size = 1
        super().setup_environment()

    @property
    def mesh(self):
        return self.device_mesh["data_parallel"]

    def shard(self, denoiser: torch.nn.Module) -> None:
        """fully_shard each block of the denoiser's block lists (down/up blocks, transformer blocks), then the
        denoiser. A denoiser already sharded (configure_model runs again for validation) is left alone."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(denoiser, FSDPModule):
            return
        dtypes = {p.dtype for p in denoiser.parameters()}
        if len(dtypes) > 1:  # FSDP2 all-gathers one flat buffer per unit
            raise ValueError(f"strategy=fsdp shards weights of one dtype, the denoiser holds {sorted(map(str, dtypes))} "
                             "(model.lora.base_dtype?); set model.lora.base_dtype=null or use "
                             "strategy=deepspeed_zero2")
        for child in denoiser.children():
            if isinstance(child, torch.nn.ModuleList):
                for block in child:
                    fully_shard(block, mesh=self.mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(denoiser, mesh=self.mesh, reshard_after_forward=self.reshard_after_forward)

    # -- checkpoints: a DCP dir, published whole, with the EMA's slices ---------------------------------
    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint import save as dcp_save

        from jedi_train.training.checkpoints import atomic_save
        from jedi_train.training.sharded import META

        filepath = self.broadcast(os.fspath(filepath))
        if storage_options is not None or "://" in filepath:
            raise ValueError(f"strategy=fsdp writes checkpoints to a local or shared filesystem, not {filepath}; "
                             "set callbacks.model_checkpoint.dirpath to a directory path")
        directory, name = os.path.split(os.path.abspath(filepath))
        tmp = os.path.join(directory, f".{name}{PARTIAL}fsdp")  # one name on every rank
        if self.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)  # a save killed before
            os.makedirs(tmp)
        self.barrier("jedi_checkpoint_start")
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        ema = checkpoint.get("ema")
        if isinstance(ema, dict) and "shadow_params" in ema:  # the slices go with the weights' slices
            ema = checkpoint["ema"] = dict(ema)
            state["ema_shadow"] = dict(zip(checkpoint["trained_names"], ema.pop("shadow_params"), strict=True))
        dcp_save(state, storage_writer=FileSystemWriter(tmp))
        if self.is_global_zero:
            atomic_save(checkpoint, os.path.join(tmp, META))
        self.barrier("jedi_checkpoint_written")
        if self.is_global_zero:
            publish(tmp, filepath)
        self.barrier("jedi_checkpoint_published")

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from jedi_train.training.sharded import is_sharded, load_planner, read_meta

        path = self.broadcast(os.fspath(checkpoint_path))
        if not is_sharded(path):  # a whole .ckpt (e.g. of a DDP run): Lightning spreads it over the shards
            return super().load_checkpoint(path, weights_only=weights_only)
        meta = read_meta(path, mmap=False)  # and the index checked: nothing below unpickles code
        module = self.lightning_module
        strict = module.strict_loading
        model_state = get_model_state_dict(self.model)
        if not strict:  # a LoRA checkpoint holds the trained weights only
            trained = {f"denoiser.{n}" for n in meta.get("trained_names", [])}
            model_state = {k: v for k, v in model_state.items() if k in trained or not k.startswith("denoiser.")}
        state = {"state_dict": model_state}
        state.update({f"optimizer_{i}": get_optimizer_state_dict(self.model, opt)
                          for i, opt in enumerate(self.optimizers)})
        ema = getattr(module, "ema", None)
        names = meta.get("trained_names") or []
        if ema is not None and isinstance(meta.get("ema"), dict) and len(names) == len(ema.shadow_params):
            state["ema_shadow"] = dict(zip(names, ema.shadow_params, strict=True))  # loaded in place
        dcp_load(state, storage_reader=FileSystemReader(path), planner=load_planner())
        set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=strict))
        for i, opt in enumerate(self.optimizers):
            if f"optimizer_{i}" in state:
                set_optimizer_state_dict(self.model, opt, optim_state_dict=state[f"optimizer_{i}"],
                                         options=StateDictOptions(cpu_offload=True))
        meta["state_dict"] = state["state_dict"]  # loaded already; JeDiModule.on_load_checkpoint checks the names
        if "ema_shadow" in state:
            meta["ema"]["shadow_params"] = [state["ema_shadow"][n] for n in names]
        return meta
