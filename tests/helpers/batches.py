"""Training batches made up for tests, in the datamodule's contract (pixel_values in [-1, 1])."""
from __future__ import annotations

import torch


def set_batch(input_ids: torch.Tensor, sets: int, n: int, res: int, seed: int = 0) -> dict:
    """`sets` full sets of n random res x res images, the first of each the reference; input_ids
    (sets, n, L) as given. The pixels come from torch.Generator().manual_seed(seed) alone."""
    g = torch.Generator().manual_seed(seed)
    is_ref = torch.zeros(sets, n, dtype=torch.bool)
    is_ref[:, 0] = True
    return {"pixel_values": torch.rand(sets, n, 3, res, res, generator=g) * 2 - 1, "input_ids": input_ids,
            "is_ref": is_ref, "valid": torch.ones(sets, n, dtype=torch.bool)}
