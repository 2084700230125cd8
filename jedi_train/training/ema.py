"""The EMA of the trained weights, kept the way ZeRO-3 keeps the weights: each rank holds its own slice.

ZeRO-3 splits every parameter flat across the ranks: rank r holds elements [r*P, (r+1)*P) of the zero-padded
flat tensor (`param.ds_tensor`, P = `ds_tensor.ds_numel`). A full fp32 EMA on every rank would cost 4 bytes per
trained parameter on each rank (44 GiB for FLUX.1-dev: more than its ZeRO-3 weights, gradients and AdamW
states together over 8 ranks) and its update would gather the whole model every step. After `partition`, the
shadow is the rank's slices, updated from `ds_tensor` with no communication; under ZeRO-3 every rank writes
its own DeepSpeed model-states file, so each saves its slices there and `merge_partitions` joins them for
export. Under FSDP2 (strategy=fsdp) `shard_like` makes each shadow a DTensor sharded as its parameter: the
update is local (`to_local`), the strategy saves the slices in its distributed checkpoint and export reads them
whole. Otherwise (one device, DDP, ZeRO-2) this is diffusers' EMAModel unchanged.
"""
from __future__ import annotations

import math

import torch
from diffusers.training_utils import EMAModel


class TrainingEMA(EMAModel):
    partition_info: dict | None = None  # {"rank", "world_size", "shapes"} once partitioned

    def partition(self, parameters) -> None:
        """Keep only this rank's slice of each shadow tensor (`parameters`: ZeRO-3-partitioned, in the order
        the EMA was made from). Nothing to do when already partitioned (a resumed partitioned state)."""
        import torch.distributed as dist

        params = list(parameters)
        if len(params) != len(self.shadow_params):
            raise ValueError(f"the EMA follows {len(self.shadow_params)} tensors but {len(params)} parameters train")
        group = params[0].ds_process_group
        rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
        shapes = [list(p.ds_shape) for p in params]
        if self.partition_info is not None:
            if self.partition_info["shapes"] != shapes:
                raise ValueError("the resumed EMA slices are of other parameter shapes than this model's; resume "
                                 "with the model config the checkpoint was trained with")
            self.shadow_params = [s.to(p.ds_tensor.device) for s, p in zip(self.shadow_params, params)]
            return
        shards = []
        for s, p in zip(self.shadow_params, params):
            size = p.ds_tensor.ds_numel
            piece = s.detach().flatten()[rank * size:(rank + 1) * size]
            shard = torch.zeros(size, dtype=s.dtype, device=p.ds_tensor.device)  # the last slice is zero-padded
            shard[:piece.numel()] = piece
            shards.append(shard)
        self.shadow_params = shards
        self.partition_info = {"rank": rank, "world_size": world, "shapes": shapes}

    @property
    def sharded(self) -> bool:
        """Shadows are FSDP2 DTensors (shard_like)."""
        return any(type(s).__name__ == "DTensor" for s in self.shadow_params)

    def shard_like(self, parameters) -> None:
        """FSDP2: each whole shadow -> a DTensor laid out as its (sharded) parameter, cut locally (every rank
        holds the same whole EMA before; no communication). Shadows already DTensors are kept."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = list(parameters)
        if len(params) != len(self.shadow_params):
            raise ValueError(f"the EMA follows {len(self.shadow_params)} tensors but {len(params)} parameters train")
        shards = []
        for s, p in zip(self.shadow_params, params):
            if tuple(s.shape) != tuple(p.shape):
                raise ValueError(f"the EMA holds a tensor of shape {tuple(s.shape)} for a weight of shape "
                                 f"{tuple(p.shape)}; resume with the model config the checkpoint was trained with")
            shards.append(s if isinstance(s, DTensor) else
                          distribute_tensor(s.detach().to(p.device), p.device_mesh, p.placements, src_data_rank=None))
        self.shadow_params = shards

    @torch.no_grad()
    def step(self, parameters) -> None:
        if self.sharded:  # FSDP2: this rank's rows of each shadow from its rows of the weight
            self.optimization_step += 1
            decay = self.cur_decay_value = self.get_decay(self.optimization_step)
            for s, p in zip(self.shadow_params, parameters):
                s.to_local().lerp_(p.to_local().to(s.dtype), 1 - decay)
            return None
        if self.partition_info is None:
            return super().step(parameters)
        self.optimization_step += 1  # EMAModel.step's bookkeeping, on the slices
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        for s, p in zip(self.shadow_params, parameters):
            s.lerp_(p.ds_tensor.to(s.dtype), 1 - decay)

    def to(self, device=None, dtype=None, non_blocking=False) -> None:
        if self.partition_info is None and not self.sharded:  # slices stay where their weights' slices are
            super().to(device, dtype, non_blocking)

    def _whole(self, what: str):
        if self.partition_info is not None or self.sharded:
            raise RuntimeError(f"EMA.{what}: under ZeRO-3 / FSDP every rank holds only its slice of the EMA; export a "
                               "checkpoint (jedi-export) to sample with the EMA weights")

    def store(self, parameters) -> None:
        self._whole("store")
        super().store(parameters)

    def copy_to(self, parameters) -> None:
        self._whole("copy_to")
        super().copy_to(parameters)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.partition_info is not None:
            state["partition"] = dict(self.partition_info)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """A partitioned state loads only on the same rank of as many ranks; a whole one leaves this EMA whole
        (call `partition` again under ZeRO-3)."""
        import torch.distributed as dist

        state = dict(state_dict)
        info = state.pop("partition", None)
        if info is not None:
            here = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
            if (info["rank"], info["world_size"]) != here:
                raise ValueError(f"the checkpoint's EMA is rank {info['rank']}'s slice of a ZeRO-3 run over "
                                 f"{info['world_size']} ranks, this is rank {here[0]} of {here[1]}; resume on "
                                 f"{info['world_size']} devices in all, or export it (jedi-export) and start anew")
        super().load_state_dict(state)
        self.partition_info = info


def merge_partitions(states: list[dict]) -> dict:
    """The EMA states of every rank of a ZeRO-3 run -> one whole EMAModel state (what export reads)."""
    states = sorted(states, key=lambda s: s["partition"]["rank"])
    world = states[0]["partition"]["world_size"]
    ranks = [s["partition"]["rank"] for s in states]
    if ranks != list(range(world)):
        raise ValueError(f"the checkpoint holds the EMA slices of ranks {ranks} of a {world}-rank ZeRO-3 run; "
                         "it is incomplete: use another checkpoint of the run")
    shadow = []
    for i, shape in enumerate(states[0]["partition"]["shapes"]):
        flat = torch.cat([s["shadow_params"][i] for s in states])
        shadow.append(flat[:math.prod(shape)].reshape(shape).clone())
    merged = {k: v for k, v in states[0].items() if k not in ("partition", "shadow_params")}
    merged["shadow_params"] = shadow
    return merged
